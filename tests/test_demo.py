"""The main job's quick variant: the whole chain on the built-in world, with its report."""

import json

from pipelines.core.config import load_config
from pipelines.demo.config import DemoConfig
from pipelines.demo.run import run_demo


def test_quick_demo_runs_the_chain_and_reports(tmp_path):
    cfg = load_config(DemoConfig, "configs/demo/quick.yaml", [f"out_dir={tmp_path}"])
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
    assert set(saved["targets"]) == {"autoencoder_psnr_db", "color_accuracy", "direction_accuracy",
                                     "boundary_jump_ratio", "total_seconds"}
