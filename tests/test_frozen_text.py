"""The frozen CLIP text path end to end, offline: a tiny random open_clip model saved as a local weights file.

Three ways to train with it: shards that cache its embeddings (``text.kind=open_clip`` when encoding), shards
without embeddings and the encoder run on the fly, and a trainable small encoder on shards that carry the frozen
embeddings. In each, classifier-free guidance is trained with the right null conditioning (the frozen encoder's
``""``, or the small encoder's own ``""``), checkpoints keep it, the loaded model samples with it, and guidance
changes the samples.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import diffusion.denoiser
import pipelines.models.diffusion as model_bundle
from pipelines.core.checkpoint import read_trainer_state
from pipelines.core.config import load_config
from pipelines.core.sharded import read_sharded
from pipelines.latents.shards import NULL_TEXT, LatentDataset
from pipelines.models.config import SamplingConfig
from pipelines.models.diffusion import load_diffusion, resolve_checkpoint
from pipelines.models.text import OpenCLIPTextEncoder, SmallTextEncoder
from pipelines.stages.configs import DiffusionTrainConfig, EncodeConfig, GenerateConfig
from pipelines.stages.encode_latents import encode_latents
from pipelines.stages.generate import generate
from pipelines.stages.long_video import autoregressive
from pipelines.stages.train_diffusion import train_diffusion
from pipelines.world.config import WorldSpec
from pipelines.world.synthetic import make_world
from tests.pipeline_helpers import diffusion_overrides, encode_overrides

quiet = lambda *args, **kwargs: None  # noqa: E731

CLIP_MODEL = "TinyCLIP-frozen-test"
P_UNCOND = 0.5
PROMPTS = ["a red circle moving left", "a blue square moving up"]
# diffusion_overrides sizes the small encoder; the encoding runs get the same (unused) small-encoder keys, because
# the shards' text identity compares them even for open_clip (see test_cached_embeddings_ignore_small_encoder_keys)
SMALL_KEYS = ["text.width=16", "text.layers=1", "text.heads=2", "text.vocab_size=512"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny CLIP (16-d sentence embedding, the small encoder's width too) as a local file, a random VAE, six
    captioned world videos, and their shards with cached CLIP embeddings and without any."""
    import open_clip

    from autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder

    root = tmp_path_factory.mktemp("frozen_text")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{CLIP_MODEL}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{CLIP_MODEL}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(CLIP_MODEL).state_dict(), root / "clip.pt")
    clip = [f"text.model={CLIP_MODEL}", f"text.pretrained={root / 'clip.pt'}"]

    save_autoencoder(AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1,
                                                     norm_groups=4, mid_attention=False)), root / "vae")
    make_world(root, 6, WorldSpec(size=32, num_frames=12), seed=0, split="videos")
    encode = lambda out, text: encode_latents(load_config(  # noqa: E731
        EncodeConfig, None, encode_overrides(root / "vae", root / "videos", out) + text), quiet)
    cached = encode(root / "lat_clip", ["text.kind=open_clip", *clip, *SMALL_KEYS])
    plain = encode(root / "lat_none", ["text.kind=none"])
    encoder = OpenCLIPTextEncoder(CLIP_MODEL, str(root / "clip.pt"))
    return {"root": root, "clip": clip, "cached": cached, "plain": plain, "encoder": encoder,
            "null": encoder([""])["cond"]}


class _Spy:
    """What training handed to ``drop_conditioning`` (conditioning, null, p_uncond, draws, result) and the captions
    the frozen encoder was asked to embed, and the null every guided denoiser was built with."""

    def __init__(self, monkeypatch):
        self.drops: list[dict] = []
        self.encoded: list[list[str]] = []
        self.guidance_nulls: list[dict] = []
        drop, forward, guide = (diffusion.denoiser.drop_conditioning, OpenCLIPTextEncoder.forward,
                                model_bundle.classifier_free_guidance)

        def spy_drop(conditioning, null, p_uncond, generator=None, uniform=None):
            out = drop(conditioning, null, p_uncond, generator, uniform)
            self.drops.append({"cond": conditioning["cond"].detach().clone(), "null": null["cond"].detach().clone(),
                               "null_requires_grad": null["cond"].requires_grad, "p_uncond": p_uncond,
                               "uniform": uniform.detach().clone(), "out": out["cond"].detach().clone()})
            return out

        def spy_forward(encoder, captions):
            self.encoded.append(list(captions))
            return forward(encoder, captions)

        def spy_guide(model, conditioning, null, w, *args, **kwargs):
            self.guidance_nulls.append({k: v.detach().clone() for k, v in null.items()})
            return guide(model, conditioning, null, w, *args, **kwargs)

        monkeypatch.setattr(diffusion.denoiser, "drop_conditioning", spy_drop)
        monkeypatch.setattr(OpenCLIPTextEncoder, "forward", spy_forward)
        monkeypatch.setattr(model_bundle, "classifier_free_guidance", spy_guide)

    def null(self) -> torch.Tensor:
        """The one null conditioning every training step used."""
        assert self.drops, "drop_conditioning was never called: guidance is not trained"
        for call in self.drops[1:]:
            torch.testing.assert_close(call["null"], self.drops[0]["null"], rtol=0, atol=0)
        return self.drops[0]["null"]


def _train(world, latents, out, text: list[str], monkeypatch, samples: bool = False) -> _Spy:
    spy = _Spy(monkeypatch)
    # a large learning rate: two steps move the zero-initialised layers the conditioning acts through
    overrides = diffusion_overrides(latents, out, steps=2) + text + [f"model.p_uncond={P_UNCOND}", "optim.lr=1e-2"]
    if not samples:
        overrides.append("sample_prompts=[]")
    logs: list[str] = []
    train_diffusion(load_config(DiffusionTrainConfig, None, overrides), lambda *a, **k: logs.append(" ".join(a)))
    spy.logs = logs
    return spy


def _assert_guidance_was_trained(spy: _Spy, null: torch.Tensor) -> None:
    """Each step's batch: samples whose draw fell below p_uncond got exactly ``null``, the others kept theirs."""
    dropped = kept = 0
    for call in spy.drops:
        assert call["p_uncond"] == P_UNCOND
        torch.testing.assert_close(call["null"], null, rtol=0, atol=0)
        for u, cond, out in zip(call["uniform"], call["cond"], call["out"]):
            if u < P_UNCOND:
                torch.testing.assert_close(out, null[0], rtol=0, atol=0)
                dropped += 1
            else:
                torch.testing.assert_close(out, cond, rtol=0, atol=0)
                kept += 1
    assert dropped and kept, (dropped, kept)


def _assert_checkpoint_and_bundle_keep_the_null(run, null: torch.Tensor) -> model_bundle.DiffusionBundle:
    stored = load_file(resolve_checkpoint(run) / NULL_TEXT)
    assert set(stored) == {"tensors.cond"}
    torch.testing.assert_close(stored["tensors.cond"], null, rtol=0, atol=0)
    bundle = load_diffusion(run)
    assert isinstance(bundle.text_encoder, OpenCLIPTextEncoder)
    torch.testing.assert_close(bundle.null()["cond"], null, rtol=0, atol=0)
    return bundle


def _sample(bundle, w: float, seed: int = 0) -> torch.Tensor:
    """Latents of the prompts sampled as the generate stage samples them, guidance ``w``."""
    shape = bundle.latent_shape
    plan = GenerateConfig(prompts=PROMPTS, num_frames=shape[1], context_frames=2, method="replacement", w_r=1.0,
                          sampling=SamplingConfig(sampler="ddim", steps=3, guidance=w))
    latents, _ = autoregressive(bundle, PROMPTS, plan, shape[1], torch.Generator().manual_seed(seed))
    return latents


def _assert_guidance_changes_the_sample(bundle) -> None:
    plain, guided = _sample(bundle, 0.0), _sample(bundle, 3.0)
    torch.testing.assert_close(_sample(bundle, 0.0), plain, rtol=0, atol=0)  # the seed fixes the sample
    change = float((guided - plain).abs().max() / plain.abs().max())
    assert change > 1e-3, f"guidance w=3 changed the sample by {change:.2e} of its size"


# ---------------------------------------------------------------------------------------------- frozen, cached


def test_shards_cache_the_frozen_embeddings_and_their_null(world):
    manifest = world["cached"]
    assert manifest["has_cond"] and not manifest["has_context"]
    dataset = LatentDataset(world["root"] / "lat_clip")
    item = dataset[0]
    expected = world["encoder"]([item["caption"]])["cond"][0]
    torch.testing.assert_close(item["cond"], expected.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(dataset.null_text()["cond"], world["null"].half().float(), rtol=0, atol=0)
    assert not world["plain"]["has_cond"] and LatentDataset(world["root"] / "lat_none").null_text() is None


def test_cached_frozen_embeddings_train_guidance_with_the_encoders_null(world, tmp_path, monkeypatch):
    spy = _train(world, world["root"] / "lat_clip", tmp_path, ["text.kind=open_clip", *world["clip"]], monkeypatch)
    assert spy.encoded == []  # captions and null both came from the shards
    null = spy.null()
    torch.testing.assert_close(null, world["null"].half().float(), rtol=0, atol=0)  # the shards' copy of ""
    assert all(torch.equal(c["cond"], c["cond"].half().float()) for c in spy.drops)  # the cached fp16 embeddings
    _assert_guidance_was_trained(spy, null)
    bundle = _assert_checkpoint_and_bundle_keep_the_null(tmp_path, null)
    _assert_guidance_changes_the_sample(bundle)
    assert all(torch.equal(n["cond"], null) for n in spy.guidance_nulls)


def test_shards_without_token_embeddings_give_cross_attention_its_tokens_on_the_fly(world, tmp_path, monkeypatch):
    """``text.use_tokens=true`` on shards encoded without ``store_tokens``: the cached sentence embeddings lack the
    tokens cross-attention needs, so the captions are embedded now (this used to crash inside the U-Net)."""
    assert not world["cached"]["has_context"]
    spy = _train(world, world["root"] / "lat_clip", tmp_path,
                 ["text.kind=open_clip", *world["clip"], "text.use_tokens=true"], monkeypatch)
    captions = {r["caption"] for r in LatentDataset(world["root"] / "lat_clip").records}
    # the shards' cache is not used (it lacks the tokens): the null once, then each step's captions
    assert spy.encoded[0] == [""] and len(spy.encoded) == 3
    assert all(set(c) <= captions for c in spy.encoded[1:])
    _assert_guidance_was_trained(spy, spy.null())
    bundle = load_diffusion(tmp_path)
    assert bundle.denoiser.net.config.context_dim == 32 and set(bundle.null()) == {"cond", "context"}
    stored = load_file(resolve_checkpoint(tmp_path) / NULL_TEXT)
    torch.testing.assert_close(stored["tensors.context"], bundle.null()["context"], rtol=0, atol=0)
    _assert_guidance_changes_the_sample(bundle)


# ---------------------------------------------------------------------------------------------- frozen, on the fly


def test_on_the_fly_frozen_embeddings_train_guidance_with_the_encoders_null(world, tmp_path, monkeypatch):
    spy = _train(world, world["root"] / "lat_none", tmp_path, ["text.kind=open_clip", *world["clip"]], monkeypatch,
                 samples=True)
    captions = {r["caption"] for r in LatentDataset(world["root"] / "lat_none").records}
    assert spy.encoded[0] == [""]  # the null, once
    training = [c for c in spy.encoded[1:] if c != PROMPTS[:1]]  # the end-of-run sample sheet embeds its prompt
    assert len(training) == 2 and all(set(c) <= captions for c in training)  # each step's captions, on the fly
    null = spy.null()
    torch.testing.assert_close(null, world["null"], rtol=0, atol=0)
    _assert_guidance_was_trained(spy, null)
    assert spy.guidance_nulls and torch.equal(spy.guidance_nulls[0]["cond"], null)  # the training run's samples
    bundle = _assert_checkpoint_and_bundle_keep_the_null(tmp_path, null)
    _assert_guidance_changes_the_sample(bundle)
    assert all(torch.equal(n["cond"], null) for n in spy.guidance_nulls)

    summary = generate(load_config(GenerateConfig, None, [
        f"model={tmp_path}", f"out_dir={tmp_path / 'generated'}", f"prompts=[{PROMPTS[0]}]", "num_frames=8",
        "context_frames=2", "sampling.steps=2", "sampling.guidance=2.0", "device=cpu"]), quiet)
    assert len(summary["samples"]) == 1 and (tmp_path / "generated" / summary["samples"][0]["file"]).is_file()
    assert torch.equal(spy.guidance_nulls[-1]["cond"], null)


def test_a_sharded_run_keeps_the_frozen_encoders_null_and_resumes(world, tmp_path, monkeypatch):
    """``run.sharding=fsdp2`` (one process): the frozen encoder stays whole, outside the shards; its null is in the
    sharded state (replicated) and exported beside the gathered weights, sampling and a resume use it."""
    text = ["text.kind=open_clip", *world["clip"], "run.sharding=fsdp2"]
    spy = _train(world, world["root"] / "lat_clip", tmp_path, text, monkeypatch, samples=True)
    null = spy.null()
    _assert_guidance_was_trained(spy, null)
    assert spy.guidance_nulls and all(torch.equal(n["cond"], null) for n in spy.guidance_nulls)  # the samples
    _assert_checkpoint_and_bundle_keep_the_null(tmp_path, null)
    sharded = read_sharded(resolve_checkpoint(tmp_path))
    assert torch.equal(sharded["null_text.tensors.cond"], null)
    logs: list[str] = []
    overrides = diffusion_overrides(world["root"] / "lat_clip", tmp_path, steps=4) + text + \
        [f"model.p_uncond={P_UNCOND}", "optim.lr=1e-2", "sample_prompts=[]"]
    train_diffusion(load_config(DiffusionTrainConfig, None, overrides), lambda *a, **k: logs.append(" ".join(a)))
    assert any(line.startswith(f"resumed from {resolve_checkpoint(tmp_path).parent / 'step_0000002'}")
               for line in logs)
    assert read_trainer_state(resolve_checkpoint(tmp_path))["step"] == 4
    assert all(torch.equal(c["null"], null) for c in spy.drops)  # the resumed steps too


# ---------------------------------------------------------------------------------------------- trainable encoder


def test_a_trainable_encoder_on_shards_with_frozen_embeddings_uses_its_own_null(world, tmp_path, monkeypatch):
    spy = _train(world, world["root"] / "lat_clip", tmp_path, ["text.kind=small"], monkeypatch)
    assert any("not used" in line for line in spy.logs)  # the shards' CLIP embeddings are left alone
    shards_null = LatentDataset(world["root"] / "lat_clip").null_text()["cond"]
    assert spy.drops and all(c["null_requires_grad"] for c in spy.drops)  # the encoder's "" now, with gradients
    assert all(c["null"].shape == shards_null.shape and not torch.allclose(c["null"], shards_null) for c in spy.drops)
    for call in spy.drops:  # captions embedded by the small encoder, not read from the shards
        assert not any(torch.allclose(c, shards_null[0]) for c in call["cond"])

    checkpoint = resolve_checkpoint(tmp_path)
    assert not (checkpoint / NULL_TEXT).exists() and (checkpoint / "text.safetensors").is_file()
    bundle = load_diffusion(tmp_path)
    assert isinstance(bundle.text_encoder, SmallTextEncoder) and bundle.null_cache is None
    own = bundle.text_encoder([""])["cond"]
    torch.testing.assert_close(bundle.null()["cond"], own, rtol=0, atol=0)
    assert not torch.allclose(bundle.null()["cond"], shards_null)
    _assert_guidance_changes_the_sample(bundle)
    assert spy.guidance_nulls and all(torch.equal(n["cond"], own) for n in spy.guidance_nulls)




def test_cached_embeddings_ignore_small_encoder_keys(world, tmp_path):
    """Shards encoded with open_clip and default small-encoder keys, trained with other (irrelevant) ones: the
    cache should still be recognised as the same encoder's."""
    shards = tmp_path / "lat"
    encode_latents(load_config(EncodeConfig, None, encode_overrides(world["root"] / "vae", world["root"] / "videos",
                                                                    shards) + ["text.kind=open_clip", *world["clip"]]),
                   quiet)
    cfg = load_config(DiffusionTrainConfig, None, diffusion_overrides(shards, tmp_path / "dif")
                      + ["text.kind=open_clip", *world["clip"]])
    assert LatentDataset(shards).made_by_text_encoder(cfg.text)
