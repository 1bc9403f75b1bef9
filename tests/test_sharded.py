"""Sharded training (``run.sharding=fsdp2``: FSDP2 over gloo on CPU processes, checkpoints through
``torch.distributed.checkpoint``): it trains the model data parallelism and one process train, resumes bit for bit
after SIGKILLs (one mid-run, one inside a checkpoint write), exports full weights that ``generate`` samples from,
resumes at another process count (elastic, DDP too), and runs as two "nodes" on localhost.

The runs are those of ``tests/test_distributed.py`` (the tiny model, 4 steps, a checkpoint every 2, global batch 8,
the gradient clipped at every step), shared between assertions: two FSDP2 runs (2 processes at batch 4, 1 at batch 8)
beside the session's DDP and one-process runs. Measured on the 2-core development CPU: FSDP2 on 2 processes against
DDP on 2 agree to 4.5e-7 relative in norm in every weight and EMA tensor and 9.5e-7 in the AdamW moments, the
losses to 1e-7; FSDP2 on 1 process against one plain process to 9.1e-7; elastic resumes end within 3.2e-6 of the
uninterrupted runs in every tensor (the bound asserted is 1e-4).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipelines.core.checkpoint import read_trainer_state
from pipelines.core.config import ConfigError, config_to_dict, load_config
from pipelines.core.loop import TrainingState
from pipelines.core.processes import free_port
from pipelines.core.sharded import SHARDED_FOLDER, read_sharded
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

WEIGHTS = ("unet", "ema_unet", "text", "ema_text")  # the exported safetensors of a sharded checkpoint

# Runs scripts/train_diffusion.py in each process; on rank 0 it first installs the hook that SHARDED_TEST_HOOK
# (JSON) names and holds there, leaving a marker file, until the test kills the launch: "row" after the n-th loss
# row, "checkpoint" inside the first checkpoint this run writes, its file-th safetensors file half on disk.
HOLD = '''
import json, os, runpy, sys, time
from pathlib import Path

hook = json.loads(os.environ["SHARDED_TEST_HOOK"])


def hold():
    Path(hook["marker"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


if os.environ.get("RANK") == "0" and hook["kind"] == "row":
    from pipelines.core.visual import LossLog

    append, rows = LossLog.append, []

    def counted(self, step, **scalars):
        append(self, step, **scalars)
        rows.append(step)
        if len(rows) == hook["n"]:
            hold()

    LossLog.append = counted
elif os.environ.get("RANK") == "0" and hook["kind"] == "checkpoint":
    from pipelines.core import checkpoint

    save_file, seen = checkpoint.save_file, []

    def half_written(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        seen.append(filename)
        if len(seen) == hook["file"]:
            os.truncate(filename, os.path.getsize(filename) // 2)
            hold()

    checkpoint.save_file = half_written
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
'''


def sharded(latents: Path, out: Path, batch: int, *extra: str) -> list[str]:
    """The overrides of the reference runs, sharded, and sampling at step 2 too: every process samples through its
    shards with the EMA swapped in, and training goes on with its own weights (the comparisons with DDP, which
    samples at the end only, would see it otherwise)."""
    return diffusion(latents, out, batch, "run.sharding=fsdp2", "run.sample_every=2", *extra)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def fsdp2(chain, work) -> dict:
    """Two processes at batch 4, sharded."""
    out = work / "fsdp2"
    cmd = command("train_diffusion.py", sharded(chain["latents"], out, GLOBAL_BATCH // 2), processes=2)
    return {"out": out, "cmd": cmd, "log": run(cmd, work)}


@pytest.fixture(scope="module")
def fsdp2_single(chain, work) -> dict:
    """One process at batch 8, sharded (over a one-member group)."""
    out = work / "fsdp2_single"
    cmd = command("train_diffusion.py", sharded(chain["latents"], out, GLOBAL_BATCH), processes=1)
    return {"out": out, "cmd": cmd, "log": run(cmd, work)}


@pytest.mark.slow
def test_fsdp2_trains_the_model_ddp_and_one_process_train(fsdp2, fsdp2_single, ddp, single):
    """Weights, EMA, AdamW moments and loss curve of FSDP2 on 2 processes equal DDP's on 2 and one process's at
    the same global batch; FSDP2 on one process equals one plain process."""
    for run_a, run_b in ((fsdp2, ddp), (fsdp2, single), (fsdp2_single, single)):
        assert_same_losses(run_a["out"], run_b["out"])
        for step in (2, STEPS):
            name = f"checkpoints/step_{step:07d}"
            assert assert_same_state(run_a["out"] / name, run_b["out"] / name, names=WEIGHTS) < TOL
            _assert_same_moments(run_a["out"] / name, run_b["out"] / name)


def _assert_same_moments(sharded_checkpoint: Path, checkpoint: Path) -> None:
    """The AdamW moments of a sharded checkpoint (keyed by parameter name) and of an unsharded one (keyed by the
    parameter's index in the optimiser: the U-Net's, then the text encoder's) agree within the tolerance: the
    gradients were reduced, averaged and clipped alike."""
    from pipelines.models.diffusion import load_diffusion

    bundle = load_diffusion(checkpoint)
    names = [f"unet.{n}" for n, _ in bundle.denoiser.net.named_parameters()]
    names += [f"text.{n}" for n, _ in bundle.text_encoder.named_parameters()]
    shards, state = read_sharded(sharded_checkpoint), load_file(checkpoint / "optimizer_main.safetensors")
    assert len(state) == 3 * len(names)  # exp_avg, exp_avg_sq, step per parameter
    for i, name in enumerate(names):
        for moment in ("exp_avg", "exp_avg_sq"):
            a, b = shards[f"optimizer_main.state.{name}.{moment}"].double(), state[f"optimizer_main.state.{i}.{moment}"]
            assert float((a - b.double()).norm()) <= TOL * float(b.double().norm()) + 1e-12, (name, moment)


@pytest.mark.slow
def test_a_sharded_checkpoint_holds_shards_and_the_full_weights_gathered_from_them(fsdp2, ddp):
    checkpoint = final_checkpoint(fsdp2["out"])
    assert sorted(p.name for p in (checkpoint / SHARDED_FOLDER).iterdir()) == [".metadata", "__0_0.distcp",
                                                                             "__1_0.distcp"]
    shards, exported = read_sharded(checkpoint), {name: load_file(checkpoint / f"{name}.safetensors")
                                                  for name in WEIGHTS}
    for name, weights in exported.items():  # the export is the gathered shards, key for key, bit for bit
        assert weights.keys() == load_file(final_checkpoint(ddp["out"]) / f"{name}.safetensors").keys()
        for key, value in weights.items():
            assert torch.equal(shards[f"{name}.{key}"], value), (name, key)
    assert all(v.dtype == torch.float32 for k, v in shards.items() if k.startswith("ema_"))
    moments = [k for k in shards if k.startswith("optimizer_main.state.") and k.endswith(".exp_avg_sq")]
    assert len(moments) == sum(len(exported[n]) for n in ("unet", "text"))  # every trained tensor's AdamW state
    state = read_trainer_state(checkpoint)
    assert (state["processes"], state["global_batch"], state["config"]["run"]["sharding"]) == (2, 8, "fsdp2")
    # the files of a DDP run (logs, samples, no temporaries), with the shards in place of the optimiser's state
    # and the samples of step 2
    ddp_files = set(files(ddp["out"]))
    optimiser = {f for f in ddp_files if "/optimizer_main." in f}
    shard_files = {f"checkpoints/step_{s:07d}/{SHARDED_FOLDER}{n}" for s in (2, STEPS)
                   for n in ("", "/.metadata", "/__0_0.distcp", "/__1_0.distcp")}
    samples = {"samples/step_0000002.png", "samples/step_0000002_0.mp4"}
    assert set(files(fsdp2["out"])) == (ddp_files - optimiser) | shard_files | samples
    assert fsdp2["log"].count("diffusion: {") == 1  # one main process reports


@pytest.mark.slow
def test_exported_weights_load_in_generate_and_sample(fsdp2, chain, tmp_path):
    from pipelines.models.diffusion import load_diffusion
    from pipelines.stages.configs import GenerateConfig
    from pipelines.stages.generate import generate

    bundle = load_diffusion(fsdp2["out"])
    ema = load_file(final_checkpoint(fsdp2["out"]) / "ema_unet.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in bundle.denoiser.net.state_dict().items())
    cfg = load_config(GenerateConfig, None, [f"model={fsdp2['out']}", f"autoencoder={chain['autoencoder'] / 'model'}",
                                             "prompts=[a red circle moving left]", "num_frames=8", "sampling.steps=2",
                                             f"out_dir={tmp_path}", "device=cpu"])
    summary = generate(cfg, log=lambda *args: None)
    assert (tmp_path / summary["samples"][0]["file"]).stat().st_size > 0


def _launch_with_hook(cmd: list[str], work: Path, hook: dict) -> None:
    """Launch ``cmd`` with ``hook`` installed in rank 0 and SIGKILL every process once rank 0 holds there."""
    marker = work / "held"
    marker.unlink(missing_ok=True)
    env = subprocess_env(work) | {"SHARDED_TEST_HOOK": json.dumps({**hook, "marker": str(marker)})}
    proc = subprocess.Popen(with_port(cmd), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it held at {hook}"
            assert time.monotonic() < deadline, f"never held at {hook}"
            time.sleep(0.02)
    finally:
        kill_process_tree(proc)


def _same_json(a: Path, b: Path) -> None:
    """Two checkpoints' ``trainer_state.json`` agree in all but the training time and the run folder."""
    sa, sb = read_trainer_state(a), read_trainer_state(b)
    for state in (sa, sb):
        state.pop("seconds")
        state["config"]["run"].pop("out_dir")
    assert sa == sb


@pytest.mark.slow
def test_killed_mid_run_and_inside_a_checkpoint_write_a_sharded_run_ends_bitwise_like_an_unkilled_one(chain, work,
                                                                                                      fsdp2):
    out = work / "killed"
    probe = work / "hold.py"
    probe.write_text(HOLD.format(script=str(REPO / "scripts" / "train_diffusion.py")))
    cmd = command(probe, sharded(chain["latents"], out, GLOBAL_BATCH // 2), processes=2)
    checkpoints = out / "checkpoints"
    _launch_with_hook(cmd, work, {"kind": "row", "n": 3})  # mid-run: step 3 logged, its checkpoint not due
    assert (checkpoints / "latest").read_text().strip() == "step_0000002"
    _launch_with_hook(cmd, work, {"kind": "checkpoint", "file": 2})  # resumed at 2, killed writing step 4
    (partial,) = checkpoints.glob(".step_*")
    assert (partial / SHARDED_FOLDER / ".metadata").is_file() and any(p.suffix == ".tmp" for p in partial.iterdir())
    assert (checkpoints / "latest").read_text().strip() == "step_0000002"

    log = run(command("train_diffusion.py", sharded(chain["latents"], out, GLOBAL_BATCH // 2), processes=2), work)
    assert f"resumed from {checkpoints / 'step_0000002'}" in log
    assert files(out) == files(fsdp2["out"])  # no temporaries left, nothing missing
    assert loss_rows(out) == loss_rows(fsdp2["out"])
    for step in (2, STEPS):
        name = f"checkpoints/step_{step:07d}"
        assert assert_same_state(out / name, fsdp2["out"] / name, tol=0) == 0  # shards and exports, bit for bit
        _same_json(out / name, fsdp2["out"] / name)


def _resumed_at_another_process_count(source: dict, work: Path, name: str, overrides: list[str],
                                      processes: int) -> Path:
    """Copy ``source``'s run as it stood at its step-2 checkpoint and finish it on ``processes`` processes."""
    out = work / name
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source["out"] / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
    (out / "checkpoints" / "latest").write_text("step_0000002\n")
    shutil.copy(source["out"] / "loss.csv", out / "loss.csv")  # rows past the checkpoint are dropped on resume
    log = run(command("train_diffusion.py", overrides, processes), work)
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'}" in log
    assert read_trainer_state(final_checkpoint(out))["processes"] == processes
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sharding, processes", [("none", (2, 1)), ("none", (1, 2)), ("fsdp2", (2, 1)),
                                                 ("fsdp2", (1, 2))], ids=["ddp-2to1", "ddp-1to2", "fsdp2-2to1",
                                                                         "fsdp2-1to2"])
def test_elastic_resume_continues_the_sample_sequence(request, chain, work, sharding, processes):
    """A run checkpointed at step 2 on N processes resumes on M at the same global batch (DDP: batch 8 / M;
    FSDP2: batch 4 and, on one process, 2 micro-batches a step) and ends where the uninterrupted N-process run
    ends: every tensor of the final checkpoint (AdamW moments included) and the loss curve within the
    tolerance."""
    before, after = processes
    source = request.getfixturevalue({("none", 2): "ddp", ("none", 1): "single", ("fsdp2", 2): "fsdp2",
                                      ("fsdp2", 1): "fsdp2_single"}[sharding, before])
    name = f"elastic_{sharding}_{before}to{after}"
    overrides = diffusion(chain["latents"], work / name, GLOBAL_BATCH // after) if sharding == "none" else \
        sharded(chain["latents"], work / name, GLOBAL_BATCH // 2, f"run.grad_accum={2 // after}")
    out = _resumed_at_another_process_count(source, work, name, overrides, after)
    assert_same_losses(out, source["out"])
    assert assert_same_state(final_checkpoint(out), final_checkpoint(source["out"])) < TOL


def test_resuming_at_another_global_batch_or_sharding_is_refused(chain, fsdp2_checkpoint_root):
    """One line naming the key: the global batch fixes the sample sequence, the sharding the checkpoint's files."""
    from pipelines.stages.configs import DiffusionTrainConfig

    state = TrainingState({}, {}, sharded=True)
    config = lambda *extra: config_to_dict(load_config(DiffusionTrainConfig, None, list(extra)))  # noqa: E731
    two = SimpleNamespace(num_processes=2)
    with pytest.raises(ConfigError, match=r"run.batch_size: the global batch .* = 2 × 2 × 1 = 4 differs from the 8"):
        state.maybe_resume(fsdp2_checkpoint_root, True, config=config("run.batch_size=2", "run.sharding=fsdp2"),
                           accelerator=two)
    with pytest.raises(ConfigError, match="run.sharding: the checkpoint .* was written with run.sharding=fsdp2"):
        state.maybe_resume(fsdp2_checkpoint_root, True, config=config("run.batch_size=4"), accelerator=two)


def test_a_non_finite_loss_skips_its_sharded_step(chain, tmp_path, monkeypatch):
    """Three steps on one sharded process, the second loss NaN: that step changes no shard and no AdamW state, is
    counted, and training goes on."""
    import diffusion.denoiser
    from pipelines.stages.configs import DiffusionTrainConfig
    from pipelines.stages.train_diffusion import train_diffusion

    weight, calls = diffusion.denoiser.loss_weight, []

    def nan_at_step_two(*args, **kwargs):
        calls.append(len(calls))
        return weight(*args, **kwargs) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(diffusion.denoiser, "loss_weight", nan_at_step_two)
    overrides = [*sharded(chain["latents"], tmp_path, 4, "run.steps=3", "run.checkpoint_every=1",
                          "run.keep_checkpoints=3", "sample_prompts=[]"), "run.device=cpu"]
    summary = train_diffusion(load_config(DiffusionTrainConfig, None, overrides), log=lambda *args: None)
    assert len(calls) == 3 and summary["skipped_steps"] == 1
    states = [read_sharded(tmp_path / "checkpoints" / f"step_{k:07d}") for k in (1, 2, 3)]
    assert [int(s["optimizer_main.state.unet.conv_in.weight.step"]) for s in states] == [1, 1, 2]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # step 2 changed nothing
    assert all(torch.isfinite(v).all() for v in states[2].values() if v.is_floating_point())
    assert not torch.distributed.is_initialized()  # the one-process group is gone with the run


def test_the_switch_is_a_typed_key_checked_when_the_config_loads():
    from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig

    assert load_config(DiffusionTrainConfig, None, ["run.sharding=fsdp2"]).run.sharding == "fsdp2"
    with pytest.raises(ConfigError, match="run.sharding: Invalid value 'zero2'"):
        load_config(DiffusionTrainConfig, None, ["run.sharding=zero2"])
    with pytest.raises(ConfigError, match="sharding=fsdp2 runs with mixed_precision no or bf16"):
        load_config(DiffusionTrainConfig, None, ["run.sharding=fsdp2", "run.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="run.sharding: the autoencoder trains data parallel"):
        load_config(AutoencoderTrainConfig, None, ["run.sharding=fsdp2"])


@pytest.fixture
def fsdp2_checkpoint_root(tmp_path) -> Path:
    """A checkpoint root whose one checkpoint says it was written by 2 sharded processes at global batch 8."""
    root = tmp_path / "checkpoints"
    (root / "step_0000002").mkdir(parents=True)
    (root / "step_0000002" / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "processes": 2, "global_batch": 8, "config": {"run": {"sharding": "fsdp2"}}}))
    return root


@pytest.mark.slow
def test_two_nodes_on_localhost_train_as_two_processes_do(chain, work, fsdp2):
    """``configs/accelerate/multi_gpu_multinode.yaml`` launched twice (machine ranks 0 and 1, one process each)
    forms one sharded group: it trains, checkpoints and ends bit for bit where the one-machine launch does."""
    out, port = work / "two_nodes", str(free_port())
    overrides = ["run.device=cpu", *sharded(chain["latents"], out, GLOBAL_BATCH // 2)]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs" / "accelerate" / "multi_gpu_multinode.yaml"), "--num_processes", "2",
         "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, str(REPO / "scripts" / "train_diffusion.py"), *overrides],
        cwd=REPO, env=subprocess_env(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "".join(logs).count("diffusion: {") == 1  # one global rank 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert loss_rows(out) == loss_rows(fsdp2["out"])
    assert assert_same_state(final_checkpoint(out), final_checkpoint(fsdp2["out"]), tol=0) == 0


def test_bf16_gathers_and_computes_in_bf16_and_keeps_fp32_shards_and_gradients():
    """FSDP2's policy under run.mixed_precision=bf16: each block's weights are gathered as bf16 for its forward,
    the shards, their gradients (reduced in fp32) and so AdamW stay fp32; fp32 inputs meet bf16 weights under
    autocast, as in the training loop and in sampling. With the GPU config's channels-last weights and
    activation checkpointing."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from diffusion import UNet3D
    from pipelines.core.sharded import start_sharding
    from pipelines.models.diffusion import unet_blocks
    from tests.models import tiny_unet_config

    sharding = start_sharding(torch.device("cpu"), "bf16")  # one process: a one-member gloo group of its own
    try:
        net = UNet3D(tiny_unet_config(cond_dim=0, channels_last=True, gradient_checkpointing=True))
        sharding.shard(net, unet_blocks(net))
        gathered = []
        for block in (net.down[0][0], net):  # a block unit and the root unit (conv_in)
            block.register_forward_pre_hook(lambda module, args: gathered.append(next(module.parameters()).dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(torch.randn(2, 4, 3, 8, 8), torch.randn(2))
        out.float().square().mean().backward()
        assert set(gathered) == {torch.bfloat16} and sharding.policy.reduce_dtype == torch.float32
        units = [m for m in net.modules() if isinstance(m, FSDPModule)]  # each block its own unit, and the root
        assert units == [net, *unet_blocks(net)] and len(units) == 25  # 24 blocks: residual, attention, resampling
        for p in net.parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad.dtype == torch.float32
    finally:
        sharding.close()
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_a_bf16_sharded_run_trains_checkpoints_and_samples(chain, work):
    """The trainer's path under bf16 (one step, one process: bf16 is slow on CPUs), sampling included, where
    weights gathered in bf16 meet the fp32 noise-level features; everything saved stays fp32."""
    out = work / "bf16"
    run(command("train_diffusion.py", [*sharded(chain["latents"], out, 2), "run.mixed_precision=bf16",
                                       "run.steps=1", "run.checkpoint_every=1", "sampling.steps=1"], 1), work)
    checkpoint = final_checkpoint(out, 1)
    saved = [*read_sharded(checkpoint).values(), *load_file(checkpoint / "ema_unet.safetensors").values()]
    assert {t.dtype for t in saved if t.is_floating_point()} == {torch.float32}
    assert (out / "samples" / "step_0000001.png").is_file()
