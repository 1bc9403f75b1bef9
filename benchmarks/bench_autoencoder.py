"""Throughput and peak memory of the per-frame VAE on videos, against video length.

For each frame size and video length, times ``encode_video`` and ``decode_video`` under
``torch.inference_mode()`` and records the peak memory: CUDA ``max_memory_allocated`` on a GPU; on a CPU, the
peak RSS above its value just before the call, sampled by a background thread (the input is allocated before).
Chunking by ``--chunk-frames`` should keep peak(longest) / peak(shortest) near 1 (≤ 1.2) at each size.

    python -m benchmarks.bench_autoencoder --sizes 64 --frames 16 64 256 --json outputs/bench_vae.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from autoencoder import AutoencoderConfig, AutoencoderKL, decode_video, encode_video, load_autoencoder
from pipelines.core.devices import PeakMemory

MAX_RATIO = 1.2
CONFIGS = {"sd": AutoencoderConfig.sd, "cpu4": lambda: AutoencoderConfig.cpu(4),
           "cpu8": lambda: AutoencoderConfig.cpu(8)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def track_rss_closely() -> None:
    """Serve every allocation above 256 KiB with its own mmap (glibc ``mallopt(M_MMAP_THRESHOLD)``), so that
    freed tensors leave the RSS at once and RSS growth follows live memory instead of heap fragmentation."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD; setting it also stops glibc from raising it


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS growth measures the next call only."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_bytes(device: torch.device, run) -> int:
    """Peak memory of ``run()``: CUDA's max allocated, or on the CPU the resident memory's growth over its start
    (:class:`pipelines.core.devices.PeakMemory`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    release_free_memory()
    with PeakMemory(interval=0.002) as memory:
        run()
    return int(memory.growth_mb * 2**20)


def measure(fn, device: torch.device, repeat: int) -> tuple[float, int]:
    """(best wall time in s, largest peak memory in bytes) of ``fn()`` over ``repeat`` runs."""
    best, peak = float("inf"), 0

    def timed() -> None:
        nonlocal best
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        del out

    for _ in range(repeat):
        peak = max(peak, peak_bytes(device, timed))
    return best, peak


def row(op: str, size: int, frames: int, seconds: float, peak_bytes: int) -> dict:
    """One result, printed as it comes."""
    result = {"op": op, "size": size, "frames": frames, "seconds": seconds, "frames_per_s": frames / seconds,
              "peak_mib": peak_bytes / 2**20}
    print(format_row(result), flush=True)
    return result


def bench_length(vae: AutoencoderKL, size: int, frames: int, args, device, dtype) -> list[dict]:
    """Encode and decode rows for videos [1, 3, frames, size, size] (each input exists only for its op)."""
    factor, chunk = vae.config.downsample_factor, args.chunk_frames
    video = torch.rand(1, 3, frames, size, size, device=device, dtype=dtype) * 2 - 1
    encode = measure(partial(encode_video, vae, video, chunk), device, args.repeat)
    del video
    shape = (1, vae.config.z_channels, frames, size // factor, size // factor)
    latents = torch.randn(shape, device=device, dtype=dtype)
    decode = measure(partial(decode_video, vae, latents, chunk), device, args.repeat)
    return [row("encode", size, frames, *encode), row("decode", size, frames, *decode)]


def bench_size(vae: AutoencoderKL, size: int, frame_counts: list[int], args, device, dtype) -> list[dict]:
    """Encode and decode rows for one frame size, two per video length, after one warm-up pass."""
    warm = torch.zeros(1, 3, args.chunk_frames, size, size, device=device, dtype=dtype)
    decode_video(vae, encode_video(vae, warm, args.chunk_frames), args.chunk_frames)  # kernels, caches
    return [r for frames in frame_counts for r in bench_length(vae, size, frames, args, device, dtype)]


def peak_ratios(rows: list[dict]) -> list[dict]:
    """peak(longest video) / peak(shortest) for each op and frame size with at least two lengths."""
    ratios = []
    for op, size in sorted({(r["op"], r["size"]) for r in rows}):
        group = sorted((r for r in rows if r["op"] == op and r["size"] == size), key=lambda r: r["frames"])
        if len(group) > 1:
            ratio = group[-1]["peak_mib"] / max(group[0]["peak_mib"], 1e-9)
            ratios.append({"op": op, "size": size, "frames": [group[0]["frames"], group[-1]["frames"]],
                           "ratio": ratio, "ok": ratio <= MAX_RATIO})
    return ratios


def format_row(row: dict) -> str:
    return (f"{row['op']:<7}{row['size']:>6}{row['frames']:>8}{row['seconds']:>10.2f}"
            f"{row['frames_per_s']:>10.2f}{row['peak_mib']:>11.1f}")


def build_vae(args, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE under test: ``--weights`` through the loader, else a randomly initialised ``--config``."""
    if args.weights:
        return load_autoencoder(args.weights, device=device, dtype=dtype)
    torch.manual_seed(0)
    return AutoencoderKL(CONFIGS[args.config]()).to(device=device, dtype=dtype).eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd", help="architecture (random init)")
    parser.add_argument("--weights", help="load this checkpoint with load_autoencoder instead")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256], help="video lengths")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="frame sizes (square)")
    parser.add_argument("--chunk-frames", type=int, default=16, help="frames per VAE call")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting (best time, largest peak)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        track_rss_closely()
    vae = build_vae(args, device, dtype)
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth"
    print(f"device {device} ({platform.machine()}, {torch.get_num_threads()} threads), {args.dtype}, "
          f"chunk_frames {args.chunk_frames}, repeat {args.repeat}, peak = {memory}")
    print(f"{'op':<7}{'size':>6}{'frames':>8}{'seconds':>10}{'frames/s':>10}{'peak MiB':>11}")
    rows = []
    with torch.inference_mode():
        for size in args.sizes:
            rows += bench_size(vae, size, sorted(args.frames), args, device, dtype)
    ratios = peak_ratios(rows)
    for r in ratios:
        print(f"peak({r['frames'][1]})/peak({r['frames'][0]}) {r['op']} {r['size']}px: {r['ratio']:.3f} "
              f"({'ok' if r['ok'] else f'EXCEEDS {MAX_RATIO}'})")
    report = {"device": str(device), "dtype": args.dtype, "chunk_frames": args.chunk_frames,
              "repeat": args.repeat, "memory": memory, "config": args.weights or args.config,
              "results": rows, "peak_ratios": ratios}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
