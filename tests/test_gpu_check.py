"""``benchmarks/gpu_check.py``: every section at toy size on the CPU, so the prepared GPU check cannot rot; and the
memory comment in ``configs/diffusion/gpu.yaml`` against the estimate it cites."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import memory_estimate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_at_toy_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no threads to wait on
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--toy", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    sections = ("environment", "memory_estimate", "attention", "unet_steps", "training", "determinism", "chain",
                "compile")
    assert all(name in report for name in sections)
    assert {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v} == {}
    assert report["attention"]["all_agree"] and report["attention"]["unavailable"] == ["xformers"]  # no CUDA here
    cases = report["unet_steps"]["cases"]
    assert len(cases) == 8 and all(not c["oom"] and c["ms_per_step"] > 0 and c["tflop_per_step"] > 0 for c in cases)
    training = report["training"]
    assert training["losses_finite"] and training["summary"]["steps"] == 4 and training["summary"]["skipped_steps"] == 0
    assert all(row["samples_per_s"] > 0 and row["tflops_per_s"] > 0 for row in training["rows"])
    assert report["determinism"]["deterministic_true"]["bitwise_equal"]
    chain = report["chain"]
    assert chain["resumed_equals_uninterrupted"]["bitwise_equal"] and chain["generated"]["files_exist"]
    assert chain["latents"]["clips"] == 12 and chain["latents"]["fingerprint_vae_dtype"] == "float32"  # a CPU's
    assert report["compile"]["worst_gradient_relative_difference"] < 1e-5


def test_gpu_yaml_states_the_memory_its_estimate_counts():
    """The comment beside gpu.yaml's batch is the estimate's (on fake tensors: seconds, no memory), and the batch
    fits."""
    estimate = memory_estimate()
    lines = (ROOT / "configs" / "diffusion" / "gpu.yaml").read_text().splitlines()
    comment = " ".join(line.split("#", 1)[1].strip() for line in lines if "#" in line)
    assert f"{estimate['parameters_m']} M parameters" in comment
    assert f"take {estimate['weights_grads_adamw_ema_gb']:.0f} GB" in comment
    assert f"are {estimate['activations_per_sample_gb']:.1f} GB, plus {estimate['activations_fixed_gb']:.1f} GB" \
        in comment
    assert f"batch 8 needs about {estimate['batch_8_gb']:.0f} GB of 80" in comment
    assert estimate["largest_batch_in_80_gb"] >= 8
