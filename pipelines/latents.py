"""Latent shards: the autoencoder run once over a video folder, its latents cached for diffusion training.

Layout of a latent directory::

    manifest.json                 what made it (autoencoder, latent scale, clip spec, text encoder) and its shards
    shard_00000.safetensors       latents [n, c, f, h, w] fp16 (scaled), optional cond [n, d] / context [n, L, d]
                                  fp16 from a frozen text encoder; metadata "records": per clip the caption,
                                  source file and frame indices; "skipped": files of this shard left out
    null_text.safetensors         the frozen text encoder's embedding of "" (the null conditioning)

Shard ``k`` holds the clips of videos ``[k·V, (k+1)·V)`` of the sorted file list, so a rerun after an interruption
skips the shards already written (each is written atomically) and continues: no clip twice, none missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from einops import rearrange
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from autoencoder import encode_video, load_autoencoder
from pipelines.checkpoint import atomic_write_json, save_tensors
from pipelines.config import config_to_dict, save_resolved_config
from pipelines.data import VIDEO_EXTENSIONS, ClipSpec, clip_indices, find_captions, resize_crop, scan_media
from pipelines.text import TextConfig, build_text_encoder, is_trainable
from pipelines.video_io import MediaReadError, read_frames, video_info

MANIFEST = "manifest.json"
NULL_TEXT = "null_text.safetensors"


@dataclass
class ClipConfig:
    """How clips are cut from videos (see ``pipelines.data.ClipSpec``)."""

    num_frames: int = 16
    frame_stride: int = 1
    target_fps: Optional[float] = None
    size: int = 64
    start: Literal["random", "first", "center"] = "first"
    crop: Literal["center", "random"] = "center"

    def spec(self) -> ClipSpec:
        return ClipSpec(self.num_frames, self.frame_stride, self.target_fps, self.size, self.start, self.crop)


@dataclass
class EncodeConfig:
    """Everything ``scripts/encode_latents.py`` reads."""

    autoencoder: str = "outputs/autoencoder/model"
    videos: list[str] = field(default_factory=lambda: ["data/videos"])
    captions: Optional[str] = None  # a CSV / JSONL manifest; default: captions.jsonl / .csv in the folder
    out_dir: str = "outputs/latents"
    clip: ClipConfig = field(default_factory=ClipConfig)
    clips_per_video: int = 1  # several clips of a long video (each with its own seeded random start)
    videos_per_shard: int = 256
    batch_size: int = 8  # clips per autoencoder batch
    chunk_frames: int = 16  # frames per autoencoder call
    sample_posterior: bool = False  # store a posterior sample instead of its mean
    text: TextConfig = field(default_factory=lambda: TextConfig(kind="none"))  # frozen encoders only
    store_tokens: bool = False  # also store the token embeddings (for cross-attention)
    seed: int = 0
    num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available")
    return torch.device(name)


class _Clips(Dataset):
    """Clip ``c`` of video ``v`` for the items ``(v, c)`` of one shard; a bad file yields its error instead."""

    def __init__(self, files: list[Path], items: list[tuple[int, int]], spec: ClipSpec, seed: int):
        self.files, self.items, self.spec, self.seed = files, items, spec, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        v, c = self.items[i]
        path = self.files[v]
        try:
            rng = np.random.default_rng([self.seed, v, c])
            indices = clip_indices(self.spec, video_info(path), rng, str(path))
            video = resize_crop(read_frames(path, indices), self.spec.size, self.spec.crop, rng)
            return {"video": rearrange(video, "f c h w -> c f h w"), "path": str(path), "indices": indices.tolist()}
        except MediaReadError as error:
            return {"error": f"{error.reason}: {error.detail}" if error.detail else error.reason, "path": str(path)}


def _collate(items: list[dict]) -> list[dict]:
    return items


def _encode_shard(cfg: EncodeConfig, vae, text_encoder, files, captions, videos: range, device) -> dict:
    """Encode the clips of ``videos``; returns the shard's tensors and metadata."""
    items = [(v, c) for v in videos for c in range(cfg.clips_per_video)]
    loader = DataLoader(_Clips(files, items, cfg.clip.spec(), cfg.seed), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=_collate)
    latents, records, skipped, conds, contexts = [], [], {}, [], []
    for batch in loader:
        good = [item for item in batch if "error" not in item]
        skipped.update({item["path"]: item["error"] for item in batch if "error" in item})
        if not good:
            continue
        video = torch.stack([item["video"] for item in good]).to(device)
        with torch.inference_mode():
            latents.append(encode_video(vae, video, cfg.chunk_frames, sample=cfg.sample_posterior).half().cpu())
        texts = [captions(Path(item["path"])) for item in good]
        records += [{"caption": t, "path": item["path"], "frame_indices": item["indices"]}
                    for t, item in zip(texts, good)]
        if text_encoder is not None:
            emb = text_encoder(texts)
            conds.append(emb["cond"].half().cpu())
            if cfg.store_tokens:
                contexts.append(emb["context"].half().cpu())
    tensors = {"latents": torch.cat(latents)} if latents else {}
    if conds:
        tensors["cond"] = torch.cat(conds)
    if contexts:
        tensors["context"] = torch.cat(contexts)
    return {"tensors": tensors, "records": records, "skipped": skipped}


def _read_shard_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"records": json.loads(meta.get("records", "[]")), "skipped": json.loads(meta.get("skipped", "{}"))}


def encode_latents(cfg: EncodeConfig, log=print) -> dict:
    """Encode every clip of ``cfg.videos`` into shards under ``cfg.out_dir`` (resuming); returns the manifest."""
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, "encode.yaml")
    vae = load_autoencoder(cfg.autoencoder, device=device)
    text_encoder = build_text_encoder(cfg.text)
    if is_trainable(text_encoder):
        log("note: the small text encoder trains with the U-Net; shards store captions only")
        text_encoder = None
    if text_encoder is not None:
        text_encoder.to(device)
        save_tensors({k: v.half() for k, v in text_encoder([""]).items()}, out / NULL_TEXT)
    files = scan_media(cfg.videos, VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no video files under {', '.join(cfg.videos)}")
    captions = find_captions(cfg.captions, [Path(r) for r in cfg.videos])
    num_shards = -(-len(files) // cfg.videos_per_shard)
    shards, skipped, encoded, start = [], {}, 0, time.perf_counter()
    bar = tqdm(total=len(files) * cfg.clips_per_video, desc="encoding clips", unit="clip")
    for k in range(num_shards):
        videos = range(k * cfg.videos_per_shard, min(len(files), (k + 1) * cfg.videos_per_shard))
        path = out / f"shard_{k:05d}.safetensors"
        if path.is_file():  # written atomically by an earlier run: complete
            meta = _read_shard_meta(path)
        else:
            shard = _encode_shard(cfg, vae, text_encoder, files, captions, videos, device)
            meta = {"records": shard["records"], "skipped": shard["skipped"]}
            if shard["tensors"]:
                save_tensors(shard["tensors"], path, metadata={k: json.dumps(v) for k, v in meta.items()})
            encoded += len(shard["records"])
        if meta["records"]:
            shards.append({"file": path.name, "clips": len(meta["records"])})
        skipped.update(meta["skipped"])
        bar.update(len(videos) * cfg.clips_per_video)
        bar.set_postfix(clips_per_s=f"{encoded / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    seconds = time.perf_counter() - start
    manifest = {
        "autoencoder": str(cfg.autoencoder),
        "latent_scale": vae.config.latent_scale,
        "latent_shape": list(_first_shape(out, shards)),
        "clip": config_to_dict(cfg.clip),
        "text": config_to_dict(cfg.text),
        "has_cond": text_encoder is not None,
        "has_context": text_encoder is not None and cfg.store_tokens,
        "shards": shards,
        "clips": sum(s["clips"] for s in shards),
        "videos": len(files),
        "skipped": skipped,
        "stats": {"encoded_clips": encoded, "seconds": round(seconds, 2),
                  "clips_per_second": round(encoded / seconds, 2) if encoded and seconds > 0 else None},
    }
    atomic_write_json(out / MANIFEST, manifest)
    if skipped:
        log(f"skipped {len(skipped)} of {len(files)} files: " +
            "; ".join(f"{Path(p).name} ({r})" for p, r in list(skipped.items())[:10]))
    return manifest


def _first_shape(out: Path, shards: list[dict]) -> tuple[int, ...]:
    """``[c, f, h, w]`` of one clip's latents."""
    if not shards:
        raise RuntimeError("no clip could be encoded: every file was skipped")
    with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
        return tuple(f.get_slice("latents").get_shape()[1:])


class LatentDataset(Dataset):
    """The clips of a latent directory: ``{"latents": float [c, f, h, w], "caption": str, ...}`` plus ``cond`` /
    ``context`` when the shards carry frozen text embeddings. Shards are memory-mapped lazily."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: run scripts/encode_latents.py first")
        self.manifest = json.loads(manifest_path.read_text())
        self.index: list[tuple[int, int]] = []
        self.records: list[dict] = []
        for s, shard in enumerate(self.manifest["shards"]):
            meta = _read_shard_meta(self.root / shard["file"])
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
        item = {"latents": handle.get_slice("latents")[j : j + 1][0].float(), "caption": self.records[i]["caption"]}
        for key in ("cond", "context"):
            if key in handle.keys():
                item[key] = handle.get_slice(key)[j : j + 1][0].float()
        return item

    def null_text(self) -> Optional[dict[str, torch.Tensor]]:
        """The frozen text encoder's embedding of "" (``None`` when the shards carry no embeddings)."""
        path = self.root / NULL_TEXT
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(path).items()}
