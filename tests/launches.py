"""Training scripts run as real launches (``accelerate launch`` on CPU processes over gloo, or plain python for
one process), and comparisons of what they wrote: the helpers of the multi-process tests (not a test module).

Every run is a subprocess with ``OMP_NUM_THREADS=1``, a fresh ``run.out_dir`` and a free port. The bounds: two
processes at batch 4, one at batch 8 and one at batch 4 with ``grad_accum=2`` agree in every saved tensor to at
most 3e-6 relative in norm on the 2-core development CPU; :data:`TOL` (1e-4) leaves room for other machines while a
wrong split of the batch moves the AdamW moments by tens of per cent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipelines.core.processes import free_port
from pipelines.core.sharded import SHARDED_FOLDER, read_sharded
from tests.pipeline_helpers import diffusion_overrides, logged_losses

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # bound on |a - b| / |b| (norms) per saved tensor, and on the relative difference of logged losses
STEPS = 4  # checkpoints at 2 and 4 (checkpoint_every=2 in diffusion_overrides)
GLOBAL_BATCH = 8
PORT = "<free port>"  # filled in by with_port at each launch


def subprocess_env(tmp: Path) -> dict[str, str]:
    """One thread per process (two processes share two cores) and no user-level accelerate config file."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HOME=str(tmp / "hf"))
    return {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}


def command(script: Path | str, overrides: list[str], processes: int, launch: tuple[str, ...] = (),
            device: str = "cpu", device_key: str = "run.device") -> list[str]:
    """``accelerate launch`` of ``script`` on ``processes`` CPU processes, or plain python for one."""
    script = str(REPO / "scripts" / script) if isinstance(script, str) else str(script)
    if processes == 1:
        head = [sys.executable, script]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", PORT, *launch, script]
    return [*head, f"{device_key}={device}", *overrides]


def with_port(cmd: list[str]) -> list[str]:
    """The command with a free port for this launch's rendezvous."""
    return [str(free_port()) if part == PORT else part for part in cmd]


def run(cmd: list[str], tmp: Path, timeout: float = 180) -> str:
    """Run to completion; the combined output (fails the test, with the output's tail, on a non-zero exit)."""
    cmd = with_port(cmd)
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}: {' '.join(cmd)}\n{output[-4000:]}"
    return output


def diffusion(latents: Path, out: Path, batch: int, *extra: str) -> list[str]:
    """The tiny model, trained also to continue clips from known first frames (their draws are per sample too),
    its gradient clipped at every step (its norm is about 0.4): clipping must take the norm of the whole gradient,
    however it is split over processes, or the AdamW moments part."""
    return [*diffusion_overrides(latents, out, steps=STEPS), f"run.batch_size={batch}", "model.unet.known_frames=true",
            "optim.max_grad_norm=0.1", *extra]


def final_checkpoint(out: Path, step: int = STEPS) -> Path:
    path = out / "checkpoints" / f"step_{step:07d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == path.name
    return path


def tensors(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved tensor of a checkpoint: weights, EMA weights, optimizer state; those of a sharded checkpoint's
    DCP folder (weights, EMA, optimizer state, whole) under ``sharded``."""
    found = {f.stem: load_file(f) for f in sorted(checkpoint.glob("*.safetensors"))}
    if (checkpoint / SHARDED_FOLDER).is_dir():
        found[SHARDED_FOLDER] = read_sharded(checkpoint)
    return found


def assert_same_state(a: Path, b: Path, tol: float = TOL, names: tuple[str, ...] = (),
                      noise: frozenset = frozenset()) -> float:
    """The two checkpoints hold the same files and tensors (only the files ``names``, when given), each within
    ``tol`` of the other relative in norm (``tol=0``: bit for bit), but for the ``noise`` keys, which only share
    their shape; returns the largest such relative difference."""
    ta, tb = tensors(a), tensors(b)
    if names:
        ta, tb = {n: ta[n] for n in names}, {n: tb[n] for n in names}
    assert set(ta) == set(tb)
    assert names or ({"unet", "ema_unet"} <= set(ta) and {"optimizer_main", SHARDED_FOLDER} & set(ta))
    worst = 0.0
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key, x in ta[name].items():
            y = tb[name][key]
            assert x.shape == y.shape and x.dtype == y.dtype, (name, key)
            if key in noise:
                continue
            if tol == 0 or not x.is_floating_point():
                assert torch.equal(x, y), (name, key)
                continue
            scale = float(y.double().norm())
            diff = float((x.double() - y.double()).norm())
            assert diff <= tol * scale + 1e-12, f"{name}/{key}: |a - b| = {diff:.3g} against |b| = {scale:.3g}"
            worst = max(worst, diff / scale if scale else 0.0)
    for meta in ("trainer_state.json",):
        sa, sb = json.loads((a / meta).read_text()), json.loads((b / meta).read_text())
        assert sa["step"] == sb["step"] and sa["ema_updates"] == sb["ema_updates"]
    return worst


def loss_rows(out: Path) -> list[dict[str, str]]:
    """``loss.csv`` without its timing columns (:func:`tests.pipeline_helpers.logged_losses`)."""
    return logged_losses(out)


def assert_same_losses(a: Path, b: Path, rtol: float = TOL) -> None:
    ra, rb = loss_rows(a), loss_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [f"{s}.0" for s in range(1, STEPS + 1)]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            if "" in (x[key], y[key]):  # not logged at that step (the discriminator starts later)
                assert x[key] == y[key], (x["step"], key)
                continue
            assert float(x[key]) == pytest.approx(float(y[key]), rel=rtol, abs=1e-12), (x["step"], key)


def files(out: Path) -> list[str]:
    """Every file and folder under ``out``, relative, hidden ones (temporary files) included."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every worker: torchrun starts each worker in a session of its own,
    so killing the launcher's group alone leaves the workers training (and writing) on."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)
