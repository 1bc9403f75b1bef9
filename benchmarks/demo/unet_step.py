#!/usr/bin/env python
"""The demo U-Net's training step, timed side by side across checkouts of this repository (a benchmark, not a
test): each checkout's own ``diffusion`` package, the U-Net of ``configs/demo/default.yaml`` at one process's
share of the demo batch, one thread (what each of the demo's two training processes runs), every root a fresh
subprocess, roots interleaved round by round, with the fp32 matmul peak measured before and after each round.

It times the network alone (forward, backward and fused AdamW on random latents, every zero-initialised layer
given weights so every path computes), so a change to the network shows without the rest of the loop.

    git worktree add /tmp/before <commit>                   # the code to compare against
    python -m benchmarks.demo.unet_step --roots /tmp/before . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(root: str, steps: int, threads: int, processes: int) -> None:
    """Time ``steps`` training steps of the demo U-Net as ``root`` builds it (its packages come first on the
    path: :func:`run_root` sets ``PYTHONPATH``); print the median as JSON."""
    import torch  # noqa: PLC0415

    from diffusion import UNet3D  # noqa: PLC0415
    from pipelines.core.config import load_config  # noqa: PLC0415
    from pipelines.demo.config import DemoConfig  # noqa: PLC0415
    from pipelines.models.diffusion import build_unet_config  # noqa: PLC0415
    from pipelines.models.text import build_text_encoder, conditioning_dims  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(DemoConfig, str(Path(root) / "configs" / "demo" / "default.yaml"), [])
    text, channels = build_text_encoder(cfg.diffusion.text), cfg.autoencoder.model.z_channels
    net = UNet3D(build_unet_config(cfg.diffusion.model, cfg.diffusion.text, text, channels))
    width, token_width = conditioning_dims(text, cfg.diffusion.text.use_tokens)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    b, f = cfg.diffusion.run.batch_size // processes, cfg.diffusion.data.num_frames
    size = cfg.world.spec.size // 2 ** (len(cfg.autoencoder.model.channel_mult) - 1)
    z = torch.randn(b, channels, f, size, size)
    inputs = {"logsnr": torch.randn(b), "cond": torch.randn(b, width)}
    if token_width:
        inputs["context"] = torch.randn(b, text.context_length, token_width)
    if net.config.known_frames:
        inputs |= {"known": torch.randn_like(z), "known_mask": torch.rand(b, f) < 0.25}

    def step() -> None:
        loss = (net(z, **inputs) - z).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    print("RESULT " + json.dumps({"median_ms": 1e3 * statistics.median(times), "batch": b, "frames": f,
                                  "size": size, "parameters": sum(p.numel() for p in net.parameters())}), flush=True)


def run_root(root: Path, args) -> dict:
    """One timing of ``root`` in a fresh subprocess."""
    done = subprocess.run([sys.executable, __file__, "--child", str(root), "--steps", str(args.steps),
                           "--threads", str(args.threads), "--processes", str(args.processes)],
                          capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{root} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", nargs="+", default=["."], help="checkouts to time (the first is the baseline)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per root and round (after 3 warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each timing every root once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's processes use 1)")
    parser.add_argument("--processes", type=int, default=2, help="the demo batch is split over this many")
    parser.add_argument("--out", default="outputs/benchmarks/demo_unet_step.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.threads, args.processes)

    from benchmarks.rounds import interleaved_rounds  # noqa: PLC0415

    roots = [str(Path(r).resolve()) for r in args.roots]
    results, peaks = interleaved_rounds(
        roots, lambda root: run_root(Path(root), args), args.rounds,
        lambda root, r: f"{root}  {r['median_ms']:.1f} ms a step (batch {r['batch']} x {r['frames']} frames of "
                        f"{r['size']}x{r['size']})")
    rows = {root: [r["median_ms"] for r in rs] for root, rs in results.items()}
    base = statistics.median(rows[roots[0]])
    print(f"\nfp32 matmul peak {min(peaks):.1f}-{max(peaks):.1f} GFLOP/s before and after each round, on all "
          f"of torch's threads; the steps ran on {args.threads})")
    print("| checkout | step ms (median of rounds) | speed-up vs the first |\n|---|---|---|")
    summary = {}
    for root, values in rows.items():
        median = statistics.median(values)
        summary[root] = {"median_ms": median, "rounds_ms": values, "speedup": base / median}
        print(f"| {root} | {median:.1f} | {base / median:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "threads": args.threads, "peaks_gflops": peaks,
                               "roots": summary}, indent=2))
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
