#!/usr/bin/env python
"""Generation from given frames against what really happened, side by side in one run (a benchmark, not a test):
on held-out clips, part of each clip is given to ``generate`` (``condition.*``) and the rest compared with the
truth, frame by frame (PSNR, SSIM; LPIPS when its weights are on disk), by horizon.

* **continuation**: the first ``--given`` frames given, the next ``--horizon`` compared. Methods: reconstruction
  guidance (the network given the context, with the gradient), replacement with the same network input (the
  gradient alone switched off), the paper's replacement baseline (the network not given the context). Baselines:
  the last given frame copied, and the model's own sample from the prompt alone (nothing given).
* **interpolation**: every ``--every``-th frame given (a low-frame-rate video), the frames between compared;
  baseline: linear blending of the two given frames around each.
* **super-resolution**: the clip area-downsampled ``--scale`` times, enlarged back; baseline: bicubic upsampling.

Clips are read as ``generate`` reads given videos (the model's frame rate and frame size), so what is compared
is what the model could have drawn. Prints one table per task and writes JSON.

    python -m benchmarks.conditioning --model outputs/real/diffusion --clips outputs/real/footage/held_out \\
        --out outputs/benchmarks/conditioning.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.core.config import load_config
from pipelines.core.devices import matmul_peak_gflops
from pipelines.evaluation.frames import frame_scores
from pipelines.media.video_io import write_video
from pipelines.stages.configs import GenerateConfig

CONTINUATION = {  # name: GenerateConfig overrides
    "reconstruction": {},
    "replacement_same_input": {"method": "replacement"},
    "replacement": {"method": "replacement", "known_input": False, "anchor_frames": 0},
}


def truth_clips(model: str, clips: Path, frames: int) -> list[tuple[Path, np.ndarray]]:
    """The first ``frames`` frames of every clip of ``clips`` as ``generate`` reads a given video for ``model``
    (its frame rate, its frame size): ``uint8 [frames, H, W, 3]``; clips too short are left out."""
    from autoencoder import load_autoencoder
    from pipelines.core.config import UserError
    from pipelines.core.visual import to_uint8
    from pipelines.media.datasets import VIDEO_EXTENSIONS, scan_media
    from pipelines.models.diffusion import load_diffusion
    from pipelines.stages.configs import ConditionConfig
    from pipelines.stages.generate import model_frame_size, training_clip_spec
    from pipelines.stages.given import read_given

    bundle = load_diffusion(model)
    size, spec = model_frame_size(bundle, load_autoencoder(bundle.autoencoder)), training_clip_spec(bundle)
    out = []
    for path in scan_media(clips, VIDEO_EXTENSIONS):
        try:
            (given,) = read_given(ConditionConfig(video=str(path), frames="first", count=frames), size, spec,
                                  frames + 1)
        except UserError as error:
            print(f"leaving out {path.name}: {error}")
            continue
        out.append((path, to_uint8(given.video.movedim(1, 0))))
    return out


SECONDS: dict[str, float] = {}  # generation seconds per run, by output folder name


def _generate(args, out: Path, overrides: list[str], **changes) -> list[np.ndarray]:
    """Run ``generate`` (raw frames) and return each output's frames ``uint8 [f, H, W, 3]`` in input order; its
    sampling seconds go to :data:`SECONDS` under the folder's name."""
    from pipelines.stages.generate import generate

    cfg = load_config(GenerateConfig, args.config, [f"model={args.model}", f"out_dir={out}", "raw_frames=true",
                                                    "prompts=[]", *overrides, *args.set])
    summary = generate(dataclasses.replace(cfg, **changes) if changes else cfg, log=lambda *a, **k: None)
    SECONDS[out.name] = summary["seconds"]
    return [np.load(out / s["frames"]) for s in summary["samples"]]


def _write_inputs(folder: Path, videos: list[np.ndarray]) -> Path:
    """``folder/000.mp4``, ... (lossless enough: H.264 at crf 0 is not available everywhere, so crf 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frames in enumerate(videos):
        write_video(folder / f"{i:03d}.mp4", frames, fps=8, crf=1)
    return folder


def _scores(pairs: list[tuple[np.ndarray, np.ndarray]], lpips_model) -> dict[str, np.ndarray]:
    """``[videos, frames]`` arrays of each score."""
    rows = [frame_scores(g, t, lpips_model) for g, t in pairs]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _by_horizon(scores: dict[str, np.ndarray], groups: list[tuple[int, int]]) -> dict:
    """Mean of each score over videos and the frames of each horizon group ``(first, last)`` (1-based)."""
    return {f"{a}-{b}": {k: round(float(v[:, a - 1 : b].mean()), 3) for k, v in scores.items()} for a, b in groups}


def continuation(truth: list[tuple[Path, np.ndarray]], args, work: Path, lpips_model) -> dict:
    """The first ``args.given`` frames of every clip given; frames ``given + 1 …`` compared with the truth."""
    given, horizon = args.given, args.horizon
    folder = _write_inputs(work / "continuation_inputs", [t[: given + horizon] for _, t in truth])
    common = [f"condition.video={folder}", "condition.frames=first", f"condition.count={given}",
              f"num_frames={given + horizon}", f"sampling.steps={args.steps}", f"seed={args.seed}",
              f"batch_size={len(truth)}"]
    future = [t[given : given + horizon] for _, t in truth]
    outputs = {}
    for name, changes in CONTINUATION.items():
        made = _generate(args, work / name, common, name=name, **changes)
        outputs[name] = _scores([(m[given:], f) for m, f in zip(made, future)], lpips_model)
    text_only = _generate(args, work / "text_only", [f"num_frames={given + horizon}", f"sampling.steps={args.steps}",
                                                      f"seed={args.seed}", f"batch_size={len(truth)}",
                                                      "prompts=[" + ",".join(['""'] * len(truth)) + "]"])
    outputs["text_only"] = _scores([(m[given:], f) for m, f in zip(text_only, future)], lpips_model)
    outputs["copy_last_frame"] = _scores([(np.repeat(t[given - 1 : given], horizon, 0), f)
                                          for (_, t), f in zip(truth, future)], lpips_model)
    groups = [(1, 1), (2, 4), (5, 8), (9, horizon)] if horizon > 8 else [(1, 1), (2, horizon)]
    return {name: _by_horizon(s, groups) | {"all": _by_horizon(s, [(1, horizon)])[f"1-{horizon}"]}
            for name, s in outputs.items()}


def interpolation(truth: list[tuple[Path, np.ndarray]], args, work: Path, lpips_model) -> dict:
    """Every ``args.every``-th frame given; the frames between compared, against linear blending."""
    s, keys = args.every, (args.given + args.horizon - 1) // args.every + 1
    length = (keys - 1) * s + 1
    folder = _write_inputs(work / "interpolation_inputs", [t[:length:s] for _, t in truth])
    made = _generate(args, work / "interpolation", [f"condition.video={folder}", "condition.task=interpolate",
                                                     f"condition.every={s}", f"condition.count={keys}",
                                                     f"num_frames={length}", f"sampling.steps={args.steps}",
                                                     f"seed={args.seed}", f"batch_size={len(truth)}"])
    between = [i for i in range(length) if i % s]
    blended = []
    for _, t in truth:
        frames = t[:length].astype(np.float64)
        low, high = (np.arange(length) // s) * s, np.minimum((np.arange(length) // s + 1) * s, length - 1)
        weight = ((np.arange(length) - low) / s)[:, None, None, None]
        blended.append(np.round((1 - weight) * frames[low] + weight * frames[high]).astype(np.uint8))
    return {"diffusion": _means(_scores([(m[between], t[between]) for m, (_, t) in zip(made, truth)], lpips_model)),
            "linear_blend": _means(_scores([(b[between], t[between]) for b, (_, t) in zip(blended, truth)],
                                           lpips_model)),
            "given_every": s, "frames_compared": len(between)}


def super_resolution(truth: list[tuple[Path, np.ndarray]], args, work: Path, lpips_model) -> dict:
    """The clips area-downsampled ``args.scale`` times and enlarged back, against bicubic upsampling."""
    frames = args.given + args.horizon
    clips = [torch.from_numpy(t[:frames]).permute(0, 3, 1, 2).float() for _, t in truth]
    low = [F.interpolate(c, scale_factor=1 / args.scale, mode="area").round().clamp(0, 255).byte() for c in clips]
    folder = _write_inputs(work / "upscale_inputs", [x.permute(0, 2, 3, 1).numpy() for x in low])
    made = _generate(args, work / "upscale", [f"condition.video={folder}", "condition.task=upscale",
                                               f"condition.scale={args.scale}", f"condition.count={frames}",
                                               f"condition.w_upscale={args.w_upscale}", f"num_frames={frames}",
                                               f"sampling.steps={args.steps}", f"seed={args.seed}",
                                               f"batch_size={len(truth)}"])
    bicubic = [F.interpolate(x.float(), scale_factor=args.scale, mode="bicubic", align_corners=False)
               .round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy() for x in low]
    full = [t[:frames] for _, t in truth]
    return {"diffusion": _means(_scores(list(zip(made, full)), lpips_model)),
            "bicubic": _means(_scores(list(zip(bicubic, full)), lpips_model)), "scale": args.scale}


def _means(scores: dict[str, np.ndarray]) -> dict:
    return {k: round(float(v.mean()), 3) for k, v in scores.items()}


def _print_tables(result: dict) -> None:
    cont = result["continuation"]
    groups = [g for g in next(iter(cont.values())) if g != "all"]
    print("\ncontinuation: PSNR / SSIM by horizon (frames after the given ones)")
    print("| method | " + " | ".join(groups) + " | all |\n|---|" + "---|" * (len(groups) + 1))
    for name, row in cont.items():
        print(f"| {name} | " + " | ".join(f"{row[g]['psnr']:.2f} / {row[g]['ssim']:.3f}" for g in [*groups, "all"])
              + " |")
    for task, baseline in (("interpolation", "linear_blend"), ("super_resolution", "bicubic")):
        row = result[task]
        print(f"\n{task}: diffusion PSNR {row['diffusion']['psnr']:.2f} / SSIM {row['diffusion']['ssim']:.3f}; "
              f"{baseline} {row[baseline]['psnr']:.2f} / {row[baseline]['ssim']:.3f}")


def measure(args) -> dict:
    """Every task on the clips of ``args.clips`` with the model ``args.model``."""
    from pipelines.evaluation.reconstruction import eval_lpips

    machine, began = matmul_peak_gflops(), time.perf_counter()
    truth = truth_clips(args.model, Path(args.clips), args.given + args.horizon)
    if not truth:
        raise SystemExit(f"no clip of {args.clips} has {args.given + args.horizon} frames at the model's rate")
    lpips_model = eval_lpips()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="conditioning_") as folder:
        work = Path(folder)
        result = {"continuation": continuation(truth, args, work, lpips_model),
                  "interpolation": interpolation(truth, args, work, lpips_model),
                  "super_resolution": super_resolution(truth, args, work, lpips_model)}
    return result | {"seconds_by_run": dict(SECONDS), "clips": [str(p) for p, _ in truth], "given": args.given,
                     "horizon": args.horizon, "steps": args.steps, "seed": args.seed, "config": args.config,
                     "set": args.set, "lpips": lpips_model is not None, "machine": machine,
                     "seconds": round(time.perf_counter() - began, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusion training run (or checkpoint)")
    parser.add_argument("--clips", required=True, help="a folder of held-out clips")
    parser.add_argument("--given", type=int, default=8, help="continuation: frames given")
    parser.add_argument("--horizon", type=int, default=16, help="continuation: frames compared after them")
    parser.add_argument("--every", type=int, default=4, help="interpolation: every s-th frame given")
    parser.add_argument("--scale", type=int, default=4, help="super-resolution: the clips' sides divided by this")
    parser.add_argument("--w-upscale", type=float, default=1.0, help="super-resolution: the reconstruction weight")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="generate overrides applied last to every run (e.g. w_r=4 w_r_interval=null)")
    parser.add_argument("--config", default=None,
                        help="a generate config (e.g. configs/generate/cpu.yaml) under every run's overrides")
    parser.add_argument("--out", default="outputs/benchmarks/conditioning.json")
    args = parser.parse_args(argv)
    result = measure(args)
    _print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['seconds']:.0f} s on {result['machine']['cpu']} ({result['machine']['threads']} threads, "
          f"fp32 matmul peak {result['machine']['fp32_matmul_peak_gflops']} GFLOP/s) → {out}")
    return result


if __name__ == "__main__":
    main()

