"""Captions → the U-Net's conditioning, and the null conditioning classifier-free guidance trains and samples with
(Ho & Salimans 2021; paper §3): one policy, used the same way in training and in sampling.

* A **trainable** encoder (the small one) embeds the captions and ``""`` in one pass, with gradients; the null
  is whatever the encoder makes of ``""`` now, in training and (from the saved encoder) in sampling.
* A **frozen** encoder (CLIP) runs without gradients, outside data parallelism; captions come from embeddings
  cached in the latent shards when the same encoder made them. The null is that encoder's ``""``, computed
  once (or read from the shards), saved with every checkpoint and used by sampling.
* No encoder: an unconditional model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pipelines.models.config import TextConfig
from pipelines.models.text import is_trainable, select


class TextConditioning(nn.Module):
    """``forward(captions, cached) -> (conditioning, null)``, each a dict of U-Net keyword tensors."""

    def __init__(self, encoder: Optional[nn.Module], text: TextConfig, cached_null: Optional[dict] = None):
        super().__init__()
        self.use_tokens = text.use_tokens
        self.trainable = encoder if is_trainable(encoder) else None  # a submodule: trained, wrapped by DDP
        self._frozen = None if is_trainable(encoder) else encoder  # not a submodule: never in DDP or optimisers
        self._null = None
        if self._frozen is not None:
            null = cached_null if cached_null is not None else self._encode_frozen([""])
            self._null = {k: v.float() for k, v in select(null, self.use_tokens).items()}

    @property
    def encoder(self) -> Optional[nn.Module]:
        """The text encoder, trainable or frozen (``None`` for unconditional models)."""
        return self.trainable if self.trainable is not None else self._frozen

    def frozen_null(self) -> Optional[dict[str, Tensor]]:
        """The frozen encoder's null conditioning ``[1, ...]`` (saved with checkpoints), else ``None``."""
        return self._null

    def to_device(self, device: torch.device) -> TextConditioning:
        """Move the frozen encoder and its null too (they are not submodules)."""
        self.to(device)
        if self._frozen is not None:
            self._frozen.to(device)
            self._null = {k: v.to(device) for k, v in self._null.items()}
        return self

    @torch.no_grad()
    def _encode_frozen(self, captions: list[str]) -> dict[str, Tensor]:
        return self._frozen(captions)

    def forward(self, captions: list[str], cached: Optional[dict[str, Tensor]] = None
                ) -> tuple[dict[str, Tensor], Optional[dict[str, Tensor]]]:
        """Conditioning ``[n, ...]`` for ``captions`` (``cached`` embeddings of them, when the shards hold the
        frozen encoder's) and the null ``[1, ...]``; ``({}, None)`` without an encoder."""
        if self.trainable is not None:
            emb = select(self.trainable(list(captions) + [""]), self.use_tokens)
            return {k: v[:-1] for k, v in emb.items()}, {k: v[-1:] for k, v in emb.items()}
        if self._frozen is None:
            return {}, None
        wanted = {"cond", "context"} if self.use_tokens else {"cond"}
        usable = cached is not None and wanted <= set(cached)  # shards without token embeddings: tokens made now
        emb = cached if usable else self._encode_frozen(list(captions))
        return {k: v.float() for k, v in select(emb, self.use_tokens).items()}, self._null
