"""Latent shards: the autoencoder run once over a video folder, its latents cached for diffusion training.

Layout of a latent directory::

    manifest.json                 what made it (autoencoder, latent scale, clip spec, text encoder, fingerprint)
    shard_00000.safetensors       latents [n, c, f, h, w] fp16 (scaled), optional cond [n, d] / context [n, L, d]
                                  fp16 from a frozen text encoder; metadata "records": per clip the caption,
                                  source file and frame indices; "skipped": files of this shard left out;
                                  "fingerprint": what made the shard
    null_text.safetensors         the frozen text encoder's embedding of "" (the null conditioning)

Shard ``k`` holds the clips of videos ``[k·V, (k+1)·V)`` of the sorted file list, so a rerun after an interruption
skips the shards already written (each is written atomically) and continues: no clip twice, none missing. Every
shard carries the fingerprint of the settings that made it (autoencoder weights, clip spec, text encoder, ...);
a rerun with other settings refuses to mix them in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from pipelines.core.config import UserError

MANIFEST = "manifest.json"
NULL_TEXT = "null_text.safetensors"
TEXT_IDENTITY = ("kind", "model", "pretrained", "width", "layers", "heads", "context_length", "vocab_size")


def weights_hash(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's weights, in key order: which autoencoder made the latents.

    The bytes are each tensor's values in index order, whatever its memory format (a channels-last 1×1
    convolution counts as contiguous with a last stride above 1, so it is flattened before its bytes are read)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def text_identity(text: dict) -> dict:
    """The settings of a text config that decide its embeddings: for open_clip the architecture and the weights
    (a file path resolved, so a symlink to the same file matches), for the small encoder its sizes."""
    if text.get("kind") == "open_clip":
        pretrained = str(text.get("pretrained"))
        resolved = str(Path(pretrained).resolve()) if Path(pretrained).exists() else pretrained
        return {"kind": "open_clip", "model": text.get("model"), "pretrained": resolved}
    return {k: text.get(k) for k in TEXT_IDENTITY}


def check_fingerprint(path: Path, found: dict, wanted: dict) -> None:
    """Refuse (one line, naming the settings) to reuse a shard that other settings made."""
    changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if changed:
        raise UserError(f"{path} was made with other settings ({', '.join(changed)} changed): use another "
                        f"out_dir, or delete {path.parent} to encode again")


def read_shard_meta(path: Path) -> dict:
    """A shard's metadata: ``records``, ``skipped`` files and the ``fingerprint`` of what made it."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {key: json.loads(meta.get(key, default)) for key, default in
            (("records", "[]"), ("skipped", "{}"), ("fingerprint", "{}"))}


def first_shape(out: Path, shards: list[dict]) -> tuple[int, ...]:
    """``[c, f, h, w]`` of one clip's latents."""
    if not shards:
        raise UserError("no clip could be encoded: every file was skipped")
    with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
        return tuple(f.get_slice("latents").get_shape()[1:])


class LatentDataset(Dataset):
    """The clips of a latent directory: ``{"latents": float [c, f, h, w], "caption": str, ...}`` plus ``cond`` /
    ``context`` when the shards carry frozen text embeddings. Shards are memory-mapped lazily."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{manifest_path} not found: run scripts/encode_latents.py first")
        self.manifest = json.loads(manifest_path.read_text())
        self.index: list[tuple[int, int]] = []
        self.records: list[dict] = []
        for s, shard in enumerate(self.manifest["shards"]):
            meta = read_shard_meta(self.root / shard["file"])
            self.records += meta["records"]
            self.index += [(s, j) for j in range(len(meta["records"]))]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.root / self.manifest["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def __getstate__(self):  # handles do not pickle: workers reopen them
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, i: int) -> dict:
        s, j = self.index[i]
        handle = self._handle(s)
        record = self.records[i]
        item = {"latents": handle.get_slice("latents")[j : j + 1][0].float(), "caption": record["caption"],
                "frame_indices": torch.tensor(record["frame_indices"], dtype=torch.long)}
        for key in ("cond", "context"):
            if key in handle.keys():
                item[key] = handle.get_slice(key)[j : j + 1][0].float()
        return item

    def made_by_text_encoder(self, text: Any) -> bool:
        """Whether the shards hold embeddings of the frozen text encoder ``text`` (a ``TextConfig``) describes."""
        wanted = text_identity(dataclasses.asdict(text))
        tokens = self.manifest.get("has_context") or not text.use_tokens  # cross-attention needs the tokens
        return bool(self.manifest.get("has_cond")) and tokens and text_identity(self.manifest.get("text", {})) == wanted

    def null_text(self) -> Optional[dict[str, torch.Tensor]]:
        """The frozen text encoder's embedding of "" (``None`` when the shards carry no embeddings)."""
        path = self.root / NULL_TEXT
        if not path.is_file():
            return None
        return {k: v.float() for k, v in load_file(path).items()}
