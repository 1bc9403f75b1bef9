"""Resumption under SIGKILL: the scripts, run as real processes, are killed at three seeded moments (one of them
inside a checkpoint or shard write) and, for the trainers, once more right after the final checkpoint; rerun with
the same command, they must end bitwise where an uninterrupted run ends: every tensor of the kept checkpoints
(weights, EMA, optimiser moments), the loss rows, the latent shards.

The moments come from ``random.Random`` seeded by ``RESUME_TEST_SEED`` (default 0): set it to try others. Each
process runs through :data:`LAUNCHER`, which wraps a library function (never production code) to hold the
process at a chosen point and leave a marker file; the test then kills it. ``OMP_NUM_THREADS=1`` for the
trainers: the reference runs beside the interrupted ones on the two cores, with the same thread count.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.pipeline_helpers import autoencoder_overrides, diffusion_overrides, encode_overrides, logged_losses

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("RESUME_TEST_SEED", "0"))
STEPS = 10  # optimiser steps of each training run; a checkpoint every 2, the newest 2 kept
RUN = [f"run.steps={STEPS}", "run.checkpoint_every=2", "run.keep_checkpoints=2", "run.log_every=1",
       "run.device=cpu"]
TIMEOUT = 120.0  # seconds any one process may take

# Runs `python -c LAUNCHER script args...`: installs the hook that RESUME_TEST_HOOK (JSON) names, then runs the
# script as __main__. Hooks: "row" holds after the n-th loss row this process appends; "checkpoint" holds inside
# the n-th checkpoint it writes, its file-th safetensors file half on disk; "shard" the same for the n-th latent
# shard; "before" holds on entering module.name; "spy" logs each checkpoint's trainer_state.json just before
# its temporary directory is renamed into place. "hold_before_checkpoint": step holds before writing that one.
LAUNCHER = r"""
import json, os, runpy, sys, time
from pathlib import Path

hook = json.loads(os.environ.get("RESUME_TEST_HOOK") or "{}")
kind = hook.get("kind")


def hold():
    Path(hook["marker"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


if kind == "row":
    from pipelines.core.visual import LossLog

    append, rows = LossLog.append, []

    def counted(self, step, **scalars):
        append(self, step, **scalars)
        rows.append(step)
        if len(rows) == hook["n"]:
            hold()

    LossLog.append = counted
elif kind in ("checkpoint", "shard"):
    from pipelines.core import checkpoint

    save_file, seen = checkpoint.save_file, []

    def half_written(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        path = Path(filename)
        if kind == "checkpoint" and path.parent.name.startswith(".step_"):
            seen.append(path.parent.name)
            if len(set(seen)) == hook["n"] and seen.count(path.parent.name) == hook["file"]:
                os.truncate(path, path.stat().st_size // 2)
                hold()
        if kind == "shard" and path.name.startswith(".shard_"):
            seen.append(path.name)
            if len(seen) == hook["n"]:
                os.truncate(path, path.stat().st_size // 2)
                hold()

    checkpoint.save_file = half_written
elif kind == "before":
    import importlib

    setattr(importlib.import_module(hook["module"]), hook["name"], lambda *args, **kwargs: hold())
elif kind == "spy":
    from pipelines.core import checkpoint

    fsync = checkpoint.fsync_directory

    def spied(path):
        path = Path(path)
        if path.name.startswith(".step_") and (path / "trainer_state.json").is_file():
            with open(hook["log"], "a") as log:
                log.write(json.dumps(json.loads((path / "trainer_state.json").read_text())) + "\n")
        fsync(path)

    checkpoint.fsync_directory = spied

if "hold_before_checkpoint" in hook:  # a backstop: this process never writes that checkpoint
    from pipelines.core import checkpoint, loop

    save_checkpoint = checkpoint.save_checkpoint

    def guarded(root, step, *args, **kwargs):
        if step == hook["hold_before_checkpoint"]:
            hold()
        return save_checkpoint(root, step, *args, **kwargs)

    checkpoint.save_checkpoint = loop.save_checkpoint = guarded

from pipelines.core.visual import LossLog

LossLog.plot = lambda *args, **kwargs: None  # matplotlib costs a second a process; the curve is no training state
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Process:
    """One script run through the launcher, output in a log file, in a process group of its own."""

    def __init__(self, script: str, args: list[str], log: Path, hook: dict | None = None, threads: int = 1):
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RESUME_TEST_HOOK": json.dumps(hook or {})}
        with log.open("w") as handle:
            self.popen = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ROOT / "scripts" / f"{script}.py"),
                                           *args], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.started = time.monotonic()

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def finish(self) -> None:
        """Wait for a normal end."""
        try:
            code = self.popen.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.log.name} timed out:\n{self.tail()}") from None
        assert code == 0, f"{self.log.name} exited with {code}:\n{self.tail()}"

    def kill_when(self, ready: Callable[[], bool], delay: float = 0.0, early: Callable[[], bool] = bool) -> bool:
        """SIGKILL ``delay`` seconds after ``ready()`` (sooner once ``early()``); ``False`` when the run ended
        first."""
        while not ready():
            if self.popen.poll() is not None:
                assert self.popen.returncode == 0, f"{self.log.name} exited with {self.popen.returncode}:\n" \
                                                   f"{self.tail()}"
                return False
            if time.monotonic() - self.started > TIMEOUT:
                self.stop()
                raise AssertionError(f"{self.log.name}: never got there:\n{self.tail()}")
            time.sleep(0.005)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not early() and self.popen.poll() is None:
            time.sleep(0.005)
        if self.popen.poll() is not None:
            assert self.popen.returncode == 0, self.tail()
            return False
        self.stop()
        return True

    def stop(self) -> None:
        """SIGKILL the process group this test started (the script and its data-loader workers)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def _latest_step(checkpoints: Path) -> int:
    pointer = checkpoints / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def _interrupted_training(script: str, args: list[str], out: Path, logs: Path, name: str, last: dict) -> list[str]:
    """Kill the run at three seeded moments, then once more at ``last`` (a "before" hook on what runs after the
    final checkpoint), and rerun it until it completes; returns what happened."""
    rng = random.Random(f"{SEED}:{name}")
    checkpoints, marker = out / "checkpoints", logs / f"{name}.marker"
    events = []

    def start(i: int, hook: dict | None = None) -> Process:
        marker.unlink(missing_ok=True)
        return Process(script, args, logs / f"{name}_{i}.log", hook and {**hook, "marker": str(marker)})

    # 1. right after the n-th loss row (the row is on disk; its step's checkpoint may not be)
    n = rng.randint(1, 4)
    assert start(1, {"kind": "row", "n": n}).kill_when(marker.exists), "the first run ended before its kill"
    events.append(f"killed after loss row {n} (checkpoint {_latest_step(checkpoints)})")
    # 2. inside a checkpoint write: a half-written file in a half-assembled temporary directory
    n, file = rng.randint(1, 2), rng.randint(2, 4)
    before = _latest_step(checkpoints)
    assert start(2, {"kind": "checkpoint", "n": n, "file": file}).kill_when(marker.exists)
    partial = list(checkpoints.glob(".step_*"))
    assert len(partial) == 1 and any(p.suffix == ".tmp" for p in partial[0].iterdir()), partial
    assert _latest_step(checkpoints) == before + 2 * (n - 1)  # `latest` still names the checkpoint before
    events.append(f"killed inside checkpoint write {n} (file {file}) of a run resumed from step {before}")
    # 3. a random delay after the rerun's first new checkpoint: anywhere in a step, a write, pruning; at the
    # latest on reaching the final checkpoint, so that the next run writes it
    before, delay = _latest_step(checkpoints), rng.uniform(0.0, 0.4)
    run = start(3, {"hold_before_checkpoint": STEPS})
    assert run.kill_when(lambda: _latest_step(checkpoints) > before or marker.exists(), delay, marker.exists)
    events.append(f"killed {delay:.2f} s after checkpoint {before + 2} appeared (latest: "
                  f"{_latest_step(checkpoints)}{', held before the final one' if marker.exists() else ''})")
    assert _latest_step(checkpoints) < STEPS
    # 4. after the final checkpoint, before what follows it: the rerun starts at run.steps
    assert start(4, {"kind": "before", **last}).kill_when(marker.exists)
    assert _latest_step(checkpoints) == STEPS
    events.append(f"killed after the final checkpoint, entering {last['name']}")
    start(5).finish()
    return events


def _comparable(name: str, obj: dict, ignore: tuple[str, ...]) -> dict:
    """A JSON file without what may differ between two runs: ``ignore``d keys, the run folder."""
    obj = {k: v for k, v in obj.items() if k not in ignore}
    if name == "trainer_state.json":
        obj["config"]["run"].pop("out_dir")
    return obj


def _assert_same_files(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    """Same file names; every tensor of every safetensors file bitwise equal; JSON files equal."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (a, b)
    for name in names:
        if name.endswith(".safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{b.name}/{name}: {key}"
        elif name.endswith(".json"):
            ja, jb = (_comparable(name, json.loads((d / name).read_text()), ignore) for d in (a, b))
            assert ja == jb, f"{b.name}/{name}"


def _assert_same_training(reference: Path, resumed: Path) -> None:
    """The kept checkpoints (the final one included) and the loss rows of two runs are the same."""
    ca, cb = reference / "checkpoints", resumed / "checkpoints"
    kept = sorted(p.name for p in ca.glob("step_*"))
    assert kept == [f"step_{STEPS - 2:07d}", f"step_{STEPS:07d}"]
    assert sorted(p.name for p in cb.iterdir()) == sorted(p.name for p in ca.iterdir())  # no temporaries left
    assert (cb / "latest").read_text() == (ca / "latest").read_text()
    for name in kept:
        _assert_same_files(ca / name, cb / name, ignore=("seconds",))  # training time is the one difference
    assert logged_losses(resumed) == logged_losses(reference)


def _side_by_side(script: str, args, reference: Path, out: Path, root: Path, kind: str, last: str,
                  reference_patch: dict | None = None) -> None:
    """Run ``script`` uninterrupted into ``reference`` while the same command is killed four times and rerun into
    ``out`` (the fourth kill on entering the stage's function ``last``, after the final checkpoint)."""
    straight = Process(script, args(reference), root / "reference.log", reference_patch)
    try:
        events = _interrupted_training(script, args(out), out, root, kind,
                                       {"module": f"pipelines.stages.{script}", "name": last})
        straight.finish()
    finally:
        straight.stop()
    print(events)


@pytest.fixture(scope="module")
def autoencoder_runs(chain, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted autoencoder run and one killed four times, beside each other."""
    root = tmp_path_factory.mktemp("autoencoder")
    args = lambda out: [*autoencoder_overrides(chain["videos"], out, steps=STEPS), *RUN]  # noqa: E731
    reference, out = root / "reference", root / "resumed"
    _side_by_side("train_autoencoder", args, reference, out, root, "autoencoder", "_export")
    return reference, out


def test_autoencoder_training_killed_four_times_ends_bitwise_like_an_uninterrupted_run(autoencoder_runs):
    reference, out = autoencoder_runs
    _assert_same_training(reference, out)
    _assert_same_files(reference / "model", out / "model")  # the exported (EMA) weights and their latent scale


def test_an_export_redone_from_the_final_checkpoint_has_the_same_latent_scale(autoencoder_runs):
    reference, out = autoencoder_runs
    scales = [json.loads((run / "model" / "config.json").read_text())["latent_scale"] for run in (reference, out)]
    assert scales[0] == scales[1]


@pytest.fixture(scope="module")
def diffusion_runs(chain, tmp_path_factory) -> tuple[Path, Path, Path]:
    """An uninterrupted diffusion run (which logged its checkpoints' trainer_state.json just before each rename)
    and one killed four times."""
    root = tmp_path_factory.mktemp("diffusion")
    args = lambda out: [*diffusion_overrides(chain["latents"], out, steps=STEPS), *RUN,  # noqa: E731
                        "run.num_workers=1"]  # a data-loader worker prefetching past the kill
    reference, out, spy = root / "reference", root / "resumed", root / "spy.jsonl"
    _side_by_side("train_diffusion", args, reference, out, root, "diffusion", "_samples",
                  {"kind": "spy", "log": str(spy)})
    return reference, out, spy


def test_diffusion_training_killed_four_times_ends_bitwise_like_an_uninterrupted_run(diffusion_runs):
    reference, out, _ = diffusion_runs
    _assert_same_training(reference, out)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, out)]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]


def test_a_checkpoint_names_its_latent_shape_and_autoencoder_before_it_is_renamed_into_place(chain, diffusion_runs):
    _, out, spy = diffusion_runs
    manifest = json.loads((chain["latents"] / "manifest.json").read_text())
    states = [json.loads(line) for line in spy.read_text().splitlines()]  # read inside the temporary directory
    assert [s["step"] for s in states] == list(range(2, STEPS + 1, 2))
    for state in states + [json.loads(p.read_text()) for p in out.glob("checkpoints/step_*/trainer_state.json")]:
        assert state["latent_shape"] == [4, 6, 8, 8] and state["autoencoder"] == manifest["autoencoder"]


def test_a_run_killed_before_its_final_samples_writes_them_when_rerun(diffusion_runs):
    reference, out, _ = diffusion_runs
    assert (reference / "samples" / f"step_{STEPS:07d}.png").is_file()
    assert (out / "samples" / f"step_{STEPS:07d}.png").is_file()


def _reasons(skipped: dict[str, str]) -> dict[str, str]:
    """Why each file was skipped, without the decoders' own words: those carry decord's wall-clock time and, in
    some processes, PyAV's last log line."""
    return {path: reason.split(":")[0] for path, reason in skipped.items()}


def _shards(root: Path) -> dict[str, tuple[dict, dict]]:
    """Each shard's tensors and metadata (JSON; skipped files with their reasons)."""
    shards = {}
    for path in sorted(root.glob("shard_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        shards[path.name] = (load_file(path), meta | {"skipped": _reasons(meta["skipped"])})
    return shards


def test_latent_encoding_killed_three_times_gives_the_same_shards(chain, tmp_path):
    """The uninterrupted run is the chain's, made in this process (2 threads): these processes use as many."""
    reference, out, marker = chain["latents"], tmp_path / "resumed", tmp_path / "marker"
    args, rng = encode_overrides(chain["autoencoder"] / "model", chain["videos"], out), random.Random(f"{SEED}:encode")
    encode = lambda log, hook=None: Process("encode_latents", args, tmp_path / log, hook,  # noqa: E731
                                            torch.get_num_threads())
    count = lambda: len(list(out.glob("shard_*.safetensors")))  # noqa: E731
    # 1. inside the n-th shard's write: its temporary file half on disk
    n = rng.randint(1, 3)
    assert encode("1.log", {"kind": "shard", "n": n, "marker": str(marker)}).kill_when(marker.exists)
    assert count() == n - 1 and len(list(out.glob(".shard_*.tmp"))) == 1
    # 2. a random delay after the rerun's first new shard
    before, delay = count(), rng.uniform(0.0, 0.1)
    completed = not encode("2.log").kill_when(lambda: count() > before, delay)
    if not completed:  # 3. every shard in place, the manifest not yet written
        marker.unlink()
        hook = {"kind": "before", "module": "pipelines.stages.encode_latents", "name": "first_shape",
                "marker": str(marker)}
        assert encode("3.log", hook).kill_when(marker.exists)
        assert count() == 4 and not (out / "manifest.json").exists()
        encode("4.log").finish()
    ref, got = _shards(reference), _shards(out)
    assert got.keys() == ref.keys() and len(ref) == 4
    for name, (tensors, meta) in ref.items():
        assert meta == got[name][1], name  # records, skipped files, fingerprint
        assert tensors.keys() == got[name][0].keys()
        for key, value in tensors.items():
            assert torch.equal(value, got[name][0][key]), f"{name}: {key}"
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (reference, out))
    stats = mb.pop("stats")
    ma.pop("stats")
    assert _reasons(ma.pop("skipped")) == _reasons(mb.pop("skipped")) and ma == mb
    if not completed:
        assert stats["encoded_clips"] == 0  # the last rerun found every shard done: nothing encoded twice
    records = [(r["path"], tuple(r["frame_indices"])) for _, meta in got.values()
               for r in meta["records"]]
    assert len(records) == len(set(records)) == mb["clips"] == 13  # none twice, none missing
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())  # no temporaries


def test_a_loss_row_never_spans_a_resume():
    """Rows average the steps since the last row; a checkpoint that fell inside a row would resume with part of
    that window lost, so checkpoints must fall on row boundaries (checkpoint_every a multiple of log_every)."""
    from pipelines.core.config import ConfigError, load_config
    from pipelines.stages.configs import DiffusionTrainConfig

    with pytest.raises(ConfigError, match="checkpoint_every must be a multiple of log_every"):
        load_config(DiffusionTrainConfig, None, ["run.checkpoint_every=3", "run.log_every=2"])
    load_config(DiffusionTrainConfig, None, ["run.checkpoint_every=4", "run.log_every=2"])


def test_a_write_killed_inside_safetensors_leaves_a_temporary_that_the_writer_removes(tmp_path):
    """safetensors writes each file through a ``.tmpXXXXXX`` beside it; a kill inside ``save_file`` leaves that
    one, which the encoding stage removes on its next start (with its own ``.NAME.XXXX.tmp`` ones)."""
    from pipelines.core.files import remove_stale_safetensors_temporaries

    (tmp_path / ".tmpJT9bzX").write_bytes(b"\0" * 16)
    (tmp_path / "shard_00000.safetensors").write_bytes(b"kept")
    (tmp_path / ".tmp_not_ours").write_bytes(b"kept")
    assert [p.name for p in remove_stale_safetensors_temporaries(tmp_path)] == [".tmpJT9bzX"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_not_ours", "shard_00000.safetensors"]
