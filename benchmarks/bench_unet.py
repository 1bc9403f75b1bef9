#!/usr/bin/env python
"""Our space-time U-Net against diffusers' ``UNet3DConditionModel`` on the same input (a benchmark, not a test).

Both networks get the same widths, blocks per level, head width and text-token cross-attention, and the same
latent video ``[b, 4, f, h, w]``; the script prints per-network parameter counts, median forward and
forward+backward times over ``--repeat`` runs, peak memory, and our/diffusers ratios measured in the same run.

Examples:
  python benchmarks/bench_unet.py                                    # CPU-sized
  python benchmarks/bench_unet.py --device cuda --dtype bf16 --base 256 --size 32 --frames 16 --batch 2
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion import UNet3D, UNet3DConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_ours(args) -> torch.nn.Module:
    levels = len(args.mult)
    return UNet3D(UNet3DConfig(
        in_channels=4, out_channels=4, base_channels=args.base, channel_mult=args.mult, num_res_blocks=args.blocks,
        attention_levels=list(range(1, levels)), head_dim=args.head_dim, norm_groups=32, cond_dim=0,
        context_dim=args.context_dim, channels_last=args.channels_last, attention_backend="auto",
    ))


def build_diffusers(args) -> torch.nn.Module:
    from diffusers import UNet3DConditionModel

    levels = len(args.mult)
    widths = tuple(args.base * m for m in args.mult)
    return UNet3DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=args.blocks,
        down_block_types=("DownBlock3D",) + ("CrossAttnDownBlock3D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock3D",) * (levels - 1) + ("UpBlock3D",),
        attention_head_dim=args.head_dim, cross_attention_dim=args.context_dim, norm_num_groups=32,
    )


def run_ours(net, z, t, context):
    logsnr = torch.zeros(z.shape[0], device=z.device)
    return net(z, logsnr, context=context)


def run_diffusers(net, z, t, context):
    return net(z, t, encoder_hidden_states=context).sample


def measure(net, runner, inputs, repeat: int, backward: bool, device: torch.device) -> dict:
    """Median seconds and peak memory of ``repeat`` timed runs after two warm-ups."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeat + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = runner(net, *inputs)
            if backward:
                out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
        del out
        net.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"median_s": statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent height = width")
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--mult", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--context-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    z = torch.randn(args.batch, 4, args.frames, args.size, args.size, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    context = torch.randn(args.batch, args.tokens, args.context_dim, device=device, dtype=dtype)
    results = {}
    for name, build, runner in (("ours", build_ours, run_ours), ("diffusers", build_diffusers, run_diffusers)):
        net = build(args).to(device=device, dtype=dtype)
        params = sum(p.numel() for p in net.parameters())
        forward = measure(net.eval(), runner, (z, t, context), args.repeat, False, device)
        train = measure(net.train(), runner, (z, t, context), args.repeat, True, device)
        results[name] = {"params_m": round(params / 1e6, 2), "forward": forward, "forward_backward": train}
        print(f"{name:>9}: {params / 1e6:7.2f}M params | forward {forward['median_s'] * 1e3:8.1f} ms "
              f"(peak {forward['peak_mib']:.0f} MiB) | forward+backward {train['median_s'] * 1e3:8.1f} ms "
              f"(peak {train['peak_mib']:.0f} MiB)", flush=True)
        del net
        gc.collect()
    for phase in ("forward", "forward_backward"):
        ratio = results["ours"][phase]["median_s"] / results["diffusers"][phase]["median_s"]
        results[f"{phase}_time_ratio_ours_over_diffusers"] = round(ratio, 3)
        print(f"{phase}: ours / diffusers time = {ratio:.3f}")
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
