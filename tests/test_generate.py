"""Long-video generation: autoregressive extension and the hierarchical mode, on a random tiny model."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffusion import NoiseSchedule, classifier_free_guidance, known_inputs
from pipelines.core.config import UserError, load_config
from pipelines.demo.grading import generated_frames
from pipelines.media.video_io import read_frames
from pipelines.models.config import DiffusionModelConfig, SamplingConfig, TextConfig
from pipelines.models.diffusion import DiffusionBundle
from pipelines.models.text import SmallTextEncoder
from pipelines.stages.configs import GenerateConfig
from pipelines.stages.generate import Plan, _chunk_count, autoregressive, generate, hierarchical
from tests.models import tiny_denoiser

PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def bundle() -> DiffusionBundle:
    torch.manual_seed(0)
    text = SmallTextEncoder(width=12, layers=1, heads=2, context_length=8, vocab_size=256).eval()
    return DiffusionBundle(denoiser=tiny_denoiser("v"), text_encoder=text, text=TextConfig(width=12),
                           model=DiffusionModelConfig(schedule=NoiseSchedule()), latent_shape=[4, 6, 8, 8],
                           autoencoder=None)


def _plan(total, method="reconstruction", chunk=6, context=2):
    return Plan(total, chunk, context, method, 2.0, 0.0, SamplingConfig(sampler="ddim", steps=3, guidance=1.5))


def test_autoregressive_extension_lengths_and_boundaries(bundle):
    chunks = []
    with torch.no_grad():
        latents, boundaries = autoregressive(bundle, PROMPTS, _plan(20), torch.Generator().manual_seed(0),
                                             on_chunk=chunks.append)
    assert latents.shape == (2, 4, 20, 8, 8) and torch.isfinite(latents).all()
    assert boundaries == [6, 10, 14, 18]
    assert [c.shape[2] for c in chunks] == [6, 4, 4, 4, 4]
    assert len(chunks) == _chunk_count(_plan(20), GenerateConfig())


def test_methods_share_the_first_chunk_and_differ_after(bundle):
    """Same seed: the first chunk is identical; conditioning makes the extensions differ."""
    out = {}
    for method in ("reconstruction", "replacement"):
        with torch.no_grad():
            out[method], _ = autoregressive(bundle, PROMPTS, _plan(10, method), torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["reconstruction"][:, :, :6], out["replacement"][:, :, :6])
    assert not torch.allclose(out["reconstruction"][:, :, 6:], out["replacement"][:, :, 6:])
    again, _ = autoregressive(bundle, PROMPTS, _plan(10), torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, out["reconstruction"])  # deterministic given the seed


@torch.no_grad()
def test_extension_chunks_are_sampled_without_frame_positions(bundle):
    """Only the chunk that starts a video gets frame positions; the chunks that continue it are told
    ``video_start=False``, and a network without positions uses one callable for both."""
    first, later = bundle.chunk_denoisers(PROMPTS, 1.5)
    assert later() is first and later(torch.zeros(2, 4, 2, 8, 8), [0, 1], 6) is first
    positioned = dataclasses.replace(bundle, denoiser=tiny_denoiser("v", frame_positions=6))
    first, later = positioned.chunk_denoisers(PROMPTS, 1.5)
    z, logsnr = torch.randn(2, 4, 6, 8, 8), torch.tensor([-1.0, 1.0])
    reference = classifier_free_guidance(positioned.denoiser, positioned.embed(PROMPTS), positioned.null(), 1.5,
                                         video_start=False)
    torch.testing.assert_close(later()(z, logsnr), reference(z, logsnr))
    assert not torch.allclose(first(z, logsnr), later()(z, logsnr), atol=1e-4)


@torch.no_grad()
def test_a_network_trained_with_known_frames_is_given_the_context(bundle):
    """``unet.known_frames``: every extension chunk's denoiser gets the context frames as network input at
    their places in the chunk (and the guidance on top); the first chunk and hierarchical infill get none."""
    given = dataclasses.replace(bundle, denoiser=tiny_denoiser("v", known_frames=True))
    first, later = given.chunk_denoisers(PROMPTS, 1.5)
    context = torch.randn(2, 4, 2, 8, 8)
    z, logsnr = torch.randn(2, 4, 6, 8, 8), torch.tensor([-1.0, 1.0])
    reference = classifier_free_guidance(given.denoiser, given.embed(PROMPTS), given.null(), 1.5,
                                         **known_inputs(context, [0, 1], 6))
    torch.testing.assert_close(later(context, [0, 1], 6)(z, logsnr), reference(z, logsnr))
    assert later() is first and not torch.allclose(first(z, logsnr), reference(z, logsnr), atol=1e-4)
    with pytest.raises(ValueError, match="indices"):
        known_inputs(context, [5, 6], 6)
    latents, boundaries = autoregressive(given, PROMPTS, _plan(14), torch.Generator().manual_seed(0))
    plain, _ = autoregressive(dataclasses.replace(given, denoiser=_without_known_frames(given.denoiser)), PROMPTS,
                              _plan(14), torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 14, 8, 8) and boundaries == [6, 10]
    torch.testing.assert_close(latents[:, :, :6], plain[:, :, :6])  # the first chunk is given nothing
    assert not torch.allclose(latents[:, :, 6:], plain[:, :, 6:], atol=1e-4)


@torch.no_grad()
def test_context_guidance_extrapolates_each_extension_from_the_network_not_given_the_context(bundle):
    """``context_guidance`` = w_c: an extension chunk is sampled with ``x̂ + w_c (x̂ − x̂ without the context
    input)``; the first chunk (given nothing) is unchanged, and w_c = 0 is the plain extension."""
    given = dataclasses.replace(bundle, denoiser=tiny_denoiser("v", known_frames=True))
    plain, _ = autoregressive(given, PROMPTS, _plan(14), torch.Generator().manual_seed(0))
    guided, _ = autoregressive(given, PROMPTS, dataclasses.replace(_plan(14), context_guidance=2.0),
                               torch.Generator().manual_seed(0))
    torch.testing.assert_close(guided[:, :, :6], plain[:, :, :6])
    assert not torch.allclose(guided[:, :, 6:], plain[:, :, 6:], atol=1e-4)
    zero, _ = autoregressive(given, PROMPTS, dataclasses.replace(_plan(14), context_guidance=0.0),
                             torch.Generator().manual_seed(0))
    torch.testing.assert_close(zero, plain)
    with pytest.raises(ValueError, match="context_guidance"):
        GenerateConfig(context_guidance=-1.0)


def _without_known_frames(denoiser):
    """The same network with the known-frame input channels cut off (their weights dropped)."""
    config = dataclasses.replace(denoiser.net.config, known_frames=False)
    net = type(denoiser.net)(config)
    state = denoiser.net.state_dict()
    net.load_state_dict({**state, "conv_in.weight": state["conv_in.weight"][:, : config.in_channels]})
    return type(denoiser)(net, denoiser.prediction).eval()


def test_context_must_be_shorter_than_the_chunk(bundle):
    with pytest.raises(UserError, match="context_frames"):
        autoregressive(bundle, PROMPTS, _plan(10, context=6), torch.Generator())
    with pytest.raises(UserError, match="anchor_frames"):
        autoregressive(bundle, PROMPTS, dataclasses.replace(_plan(10, context=3), anchor=3), torch.Generator())
    with pytest.raises(ValueError, match="anchor_frames"):
        GenerateConfig(chunk_frames=6, context_frames=3, anchor_frames=3)


@torch.no_grad()
def test_anchor_frames_condition_every_extension_on_the_first_chunk(bundle, monkeypatch):
    """``anchor_frames`` = m: each extension chunk is conditioned on m frames spread over the first chunk, placed
    before the last ``context`` frames, and samples ``chunk − m − context`` new frames."""
    import pipelines.stages.generate as generate_module

    seen = []
    real = generate_module.temporal_conditioning

    def spy(denoise, x_known, frame_index, *args):
        seen.append((x_known.clone(), list(frame_index)))
        return real(denoise, x_known, frame_index, *args)

    monkeypatch.setattr(generate_module, "temporal_conditioning", spy)
    plan = dataclasses.replace(_plan(14), anchor=2)
    latents, boundaries = autoregressive(bundle, PROMPTS, plan, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 14, 8, 8) and boundaries == [6, 8, 10, 12]
    assert len(seen) == 4 == _chunk_count(plan, GenerateConfig()) - 1
    assert generate_module.anchor_index(6, 2) == [2, 3] and generate_module.anchor_index(16, 1) == [8]
    for (known, index), start in zip(seen, boundaries):
        assert index == [0, 1, 2, 3]
        torch.testing.assert_close(known[:, :, :2], latents[:, :, [2, 3]])  # the anchor: always the first chunk's
        torch.testing.assert_close(known[:, :, 2:], latents[:, :, start - 2 : start])  # the context: the last frames
    plain, _ = autoregressive(bundle, PROMPTS, _plan(14), torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain[:, :, :6], latents[:, :, :6])  # the first chunk is the same


def test_hierarchical_keeps_the_keyframes_and_fills_the_rest(bundle):
    plan, skip = _plan(13), 4
    keys, _ = autoregressive(bundle, PROMPTS, Plan(**{**plan.__dict__, "total": 4}), torch.Generator().manual_seed(5))
    chunks = []
    video, starts = hierarchical(bundle, bundle, PROMPTS, plan, skip, torch.Generator().manual_seed(5),
                                 on_chunk=chunks.append)
    assert video.shape == (2, 4, 13, 8, 8)
    torch.testing.assert_close(video[:, :, ::skip], keys)  # keyframes come back unchanged
    assert starts == [4, 8] and len(chunks) == 3
    assert (video.flatten(3).abs().sum(-1) > 0).all()  # every frame was filled
    config = GenerateConfig(mode="hierarchical", frame_skip=skip)
    assert _chunk_count(plan, config) == 1 + len(chunks)


def test_generate_writes_videos_of_the_asked_length(chain, tmp_path):
    overrides = [f"model={chain['diffusion']}", "prompts=[a red circle moving left,a green square moving up]",
                 "num_frames=14", "context_frames=2", "sampling.steps=2", f"out_dir={tmp_path}", "gif=true",
                 "decode_chunk_frames=4", "raw_frames=true"]
    summary = generate(load_config(GenerateConfig, None, overrides), log=lambda *a: None)
    assert len(summary["samples"]) == 2 and summary["boundaries"] == [6, 10]
    for sample in summary["samples"]:
        frames = read_frames(tmp_path / sample["file"])
        assert frames.shape == (14, 32, 32, 3)
        assert (tmp_path / sample["file"]).with_suffix(".gif").is_file()
        raw = np.load(tmp_path / sample["frames"])  # the decoded frames themselves, streamed beside the video
        assert raw.shape == frames.shape and raw.dtype == np.uint8 and sample["frames"].endswith(".npy")
        # the same video before the codec (a random model's frames are noise, which H.264 smooths away; their
        # mean colours survive it)
        assert np.abs(raw.mean((1, 2)) - frames.mean((1, 2))).max() < 3
        error = np.abs(raw.astype(int) - frames)
        assert error.mean() < np.abs(raw.astype(int) - np.roll(frames, 1, axis=0)).mean()  # frame by frame
        np.testing.assert_array_equal(generated_frames(sample, tmp_path), raw)  # what the demo grades
        np.testing.assert_array_equal(generated_frames({"file": sample["file"]}, tmp_path), frames)
    assert (tmp_path / "contact_sheet_reconstruction.png").is_file()
    assert json.loads((tmp_path / "generation_reconstruction.json").read_text())["chunks"] == 3


@torch.no_grad()
def test_a_model_trained_with_correlated_noise_samples_from_it(bundle):
    """``model.noise_correlation``: the start z_1 of every chunk is frame-correlated noise, as in training, and
    long videos come out whole and reproducible."""
    from pipelines.models.diffusion import sample

    correlated = dataclasses.replace(bundle, model=dataclasses.replace(bundle.model, noise_correlation=0.8))
    starts = []

    def spy(z, logsnr):
        starts.append(z.clone())
        return torch.zeros_like(z)

    shape, sampling = (4, 4, 6, 16, 16), SamplingConfig(sampler="ddim", steps=2, guidance=0.0)
    for model in (bundle, correlated):
        sample(model, spy, shape, sampling, torch.Generator().manual_seed(0))
    for z, expected in zip(starts[::2], (0.0, 0.8)):
        frames = z.transpose(0, 2).reshape(6, -1)  # [f, everything else]
        correlation = torch.corrcoef(frames)[~torch.eye(6, dtype=torch.bool)]
        assert abs(float(correlation.mean()) - expected) < 0.05
    latents, _ = autoregressive(correlated, PROMPTS, _plan(14), torch.Generator().manual_seed(0))
    again, _ = autoregressive(correlated, PROMPTS, _plan(14), torch.Generator().manual_seed(0))
    plain, _ = autoregressive(bundle, PROMPTS, _plan(14), torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 14, 8, 8) and torch.isfinite(latents).all()
    torch.testing.assert_close(latents, again)
    assert not torch.allclose(latents, plain, atol=1e-4)
