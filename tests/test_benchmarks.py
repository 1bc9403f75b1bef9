"""``benchmarks/run.py``'s figures from its absolute measurements: speed-ups per step and per FLOP side by side, and
each memory ratio with its spread over the rounds."""

import pytest

from benchmarks.run import figures, ratio_spread


def _unet(train_s: float, sample_s: float, train_gflop: float, sample_gflop: float) -> dict:
    return {"train_s": train_s, "sample_s": sample_s, "train_flops": train_gflop * 1e9,
            "sample_flops": sample_gflop * 1e9, "train_gflops_per_s": train_gflop / train_s}


def _rounds(*growth_mib) -> dict:
    """A :func:`benchmarks.run.run_interleaved` result: the largest growth, and every round's."""
    measured = [g for g in growth_mib if g is not None]
    return {"growth_mib": max(measured), "rounds_growth_mib": list(growth_mib), "seconds_per_frame": 0.1}


def test_speed_ups_per_step_and_per_flop_side_by_side():
    """Ours 250 GFLOP in 2 s against diffusers' 350 in 4 s: 2× a step, 1.43× a FLOP (250/2 against 350/4)."""
    unet = {"ours": _unet(2.0, 0.5, 250.0, 80.0), "diffusers": _unet(4.0, 1.0, 350.0, 100.0)}
    long = {"32": _rounds(100.0, 110.0, 90.0), "256": _rounds(115.0, 110.0, None)}
    vae = {out: {"16": _rounds(50.0, 40.0), "256": _rounds(55.0, 60.0)} for out in ("uint8", "float32")}
    values, spreads = figures(unet, {}, long, vae, {}, peak_gflops=250.0, dtype="fp32")
    assert values["unet_train_speedup_vs_diffusers"] == 2.0 and values["unet_sample_speedup_vs_diffusers"] == 2.0
    assert values["unet_train_speedup_per_flop_vs_diffusers"] == pytest.approx((250 / 2) / (350 / 4))
    assert values["unet_sample_speedup_per_flop_vs_diffusers"] == pytest.approx((80 / 0.5) / (100 / 1.0))
    assert (values["unet_train_gflop_ours"], values["unet_train_gflop_diffusers"]) == (250.0, 350.0)
    assert values["unet_train_utilization_fp32"] == pytest.approx(0.5)
    assert values["long_video_peak_memory_ratio_256_vs_32"] == pytest.approx(115 / 110)  # largest over largest
    assert spreads["long_video_peak_memory_ratio_256_vs_32"] == pytest.approx([1.0, 1.15])  # rounds 1 and 2 only
    assert spreads["vae_decode_peak_memory_ratio_256_vs_16"] == pytest.approx([1.1, 1.5])
    assert set(spreads) == {"long_video_peak_memory_ratio_256_vs_32", "vae_decode_peak_memory_ratio_256_vs_16",
                            "vae_decode_float32_peak_memory_ratio_256_vs_16"}
    assert ratio_spread({"rounds_growth_mib": [None]}, {"rounds_growth_mib": [1.0]}) is None


def test_continuing_given_frames_has_a_memory_ratio_of_its_own():
    unet = {"ours": _unet(2.0, 0.5, 250.0, 80.0), "diffusers": _unet(4.0, 1.0, 350.0, 100.0)}
    long = {"32": _rounds(100.0), "256": _rounds(110.0)}
    vae = {out: {"16": _rounds(50.0), "256": _rounds(55.0)} for out in ("uint8", "float32")}
    continued = {"32": _rounds(100.0, 120.0), "256": _rounds(105.0, 126.0)}
    values, spreads = figures(unet, {}, long, vae, {}, 250.0, "fp32", continued)
    assert values["continuation_peak_memory_ratio_256_vs_32"] == pytest.approx(126 / 120)
    assert spreads["continuation_peak_memory_ratio_256_vs_32"] == pytest.approx([1.05, 1.05])

