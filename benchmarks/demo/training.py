#!/usr/bin/env python
"""How fast the demo's diffusion stage trains on this CPU under each process setup, side by side (a benchmark,
not a test): the demo's own model, latents and batch, each variant a fresh subprocess, variants interleaved
round by round, with the fp32 matmul peak measured in the same run.

Variants: ``one_process`` (one process with all of torch's threads: the demo before, ``processes=1``) and
``two_processes`` (two data-parallel processes of one thread each at half the batch each: what ``make demo``
runs on a 2-core machine, ``processes=0``). Both train the same model (the loss they log agrees).

    make demo                                          # writes the latents this trains on
    python -m benchmarks.demo.training --steps 100 --rounds 2 --out outputs/benchmarks/demo_training.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: ``python -m benchmarks.demo.training`` runs from it

VARIANTS = {"one_process": 1, "two_processes": 2}


def child(variant: str, config: str, steps: int, out_dir: str) -> None:
    """Train ``steps`` steps of the demo's diffusion stage under ``variant``; print its summary as JSON."""
    processes = VARIANTS[variant]
    from pipelines.core.config import load_config  # noqa: PLC0415
    from pipelines.core.processes import run_in_processes  # noqa: PLC0415
    from pipelines.demo.config import DemoConfig  # noqa: PLC0415
    from pipelines.demo.run import per_process, wire  # noqa: PLC0415
    from pipelines.stages.train_diffusion import train_diffusion  # noqa: PLC0415

    cfg = wire(load_config(DemoConfig, config, []))
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(
        cfg.diffusion, sample_prompts=[], run=dataclasses.replace(
            cfg.diffusion.run, steps=steps, out_dir=out_dir, checkpoint_every=10 * steps, resume=False)))
    began = time.perf_counter()
    summary = run_in_processes(train_diffusion, (per_process(cfg.diffusion, processes),), processes)
    print("RESULT " + json.dumps(summary | {"wall_s": round(time.perf_counter() - began, 2)}), flush=True)


def run_variant(variant: str, args) -> dict:
    """One variant in a fresh subprocess; its summary (training seconds, wall seconds, final loss)."""
    with tempfile.TemporaryDirectory(prefix="demo_training_") as out:
        done = subprocess.run([sys.executable, "-m", "benchmarks.demo.training", "--child", variant, "--config",
                               args.config, "--steps", str(args.steps), "--work", out], capture_output=True, text=True,
                              cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{variant} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/default.yaml", help="the demo config whose latents exist")
    parser.add_argument("--steps", type=int, default=100, help="training steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running every variant once")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="outputs/benchmarks/demo_training.json")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config, args.steps, args.work)

    from benchmarks.rounds import interleaved_rounds  # noqa: PLC0415
    from pipelines.core.config import load_config  # noqa: PLC0415
    from pipelines.demo.config import DemoConfig  # noqa: PLC0415

    latents = Path(load_config(DemoConfig, args.config, []).out_dir) / "work" / "latents"
    if not latents.is_dir():
        raise SystemExit(f"no demo latents at {latents}: run `make demo` first (or pass the --config it used)")
    rows, peaks = interleaved_rounds(
        args.variants, lambda variant: run_variant(variant, args), args.rounds,
        lambda variant, result: f"{variant:14s} {args.steps / result['seconds']:.2f} steps/s (training "
                                f"{result['seconds']:.1f} s, wall {result['wall_s']:.1f} s, final loss "
                                f"{result['final_loss']:.4f})")
    base = statistics.median(r["seconds"] for r in rows[args.variants[0]])
    summary = {}
    print(f"\nfp32 matmul peak {min(peaks):.1f}–{max(peaks):.1f} GFLOP/s (before and after each round)")
    print("| variant | training s (median) | steps/s | speed-up vs " + args.variants[0] + " | wall s (median) |")
    print("|---|---|---|---|---|")
    for variant, results in rows.items():
        seconds = statistics.median(r["seconds"] for r in results)
        wall = statistics.median(r["wall_s"] for r in results)
        summary[variant] = {"training_s": seconds, "wall_s": wall, "steps_per_s": args.steps / seconds,
                            "speedup": base / seconds, "rounds": results}
        print(f"| {variant} | {seconds:.1f} | {args.steps / seconds:.2f} | {base / seconds:.3f} | {wall:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "peaks_gflops": peaks,
                               "variants": summary}, indent=2))
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
