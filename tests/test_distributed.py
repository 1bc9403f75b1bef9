"""Several processes through ``accelerate launch`` on the CPU (gloo): the trainers give the same model whatever the
split of the global batch into processes and micro-batches, only rank 0 writes, a killed multi-process run resumes
exactly, the autoencoder's learned log-variance stays in step across ranks; and the accelerate config files load.

Every run is a real subprocess (``accelerate launch --multi_gpu --num_processes 2 ... run.device=cpu``, or plain
``python scripts/...`` for one process) with ``OMP_NUM_THREADS=1``, a fresh ``run.out_dir`` and a free port.

Measured on the 2-core development CPU (4 steps of the tiny U-Net, ``run.ema_decay=0.9``): two processes at batch 4,
one at batch 8 and one at batch 4 with ``grad_accum=2`` agree in every saved tensor (weights, EMA, AdamW moments) to
at most 2e-6 relative in norm (``|a - b| / |b|``), and loss.csv to 1e-7 relative (the two-process and the accumulating
run agree bit for bit); a killed and resumed run ends bit for bit where the unkilled run does. Element-wise bounds are
machine-dependent for tensors that start at zero (a residual block's output convolution, whose EMA after 4 steps is
of the order of the learning rate): the worst element there was 1.5e-5 of the tensor's largest entry here and 1.3e-4
on the CI machine, so the state is compared in norm. The bounds asserted are 1e-4 (relative in norm per saved tensor;
relative for losses): a wrong split of the batch moves the AdamW moments by tens of per cent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipelines.core.config import ConfigError, UserError, load_config
from pipelines.core.processes import free_port, run_in_processes
from tests.pipeline_helpers import autoencoder_overrides, diffusion_overrides, encode_overrides, logged_losses

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # bound on |a - b| / |b| (norms) per saved tensor, and on the relative difference of logged losses
STEPS = 4  # checkpoints at 2 and 4 (checkpoint_every=2 in diffusion_overrides)
GLOBAL_BATCH = 8
PORT = "<free port>"  # filled in by with_port at each launch


def subprocess_env(tmp: Path) -> dict[str, str]:
    """One thread per process (two processes share two cores) and no user-level accelerate config file."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HOME=str(tmp / "hf"))
    return {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}


def command(script: Path | str, overrides: list[str], processes: int, launch: tuple[str, ...] = (),
            device: str = "cpu", device_key: str = "run.device") -> list[str]:
    """``accelerate launch`` of ``script`` on ``processes`` CPU processes, or plain python for one."""
    script = str(REPO / "scripts" / script) if isinstance(script, str) else str(script)
    if processes == 1:
        head = [sys.executable, script]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", PORT, *launch, script]
    return [*head, f"{device_key}={device}", *overrides]


def with_port(cmd: list[str]) -> list[str]:
    """The command with a free port for this launch's rendezvous."""
    return [str(free_port()) if part == PORT else part for part in cmd]


def run(cmd: list[str], tmp: Path, timeout: float = 180) -> str:
    """Run to completion; the combined output (fails the test, with the output's tail, on a non-zero exit)."""
    cmd = with_port(cmd)
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}: {' '.join(cmd)}\n{output[-4000:]}"
    return output


def diffusion(latents: Path, out: Path, batch: int, *extra: str) -> list[str]:
    """The tiny model, trained also to continue clips from known first frames (their draws are per sample too)."""
    return [*diffusion_overrides(latents, out, steps=STEPS), f"run.batch_size={batch}", "model.unet.known_frames=true",
            *extra]


def final_checkpoint(out: Path, step: int = STEPS) -> Path:
    path = out / "checkpoints" / f"step_{step:07d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == path.name
    return path


def tensors(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved tensor of a checkpoint: weights, EMA weights, optimizer state."""
    return {f.stem: load_file(f) for f in sorted(checkpoint.glob("*.safetensors"))}


def assert_same_state(a: Path, b: Path, tol: float = TOL,
                      names: tuple[str, ...] = ("unet", "ema_unet", "optimizer_main"), noise: frozenset = frozenset()
                      ) -> float:
    """The two checkpoints hold the same files and tensors (``names`` among them), each within ``tol`` of the other
    relative in norm (``tol=0``: bit-for-bit), but for the ``noise`` keys, which only share their shape; returns the
    largest such relative difference."""
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb) and set(names) <= set(ta)
    worst = 0.0
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key, x in ta[name].items():
            y = tb[name][key]
            assert x.shape == y.shape and x.dtype == y.dtype, (name, key)
            if key in noise:
                continue
            if tol == 0 or not x.is_floating_point():
                assert torch.equal(x, y), (name, key)
                continue
            scale = float(y.double().norm())
            diff = float((x.double() - y.double()).norm())
            assert diff <= tol * scale + 1e-12, f"{name}/{key}: |a - b| = {diff:.3g} against |b| = {scale:.3g}"
            worst = max(worst, diff / scale if scale else 0.0)
    for meta in ("trainer_state.json",):
        sa, sb = json.loads((a / meta).read_text()), json.loads((b / meta).read_text())
        assert sa["step"] == sb["step"] and sa["ema_updates"] == sb["ema_updates"]
    return worst


def loss_rows(out: Path) -> list[dict[str, str]]:
    return logged_losses(out)


def assert_same_losses(a: Path, b: Path, rtol: float = TOL) -> None:
    ra, rb = loss_rows(a), loss_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [f"{s}.0" for s in range(1, STEPS + 1)]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            if "" in (x[key], y[key]):  # not logged at that step (the discriminator starts later)
                assert x[key] == y[key], (x["step"], key)
                continue
            assert float(x[key]) == pytest.approx(float(y[key]), rel=rtol, abs=1e-12), (x["step"], key)


def files(out: Path) -> list[str]:
    """Every file and folder under ``out``, relative, hidden ones (temporary files) included."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


@pytest.fixture(scope="module")
def latents(chain) -> Path:
    return chain["latents"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def ddp(latents, work) -> dict:
    """Two processes at batch 4 (global batch 8)."""
    out = work / "ddp"
    cmd = command("train_diffusion.py", diffusion(latents, out, GLOBAL_BATCH // 2), processes=2)
    return {"out": out, "cmd": cmd, "log": run(cmd, work)}


@pytest.fixture(scope="module")
def single(latents, work) -> dict:
    """One process at batch 8."""
    out = work / "single"
    cmd = command("train_diffusion.py", diffusion(latents, out, GLOBAL_BATCH), processes=1)
    return {"out": out, "cmd": cmd, "log": run(cmd, work)}


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


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every worker: torchrun starts each worker in a session of its own,
    so killing the launcher's group alone leaves the workers training (and writing) on."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)


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
sys.path.insert(0, {repo!r})
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
tensors = {{f"{{n}}.{{k}}": v for n, m in state.modules.items() for k, v in m.named_parameters()}}
tensors |= {{f"ema_{{n}}.{{k}}": v for n, e in state.emas.items() for k, v in e.state_dict().items()}}
digest = hashlib.blake2b()
for key in sorted(tensors):
    digest.update(key.encode() + tensors[key].detach().cpu().contiguous().numpy().tobytes())
logvar = float(state.modules["loss_logvar"]["logvar"])
print(f"PROBE rank={{os.environ.get('RANK', '0')}} logvar={{logvar.hex()}} tensors={{digest.hexdigest()}}", flush=True)
'''


def autoencoder_run(chain, out: Path, batch: int) -> list[str]:
    """The tiny VAE for 4 steps with its GAN on from step 1."""
    return [*autoencoder_overrides(chain["videos"], out, steps=STEPS), f"run.batch_size={batch}", "loss.disc_start=1",
            "run.ema_decay=0.9"]


@pytest.fixture(scope="module")
def autoencoder_ddp(chain, work) -> dict:
    """Two processes at batch 2 (global batch 4) through a probe that prints each rank's trained state."""
    probe = work / "autoencoder_probe.py"
    probe.write_text(AUTOENCODER_PROBE.format(repo=str(REPO)))
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


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 GPUs: on a CPU accelerate does not shard "
                    "(with run.device=cpu it runs DDP instead; otherwise it stops: no available devices)")
def test_fsdp_checkpoint_resume(chain, latents, work):
    """Under FSDP the checkpoint holds full (unsharded) weights and optimizer state, and a run resumed from a
    mid-run checkpoint ends where the uninterrupted run does (GPU arithmetic: within the tolerance)."""
    launch = ("--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"))

    def fsdp_command(out: Path) -> list[str]:
        cmd = command("train_diffusion.py", diffusion(latents, out, GLOBAL_BATCH // 2, "sample_prompts=[]"), 2,
                      launch, device="cuda")
        cmd.remove("--multi_gpu")
        return cmd

    full, resumed = work / "fsdp_full", work / "fsdp_resumed"
    run(fsdp_command(full), work, timeout=600)
    reference = tensors(chain["diffusion"] / "checkpoints" / "step_0000004")  # the same U-Net, one CPU process
    saved = tensors(final_checkpoint(full))
    for name in ("unet", "ema_unet"):
        assert {k: v.shape for k, v in saved[name].items()} == {k: v.shape for k, v in reference[name].items()}
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    log = run(fsdp_command(resumed), work, timeout=600)
    assert "resumed from" in log
    assert_same_state(final_checkpoint(resumed), final_checkpoint(full))


def _launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name, kind, processes, machines", [
    ("ddp", "MULTI_GPU", 8, 1), ("ddp_multinode", "MULTI_GPU", 16, 2), ("fsdp", "FSDP", 8, 1),
    ("deepspeed_zero2", "DEEPSPEED", 8, 1)])
def test_accelerate_config_files(name, kind, processes, machines, monkeypatch):
    """Each file loads as accelerate's ClusterConfig (which rejects unknown top-level keys), its nested keys are
    ``accelerate launch`` options, and accelerate's own launch validation turns it into the intended launch."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import constants

    monkeypatch.chdir(REPO)
    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value == kind
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == "no"  # precision comes from run.mixed_precision
    dests = _launch_dests()
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            assert (key if key.startswith("fsdp") or section != "fsdp_config" else f"fsdp_{key}") in dests, key
    args = launch_command_parser().parse_args(["--config_file", str(path), "scripts/train_diffusion.py"])
    _validate_launch_command(args)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (kind == "MULTI_GPU", kind == "FSDP",
                                                                    kind == "DEEPSPEED")
    if name == "ddp_multinode":
        assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
        assert "FILL IN" in path.read_text()
    if name == "fsdp":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] in constants.FSDP_SHARDING_STRATEGY
        assert fsdp["fsdp_auto_wrap_policy"] in constants.FSDP_AUTO_WRAP_POLICY
        assert fsdp["fsdp_backward_prefetch"] in constants.FSDP_BACKWARD_PREFETCH
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints hold full weights
    if name == "deepspeed_zero2":
        ds = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 2
        assert isinstance(ds["train_micro_batch_size_per_gpu"], int)  # no DataLoader for accelerate to read

