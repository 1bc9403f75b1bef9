"""Pictures people would rather look at than read: loss curves, image grids, video contact sheets.

Tensors follow the project layout: images ``[n, 3, H, W]`` and videos ``[b, 3, f, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from pipelines.core.files import atomic_write_bytes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Map [-1, 1] floats to uint8, channels last: ``[..., 3, H, W] -> [..., H, W, 3]``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """One video ``[3, f, H, W]`` in [-1, 1] to ``uint8 [f, H, W, 3]`` for writing."""
    return to_uint8(rearrange(video, "c f h w -> f c h w"))


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``uint8 [H, W, 3]`` as PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def tile(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tile ``uint8 [n, H, W, 3]`` into a grid with ``columns`` columns and ``pad`` white pixels between."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    sheet = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        sheet[y : y + h, x : x + w] = image
    return sheet


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, columns: int = 8) -> None:
    """Save ``[n, 3, H, W]`` images in [-1, 1] as one PNG grid (e.g. inputs above reconstructions)."""
    save_png(tile(to_uint8(images), columns=min(columns, images.shape[0])), path)


def contact_sheet(videos: torch.Tensor, max_columns: int = 16) -> np.ndarray:
    """One row per video ``[b, 3, f, H, W]``, evenly spaced frames as columns: ``uint8 [H', W', 3]``."""
    b, _, f = videos.shape[:3]
    columns = min(f, max_columns)
    index = torch.linspace(0, f - 1, columns).round().long()
    frames = rearrange(videos[:, :, index], "b c f h w -> (b f) c h w")  # row-major: one row per video
    return tile(to_uint8(frames), columns=columns)


def save_contact_sheet(videos: torch.Tensor, path: str | os.PathLike, max_columns: int = 16) -> None:
    """Write :func:`contact_sheet` as PNG."""
    save_png(contact_sheet(videos, max_columns), path)


class LossLog:
    """Append-only CSV of training scalars that survives restarts, plus a PNG plot of it.

    On resume, rows written after the checkpoint's step are dropped so the curve has no duplicated steps.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, write: bool = True):
        self.path, self.write = Path(path), write  # write=False: keep rows in memory only (non-main processes)
        self.rows: list[dict[str, float]] = []
        if self.path.is_file() and resume_step is not None:
            with self.path.open() as handle:
                self.rows = [
                    {k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(handle)
                ]
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
        self._rewrite()

    def _columns(self) -> list[str]:
        keys = ["step"]
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        return keys

    def _rewrite(self) -> None:
        if not self.write:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns())
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, buffer.getvalue().encode())

    def append(self, step: int, **scalars: float) -> None:
        """Add one row; the file is rewritten when new columns appear, else appended."""
        row = {"step": float(step), **{k: float(v) for k, v in scalars.items()}}
        new_columns = any(k not in self._columns() for k in row)
        self.rows.append(row)
        if new_columns:
            self._rewrite()
            return
        if not self.write:
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns()).writerow(row)

    def last(self, key: str) -> float | None:
        """The most recent value of ``key`` (``None`` if never logged)."""
        for row in reversed(self.rows):
            if key in row:
                return row[key]
        return None

    def plot(self, path: str | os.PathLike, keys: list[str] | None = None, title: str = "") -> None:
        """Plot the logged curves (raw and smoothed) to a PNG, log-scaled when all values are positive."""
        plot_curves(self.rows, path, keys, title)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (window clipped at the start)."""
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> None:
    """Write a figure as PNG atomically (a killed run leaves the old picture or the new one) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(rows: list[dict], path: str | os.PathLike, keys: list[str] | None, title: str) -> None:
    """Draw one panel per key of ``rows`` (dicts with a ``step``) into a PNG."""
    plt = pyplot()
    keys = keys or sorted({k for r in rows for k in r if k != "step"})
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = np.array([(r["step"], r[key]) for r in rows if key in r])
        ax.plot(pts[:, 0], pts[:, 1], alpha=0.3, lw=0.8)
        ax.plot(pts[:, 0], _smooth(pts[:, 1], max(1, len(pts) // 20)), lw=1.5)
        if (pts[:, 1] > 0).all():
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
