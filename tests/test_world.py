"""The procedural world: determinism, coverage, bouncing, and an analyser that reads its videos back: direction
chunk by chunk through the bounces, vanished objects as failures, and its own accuracy on the world's videos."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipelines.media.config import ClipSpec
from pipelines.media.datasets import VideoClipDataset
from pipelines.media.video_io import read_frames
from pipelines.world.config import MIN_RUN_FRAMES, WorldSpec
from pipelines.world.synthetic import (
    COLOURS,
    COMBOS,
    WorldParams,
    analyse_video,
    boundary_jump_ratio,
    centres,
    centroid_track,
    classify_colour,
    make_world,
    motion_direction,
    parse_caption,
    render_clip,
    sample_world_params,
    world_params,
)

SPEC = WorldSpec(size=32, num_frames=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 48-video world on disk (real MP4s) and its records."""
    out = tmp_path_factory.mktemp("world")
    return out, make_world(out, 48, SPEC, seed=0)


def _score(clips) -> dict[str, int]:
    """How many of ``(frames, caption)`` pairs the analyser gets right, per attribute."""
    results = [analyse_video(frames, caption) for frames, caption in clips]
    return {key: sum(r[f"{key}_correct"] for r in results) for key in ("colour", "shape", "direction")}


def test_rendering_and_sampling_are_deterministic_by_seed():
    first = sample_world_params(np.random.default_rng(7), SPEC)
    assert sample_world_params(np.random.default_rng(7), SPEC) == first
    assert sample_world_params(np.random.default_rng(8), SPEC) != first
    np.testing.assert_array_equal(render_clip(first, SPEC), render_clip(first, SPEC))
    assert world_params(5, SPEC, seed=1) == world_params(5, SPEC, seed=1)
    assert world_params(5, SPEC, seed=1) != world_params(5, SPEC, seed=2)
    assert world_params(5, SPEC, split="train") != world_params(5, SPEC, split="eval")


def test_clips_show_one_saturated_shape_on_black():
    params = WorldParams("square", "green", "right", x0=10.0, y0=16.0, speed=1.5)
    frames = render_clip(params, SPEC)
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == np.uint8
    assert params.caption == "a green square moving right"
    lit = frames.max(axis=-1) > 0
    assert np.all(frames[0, 0] == 0) and 0.05 < lit.mean() < 0.2  # a 9.6-pixel square in a 32 x 32 frame
    np.testing.assert_array_equal(frames[0, 16, 10], COLOURS["green"])  # the centre is fully covered


def test_shapes_bounce_and_stay_inside():
    params = WorldParams("circle", "red", "left", x0=8.0, y0=16.0, speed=2.0)
    spec = replace(SPEC, num_frames=24)
    x = centres(params, spec)[:, 0]
    half = spec.shape_size * spec.size / 2
    assert x.min() >= half - 1e-9 and x.max() <= spec.size - half + 1e-9
    steps = np.diff(x)
    assert steps[0] < 0 and (steps > 0).any()  # starts left, bounces off the left wall
    np.testing.assert_allclose(np.abs(steps[steps != 0]).max(), 2.0)
    area = render_clip(params, spec)[..., 0].astype(float).sum(axis=(1, 2))  # red channel ~ covered area
    np.testing.assert_allclose(area, area[0], rtol=0.03)  # never cut off by a wall


def test_every_sampled_clip_runs_before_its_first_bounce():
    rng = np.random.default_rng(0)
    for _ in range(200):
        params = sample_world_params(rng, SPEC)
        steps = np.diff(centres(params, replace(SPEC, num_frames=MIN_RUN_FRAMES + 1)), axis=0)
        np.testing.assert_allclose(np.linalg.norm(steps, axis=1), params.speed)


def test_a_48_video_world_covers_every_combination_once(world):
    out, records = world
    combos = {tuple(parse_caption(r["caption"]).values()) for r in records}
    assert len(records) == 48 and combos == set(COMBOS)
    assert sorted(p.name for p in (out / "train").glob("*.mp4")) == [f"{i:05d}.mp4" for i in range(48)]
    manifest = [json.loads(line) for line in (out / "train" / "captions.jsonl").read_text().splitlines()]
    assert manifest == [_written(r) for r in records] and manifest[3]["params"] == vars(world_params(3, SPEC))
    assert all(r["rendered"] for r in records)  # the first call rendered every video


def _written(record: dict) -> dict:
    """A record as the manifest holds it (``rendered`` is only returned)."""
    return {k: v for k, v in record.items() if k != "rendered"}


def test_make_world_is_idempotent_and_deterministic(world, tmp_path):
    out, records = world
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.mp4")}
    again = make_world(out, 48, SPEC, seed=0)
    assert [_written(r) for r in again] == [_written(r) for r in records] and not any(r["rendered"] for r in again)
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.mp4")
    } == stamps  # nothing rewritten
    fewer = make_world(tmp_path, 6, SPEC, seed=0)
    assert fewer == records[:6]  # video i does not depend on how many there are (rendered here too)
    same_video = read_frames(tmp_path / "train" / "00005.mp4"), read_frames(out / "train" / "00005.mp4")
    np.testing.assert_array_equal(*same_video)
    names = [f"{i:05d}.mp4" for i in range(6)]  # rendered twice, in two folders: the same files, byte for byte
    assert [(tmp_path / "train" / n).read_bytes() for n in names] == [(out / "train" / n).read_bytes() for n in names]
    assert [_written(r) for r in make_world(tmp_path, 4, SPEC, seed=0)] == [_written(r) for r in records[:4]]
    assert sorted(p.name for p in (tmp_path / "train").glob("*.mp4")) == [f"{i:05d}.mp4" for i in range(4)]


def test_make_world_rerenders_when_the_spec_changes(tmp_path):
    make_world(tmp_path, 3, SPEC, seed=0)
    bigger = replace(SPEC, size=48)
    make_world(tmp_path, 3, bigger, seed=0)
    assert read_frames(tmp_path / "train" / "00002.mp4").shape == (16, 48, 48, 3)


def test_analyser_recovers_colour_shape_and_direction_of_rendered_clips():
    clips = [(render_clip(p, SPEC), p.caption) for p in (world_params(i, SPEC, seed=3) for i in range(48))]
    assert _score(clips) == {"colour": 48, "shape": 48, "direction": 48}


def test_shape_classifier_survives_blur_and_keeps_its_margins():
    """The shape features of the world's own clips fall in disjoint ranges, apart by a wide margin on both sides
    of each threshold, and a blur like an autoencoder's (σ = 0.8 px) changes no answer."""
    from scipy.ndimage import gaussian_filter

    from pipelines.world.synthetic import SQUARE_KURTOSIS_GAP, TRIANGLE_SKEW, classify_shape, shape_features

    params = [world_params(i, SPEC, seed=5) for i in range(96)]
    features = {shape: [] for shape in ("circle", "square", "triangle")}
    for p in params:
        clip = render_clip(p, SPEC)
        blurred = gaussian_filter(clip.astype(float), sigma=(0, 0.8, 0.8, 0)).round().astype(np.uint8)
        assert classify_shape(clip) == classify_shape(blurred) == p.shape, p
        per_frame = shape_features(clip.max(axis=-1))
        features[p.shape] += list(per_frame[~np.isnan(per_frame).any(axis=1)])
    skew = {s: np.array(v)[:, 0] for s, v in features.items()}
    gap = {s: np.array(v)[:, 1] for s, v in features.items()}
    assert skew["triangle"].max() < TRIANGLE_SKEW - 0.1 < TRIANGLE_SKEW + 0.1 < min(skew["circle"].min(),
                                                                                     skew["square"].min())
    assert np.median(gap["circle"]) < SQUARE_KURTOSIS_GAP - 0.15 < SQUARE_KURTOSIS_GAP + 0.15 < np.median(gap["square"])


def _bounces(params: WorldParams, spec: WorldSpec = SPEC) -> bool:
    """Whether the clip of ``params`` changes direction within its frames."""
    steps = np.diff(centres(params, spec), axis=0)
    return bool((np.sign(steps) != np.sign(steps[0])).any())


def test_the_world_data_includes_mid_clip_bounces_and_the_analyser_handles_them():
    params = [world_params(i, SPEC, seed=3) for i in range(48)]
    bouncing = [p for p in params if _bounces(p)]
    assert len(bouncing) >= 12  # plenty of clips turn around mid-clip
    score = _score([(render_clip(p, SPEC), p.caption) for p in bouncing])
    assert score == {"colour": len(bouncing), "shape": len(bouncing), "direction": len(bouncing)}


def test_mp4_round_trip_still_analyses_correctly(world):
    out, records = world
    clips = [(read_frames(out / "train" / r["path"]), r["caption"]) for r in records]
    assert _score(clips) == {"colour": 48, "shape": 48, "direction": 48}


def test_analyser_takes_float_videos_from_the_dataset(world):
    out, records = world
    dataset = VideoClipDataset(out / "train", ClipSpec(num_frames=16, size=32, start="first"))
    item = dataset[0]
    assert item["caption"] == records[0]["caption"]  # captions.jsonl is picked up by itself
    result = analyse_video(item["video"], item["caption"])  # [3, f, h, w] in [-1, 1]
    assert result["colour_correct"] and result["direction_correct"] and result["track"].shape == (16, 2)


def test_centroid_track_follows_the_shape_and_is_nan_when_absent():
    params = WorldParams("circle", "blue", "down", x0=12.0, y0=8.0, speed=1.0)
    frames = render_clip(params, SPEC)
    frames[5] = 0
    track = centroid_track(frames)
    assert np.isnan(track[5]).all()
    ok = np.arange(16) != 5
    np.testing.assert_allclose(track[ok], centres(params, SPEC)[ok], atol=0.15)
    assert motion_direction(track) == "down"
    assert classify_colour(np.zeros((4, 8, 8, 3), np.uint8)) == "none"
    assert motion_direction(np.full((6, 2), 3.0)) == "none"


def test_jump_ratio_is_one_for_continuous_motion_and_large_for_spliced_clips():
    left = WorldParams("square", "yellow", "right", x0=6.0, y0=8.0, speed=1.5)
    right = WorldParams("square", "yellow", "right", x0=20.0, y0=24.0, speed=1.5)
    continuous = centroid_track(render_clip(left, SPEC))  # no bounce before frame 14
    assert boundary_jump_ratio(continuous, [8]) == pytest.approx(1.0, abs=0.2)
    spliced = np.concatenate([render_clip(left, SPEC)[:8], render_clip(right, SPEC)[8:]])
    result = analyse_video(spliced, boundaries=[8])
    assert result["jump_ratio"] > 3
    ratios = [
        boundary_jump_ratio(centroid_track(render_clip(world_params(i, SPEC), SPEC)), [8]) for i in range(48)
    ]
    assert np.median(ratios) == pytest.approx(1.0, abs=0.1)  # over random clips, bounces included
    assert np.isnan(boundary_jump_ratio(continuous, []))


def test_parse_caption():
    assert parse_caption("a red triangle moving up") == {
        "colour": "red",
        "shape": "triangle",
        "direction": "up",
    }
    with pytest.raises(ValueError):
        parse_caption("a purple circle moving up")


def test_analyse_video_with_float_tensor_input():
    params = WorldParams("triangle", "red", "up", x0=16.0, y0=24.0, speed=1.2)
    video = torch.from_numpy(render_clip(params, SPEC)).permute(3, 0, 1, 2).float() / 127.5 - 1
    result = analyse_video(video, params.caption)
    assert (result["colour"], result["shape"], result["direction"]) == ("red", "triangle", "up")


def test_identity_is_graded_per_chunk():
    """A video whose second chunk shows another object: the first chunk is right, the second wrong on both."""
    from pipelines.world.synthetic import chunk_identity, render_clip

    spec = WorldSpec(size=32, num_frames=16)
    red_circle = render_clip(WorldParams("circle", "red", "right", 16.0, 16.0, 1.0), spec)
    blue_square = render_clip(WorldParams("square", "blue", "right", 16.0, 16.0, 1.0), spec)
    video = np.concatenate([red_circle[:8], blue_square[8:]])
    chunks = chunk_identity(video, "a red circle moving right", [8])
    assert [c["identity"] for c in chunks] == [True, False]
    assert chunks[1]["colour"] == "blue" and chunks[1]["shape"] == "square"
    assert [c["identity"] for c in chunk_identity(red_circle, "a red circle moving right", [6, 12])] == [True] * 3
    result = analyse_video(video, "a red circle moving right", [8])
    assert len(result["chunks"]) == 2


def test_held_out_captions_never_appear_and_every_word_is_still_seen(tmp_path):
    from pipelines.world.synthetic import training_combos

    held_out = ["a red square moving left", "a blue circle moving up"]
    records = make_world(tmp_path, 92, SPEC, seed=0, held_out=held_out)
    captions = [r["caption"] for r in records]
    assert not set(captions) & set(held_out)
    assert len(set(captions)) == 46 and all(captions.count(c) == 2 for c in set(captions))  # 2 cycles of 46
    assert json.loads((tmp_path / "train" / "world.json").read_text())["held_out"] == sorted(held_out)
    assert len(training_combos(held_out)) == 46 and training_combos() == COMBOS
    every_circle = [f"a {c} circle moving {d}" for c in ("red", "green", "blue", "yellow")
                    for d in ("left", "right", "up", "down")]
    with pytest.raises(ValueError, match="circle"):
        training_combos(every_circle)
    with pytest.raises(ValueError, match="not a world caption"):
        training_combos(["a purple circle moving left"])


def test_boundary_jumps_are_given_per_boundary():
    from pipelines.world.synthetic import boundary_jumps

    track = np.stack([np.arange(12.0), np.zeros(12)], axis=1)  # 1 px a frame
    track[6:] += [4.0, 0.0]  # a jump of 5 px into frame 6
    track[9, :] = np.nan  # the object is gone in frame 9
    jumps = boundary_jumps(track, [3, 6, 9])
    assert jumps == [1.0, 5.0, float("inf")]  # a join with the object missing on a side failed
    assert boundary_jump_ratio(track, [3, 6, 9]) == 3.0  # mean over the boundaries where the object is seen


def test_shape_features_are_per_frame_and_skip_unlit_frames():
    """The features of a video's frames, computed together, are each frame's alone (each frame has its own
    brightness threshold), unlit frames are NaN and left out of the vote, and a dark video has no shape."""
    from pipelines.world.synthetic import classify_shape, shape_features

    p = next(q for q in (world_params(i, SPEC, seed=5) for i in range(40)) if q.shape == "triangle")
    clip = render_clip(p, SPEC)
    clip[1] //= 3  # a dimmer frame: a video-wide threshold would cut its object differently
    clip[2] = 0  # nothing lit
    together = shape_features(clip.max(axis=-1))
    alone = np.concatenate([shape_features(frame.max(axis=-1)[None]) for frame in clip])
    np.testing.assert_allclose(together, alone, rtol=1e-12)
    assert np.isnan(together[2]).all() and not np.isnan(np.delete(together, 2, axis=0)).any()
    assert classify_shape(clip) == "triangle"
    assert classify_shape(np.zeros_like(clip)) == "none"


# ---------------------------------------------------------------------------------------------- the strict grader

DEMO_SPEC = WorldSpec(size=32, num_frames=24, min_speed=2.0, max_speed=3.0, min_run_frames=6,
                      centre_start_fraction=1.0)  # the demo world's (configs/demo/default.yaml)


def test_a_rendered_bounce_is_right_in_every_chunk():
    """A "moving right" circle that bounces off the right wall, the left one and the right one again: every chunk,
    the leftward stretch included, moves as the caption and the bounces say."""
    params = WorldParams("circle", "red", "right", x0=16.0, y0=16.0, speed=2.5)
    x = centres(params, DEMO_SPEC)[:, 0]
    steps = np.diff(x)
    assert (steps < 0).sum() >= 8 and (steps > 0).sum() >= 8  # left for a while, right for a while
    result = analyse_video(render_clip(params, DEMO_SPEC), params.caption, [8, 16])
    assert [c["direction"] for c in result["chunks"]] == ["right"] * 3
    assert result["direction"] == "right" and result["direction_correct"]
    assert [c["identity"] for c in result["chunks"]] == [True] * 3


def test_time_reversed_or_flipped_chunks_fail_direction():
    """Reversed in time, a clip without a bounce moves against its caption in every chunk; a chunk reversed on
    its own fails in that chunk alone; an object that turns round in the middle of the frame (no wall to bounce
    off) fails from there on."""
    params = WorldParams("square", "green", "right", x0=6.0, y0=16.0, speed=1.2)  # 6 → 24: no bounce
    clip = render_clip(params, SPEC)
    backwards = analyse_video(clip[::-1], params.caption, [8])
    assert [c["direction"] for c in backwards["chunks"]] == ["left", "left"] and not backwards["direction_correct"]
    flipped = clip.copy()
    flipped[8:] = clip[8:][::-1]
    result = analyse_video(flipped, params.caption, [8])
    assert [c["direction_correct"] for c in result["chunks"]] == [True, False]
    assert result["direction"] == "left" and not result["direction_correct"]
    turned = np.concatenate([clip[:8], render_clip(WorldParams("square", "green", "left", 6.0 + 8 * 1.2, 16.0, 1.2),
                                                   SPEC)[:8]])  # turns at x = 15.6, far from both walls
    assert [c["direction"] for c in analyse_video(turned, params.caption, [4, 8, 12])["chunks"]] == [
        "right", "right", "left", "left"]
    assert not analyse_video(turned, params.caption)["direction_correct"]  # one chunk: wrong too


def test_a_vanished_object_fails_identity_and_its_join():
    """Blank frames: the chunk holding one fails identity (colour and shape may still read right from the other
    frames); a blank frame beside a boundary fails that join (``inf``), counted apart from the measured jumps."""
    from pipelines.demo.grading import identity_summary, jumps_summary

    params = WorldParams("triangle", "blue", "down", x0=16.0, y0=8.0, speed=1.0)
    clip = render_clip(params, SPEC)
    inside, beside = clip.copy(), clip.copy()
    inside[12] = 0
    beside[8] = 0
    whole = analyse_video(clip, params.caption, [8])
    gone_inside = analyse_video(inside, params.caption, [8])
    gone_beside = analyse_video(beside, params.caption, [8])
    assert [c["identity"] for c in gone_inside["chunks"]] == [True, False]
    assert gone_inside["chunks"][1]["colour_correct"] and gone_inside["chunks"][1]["missing_frames"] == 1
    assert np.isfinite(gone_inside["jumps"][0]) and gone_inside["failed_joins"] == 0
    assert gone_beside["jumps"] == [float("inf")] and gone_beside["failed_joins"] == 1
    assert np.isnan(gone_beside["jump_ratio"]) and not gone_beside["chunks"][1]["identity"]
    identity = identity_summary([a["chunks"] for a in (whole, gone_inside, gone_beside)])
    assert identity["identity"] == round(4 / 6, 4) and identity["vanished"] == 2
    assert identity["by_chunk"] == [1.0, round(1 / 3, 4)] and identity["present"] == round(4 / 6, 4)
    jumps = jumps_summary([whole, gone_inside, gone_beside])
    assert jumps["failed_joins"] == 1 and jumps["joins"] == 3 and jumps["failed_share"] == round(1 / 3, 4)
    assert jumps["videos_with_failed_join"] == 1 and jumps["failed_by_boundary"] == [1]
    assert jumps["mean"] == round(np.mean([whole["jump_ratio"], gone_inside["jump_ratio"]]), 3)


@pytest.mark.parametrize("spec, boundaries", [(SPEC, [8]), (DEMO_SPEC, [16])], ids=["tests", "demo"])
def test_the_grader_reads_the_worlds_own_videos_right(tmp_path, spec, boundaries):
    """The grader's accuracy on the world's MP4s, cut into chunks as generation cuts its videos, and on a blur
    like an autoencoder's: 1.0 for colour, shape and direction (every chunk through its bounces)."""
    from scipy.ndimage import gaussian_filter

    from pipelines.demo.grading import grader_accuracy

    make_world(tmp_path, 48, spec, seed=1)
    blur = lambda frames: gaussian_filter(frames.astype(float), (0, 0.8, 0.8, 0)).round().astype(np.uint8)  # noqa: E731
    for reconstruct in (None, blur):
        accuracy = grader_accuracy(tmp_path / "train", 48, reconstruct, boundaries)
        assert accuracy == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "direction_per_chunk": 1.0,
                            "identity_per_chunk": 1.0, "videos": 48, "chunks": 96}
