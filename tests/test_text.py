"""Text conditioning: the offline small encoder, and open_clip from local weights (never a download)."""

import json
import time

import pytest
import torch

from pipelines.models.text import (
    OpenCLIPTextEncoder,
    SmallTextEncoder,
    TextConfig,
    build_text_encoder,
    conditioning_dims,
    is_trainable,
    select,
)


def test_small_encoder_shapes_padding_and_gradients():
    encoder = SmallTextEncoder(width=16, layers=1, heads=2, context_length=10, vocab_size=1000)
    out = encoder(["a red circle moving left", ""])
    assert out["cond"].shape == (2, 16) and out["context"].shape == (2, 10, 16)
    assert torch.isfinite(out["cond"]).all()  # "" still has its start and end tokens
    out["cond"].sum().backward()
    assert encoder.token_embedding.weight.grad is not None and is_trainable(encoder)
    a, b = encoder(["a red circle moving left"]), encoder(["a red circle moving right"])
    assert not torch.allclose(a["cond"], b["cond"])


def test_remembered_tokens_equal_open_clips_batch_tokenizer():
    from open_clip.tokenizer import tokenize as clip_tokenize

    from pipelines.models.text import tokenize

    captions = ["a red circle moving left", "", "A  Red circle, moving LEFT!", "word " * 40, "a red circle moving left"]
    for length in (6, 16, 77):
        assert torch.equal(tokenize(captions, length), clip_tokenize(captions, context_length=length))
    assert tokenize([], 16).shape == (0, 16)


def test_selecting_tokens_and_dims():
    encoder = build_text_encoder(TextConfig(kind="small", width=8, layers=1, heads=2))
    assert conditioning_dims(encoder, use_tokens=False) == (8, 0)
    assert conditioning_dims(encoder, use_tokens=True) == (8, 8)
    assert set(select(encoder(["x"]), use_tokens=False)) == {"cond"}
    assert build_text_encoder(TextConfig(kind="none")) is None


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised two-tower open_clip model registered from a config file, saved as local weights."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "TinyCLIP-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "TinyCLIP-test.json")
    model = open_clip.create_model("TinyCLIP-test")
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder / "weights.pt", model


def test_open_clip_from_a_local_weights_file(tiny_clip):
    path, reference = tiny_clip
    encoder = OpenCLIPTextEncoder("TinyCLIP-test", str(path))
    out = encoder(["a red circle moving left", ""])
    assert out["cond"].shape == (2, 16) and out["context"].shape == (2, 77, 32)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training
    import open_clip

    tokens = open_clip.get_tokenizer("TinyCLIP-test")(["a red circle moving left"])
    with torch.no_grad():
        torch.testing.assert_close(out["cond"][:1], reference.eval().encode_text(tokens))
    assert conditioning_dims(encoder, use_tokens=True) == (16, 32)


def test_missing_open_clip_weights_fail_fast_with_what_to_provide(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local cache.*text.pretrained"):
        OpenCLIPTextEncoder("ViT-B-32", "openai", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        OpenCLIPTextEncoder("ViT-B-32", str(tmp_path / "missing.bin"))
    with pytest.raises(FileNotFoundError, match="no pretrained tag"):
        OpenCLIPTextEncoder("ViT-B-32", "no-such-tag")
    assert time.perf_counter() - start < 30  # no network retries


def test_open_clip_keeps_its_text_tower_only_and_builds_its_tokenizer_once(tiny_clip, monkeypatch):
    """ViT-L/14's vision tower (300 M parameters) would otherwise go to every GPU, and open_clip's tokenizer takes
    tens of milliseconds to build: once per encoder, not once per call."""
    import open_clip

    path, reference = tiny_clip
    builds = []
    get_tokenizer = open_clip.get_tokenizer
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *a, **k: builds.append(a) or get_tokenizer(*a, **k))
    encoder = OpenCLIPTextEncoder("TinyCLIP-test", str(path))
    for _ in range(3):
        out = encoder(["a red circle moving left"])
    assert len(builds) == 1
    names = [name for name, _ in encoder.clip.named_parameters()]
    assert names and not any(name.startswith("visual.") for name in names)
    text_only = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("visual."))
    assert sum(p.numel() for p in encoder.parameters()) == text_only
    with torch.no_grad():
        tokens = get_tokenizer("TinyCLIP-test")(["a red circle moving left"])
        torch.testing.assert_close(out["cond"], reference.eval().encode_text(tokens))
