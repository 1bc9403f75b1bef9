"""Reading and writing video files (and decoding images): decord first, PyAV as the fallback, one error type
for bad files.

Frames are ``uint8 [f, H, W, 3]`` (RGB) on disk-facing boundaries; a float video ``[3, f, H, W]`` in [-1, 1]
(the project layout without the batch axis) is accepted wherever frames are written.

Readers: decord (fast random access, Linux x86-64 only, imported lazily) is tried first; if it is missing or
fails in any way (decord raises ``decord.DECORDError``, which is *not* a ``RuntimeError``), PyAV decodes the
file sequentially. A file neither can read raises :class:`VideoReadError` naming both failures.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pipelines.core.files import atomic_path, atomic_write_bytes
from pipelines.core.visual import video_to_uint8

Backend = Literal["auto", "decord", "pyav"]


class MediaReadError(RuntimeError):
    """A media file that cannot be used: ``reason`` is a short category (datasets group their skip reports
    by it), ``detail`` what the decoders said."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        """Picklable with its three fields (DataLoader workers send exceptions to the main process)."""
        return type(self), (self.path, self.reason, self.detail)


class VideoReadError(MediaReadError):
    """A video that neither decord nor PyAV can read, or that lacks the frames asked for."""


class ImageReadError(MediaReadError):
    """An image Pillow cannot decode."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (``fps`` is 0.0 when unknown)."""

    num_frames: int
    fps: float
    height: int
    width: int


# ---------------------------------------------------------------------------------------------- reading


class DecoderLogWarning(UserWarning):
    """What a decoder printed while it read a file it could read: one warning per file and process."""


def _import_decord() -> Any:
    """The decord module (a function so tests can replace it; raises ImportError off Linux x86-64)."""
    import decord

    return decord


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 while the block runs (the list gets the text)."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


_REPORTED: set[str] = set()


def _decord_quietly(path: str | os.PathLike, call: Callable[[], Any]) -> Any:
    """``call()`` (a decord read of ``path``) with decord's native log kept off the terminal: its FFmpeg prints
    the decoders' complaints on every read of some real H.264 files ("A non-intra slice in an IDR NAL unit", at
    FFmpeg's error level, for frames it decodes anyway) and its own "ERROR opening" lines before it raises. A
    failed read raises as before (and reaches the user as a :class:`VideoReadError` naming the file); a read
    that succeeded with a complaint is summarised in one :class:`DecoderLogWarning` per file."""
    with _stderr_captured() as log:
        result = call()
    lines = [line for line in log[0].splitlines() if line.strip()]
    if lines and str(path) not in _REPORTED:
        _REPORTED.add(str(path))
        more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
        warnings.warn(f"{path}: the decoder said: {lines[0].strip()}{more}", DecoderLogWarning, stacklevel=4)
    return result


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (decord and FFmpeg messages span many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def _check_indices(path: str | os.PathLike, indices: Sequence[int], num_frames: int) -> None:
    """Raise :class:`VideoReadError` if any index is outside ``[0, num_frames)``."""
    bad = [i for i in indices if not 0 <= i < num_frames]
    if bad:
        raise VideoReadError(path, "index out of range", f"index {bad[0]} of a {num_frames}-frame video")


def _decord_reader(path: str | os.PathLike) -> Any:
    """An open ``decord.VideoReader`` with at least one frame."""
    decord = _import_decord()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    if len(reader) == 0:
        raise ValueError("decord found no frames")
    return reader


def _decord_info(path: str | os.PathLike) -> VideoInfo:
    """Header information through decord."""
    reader = _decord_reader(path)
    height, width = reader[0].shape[:2]
    return VideoInfo(len(reader), float(reader.get_avg_fps()), int(height), int(width))


def _decord_read(path: str | os.PathLike, indices: Sequence[int] | None) -> np.ndarray:
    """Frames ``uint8 [f, H, W, 3]`` through decord's random access."""
    reader = _decord_reader(path)
    indices = range(len(reader)) if indices is None else indices
    _check_indices(path, indices, len(reader))
    return reader.get_batch(list(indices)).asnumpy()


def _import_av() -> Any:
    """The av module, with FFmpeg's log messages kept out of Python.

    PyAV's Python log callback (switched on by ``av.logging.set_level``, which importing torchvision does) takes
    the GIL from FFmpeg's decoding threads. A damaged stream then deadlocks the process: freeing the codec context
    (with the GIL held) waits for a decoding thread that waits for the GIL to log its error. ``None`` routes the
    messages to FFmpeg's silent callback instead, which PyAV does by default; the errors PyAV raises are the same.
    """
    import av

    if av.logging.get_level() is not None:
        av.logging.set_level(None)
    return av


def _pyav_open(path: str | os.PathLike) -> tuple[Any, Any]:
    """An open PyAV container and its first video stream (multi-threaded decoding)."""
    av = _import_av()
    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _pyav_info(path: str | os.PathLike) -> VideoInfo:
    """Header information through PyAV; the frame count is decoded when the container does not store it."""
    container, stream = _pyav_open(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        num_frames = stream.frames or sum(1 for _ in container.decode(stream))
        height, width = stream.codec_context.height, stream.codec_context.width
    if num_frames == 0:
        raise VideoReadError(path, "no frames")
    return VideoInfo(int(num_frames), float(rate or 0.0), int(height), int(width))


def _pyav_read(path: str | os.PathLike, indices: Sequence[int] | None) -> np.ndarray:
    """Frames ``uint8 [f, H, W, 3]``: decode sequentially, keep the requested indices (any order, repeats).

    A stream that breaks off (a decoding error after some frames, or fewer frames than the header says) is
    ``truncated`` when frames past the break are needed; the frames before it stay readable.
    """
    last = None if indices is None else max(indices)
    wanted = None if indices is None else set(indices)
    kept: dict[int, np.ndarray] = {}
    decoded, damage = 0, ""
    container, stream = _pyav_open(path)
    with container:
        promised = stream.frames  # 0 when the container does not say
        try:
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if wanted is None or decoded - 1 in wanted:
                    kept[decoded - 1] = frame.to_ndarray(format="rgb24")
                if last is not None and decoded > last:
                    break
        except Exception as error:  # damaged data: keep what decoded before it
            if decoded == 0:
                raise
            damage = f", then {_first_line(error)}"
    if decoded == 0:
        raise VideoReadError(path, "no frames")
    if (damage or decoded < promised) and (indices is None or last >= decoded):
        raise VideoReadError(path, "truncated", f"decoded {decoded} of {promised or '?'} frames{damage}")
    indices = range(decoded) if indices is None else indices
    _check_indices(path, indices, decoded)
    return np.stack([kept[i] for i in indices])


def _with_fallback(path: str | os.PathLike, backend: Backend, calls: dict[str, Callable[[], Any]]) -> Any:
    """Run the first backend that succeeds (decord, then PyAV); a :class:`VideoReadError` is final."""
    if not Path(path).is_file():
        raise VideoReadError(path, "missing file")
    if Path(path).stat().st_size == 0:
        raise VideoReadError(path, "empty file")
    errors: list[str] = []
    for name, call in calls.items():
        if backend not in ("auto", name):
            continue
        try:
            return call()
        except VideoReadError as error:
            if not errors:
                raise
            errors.append(f"{name}: {error.reason}" + (f" ({error.detail})" if error.detail else ""))
            raise VideoReadError(path, error.reason, "; ".join(errors)) from error
        except Exception as error:  # decord.DECORDError derives from Exception only; av errors from OSError
            errors.append(f"{name}: {_first_line(error)}")
    raise VideoReadError(path, "unreadable", "; ".join(errors))


def video_info(path: str | os.PathLike, backend: Backend = "auto") -> VideoInfo:
    """Frame count, fps and size of the first video stream, from the header where possible (cheap).

    Raises:
        VideoReadError: missing, empty, truncated or otherwise unreadable file.
    """
    return _with_fallback(
        path, backend, {"decord": lambda: _decord_quietly(path, lambda: _decord_info(path)),
                        "pyav": lambda: _pyav_info(path)}
    )


def read_frames(
    path: str | os.PathLike, indices: Sequence[int] | None = None, backend: Backend = "auto"
) -> np.ndarray:
    """Decode frames ``uint8 [len(indices), H, W, 3]`` in the order asked (all frames if ``indices`` is None).

    ``backend="pyav"`` skips decord (``"decord"`` uses decord only).

    Raises:
        VideoReadError: unreadable file, or an index outside ``[0, num_frames)``.
    """
    indices = None if indices is None else [int(i) for i in indices]
    if indices is not None and not indices:
        info = video_info(path, backend)
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    return _with_fallback(
        path,
        backend,
        {"decord": lambda: _decord_quietly(path, lambda: _decord_read(path, indices)),
         "pyav": lambda: _pyav_read(path, indices)},
    )


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to ``uint8 [H, W, 3]`` (RGB; alpha dropped, greyscale expanded).

    Raises:
        ImageReadError: missing, truncated or undecodable file.
    """
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy warns otherwise)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError or DecompressionBombError
        raise ImageReadError(path, "unreadable image", _first_line(error)) from error


# ---------------------------------------------------------------------------------------------- writing


def as_float_frames(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[f, H, W, 3]`` → float ``[f, 3, H, W]`` in [-1, 1] on ``device`` (the inverse of
    :func:`as_uint8_frames` up to rounding)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def as_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``uint8 [f, H, W, 3]`` from uint8 frames (numpy or torch) or a float video ``[3, f, H, W]`` in [-1, 1]
    (the same frames pass through; other shapes and dtypes raise ValueError)."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            if frames.ndim != 4 or frames.shape[0] != 3:
                raise ValueError(f"a float video must be [3, f, H, W], got {tuple(frames.shape)}")
            return video_to_uint8(frames)
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [f, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Replicate the last row / column so H and W are even (yuv420p needs it): ``[f, H', W', 3]``."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _encoder_options(codec: str, crf: int) -> dict[str, str]:
    """Quality options: x264's constant rate factor without macroblock-tree rate control (:class:`VideoWriter`),
    or a matching fixed quantiser for MPEG-4 part 2."""
    if codec == "libx264":
        return {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
    q = str(max(2, min(31, round(crf / 6))))  # crf 18 -> q 3
    return {"qmin": q, "qmax": q}


def default_codec() -> str:
    """``libx264`` when this PyAV build has it, else ``mpeg4``."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class VideoWriter:
    """Stream frames into an MP4, written atomically: ``with VideoWriter(path) as w: w.write(chunk) ...``.

    H.264 (``libx264``, constant rate factor ``crf``: 0 lossless, 18 visually lossless, 23 default) in
    yuv420p, or MPEG-4 part 2 when libx264 is missing; the index is at the front of the file (``faststart``,
    so browsers can stream it). Odd heights / widths are padded by one replicated row / column, so such a
    video reads back one pixel larger. Frames go to a temporary file in the same directory, renamed to
    ``path`` when the block ends without error, so ``path`` is either absent (or its old version) or complete.
    x264's macroblock-tree rate control is off: with it on, this PyAV build encodes the same frames to pixels up
    to ~30 levels apart from one run to the next (it depends on memory the encoder did not write; 153 of the demo
    world's 480 files differed between two renders), so a seed's video, the demo's world and every other file
    come out the same bytes every time.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 8, crf: int = 18, codec: str | None = None):
        self.path, self.fps, self.crf, self.codec = Path(path), fps, crf, codec or default_codec()
        self.num_frames = 0
        self._container: Any = None
        self._stream: Any = None

    def __enter__(self) -> VideoWriter:
        av = _import_av()  # encoding threads log too

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self._container = av.open(self._tmp, mode="w", format="mp4", options={"movflags": "faststart"})
        return self

    def _add_stream(self, height: int, width: int) -> Any:
        """The video stream, created with the first frames' (even) size."""
        stream = self._container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = _encoder_options(self.codec, self.crf)
        return stream

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append frames ``uint8 [n, H, W, 3]`` or a video ``[3, n, H, W]`` in [-1, 1] (size as before)."""
        import av

        frames = _pad_to_even(as_uint8_frames(frames))
        if self._stream is None:
            self._stream = self._add_stream(*frames.shape[1:3])
        if frames.shape[1:3] != (self._stream.height, self._stream.width):
            raise ValueError(
                f"frames are {frames.shape[1:3]}, the video is {self._stream.height, self._stream.width}"
            )
        for frame in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.num_frames += len(frames)

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                if self.num_frames == 0:
                    raise ValueError(f"{self.path}: cannot write a video with no frames")
                self._container.mux(self._stream.encode())  # flush delayed frames
                self._container.close()
                os.replace(self._tmp, self.path)
        finally:
            try:
                self._container.close()  # a no-op once closed
            except Exception:  # a half-written file may not close cleanly; it is deleted either way
                pass
            Path(self._tmp).unlink(missing_ok=True)  # gone already after a successful rename


class FramesWriter:
    """Stream ``num_frames`` frames losslessly into a ``.npy`` file (``uint8 [f, H, W, 3]``, read back with
    ``np.load``), written atomically (:func:`pipelines.core.files.atomic_path`): for measuring what a model made,
    without the video codec's rounding (H.264 compresses a frame differently when the frames after it differ)."""

    def __init__(self, path: str | os.PathLike, num_frames: int):
        self.path, self.total, self.num_frames = Path(path), num_frames, 0
        self._array: np.memmap | None = None

    def __enter__(self) -> FramesWriter:
        self._target = atomic_path(self.path)
        self._tmp = self._target.__enter__()
        return self

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append frames ``uint8 [n, H, W, 3]`` or a video ``[3, n, H, W]`` in [-1, 1] (size as before)."""
        frames = as_uint8_frames(frames)
        if self._array is None:
            self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8,
                                                    shape=(self.total, *frames.shape[1:]))
        if frames.shape[1:] != self._array.shape[1:] or self.num_frames + len(frames) > self.total:
            raise ValueError(f"{self.path}: frames {frames.shape} do not fit the remaining "
                             f"{self.total - self.num_frames} of {self._array.shape}")
        self._array[self.num_frames : self.num_frames + len(frames)] = frames
        self.num_frames += len(frames)

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None and self.num_frames != self.total:
                raise ValueError(f"{self.path}: {self.num_frames} frames written, {self.total} declared")
            if self._array is not None:
                self._array.flush()
        except BaseException as error:  # the temporary file goes too
            exc_type, exc, traceback = type(error), error, error.__traceback__
            raise
        finally:
            self._array = None  # closes the map before the rename
            self._target.__exit__(exc_type, exc, traceback)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    fps: float = 8,
    crf: int = 18,
    codec: str | None = None,
) -> Path:
    """Write frames ``uint8 [f, H, W, 3]`` (or a video ``[3, f, H, W]`` in [-1, 1]) as an MP4, atomically;
    encoding as in :class:`VideoWriter`."""
    with VideoWriter(path, fps, crf, codec) as writer:
        writer.write(frames)
    return Path(path)


def write_gif(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float = 8) -> Path:
    """Write frames (as for :func:`write_video`) as a looping GIF, atomically (for viewing, not for data:
    256-colour palette, and Pillow merges identical consecutive frames into one longer frame)."""
    frames = as_uint8_frames(frames)
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    duration = max(20, round(1000 / fps))  # milliseconds; browsers slow down anything faster
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
