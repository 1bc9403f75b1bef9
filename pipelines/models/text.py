"""Text conditioning: captions → a pooled embedding ``cond [b, d]`` and token embeddings ``context [b, n, d]``.

* :class:`OpenCLIPTextEncoder`: the real encoder, frozen: open_clip's text tower (default ViT-L-14, the paper's
  CLIP sentence embedding), from a ``pretrained`` tag in the local cache or a local weights file.
* :class:`SmallTextEncoder`: the offline default that needs no download: open_clip's bundled BPE tokenizer and a
  small text transformer trained jointly with the U-Net (as latent diffusion trained its text transformer
  from scratch).
* ``kind="none"``: unconditional models.

The null conditioning for classifier-free guidance is the embedding of the empty caption ``""``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from pipelines.core.devices import to_device
from pipelines.models.config import CLIP_VOCAB_SIZE, TextConfig


def tokenize(captions: list[str], context_length: int) -> Tensor:
    """open_clip's bundled BPE tokenizer (no download): ``[b, context_length]`` int64, 0-padded.

    Each caption is tokenized once per process and remembered: the trainable encoder embeds its batch's captions
    at every step, and open_clip's text cleaning and BPE cost far more than a lookup."""
    ids = [_token_ids(str(caption), context_length) for caption in captions]
    return torch.tensor(ids, dtype=torch.long).reshape(len(ids), context_length)


@functools.lru_cache(maxsize=1 << 16)
def _token_ids(caption: str, context_length: int) -> tuple[int, ...]:
    """One caption's token ids as open_clip's batch tokenizer writes them (it treats every caption alone)."""
    from open_clip.tokenizer import tokenize as clip_tokenize

    return tuple(clip_tokenize([caption], context_length=context_length)[0].tolist())


class SmallTextEncoder(nn.Module):
    """A pre-norm transformer over CLIP BPE tokens, trained with the U-Net.

    ``forward(captions) -> {"cond": mean of the valid token features [b, width], "context": [b, n, width]}``.
    """

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, context_length: int = 16,
                 vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional = nn.Parameter(torch.randn(context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        # Unit-variance token embeddings: every caption starts with a distinct (bag-of-words-like) embedding, so
        # the U-Net can use all of its words from the first steps instead of waiting for the encoder to separate them.
        nn.init.normal_(self.token_embedding.weight, std=1.0)

    @property
    def dims(self) -> tuple[int, int]:
        """``(pooled, token)`` embedding widths."""
        width = self.ln_final.normalized_shape[0]
        return width, width

    def forward(self, captions: list[str]) -> dict[str, Tensor]:
        device = self.positional.device
        tokens = to_device(tokenize(captions, self.context_length), device)
        valid = tokens != 0  # [b, n]
        x = self.token_embedding(tokens % self.vocab_size) + self.positional
        x = self.ln_final(self.transformer(x, src_key_padding_mask=~valid))
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return {"cond": pooled, "context": x}


class OpenCLIPTextEncoder(nn.Module):
    """open_clip's text tower, frozen: pooled (projected) sentence embedding and final-layer token features.

    The vision tower is dropped once the weights are read (ViT-L/14's is 300 M parameters that no GPU needs), and
    the tokenizer is built once (open_clip builds its BPE tables anew for every ``get_tokenizer``)."""

    def __init__(self, model: str = "ViT-L-14", pretrained: str = "openai", cache_dir: Optional[str] = None):
        import open_clip

        super().__init__()
        self.clip = load_open_clip(model, pretrained, cache_dir)
        self.clip.visual = None  # the text tower only
        self.clip.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        tower = getattr(self.clip, "text", self.clip)
        self._tokens: list[Tensor] = []
        tower.ln_final.register_forward_hook(lambda module, args, out: self._tokens.append(out))
        self.context_length = int(getattr(tower, "context_length", 77))

    @property
    def dims(self) -> tuple[int, int]:
        tower = getattr(self.clip, "text", self.clip)
        return int(self.clip.text_projection.shape[-1] if hasattr(self.clip, "text_projection") and
                   self.clip.text_projection is not None else tower.output_dim), tower.ln_final.normalized_shape[0]

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, Tensor]:
        tokens = self.tokenizer(list(captions))
        device = next(self.clip.parameters()).device
        self._tokens.clear()
        pooled = self.clip.encode_text(to_device(tokens, device))
        return {"cond": pooled.float(), "context": self._tokens[-1].float()}


def _cached_weights(model: str, tag: str, cache_dir: Optional[str]) -> tuple[Optional[str], dict]:
    """The local file of open_clip's ``tag`` for ``model`` if it is already cached (never downloads)."""
    import open_clip
    from huggingface_hub import hf_hub_download

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise FileNotFoundError(f"open_clip knows no pretrained tag {tag!r} for {model}: "
                                f"see open_clip.list_pretrained(), or give a local weights file")
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/model/" (default file names) or "org/model/file"
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            try:
                return hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True), cfg
            except Exception:  # not in the cache
                continue
    if cfg.get("url"):
        local = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local), cfg
    return None, cfg


def load_open_clip(model: str, pretrained: str, cache_dir: Optional[str] = None) -> nn.Module:
    """Build an open_clip model from a local weights file or a tag already in the cache, never downloading.

    Raises:
        FileNotFoundError: one line naming what to provide.
    """
    import open_clip

    if Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors") or os.sep in pretrained:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip weights file not found: {pretrained}")
        path, cfg = pretrained, {}
    else:
        path, cfg = _cached_weights(model, pretrained, cache_dir)
        if path is None:
            raise FileNotFoundError(
                f"open_clip {model} weights {pretrained!r} are not in the local cache and cannot be downloaded here: "
                f"set text.pretrained to a local weights file (e.g. open_clip_pytorch_model.bin), put the weights in "
                f"the Hugging Face cache (text.cache_dir), or use text.kind=small (trained from scratch)"
            )
    return open_clip.create_model(model, pretrained=path, force_quick_gelu=bool(cfg.get("quick_gelu", False)))


def build_text_encoder(config: TextConfig) -> Optional[nn.Module]:
    """The encoder a config asks for (``None`` for unconditional models)."""
    if config.kind == "none":
        return None
    if config.kind == "small":
        return SmallTextEncoder(config.width, config.layers, config.heads, config.context_length, config.vocab_size)
    return OpenCLIPTextEncoder(config.model, config.pretrained, config.cache_dir)


def text_blocks(encoder: SmallTextEncoder) -> list[nn.Module]:
    """The trainable encoder's transformer layers: the units it is sharded in (the token embedding and the final
    norm belong to the root unit)."""
    return list(encoder.transformer.layers)


def is_trainable(encoder: Optional[nn.Module]) -> bool:
    """Whether the encoder learns with the U-Net (the small one) or is frozen (open_clip)."""
    return isinstance(encoder, SmallTextEncoder)


def conditioning_dims(encoder: Optional[nn.Module], use_tokens: bool) -> tuple[int, int]:
    """``(cond_dim, context_dim)`` for the U-Net config."""
    if encoder is None:
        return 0, 0
    pooled, token = encoder.dims
    return pooled, token if use_tokens else 0


def select(embeddings: dict[str, Tensor], use_tokens: bool) -> dict[str, Tensor]:
    """The conditioning keyword arguments the U-Net takes: ``cond`` and, with cross-attention, ``context``."""
    return {k: v for k, v in embeddings.items() if k == "cond" or (use_tokens and k == "context")}
