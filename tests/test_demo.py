"""The main job's quick variant: the whole chain on the built-in world, with its report."""

import json

import pytest
import torch

from pipelines.core.config import load_config
from pipelines.demo.config import DemoConfig
from pipelines.demo.run import run_demo, video_distances
from tests.test_evaluate import TinyI3D


def test_quick_demo_runs_the_chain_and_reports(tmp_path):
    detector = tmp_path / "i3d_torchscript.pt"  # a tiny stand-in with the I3D port's call signature
    torch.jit.script(TinyI3D().eval()).save(str(detector))
    cfg = load_config(DemoConfig, "configs/demo/quick.yaml", [f"out_dir={tmp_path}", f"metrics.i3d={detector}",
                                                              "metrics.frames_per_clip=8"])
    report = run_demo(cfg, log=lambda *a: None)
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
    assert (tmp_path / "identity_by_chunk.png").is_file() and 0.5 <= quality["shape_classifier_accuracy"] <= 1
    assert saved["total_seconds_x_peak_gflops"] == round(saved["total_seconds"]
                                                         * saved["machine"]["fp32_matmul_peak_gflops"])
    assert set(saved["targets"]) == {"autoencoder_psnr_db", "color_accuracy", "direction_accuracy",
                                     "boundary_jump_ratio", "total_seconds"}
    # every target's verdict agrees with its value and its threshold
    for name, target in saved["targets"].items():
        if name == "boundary_jump_ratio":
            jumps = quality["boundary_jump_ratio"]
            guided, replaced = jumps["reconstruction_guidance"], jumps["replacement"]
            expected = guided is not None and guided <= 2 and (replaced is None or guided <= replaced)
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


def test_without_a_detector_the_report_says_how_to_add_fvd(tmp_path):
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}"])
    distances = video_distances(cfg, {}, tmp_path, log=lambda *a: None)
    assert distances["computed"] is False and "metrics.i3d=" in distances["how"]
