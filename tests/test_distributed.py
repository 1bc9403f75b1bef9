"""Several processes through ``accelerate launch`` on the CPU (gloo): the trainers give the same model whatever the
split of the global batch into processes and micro-batches, only rank 0 writes, a killed multi-process run resumes
exactly, the autoencoder's learned log-variance stays in step across ranks; and the accelerate config files load.

Every run is a real subprocess (``accelerate launch --multi_gpu --num_processes 2 ... run.device=cpu``, or plain
``python scripts/...`` for one process) with ``OMP_NUM_THREADS=1``, a fresh ``run.out_dir`` and a free port.

Measured on the 2-core development CPU (4 steps of the tiny U-Net, ``run.ema_decay=0.9``, the gradient clipped at every
step): two processes at batch 4, one at batch 8 and one at batch 4 with ``grad_accum=2`` agree in every saved tensor
(weights, EMA, AdamW moments) to at most 3e-6 relative in norm (``|a - b| / |b|``), and loss.csv to 1e-7 relative (the
two-process and the accumulating run agree bit for bit); a killed and resumed run ends bit for bit where the unkilled
run does. Element-wise bounds are machine-dependent for tensors that start at zero (a residual block's output
convolution, whose EMA after 4 steps is of the order of the learning rate): the worst element there was 1.5e-5 of the
tensor's largest entry here and 1.3e-4 on the CI machine, so the state is compared in norm. The bounds asserted are 1e-4
(relative in norm per saved tensor; relative for losses): a wrong split of the batch moves the AdamW moments by tens of
per cent.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.core.config import ConfigError, UserError, load_config
from pipelines.core.processes import run_in_processes
from tests.launches import (
    GLOBAL_BATCH,
    REPO,
    STEPS,
    TOL,
    assert_same_losses,
    assert_same_state,
    command,
    diffusion,
    files,
    final_checkpoint,
    kill_process_tree,
    loss_rows,
    run,
    subprocess_env,
    with_port,
)
from tests.pipeline_helpers import autoencoder_overrides, encode_overrides


@pytest.fixture(scope="module")
def latents(chain) -> Path:
    return chain["latents"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.mark.slow
def test_two_processes_match_one_process_at_double_batch(ddp, single):
    assert_same_losses(ddp["out"], single["out"])
    assert assert_same_state(final_checkpoint(ddp["out"]), final_checkpoint(single["out"])) < TOL


@pytest.mark.slow
def test_grad_accum_matches_double_batch(latents, work, single):
    out = work / "accum"
    run(command("train_diffusion.py", diffusion(latents, out, GLOBAL_BATCH // 2, "run.grad_accum=2"), 1), work)
    assert_same_losses(out, single["out"])
    assert_same_state(final_checkpoint(out), final_checkpoint(single["out"]))


@pytest.mark.slow
def test_only_rank_zero_writes(ddp, single):
    out = ddp["out"]
    # the same files as a one-process run (nothing from rank 1, no temporary leftovers), sample sheets included
    assert files(out) == files(single["out"])
    assert {"config.yaml", "loss.csv", "loss.png", "summary.json", "checkpoints/latest"} <= set(files(out))
    assert any(f.startswith("samples/") for f in files(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    text = (out / "loss.csv").read_text()
    assert text.count("step,") == 1 and len(text.splitlines()) == STEPS + 1  # one header, one row per step
    assert [r["step"] for r in loss_rows(out)] == [f"{s}.0" for s in range(1, STEPS + 1)]
    assert ddp["log"].count("diffusion: {") == 1  # only the main process reports
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def _bad_input_on_rank_one() -> int:
    """A stage that finds bad input in one process only (spawned: module level, so it pickles)."""
    if os.environ.get("RANK") == "1":
        raise ConfigError("data.latents: no shards in /nowhere")
    return int(os.environ.get("WORLD_SIZE", "1"))


@pytest.mark.slow
def test_run_in_processes_trains_the_model_one_process_trains(latents, work, single):
    """The demo's way to several processes (spawned from inside one): the same model as one process at double
    batch, the same files, and rank 0's summary handed back."""
    from pipelines.stages.configs import DiffusionTrainConfig
    from pipelines.stages.train_diffusion import train_diffusion

    out = work / "spawned"
    cfg = load_config(DiffusionTrainConfig, None, [*diffusion(latents, out, GLOBAL_BATCH // 2), "run.device=cpu"])
    summary = run_in_processes(train_diffusion, (cfg,), processes=2)
    assert summary["steps"] == STEPS and summary == json.loads((out / "summary.json").read_text())
    assert_same_losses(out, single["out"])
    assert_same_state(final_checkpoint(out), final_checkpoint(single["out"]))
    assert files(out) == files(single["out"])


def test_run_in_processes_turns_a_childs_bad_input_into_one_error():
    with pytest.raises(UserError, match="no shards in /nowhere"):
        run_in_processes(_bad_input_on_rank_one, (), processes=2)
    assert run_in_processes(_bad_input_on_rank_one, (), processes=1) == 1  # one process: called in place


@pytest.mark.slow
def test_killed_run_resumes_where_an_unkilled_run_ends(latents, work, ddp):
    """SIGKILL after the first checkpoint, rerun the same command: the same loss rows and, bit for bit, the same
    final state as the unkilled run. Without CUDA, this run takes the default ``run.device=auto``, which must form
    the same CPU process group as ``run.device=cpu`` (not two lone main processes training alone into one folder)."""
    out = work / "killed"
    device = "cpu" if torch.cuda.is_available() else "auto"
    cmd = command("train_diffusion.py", diffusion(latents, out, GLOBAL_BATCH // 2), processes=2, device=device)
    proc = subprocess.Popen(with_port(cmd), cwd=REPO, env=subprocess_env(work), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "latest").is_file():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
    finally:
        kill_process_tree(proc)
    assert not (out / "summary.json").exists(), "killed too late: the run had finished"
    killed_at = (out / "checkpoints" / "latest").read_text().strip()
    assert killed_at != f"step_{STEPS:07d}"

    log = run(cmd, work)  # the same command (a new free port)
    assert log.count("diffusion: {") == 1  # one main process
    assert f"resumed from {out / 'checkpoints' / killed_at}" in log
    assert loss_rows(out) == loss_rows(ddp["out"])  # the same rows, none twice
    assert assert_same_state(final_checkpoint(out), final_checkpoint(ddp["out"]), tol=0) == 0
    assert files(out) == files(ddp["out"])


AUTOENCODER_PROBE = '''
"""train_autoencoder, then print each rank's learned logvar and a digest of every trained parameter and EMA."""
import hashlib, os, sys
import pipelines.stages.train_autoencoder as stage
from pipelines.core.config import load_config
from pipelines.stages.configs import AutoencoderTrainConfig

states = []


class Recorded(stage.TrainingState):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        states.append(self)


stage.TrainingState = Recorded
stage.train_autoencoder(load_config(AutoencoderTrainConfig, None, sys.argv[1:]), log=lambda *a, **k: None)
(state,) = states
# parameters only (with disc_norm=batch the discriminator's running statistics would be each rank's own)
tensors = {f"{n}.{k}": v for n, m in state.modules.items() for k, v in m.named_parameters()}
tensors |= {f"ema_{n}.{k}": v for n, e in state.emas.items() for k, v in e.state_dict().items()}
digest = hashlib.blake2b()
for key in sorted(tensors):
    digest.update(key.encode() + tensors[key].detach().cpu().contiguous().numpy().tobytes())
logvar = float(state.modules["loss_logvar"]["logvar"])
print(f"PROBE rank={os.environ.get('RANK', '0')} logvar={logvar.hex()} tensors={digest.hexdigest()}", flush=True)
'''


def autoencoder_run(chain, out: Path, batch: int) -> list[str]:
    """The tiny VAE for 4 steps with its GAN on from step 1."""
    return [*autoencoder_overrides(chain["videos"], out, steps=STEPS), f"run.batch_size={batch}", "loss.disc_start=1",
            "run.ema_decay=0.9"]


@pytest.fixture(scope="module")
def autoencoder_ddp(chain, work) -> dict:
    """Two processes at batch 2 (global batch 4) through a probe that prints each rank's trained state."""
    probe = work / "autoencoder_probe.py"
    probe.write_text(AUTOENCODER_PROBE)
    out = work / "autoencoder"
    return {"out": out, "log": run(command(probe, autoencoder_run(chain, out, 2), processes=2), work)}


@pytest.mark.slow
def test_autoencoder_logvar_agrees_across_ranks(autoencoder_ddp):
    """``logvar`` is trained inside the DDP module, so its gradient is all-reduced and both ranks hold the same
    value bit for bit. Were it outside (not all-reduced), each rank would step it with its own batch's gradient
    and the two values would part after the first steps."""
    out, log = autoencoder_ddp["out"], autoencoder_ddp["log"]
    lines = sorted(line.split() for line in log.splitlines() if line.startswith("PROBE "))
    assert [line[1] for line in lines] == ["rank=0", "rank=1"], log[-3000:]
    (_, _, logvar0, digest0), (_, _, logvar1, digest1) = lines
    assert logvar0 == logvar1 and digest0 == digest1  # VAE, discriminator, logvar, EMA: the same on both ranks
    saved = load_file(final_checkpoint(out) / "loss_logvar.safetensors")["logvar"]
    assert float(saved).hex() == logvar0.split("=")[1] and float(saved) != 0.0  # trained, and what rank 0 saved
    rows = loss_rows(out)
    assert [r["step"] for r in rows] == [f"{s}.0" for s in range(1, STEPS + 1)]
    assert all(r["disc_loss"] for r in rows[1:])  # the discriminator phase ran from step 1 on


@pytest.mark.slow
def test_autoencoder_two_processes_match_one_process_at_double_batch(chain, work, autoencoder_ddp):
    """The same for the autoencoder with its GAN on from step 1: each frame's posterior noise is keyed by its slot,
    the PatchGAN's GroupNorm normalises each frame alone, and the adaptive weight takes gradients averaged over
    processes, so two processes at batch 2 train what one trains at batch 4 (LDM's BatchNorm would give each process
    its own statistics, and each process's ratio of gradient norms would be its own)."""
    two, one = autoencoder_ddp["out"], work / "autoencoder_one"
    run(command("train_autoencoder.py", autoencoder_run(chain, one, 4), processes=1), work)
    assert_same_losses(two, one)
    names = ("model", "ema_model", "discriminator", "loss_logvar", "optimizer_generator", "optimizer_discriminator")
    assert_same_state(final_checkpoint(two), final_checkpoint(one), names=names,
                      noise=attention_key_biases(final_checkpoint(one)))


def attention_key_biases(checkpoint: Path) -> frozenset[str]:
    """The VAE's attention key biases and their AdamW moments: adding ``q · b`` to a whole row of logits leaves the
    softmax unchanged, so their gradient is zero in exact arithmetic and they train on rounding noise alone, which
    AdamW scales up to full steps (their moments differ by 100 % between reduction orders, all else by < 1e-4)."""
    from autoencoder import load_autoencoder

    params = [name for name, _ in load_autoencoder(checkpoint).named_parameters()]  # opt_g's order, then logvar
    keys = {name for name in params if name.endswith("attn_1.k.bias")}
    return frozenset(keys | {f"optimizer_generator.state.{params.index(n)}.{moment}" for n in keys
                             for moment in ("exp_avg", "exp_avg_sq")})


def _shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("shard_*.safetensors"))}


@pytest.mark.slow
def test_encoding_in_two_processes_writes_the_shards_one_process_writes(chain, work):
    """``accelerate launch --num_processes 2 scripts/encode_latents.py``: each process encodes every other shard on its
    own device, and the shards (bit for bit) and the manifest are those of one process."""
    args = lambda out: encode_overrides(chain["autoencoder"] / "model", chain["videos"], out)  # noqa: E731
    two, one = work / "encoded_two", work / "encoded_one"
    run(command("encode_latents.py", args(two), processes=2, device_key="device"), work)
    run(command("encode_latents.py", args(one), processes=1, device_key="device"), work)
    a, b = _shards(two), _shards(one)
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name])
    ma, mb = (json.loads((out / "manifest.json").read_text()) for out in (two, one))
    sa, sb = ma.pop("stats"), mb.pop("stats")
    assert ma.pop("skipped").keys() == mb.pop("skipped").keys()  # the same files (decoders time-stamp their reasons)
    assert ma == mb
    assert len(sa["clips_per_process"]) == 2 and min(sa["clips_per_process"]) > 0  # both processes encoded
    assert sum(sa["clips_per_process"]) == sb["encoded_clips"] == ma["clips"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # nothing from rank 1


def _launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name, processes, machines", [("multi_gpu", 8, 1), ("multi_gpu_multinode", 16, 2)])
def test_accelerate_config_files(name, processes, machines, monkeypatch):
    """Each file loads as accelerate's ClusterConfig (which rejects unknown top-level keys) and accelerate's own
    launch validation turns it into the intended multi-process launch (DDP, or FSDP2 with run.sharding=fsdp2).
    FSDP1 and DeepSpeed are not shipped: FSDP2 is the sharded path."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(REPO)
    assert sorted(p.name for p in (REPO / "configs" / "accelerate").iterdir()) == ["multi_gpu.yaml",
                                                                                 "multi_gpu_multinode.yaml"]
    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value == "MULTI_GPU"
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == "no"  # precision comes from run.mixed_precision
    assert "run.sharding=fsdp2" in path.read_text()  # the file says how to shard
    args = launch_command_parser().parse_args(["--config_file", str(path), "scripts/train_diffusion.py"])
    _validate_launch_command(args)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (True, False, False)
    if name == "multi_gpu_multinode":
        assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
        assert "FILL IN" in path.read_text()
