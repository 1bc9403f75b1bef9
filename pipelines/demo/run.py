"""The main job on the built-in default data: a synthetic captioned video world, the whole chain trained on it,
long videos generated from text and from given frames, and a report that measures them.

Stages (each announces itself): build the world (real MP4 files with captions; held-out and validation captions
shown by no training video) → train the autoencoder → encode latents → train the text-conditioned diffusion model
→ a classifier-free guidance sweep on held-out and training captions → long videos by reconstruction guidance and,
on the same seeds, by replacement with the same network input and by the paper's replacement baseline, and a few
much longer ones → held-out world videos continued from their first frames and compared with the truth → grade
every video (adherence, identity per chunk, joins) → ``report.json`` and ``report.md`` with the pictures. Stages
already done in the work directory are reused (checkpoints resume), so an interrupted demo continues where it
stopped; the report says which stages ran, and judges the time only of a run that did every stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from autoencoder import decode_video, encode_video, load_autoencoder
from pipelines.core.config import ConfigError, save_resolved_config
from pipelines.core.devices import PeakMemory, matmul_peak_gflops
from pipelines.core.files import atomic_write_json, atomic_write_text
from pipelines.core.processes import run_in_processes
from pipelines.demo.config import DemoConfig
from pipelines.demo.continuation import continuation
from pipelines.demo.grading import (
    adherence,
    grade,
    grader_accuracy,
    identity_summary,
    jumps_summary,
    plot_identity,
    plot_sweep,
    rounded,
)
from pipelines.demo.margins import paired_difference
from pipelines.demo.report import render_report, targets
from pipelines.evaluation.config import EvaluateConfig
from pipelines.media.video_io import as_float_frames
from pipelines.stages.configs import DiffusionTrainConfig
from pipelines.stages.encode_latents import encode_latents
from pipelines.stages.evaluate import evaluate
from pipelines.stages.generate import generate
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from pipelines.world.synthetic import caption_of, make_world, training_combos

METHODS = {  # the report's extension runs, on the same prompts and seeds; the first is the demo's own
    "reconstruction": "reconstruction guidance, the network given the context and an anchor frame (the demo's)",
    "replacement_same_input": "replacement, all else the same: only the reconstruction gradient switched off",
    "replacement": "the paper's replacement baseline: the network not given the context, no anchor frame",
}
JUMP_CAP = 10.0  # a join where the object vanished counts as a jump ten times the motion inside chunks


class Stages:
    """Each stage of the run with its seconds here and whether it did its work (``run``), continued an
    interrupted run (``resumed``) or found it done (``reused``), so the report times only what ran."""

    def __init__(self, log):
        self.log, self.records = log, {}

    @contextmanager
    def stage(self, name: str, title: str) -> Iterator[dict]:
        """Announce, time and record one stage; the block sets ``record["status"]`` when it is not ``run``."""
        self.log(f"\n==> {title}")
        record, began = {"status": "run"}, time.perf_counter()
        yield record
        record["seconds"] = round(time.perf_counter() - began, 2)
        self.records[name] = record

    @property
    def all_ran(self) -> bool:
        return all(r["status"] == "run" for r in self.records.values())


def training_status(summary: dict) -> str:
    """``run``, ``resumed`` or ``reused`` from a trainer's summary (the step it started at)."""
    started = summary.get("started_at_step", 0)
    return "run" if started == 0 else "reused" if started >= summary["steps"] else "resumed"


def wire(cfg: DemoConfig) -> DemoConfig:
    """Point every stage at the demo's own folders: world → autoencoder → latents → diffusion → videos."""
    out = Path(cfg.out_dir)
    work, world = out / "work", out / "work" / "world"
    size = cfg.world.spec.size
    ae = dataclasses.replace(cfg.autoencoder, data=dataclasses.replace(
        cfg.autoencoder.data, roots=[str(world / "train")], size=size),
        run=dataclasses.replace(cfg.autoencoder.run, out_dir=str(work / "autoencoder")))
    enc = dataclasses.replace(
        cfg.encode, autoencoder=str(work / "autoencoder" / "model"), videos=[str(world / "train")],
        out_dir=str(work / "latents"),
        clip=dataclasses.replace(cfg.encode.clip, size=size, num_frames=cfg.world.spec.num_frames, start="first"))
    dif = dataclasses.replace(cfg.diffusion, data=dataclasses.replace(
        cfg.diffusion.data, latents=str(work / "latents"), autoencoder=None, videos=[]),
        run=dataclasses.replace(cfg.diffusion.run, out_dir=str(work / "diffusion")))
    gen = dataclasses.replace(cfg.generate, model=dif.run.out_dir, autoencoder=None, out_dir=str(out / "videos"),
                              batch_size=len(cfg.generate.prompts), raw_frames=True)  # graded without the codec
    return dataclasses.replace(cfg, autoencoder=ae, encode=enc, diffusion=dif, generate=gen)


def training_processes(cfg: DemoConfig) -> int:
    """How many processes train the diffusion model (``cfg.processes``, 0 resolved): each gets an equal share
    of the batch, so it must divide ``diffusion.run.batch_size``."""
    batch, n = cfg.diffusion.run.batch_size, cfg.processes
    if n == 0:
        cpu_only = not torch.cuda.is_available() and cfg.diffusion.run.device in ("auto", "cpu")
        n = 2 if cpu_only and min(os.cpu_count() or 1, torch.get_num_threads()) >= 2 and batch % 2 == 0 else 1
    if n < 1 or batch % n:
        raise ConfigError(f"processes={cfg.processes} must be 0 or a positive divisor of diffusion.run.batch_size "
                          f"({batch})")
    return n


def per_process(diffusion: DiffusionTrainConfig, processes: int) -> DiffusionTrainConfig:
    """The diffusion stage's config for each of ``processes`` processes: the same global batch, split."""
    return dataclasses.replace(diffusion, run=dataclasses.replace(
        diffusion.run, batch_size=diffusion.run.batch_size // processes))


def method_config(cfg: DemoConfig, method: str):
    """The generation config of one of :data:`METHODS`: the demo's own, or one piece of it switched off."""
    gen = dataclasses.replace(cfg.generate, name=method)
    if method == "replacement_same_input":
        return dataclasses.replace(gen, method="replacement")
    if method == "replacement":
        return dataclasses.replace(gen, method="replacement", known_input=False, anchor_frames=0)
    return gen


def generate_methods(cfg: DemoConfig, log) -> tuple[dict[str, dict], dict]:
    """Generate with each of :data:`METHODS` (same prompts, same seed), with the peak memory of them all."""
    results, start = {}, time.perf_counter()
    with PeakMemory() as memory:
        for method in METHODS:
            results[method] = generate(method_config(cfg, method), log)
    first = results["reconstruction"]
    seconds = time.perf_counter() - start
    videos = sum(len(r["samples"]) for r in results.values())
    return results, {"num_frames": first["num_frames"], "chunks": first["chunks"], "seconds": round(seconds, 2),
                     "peak_rss_mb": round(memory.peak, 1), "videos": videos,
                     "frames_per_second": round(first["num_frames"] * videos / seconds, 3)}


def sweep_prompts(cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """The guidance sweep's prompts: the world's held-out captions, and ``sweep.seen_prompts`` training captions
    drawn with the world's seed."""
    combos = training_combos(cfg.world.unseen)
    order = np.random.default_rng(cfg.world.seed).permutation(len(combos))[: cfg.sweep.seen_prompts]
    return list(cfg.world.held_out), [caption_of(combos[i]) for i in order]


def first_chunk_config(cfg: DemoConfig, prompts: list[str], folder: Path, name: str, **changes):
    """The demo's generation config for one chunk (the training window) of each of ``prompts`` in one batch,
    written to ``folder`` as ``name``; ``changes`` replace further fields (``seed``, ``sampling``)."""
    return dataclasses.replace(cfg.generate, prompts=prompts, num_frames=cfg.diffusion.data.num_frames,
                               batch_size=len(prompts), out_dir=str(folder), name=name, **changes)


def guidance_sweep(cfg: DemoConfig, out: Path, log) -> dict:
    """``sweep.samples`` chunks per prompt at every guidance weight of ``cfg.sweep`` (same prompts, same seed):
    adherence on held-out and training captions apart, per w, and every video's flags (for paired margins)."""
    held_out, seen = sweep_prompts(cfg)
    prompts = (held_out + seen) * cfg.sweep.samples
    weights = sorted(set(cfg.sweep.weights) | {cfg.generate.sampling.guidance})
    folder, start, by_w = out / "sweep", time.perf_counter(), {}
    for w in weights:
        gen = first_chunk_config(cfg, prompts, folder, f"w{w:g}",
                                 sampling=dataclasses.replace(cfg.generate.sampling, guidance=w))
        graded = grade(generate(gen, log), folder)
        by_w[f"{w:g}"] = {"w": w, "all": adherence(graded),
                          "held_out": adherence([g for g in graded if g["prompt"] in held_out]),
                          "seen": adherence([g for g in graded if g["prompt"] not in held_out]),
                          "per_video": video_flags(graded)}
    return {"default": cfg.generate.sampling.guidance, "prompts": {"held_out": held_out, "seen": seen},
            "samples": cfg.sweep.samples, "num_frames": cfg.diffusion.data.num_frames,
            "seconds": round(time.perf_counter() - start, 2), "by_w": by_w}


def video_flags(graded: list[dict]) -> dict[str, list]:
    """Per video, in order: adherence and identity (1 or 0) and the join score (mean jump ratio, a vanished
    object's join counted as :data:`JUMP_CAP`): the units the report's paired margins resample."""
    def joins(a: dict) -> float:
        jumps = [j if np.isfinite(j) else JUMP_CAP for j in a["jumps"]]
        return float(np.mean(jumps)) if jumps else float("nan")

    return {"adherence": [int(all(a[f"{k}_correct"] for k in ("colour", "shape", "direction"))) for a in graded],
            "identity": [int(a["colour_correct"] and a["shape_correct"]) for a in graded],
            "joins": [rounded(joins(a), 4) for a in graded]}


def long_videos(cfg: DemoConfig, out: Path, log) -> dict | None:
    """``long.prompts`` videos of ``long.num_frames`` frames with the generation's own method and sampler, graded
    chunk by chunk; None when ``long.num_frames`` is 0."""
    if cfg.long.num_frames <= 0:
        return None
    prompts = cfg.generate.prompts[: cfg.long.prompts]
    gen = dataclasses.replace(cfg.generate, prompts=prompts, num_frames=cfg.long.num_frames,
                              batch_size=len(prompts), name=f"{cfg.generate.method}_{cfg.long.num_frames}")
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = generate(gen, log)
    graded = grade(result, out / "videos")
    return {"method": cfg.generate.method, "num_frames": cfg.long.num_frames, "chunks": result["chunks"],
            "videos": len(prompts), "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(memory.peak, 1), "adherence": adherence(graded),
            "identity": identity_summary([a["chunks"] for a in graded]), "jumps": jumps_summary(graded),
            "files": [f"videos/{a['file']}" for a in graded], "name": gen.name}


def quality(graded: dict[str, list[dict]]) -> dict:
    """The quality block of the extended videos: colour and direction over every method's videos, adherence,
    identity per chunk, joins and every video's flags per method."""
    everything = [a for analyses in graded.values() for a in analyses]
    return {
        "color_accuracy": float(np.mean([a["colour_correct"] for a in everything])),
        "direction_accuracy": float(np.mean([a["direction_correct"] for a in everything])),
        "methods": dict(METHODS),
        "adherence": {m: adherence(analyses) for m, analyses in graded.items()},
        "identity": {m: identity_summary([a["chunks"] for a in analyses]) for m, analyses in graded.items()},
        "jumps": {m: jumps_summary(analyses) for m, analyses in graded.items()},
        "per_video": {m: video_flags(analyses) for m, analyses in graded.items()},
    }


def comparisons(q: dict, sweep: dict) -> dict:
    """The report's comparisons, each a paired difference over the same prompts and seeds with its bootstrap
    interval: guidance against none (adherence, identity), reconstruction guidance against the paper's
    replacement and against replacement with the same network input (joins: replacement's minus ours, so a
    positive difference means smoother joins)."""
    default, zero = sweep["by_w"][f"{sweep['default']:g}"], sweep["by_w"].get("0")
    out = {}
    if zero is not None and sweep["default"] > 0:
        for key in ("adherence", "identity"):
            out[f"guidance_{key}"] = paired_difference(default["per_video"][key], zero["per_video"][key])
    ours = q["per_video"]["reconstruction"]["joins"]
    for baseline in ("replacement", "replacement_same_input"):
        theirs = q["per_video"][baseline]["joins"]
        out[f"joins_vs_{baseline}"] = paired_difference(_floats(theirs), _floats(ours))
    return out


def _floats(values: list) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _samples(graded: dict[str, list[dict]]) -> list[dict]:
    return [{"file": f"videos/{a['file']}", "prompt": a["prompt"], "method": method, "colour": a["colour"],
             "direction": a["direction"], "shape": a["shape"], "jump_ratio": rounded(a["jump_ratio"], 3)}
            for method, analyses in graded.items() for a in analyses]


def grader_accuracies(cfg: DemoConfig, world: Path, boundaries: list[int]) -> dict:
    """The grader's own accuracy (colour, shape, direction per chunk, identity per chunk) on the world's own
    videos cut at the generation's chunk boundaries, and on their reconstructions by the demo's autoencoder (the
    best any generated video can look)."""
    vae = load_autoencoder(Path(cfg.autoencoder.run.out_dir) / "model", device="cpu")

    @torch.no_grad()
    def reconstruct(frames: np.ndarray) -> torch.Tensor:
        video = as_float_frames(frames).movedim(1, 0)[None]  # [1, 3, f, H, W]
        return decode_video(vae, encode_video(vae, video))[0].clamp(-1, 1)

    return {"world_videos": grader_accuracy(world, boundaries=boundaries),
            "autoencoder_reconstructions": grader_accuracy(world, reconstruct=reconstruct, boundaries=boundaries)}


def video_distances(cfg: DemoConfig, results: dict[str, dict], out: Path, log) -> dict:
    """FVD / KVD of each method's videos against the world's training videos (StyleGAN-V's protocol) when
    ``metrics.i3d`` is set; else how to enable them."""
    if not cfg.metrics.i3d:
        return {"computed": False, "how": "set metrics.i3d=/path/to/i3d_torchscript.pt (StyleGAN-V's I3D) "
                                          "to add FVD and KVD to this report"}
    distances = {"computed": True}
    for method, result in results.items():
        folder = out / "work" / "fvd" / method
        folder.mkdir(parents=True, exist_ok=True)
        for s in result["samples"]:
            shutil.copy2(out / "videos" / s["file"], folder / s["file"])
        metrics = evaluate(EvaluateConfig(generated=str(folder), real=cfg.autoencoder.data.roots[0],
                                          out_dir=str(out / "work" / "fvd" / f"{method}_metrics"),
                                          metrics=cfg.metrics, seed=cfg.world.seed), log)
        distances[method] = {k: metrics[k] for k in ("fvd", "kvd", "kvd_x1000")} | {
            "clips": metrics["generated"]["clips"], "real_clips": metrics["real"]["clips"]}
    return distances


def train(cfg: DemoConfig, stages: Stages, log) -> tuple[dict, dict]:
    """The world, the autoencoder, the latents and the diffusion model: each stage run, resumed or reused."""
    world = Path(cfg.out_dir) / "work" / "world"
    with stages.stage("world", "1/8 building the synthetic world (real MP4 files + captions)") as record:
        records = make_world(world, cfg.world.videos, cfg.world.spec, cfg.world.seed, "train", cfg.world.unseen)
        record["status"] = "run" if all(r["rendered"] for r in records) else \
            "reused" if not any(r["rendered"] for r in records) else "resumed"
        log(f"    {cfg.world.videos} videos, {len(training_combos(cfg.world.unseen))} captions "
            f"({len(cfg.world.held_out)} held out, {len(cfg.world.validation)} for validation)")
    with stages.stage("autoencoder", "2/8 training the autoencoder") as record:
        ae = train_autoencoder(cfg.autoencoder, log)
        record["status"], record["recorded_seconds"] = training_status(ae), ae["seconds"]
    with stages.stage("latents", "3/8 encoding latents") as record:
        manifest = encode_latents(cfg.encode, log)
        encoded = manifest["stats"]["encoded_clips"]
        record["status"] = "run" if encoded == manifest["clips"] else "reused" if encoded == 0 else "resumed"
        log(f"    {manifest['clips']} clips of latents {manifest['latent_shape']}")
    processes = training_processes(cfg)
    title = f"4/8 training the text-conditioned diffusion model ({processes} process{'es' * (processes > 1)})"
    with stages.stage("diffusion", title) as record:
        if processes > 1:
            dif = run_in_processes(train_diffusion, (per_process(cfg.diffusion, processes),), processes)
        else:
            dif = train_diffusion(cfg.diffusion, log)
        dif = dif | {"processes": processes}
        record["status"], record["recorded_seconds"] = training_status(dif), dif["seconds"]
    return ae, dif


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the whole chain and write ``report.json`` / ``report.md`` into ``cfg.out_dir``."""
    cfg = wire(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, "demo_config.yaml")
    began, stages = time.perf_counter(), Stages(log)
    machine = matmul_peak_gflops()  # this machine's speed, beside its times
    ae, dif = train(cfg, stages, log)
    weights = sorted(set(cfg.sweep.weights))
    with stages.stage("sweep", f"5/8 classifier-free guidance sweep: w in {weights}, held-out and training captions"):
        sweep = guidance_sweep(cfg, out, log)
    with stages.stage("generation", f"6/8 {len(cfg.generate.prompts)} prompts × {cfg.generate.num_frames} frames "
                                    f"({', '.join(METHODS)}) and {cfg.long.prompts} × {cfg.long.num_frames} frames"):
        results, generation = generate_methods(cfg, log)
        long = long_videos(cfg, out, log)
    with stages.stage("continuation", f"7/8 continuing {cfg.continuation.videos} held-out world videos from their "
                                      f"first {cfg.continuation.given_frames} frames"):
        continued = continuation(cfg, out, log)
    with stages.stage("grading", "8/8 grading the videos and writing the report"):
        graded = {method: grade(result, out / "videos") for method, result in results.items()}
        q = quality(graded) | {"guidance_sweep": sweep, "long": long, "continuation": continued}
        q["comparisons"] = comparisons(q, sweep)
        q["video_distances"] = video_distances(cfg, results, out, log)
        q["grader_accuracy"] = grader_accuracies(cfg, Path(cfg.autoencoder.data.roots[0]),
                                                 results["reconstruction"]["samples"][0]["boundaries"])
        curves = {f"{m} ({generation['num_frames']} frames)": q["identity"][m] for m in METHODS}
        jumps = {f"{m} ({generation['num_frames']} frames)": q["jumps"][m] for m in METHODS}
        if long:
            curves[f"{long['method']} ({long['num_frames']} frames)"] = long["identity"]
            jumps[f"{long['method']} ({long['num_frames']} frames)"] = long["jumps"]
        plot_identity(curves, jumps, out / "identity_by_chunk.png")
        plot_sweep(sweep, out / "guidance_sweep.png")
    report = {
        "autoencoder": {k: ae.get(k) for k in ("psnr", "ssim", "steps", "seconds", "started_at_step")},
        "diffusion": dif,
        "generation": generation,
        "quality": q,
        "samples": _samples(graded),
        "stages": stages.records,
        "wall_seconds": round(time.perf_counter() - began, 2),
        "all_stages_ran": stages.all_ran,
        "machine": machine,
    }
    report["targets"] = targets(report, cfg.targets)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_report(report, cfg))
    log(json.dumps({k: report[k] for k in ("stages", "wall_seconds", "targets")}, indent=2))
    log(f"\nreport: {out / 'report.md'}")
    return report
