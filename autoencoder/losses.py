"""LDM's autoencoder objective (``LPIPSWithDiscriminator``; docs/method.md, "KL autoencoder").

Generator (``optimizer_idx`` 0), for a batch of n frames:
    rec = |x − x̂| (or (x − x̂)²) + perceptual_weight · LPIPS(x, x̂)            per pixel, LPIPS broadcast
    nll = Σ (rec / e^{logvar} + logvar) / n                                    one learned scalar logvar
    L   = nll + kl_weight · Σ KL / n + λ · disc_factor · g_loss,  g_loss = −mean D(x̂)
    λ   = clamp(‖∇_W nll‖ / (‖∇_W g_loss‖ + 1e-4), 0, 1e4) · disc_weight       W = the decoder's last layer
Discriminator (``optimizer_idx`` 1): disc_factor · hinge (or vanilla) loss on D(x), D(x̂).
``disc_factor`` is 0 before ``disc_start`` (a global step), so the GAN terms are off until then.

The discriminator D is a network of its own (:class:`PatchDiscriminator`), passed to the losses that use it, so a
trainer can wrap it for data parallelism apart from the VAE; logged values stay tensors (read when a log row is
written, not at every step).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.config import AutoencoderLossConfig, DiscNorm, LpipsNet, PerceptualMode
from autoencoder.model import DiagonalGaussian

Log = dict[str, torch.Tensor | float]
Critic = Callable[[torch.Tensor], torch.Tensor]  # frames [n, c, H, W] -> patch logits
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class FrozenLPIPS(nn.Module):
    """LPIPS distance ``[n]`` between frames ``[n, 3, H, W]`` in [-1, 1]; frozen, and always in eval mode."""

    def __init__(self, metric: lpips.LPIPS):
        super().__init__()
        self.metric = metric.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenLPIPS:
        """Stays in eval mode whatever the parent asks (LPIPS' dropout must never be active)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.metric(x, y).flatten()


def backbone_path(net: str) -> Path:
    """Where torch hub caches the torchvision ImageNet weights that LPIPS ``net`` needs."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _load_backbone(metric: lpips.LPIPS, path: Path) -> None:
    """Copy torchvision ``features.{i}`` weights from ``path`` into LPIPS' ``net.slice{s}.{i}`` layers."""
    features = torch.load(path, map_location="cpu", weights_only=True)
    state = {key: features["features." + key.split(".", 1)[1]] for key in metric.net.state_dict()}
    metric.net.load_state_dict(state)


def build_lpips(mode: PerceptualMode = "pretrained", net: LpipsNet = "alex") -> FrozenLPIPS | None:
    """The perceptual metric, or ``None`` for mode "none".

    "pretrained": the lpips package's linear layers on the ImageNet backbone, read from torch hub's cache
    (never downloaded: a missing file is a ``FileNotFoundError`` saying where to put it). "untrained": the
    shipped linear layers on a randomly initialised backbone (``pnet_rand=True``), for tests and offline
    smoke runs.
    """
    if mode == "none":
        return None
    if mode not in ("pretrained", "untrained") or net not in BACKBONE_FILES:
        raise ValueError(f"perceptual mode must be 'pretrained', 'untrained' or 'none' and net 'alex' or "
                         f"'vgg', got {mode!r}, {net!r}")
    path = backbone_path(net)
    if mode == "pretrained" and not path.is_file():
        raise FileNotFoundError(f"LPIPS needs the torchvision {net} ImageNet weights: put {path.name} at "
                                f"{path} (or set TORCH_HOME), or use perceptual mode 'off' or 'untrained'")
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated ``pretrained=False``
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        metric = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if mode == "pretrained":
        _load_backbone(metric, path)
    return FrozenLPIPS(metric)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayerDiscriminator): frames [n, c, H, W] → logits [n, 1, h', w'] per patch.

    4×4 convs 64 → 128 → 256 → 512 → 1 (for ``num_layers`` = 3), LeakyReLU 0.2, a norm after every conv but
    the first and last; weights ~ N(0, 0.02), norm scales ~ N(1, 0.02).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3,
                 norm: DiscNorm = "batch"):
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=norm != "batch"),
                       _norm(norm, widths[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(32, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be 'batch', 'group' or 'none', got {kind!r}")


def _init_weights(module: nn.Module) -> None:
    """pix2pix init: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean softplus(−D(x)) + mean softplus(D(x̂))), the non-saturating GAN loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def _detached(log: dict[str, torch.Tensor | float]) -> Log:
    """The log's scalars, tensors detached (no value is read back here)."""
    return {key: value.detach() if isinstance(value, torch.Tensor) else value for key, value in log.items()}


def loss_gradient(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """∇_W loss, keeping the graph (the adaptive weight differentiates two losses of one graph)."""
    return torch.autograd.grad(loss, weight, retain_graph=True)[0]


def scaled_gradient(scale: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """:func:`loss_gradient` of ``scale(loss)``, divided back: under fp16 autocast the GradScaler's scale (``scale``
    is ``GradScaler.scale``) keeps a small loss's gradient from underflowing in half precision, as it does for the
    training backward."""
    def gradient(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        factor = scale(torch.ones((), device=loss.device))
        return loss_gradient(scale(loss), weight) / factor

    return gradient


class AutoencoderLoss(nn.Module):
    """LDM's LPIPSWithDiscriminator (module docstring): the generator and discriminator losses of the VAE, with the
    learned log-variance and the frozen LPIPS; the discriminator is passed in."""

    def __init__(self, config: AutoencoderLossConfig | None = None, in_channels: int = 3, **overrides):
        """``config`` (defaults: LDM's KL-f8 recipe) with any of its fields overridden by keyword."""
        super().__init__()
        cfg = dataclasses.replace(config or AutoencoderLossConfig(), **overrides)
        if cfg.reconstruction not in ("l1", "l2") or cfg.disc_loss not in DISC_LOSSES:
            raise ValueError(f"reconstruction must be 'l1' or 'l2' and disc_loss 'hinge' or 'vanilla', "
                             f"got {cfg.reconstruction!r}, {cfg.disc_loss!r}")
        self.config, self.in_channels = cfg, in_channels
        self.disc_start, self.disc_factor, self.disc_weight = cfg.disc_start, cfg.disc_factor, cfg.disc_weight
        self.kl_weight, self.perceptual_weight = cfg.kl_weight, cfg.perceptual_weight
        self.reconstruction = cfg.reconstruction
        self.perceptual = build_lpips(cfg.perceptual, cfg.lpips_net)
        self.disc_loss = DISC_LOSSES[cfg.disc_loss]
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)))

    def build_discriminator(self) -> PatchDiscriminator:
        """The PatchGAN of the config (depth, norm) for frames of ``in_channels``."""
        return PatchDiscriminator(self.in_channels, num_layers=self.config.disc_num_layers, norm=self.config.disc_norm)

    def forward(self, inputs: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                discriminator: Critic | None = None, gradient: Callable = loss_gradient) -> tuple[torch.Tensor, Log]:
        """(loss, log) for frames ``inputs`` and ``recon`` ``[n, c, H, W]`` in [-1, 1].

        ``optimizer_idx`` 0 is the VAE (generator) loss, which needs ``last_layer`` (``vae.last_layer``) and the
        ``discriminator`` once the discriminator is on; 1 is the discriminator loss.
        """
        if optimizer_idx == 0:
            return self.generator_loss(inputs, recon, posterior, global_step, last_layer, discriminator, gradient)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, recon, global_step, discriminator)
        raise ValueError(f"optimizer_idx must be 0 (generator) or 1 (discriminator), got {optimizer_idx}")

    def active_disc_factor(self, global_step: int) -> float:
        """``disc_factor`` from ``disc_start`` on, 0 before."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def reconstruction_loss(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """rec = |x − x̂| or (x − x̂)², + perceptual_weight · LPIPS(x, x̂) on every pixel; [n, c, H, W]."""
        diff = inputs - recon
        rec = diff.abs() if self.reconstruction == "l1" else diff.pow(2)
        if self.perceptual is not None and self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual(inputs, recon)[:, None, None, None]
        return rec

    def adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None,
                        gradient: Callable = loss_gradient) -> torch.Tensor:
        """λ = clamp(‖∇_W nll‖ / (‖∇_W g_loss‖ + 1e-4), 0, 1e4) · disc_weight at W = ``last_layer``, detached;
        ``gradient(loss, W)`` takes each ∇ (:func:`scaled_gradient` under fp16; a trainer may average them over
        processes, so λ is the global batch's).

        Without a graph (validation under ``no_grad``) λ is 0, as in LDM.
        """
        if not nll_loss.requires_grad:
            return torch.zeros((), device=nll_loss.device)
        if last_layer is None:
            raise ValueError("last_layer (vae.last_layer) is required once the discriminator is on")
        ratio = gradient(nll_loss, last_layer).norm() / (gradient(g_loss, last_layer).norm() + 1e-4)
        return ratio.clamp(0.0, 1e4).detach() * self.disc_weight

    def generator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian,
                       global_step: int, last_layer: torch.Tensor | None, discriminator: Critic | None = None,
                       gradient: Callable = loss_gradient) -> tuple[torch.Tensor, Log]:
        """L = nll + kl_weight · KL + λ · disc_factor · g_loss (module docstring); no GAN term while off."""
        n = inputs.shape[0]
        rec = self.reconstruction_loss(inputs, recon)
        nll_loss = (rec / torch.exp(self.logvar) + self.logvar).sum() / n
        kl_loss = posterior.kl().sum() / n
        disc_factor = self.active_disc_factor(global_step)
        g_loss = d_weight = torch.zeros((), device=inputs.device)
        if disc_factor > 0:
            g_loss = -_critic(discriminator)(recon).mean()
            d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer, gradient)
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {"total_loss": loss, "nll_loss": nll_loss, "rec_loss": rec.mean(), "kl_loss": kl_loss,
               "logvar": self.logvar, "g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor}
        return loss, _detached(log)

    def discriminator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, global_step: int,
                           discriminator: Critic | None = None) -> tuple[torch.Tensor, Log]:
        """disc_factor · d_loss(D(x), D(x̂)) on detached frames (0 before ``disc_start``, with a graph)."""
        critic = _critic(discriminator)
        logits_real = critic(inputs.detach())
        logits_fake = critic(recon.detach())
        disc_factor = self.active_disc_factor(global_step)
        loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean(),
               "disc_factor": disc_factor}
        return loss, _detached(log)


def _critic(discriminator: Critic | None) -> Critic:
    if discriminator is None:
        raise ValueError("the GAN terms need the discriminator (AutoencoderLoss.build_discriminator())")
    return discriminator
