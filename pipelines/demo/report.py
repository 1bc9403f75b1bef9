"""The demo's verdicts and its ``report.md``: every target with its measured value, then the figures and pictures."""

from __future__ import annotations

from pipelines.demo.config import DemoConfig

REQUIRED = {  # name: (what it measures, threshold, at least / at most)
    "autoencoder_psnr_db": ("autoencoder PSNR (dB)", 28, ">="),
    "color_accuracy": ("colour accuracy of the generated videos", 0.8, ">="),
    "direction_accuracy": ("direction accuracy of the generated videos", 0.7, ">="),
    "identity_reconstruction": ("identity per chunk, reconstruction guidance (generate.num_frames)", 0.9, ">="),
    "identity_long": ("identity per chunk, the long videos", 0.8, ">="),
    "held_out_adherence": ("adherence on held-out captions at the default w", 0.7, ">="),
    "total_seconds": ("seconds in all", 600, "<="),
    "total_seconds_x_peak_gflops": ("seconds × fp32 matmul peak (GFLOP/s)", 60000, "<="),
}


def _compare(value, threshold: float, op: str) -> bool:
    return value is not None and (value >= threshold if op == ">=" else value <= threshold)


def targets(report: dict) -> dict[str, dict]:
    """What the demo must reach on a 2-core CPU, each with its measured value and whether it is met."""
    q = report["quality"]
    sweep, long = q["guidance_sweep"], q["long"]
    default = sweep["by_w"][f"{sweep['default']:g}"]
    values = {
        "autoencoder_psnr_db": report["autoencoder"]["psnr"],
        "color_accuracy": q["color_accuracy"],
        "direction_accuracy": q["direction_accuracy"],
        "identity_reconstruction": q["identity"]["reconstruction"]["identity"],
        "identity_long": long["identity"]["identity"] if long else None,
        "held_out_adherence": default["held_out"]["adherence"],
        "total_seconds": report["total_seconds"],
        "total_seconds_x_peak_gflops": report["total_seconds_x_peak_gflops"],
    }
    checks = {name: (what, values[name], f"{op} {threshold:g}", _compare(values[name], threshold, op))
              for name, (what, threshold, op) in REQUIRED.items()}
    jumps = q["boundary_jump_ratio"]
    guided, replaced = jumps["reconstruction_guidance"], jumps["replacement"]
    checks["boundary_jump_ratio"] = ("boundary jump ratio, reconstruction guidance", guided,
                                     "<= 1.5 and <= 0.75 × replacement", guided is not None and guided <= 1.5
                                     and (replaced is None or guided <= 0.75 * replaced))
    zero = sweep["by_w"].get("0")
    checks["guidance_helps"] = (
        "the default guidance weight against w = 0, over the sweep's prompts",
        {"w": sweep["default"], "adherence": default["all"]["adherence"], "identity": default["all"]["identity"],
         "at_w0": None if zero is None else {k: zero["all"][k] for k in ("adherence", "identity")}},
        "default w > 0, adherence and identity >= w = 0's",
        zero is not None and sweep["default"] > 0 and default["all"]["adherence"] >= zero["all"]["adherence"]
        and default["all"]["identity"] >= zero["all"]["identity"])
    return {name: {"what": what, "value": value, "target": target, "met": bool(met)}
            for name, (what, value, target, met) in checks.items()}


def _distances_line(d: dict) -> str:
    """The report's FVD line: the figures per method, or how to enable them."""
    if not d.get("computed"):
        return d["how"]
    return "; ".join(f"{m}: FVD {v['fvd']:.1f}, KVD×1000 {v['kvd_x1000']:.2f} ({v['clips']} clips vs "
                     f"{v['real_clips']} real)" for m, v in d.items() if m != "computed")


def _identity_line(summary: dict) -> str:
    return (f"{summary['identity']} (colour {summary['colour']}, shape {summary['shape']}, {summary['chunks']} "
            f"chunks)")


def _sweep_table(sweep: dict) -> list[str]:
    """One row per guidance weight: adherence and its parts on held-out and on training captions."""
    lines = ["| w | held-out: adherence | colour | shape | direction | training: adherence | colour | shape | "
             "direction |", "|---|---|---|---|---|---|---|---|---|"]
    for key, row in sorted(sweep["by_w"].items(), key=lambda kv: kv[1]["w"]):
        mark = " (default)" if row["w"] == sweep["default"] else ""
        cells = [row[g][k] for g in ("held_out", "seen") for k in ("adherence", "colour", "shape", "direction")]
        lines.append(f"| {key}{mark} | " + " | ".join(str(c) for c in cells) + " |")
    return lines


def render_report(report: dict, cfg: DemoConfig) -> str:
    """``report.md``: the figures, then the pictures."""
    q, g, a, d = report["quality"], report["generation"], report["autoencoder"], report["diffusion"]
    jumps = q["boundary_jump_ratio"]
    long, sweep, shape = q["long"], q["guidance_sweep"], q["shape_classifier_accuracy"]
    lines = [
        "# Demo report", "",
        "The whole chain on the built-in synthetic world: autoencoder → latents → text-conditioned space-time U-Net "
        "→ long videos by autoregressive extension.", "",
        "| stage | figures |", "|---|---|",
        f"| autoencoder | PSNR {a['psnr']:.2f} dB, SSIM {a['ssim']:.3f} on held-out frames; {a['steps']} steps, "
        f"{a['seconds']:.0f} s |",
        f"| diffusion | {d['steps']} steps, {d['seconds']:.0f} s, final loss {d['final_loss']:.4f} |",
        f"| guidance sweep | w in {[r['w'] for r in sweep['by_w'].values()]} on {len(sweep['prompts']['held_out'])} "
        f"held-out and {len(sweep['prompts']['seen'])} training captions × {sweep.get('samples', 1)} samples, "
        f"{sweep['num_frames']} frames each, "
        f"{sweep['seconds']:.0f} s |",
        f"| generation | {g['videos']} videos × {g['num_frames']} frames ({g['chunks']} chunks each), "
        f"{g['seconds']:.0f} s, peak RSS {g['peak_rss_mb']:.0f} MB |",
    ]
    if long:
        lines.append(f"| long videos | {long['videos']} × {long['num_frames']} frames ({long['chunks']} chunks each, "
                     f"{long['method']}), {long['seconds']:.0f} s, peak RSS {long['peak_rss_mb']:.0f} MB |")
    lines += [
        f"| quality, {g['num_frames']} frames | colour accuracy {q['color_accuracy']:.2f}, direction accuracy "
        f"{q['direction_accuracy']:.2f}; boundary jump ratio: reconstruction guidance "
        f"{jumps['reconstruction_guidance']}, replacement {jumps['replacement']} |",
        "| identity per chunk | " + "; ".join(f"{m}: {_identity_line(v)}" for m, v in q["identity"].items())
        + (f"; long videos: {_identity_line(long['identity'])}, jump ratio {long['jumps']['mean']}" if long else "")
        + " |",
        f"| shape classifier | accuracy {shape['world_videos']} on the world's own videos, "
        f"{shape['autoencoder_reconstructions']} on their autoencoder reconstructions |",
        f"| FVD / KVD | {_distances_line(q['video_distances'])} |",
        f"| total | {report['total_seconds']:.0f} s on {report['machine']['cpu']} ({report['machine']['threads']} "
        f"threads, fp32 matmul peak {report['machine']['fp32_matmul_peak_gflops']:.0f} GFLOP/s): "
        f"time × peak = {report['total_seconds_x_peak_gflops']} |",
        "",
        "Adherence: colour, shape and direction of the whole video all right. Identity per chunk: colour and shape of "
        "each generated chunk both right. Boundary jump ratio: the centroid's jump across each chunk boundary over "
        "its median frame-to-frame motion inside chunks (≈ 1: seamless). Replacement is the paper's imputation "
        "baseline: the network is not given the context frames.", "",
        "| target | what | value | required | met |", "|---|---|---|---|---|",
        *[f"| {name} | {t['what']} | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} |"
          for name, t in report["targets"].items()], "",
        "## Classifier-free guidance", "", *_sweep_table(sweep), "", "![guidance sweep](guidance_sweep.png)", "",
        f"Held-out captions (no training video shows them): {', '.join(sweep['prompts']['held_out'])}.", "",
        "## Identity by chunk", "", "![identity by chunk](identity_by_chunk.png)", "",
        "## Reconstruction guidance", "", "![reconstruction](videos/contact_sheet_reconstruction.png)", "",
        "## Replacement", "", "![replacement](videos/contact_sheet_replacement.png)", "",
    ]
    if long:
        lines += [f"## {long['num_frames']} frames", "", f"![long](videos/contact_sheet_{long['name']}.png)", ""]
    lines += [
        "## Training", "", "![autoencoder loss](work/autoencoder/loss.png)", "",
        "![autoencoder reconstructions](work/autoencoder/samples/reconstructions.png)", "",
        "![diffusion loss](work/diffusion/loss.png)", "", "## Videos", "",
        "| file | prompt | method | colour | shape | direction | jump ratio |", "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| [{s['file']}]({s['file']}) | {s['prompt']} | {s['method']} | {s['colour']} | {s['shape']} | "
              f"{s['direction']} | {s['jump_ratio']} |" for s in report["samples"]]
    if long:
        lines += [f"| [{f}]({f}) | {p} | {long['method']} | | | | |" for f, p in
                  zip(long["files"], cfg.generate.prompts)]
    return "\n".join(lines) + "\n"
