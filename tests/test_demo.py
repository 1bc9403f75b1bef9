"""The main job's quick variant: the whole chain on the built-in world, with its report."""

import dataclasses
import json

import pytest
import torch

from pipelines.core.config import load_config
from pipelines.demo.config import DemoConfig
from pipelines.demo.run import run_demo, video_distances
from tests.test_evaluate import TinyI3D


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple:
    """The quick demo, run once: its config, its report and its folder."""
    tmp_path = tmp_path_factory.mktemp("demo")
    detector = tmp_path / "i3d_torchscript.pt"  # a tiny stand-in with the I3D port's call signature
    torch.jit.script(TinyI3D().eval()).save(str(detector))
    cfg = load_config(DemoConfig, "configs/demo/quick.yaml", [f"out_dir={tmp_path}", f"metrics.i3d={detector}",
                                                              "metrics.frames_per_clip=8"])
    return cfg, run_demo(cfg, log=lambda *a: None), tmp_path


def test_quick_demo_runs_the_chain_and_reports(quick_demo):
    cfg, report, tmp_path = quick_demo
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("psnr", "ssim", "steps", "seconds"):
        assert key in saved["autoencoder"]
    assert {"steps", "seconds", "final_loss"} <= saved["diffusion"].keys()
    assert {"num_frames", "chunks", "seconds", "peak_rss_mb"} <= saved["generation"].keys()
    quality = saved["quality"]
    assert 0 <= quality["color_accuracy"] <= 1 and 0 <= quality["direction_accuracy"] <= 1
    assert set(quality["boundary_jump_ratio"]) == {"reconstruction_guidance", "replacement"}
    methods = {s["method"] for s in saved["samples"]}
    assert methods == {"reconstruction", "replacement"}
    for sample in saved["samples"]:
        assert (tmp_path / sample["file"]).is_file()
    assert saved["generation"]["num_frames"] == cfg.generate.num_frames
    manifest = json.loads((tmp_path / "work" / "latents" / "manifest.json").read_text())
    assert manifest["latent_shape"][1] == cfg.world.spec.num_frames > cfg.diffusion.data.num_frames  # windows
    runs = {m: json.loads((tmp_path / "videos" / f"generation_{m}.json").read_text())["config"]
            for m in ("reconstruction", "replacement")}
    assert runs["reconstruction"]["anchor_frames"] == cfg.generate.anchor_frames == 1  # as the default demo
    assert runs["replacement"]["anchor_frames"] == 0 and not runs["replacement"]["known_input"]  # the paper's baseline
    assert (tmp_path / "report.md").read_text().count("![") >= 4
    distances = quality["video_distances"]
    assert distances["computed"] and set(distances) == {"computed", "reconstruction", "replacement"}
    for method in ("reconstruction", "replacement"):
        assert distances[method]["fvd"] > 0 and distances[method]["clips"] == len(cfg.generate.prompts)
    assert "FVD" in (tmp_path / "report.md").read_text()
    for identity in quality["identity"].values():  # graded per chunk, over every video of the method
        per_video = saved["generation"]["chunks"]
        assert identity["chunks"] == per_video * len(cfg.generate.prompts) and len(identity["by_chunk"]) == per_video
        assert identity["identity"] <= min(identity["colour"], identity["shape"])
    assert (tmp_path / "identity_by_chunk.png").is_file() and (tmp_path / "guidance_sweep.png").is_file()
    assert set(quality["shape_classifier_accuracy"]) == {"world_videos", "autoencoder_reconstructions"}
    assert quality["shape_classifier_accuracy"]["world_videos"] == 1.0  # the world's own shapes, every one
    # the guidance sweep: every weight asked for (and the default), on the held-out and as many training captions
    sweep = quality["guidance_sweep"]
    assert [r["w"] for r in sweep["by_w"].values()] == sorted({*cfg.sweep.weights, cfg.generate.sampling.guidance})
    assert sweep["prompts"]["held_out"] == cfg.world.held_out
    assert len(sweep["prompts"]["seen"]) == cfg.sweep.seen_prompts
    assert not set(sweep["prompts"]["seen"]) & set(cfg.world.held_out)
    n = cfg.sweep.samples
    assert n == 2 and sweep["samples"] == n  # the quick config pools two samples per prompt, as the default demo
    for row in sweep["by_w"].values():
        assert row["held_out"]["videos"] == n * len(cfg.world.held_out)
        assert row["seen"]["videos"] == n * cfg.sweep.seen_prompts and row["all"]["videos"] == row["held_out"][
            "videos"] + row["seen"]["videos"]
        for group in ("all", "held_out", "seen"):
            assert row[group]["adherence"] <= min(row[group][k] for k in ("colour", "shape", "direction"))
    assert len(list((tmp_path / "sweep").glob("*.mp4"))) == len(sweep["by_w"]) * n * (len(cfg.world.held_out) + 2)
    # no training video shows a held-out caption
    captions = (tmp_path / "work" / "world" / "train" / "captions.jsonl").read_text()
    assert all(f'"{c}"' not in captions for c in cfg.world.held_out)
    # the long videos, graded chunk by chunk
    long = quality["long"]
    assert long["num_frames"] == cfg.long.num_frames and long["videos"] == cfg.long.prompts
    assert len(long["identity"]["by_chunk"]) == long["chunks"]
    assert len(long["jumps"]["by_boundary"]) == long["chunks"] - 1
    for file in long["files"]:
        assert (tmp_path / file).is_file()
    assert saved["total_seconds_x_peak_gflops"] == round(saved["total_seconds"]
                                                         * saved["machine"]["fp32_matmul_peak_gflops"])
    assert set(saved["targets"]) == {"autoencoder_psnr_db", "color_accuracy", "direction_accuracy",
                                     "identity_reconstruction", "identity_long", "held_out_adherence",
                                     "total_seconds", "total_seconds_x_peak_gflops", "boundary_jump_ratio",
                                     "guidance_helps"}
    # every target's verdict agrees with its value and its threshold
    for name, target in saved["targets"].items():
        assert target["what"] and target["what"] in (tmp_path / "report.md").read_text()
        if name == "boundary_jump_ratio":
            jumps = quality["boundary_jump_ratio"]
            guided, replaced = jumps["reconstruction_guidance"], jumps["replacement"]
            expected = guided is not None and guided <= 1.5 and (replaced is None or guided <= 0.75 * replaced)
        elif name == "guidance_helps":
            value = target["value"]
            expected = (value["w"] > 0 and value["adherence"] >= value["at_w0"]["adherence"]
                        and value["identity"] >= value["at_w0"]["identity"])
        else:
            op, threshold = target["target"].split()
            expected = target["value"] >= float(threshold) if op == ">=" else target["value"] <= float(threshold)
        assert target["met"] is expected, name
    # the accuracies are the share of videos graded right
    prompts = [s["prompt"].split() for s in saved["samples"]]
    colour = sum(s["colour"] == p[1] for s, p in zip(saved["samples"], prompts)) / len(prompts)
    direction = sum(s["direction"] == p[-1] for s, p in zip(saved["samples"], prompts)) / len(prompts)
    assert quality["color_accuracy"] == pytest.approx(colour)
    assert quality["direction_accuracy"] == pytest.approx(direction)


def test_extension_options_are_compared_on_the_same_prompts(quick_demo, tmp_path):
    """benchmarks/extension_options.py on the trained quick demo: every variant graded, the options applied."""
    from benchmarks.demo.extension_options import compare_extensions

    cfg = quick_demo[0]
    rows = compare_extensions(cfg, ["baseline", "context_8"], tmp_path / "options", log=lambda *a: None)
    assert [r["variant"] for r in rows] == ["baseline", "context_8"]
    for row in rows:
        assert 0 <= row["identity"] <= min(row["colour"], row["shape"]) and row["jump_ratio"] is not None
        saved = json.loads(next((tmp_path / "options" / row["variant"]).glob("generation_*.json")).read_text())
        assert saved["context_frames"] == (8 if row["variant"] == "context_8" else cfg.generate.context_frames)
    pooled = compare_extensions(cfg, ["guidance_only"], tmp_path / "seeds", seeds=(0, 1), log=lambda *a: None)[0]
    runs = [json.loads(next((tmp_path / "seeds" / "guidance_only" / f"seed{s}").glob("generation_*.json")).read_text())
            for s in (0, 1)]
    assert [r["config"]["seed"] for r in runs] == [0, 1] and pooled["seeds"] == [0, 1]
    assert not any(r["config"]["known_input"] for r in runs)  # the quick demo's network has known frames
    assert len(pooled["by_chunk"]) == runs[0]["chunks"]


def test_first_chunks_grade_every_prompt_and_seed_and_count_wrong_frames(quick_demo, tmp_path):
    """benchmarks/first_chunks.py: a world clip graded against its own caption is right in every frame; against
    another shape's caption every frame is wrong; on the quick demo every prompt's chunk under every seed."""
    import numpy as np

    from benchmarks.demo.first_chunks import grade_chunk, measure, summarise
    from pipelines.demo.run import sweep_prompts, wire
    from pipelines.world.synthetic import WorldParams, render_clip

    clip = render_clip(WorldParams("square", "red", "left", 16.0, 16.0, 2.0))
    right, wrong = grade_chunk(clip, "a red square moving left"), grade_chunk(clip, "a red circle moving left")
    assert right["identity"] and right["wrong_shape_frames"] == right["wrong_colour_frames"] == 0
    assert not wrong["identity"] and wrong["wrong_shape_frames"] == len(clip) and wrong["wrong_colour_frames"] == 0
    summary = summarise([right, wrong], held_out={"a red circle moving left"})
    assert summary["identity"] == 0.5 and summary["held_out_identity"] == 0.0
    assert summary["wrong_shape_frames"] == 0.5 and summary["wrong"] == {"red circle moving left -> red square": 1}

    cfg = quick_demo[0]
    row = measure(wire(cfg), (0, 1), tmp_path / "chunks")
    assert row["seeds"] == [0, 1] and row["chunks"] == 2 * row["prompts"]
    held_out, seen = sweep_prompts(cfg)
    assert row["prompts"] == len({*cfg.generate.prompts, *held_out, *seen})
    assert 0 <= row["identity"] <= 1 and np.isfinite(row["wrong_shape_frames"])
    assert sum(row["wrong"].values()) == round((1 - row["identity"]) * row["chunks"])


def test_without_a_detector_the_report_says_how_to_add_fvd(tmp_path):
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}"])
    distances = video_distances(cfg, {}, tmp_path, log=lambda *a: None)
    assert distances["computed"] is False and "metrics.i3d=" in distances["how"]


def test_training_processes_split_the_batch_and_refuse_a_split_that_does_not_divide(monkeypatch):
    from pipelines.core.config import ConfigError
    from pipelines.demo.run import per_process, training_processes

    cfg = load_config(DemoConfig, "configs/demo/default.yaml", ["processes=4"])
    assert training_processes(cfg) == 4 and per_process(cfg.diffusion, 4).run.batch_size == 16 // 4
    with pytest.raises(ConfigError, match="divisor of diffusion.run.batch_size"):
        training_processes(load_config(DemoConfig, "configs/demo/default.yaml", ["processes=3"]))
    auto = load_config(DemoConfig, "configs/demo/default.yaml", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert training_processes(auto) == 2  # a CPU machine with two cores: two single-threaded processes
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert training_processes(auto) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    odd = load_config(DemoConfig, "configs/demo/default.yaml", ["diffusion.run.batch_size=15"])
    assert training_processes(odd) == 1  # auto never splits a batch unevenly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_processes(auto) == 1  # one GPU: one process


def test_the_demos_schedule_trains_and_samples_at_low_noise_too():
    """The demo's shift of −6 alone left 3 % of training and no sampling step at λ ≥ 0 (its last DDIM step jumped
    from λ ≈ −0.9 to the data, and squares came out round); interpolated to ``shift_clean`` at the clean end, a
    sixth of training and the last steps lie there, while the noisy end keeps the shift (README, "Training at low
    noise too")."""
    from diffusion import NoiseSchedule

    cfg = load_config(DemoConfig, "configs/demo/default.yaml", [])
    schedule = NoiseSchedule.of(cfg.diffusion.model.schedule)
    logsnr = schedule.logsnr(torch.linspace(0, 1, 10_001))
    assert (logsnr >= 0).float().mean() > 0.1
    assert (logsnr <= -6).float().mean() > 0.25  # the high-noise training the direction prior needs
    grid = schedule.grid(cfg.generate.sampling.steps)
    assert (grid[:-1] >= 0).sum() >= 2 and grid[-2] > 2
    shifted_only = NoiseSchedule.of(dataclasses.replace(cfg.diffusion.model.schedule, shift_clean=None))
    assert shifted_only.grid(cfg.generate.sampling.steps)[-2] < 0  # what it replaced
