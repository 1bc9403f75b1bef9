#!/usr/bin/env python
"""All the project's performance figures in one run: each a ratio measured side by side on this machine (a
benchmark, not a test), printed as a table (metric | value | goal | met) and written as JSON.

* U-Net against diffusers' ``UNet3DConditionModel`` at a similar parameter count: one training step (forward +
  backward of an MSE loss) and one sampling forward (``torch.no_grad``), medians of interleaved runs after
  warm-up; diffusers' time / ours per step, and per FLOP (our FLOP rate / diffusers'): the two networks do not do
  the same work at the same parameter count, so a step's speed-up alone mixes a cheaper design with a faster
  implementation. FLOPs of both are counted on the very step that is timed, not estimated.
* Utilisation: FLOPs of our training step (``torch.utils.flop_counter.FlopCounterMode``, plus PyTorch's CPU
  flash-attention kernels, which its table lacks) / step time / the matmul peak measured in this run.
* Latent against pixel space: a training step of the same U-Net on 16 × 64 × 64 RGB frames and on their
  factor-4 latents 16 × 16 × 16 × 4.
* Long videos: peak memory and time per frame of autoregressive extension to 256 frames against 32 (decode and
  MP4 writing included), and of chunked VAE decoding of 256 latent frames against 16 into a video held in
  memory (uint8 frames, as writers take them: the goal; and float32, for reference), each in a fresh subprocess,
  the lengths in alternating rounds: the fastest round's time, the largest memory of all rounds, and beside each
  memory ratio its spread over the rounds (the least and the most of the ratios round by round).
* Attention: time and peak memory of the ``sdpa`` backend against ``math`` at long temporal (with the
  relative-position bias as an additive float bias) and spatial sequences.

Memory is the peak above a baseline taken after models and inputs exist and after one warm-up pass: on a CPU
the resident set sampled by :class:`pipelines.core.devices.PeakMemory` (every allocation above 256 KiB gets its
own mmap in the subprocesses, so freed tensors leave the RSS), on CUDA ``max_memory_allocated``.

Measure on an idle machine: with other processes on the cores, torch's threads wait on one another and small
operations slow down many times over (the script prints the load average and a note when it is high). A size
that does not fit in memory is reported as failed, not measured (CPU subprocesses cap their address space).

    python -m benchmarks.run --quick                       # toy sizes: every code path, figures meaningless
    python -m benchmarks.run --out outputs/benchmarks/run.json     # the sizes above
    python -m benchmarks.run --device cuda --dtype bf16    # utilisation against the measured bf16 matmul peak
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_autoencoder import release_free_memory, track_rss_closely
from diffusion import UNet3D, UNet3DConfig
from pipelines.core.devices import PeakMemory, matmul_gflops, matmul_peak_gflops
from pipelines.core.telemetry import CPU_SDPA_FLOPS

ROOT = Path(__file__).resolve().parents[1]  # the repository: ``python -m benchmarks.run`` runs from it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

TOKENS, CONTEXT_DIM = 77, 512  # text tokens given to both U-Nets by cross-attention
OURS = dict(base_channels=80, channel_mult=[1, 2, 4], num_res_blocks=2, attention_levels=[0, 1], head_dim=32,
            norm_groups=16, cond_dim=0, context_dim=CONTEXT_DIM, attention_backend="auto")
PARAM_TOLERANCE = 0.15  # ours must be within ±15 % of diffusers' parameter count

SETTINGS = {
    "full": dict(
        unet_frames=8, unet_size=32, unet_warmup=1, unet_repeat_sample=5, unet_repeat_train=3,
        pixel_frames=16, pixel_size=64, pixel_factor=4, pixel_warmup=1, pixel_repeat=2,
        long_lengths=[32, 256], long_chunk=16, long_context=4, long_latent=16, long_steps=8, long_base=32,
        long_repeat=1, long_rounds=3, vae_lengths=[16, 256], vae_latent=16, vae_chunk=16, vae_base=32, vae_repeat=1,
        vae_rounds=3,
        attn_temporal=[1024, 256], attn_spatial=[8, 64], attn_heads=2, attn_dim=32, attn_repeat=3,
        matmul_size=2048, matmul_repeats=5, bf16_size=512,
    ),
    "quick": dict(
        unet_frames=4, unet_size=16, unet_warmup=1, unet_repeat_sample=2, unet_repeat_train=2,
        pixel_frames=4, pixel_size=32, pixel_factor=4, pixel_warmup=1, pixel_repeat=1,
        long_lengths=[32, 256], long_chunk=16, long_context=4, long_latent=8, long_steps=2, long_base=16,
        long_repeat=1, long_rounds=2, vae_lengths=[16, 256], vae_latent=8, vae_chunk=16, vae_base=16, vae_repeat=1,
        vae_rounds=2,
        attn_temporal=[64, 64], attn_spatial=[4, 32], attn_heads=2, attn_dim=32, attn_repeat=2,
        matmul_size=2048, matmul_repeats=3, bf16_size=512,
    ),
}
GOALS = {  # key: (comparison, bound)
    "unet_train_speedup_vs_diffusers": (">=", 1.6),
    "unet_sample_speedup_vs_diffusers": (">=", 1.6),
    "unet_train_utilization": (">=", 0.65),
    "latent_vs_pixel_train_speedup": (">=", 8.0),
    "long_video_peak_memory_ratio_256_vs_32": ("<=", 1.15),
    "continuation_peak_memory_ratio_256_vs_32": ("<=", 1.15),
    "time_per_frame_ratio_256_vs_32": ("within", 0.10),
    "vae_decode_peak_memory_ratio_256_vs_16": ("<=", 1.2),
}


# --------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` (weights stay fp32), or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def timed(run, device: torch.device, setup=None) -> float:
    """Seconds of one ``run()`` (``setup()`` first, untimed), synchronised on CUDA."""
    if setup is not None:
        setup()
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def side_by_side(cases: dict, warmup: int, repeat: int, device: torch.device) -> dict[str, list[float]]:
    """Times of ``repeat`` runs of every case ``name: (run, setup)``, interleaved (the order flips every round,
    so a change in machine load falls on all cases alike), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for run, setup in cases.values():
            timed(run, device, setup)
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            run, setup = cases[name]
            times[name].append(timed(run, device, setup))
    return times


class AttentionKernels(TorchDispatchMode):
    """Counts the attention kernels (and SDPA's math fallback, ``_safe_softmax``) that a block of code runs."""

    def __init__(self, registry: dict | None = None):
        super().__init__()
        self.calls: Counter = Counter()
        self.uncounted: set[str] = set()  # attention ops the FLOP counter has no formula for
        self.registry = registry or {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "attention" in name or name == "_safe_softmax":
            self.calls[name] += 1
            if "attention" in name and func.overloadpacket not in self.registry:
                self.uncounted.add(name)
        return func(*args, **(kwargs or {}))


def count_flops(run) -> tuple[int, dict, list[str]]:
    """(FLOPs, attention kernel calls, attention ops without a FLOP formula) of one ``run()``."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    kernels = AttentionKernels(counter.flop_registry)
    with counter, kernels:
        run()
    return counter.get_total_flops(), dict(kernels.calls), sorted(kernels.uncounted)


def our_unet(device: torch.device, in_channels: int = 4) -> UNet3D:
    """Our U-Net as the pipelines build it for ``device`` (the CPU fast paths swapped in on a CPU)."""
    from pipelines.models.diffusion import build_unet

    return build_unet(UNet3DConfig(in_channels=in_channels, out_channels=in_channels, **OURS), device).to(device)


def diffusers_unet() -> torch.nn.Module:
    """Diffusers' 3-D U-Net: widths 64/128/256, cross-attention at full and half resolution, none at the lowest.
    (``attention_head_dim=32`` there is, after diffusers' own renaming inside the blocks, 32-wide heads.)"""
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=32,
    )


def run_ours(net, z, t, context):
    """Our U-Net's forward on ``z`` with token ``context`` (λ = 0)."""
    return net(z, torch.zeros(z.shape[0], device=z.device), context=context)


def run_diffusers(net, z, t, context):
    """Diffusers' U-Net's forward on ``z`` at timestep ``t`` with token ``context``."""
    return net(z, t, encoder_hidden_states=context).sample


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def baseline(device: torch.device) -> tuple[float, float]:
    """(RSS MiB, CUDA allocated MiB) right now, after freed memory went back to the OS."""
    release_free_memory()
    cuda = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return psutil.Process().memory_info().rss / 2**20, cuda


def peak_of(run, device: torch.device) -> dict:
    """Seconds and peak memory (MiB above the baseline, and the absolute RSS peak) of one ``run()``."""
    rss0, cuda0 = baseline(device)
    with PeakMemory(interval=0.002) as memory:
        seconds = timed(run, device)
    result = {"seconds": seconds, "rss_peak_mib": memory.peak, "rss_growth_mib": max(memory.peak - rss0, 0.0)}
    if device.type == "cuda":
        result["cuda_growth_mib"] = max(memory.peak_cuda_mb - cuda0, 0.0)
    result["growth_mib"] = result.get("cuda_growth_mib", result["rss_growth_mib"])  # the figure ratios use
    return result


def limit_memory(device: torch.device) -> None:
    """Cap a CPU subprocess's address space below the free memory, so a size that does not fit fails with an
    allocation error instead of waking the kernel's OOM killer on a shared machine."""
    if device.type != "cpu":
        return
    import resource

    limit = psutil.Process().memory_info().vms + int(0.75 * psutil.virtual_memory().available)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def short_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


# --------------------------------------------------------------------------------- U-Net against diffusers


def unet_comparison(s: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Ours against diffusers in this process: parameters, FLOPs, sampling and training medians."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, s["unet_frames"], s["unet_size"], s["unet_size"], device=device)
    target = torch.randn_like(z)
    t = torch.full((1,), 500, device=device)
    context = torch.randn(1, TOKENS, CONTEXT_DIM, device=device)
    nets = {"ours": (our_unet(device), run_ours), "diffusers": (diffusers_unet().to(device), run_diffusers)}
    out = {name: {"params": num_params(net)} for name, (net, _) in nets.items()}
    param_ratio = out["ours"]["params"] / out["diffusers"]["params"]
    out["params_ratio_ours_over_diffusers"] = param_ratio
    out["params_within_tolerance"] = abs(param_ratio - 1) <= PARAM_TOLERANCE
    note = "" if out["params_within_tolerance"] else f", OUTSIDE ±{PARAM_TOLERANCE:.0%}"
    print(f"U-Net parameters: ours {out['ours']['params'] / 1e6:.2f}M, "
          f"diffusers {out['diffusers']['params'] / 1e6:.2f}M (ratio {param_ratio:.3f}{note})", flush=True)

    def sample(net, runner):
        def run():
            with torch.no_grad(), autocast(device, dtype):
                runner(net, z, t, context)
        return run

    def train(net, runner):
        def run():
            with autocast(device, dtype):
                prediction = runner(net, z, t, context)
            F.mse_loss(prediction.float(), target).backward()
        return run, lambda: net.zero_grad(set_to_none=True)

    for name, (net, runner) in nets.items():
        net.train()
        flops, kernels, uncounted = count_flops(train(net, runner)[0])
        net.zero_grad(set_to_none=True)
        net.eval()
        out[name].update(train_flops=flops, sample_flops=count_flops(sample(net, runner))[0],
                         attention_kernels_train=kernels, attention_ops_without_flop_formula=uncounted)
    for net, _ in nets.values():
        net.eval()
    times = side_by_side({name: (sample(net, runner), None) for name, (net, runner) in nets.items()},
                         s["unet_warmup"], s["unet_repeat_sample"], device)
    for name in nets:
        out[name]["sample_s"], out[name]["sample_runs_s"] = statistics.median(times[name]), times[name]
    for net, _ in nets.values():
        net.train()
    times = side_by_side({name: train(net, runner) for name, (net, runner) in nets.items()},
                         s["unet_warmup"], s["unet_repeat_train"], device)
    for name in nets:
        out[name]["train_s"], out[name]["train_runs_s"] = statistics.median(times[name]), times[name]
        out[name]["train_gflops_per_s"] = out[name]["train_flops"] / out[name]["train_s"] / 1e9
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del nets
    gc.collect()
    return out


# ------------------------------------------------------------------------------------- subprocess figures


def child_pixel(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """One training step of the same U-Net on RGB frames and on their factor-F latents, interleaved."""
    limit_memory(device)
    torch.manual_seed(0)
    f, size, factor = spec["frames"], spec["size"], spec["factor"]
    context = torch.randn(1, TOKENS, CONTEXT_DIM, device=device)
    shapes = {"latent": (1, 4, f, size // factor, size // factor), "pixel": (1, 3, f, size, size)}
    out, cases = {}, {}
    for name, shape in shapes.items():
        net = our_unet(device, shape[1]).train()
        z = torch.randn(shape, device=device)
        target = torch.randn_like(z)

        def run(net=net, z=z, target=target):
            with autocast(device, dtype):
                prediction = run_ours(net, z, None, context)
            F.mse_loss(prediction.float(), target).backward()

        def setup(net=net):
            net.zero_grad(set_to_none=True)

        out[name] = {"shape": list(shape), "params": num_params(net)}
        try:  # the FLOP-counted step is this case's first warm-up
            out[name]["train_flops"], out[name]["attention_kernels_train"], _ = count_flops(run)
            cases[name] = (run, setup)
        except RuntimeError as error:  # does not fit in memory (CPU address-space cap, or CUDA OOM)
            out[name]["error"] = short_error(error)
        setup()
        del net, z, target, run, setup  # a case that failed is gone; the others live on in `cases`
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        times = side_by_side(cases, spec["warmup"] - 1, spec["repeat"], device) if cases else {}
    except RuntimeError as error:
        times = {}
        for name in cases:
            out[name]["error"] = short_error(error)
    for name, runs in times.items():
        out[name]["train_s"], out[name]["train_runs_s"] = statistics.median(runs), runs
    out["process_peak_rss_mib"] = psutil.Process().memory_info().rss / 2**20
    return out


def small_vae(base: int):
    from autoencoder import AutoencoderConfig, AutoencoderKL

    config = AutoencoderConfig(base_channels=base, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)
    return AutoencoderKL(config)


def child_long_video(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Autoregressive extension to ``frames`` frames with a small random model, then chunked decoding into an
    MP4 (``pipelines.stages.generate``'s own path): peak memory and time. With ``spec["given"]`` = g > 0 the video
    continues g given latent frames (``generate``'s ``condition.video``) instead of starting from noise."""
    from diffusion import Denoiser
    from pipelines.models.config import DiffusionModelConfig, SamplingConfig, TextConfig
    from pipelines.models.diffusion import DiffusionBundle
    from pipelines.stages.configs import GenerateConfig
    from pipelines.stages.generate import _Writer
    from pipelines.stages.long_video import autoregressive, chunk_count

    if device.type == "cpu":
        track_rss_closely()
    torch.manual_seed(0)
    chunk, context, s = spec["chunk"], spec["context"], spec["latent"]
    config = UNet3DConfig(in_channels=4, out_channels=4, base_channels=spec["base"], channel_mult=[1, 2],
                          num_res_blocks=1, attention_levels=[1], head_dim=min(32, spec["base"]), norm_groups=8)
    net = UNet3D(config).requires_grad_(False)
    bundle = DiffusionBundle(
        denoiser=Denoiser(net, "v").to(device).eval(), text_encoder=None, text=TextConfig(kind="none"),
        model=DiffusionModelConfig(unet=config, prediction="v"), latent_shape=[4, chunk, s, s], autoencoder=None)
    vae = small_vae(spec["vae_base"]).to(device).eval().requires_grad_(False)
    sampling = SamplingConfig(sampler="ddim", steps=spec["steps"], guidance=0.0)

    def plan(total: int) -> GenerateConfig:
        return GenerateConfig(prompts=[""], num_frames=total, chunk_frames=chunk, context_frames=context,
                              method="reconstruction", w_r=2.0, sampling=sampling)

    frames, sheet = spec["frames"], torch.linspace(0, spec["frames"] - 1, 16).round().long().tolist()
    writer = _Writer(vae, spec["decode_chunk"], 8.0, sheet)
    result: dict = {}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        warm, _ = autoregressive(bundle, [""], plan(2 * chunk - context), chunk, torch.Generator(device).manual_seed(1))
        writer.write(warm[0], Path(folder) / "warm.mp4", gif=False)
        del warm

        given = torch.randn(1, 4, spec["given"], s, s, device=device) if spec.get("given") else None

        def run():
            start = time.perf_counter()
            latents, _ = autoregressive(bundle, [""], plan(frames), chunk, torch.Generator(device).manual_seed(0),
                                        start=given)
            sync(device)
            result["sampling_s"] = time.perf_counter() - start
            writer.write(latents[0], Path(folder) / "video.mp4", gif=False)

        result.update(peak_of(run, device))  # memory (and a time) from the first run
        runs = [(result["seconds"], result["sampling_s"])]
        for _ in range(spec["repeat"] - 1):
            runs.append((timed(run, device), result["sampling_s"]))
        result["runs_s"] = [seconds for seconds, _ in runs]
        result["seconds"], result["sampling_s"] = min(runs)  # best of the runs: the least disturbed
    result["frames"] = frames
    result["chunks"] = chunk_count(plan(frames), chunk, spec.get("given", 0))
    result["decode_s"] = result["seconds"] - result["sampling_s"]  # decoding and MP4 writing
    result["sampling_s_per_chunk"] = result["sampling_s"] / result["chunks"]  # the first chunk has no guidance
    result["seconds_per_frame"] = result["seconds"] / frames
    return result


def child_vae_decode(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """``decode_video`` of ``frames`` latent frames in chunks into an ``out`` video (``uint8`` frames, what a
    writer takes, or the model's float): peak memory and time."""
    from autoencoder import decode_video

    if device.type == "cpu":
        track_rss_closely()
    torch.manual_seed(0)
    vae = small_vae(spec["vae_base"]).to(device).eval()
    chunk, s = spec["chunk"], spec["latent"]
    z = torch.randn(1, 4, spec["frames"], s, s, device=device)
    out = torch.uint8 if spec["out"] == "uint8" else None

    def run():
        return decode_video(vae, z, chunk, dtype=out)

    with torch.inference_mode():
        decode_video(vae, z[:, :, :chunk], chunk, dtype=out)  # warm-up
        result = peak_of(run, device)  # memory (and a time) from the first run
        result["runs_s"] = [result["seconds"]] + [timed(run, device) for _ in range(spec["repeat"] - 1)]
        result["seconds"] = min(result["runs_s"])  # best of the runs: the least disturbed
    result["frames"], result["out"] = spec["frames"], spec["out"]
    result["seconds_per_frame"] = result["seconds"] / spec["frames"]
    return result


def _attention_case(kind: str, batch: int, length: int, spec: dict, device: torch.device,
                    dtype: torch.dtype) -> dict:
    """One sequence shape: both backends on the same ``q, k, v`` (and bias)."""
    from diffusion.attention import attention
    from diffusion.unet3d import TemporalAttention

    heads, d = spec["heads"], spec["dim"]
    seq = length if kind == "temporal" else length * length
    q, k, v = (torch.randn(batch, heads, seq, d, device=device, dtype=dtype) for _ in range(3))
    bias = None
    if kind == "temporal":
        block = TemporalAttention(heads * d, d, 8, 32, "sdpa").to(device)
        with torch.no_grad():
            bias = block.relative_bias(q.float()).to(dtype)  # q·a_r/√d + b_r: [B, heads, f, f], per query
    case = {"batch": batch, "heads": heads, "seq": seq, "head_dim": d, "bias": bias is not None}
    for backend in ("sdpa", "math"):
        def run(backend=backend):
            attention(q, k, v, bias=bias, backend=backend)

        try:
            with torch.no_grad():
                times = [timed(run, device) for _ in range(spec["repeat"] + 1)][1:]  # the first warms up
                memory = peak_of(run, device)
            case[backend] = {"seconds": statistics.median(times), "runs_s": times,
                             **{key: value for key, value in memory.items() if key != "seconds"}}
        except RuntimeError as error:  # does not fit in memory
            case[backend] = {"error": short_error(error)}
        gc.collect()
    return case


def child_attention(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """``diffusion.attention.attention`` forward, ``sdpa`` against ``math``, at long temporal and spatial
    sequences; temporal attention carries the U-Net's relative-position bias as an additive float bias (our
    spatial attention has none)."""
    if device.type == "cpu":
        track_rss_closely()
    limit_memory(device)
    torch.manual_seed(0)
    return {kind: _attention_case(kind, *spec[kind], spec, device, dtype) for kind in ("temporal", "spatial")}


CHILDREN = {"pixel": child_pixel, "long_video": child_long_video, "vae_decode": child_vae_decode,
            "attention": child_attention}


def run_child(kind: str, spec: dict, args) -> dict:
    """Run one measurement in a fresh interpreter (its own RSS), returning its result or ``{"error": ...}``."""
    spec = {**spec, "kind": kind, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}
    command = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"error": f"subprocess {kind} exited with {done.returncode}: {tail}"[:500]}


def run_interleaved(kind: str, specs: dict[str, dict], rounds: int, args) -> dict[str, dict]:
    """``run_child`` of every spec, ``rounds`` times in turn (a, b, a, b: the machine's drift in speed reaches
    every length alike). Per spec: the fastest round's result, with the largest memory growth of all rounds, and
    every round's time and memory growth (``rounds_s``, ``rounds_growth_mib``: None for a round that failed)."""
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for _ in range(rounds):
        for name, spec in specs.items():
            runs[name].append(run_child(kind, spec, args))
    out = {}
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            out[name] = results[0]
            continue
        best = dict(min(good, key=lambda r: r["seconds"]))
        best["rounds_s"] = [r["seconds"] for r in good]
        best["rounds_growth_mib"] = [r.get("growth_mib") for r in results]
        for key in ("growth_mib", "rss_growth_mib", "rss_peak_mib", "cuda_growth_mib"):
            if key in best:
                best[key] = max(r[key] for r in good)
        out[name] = best
    return out


def child_main(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    result = CHILDREN[spec["kind"]](spec, device, dtype)
    print("RESULT " + json.dumps(result), flush=True)


# -------------------------------------------------------------------------------------------------- report


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def ratio_spread(numerator: dict, denominator: dict) -> list[float] | None:
    """[least, most] of the memory-growth ratio round by round (``rounds_growth_mib`` of two
    :func:`run_interleaved` results), over the rounds where both were measured; None without any."""
    pairs = zip(numerator.get("rounds_growth_mib", []), denominator.get("rounds_growth_mib", []))
    ratios = [r for r in (ratio(a, b) for a, b in pairs) if r is not None]
    return [min(ratios), max(ratios)] if ratios else None


def goal_text(key: str) -> str:
    op, bound = GOALS[key]
    return f"1 ± {bound:g}" if op == "within" else f"{'≥' if op == '>=' else '≤'} {bound:g}"


def goal_met(key: str, value) -> bool | None:
    if value is None:
        return None
    op, bound = GOALS[key]
    return {">=": value >= bound, "<=": value <= bound, "within": abs(value - 1) <= bound}[op]


def figures(unet: dict, pixel: dict, long: dict, vae: dict, attn: dict, peak_gflops: float,
            dtype: str, continued: dict | None = None) -> tuple[dict, dict]:
    """The ratios, from the absolute results (the U-Nets' counted GFLOP a step beside their speed-ups per step and
    per FLOP), and each memory ratio's spread over the rounds (:func:`ratio_spread`)."""
    ours, theirs = unet["ours"], unet["diffusers"]
    lengths, decodes = sorted(long, key=int), sorted(vae["uint8"], key=int)
    first, last = long[lengths[0]], long[lengths[-1]]
    out = {}
    for step in ("train", "sample"):  # per FLOP: our FLOP rate over diffusers'
        out |= {f"unet_{step}_speedup_vs_diffusers": ratio(theirs[f"{step}_s"], ours[f"{step}_s"]),
                f"unet_{step}_speedup_per_flop_vs_diffusers": ratio(ours[f"{step}_flops"] / ours[f"{step}_s"],
                                                                     theirs[f"{step}_flops"] / theirs[f"{step}_s"]),
                f"unet_{step}_gflop_ours": ours[f"{step}_flops"] / 1e9,
                f"unet_{step}_gflop_diffusers": theirs[f"{step}_flops"] / 1e9}
    long_key = f"long_video_peak_memory_ratio_{lengths[-1]}_vs_{lengths[0]}"
    spreads = {long_key: ratio_spread(last, first)}
    out |= {
        f"unet_train_utilization_{dtype}": ratio(ours["train_gflops_per_s"], peak_gflops),
        "latent_vs_pixel_train_speedup": ratio(pixel.get("pixel", {}).get("train_s"),
                                               pixel.get("latent", {}).get("train_s")),
        long_key: ratio(last.get("growth_mib"), first.get("growth_mib")),
        f"time_per_frame_ratio_{lengths[-1]}_vs_{lengths[0]}": ratio(last.get("seconds_per_frame"),
                                                                      first.get("seconds_per_frame")),
    }
    if continued:  # the same, continuing given frames
        low, high = min(continued, key=int), max(continued, key=int)
        key = f"continuation_peak_memory_ratio_{high}_vs_{low}"
        out[key] = ratio(continued[high].get("growth_mib"), continued[low].get("growth_mib"))
        spreads[key] = ratio_spread(continued[high], continued[low])
    for out_dtype, name in (("uint8", "vae_decode"), ("float32", "vae_decode_float32")):
        longest, shortest = vae[out_dtype][decodes[-1]], vae[out_dtype][decodes[0]]
        key = f"{name}_peak_memory_ratio_{decodes[-1]}_vs_{decodes[0]}"
        out[key] = ratio(longest.get("growth_mib"), shortest.get("growth_mib"))
        spreads[key] = ratio_spread(longest, shortest)
    for kind in ("temporal", "spatial"):
        case = attn.get(kind, {})
        sdpa, math_ = case.get("sdpa", {}), case.get("math", {})
        out[f"attention_{kind}_sdpa_speedup_vs_math"] = ratio(math_.get("seconds"), sdpa.get("seconds"))
        out[f"attention_{kind}_peak_memory_ratio_sdpa_vs_math"] = ratio(sdpa.get("growth_mib"),
                                                                          math_.get("growth_mib"))
    return out, spreads


def goal_key(key: str) -> str | None:
    """The goal a figure is judged by (utilisation keys carry their dtype)."""
    if key.startswith("unet_train_utilization_"):
        return "unet_train_utilization"
    return key if key in GOALS else None


def notes_on(unet: dict, machine: dict) -> list[str]:
    """What a reader of the figures should know, read off the measurements themselves."""
    notes = []
    load = machine["load_average_1min_before_after"][0]  # after: this run's own load, whatever else ran
    if load > 0.5 * (machine["logical_cpus"] or 1):
        notes.append(f"busy machine: 1-minute load average {load:.2f} on {machine['logical_cpus']} CPUs before the "
                     f"run; times and ratios are not reliable")
    for name in ("ours", "diffusers"):
        calls = unet[name]["attention_kernels_train"]
        if calls.get("_safe_softmax"):
            fused = sum(n for op, n in calls.items() if "attention" in op and "backward" not in op)
            notes.append(f"{name}: {calls['_safe_softmax']} attention calls in a training step ran SDPA's math "
                         f"fallback (_safe_softmax, full attention matrices), {fused} a fused kernel")
        if unet[name]["attention_ops_without_flop_formula"]:
            notes.append(f"{name}: FLOPs miss {unet[name]['attention_ops_without_flop_formula']} (no formula)")
    if not unet["params_within_tolerance"]:
        notes.append(f"parameter counts differ by more than ±{PARAM_TOLERANCE:.0%}")
    return notes


def print_table(values: dict, spreads: dict) -> dict:
    """Print metric | value | spread over rounds | goal | met, and return each goal's verdict."""
    verdicts = {}
    width = max(len(k) for k in values)
    print(f"\n{'metric':<{width}} | {'value':>9} | {'rounds':>13} | {'goal':>8} | met")
    print(f"{'-' * width}-+-{'-' * 9}-+-{'-' * 13}-+-{'-' * 8}-+-----")
    for key, value in values.items():
        goal = goal_key(key)
        met = goal_met(goal, value) if goal else None
        shown = "n/a" if value is None else f"{value:9.3f}"
        spread = f"{spreads[key][0]:.3f}–{spreads[key][1]:.3f}" if spreads.get(key) else "-"
        verdict = "-" if goal is None else ("not measured" if met is None else ("yes" if met else "no"))
        print(f"{key:<{width}} | {shown:>9} | {spread:>13} | {goal_text(goal) if goal else '-':>8} | {verdict}")
        if goal:
            verdicts[key] = {"goal": goal_text(goal), "met": met}
    return verdicts


def print_absolute(unet: dict, pixel: dict, long: dict, vae: dict, attn: dict) -> None:
    for name in ("ours", "diffusers"):
        r = unet[name]
        print(f"U-Net {name:>9}: {r['params'] / 1e6:6.2f}M params | sample {r['sample_s'] * 1e3:8.1f} ms, "
              f"{r['sample_flops'] / 1e9:6.1f} GFLOP | train {r['train_s'] * 1e3:8.1f} ms, "
              f"{r['train_flops'] / 1e9:7.1f} GFLOP ({r['train_gflops_per_s']:.1f} GFLOP/s) | attention kernels "
              f"{r['attention_kernels_train']}")
    for name in ("latent", "pixel"):
        r = pixel.get(name, {})
        shown = (f"train {r['train_s'] * 1e3:9.1f} ms, {r['train_flops'] / 1e9:.1f} GFLOP/step" if "train_s" in r
                 else f"FAILED: {r.get('error', pixel.get('error'))}")
        print(f"{name:>6} step {r.get('shape')}: {shown}")
    for frames, r in sorted(long.items(), key=lambda kv: int(kv[0])):
        if "error" in r:
            print(f"long video {frames:>4} frames: FAILED: {r['error']}")
            continue
        print(f"long video {frames:>4} frames ({r['chunks']} chunks): {r['seconds']:.2f} s "
              f"({r['seconds_per_frame'] * 1e3:.1f} ms/frame; {r['sampling_s_per_chunk']:.2f} s/chunk sampling, "
              f"decode {r['decode_s']:.2f} s) | peak +"
              f"{r['growth_mib']:.1f} MiB (RSS peak {r['rss_peak_mib']:.0f} MiB)")
    for out_dtype, by_length in vae.items():
        for frames, r in sorted(by_length.items(), key=lambda kv: int(kv[0])):
            if "error" in r:
                print(f"VAE decode {frames:>4} frames to {out_dtype}: FAILED: {r['error']}")
                continue
            print(f"VAE decode {frames:>4} frames to {out_dtype:>7}: {r['seconds']:.2f} s "
                  f"({r['seconds_per_frame'] * 1e3:.1f} ms/frame) | peak +{r['growth_mib']:.1f} MiB "
                  f"(RSS peak {r['rss_peak_mib']:.0f} MiB)")
    for kind in ("temporal", "spatial"):
        case = attn.get(kind)
        if not case:
            print(f"attention {kind}: FAILED: {attn.get('error')}")
            continue
        for backend in ("sdpa", "math"):
            r = case[backend]
            shown = (f"{r['seconds'] * 1e3:9.1f} ms | peak +{r['growth_mib']:8.1f} MiB" if "seconds" in r
                     else f"FAILED: {r['error']}")
            print(f"attention {kind:<8} [{case['batch']}, {case['heads']}, {case['seq']}, {case['head_dim']}]"
                  f"{' + bias' if case['bias'] else ''} {backend:>4}: {shown}")


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file (default outputs/benchmarks/run[_quick].json)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks every code path quickly")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="U-Net and attention precision "
                        "(autocast; bf16 is meant for GPUs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    s = SETTINGS["quick" if args.quick else "full"]
    out_path = args.out or Path("outputs/benchmarks") / ("run_quick.json" if args.quick else "run.json")
    began, load_before = time.perf_counter(), os.getloadavg()

    peak = matmul_peak_gflops(8192 if device.type == "cuda" else s["matmul_size"], s["matmul_repeats"],
                              device=str(device))
    bf16_small = matmul_gflops(s["bf16_size"], 3, device, torch.bfloat16)
    machine = {
        "cpu": peak["cpu"], "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "fp32_matmul_peak_gflops": peak["fp32_matmul_peak_gflops"],
        f"bf16_matmul_gflops_{s['bf16_size']}": round(bf16_small, 2),
    }
    util_peak = peak["fp32_matmul_peak_gflops"]
    if dtype != torch.float32:
        size = 8192 if device.type == "cuda" else s["bf16_size"]
        measured = matmul_gflops(size, s["matmul_repeats"], device, dtype)
        machine[f"{args.dtype}_matmul_peak_gflops_{size}"] = round(measured, 1)
        util_peak = measured
    print(f"{machine['cpu']} | {machine['device']} | {machine['threads']} threads | fp32 matmul peak "
          f"{machine['fp32_matmul_peak_gflops']:.1f} GFLOP/s | bf16 {s['bf16_size']}² matmul {bf16_small:.2f} GFLOP/s"
          f" | load average {load_before[0]:.2f}", flush=True)

    sections = {}
    clock = time.perf_counter()
    unet = unet_comparison(s, device, dtype)
    sections["unet"], clock = time.perf_counter() - clock, time.perf_counter()
    print("pixel vs latent step ...", flush=True)
    pixel = run_child("pixel", {"frames": s["pixel_frames"], "size": s["pixel_size"], "factor": s["pixel_factor"],
                                "warmup": s["pixel_warmup"], "repeat": s["pixel_repeat"]}, args)
    sections["latent_vs_pixel"], clock = time.perf_counter() - clock, time.perf_counter()
    print("long videos ...", flush=True)
    long = run_interleaved("long_video", {
        str(n): {"frames": n, "chunk": s["long_chunk"], "context": s["long_context"], "latent": s["long_latent"],
                 "steps": s["long_steps"], "base": s["long_base"], "vae_base": s["vae_base"],
                 "decode_chunk": s["vae_chunk"], "repeat": s["long_repeat"]} for n in s["long_lengths"]},
        s["long_rounds"], args)
    sections["long_video"], clock = time.perf_counter() - clock, time.perf_counter()
    print("continuing 16 given frames ...", flush=True)
    continued = run_interleaved("long_video", {
        str(n): {"frames": n, "chunk": s["long_chunk"], "context": s["long_context"], "latent": s["long_latent"],
                 "steps": s["long_steps"], "base": s["long_base"], "vae_base": s["vae_base"],
                 "decode_chunk": s["vae_chunk"], "repeat": s["long_repeat"], "given": 16} for n in s["long_lengths"]},
        s["long_rounds"], args)
    sections["continuation"], clock = time.perf_counter() - clock, time.perf_counter()
    print("VAE decoding ...", flush=True)
    vae = {out: run_interleaved("vae_decode", {
        str(n): {"frames": n, "chunk": s["vae_chunk"], "latent": s["vae_latent"], "vae_base": s["vae_base"],
                 "repeat": s["vae_repeat"], "out": out} for n in s["vae_lengths"]}, s["vae_rounds"], args)
           for out in ("uint8", "float32")}
    sections["vae_decode"], clock = time.perf_counter() - clock, time.perf_counter()
    print("attention ...", flush=True)
    attn = run_child("attention", {"temporal": s["attn_temporal"], "spatial": s["attn_spatial"],
                                   "heads": s["attn_heads"], "dim": s["attn_dim"], "repeat": s["attn_repeat"]}, args)
    sections["attention"] = time.perf_counter() - clock

    print()
    print_absolute(unet, pixel, long, vae, attn)
    values, spreads = figures(unet, pixel, long, vae, attn, util_peak, args.dtype, continued)
    verdicts = print_table(values, spreads)
    wall = time.perf_counter() - began
    machine["load_average_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    notes = notes_on(unet, machine)
    for note in notes:
        print(f"note: {note}")
    report = {
        **values,
        "memory_ratio_spread_over_rounds": spreads,
        "goals": verdicts,
        "notes": notes,
        "absolute": {"unet": unet, "latent_vs_pixel": pixel, "long_video": long, "continuation": continued,
                     "vae_decode": vae, "attention": attn},
        "machine": machine,
        "settings": {"mode": "quick" if args.quick else "full", "device": args.device, "dtype": args.dtype,
                     "ours": OURS, "tokens": TOKENS, **s},
        "memory": "peak above the baseline after warm-up: CUDA max_memory_allocated on a GPU, else sampled RSS",
        "wall_s": round(wall, 1),
        "section_wall_s": {name: round(seconds, 1) for name, seconds in sections.items()},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{wall:.0f} s; written to {out_path}")
    return report


if __name__ == "__main__":
    main()
