"""Run a training stage as several data-parallel processes from inside one Python process.

``accelerate launch --multi_gpu --num_processes N script.py`` is how a user starts a multi-process run; a job that
runs several stages in one process (the demo) uses :func:`run_in_processes` instead: it spawns ``N`` processes
with the environment ``torchrun`` would give them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` ...), so
``make_accelerator`` sets up the same gloo (CPU) or NCCL (GPU) group, and hands back rank 0's return value.

Why on a CPU: a small model's step is hundreds of small operations, and two threads share each one poorly
(measured in ``docs/experiments/two-training-processes.md``). The
diffusion trainer draws every sample's randomness from its slot in the global batch, so N processes at batch B/N
train the same model as one at batch B (up to floating-point reduction order).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from pipelines.core.config import UserError


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable, args: tuple, world: int, port: int, threads: int, folder: str) -> None:
    """One process of the group: torchrun's environment, its share of the threads, then ``fn(*args)``; rank 0's
    result and any process's bad-input message go to files in ``folder`` (a pipe could fill and block)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    try:
        result = fn(*args)
    except UserError as error:  # bad input: one line in the parent, not a child's traceback
        Path(folder, f"user_error_{rank}.txt").write_text(str(error), encoding="utf-8")
        raise SystemExit(2) from None
    if rank == 0:
        Path(folder, "result.pkl").write_bytes(pickle.dumps(result))


def run_in_processes(fn: Callable[..., Any], args: tuple, processes: int, threads: int | None = None) -> Any:
    """``fn(*args)`` in ``processes`` spawned processes of one distributed group (each with ``threads`` torch
    threads, by default an equal share of this process's); returns what rank 0 returned. ``fn`` and ``args`` must
    pickle (a module-level function and dataclass configs). A :class:`UserError` in any process is raised here
    as itself (one line); any other failure stops every process and raises with the child's traceback."""
    if processes < 2:
        return fn(*args)
    threads = threads or max(1, torch.get_num_threads() // processes)
    with tempfile.TemporaryDirectory(prefix="processes_") as folder:
        try:
            mp.start_processes(_child, args=(fn, args, processes, free_port(), threads, folder), nprocs=processes,
                               join=True, start_method="spawn")
        except mp.ProcessExitedException:
            errors = sorted(Path(folder).glob("user_error_*.txt"))
            if errors:
                raise UserError(errors[0].read_text(encoding="utf-8")) from None
            raise
        return pickle.loads(Path(folder, "result.pkl").read_bytes())
