"""Interleaved rounds for side-by-side benchmarks: every variant measured once per round, in turn, so the
machine's drift in speed (about ±20 % over minutes here) reaches every variant alike, with the fp32 matmul peak
measured before and after each round."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipelines.core.devices import matmul_peak_gflops


def interleaved_rounds(variants: Sequence[str], measure: Callable[[str], dict], rounds: int,
                       describe: Callable[[str, dict], str]) -> tuple[dict[str, list[dict]], list[float]]:
    """``measure(variant)`` for every variant, ``rounds`` times in turn, printing ``describe(variant, result)``
    after each; returns the results per variant (in round order) and the peaks (GFLOP/s) around the rounds."""
    peaks = [matmul_peak_gflops()["fp32_matmul_peak_gflops"]]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for variant in variants:
            result = measure(variant)
            results[variant].append(result)
            print(f"round {round_ + 1}: {describe(variant, result)}", flush=True)
        peaks.append(matmul_peak_gflops()["fp32_matmul_peak_gflops"])
    return results, peaks
