#!/usr/bin/env python
"""The one prepared GPU check (a benchmark, not a test): what only a GPU can confirm, in one run that fits in
9 minutes on one H100 and writes one JSON.

* ``environment``: torch, CUDA, the GPU, xformers and whether its kernels loaded.
* ``memory_estimate``: the ``configs/diffusion/gpu.yaml`` U-Net's training memory, counted on fake tensors
  (:func:`memory_estimate`; also ``--estimate`` alone, on any machine).
* ``attention``: the temporal attention with its bias (relative positions and the joint-training image mask) on
  every backend (xformers, SDPA, math) in bf16 and fp32: forward and backward against the fp32 math reference.
* ``unet_steps``: the gpu.yaml U-Net's training step (forward, backward, fused AdamW) under bf16 autocast at batch
  8 and 16, gradient checkpointing and ``channels_last`` each on and off: ms/step, peak memory, TFLOP/s, OOM.
* ``training``: 20 steps of the trainer with gpu.yaml's model and batch on a synthetic latent shard: every loss
  finite, the loss log's throughput (samples/s, TFLOP/s, MFU), and the host synchronisations CUDA reports
  (``torch.cuda.set_sync_debug_mode``) in every step that does not log.
* ``determinism``: the same two steps twice, with and without ``run.deterministic``.
* ``chain``: a synthetic world encoded by a (random) autoencoder in its GPU precision, a training run killed after
  its first checkpoint and resumed, against the same run uninterrupted, and videos generated from it.
* ``compile``: a small U-Net's training step compiled (inductor) against eager.

Each section is timed and any error is recorded in its place; the JSON is rewritten after every section, so a run
cut short still reports what it reached. ``--toy`` runs every section at toy size in float32 on a CPU (the test
suite does, so the check cannot rot; its figures mean nothing).

    python -m benchmarks.gpu_check --out outputs/gpu_check.json
    python -m benchmarks.gpu_check --estimate
    python -m benchmarks.gpu_check --toy --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call: determinism needs it

import torch  # noqa: E402

from pipelines.core.telemetry import FlopCount, peak_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "diffusion" / "gpu.yaml"
BUDGET_S = 540  # nine minutes
COND_DIM = 768  # CLIP ViT-L/14's pooled embedding, which gpu.yaml conditions on


@dataclasses.dataclass(frozen=True)
class Size:
    """How big each section runs: the real sizes on a GPU, toy ones on a CPU."""

    unet: dict  # overrides of gpu.yaml's U-Net for the step benchmark (none: gpu.yaml's own)
    latent: tuple[int, int, int]  # (frames, height, width) of a training clip's latents, appended images excluded
    images: int  # appended images per clip
    batches: tuple[int, ...]  # the step benchmark's batch sizes
    dtype: str  # the step benchmark's autocast: bf16 on a GPU, fp32 on a CPU
    timed_steps: int
    attention: tuple[int, int, int]  # temporal attention: (spatial positions × batch, channels, heads' width)
    training_steps: int
    training: list[str]  # overrides of gpu.yaml for the training section
    small_unet: list[str]  # the determinism and chain sections' U-Net and precision
    world_size: int  # the chain's synthetic world: frame side (pixels)
    compile_backend: str
    fresh_processes: bool = True  # each training run in a process of its own (a toy run: in this one, but the kill)


GPU = Size(unet={}, latent=(16, 32, 32), images=8, batches=(8, 16), dtype="bf16", timed_steps=3,
           attention=(2048, 512, 64), training_steps=20, training=[],
           small_unet=["model.unet.base_channels=64", "model.unet.head_dim=32", "run.mixed_precision=bf16"],
           world_size=64,
           compile_backend="inductor")
TOY = Size(unet={"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [1], "head_dim": 8,
                 "norm_groups": 4, "emb_mlp_layers": 2}, latent=(4, 8, 8), images=2, batches=(1, 2), dtype="fp32",
           timed_steps=1, attention=(8, 16, 8), training_steps=4,
           training=["model.unet.base_channels=8", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
                     "model.unet.head_dim=8", "model.unet.norm_groups=4", "model.unet.emb_mlp_layers=2",
                     "text.width=16", "text.layers=1", "text.heads=2", "text.vocab_size=512", "data.num_frames=4",
                     "data.images_per_video=2", "run.batch_size=2", "run.grad_accum=1"],
           small_unet=["model.unet.base_channels=8", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
                       "model.unet.head_dim=8", "model.unet.norm_groups=4"], world_size=16,
           compile_backend="eager",  # dynamo's capture only: inductor's CPU code generation takes minutes
           fresh_processes=False)


# ------------------------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision(name: str, device: torch.device):
    """Autocast in ``name`` (bf16 / fp16), or nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def gpu_unet_config(overrides: dict | None = None):
    """gpu.yaml's U-Net (with ``overrides``) as the trainer builds it for CLIP ViT-L/14 text on 4-channel latents."""
    from pipelines.core.config import load_config
    from pipelines.stages.configs import DiffusionTrainConfig

    cfg = load_config(DiffusionTrainConfig, str(GPU_CONFIG), [])
    return dataclasses.replace(cfg.model.unet, in_channels=4, out_channels=4, cond_dim=COND_DIM, context_dim=0,
                               **(overrides or {}))


def unet_inputs(config, batch: int, size: Size, device: torch.device) -> tuple[tuple, dict]:
    """A training step's inputs: latents of ``frames + images`` frames, noise levels, text, known frames."""
    frames = size.latent[0] + size.images
    z = torch.randn(batch, config.in_channels, frames, *size.latent[1:], device=device)
    kwargs = {"cond": torch.randn(batch, config.cond_dim, device=device), "num_images": size.images}
    if config.known_frames:
        kwargs |= {"known": torch.randn_like(z), "known_mask": torch.rand(batch, frames, device=device) < 0.25}
    return (z, torch.randn(batch, device=device)), kwargs


def figure(value: float) -> float:
    """Three significant figures."""
    return float(f"{value:.3g}")


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


# ---------------------------------------------------------------------------------------------- memory estimate


def saved_activation_bytes(net, args: tuple, kwargs: dict, device_type: str) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of ``net(*args, **kwargs)`` under bf16
    autocast, parameters left out (the bf16 copies autocast makes of them count: they live as long)."""
    params = {id(p) for p in net.parameters()}
    seen: dict[int, object] = {}  # storages kept alive, so no id is reused for another

    def pack(t):
        if id(t) not in params:
            storage = t.untyped_storage()
            seen[id(storage)] = storage
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), \
            torch.autocast(device_type, dtype=torch.bfloat16):
        net(*args, **kwargs)
    return sum(storage.nbytes() for storage in seen.values())


def memory_estimate(size: Size = GPU, budget_gb: float = 80.0) -> dict:
    """The gpu.yaml U-Net's training memory on fake tensors (no memory, no compute): parameters; weights, gradients,
    AdamW's two moments and the fp32 EMA (20 bytes a parameter); the activations autograd saves for one clip of
    ``frames + images`` frames at batch 1 and 2 (their difference is one sample's share, the rest is fixed: the
    autocast weight copies); and the largest batch that fits ``budget_gb`` with 10 % left to the allocator."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusion import UNet3D

    config = gpu_unet_config(size.unet)
    with FakeTensorMode():
        net = UNet3D(config).train()
        parameters = sum(p.numel() for p in net.parameters())
        saved = {b: saved_activation_bytes(net, *unet_inputs(config, b, size, torch.device("cpu")), "cpu")
                 for b in (1, 2)}
    static = 20 * parameters
    per_sample, fixed = saved[2] - saved[1], 2 * saved[1] - saved[2]
    fits = int((0.9 * budget_gb * 1e9 - static - fixed) // per_sample)
    batch = 8
    return {"parameters_m": round(parameters / 1e6, 1), "weights_grads_adamw_ema_gb": round(static / 1e9, 2),
            "activations_batch1_gb": round(saved[1] / 1e9, 2), "activations_per_sample_gb": round(per_sample / 1e9, 2),
            "activations_fixed_gb": round(fixed / 1e9, 2), f"batch_{batch}_gb": round((static + fixed + batch *
                                                                                      per_sample) / 1e9, 1),
            f"largest_batch_in_{budget_gb:g}_gb": fits, "frames": size.latent[0] + size.images,
            "latent": list(size.latent[1:])}


# ------------------------------------------------------------------------------------------------------ sections


def environment(size: Size, device: torch.device, work: Path) -> dict:
    from diffusion.attention import xformers_available

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "device": str(device), "xformers_kernels_loaded": xformers_available()}
    try:
        import xformers

        out["xformers"] = xformers.__version__
    except ImportError:
        out["xformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gb": round(props.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported()}
    return out


def _temporal_attention_run(block, x, state, backend: str, dtype: str, device: torch.device) -> dict:
    """Output and gradients (input, relative-position tables, projections) of one backend."""
    from diffusion.attention import attention

    block.attend = partial(attention, backend=backend)
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with precision(dtype, device):
        out = block(x, state)
    out.float().square().mean().backward()
    grads = {"input": x.grad} | {name: p.grad for name, p in block.named_parameters() if p.grad is not None}
    return {"output": out.detach().float()} | {k: v.float() for k, v in grads.items()}


def attention(size: Size, device: torch.device, work: Path) -> dict:
    """Every backend against the fp32 math reference on gpu.yaml's level-1 temporal attention: 24 frames (16 + 8
    appended images under the image mask), its relative-position bias; worst |a − ref| / max |ref| per tensor."""
    from diffusion.attention import xformers_available
    from diffusion.unet3d import FrameState, TemporalAttention, temporal_image_mask

    positions, channels, head = size.attention
    frames = size.latent[0] + size.images
    torch.manual_seed(0)
    block = TemporalAttention(channels, head, 32 if channels >= 32 else 4, 32, "math").to(device)
    torch.nn.init.normal_(block.proj.weight, std=0.02)  # the zero-initialised output: every path computes
    side = int(math.isqrt(positions))
    x = torch.randn(frames, channels, side, positions // side, device=device)  # [(b f), c, h, w] with b = 1
    state = FrameState(emb=torch.zeros(frames, 1, device=device), num_frames=frames,
                       temporal_mask=temporal_image_mask(frames, size.images, device))
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        reference = _temporal_attention_run(block, x, state, "math", "fp32", device)
        backends = ["math", "sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
        tolerance = {"fp32": 1e-3, "bf16": 3e-2}
        out = {"shape": {"sequences": positions, "frames": frames, "channels": channels, "head_dim": head},
               "tolerance": tolerance, "unavailable": [] if "xformers" in backends else ["xformers"]}
        for dtype in ("fp32", "bf16"):
            for backend in backends:
                got = _temporal_attention_run(block, x, state, backend, dtype, device)
                errors = {k: float((got[k] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                          for k, ref in reference.items()}
                out[f"{backend}_{dtype}"] = {"worst": max(errors.values()), "agrees": max(errors.values()) <
                                             tolerance[dtype], "errors": {k: float(f"{v:.3g}") for k, v in
                                                                          errors.items()}}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    out["all_agree"] = all(v["agrees"] for k, v in out.items() if isinstance(v, dict) and "agrees" in v)
    return out


def _unet_step(net, optimizer, args, kwargs, dtype: str, device: torch.device) -> None:
    """Forward, an MSE backward and a fused AdamW step."""
    with precision(dtype, device):
        loss = (net(*args, **kwargs).float() - args[0]).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def unet_steps(size: Size, device: torch.device, work: Path) -> dict:
    """gpu.yaml's U-Net step in every combination of batch, gradient checkpointing and channels_last."""
    from diffusion import UNet3D

    config = gpu_unet_config(size.unet)
    torch.manual_seed(0)
    net = UNet3D(config).to(device).train()
    for p in net.parameters():  # zero-initialised layers given weights, so every path computes
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    out = {"parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1), "dtype": size.dtype,
           "peak_tflops": (peak_flops(device, size.dtype) or 0) / 1e12 or None, "cases": []}
    flops: dict[tuple, int] = {}
    for batch in size.batches:
        for checkpointing in (False, True):
            for channels_last in (False, True):
                net.config.gradient_checkpointing, net.config.channels_last = checkpointing, channels_last
                net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                case = {"batch": batch, "checkpointing": checkpointing, "channels_last": channels_last}
                out["cases"].append(case | _timed_case(net, optimizer, config, batch, size, device, flops,
                                                       (batch, checkpointing)))
    return out


def _timed_case(net, optimizer, config, batch, size, device, flops, key) -> dict:
    """One combination: a FLOP-counted warm-up step, then ``timed_steps`` timed ones."""
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        args, kwargs = unet_inputs(config, batch, size, device)
        if key not in flops:
            with FlopCount() as counter:
                _unet_step(net, optimizer, args, kwargs, size.dtype, device)
            flops[key] = counter.total
        _unet_step(net, optimizer, args, kwargs, size.dtype, device)
        sync(device)
        start = time.perf_counter()
        for _ in range(size.timed_steps):
            _unet_step(net, optimizer, args, kwargs, size.dtype, device)
        sync(device)
        seconds = (time.perf_counter() - start) / size.timed_steps
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return {"oom": True}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"oom": False, "ms_per_step": figure(seconds * 1e3), "tflops_per_s": figure(flops[key] / seconds / 1e12),
            "tflop_per_step": figure(flops[key] / 1e12), "peak_memory_gb": None if peak is None else figure(peak)}


def synthetic_latents(folder: Path, clips: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    """A latent folder as ``encode_latents`` writes one: ``clips`` random clips ``[c, f, h, w]`` (fp16) with
    captions, in one shard."""
    from pipelines.core.checkpoint import save_tensors
    from pipelines.core.files import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    latents = torch.randn(clips, *shape, generator=torch.Generator().manual_seed(seed)).half()
    records = [{"caption": f"a synthetic clip {i % 7}", "path": f"synthetic/{i:05d}.mp4",
                "frame_indices": list(range(shape[1]))} for i in range(clips)]
    meta = {"records": records, "skipped": {}, "fingerprint": {}}
    save_tensors({"latents": latents}, folder / "shard_00000.safetensors",
                 metadata={k: json.dumps(v) for k, v in meta.items()})
    atomic_write_json(folder / "manifest.json", {
        "autoencoder": None, "latent_scale": 1.0, "latent_shape": list(shape), "fingerprint": {}, "clip": None,
        "text": {"kind": "none"}, "has_cond": False, "has_context": False,
        "shards": [{"file": "shard_00000.safetensors", "clips": clips}], "clips": clips, "videos": clips,
        "skipped": {}})
    return folder


def training(size: Size, device: torch.device, work: Path) -> dict:
    """The trainer with gpu.yaml's model, batch and precision (text: the small encoder at CLIP's width, no weights
    needed) for ``training_steps`` steps; host synchronisations per step from CUDA's sync debug mode."""
    import pipelines.core.loop as loop
    from pipelines.core.config import load_config
    from pipelines.stages.configs import DiffusionTrainConfig
    from pipelines.stages.train_diffusion import train_diffusion

    frames, height, width = size.latent
    latents = synthetic_latents(work / "latents", 64, (4, frames + size.images, height, width))
    steps, out = size.training_steps, work / "training"
    overrides = [f"data.latents={latents}", f"run.out_dir={out}", f"run.steps={steps}",
                 f"run.checkpoint_every={steps}", f"run.log_every={steps // 2}", "sample_prompts=[]",
                 "text.kind=small", f"text.width={COND_DIM}", "run.num_workers=2",
                 "run.mixed_precision=bf16" if device.type == "cuda" else 'run.mixed_precision="no"', *size.training]
    cfg = load_config(DiffusionTrainConfig, str(GPU_CONFIG), overrides)
    seed_step, debug = loop.seed_step, torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        starts: list[int] = []  # where each step's warnings begin
        loop.seed_step = lambda *a, **k: starts.append(len(caught)) or seed_step(*a, **k)
        try:
            if debug is not None:
                torch.cuda.set_sync_debug_mode("warn")
            summary = train_diffusion(cfg, log=lambda *a, **k: None)
        finally:
            loop.seed_step = seed_step
            if debug is not None:
                torch.cuda.set_sync_debug_mode(debug)
    return {"summary": summary} | _loss_log(out) | _syncs_per_step(list(caught), starts, steps, cfg.run.log_every)


def _loss_log(out: Path) -> dict:
    import csv

    with (out / "loss.csv").open() as handle:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]
    return {"rows": rows, "losses_finite": all(math.isfinite(r["loss"]) for r in rows)}


def _syncs_per_step(caught: list, starts: list[int], steps: int, log_every: int) -> dict:
    """CUDA's synchronisation warnings between step starts (the caught warnings are indexed as they came)."""
    bounds = [*starts, len(caught)]
    per_step = [sum("synchronizing" in str(w.message) for w in caught[a:b]) for a, b in zip(bounds, bounds[1:])]
    quiet = [n for i, n in enumerate(per_step, start=1) if i % log_every and i != steps and i > 1]  # step 1 starts
    where = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)})[:20]  # loaders
    return {"syncs_per_step": per_step, "syncs_in_non_logging_steps": sum(quiet), "sync_sites": where}


def _train_command(latents: Path, out: Path, steps: int, size: Size, *extra: str) -> list[str]:
    """``scripts/train_diffusion.py`` on the small U-Net (a subprocess: a fresh CUDA context per run)."""
    return [sys.executable, str(ROOT / "scripts" / "train_diffusion.py"), f"data.latents={latents}",
            f"run.out_dir={out}", f"run.steps={steps}", "run.checkpoint_every=2", "run.log_every=1",
            "sample_prompts=[]", "run.ema_decay=0.9", "run.batch_size=4", "data.num_frames=8",
            "data.images_per_video=2", "text.width=32", "text.layers=1", "text.heads=2", "text.vocab_size=1024",
            *size.small_unet, *extra]


def _run(cmd: list[str], size: Size, timeout: float = 300) -> None:
    """Run a ``_train_command`` to its end: a process of its own, or (a toy run) this one."""
    if not size.fresh_processes:
        from pipelines.commands import train_diffusion

        train_diffusion(cmd[2:])
        return
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")


def _same_weights(a: Path, b: Path) -> dict:
    """Whether two checkpoints hold bit-identical tensors (weights, EMA, optimiser), and the largest difference."""
    from safetensors.torch import load_file

    worst, equal = 0.0, True
    for file in sorted(a.glob("*.safetensors")):
        ta, tb = load_file(file), load_file(b / file.name)
        for key, x in ta.items():
            y = tb[key]
            equal &= torch.equal(x, y)
            if x.is_floating_point():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    return {"bitwise_equal": bool(equal), "max_abs_difference": worst}


def determinism(size: Size, device: torch.device, work: Path) -> dict:
    """The same two steps twice (two processes), with ``run.deterministic`` on and, on a GPU, off."""
    latents = synthetic_latents(work / "small_latents", 16, (4, 10, 16, 16))
    out = {}
    for flag in ("true", "false") if device.type == "cuda" else ("true",):
        runs = [work / f"deterministic_{flag}_{i}" for i in range(2)]
        for run in runs:
            _run(_train_command(latents, run, 2, size, f"run.deterministic={flag}"), size)
        out[f"deterministic_{flag}"] = _same_weights(*(r / "checkpoints" / "step_0000002" for r in runs))
    return out


def _kill_after_first_checkpoint(cmd: list[str], out: Path) -> str:
    """Start ``cmd``, SIGKILL it once its first checkpoint is in place; the checkpoint it reached."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    latest = out / "checkpoints" / "latest"
    try:
        while not latest.is_file():
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before its first checkpoint")
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return latest.read_text().strip()


def chain(size: Size, device: torch.device, work: Path) -> dict:
    """Synthetic world → latents (a random autoencoder, in its GPU precision) → a training run killed after its first
    checkpoint and resumed, against the same run uninterrupted (``run.deterministic``) → videos generated."""
    from autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
    from pipelines.core.config import load_config
    from pipelines.stages.configs import EncodeConfig, GenerateConfig
    from pipelines.stages.encode_latents import encode_latents
    from pipelines.stages.generate import generate
    from pipelines.world.config import WorldSpec
    from pipelines.world.synthetic import make_world

    make_world(work / "world", 12, WorldSpec(size=size.world_size, num_frames=12), seed=0, split="videos")
    torch.manual_seed(0)
    save_autoencoder(AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                                                     norm_groups=8)), work / "vae")
    manifest = encode_latents(load_config(EncodeConfig, None, [
        f"autoencoder={work / 'vae'}", f"videos=[{work / 'world' / 'videos'}]", f"out_dir={work / 'chain_latents'}",
        f"clip.size={size.world_size}", "clip.num_frames=12", "videos_per_shard=4", "batch_size=4"]),
        log=lambda *a: None)
    cmd = lambda out: _train_command(work / "chain_latents", out, 4, size, "run.deterministic=true")  # noqa: E731
    straight, killed = work / "chain_straight", work / "chain_killed"
    _run(cmd(straight), size)
    reached = _kill_after_first_checkpoint(cmd(killed), killed)
    _run(cmd(killed), size)  # the same command: it resumes
    resumed = _same_weights(straight / "checkpoints" / "step_0000004", killed / "checkpoints" / "step_0000004")
    summary = generate(load_config(GenerateConfig, None, [
        f"model={killed}", "prompts=[a red circle moving left]", "num_frames=12", "sampling.steps=4",
        f"out_dir={work / 'generated'}", "batch_size=1"]), log=lambda *a: None)
    return {"latents": {"clips": manifest["clips"], "shape": manifest["latent_shape"],
                        "fingerprint_vae_dtype": manifest["fingerprint"].get("vae_dtype", "float32")},
            "killed_at": reached, "killed_before_the_end": reached != "step_0000004",
            "resumed_equals_uninterrupted": resumed,
            "generated": {"videos": len(summary["samples"]), "frames_per_second": summary["frames_per_second"],
                          "files_exist": all((work / "generated" / s["file"]).is_file() for s in summary["samples"])}}


def compiled(size: Size, device: torch.device, work: Path) -> dict:
    """A small U-Net's training step compiled against eager: the same loss and gradients, ms per step each."""
    from diffusion import UNet3D

    config = gpu_unet_config(size.unet | {"base_channels": 64, "head_dim": 32} if device.type == "cuda" else size.unet)
    torch.manual_seed(0)
    eager = UNet3D(config).to(device).train()
    for p in eager.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    compiled_net = UNet3D(config).to(device).train()
    compiled_net.load_state_dict(eager.state_dict())
    compiled_net.compile(backend=size.compile_backend)
    args, kwargs = unet_inputs(config, size.batches[0], size, device)

    def step(net) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad(set_to_none=True)
        with precision(size.dtype, device):
            loss = (net(*args, **kwargs).float() - args[0]).square().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in net.parameters()]

    start = time.perf_counter()
    loss_c, grads_c = step(compiled_net)
    sync(device)
    compile_s = time.perf_counter() - start
    loss_e, grads_e = step(eager)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(grads_c, grads_e))
    times = {}
    for name, net in (("eager", eager), ("compiled", compiled_net)):
        sync(device)
        start = time.perf_counter()
        for _ in range(max(size.timed_steps, 3)):
            step(net)
        sync(device)
        times[f"{name}_ms_per_step"] = figure((time.perf_counter() - start) / max(size.timed_steps, 3) * 1e3)
    return {"backend": size.compile_backend, "compile_s": round(compile_s, 1),
            "loss_relative_difference": float((loss_c - loss_e).abs() / loss_e.abs()),
            "worst_gradient_relative_difference": worst} | times


SECTIONS: list[tuple[str, Callable, int]] = [  # name, function, seconds it needs on an H100 (a guess, kept honest)
    ("environment", environment, 1), ("memory_estimate", lambda size, device, work: memory_estimate(size), 30),
    ("attention", attention, 20), ("unet_steps", unet_steps, 120), ("training", training, 90),
    ("determinism", determinism, 90), ("chain", chain, 100), ("compile", compiled, 90),
]


def run_check(size: Size, device: torch.device, out: Path, budget_s: float = BUDGET_S) -> dict:
    """Every section in order, each timed, its error recorded in its place; a section that would not fit in the
    budget left is skipped. The JSON is rewritten after every section."""
    from pipelines.core.files import atomic_write_json

    report: dict = {"size": "toy" if size is TOY else "gpu", "budget_s": budget_s}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        for name, section, needs in SECTIONS:
            left = budget_s - (time.perf_counter() - start)
            if size is GPU and left < needs:
                report[name] = {"skipped": f"{left:.0f} s left, needs about {needs} s"}
                continue
            began = time.perf_counter()
            try:
                work = Path(folder) / name
                work.mkdir()
                report[name] = section(size, device, work)
            except Exception as error:  # recorded, and the next section runs
                report[name] = {"error": error_text(error), "traceback": traceback.format_exc()[-3000:]}
            report[name]["seconds"] = round(time.perf_counter() - began, 1)
            atomic_write_json(out, report)
            gc.collect()  # the section's models, before the next one measures memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu_check.json", help="the JSON report")
    parser.add_argument("--toy", action="store_true", help="every section at toy size, on the CPU (the test suite)")
    parser.add_argument("--estimate", action="store_true",
                        help="only the gpu.yaml U-Net's memory estimate on fake tensors (any machine) and exit")
    args = parser.parse_args(argv)
    if args.estimate:
        estimate = memory_estimate(TOY if args.toy else GPU)
        print(json.dumps(estimate, indent=2))
        return estimate
    device = torch.device("cpu") if args.toy or not torch.cuda.is_available() else torch.device("cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_check(TOY if args.toy else GPU, device, out)
    print(json.dumps({k: v.get("error", v.get("skipped", "ok")) if isinstance(v, dict) else v
                      for k, v in report.items()}, indent=2))
    return report


if __name__ == "__main__":
    main()
