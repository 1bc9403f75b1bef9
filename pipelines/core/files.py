"""Files written atomically and durably: a temporary name in the same folder, fsync, rename, fsync the folder.

A process killed at any instant leaves the old file or the new one, never half of one; after a power loss the
rename is on disk too. Pure Python (no torch), so configs can write themselves before anything heavy loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """``with atomic_path(path) as tmp:`` fill the temporary file ``tmp`` beside ``path`` (over as many calls as
    needed); when the block ends without error it is fsynced, renamed to ``path`` and the folder fsynced; on any
    error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have ``write(tmp)`` fill a temporary file beside ``path``, then rename it there (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (:func:`atomic_write_with`)."""
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete the temporary files (``.NAME.XXXXXXXX.tmp``) that atomic writes of ``folder/name`` left behind when
    their process was killed mid-write; ``name`` may be a glob pattern (``shard_*.safetensors``). Returns them.

    Only the one process that writes those files may call this: it would delete another writer's file in flight.
    """
    stale = [p for p in Path(folder).glob(f".{name}.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def remove_stale_safetensors_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.tmpXXXXXX``) safetensors writes each file through and renames, which a process
    killed inside ``save_file`` leaves behind. As :func:`remove_stale_temporaries`: the folder's one writer only."""
    stale = [p for p in Path(folder).glob(".tmp??????") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write, pretty-printed."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
