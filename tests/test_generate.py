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
from pipelines.stages.generate import generate
from pipelines.stages.long_video import anchor_index, autoregressive, chunk_count, hierarchical
from tests.models import tiny_denoiser

PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def bundle() -> DiffusionBundle:
    torch.manual_seed(0)
    text = SmallTextEncoder(width=12, layers=1, heads=2, context_length=8, vocab_size=256).eval()
    return DiffusionBundle(denoiser=tiny_denoiser("v"), text_encoder=text, text=TextConfig(width=12),
                           model=DiffusionModelConfig(schedule=NoiseSchedule()), latent_shape=[4, 6, 8, 8],
                           autoencoder=None)


CHUNK = 6


def _plan(total, method="reconstruction", context=2, **changes) -> GenerateConfig:
    """Extension on the last ``context`` frames alone, unless ``changes`` add anchor frames."""
    return GenerateConfig(prompts=PROMPTS, num_frames=total, context_frames=context, method=method, w_r=2.0,
                          sampling=SamplingConfig(sampler="ddim", steps=3, guidance=1.5),
                          **{"anchor_frames": 0, **changes})


def test_autoregressive_extension_lengths_and_boundaries(bundle):
    chunks = []
    with torch.no_grad():
        latents, boundaries = autoregressive(bundle, PROMPTS, _plan(20), CHUNK, torch.Generator().manual_seed(0),
                                             on_chunk=chunks.append)
    assert latents.shape == (2, 4, 20, 8, 8) and torch.isfinite(latents).all()
    assert boundaries == [6, 10, 14, 18]
    assert [c.shape[2] for c in chunks] == [6, 4, 4, 4, 4]
    assert len(chunks) == chunk_count(_plan(20), CHUNK)


def test_methods_share_the_first_chunk_and_differ_after(bundle):
    """Same seed: the first chunk is identical; conditioning makes the extensions differ."""
    out = {}
    for method in ("reconstruction", "replacement"):
        with torch.no_grad():
            out[method], _ = autoregressive(bundle, PROMPTS, _plan(10, method), CHUNK, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["reconstruction"][:, :, :6], out["replacement"][:, :, :6])
    assert not torch.allclose(out["reconstruction"][:, :, 6:], out["replacement"][:, :, 6:])
    again, _ = autoregressive(bundle, PROMPTS, _plan(10), CHUNK, torch.Generator().manual_seed(3))
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
    latents, boundaries = autoregressive(given, PROMPTS, _plan(14), CHUNK, torch.Generator().manual_seed(0))
    plain, _ = autoregressive(dataclasses.replace(given, denoiser=_without_known_frames(given.denoiser)), PROMPTS,
                              _plan(14), CHUNK, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 14, 8, 8) and boundaries == [6, 10]
    torch.testing.assert_close(latents[:, :, :6], plain[:, :, :6])  # the first chunk is given nothing
    assert not torch.allclose(latents[:, :, 6:], plain[:, :, 6:], atol=1e-4)


def _without_known_frames(denoiser):
    """The same network with the known-frame input channels cut off (their weights dropped)."""
    config = dataclasses.replace(denoiser.net.config, known_frames=False)
    net = type(denoiser.net)(config)
    state = denoiser.net.state_dict()
    net.load_state_dict({**state, "conv_in.weight": state["conv_in.weight"][:, : config.in_channels]})
    return type(denoiser)(net, denoiser.prediction).eval()


def test_context_must_be_shorter_than_the_chunk(bundle):
    with pytest.raises(UserError, match="context_frames"):
        autoregressive(bundle, PROMPTS, _plan(10, context=6), CHUNK, torch.Generator())
    with pytest.raises(UserError, match="anchor_frames"):
        autoregressive(bundle, PROMPTS, _plan(10, context=3, anchor_frames=3), CHUNK, torch.Generator())
    with pytest.raises(ValueError, match="anchor_frames"):
        GenerateConfig(prompts=[""], chunk_frames=6, context_frames=3, anchor_frames=3)


@torch.no_grad()
def test_anchor_frames_condition_every_extension_on_the_first_chunk(bundle, monkeypatch):
    """``anchor_frames`` = m: each extension chunk is conditioned on m frames spread over the first chunk, placed
    before the last ``context`` frames, and samples ``chunk − m − context`` new frames."""
    import pipelines.stages.long_video as long_video

    seen = []
    real = long_video.temporal_conditioning

    def spy(denoise, x_known, frame_index, *args):
        seen.append((x_known.clone(), list(frame_index)))
        return real(denoise, x_known, frame_index, *args)

    monkeypatch.setattr(long_video, "temporal_conditioning", spy)
    plan = _plan(14, anchor_frames=2)
    latents, boundaries = autoregressive(bundle, PROMPTS, plan, CHUNK, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 14, 8, 8) and boundaries == [6, 8, 10, 12]
    assert len(seen) == 4 == chunk_count(plan, CHUNK) - 1
    assert anchor_index(6, 2) == [2, 3] and anchor_index(16, 1) == [8]
    for (known, index), start in zip(seen, boundaries):
        assert index == [0, 1, 2, 3]
        torch.testing.assert_close(known[:, :, :2], latents[:, :, [2, 3]])  # the anchor: always the first chunk's
        torch.testing.assert_close(known[:, :, 2:], latents[:, :, start - 2 : start])  # the context: the last frames
    plain, _ = autoregressive(bundle, PROMPTS, _plan(14), CHUNK, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain[:, :, :6], latents[:, :, :6])  # the first chunk is the same


def test_hierarchical_keeps_the_keyframes_and_fills_the_rest(bundle):
    skip = 4
    plan = _plan(13, mode="hierarchical", frame_skip=skip)
    keys, _ = autoregressive(bundle, PROMPTS, plan, CHUNK, torch.Generator().manual_seed(5), total=4)
    chunks = []
    video, starts = hierarchical(bundle, bundle, PROMPTS, plan, CHUNK, torch.Generator().manual_seed(5),
                                 on_chunk=chunks.append)
    assert video.shape == (2, 4, 13, 8, 8)
    torch.testing.assert_close(video[:, :, ::skip], keys)  # keyframes come back unchanged
    assert starts == [4, 8] and len(chunks) == 4  # the keyframes' one chunk, then three infill windows
    assert (video.flatten(3).abs().sum(-1) > 0).all()  # every frame was filled
    assert chunk_count(plan, CHUNK) == len(chunks)


def test_generate_writes_videos_of_the_asked_length(chain, tmp_path):
    overrides = [f"model={chain['diffusion']}", "prompts=[a red circle moving left,a green square moving up]",
                 "num_frames=14", "context_frames=2", "sampling.steps=2", f"out_dir={tmp_path}", "gif=true",
                 "decode_chunk_frames=4", "raw_frames=true", "anchor_frames=0"]
    summary = generate(load_config(GenerateConfig, None, overrides), log=lambda *a: None)
    assert len(summary["samples"]) == 2 and all(s["boundaries"] == [6, 10] for s in summary["samples"])
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
