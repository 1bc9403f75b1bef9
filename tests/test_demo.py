"""The main job's quick variant: the whole chain on the built-in world, and its report section by section."""

import json

import numpy as np
import pytest
import torch

from pipelines.core.config import load_config
from pipelines.demo.config import DemoConfig
from pipelines.demo.margins import MET, NOT_MET, WITHIN_NOISE, paired_difference, verdict
from pipelines.demo.run import METHODS, run_demo, video_distances
from tests.models import TinyI3D

quiet = lambda *args, **kwargs: None  # noqa: E731


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple:
    """The quick demo, run once: its config, its report and its folder."""
    tmp_path = tmp_path_factory.mktemp("demo")
    detector = tmp_path / "i3d_torchscript.pt"  # a tiny stand-in with the I3D port's call signature
    torch.jit.script(TinyI3D().eval()).save(str(detector))
    cfg = load_config(DemoConfig, "configs/demo/quick.yaml", [f"out_dir={tmp_path}", f"metrics.i3d={detector}",
                                                              "metrics.frames_per_clip=8"])
    return cfg, run_demo(cfg, log=quiet), tmp_path


def test_the_report_is_written_as_json_and_markdown(quick_demo):
    cfg, report, tmp_path = quick_demo
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("![") >= 6 and (tmp_path / "identity_by_chunk.png").is_file()
    assert all(t["what"] in markdown for t in report["targets"].values())
    for sample in report["samples"]:
        assert (tmp_path / sample["file"]).is_file()


def test_a_fresh_run_did_every_stage_and_is_timed(quick_demo):
    cfg, report, _ = quick_demo
    assert list(report["stages"]) == ["world", "autoencoder", "latents", "diffusion", "sweep", "generation",
                                      "continuation", "grading"]
    assert report["all_stages_ran"] and all(s["status"] == "run" for s in report["stages"].values())
    assert report["targets"]["wall_seconds"]["verdict"] in (MET, NOT_MET)
    assert report["wall_seconds"] >= sum(s["seconds"] for s in report["stages"].values()) > 0
    assert "total_seconds_x_peak_gflops" not in report and "fp32_matmul_peak_gflops" in report["machine"]


def test_a_rerun_into_the_same_folder_reuses_the_training_and_is_not_timed(quick_demo):
    cfg, _, tmp_path = quick_demo
    again = run_demo(cfg, log=quiet)
    stages = again["stages"]
    assert {name: stages[name]["status"] for name in ("world", "autoencoder", "latents", "diffusion")} == dict.fromkeys(
        ("world", "autoencoder", "latents", "diffusion"), "reused")
    assert stages["diffusion"]["recorded_seconds"] > 0 and not again["all_stages_ran"]
    assert again["targets"]["wall_seconds"]["verdict"] == "not timed: world, autoencoder, latents, diffusion reused"
    assert "not a timing" in (tmp_path / "report.md").read_text()


def test_the_extension_runs_switch_off_one_piece_each(quick_demo):
    cfg, report, tmp_path = quick_demo
    runs = {m: json.loads((tmp_path / "videos" / f"generation_{m}.json").read_text())["config"] for m in METHODS}
    ours, same_input, paper = (runs[m] for m in ("reconstruction", "replacement_same_input", "replacement"))
    assert ours["method"] == "reconstruction" and same_input["method"] == paper["method"] == "replacement"
    assert same_input["known_input"] == ours["known_input"] and same_input["anchor_frames"] == ours["anchor_frames"]
    assert not paper["known_input"] and paper["anchor_frames"] == 0
    assert {k: v for k, v in same_input.items() if k not in ("method", "name")} == {
        k: v for k, v in ours.items() if k not in ("method", "name")}  # the gradient is the only difference
    q = report["quality"]
    assert set(q["identity"]) == set(q["jumps"]) == set(q["per_video"]) == set(METHODS)
    for identity in q["identity"].values():  # graded per chunk, over every video of the method
        per_video = report["generation"]["chunks"]
        assert identity["chunks"] == per_video * len(cfg.generate.prompts) and len(identity["by_chunk"]) == per_video
        assert identity["identity"] <= min(identity["colour"], identity["shape"])


def test_comparisons_are_met_only_beyond_their_bootstrap_interval(quick_demo):
    _, report, _ = quick_demo
    for name, target in report["targets"].items():
        if target["target"] == "> 0":
            lo, hi = target["interval"]
            expected = MET if lo > 0 else NOT_MET if hi < 0 else WITHIN_NOISE
            assert target["verdict"] == expected and lo <= target["value"] <= hi, name
    comparisons = report["quality"]["comparisons"]
    assert {"guidance_adherence", "guidance_identity", "joins_vs_replacement",
            "joins_vs_replacement_same_input"} <= set(comparisons)


def test_threshold_targets_agree_with_their_values(quick_demo):
    _, report, _ = quick_demo
    for name, target in report["targets"].items():
        if target["target"] == "> 0" or name == "wall_seconds":
            continue
        op, threshold = target["target"].split()
        met = target["value"] is not None and (target["value"] >= float(threshold) if op == ">="
                                               else target["value"] <= float(threshold))
        assert target["verdict"] == (MET if met else NOT_MET), name


def test_the_accuracies_are_shares_of_the_videos_graded_right(quick_demo):
    _, report, _ = quick_demo
    samples, quality = report["samples"], report["quality"]
    prompts = [s["prompt"].split() for s in samples]
    colour = sum(s["colour"] == p[1] for s, p in zip(samples, prompts)) / len(prompts)
    assert quality["color_accuracy"] == pytest.approx(colour)
    assert 0 <= quality["direction_accuracy"] <= 1
    grader = quality["grader_accuracy"]
    assert set(grader) == {"world_videos", "autoencoder_reconstructions"}
    assert grader["world_videos"]["colour"] == grader["world_videos"]["shape"] == 1.0  # the world's own, every one


def test_the_guidance_sweep_grades_held_out_and_training_captions_apart(quick_demo):
    cfg, report, tmp_path = quick_demo
    sweep = report["quality"]["guidance_sweep"]
    assert [r["w"] for r in sweep["by_w"].values()] == sorted({*cfg.sweep.weights, cfg.generate.sampling.guidance})
    assert sweep["prompts"]["held_out"] == cfg.world.held_out
    assert len(sweep["prompts"]["seen"]) == cfg.sweep.seen_prompts
    assert not set(sweep["prompts"]["seen"]) & set(cfg.world.unseen)
    n = cfg.sweep.samples
    for row in sweep["by_w"].values():
        assert row["held_out"]["videos"] == n * len(cfg.world.held_out)
        assert row["all"]["videos"] == row["held_out"]["videos"] + row["seen"]["videos"] == len(
            row["per_video"]["adherence"])
        for group in ("all", "held_out", "seen"):
            assert row[group]["adherence"] <= min(row[group][k] for k in ("colour", "shape", "direction"))
    videos = n * (len(cfg.world.held_out) + cfg.sweep.seen_prompts)
    assert len(list((tmp_path / "sweep").glob("*.mp4"))) == len(sweep["by_w"]) * videos


def test_no_training_video_shows_a_held_out_or_validation_caption(quick_demo):
    cfg, _, tmp_path = quick_demo
    captions = (tmp_path / "work" / "world" / "train" / "captions.jsonl").read_text()
    assert cfg.world.validation and all(f'"{c}"' not in captions for c in cfg.world.unseen)


def test_the_long_videos_are_graded_chunk_by_chunk(quick_demo):
    cfg, report, tmp_path = quick_demo
    long = report["quality"]["long"]
    assert long["num_frames"] == cfg.long.num_frames and long["videos"] == cfg.long.prompts
    assert len(long["identity"]["by_chunk"]) == long["chunks"]
    assert len(long["jumps"]["by_boundary"]) == long["chunks"] - 1
    assert all((tmp_path / file).is_file() for file in long["files"])


def test_held_out_videos_are_continued_and_compared_with_the_truth(quick_demo):
    cfg, report, tmp_path = quick_demo
    c, cont = cfg.continuation, report["quality"]["continuation"]
    assert cont["videos"] == c.videos and len(cont["centroid_error_px"]["by_frame"]) == c.num_frames
    generated = [np.load(tmp_path / f.replace(".mp4", ".npy")) for f in cont["files"]]
    assert all(v.shape[0] == c.num_frames for v in generated)
    assert cont["centroid_error_px"]["by_frame"][0] < 1.5  # the given first frame is the truth's own
    chunks_per_video = len(cont["identity"]["by_chunk"])
    assert cont["identity"]["chunks"] == c.videos * chunks_per_video  # generated chunks only, not the given one
    assert (tmp_path / "continuation.png").is_file() and "Continuation against the truth" in (
        tmp_path / "report.md").read_text()
    assert {"continuation_identity", "continuation_error"} <= set(report["targets"])


def test_fvd_of_each_method_when_a_detector_is_given(quick_demo):
    cfg, report, _ = quick_demo
    distances = report["quality"]["video_distances"]
    assert distances["computed"] and set(distances) == {"computed", *METHODS}
    for method in METHODS:
        assert distances[method]["fvd"] > 0 and distances[method]["clips"] == len(cfg.generate.prompts)


def test_paired_margins_read_a_clear_gain_a_clear_loss_and_noise():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 64).astype(float)
    assert verdict(paired_difference(np.ones(64), base)) == MET
    assert verdict(paired_difference(base, np.ones(64))) == NOT_MET
    noise = paired_difference(rng.integers(0, 2, 64), rng.integers(0, 2, 64))
    assert verdict(noise) == WITHIN_NOISE and noise["units"] == 64
    with_nan = paired_difference([1.0, float("nan"), 2.0], [0.0, 1.0, 1.0])
    assert with_nan["units"] == 2 and with_nan["left_out"] == 1 and with_nan["difference"] == 1.0


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


def test_an_interpolated_schedule_trains_and_samples_at_low_noise_too():
    """A shift of −6 alone leaves 3 % of training and no 20-step sampling step at λ ≥ 0 (its last step jumps from
    λ ≈ −0.9 to the data); interpolated to ``shift_clean`` = −2 at the clean end, a sixth of training and the last
    steps lie there, while the noisy end keeps the shift (docs/experiments/schedule-clean-end.md)."""
    from diffusion import NoiseSchedule, ScheduleConfig

    schedule = NoiseSchedule.of(ScheduleConfig(shift=-6.0, shift_clean=-2.0))
    logsnr = schedule.logsnr(torch.linspace(0, 1, 10_001))
    assert (logsnr >= 0).float().mean() > 0.1
    assert (logsnr <= -6).float().mean() > 0.25  # high-noise training kept
    grid = schedule.grid(20)
    assert (grid[:-1] >= 0).sum() >= 2 and grid[-2] > 2
    shifted_only = NoiseSchedule.of(ScheduleConfig(shift=-6.0))
    assert shifted_only.grid(20)[-2] < 0
    assert (shifted_only.logsnr(torch.linspace(0, 1, 10_001)) >= 0).float().mean() < 0.05
