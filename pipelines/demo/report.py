"""The demo's verdicts and its ``report.md``: every target with what it measured, on which run, with its margin,
then the figures and the pictures."""

from __future__ import annotations

from pipelines.demo.config import DemoConfig, TargetsConfig
from pipelines.demo.margins import MET, NOT_MET, mean_interval, verdict


def _threshold(what: str, value, threshold: float, op: str, interval=None) -> dict:
    met = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"what": what, "value": value, "target": f"{op} {threshold:g}", "verdict": MET if met else NOT_MET,
            "interval": interval}


def _comparison(what: str, comparison: dict | None, target: str) -> dict:
    if comparison is None:
        return {"what": what, "value": None, "target": target, "verdict": NOT_MET, "interval": None}
    return {"what": what, "value": comparison["difference"], "target": target, "verdict": verdict(comparison),
            "interval": comparison["interval"], "units": comparison["units"]}


def targets(report: dict, t: TargetsConfig) -> dict[str, dict]:
    """Each target's measured value and verdict: ``met`` / ``not met`` against a threshold, and for comparisons
    ``met`` only when the 95 % bootstrap interval of the paired difference lies above zero (``within noise``
    otherwise). The time is judged only on a run that did every stage itself ("not timed: reused")."""
    q = report["quality"]
    sweep, long, cont, comp = q["guidance_sweep"], q["long"], q["continuation"], q["comparisons"]
    default = sweep["by_w"][f"{sweep['default']:g}"]
    ours = q["per_video"]["reconstruction"]
    checks = {
        "autoencoder_psnr_db": _threshold("autoencoder PSNR on held-out frames (dB)", report["autoencoder"]["psnr"],
                                          t.autoencoder_psnr_db, ">="),
        "color_accuracy": _threshold("colour accuracy of the extended videos", q["color_accuracy"], t.color_accuracy,
                                     ">="),
        "direction_accuracy": _threshold("direction accuracy of the extended videos, every chunk",
                                         q["direction_accuracy"], t.direction_accuracy, ">="),
        "identity": _threshold("identity per chunk, reconstruction guidance",
                               q["identity"]["reconstruction"]["identity"], t.identity, ">=",
                               mean_interval(ours["identity"])),
        "held_out_adherence": _threshold("adherence on held-out captions at the default w",
                                         default["held_out"]["adherence"], t.held_out_adherence, ">="),
        "jump_ratio": _threshold("mean join (jump ratio), reconstruction guidance, vanished objects counted",
                                 _mean(ours["joins"]), t.jump_ratio, "<=", mean_interval(_values(ours["joins"]))),
        "joins_beat_replacement": _comparison("joins smoother than the paper's replacement baseline "
                                              "(its jump ratio minus ours)", comp.get("joins_vs_replacement"), "> 0"),
        "gradient_helps_joins": _comparison("joins smoother than replacement with the same network input "
                                            "(the reconstruction gradient alone)",
                                            comp.get("joins_vs_replacement_same_input"), "> 0"),
        "guidance_helps": _comparison("adherence at the default w minus at w = 0, over the sweep's prompts",
                                      comp.get("guidance_adherence"), "> 0"),
    }
    if long:
        checks["identity_long"] = _threshold("identity per chunk, the long videos", long["identity"]["identity"],
                                             t.identity_long, ">=")
    if cont:
        checks["continuation_identity"] = _threshold("continued held-out videos: chunks keeping the given object",
                                                     cont["identity"]["identity"], t.continuation_identity, ">=")
        error = cont["centroid_error_px"]
        checks["continuation_error"] = _threshold(
            f"continued held-out videos: centroid error at frame {error['frame']} (px; the object is "
            f"{cont['object_size_px']:g} px)", error["at_frame"], cont["object_size_px"], "<=")
    timed = _threshold("wall seconds of the whole run", report["wall_seconds"], t.wall_seconds, "<=")
    if not report["all_stages_ran"]:
        reused = [name for name, s in report["stages"].items() if s["status"] != "run"]
        timed["verdict"] = f"not timed: {', '.join(reused)} reused"
    checks["wall_seconds"] = timed
    return checks


def _values(values: list) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _mean(values: list) -> float | None:
    finite = [v for v in _values(values) if v == v]
    return round(sum(finite) / len(finite), 4) if finite else None


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


def _stages_table(report: dict) -> list[str]:
    """Which stages this run did itself, and their seconds (a reused stage's recorded training time beside)."""
    lines = ["| stage | status | seconds here | training seconds recorded |", "|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {s.get('recorded_seconds', '')} |")
    return lines


def _targets_table(report: dict) -> list[str]:
    lines = ["| target | what | value | 95 % interval | required | verdict |", "|---|---|---|---|---|---|"]
    for name, t in report["targets"].items():
        shown = t["verdict"] if t["verdict"] == MET else f"**{t['verdict']}**"
        interval = "" if t["interval"] is None else f"[{t['interval'][0]}, {t['interval'][1]}]"
        lines.append(f"| {name} | {t['what']} | {t['value']} | {interval} | {t['target']} | {shown} |")
    return lines


def _methods_table(q: dict) -> list[str]:
    lines = ["| method | what it is | identity per chunk | mean join | failed joins | adherence |",
             "|---|---|---|---|---|---|"]
    for method, what in q["methods"].items():
        j = q["jumps"][method]
        lines.append(f"| {method} | {what} | {q['identity'][method]['identity']} | {j['mean']} | "
                     f"{j['failed_joins']} of {j['joins']} | {q['adherence'][method]['adherence']} |")
    return lines


def _continuation_lines(cont: dict | None) -> list[str]:
    if not cont:
        return []
    error = cont["centroid_error_px"]
    by = error["by_frame"]
    horizon = " · ".join(f"{k}: {by[k]}" for k in range(0, len(by), 8))
    return [
        "## Continuation against the truth", "",
        f"{cont['videos']} held-out world videos, rendered to {cont['num_frames']} frames by the world's motion rule; "
        f"the model is given their first {cont['given_frames']} frames and draws the rest "
        f"({cont['seconds']:.0f} s). Identity per generated chunk against the given object: "
        f"{_identity_line(cont['identity'])}. Centroid error (px, the object is {cont['object_size_px']:g} px; a "
        f"vanished object counts as the frame's diagonal), mean over videos by frame: {horizon}; at frame "
        f"{error['frame']}: {error['at_frame']} ({error['within_object_at_frame']} of the videos within the "
        f"object's size). Joins: mean {cont['jumps']['mean']}, failed {cont['jumps']['failed_joins']} of "
        f"{cont['jumps']['joins']}.", "",
        "Each pair of rows: the truth above, the continuation below.", "",
        "![continuation](continuation.png)", "",
    ]


def render_report(report: dict, cfg: DemoConfig) -> str:
    """``report.md``: the stages, the targets, then the figures and the pictures."""
    q, g, a, d = report["quality"], report["generation"], report["autoencoder"], report["diffusion"]
    long, sweep, grader = q["long"], q["guidance_sweep"], q["grader_accuracy"]
    machine = report["machine"]
    lines = [
        "# Demo report", "",
        "The whole chain on the built-in synthetic world: autoencoder → latents → text-conditioned space-time U-Net "
        "→ long videos by autoregressive extension, and held-out videos continued from their first frames.", "",
        f"Machine: {machine['cpu']}, {machine['threads']} threads, fp32 matmul peak "
        f"{machine['fp32_matmul_peak_gflops']:.0f} GFLOP/s measured at the start. This run: "
        f"{report['wall_seconds']:.0f} s wall"
        + ("." if report["all_stages_ran"] else ", with stages reused from an earlier run (below): not a timing."),
        "", *_stages_table(report), "",
        "## Targets", "",
        "A comparison is the mean paired difference over the same prompts and seeds; it is met only when its 95 % "
        "bootstrap interval lies above zero, and reads *within noise* when the interval straddles zero.", "",
        *_targets_table(report), "",
        "| stage | figures |", "|---|---|",
        f"| autoencoder | PSNR {a['psnr']:.2f} dB, SSIM {a['ssim']:.3f} on held-out frames; {a['steps']} steps |",
        f"| diffusion | {d['steps']} steps, final loss {d['final_loss']:.4f} |",
        f"| guidance sweep | w in {[r['w'] for r in sweep['by_w'].values()]} on {len(sweep['prompts']['held_out'])} "
        f"held-out and {len(sweep['prompts']['seen'])} training captions × {sweep['samples']} samples, "
        f"{sweep['num_frames']} frames each |",
        f"| generation | {g['videos']} videos × {g['num_frames']} frames ({g['chunks']} chunks each), "
        f"{g['seconds']:.0f} s, peak RSS {g['peak_rss_mb']:.0f} MB |",
    ]
    if long:
        lines.append(f"| long videos | {long['videos']} × {long['num_frames']} frames ({long['chunks']} chunks each, "
                     f"{long['method']}): identity {_identity_line(long['identity'])}, mean join "
                     f"{long['jumps']['mean']}; {long['seconds']:.0f} s, peak RSS {long['peak_rss_mb']:.0f} MB |")
    lines += [
        "| grader | its own accuracy on the world's videos (and on their autoencoder reconstructions): "
        + ", ".join(f"{k.replace('_', ' ')} {grader['world_videos'][k]} ({grader['autoencoder_reconstructions'][k]})"
                    for k in ("colour", "shape", "direction_per_chunk", "identity_per_chunk")) + " |",
        f"| FVD / KVD | {_distances_line(q['video_distances'])} |",
        "",
        "Adherence: colour, shape and direction (every chunk, bounces included) all right. Identity per chunk: colour "
        "and shape of each generated chunk both right. Join (jump ratio): the centroid's jump across a chunk "
        "boundary over its median motion inside chunks (≈ 1: seamless); a join where the object vanished counts as "
        "failed (and as a jump of 10 in the means).", "",
        "## Extension: what each piece does", "", *_methods_table(q), "",
        *_continuation_lines(q["continuation"]),
        "## Classifier-free guidance", "", *_sweep_table(sweep), "", "![guidance sweep](guidance_sweep.png)", "",
        f"Held-out captions (no training video shows them; nothing was chosen on them): "
        f"{', '.join(sweep['prompts']['held_out'])}.", "",
        "## Identity by chunk", "", "![identity by chunk](identity_by_chunk.png)", "",
        "## Reconstruction guidance", "", "![reconstruction](videos/contact_sheet_reconstruction.png)", "",
        "## Replacement (the paper's baseline)", "", "![replacement](videos/contact_sheet_replacement.png)", "",
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

