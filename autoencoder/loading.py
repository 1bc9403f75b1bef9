"""One loader for every autoencoder checkpoint layout, and the project's own save format.

:func:`load_autoencoder` accepts
  (a) our model directory: ``config.json`` (``"_class_name": "LatentVideoAutoencoderKL"`` + the
      :class:`AutoencoderConfig` fields) and ``model.safetensors`` (``ema_model.safetensors`` preferred if present);
  (b) a training-run checkpoint root whose ``latest`` text file names the subdirectory to read as (a);
  (c) a diffusers ``AutoencoderKL`` directory (``config.json`` + ``diffusion_pytorch_model.safetensors``), or
      a pipeline directory with one in ``vae/``; keys are converted to the LDM layout (:func:`diffusers_to_ldm`);
  (d) one LDM / SD file (``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` read with ``weights_only=True``),
      possibly a whole SD checkpoint (``state_dict``, VAE keys under ``first_stage_model.``); its
      architecture is inferred from the tensor shapes and its latent scale defaults to SD's 0.18215.
Nothing is unpickled beyond tensors, and every mismatch is a one-line ``FileNotFoundError`` / ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autoencoder.config import CLASS_NAME, AutoencoderConfig
from autoencoder.model import AutoencoderKL

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema_model.safetensors"
LATEST_FILE = "latest"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SD_LATENT_SCALE = 0.18215
LDM_PREFIX = "first_stage_model."
VAE_KEY_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
EXPECTED = (
    f"expected a model directory ({CONFIG_FILE} with _class_name {CLASS_NAME!r} + {WEIGHTS_FILE}), "
    f"a checkpoint root with a {LATEST_FILE!r} file, a diffusers AutoencoderKL directory ({CONFIG_FILE} + "
    f"{DIFFUSERS_WEIGHTS_FILE}, or a pipeline directory with vae/), or a .safetensors/.ckpt/.pt/.pth LDM file"
)
ATTENTION_NAMES = {
    "group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}
ATTENTION_PROJECTION = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def load_autoencoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, *, config: AutoencoderConfig | None = None,
                     prefer_ema: bool = True, latent_scale: float | None = None,
                     channels_last: bool = True) -> AutoencoderKL:
    """Load an :class:`AutoencoderKL` in eval mode from any layout (a)–(d) in the module docstring.

    Args:
        config: use this architecture instead of the stored or inferred one (needed for an LDM file whose
            GroupNorm does not use 32 groups: group counts are not visible in tensor shapes).
        prefer_ema: read ``ema_model.safetensors`` instead of ``model.safetensors`` when a model directory has both.
        latent_scale: override the latent scale (LDM files default to 0.18215).
        channels_last: convolution weights in channels-last (NHWC) memory, so the convolutions' outputs are
            too and oneDNN skips reordering every activation: decoding 1.27× (one 24-frame video) to 1.42×
            (four) faster on a 2-core CPU, the same values to float tolerance (BENCHMARKS.md, 2026-12-06
            third session). Training keeps NCHW (no faster there).
    """
    stored, state = _read(Path(path), prefer_ema)
    config = config if config is not None else stored
    if latent_scale is not None:
        config = dataclasses.replace(config, latent_scale=latent_scale)
    vae = _build(config, state, str(path)).to(device=device, dtype=dtype).eval()
    return vae.to(memory_format=torch.channels_last) if channels_last else vae


def save_autoencoder(vae: AutoencoderKL, directory: str | os.PathLike) -> Path:
    """Write layout (a): ``model.safetensors`` then ``config.json``, each atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().cpu() for key, value in vae.state_dict().items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    text = json.dumps({"_class_name": CLASS_NAME, **dataclasses.asdict(vae.config)}, indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write`` on a temporary file next to ``path``, then ``os.replace`` it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, prefer_ema: bool) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """(config, LDM-layout state dict) from whichever layout ``path`` holds."""
    if not path.exists():
        raise FileNotFoundError(f"no autoencoder at {path}: {EXPECTED}")
    if path.is_file():
        return _read_ldm_file(path)
    if (path / LATEST_FILE).is_file():
        return _read_model_directory(_follow_latest(path), prefer_ema)
    meta = _read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    if meta.get("_class_name") == CLASS_NAME:
        return _read_model_directory(path, prefer_ema)
    if "block_out_channels" in meta:
        return _read_diffusers_directory(path, meta)
    if (path / "vae").is_dir():
        return _read(path / "vae", prefer_ema)
    raise ValueError(f"{path} is not an autoencoder directory: {EXPECTED}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _follow_latest(root: Path) -> Path:
    """The subdirectory of a checkpoint root that its ``latest`` file names."""
    name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    if not name or not (root / name).is_dir():
        raise FileNotFoundError(f"{root / LATEST_FILE} names {name!r}, which is not a directory in {root}")
    return root / name


def _read_model_directory(directory: Path, prefer_ema: bool) -> tuple[AutoencoderConfig, dict]:
    """Layout (a): our ``config.json`` and ``ema_model.safetensors`` / ``model.safetensors``."""
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}: a model directory must hold "
                                f"{CONFIG_FILE} (_class_name {CLASS_NAME!r}) and {WEIGHTS_FILE}")
    meta = _read_json(directory / CONFIG_FILE)
    if meta.get("_class_name") != CLASS_NAME:
        raise ValueError(f"{directory / CONFIG_FILE} has _class_name {meta.get('_class_name')!r}, "
                         f"expected {CLASS_NAME!r}")
    use_ema = prefer_ema and (directory / EMA_FILE).is_file()
    weights = directory / (EMA_FILE if use_ema else WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_FILE}: a model directory must hold "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE} (or {EMA_FILE})")
    return config_from_dict(meta), load_file(weights)


def config_from_dict(values: dict) -> AutoencoderConfig:
    """An :class:`AutoencoderConfig` from our ``config.json`` contents; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    unknown = sorted(set(values) - names - {"_class_name"})
    if unknown:
        raise ValueError(f"unknown autoencoder config keys {unknown}; known keys are {sorted(names)}")
    return AutoencoderConfig(**{key: value for key, value in values.items() if key in names})


def _read_diffusers_directory(directory: Path, meta: dict) -> tuple[AutoencoderConfig, dict]:
    """Layout (c): a diffusers ``AutoencoderKL`` directory, converted to the LDM key layout."""
    weights = directory / DIFFUSERS_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} holds a diffusers {CONFIG_FILE} but no "
                                f"{DIFFUSERS_WEIGHTS_FILE}")
    config = config_from_diffusers(meta)
    state = diffusers_to_ldm(load_file(weights), levels=len(config.channel_mult))
    if not meta.get("use_quant_conv", True):
        state.update(_identity_conv("quant_conv", 2 * config.z_channels))
    if not meta.get("use_post_quant_conv", True):
        state.update(_identity_conv("post_quant_conv", config.z_channels))
    return config, state


def config_from_diffusers(meta: dict) -> AutoencoderConfig:
    """An :class:`AutoencoderConfig` from a diffusers ``AutoencoderKL`` config (its defaults if absent)."""
    if meta.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or meta.get("act_fn", "silu") != "silu":
        raise ValueError(f"only diffusers AutoencoderKL with act_fn 'silu' is supported, got "
                         f"{meta.get('_class_name')!r} with act_fn {meta.get('act_fn')!r}")
    unsupported = {t for t in meta.get("down_block_types", ()) if t != "DownEncoderBlock2D"}
    unsupported |= {t for t in meta.get("up_block_types", ()) if t != "UpDecoderBlock2D"}
    if unsupported:
        raise ValueError(f"unsupported diffusers block types {sorted(unsupported)}: expected "
                         "DownEncoderBlock2D / UpDecoderBlock2D")
    widths = list(meta["block_out_channels"])
    if any(width % widths[0] for width in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    return AutoencoderConfig(
        in_channels=meta.get("in_channels", 3), out_channels=meta.get("out_channels", 3),
        base_channels=widths[0], channel_mult=[width // widths[0] for width in widths],
        num_res_blocks=meta.get("layers_per_block", 1), z_channels=meta.get("latent_channels", 4),
        norm_groups=meta.get("norm_num_groups", 32), mid_attention=meta.get("mid_block_add_attention", True),
        latent_scale=meta.get("scaling_factor", SD_LATENT_SCALE),
        latent_shift=meta.get("shift_factor") or 0.0,
    )


def _ldm_key(key: str, levels: int) -> str:
    """A diffusers ``AutoencoderKL`` key in LDM layout; decoder ``up_blocks.{k}`` is ``up.{levels-1-k}``."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0|query|key|value|proj_attn)\.",
                 lambda m: f"mid.attn_1.{ATTENTION_NAMES[m[1]]}.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    up = lambda m: f"decoder.up.{levels - 1 - int(m[1])}."
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", key)
    return re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", key)


def diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (attention linear [o, i] → 1×1 conv)."""
    return _attention_as_conv({_ldm_key(key, levels): value for key, value in state.items()})


def _attention_as_conv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mid-attention projection weights stored as linear [o, i] reshaped to 1×1 conv [o, i, 1, 1]."""
    return {key: value[:, :, None, None] if value.ndim == 2 and ATTENTION_PROJECTION.search(key) else value
            for key, value in state.items()}


def _identity_conv(name: str, channels: int) -> dict[str, torch.Tensor]:
    """Weights of a 1×1 conv that passes its input through (for diffusers VAEs without quant convs)."""
    return {f"{name}.weight": torch.eye(channels)[:, :, None, None], f"{name}.bias": torch.zeros(channels)}


def _read_ldm_file(path: Path) -> tuple[AutoencoderConfig, dict]:
    """Layout (d): VAE weights of one LDM / SD file and the architecture their shapes imply."""
    state = _read_vae_weights(path)
    if not state:
        raise ValueError(f"{path} holds no autoencoder weights: expected keys {', '.join(VAE_KEY_ROOTS)}* "
                         f"(optionally under {LDM_PREFIX!r})")
    return infer_config(state, str(path)), _attention_as_conv(state)


def _vae_keys(keys) -> dict[str, str]:
    """LDM VAE key → stored key; keys under ``first_stage_model.`` when there are any, others dropped."""
    keys = list(keys)
    prefix = LDM_PREFIX if any(key.startswith(LDM_PREFIX) for key in keys) else ""
    return {key[len(prefix):]: key for key in keys
            if key.startswith(prefix) and key[len(prefix):].startswith(VAE_KEY_ROOTS)}


def _read_vae_weights(path: Path) -> dict[str, torch.Tensor]:
    """The VAE tensors of a ``.safetensors`` file (only those are read) or a tensors-only torch checkpoint."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with safe_open(path, framework="pt", device="cpu") as file:
            return {ours: file.get_tensor(stored) for ours, stored in _vae_keys(file.keys()).items()}
    state = _read_torch_checkpoint(path)
    return {ours: state[stored] for ours, stored in _vae_keys(state).items()
            if isinstance(state[stored], torch.Tensor)}


def _read_torch_checkpoint(path: Path) -> dict:
    """The flat dict (its ``state_dict`` if it has one) of a ``.ckpt``/``.pt``/``.pth`` read tensors-only."""
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; {EXPECTED}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"{path} holds more than tensors and is not loaded with weights_only=True "
                         f"({first_line}); convert it to .safetensors") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a dict of tensors")
    return loaded.get("state_dict", loaded)


def _indices(state: dict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` at the start of the keys."""
    return sorted({int(m[1]) for key in state if (m := re.match(pattern, key))})


def infer_config(state: dict[str, torch.Tensor], source: str = "state dict") -> AutoencoderConfig:
    """The architecture of an LDM-layout state dict from its tensor shapes.

    Group counts do not show in shapes: 32 (LDM / SD) is assumed; pass a config to the loader otherwise.
    """
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    blocks = _indices(state, r"encoder\.down\.0\.block\.(\d+)\.")
    needed = ["encoder.conv_in.weight", "post_quant_conv.weight", "decoder.conv_out.weight"]
    needed += [f"encoder.down.{i}.block.0.conv1.weight" for i in levels]
    missing = [key for key in needed if key not in state] or ([] if levels and blocks else ["encoder.down.*"])
    if missing:
        raise ValueError(f"{source}: cannot infer the autoencoder architecture, missing {missing}")
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    if any(width % 32 for width in widths):
        raise ValueError(f"{source}: widths {widths} do not fit 32 GroupNorm groups; pass config= "
                         f"with the right norm_groups")
    return AutoencoderConfig(
        in_channels=in_channels, out_channels=state["decoder.conv_out.weight"].shape[0], base_channels=base,
        channel_mult=[width // base for width in widths], num_res_blocks=len(blocks),
        z_channels=state["post_quant_conv.weight"].shape[0], norm_groups=32,
        mid_attention="encoder.mid.attn_1.q.weight" in state, latent_scale=SD_LATENT_SCALE,
    )


def _build(config: AutoencoderConfig, state: dict[str, torch.Tensor], source: str) -> AutoencoderKL:
    """An :class:`AutoencoderKL` holding ``state`` (built on the meta device: no initialisation is wasted)."""
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    expected = {key: value.shape for key, value in vae.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the architecture {config}: {len(missing)} missing "
                         f"keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    wrong = [f"{key} {tuple(state[key].shape)} != {tuple(shape)}" for key, shape in expected.items()
             if state[key].shape != shape]
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} tensors have the wrong shape for {config}, e.g. {wrong[0]}")
    vae.load_state_dict(state, assign=True)
    return vae
