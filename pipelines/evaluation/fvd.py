"""Fréchet Video Distance (Unterthiner et al. 2018, "Towards Accurate Generative Models of Video") and Kernel Video
Distance (KID's MMD, Bińkowski et al. 2018, "Demystifying MMD GANs", on video features), computed exactly as
StyleGAN-V (Skorokhodov et al. 2022) computes them, on a local copy of its I3D detector.

Protocol, with the StyleGAN-V lines (``universome/stylegan-v``) each choice follows:

* **Detector**: the TorchScript port of the Kinetics-400 I3D that Google's FVD uses (tf.hub weights),
  ``i3d_torchscript.pt`` from ``detector_url = 'https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1'``
  (``src/metrics/frechet_video_distance.py``), loaded with ``torch.jit.load(f).eval()``
  (``metric_utils.get_feature_detector``). It is never downloaded here: :func:`load_i3d` reads a local file.
* **Call**: ``detector(videos, **detector_kwargs)`` with
  ``detector_kwargs = dict(rescale=True, resize=True, return_features=True)`` ("Return raw features before the
  softmax layer"), so the detector maps pixels [0, 255] to [-1, 1] and resizes frames to 224 × 224 itself.
  (``rescale=False, resize=False`` appear only in the ``universome/fvd-comparison`` checks, which feed
  already-preprocessed 224² float videos; the metric itself uses ``True, True``.)
* **Input**: uint8 clips ``[b, c, t, h, w]`` (``images.permute(0, 2, 1, 3, 4)  # [batch_size, c, t, h, w]``,
  ``metric_utils.compute_feature_stats_for_dataset``), at the videos' own resolution (the dataset's
  ``resolution`` argument is "Unused"); a float video in [-1, 1] is quantised as StyleGAN-V quantises
  generator output, ``(img * 127.5 + 128).clamp(0, 255).to(torch.uint8)``. Our one addition: the optional
  ``metrics.resolution``: a common square size first (antialiased bilinear), for folders of different sizes.
* **Clips**: ``fvd2048_16f`` → ``compute_fvd(opts, max_real=2048, num_gen=2048, num_frames=16)``
  (``metric_main.py``): at most 2048 clips per side, 16 consecutive frames each, every ``subsample_factor``-th
  frame (``frames_idx = np.arange(0, n * subsample_factor, subsample_factor) + random_offset``). Real clips
  start at a random offset, ``random.randint(0, num_frames_available - n * subsample_factor + subsample_factor
  - 1)`` (``load_n_consecutive_random_offset=True``, ``training/dataset.py``); generated videos read as a dataset
  start at frame 0 (``gen_opts.dataset_kwargs.load_n_consecutive_random_offset = False``). Videos shorter than a
  clip are dropped (``discard_short_videos = True``); the first usable files are taken in sorted order
  (``max_size=None``, sequential ``item_subset``). Our offsets come from a seeded generator, not ``random``.
* **Statistics**: mean and covariance accumulated in float64 with the biased (``1 / N``) covariance,
  ``cov = raw_cov / num_items - np.outer(mean, mean)`` (``FeatureStats.get_mean_cov``).
* **Distance**: ``m = np.square(mu_gen - mu_real).sum()``;
  ``s, _ = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real), disp=False)``;
  ``fid = np.real(m + np.trace(sigma_gen + sigma_real - s * 2))``. Only when that is not finite (a singular
  product) do we retry with ``1e-6 · I`` added to both covariances, as pytorch-fid does.
* **KVD**: StyleGAN-V's ``kernel_inception_distance.compute_kid`` (StyleGAN2-ADA's, after Bińkowski et al.),
  on the same I3D features: ``num_subsets=100``, ``max_subset_size=1000``, subsets drawn without replacement,
  ``k(x, y) = (x · y / d + 1) ** 3``, unbiased within-set terms. StyleGAN-V reports ``float(kid) * 1000.0``;
  :func:`kernel_distance` returns the raw MMD² (StyleGAN2-ADA's scale), and the report gives both.
* **Precision**: StyleGAN-V's metric scripts set ``torch.backends.cuda.matmul.allow_tf32 = False`` and
  ``torch.backends.cudnn.allow_tf32 = False``; :class:`FeatureExtractor` does the same while it runs.

Features are extracted batch by batch: only one batch of clips' pixels is in memory at a time (the features,
``[n, d]`` with d = 400 for the I3D, are kept for KVD).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from pipelines.core.config import UserError

I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"  # StyleGAN-V's detector_url
DETECTOR_KWARGS = {"rescale": True, "resize": True, "return_features": True}  # StyleGAN-V's detector_kwargs
COVARIANCE_EPS = 1e-6  # pytorch-fid's offset, used only when the plain formula is not finite


def i3d_hint() -> str:
    """One line: which file FVD / KVD need, where to get it, and which key to set."""
    return (f"FVD / KVD need StyleGAN-V's I3D detector {I3D_FILE}: download it from {I3D_URL} "
            f"and set metrics.i3d=/path/to/{I3D_FILE}")


def load_i3d(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """StyleGAN-V's TorchScript I3D from a local file, in eval mode on ``device``.

    Raises:
        UserError: ``path`` is None, missing, or not a TorchScript file (one line naming ``i3d_torchscript.pt``,
            the key ``metrics.i3d`` and where to download the file). Nothing is downloaded.
    """
    if path is None:
        raise UserError(i3d_hint())
    if not Path(path).is_file():
        raise UserError(f"metrics.i3d={path} does not exist; {i3d_hint()}")
    try:
        detector = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"metrics.i3d={path} is not a TorchScript file ({first}); {i3d_hint()}") from None
    return detector.eval()


# ---------------------------------------------------------------------------------------------- clips


def fvd_clip_indices(num_frames: int, frames: int, stride: int = 1, start: str = "first",
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices ``[frames]`` of one clip of a ``num_frames``-frame video: every ``stride``-th frame from
    frame 0 (``start="first"``) or from a uniformly random offset in ``[0, num_frames - frames * stride +
    stride - 1]`` (``"random"``, StyleGAN-V's real clips; needs ``rng``).

    Raises:
        ValueError: the video is shorter than ``frames * stride`` frames (StyleGAN-V discards such videos).
    """
    span = frames * stride
    if num_frames < span:
        raise ValueError(f"too short: {num_frames} frames, a clip needs {span}")
    offset = 0
    if start == "random":
        if rng is None:
            raise ValueError("a random clip start needs a generator")
        offset = int(rng.integers(0, num_frames - span + stride))
    elif start != "first":
        raise ValueError(f"clip start must be 'first' or 'random', got {start!r}")
    return np.arange(0, span, stride) + offset


def to_detector_input(videos: torch.Tensor | np.ndarray, resolution: int | None = None) -> torch.Tensor:
    """uint8 ``[b, 3, f, h, w]`` for the I3D.

    ``videos`` is uint8 frames ``[b, f, H, W, 3]`` (as decoded), or a float video ``[b, 3, f, H, W]`` in [-1, 1]
    (the project layout; quantised as StyleGAN-V quantises generator output). With ``resolution``, frames are
    resized to ``resolution × resolution`` first (bilinear, antialiased when shrinking) and rounded back to uint8.
    """
    if isinstance(videos, np.ndarray):
        videos = torch.from_numpy(np.ascontiguousarray(videos))
    if videos.dtype == torch.uint8:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"uint8 clips must be [b, f, H, W, 3], got {tuple(videos.shape)}")
        videos = videos.permute(0, 4, 1, 2, 3)  # [b, 3, f, H, W]
    else:
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"float videos must be [b, 3, f, H, W] in [-1, 1], got {tuple(videos.shape)}")
        videos = (videos * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # StyleGAN-V's run_generator
    if resolution is not None and tuple(videos.shape[-2:]) != (resolution, resolution):
        b, c, f, h, w = videos.shape
        frames = videos.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float()
        frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False,
                               antialias=resolution < min(h, w))
        videos = frames.round().clamp(0, 255).to(torch.uint8).reshape(b, f, c, resolution, resolution)
        videos = videos.permute(0, 2, 1, 3, 4)
    return videos.contiguous()


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions while the block runs (StyleGAN-V's metric scripts), then restored."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def detector_device(detector: torch.nn.Module) -> torch.device:
    """Where a detector's weights live (its first parameter or buffer; the CPU when it has neither)."""
    for tensor in (*detector.parameters(), *detector.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def i3d_features(detector: torch.nn.Module, videos: torch.Tensor, device: torch.device | None = None) -> np.ndarray:
    """Pre-softmax I3D features ``[b, d]`` (float64) of ``videos``, StyleGAN-V's call:
    ``detector(videos, rescale=True, resize=True, return_features=True)``.

    ``videos``: uint8 ``[b, 3, t, h, w]`` in [0, 255] (what StyleGAN-V feeds; see :func:`to_detector_input`), or a
    float video ``[b, 3, t, h, w]`` in [-1, 1], quantised to uint8 the way StyleGAN-V quantises generator output.
    It is moved to ``device`` (default: where the detector's weights are).
    """
    if videos.dtype != torch.uint8:
        videos = (videos * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [b, 3, t, h, w], got {tuple(videos.shape)}")
    device = device if device is not None else detector_device(detector)
    with _no_tf32():
        features = detector(videos.to(device), **DETECTOR_KWARGS)
    if features.ndim != 2 or features.shape[0] != videos.shape[0]:
        raise ValueError(f"the detector returned {tuple(features.shape)}, not features [b, d]")
    return features.float().cpu().numpy().astype(np.float64)  # StyleGAN-V: float32, accumulated in float64


class FeatureExtractor:
    """Collects clips into batches for the I3D and keeps only their features: pixels of one batch at most.

    ``add(clip)`` takes uint8 frames ``[f, H, W, 3]`` (resized to ``resolution²`` at once when given); a batch runs
    when it holds ``batch_size`` clips, when a clip of another size arrives (with ``resolution=None`` clips keep
    their own size, and the detector resizes each batch itself), or at :meth:`features`.
    """

    def __init__(self, detector: torch.nn.Module, batch_size: int = 16, resolution: int | None = None,
                 device: torch.device | None = None):
        self.detector, self.batch_size, self.resolution = detector, batch_size, resolution
        self.device = device if device is not None else detector_device(detector)
        self._pending: list[torch.Tensor] = []  # uint8 [1, 3, f, h, w] each
        self._done: list[np.ndarray] = []

    def add(self, clip: np.ndarray) -> None:
        """Queue one clip ``uint8 [f, H, W, 3]``."""
        video = to_detector_input(clip[None], self.resolution)
        if self._pending and video.shape != self._pending[0].shape:
            self._flush()
        self._pending.append(video)
        if len(self._pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            batch = torch.cat(self._pending)  # [b, 3, f, h, w]
            self._done.append(i3d_features(self.detector, batch, self.device))
            self._pending = []

    def features(self) -> np.ndarray:
        """All features so far, ``[n, d]`` float64 (``[0, 0]`` when no clip was added)."""
        self._flush()
        return np.concatenate(self._done) if self._done else np.zeros((0, 0))


def extract_features(detector: torch.nn.Module, clips: Iterable[np.ndarray], batch_size: int = 16,
                     resolution: int | None = None, device: torch.device | None = None) -> np.ndarray:
    """I3D features ``[n, d]`` of clips ``uint8 [f, H, W, 3]`` streamed from any iterable (e.g. decoded files)."""
    extractor = FeatureExtractor(detector, batch_size, resolution, device)
    for clip in clips:
        extractor.add(clip)
    return extractor.features()


# ---------------------------------------------------------------------------------------------- distances


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and biased (``1 / N``) covariance ``[d, d]`` of ``features [n, d]`` in float64, as StyleGAN-V's
    ``FeatureStats.get_mean_cov``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be [n, d] with n >= 1, got {x.shape}")
    mean = x.sum(axis=0) / len(x)
    return mean, x.T @ x / len(x) - np.outer(mean, mean)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians, ``||mu1 − mu2||² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` (float64, real part of
    ``scipy.linalg.sqrtm``). ``mu`` are ``[d]``, ``sigma`` ``[d, d]``."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    m = float(np.square(mu1 - mu2).sum())

    def trace_term(s1: np.ndarray, s2: np.ndarray) -> float:
        root = scipy.linalg.sqrtm(s1 @ s2)
        return float(np.real(np.trace(s1 + s2 - 2 * root)))

    value = m + trace_term(sigma1, sigma2)
    if not np.isfinite(value):
        offset = COVARIANCE_EPS * np.eye(len(mu1))
        value = m + trace_term(sigma1 + offset, sigma2 + offset)
    return float(value)


def fvd_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FVD between two sets of I3D features ``[n_a, d]`` and ``[n_b, d]``: the Fréchet distance of their means
    and biased covariances."""
    return frechet_distance(*mean_cov(feats_a), *mean_cov(feats_b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x · y / d + 1)³`` for ``x [n, d]``, ``y [m, d]``: ``[n, m]``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_distance(feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> float:
    """KVD: the unbiased polynomial-kernel MMD² of ``feats_a [n_a, d]`` and ``feats_b [n_b, d]``, averaged over
    ``num_subsets`` subsets of ``m = min(n_a, n_b, subset_size)`` rows of each, drawn without replacement
    (StyleGAN-V / StyleGAN2-ADA ``compute_kid``, after Bińkowski et al. 2018), per subset

        (Σ_{i≠j} k(a_i, a_j) + k(b_i, b_j)) / (m (m − 1)) − 2 Σ_{i,j} k(a_i, b_j) / m².

    The raw value (StyleGAN-V reports it × 1000). Subsets come from ``numpy.random.default_rng(seed)``.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError(f"KVD needs at least 2 samples per side, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        within = polynomial_kernel(x, x) + polynomial_kernel(y, y)
        across = polynomial_kernel(x, y)
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - across.sum() * 2 / m
    return float(total / num_subsets / m)
