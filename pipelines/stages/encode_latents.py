"""Latents stage: the autoencoder run once over a video folder (``scripts/encode_latents.py``), its latents, captions
and frozen text embeddings written as shards (:mod:`pipelines.latents.shards`), resumable, never mixing settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from autoencoder import encode_video, load_autoencoder
from pipelines.core.checkpoint import save_tensors
from pipelines.core.config import UserError, config_to_dict, save_resolved_config
from pipelines.core.devices import resolve_device
from pipelines.core.files import atomic_write_json, remove_stale_temporaries
from pipelines.latents.shards import (
    MANIFEST,
    NULL_TEXT,
    check_fingerprint,
    first_shape,
    read_shard_meta,
    text_identity,
    weights_hash,
)
from pipelines.media.datasets import VIDEO_EXTENSIONS, clip_frame_indices, find_captions, resize_crop, scan_media
from pipelines.media.video_io import MediaReadError, read_frames, video_info
from pipelines.models.text import build_text_encoder, is_trainable
from pipelines.stages.configs import EncodeConfig


class _Clips(Dataset):
    """Clip ``c`` of video ``v`` for the items ``(v, c)`` of one shard; a bad file yields its error instead."""

    def __init__(self, files: list[Path], items: list[tuple[int, int]], spec, seed: int):
        self.files, self.items, self.spec, self.seed = files, items, spec, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        v, c = self.items[i]
        path = self.files[v]
        try:
            rng = np.random.default_rng([self.seed, v, c])
            indices = clip_frame_indices(self.spec, video_info(path), rng, str(path))
            video = resize_crop(read_frames(path, indices), self.spec.size, self.spec.crop, rng)
            return {"video": rearrange(video, "f c h w -> c f h w"), "path": str(path), "indices": indices.tolist()}
        except MediaReadError as error:
            return {"error": f"{error.reason}: {error.detail}" if error.detail else error.reason, "path": str(path)}


def _collate(items: list[dict]) -> list[dict]:
    return items


def _encode_shard(cfg: EncodeConfig, vae, text_encoder, files, captions, videos: range, device) -> dict:
    """Encode the clips of ``videos``; returns the shard's tensors and metadata."""
    items = [(v, c) for v in videos for c in range(cfg.clips_per_video)]
    loader = DataLoader(_Clips(files, items, cfg.clip, cfg.seed), batch_size=cfg.batch_size,
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


def fingerprint(cfg: EncodeConfig, vae, text_encoder) -> dict:
    """What decides a shard's contents: the autoencoder's weights, the clip spec, the text encoder and the
    encoding settings."""
    return {"autoencoder_weights": weights_hash(vae), "clip": config_to_dict(cfg.clip),
            "text": text_identity(config_to_dict(cfg.text)) if text_encoder is not None else None,
            "store_tokens": cfg.store_tokens and text_encoder is not None, "sample_posterior": cfg.sample_posterior,
            "clips_per_video": cfg.clips_per_video, "videos_per_shard": cfg.videos_per_shard, "seed": cfg.seed}


def encode_latents(cfg: EncodeConfig, log=print) -> dict:
    """Encode every clip of ``cfg.videos`` into shards under ``cfg.out_dir`` (resuming); returns the manifest."""
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("shard_*.safetensors", NULL_TEXT, MANIFEST, "encode.yaml"):  # half-written by a killed run
        remove_stale_temporaries(out, name)
    vae = load_autoencoder(cfg.autoencoder, device=device)
    text_encoder = build_text_encoder(cfg.text)
    if is_trainable(text_encoder):
        log("note: the small text encoder trains with the U-Net; shards store captions only")
        text_encoder = None
    files = scan_media(cfg.videos, VIDEO_EXTENSIONS)
    if not files:
        raise UserError(f"no video files under {', '.join(cfg.videos)}")
    made_by = fingerprint(cfg, vae, text_encoder)
    for path in sorted(out.glob("shard_*.safetensors")):  # refuse shards of other settings before writing anything
        check_fingerprint(path, read_shard_meta(path)["fingerprint"], made_by)
    save_resolved_config(cfg, out, "encode.yaml")
    if text_encoder is not None:
        text_encoder.to(device)
        save_tensors({k: v.half() for k, v in text_encoder([""]).items()}, out / NULL_TEXT)
    captions = find_captions(cfg.captions, [Path(r) for r in cfg.videos])
    num_shards = -(-len(files) // cfg.videos_per_shard)
    shards, skipped, encoded, start = [], {}, 0, time.perf_counter()
    bar = tqdm(total=len(files) * cfg.clips_per_video, desc="encoding clips", unit="clip")
    for k in range(num_shards):
        videos = range(k * cfg.videos_per_shard, min(len(files), (k + 1) * cfg.videos_per_shard))
        path = out / f"shard_{k:05d}.safetensors"
        if path.is_file():  # written atomically by an earlier run: complete, if made by the same settings
            meta = read_shard_meta(path)
            check_fingerprint(path, meta["fingerprint"], made_by)
        else:
            shard = _encode_shard(cfg, vae, text_encoder, files, captions, videos, device)
            meta = {"records": shard["records"], "skipped": shard["skipped"], "fingerprint": made_by}
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
        "latent_shape": list(first_shape(out, shards)),
        "fingerprint": made_by,
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


