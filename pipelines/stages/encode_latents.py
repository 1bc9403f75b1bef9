"""Latents stage: the autoencoder run once over a video folder (``scripts/encode_latents.py``), its latents, captions
and frozen text embeddings written as shards (:mod:`pipelines.latents.shards`), resumable, never mixing settings.

Under ``accelerate launch --num_processes N`` each process encodes every N-th shard on its own GPU (shard ``k`` by
process ``k mod N``), so N processes write the same shards as one; the main process then writes the manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from einops import rearrange
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from autoencoder import encode_video, load_autoencoder
from pipelines.core.checkpoint import save_tensors
from pipelines.core.config import UserError, config_to_dict, save_resolved_config
from pipelines.core.devices import configure_numerics, resolve_device, to_device, vae_dtype, wants_cpu
from pipelines.core.files import (
    atomic_write_json,
    remove_stale_safetensors_temporaries,
    remove_stale_temporaries,
)
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


class _Shard:
    """What one shard's batches have given so far: latents, records, skipped files, text embeddings."""

    def __init__(self):
        self.latents, self.records, self.skipped, self.conds, self.contexts = [], [], {}, [], []

    def tensors(self) -> dict:
        """The shard's tensors, concatenated (none when every file was skipped)."""
        pairs = (("latents", self.latents), ("cond", self.conds), ("context", self.contexts))
        return {key: torch.cat(parts) for key, parts in pairs if parts}


def _encode_batch(cfg: EncodeConfig, vae, text_encoder, captions, batch: list[dict], shard: _Shard, device) -> None:
    """Encode a batch of clips (or note why its files were skipped) into ``shard``."""
    good = [item for item in batch if "error" not in item]
    shard.skipped.update({item["path"]: item["error"] for item in batch if "error" in item})
    if not good:
        return
    video = to_device(torch.stack([item["video"] for item in good]), device)
    with torch.inference_mode():
        shard.latents.append(encode_video(vae, video, cfg.chunk_frames, sample=cfg.sample_posterior).half().cpu())
    texts = [captions(Path(item["path"])) for item in good]
    shard.records += [{"caption": t, "path": item["path"], "frame_indices": item["indices"]}
                      for t, item in zip(texts, good)]
    if text_encoder is not None:
        emb = text_encoder(texts)
        shard.conds.append(emb["cond"].half().cpu())
        if cfg.store_tokens:
            shard.contexts.append(emb["context"].half().cpu())


def _encode_shards(cfg: EncodeConfig, vae, text_encoder, files, captions, shards: list[int], device, out: Path,
                   made_by: dict, bar) -> dict[int, dict]:
    """Encode ``shards`` (indices of shards not on disk yet) through one data loader, writing each shard as its last
    batch arrives (batches never span two shards); returns each shard's metadata (an empty shard, every file
    skipped, is not written)."""
    items, batches, owners = [], [], []  # (video, clip) items; batches of item indices; each batch's shard
    for k in shards:
        first = len(items)
        items += [(v, c) for v in _videos(cfg, k, len(files)) for c in range(cfg.clips_per_video)]
        batches += [list(range(i, min(i + cfg.batch_size, len(items))))
                    for i in range(first, len(items), cfg.batch_size)]
        owners += [k] * (len(batches) - len(owners))
    loader = DataLoader(_Clips(files, items, cfg.clip, cfg.seed), batch_sampler=batches, num_workers=cfg.num_workers,
                        collate_fn=_collate)
    metas, shard = {}, _Shard()
    for i, (k, batch) in enumerate(zip(owners, loader)):
        _encode_batch(cfg, vae, text_encoder, captions, batch, shard, device)
        bar.update(len(batch))
        if i + 1 == len(owners) or owners[i + 1] != k:  # the shard's last batch
            metas[k] = {"records": shard.records, "skipped": shard.skipped, "fingerprint": made_by}
            if shard.records:
                save_tensors(shard.tensors(), out / f"shard_{k:05d}.safetensors",
                             metadata={key: json.dumps(v) for key, v in metas[k].items()})
            shard = _Shard()
    return metas


def _videos(cfg: EncodeConfig, k: int, count: int) -> range:
    """The videos of shard ``k`` among ``count`` files."""
    return range(k * cfg.videos_per_shard, min(count, (k + 1) * cfg.videos_per_shard))


def fingerprint(cfg: EncodeConfig, vae, text_encoder, dtype: torch.dtype = torch.float32) -> dict:
    """What decides a shard's contents: the autoencoder's weights (and its precision, when not float32), the clip
    spec, the text encoder and the encoding settings."""
    return {"autoencoder_weights": weights_hash(vae), "clip": config_to_dict(cfg.clip),
            "text": text_identity(config_to_dict(cfg.text)) if text_encoder is not None else None,
            "store_tokens": cfg.store_tokens and text_encoder is not None, "sample_posterior": cfg.sample_posterior,
            "clips_per_video": cfg.clips_per_video, "videos_per_shard": cfg.videos_per_shard, "seed": cfg.seed,
            **({"vae_dtype": str(dtype).removeprefix("torch.")} if dtype != torch.float32 else {})}


def _process_state(device_name):
    """accelerate's view of this process, which ``accelerate launch`` started among others or which runs alone:
    rank, process count, device."""
    from accelerate import PartialState

    resolve_device(device_name)  # cuda without CUDA: a config error
    return PartialState(cpu=wants_cpu(device_name))


def encode_latents(cfg: EncodeConfig, log=print) -> dict:
    """Encode every clip of ``cfg.videos`` into shards under ``cfg.out_dir`` (resuming); returns the manifest."""
    state = _process_state(cfg.device)
    device = state.device
    configure_numerics(device)
    out = Path(cfg.out_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("shard_*.safetensors", NULL_TEXT, MANIFEST, "encode.yaml"):  # half-written by a killed run
            remove_stale_temporaries(out, name)
        remove_stale_safetensors_temporaries(out)
    state.wait_for_everyone()
    vae = load_autoencoder(cfg.autoencoder, device=device)
    dtype = vae_dtype(cfg.vae_dtype, device)
    made_by_vae = weights_hash(vae)  # of the weights as stored, before any cast
    vae.to(dtype)
    text_encoder = build_text_encoder(cfg.text)
    if is_trainable(text_encoder):
        log("note: the small text encoder trains with the U-Net; shards store captions only")
        text_encoder = None
    files = scan_media(cfg.videos, VIDEO_EXTENSIONS)
    if not files:
        raise UserError(f"no video files under {', '.join(cfg.videos)}")
    made_by = fingerprint(cfg, vae, text_encoder, dtype) | {"autoencoder_weights": made_by_vae}
    captions = find_captions(cfg.captions, [Path(r) for r in cfg.videos])
    num_shards = -(-len(files) // cfg.videos_per_shard)
    done = {k: read_shard_meta(path) for k in range(num_shards)
            if (path := out / f"shard_{k:05d}.safetensors").is_file()}  # written atomically by an earlier run
    for k, meta in done.items():  # every process checks all before anything is written: one refuses, all refuse
        check_fingerprint(out / f"shard_{k:05d}.safetensors", meta["fingerprint"], made_by)
    if state.is_main_process:
        save_resolved_config(cfg, out, "encode.yaml")
    if text_encoder is not None:
        text_encoder.to(device)
        if state.is_main_process:
            save_tensors({k: v.half() for k, v in text_encoder([""]).items()}, out / NULL_TEXT)
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index and k not in done]
    start, clips = time.perf_counter(), sum(len(_videos(cfg, k, len(files))) for k in mine) * cfg.clips_per_video
    with tqdm(total=clips, desc="encoding clips", unit="clip", disable=not state.is_main_process) as bar:
        encoded = gather_object([_encode_shards(cfg, vae, text_encoder, files, captions, mine, device, out, made_by,
                                                bar)])  # every process's shards, in rank order
    metas = done | {k: meta for part in encoded for k, meta in part.items()}
    per_process = [sum(len(meta["records"]) for meta in part.values()) for part in encoded]
    seconds = time.perf_counter() - start
    manifest = None
    if state.is_main_process:
        manifest = _manifest(cfg, out, vae, text_encoder, files, metas, made_by, per_process, seconds, log)
    state.wait_for_everyone()
    return manifest if manifest is not None else json.loads((out / MANIFEST).read_text())


def _manifest(cfg: EncodeConfig, out: Path, vae, text_encoder, files: list[Path], metas: dict[int, dict],
              made_by: dict, per_process: list[int], seconds: float, log) -> dict:
    """Write (atomically) and return the manifest of all shards."""
    shards, skipped = [], {}
    for k in sorted(metas):
        if metas[k]["records"]:
            shards.append({"file": f"shard_{k:05d}.safetensors", "clips": len(metas[k]["records"])})
        skipped.update(metas[k]["skipped"])
    encoded = sum(per_process)
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
        "stats": {"encoded_clips": encoded, "seconds": round(seconds, 2), "clips_per_process": per_process,
                  "clips_per_second": round(encoded / seconds, 2) if encoded and seconds > 0 else None},
    }
    atomic_write_json(out / MANIFEST, manifest)
    if skipped:
        log(f"skipped {len(skipped)} of {len(files)} files: " +
            "; ".join(f"{Path(p).name} ({r})" for p, r in list(skipped.items())[:10]))
    return manifest
