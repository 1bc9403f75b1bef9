#!/usr/bin/env python
"""What each option of autoregressive extension does to long videos of the demo world (paper §3.1), measured on
a trained demo model: identity per chunk (colour and shape right), caption adherence and boundary jumps, for the
same prompts and seeds under each variant. A measurement, not a test: it prints a table and writes JSON.

Variants change one thing against the demo's own generation config (``configs/demo/default.yaml``): more
context frames, weaker or stronger reconstruction-guidance weights ``w_r``,
predictor–corrector steps or the ancestral sampler, no classifier-free guidance, replacement instead of
reconstruction guidance, frames of the first chunk as an anchor besides the context, and (for a model trained
with ``unet.known_frames``) the context left out of the network's input, so that only the guidance conditions on
it.

    make demo                                                # trains the model this measures
    python -m benchmarks.demo.extension_options --out outputs/benchmarks/extension_options.json
    python -m benchmarks.demo.extension_options --frames 128 --variants baseline context_8
    python -m benchmarks.demo.extension_options --seeds 0 1 2 3 --variants baseline w_r_4 replacement guidance_only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from pipelines.core.config import load_config
from pipelines.demo.config import DemoConfig

VARIANTS = {  # name: overrides of the demo's generate config (sampling keys under "sampling")
    "baseline": {},
    "context_4": {"context_frames": 4, "anchor_frames": 0},  # the demo's extension before anchor frames
    "context_3": {"context_frames": 3, "anchor_frames": 0},
    "context_8": {"context_frames": 8},
    "w_r_0.5": {"w_r": 0.5},  # the demo extends with w_r = 1: a weaker weight and stronger ones beside it
    "w_r_2": {"w_r": 2.0},
    "w_r_4": {"w_r": 4.0},
    "w_r_8": {"w_r": 8.0},
    # a scheduled w_r: the reconstruction gradient only at low noise (λ ≥ -4: the last of the demo's shifted
    # DDIM steps, where the joins are drawn) or only at high noise; replacement steps elsewhere
    "w_r_1_low_noise": {"w_r_interval": [-4.0, 20.0]},
    "w_r_2_low_noise": {"w_r": 2.0, "w_r_interval": [-4.0, 20.0]},
    "w_r_4_low_noise": {"w_r": 4.0, "w_r_interval": [-4.0, 20.0]},
    "w_r_8_low_noise": {"w_r": 8.0, "w_r_interval": [-4.0, 20.0]},
    "w_r_4_high_noise": {"w_r": 4.0, "w_r_interval": [-20.0, -4.0]},
    # on a schedule with more steps at low noise (schedule.shift_clean), the same λ ≥ -4 spans half the steps:
    "w_r_1_above_-2": {"w_r_interval": [-2.0, 20.0]},
    "w_r_1_above_0": {"w_r_interval": [0.0, 20.0]},
    "w_r_2_above_-2": {"w_r": 2.0, "w_r_interval": [-2.0, 20.0]},
    "w_r_1_everywhere": {"w_r_interval": None},
    "pc_corrector": {"sampling": {"sampler": "pc", "corrector_steps": 1}},
    "replacement": {"method": "replacement"},
    "no_cfg": {"sampling": {"guidance": 0.0}},  # the demo guides at w = 1 (in its interval): without guidance
    # stronger guidance (same interval), against chunks that drift towards the unconditional model's red circle
    "cfg_2": {"sampling": {"guidance": 2.0}},
    "cfg_3": {"sampling": {"guidance": 3.0}},
    "ancestral": {"sampling": {"sampler": "ancestral"}},
    "guidance_only": {"known_input": False},  # unet.known_frames models: the context reaches them by guidance alone
    # the demo conditions on the first chunk's middle frame (anchor_frames 1) and the last 3 frames:
    "anchor_2_context_2": {"anchor_frames": 2, "context_frames": 2},
    "anchor_1_context_4": {"anchor_frames": 1, "context_frames": 4},
    "anchor_2_context_4": {"anchor_frames": 2, "context_frames": 4},
}


def variant_config(generate, overrides: dict):
    """The generate config with one variant's overrides."""
    sampling = dataclasses.replace(generate.sampling, **overrides.get("sampling", {}))
    return dataclasses.replace(generate, sampling=sampling, **{k: v for k, v in overrides.items() if k != "sampling"})


def compare_extensions(cfg: DemoConfig, names: list[str], out_dir: Path, seeds: tuple[int, ...] = (0,),
                       log=print) -> list[dict]:
    """Generate the demo's prompts under each variant of ``names`` with every seed of ``seeds`` (the same seeds
    for every variant) and grade them chunk by chunk, pooled over the seeds."""
    from pipelines.demo.grading import adherence, grade, identity_summary, jumps_summary
    from pipelines.demo.run import wire
    from pipelines.stages.generate import generate

    cfg = wire(cfg)
    rows = []
    for name in names:
        start, graded = time.perf_counter(), []
        for seed in seeds:
            folder = out_dir / name if len(seeds) == 1 else out_dir / name / f"seed{seed}"
            gen = dataclasses.replace(variant_config(cfg.generate, VARIANTS[name]), out_dir=str(folder), name=name,
                                      seed=seed)
            graded += grade(generate(gen, log=lambda *a: None), folder)
        identity = identity_summary([a["chunks"] for a in graded])
        rows.append({"variant": name, "overrides": VARIANTS[name], "seeds": list(seeds),
                     "identity": identity["identity"], "colour": identity["colour"], "shape": identity["shape"],
                     "by_chunk": identity["by_chunk"], "adherence": adherence(graded)["adherence"],
                     "jump_ratio": jumps_summary(graded)["mean"], "seconds": round(time.perf_counter() - start, 2)})
        log(f"{name:20s} identity {rows[-1]['identity']}  adherence {rows[-1]['adherence']}  "
            f"jump {rows[-1]['jump_ratio']}  {rows[-1]['seconds']:.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/default.yaml", help="the demo config the model came from")
    parser.add_argument("--frames", type=int, default=64, help="frames of each video")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds, pooled per variant")
    parser.add_argument("--out", default="outputs/benchmarks/extension_options.json")
    args = parser.parse_args()
    cfg = load_config(DemoConfig, args.config, [f"generate.num_frames={args.frames}"])
    model = Path(cfg.out_dir) / "work" / "diffusion"
    if not (model / "checkpoints" / "latest").is_file():
        sys.exit(f"no trained demo model at {model}: run `make demo` first (or pass the --config it used)")
    out = Path(args.out)
    rows = compare_extensions(cfg, args.variants, out.parent / "extension_options", tuple(args.seeds), log=print)
    print("\n| variant | identity | colour | shape | adherence | jump ratio | seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['identity']} | {r['colour']} | {r['shape']} | {r['adherence']} | "
              f"{r['jump_ratio']} | {r['seconds']:.0f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"frames": args.frames, "seeds": args.seeds, "prompts": cfg.generate.prompts,
                               "generate": dataclasses.asdict(cfg.generate), "variants": rows}, indent=2))
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
