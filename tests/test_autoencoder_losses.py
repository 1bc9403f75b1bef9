"""The LDM autoencoder loss: LPIPS modes, the adaptive GAN weight, the discriminator schedule, hinge, KL."""

from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F

from autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    AutoencoderLoss,
    DiagonalGaussian,
    PatchDiscriminator,
    build_lpips,
)
from autoencoder.losses import hinge_d_loss, scaled_gradient, vanilla_d_loss

SHIPPED_LINEAR_LAYERS = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def tiny_vae() -> AutoencoderKL:
    config = AutoencoderConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4)
    return AutoencoderKL(config)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """torch hub's cache redirected to an empty directory; returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize(("net", "file"),
                         [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_missing_backbone_weights_name_the_file_and_nothing_loads(empty_torch_home, monkeypatch, net, file):
    monkeypatch.setattr(lpips, "LPIPS", lambda *a, **k: pytest.fail("LPIPS was constructed"))
    with pytest.raises(FileNotFoundError) as error:
        build_lpips("pretrained", net)
    message = str(error.value)
    assert str(empty_torch_home / file) in message and "'off'" in message and "\n" not in message
    with pytest.raises(FileNotFoundError):
        AutoencoderLoss(perceptual="pretrained", lpips_net=net)


def test_pretrained_mode_reads_the_backbone_from_the_hub_cache(empty_torch_home):
    torchvision = pytest.importorskip("torchvision")
    features = torchvision.models.alexnet(weights=None).state_dict()
    empty_torch_home.mkdir(parents=True)
    torch.save(features, empty_torch_home / "alexnet-owt-7be5be79.pth")
    metric = build_lpips("pretrained", "alex").metric
    for index in (0, 3, 6, 8, 10):  # alexnet's conv layers, spread over LPIPS' five slices
        slice_ = next(s for s in metric.net.children() if str(index) in s._modules)
        assert torch.equal(slice_._modules[str(index)].weight, features[f"features.{index}.weight"])
    shipped = torch.load(SHIPPED_LINEAR_LAYERS, map_location="cpu", weights_only=True)
    assert torch.equal(metric.lin0.model[1].weight, shipped["lin0.model.1.weight"])


def test_untrained_mode_is_frozen_eval_and_keeps_the_shipped_linear_layers():
    perceptual = build_lpips("untrained", "alex")
    assert all(not p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not any(m.training for m in perceptual.modules())
    shipped = torch.load(SHIPPED_LINEAR_LAYERS, map_location="cpu", weights_only=True)
    for key, value in shipped.items():
        assert torch.equal(perceptual.metric.state_dict()[key], value), key

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    distance = perceptual(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    assert perceptual(x, x).abs().max() < 1e-6
    distance.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0

    loss = AutoencoderLoss(perceptual="untrained").train()
    assert loss.training and not loss.perceptual.training


def test_off_mode_has_no_perceptual_term():
    assert build_lpips("none") is None
    loss = AutoencoderLoss(perceptual="none", reconstruction="l2")
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loss.reconstruction_loss(x, y), (x - y) ** 2)
    with pytest.raises(ValueError, match="perceptual mode"):
        build_lpips("imagenet")


def test_generator_loss_is_nll_plus_weighted_kl_before_disc_start():
    vae = tiny_vae()
    loss_fn = AutoencoderLoss(perceptual="none", disc_start=100, kl_weight=0.01, logvar_init=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, posterior = vae(x)
    loss, log = loss_fn(x, recon, posterior, optimizer_idx=0, global_step=99, last_layer=vae.last_layer)
    nll = ((x - recon).abs() / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2  # nll = rec / e^logvar + logvar
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum() / 2
    torch.testing.assert_close(loss, nll + 0.01 * kl)
    assert float(log["g_loss"]) == 0.0 and float(log["d_weight"]) == 0.0 and log["disc_factor"] == 0.0
    assert float(log["kl_loss"]) == pytest.approx(kl.item(), rel=1e-5)


def test_adaptive_weight_equals_the_gradient_norm_ratio():
    vae = tiny_vae()
    loss_fn = AutoencoderLoss(perceptual="none", disc_start=0, disc_weight=0.7, kl_weight=1e-6)
    disc = loss_fn.build_discriminator()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, posterior = vae(x)
    loss, log = loss_fn(x, recon, posterior, optimizer_idx=0, global_step=0, last_layer=vae.last_layer,
                        discriminator=disc)

    nll = (x - recon).abs().sum() / 2  # logvar = 0
    g_loss = -disc(recon).mean()
    (nll_grad,) = torch.autograd.grad(nll, vae.last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, vae.last_layer, retain_graph=True)
    expected = min(nll_grad.norm().item() / (g_grad.norm().item() + 1e-4), 1e4) * 0.7
    assert float(log["d_weight"]) == pytest.approx(expected, rel=1e-5)
    assert float(log["g_loss"]) == pytest.approx(g_loss.item(), rel=1e-5)
    kl = posterior.kl().sum() / 2
    torch.testing.assert_close(loss, nll + 1e-6 * kl + expected * g_loss, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # validation: no graph, so no adaptive weight (as in LDM)
        _, log = loss_fn(x, recon.detach(), posterior, optimizer_idx=0, global_step=0, discriminator=disc)
    assert float(log["d_weight"]) == 0.0


def test_discriminator_term_is_zero_before_disc_start_and_on_after():
    vae, loss_fn = tiny_vae(), AutoencoderLoss(perceptual="none", disc_start=10)
    disc = loss_fn.build_discriminator()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, posterior = vae(x)
    before, log = loss_fn(x, recon, posterior, optimizer_idx=1, global_step=9, discriminator=disc)
    assert before.item() == 0.0 and before.requires_grad and log["disc_factor"] == 0.0
    after, log = loss_fn(x, recon, posterior, optimizer_idx=1, global_step=10, discriminator=disc)
    assert after.item() > 0.0 and log["disc_factor"] == 1.0
    after.backward()
    assert vae.last_layer.grad is None  # the discriminator loss sees detached frames
    assert disc.main[0].weight.grad.abs().sum() > 0

    generator_before, _ = loss_fn(x, recon, posterior, 0, global_step=9, last_layer=vae.last_layer)  # no D needed
    generator_after, log = loss_fn(x, recon, posterior, 0, global_step=10, last_layer=vae.last_layer,
                                   discriminator=disc)
    assert float(log["d_weight"]) > 0 and generator_after.item() != generator_before.item()
    with pytest.raises(ValueError, match="discriminator"):
        loss_fn(x, recon, posterior, 1, global_step=10)
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss_fn(x, recon, posterior, 2, global_step=0)


def test_hinge_and_vanilla_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2] (mean 1)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    softplus = lambda v: torch.log1p(torch.exp(torch.tensor(v))).item()
    expected = 0.5 * ((softplus(-2.0) + softplus(-0.5) + softplus(1.0)) / 3 + (softplus(-2.0) + softplus(0.0)
                                                                                + softplus(1.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


def test_kl_matches_the_closed_form():
    moments = torch.randn(3, 8, 5, 5)
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    standard = torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(normal, standard).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    zero = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert zero.kl().item() == 0.0


def test_patch_discriminator_layout_and_init():
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.bias is None for c in convs] == [False, True, True, True, False]  # no bias before BatchNorm
    assert abs(torch.cat([c.weight.flatten() for c in convs]).std().item() - 0.02) < 0.002
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in PatchDiscriminator(norm="group").modules())
    negative = torch.tensor(-1.0)
    assert disc.main[1](negative).item() == pytest.approx(F.leaky_relu(negative, 0.2).item())


def test_the_adaptive_weight_under_fp16_takes_gradients_of_scaled_losses():
    """Under fp16 a small loss's gradient underflows in half precision (below 6e-8) and λ comes out 0; through the
    GradScaler's scale (:func:`scaled_gradient`) it is the fp32 ratio. Here the losses are 1e-9 and 2e-9 times a
    sum behind a half-precision product over 2^20 rows: each row's gradient underflows, their sum at W does not."""
    weight = torch.nn.Parameter(torch.ones(4, 4))
    x = torch.rand(2**20, 4) + 0.5
    loss_fn = AutoencoderLoss(perceptual="none", disc_weight=1.0)

    def losses(dtype):
        y = (x.to(dtype) @ weight.to(dtype)).float()  # the graph runs through fp16, as under autocast
        return 1e-9 * y.sum(), 2e-9 * y.sum()

    expected = float(loss_fn.adaptive_weight(*losses(torch.float32), weight))
    assert expected == pytest.approx(0.5, rel=0.05)  # the ratio of the gradients (plus the 1e-4 in the denominator)
    assert float(loss_fn.adaptive_weight(*losses(torch.float16), weight)) == 0.0  # both gradients underflowed
    scale = torch.amp.GradScaler("cpu", init_scale=2.0**16).scale
    weighted = loss_fn.adaptive_weight(*losses(torch.float16), weight, scaled_gradient(scale))
    assert float(weighted) == pytest.approx(expected, rel=1e-2)
