"""The loader against diffusers' AutoencoderKL (peer check), LDM single files, our format, and errors."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from autoencoder import AutoencoderConfig, AutoencoderKL, load_autoencoder, save_autoencoder

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_CONFIGS = {
    "two_levels_groups8": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                               latent_channels=4),
    "three_levels_groups16": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16,
                                  latent_channels=8, scaling_factor=0.5, shift_factor=0.2),
    "no_quant_conv_no_attention": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                       latent_channels=4, use_quant_conv=False, use_post_quant_conv=False,
                                       mid_block_add_attention=False),
    "groups32": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4),
}
TINY = AutoencoderConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4)
# Our configuration for each, written out independently of the loader's conversion.
OUR_CONFIGS = {
    "two_levels_groups8": AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                                            z_channels=4, norm_groups=8, latent_scale=0.18215),
    "three_levels_groups16": AutoencoderConfig(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2,
                                               z_channels=8, norm_groups=16, latent_scale=0.5,
                                               latent_shift=0.2),
    "no_quant_conv_no_attention": AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                                                    z_channels=4, norm_groups=8, mid_attention=False,
                                                    latent_scale=0.18215),
    "groups32": AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1, z_channels=4,
                                  norm_groups=32, latent_scale=0.18215),
}


def make_diffusers_vae(name: str):
    """A seeded diffusers AutoencoderKL with every bias and norm affine perturbed (so a mix-up shows)."""
    kwargs = DIFFUSERS_CONFIGS[name]
    levels = len(kwargs["block_out_channels"])
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **kwargs)
    with torch.no_grad():
        for param in vae.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return vae.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (diffusers model, its save_pretrained directory)."""
    models = {}
    for name in DIFFUSERS_CONFIGS:
        directory = tmp_path_factory.mktemp(name)
        vae = make_diffusers_vae(name)
        vae.save_pretrained(directory)
        models[name] = (vae, directory)
    return models


def reference_outputs(vae, z_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, z, diffusers posterior mean of x, diffusers decoding of z) for a seeded 32×32 input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    levels = len(vae.config.block_out_channels)
    z = torch.randn(2, z_channels, 32 // 2 ** (levels - 1), 32 // 2 ** (levels - 1), generator=generator)
    with torch.no_grad():
        return x, z, vae.encode(x).latent_dist.mean, vae.decode(z).sample


def assert_matches_diffusers(ours: AutoencoderKL, theirs) -> None:
    x, z, mean, decoded = reference_outputs(theirs, ours.config.z_channels)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.decode(z), decoded, atol=1e-4, rtol=0)


def ldm_layout(diffusers_state: dict, levels: int, blocks: int) -> dict:
    """The LDM keys of a diffusers AutoencoderKL state dict, module by module (independent of the loader)."""
    source, out = dict(diffusers_state), {}

    def move(ldm: str, theirs: str, linear_to_conv: bool = False) -> None:
        for suffix in ("weight", "bias"):
            value = source.pop(f"{theirs}.{suffix}")
            if linear_to_conv and suffix == "weight":
                value = value.reshape(*value.shape, 1, 1)  # linear [o, i] -> 1x1 conv [o, i, 1, 1]
            out[f"{ldm}.{suffix}"] = value

    def resnet(ldm: str, theirs: str) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            move(f"{ldm}.{part}", f"{theirs}.{part}")
        if f"{theirs}.conv_shortcut.weight" in source:
            move(f"{ldm}.nin_shortcut", f"{theirs}.conv_shortcut")

    for side in ("encoder", "decoder"):
        for part in ("conv_in", "conv_out"):
            move(f"{side}.{part}", f"{side}.{part}")
        move(f"{side}.norm_out", f"{side}.conv_norm_out")
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        if f"{side}.mid_block.attentions.0.to_q.weight" in source:
            move(f"{side}.mid.attn_1.norm", f"{side}.mid_block.attentions.0.group_norm")
            attention = f"{side}.mid_block.attentions.0"
            for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
                move(f"{side}.mid.attn_1.{ours}", f"{attention}.{theirs}", linear_to_conv=True)
    for i in range(levels):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            move(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        k = levels - 1 - i  # diffusers counts decoder blocks from the lowest resolution
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}")
        if i > 0:
            move(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    for name in ("quant_conv", "post_quant_conv"):
        move(name, name)
    assert not source, f"unmapped diffusers keys {sorted(source)}"
    return out


def ldm_state_of(name: str, theirs) -> dict:
    kwargs = DIFFUSERS_CONFIGS[name]
    return ldm_layout(theirs.state_dict(), len(kwargs["block_out_channels"]), kwargs["layers_per_block"])


@pytest.mark.parametrize("name",
                         ["two_levels_groups8", "three_levels_groups16", "no_quant_conv_no_attention"])
def test_diffusers_directory_matches_diffusers(saved, name):
    theirs, directory = saved[name]
    ours = load_autoencoder(directory)
    assert not ours.training
    assert ours.config == OUR_CONFIGS[name]
    assert_matches_diffusers(ours, theirs)


def test_pipeline_directory_with_a_vae_subfolder(saved, tmp_path):
    theirs, directory = saved["two_levels_groups8"]
    shutil.copytree(directory, tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert_matches_diffusers(load_autoencoder(tmp_path / "pipeline"), theirs)


@pytest.mark.parametrize("name", ["two_levels_groups8", "three_levels_groups16"])
@pytest.mark.parametrize("layout", ["safetensors", "sd_ckpt", "sd_safetensors"])
def test_ldm_single_file_matches_diffusers(saved, tmp_path, name, layout):
    theirs, _ = saved[name]
    state = ldm_state_of(name, theirs)
    if layout == "safetensors":
        path = tmp_path / "vae.safetensors"
        save_file(state, path)
    else:  # a whole SD checkpoint: VAE under first_stage_model., other weights beside it
        full = {f"first_stage_model.{key}": value for key, value in state.items()}
        full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
        full["cond_stage_model.transformer.x"] = torch.zeros(3)
        path = tmp_path / ("sd.ckpt" if layout == "sd_ckpt" else "sd.safetensors")
        if layout == "sd_ckpt":
            torch.save({"state_dict": full, "global_step": 7}, path)
        else:
            save_file(full, path)
    ours = load_autoencoder(path, config=OUR_CONFIGS[name])
    assert_matches_diffusers(ours, theirs)


def test_ldm_file_architecture_is_inferred_from_shapes(saved, tmp_path):
    theirs, _ = saved["groups32"]
    path = tmp_path / "vae.ckpt"
    torch.save(ldm_state_of("groups32", theirs), path)
    ours = load_autoencoder(path)
    assert ours.config == OUR_CONFIGS["groups32"]  # latent scale: SD's 0.18215 by default
    assert_matches_diffusers(ours, theirs)
    assert load_autoencoder(path, latent_scale=0.3).config.latent_scale == 0.3


def test_attention_stored_as_linear_weights_in_an_ldm_file(saved, tmp_path):
    theirs, _ = saved["groups32"]
    state = {key: value.flatten(1) if ".attn_1." in key and value.ndim == 4 else value
             for key, value in ldm_state_of("groups32", theirs).items()}
    save_file(state, tmp_path / "vae.safetensors")
    assert_matches_diffusers(load_autoencoder(tmp_path / "vae.safetensors"), theirs)


def test_own_format_round_trip(tmp_path):
    vae = AutoencoderKL(dataclasses.replace(TINY, latent_scale=0.7, latent_shift=0.1))
    save_autoencoder(vae, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["_class_name"] == "LatentVideoAutoencoderKL" and meta["latent_scale"] == 0.7
    loaded = load_autoencoder(tmp_path / "model", dtype=torch.float64)
    assert loaded.config == vae.config and not loaded.training
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.double(), atol=0, rtol=0)


def test_loaded_for_inference_in_channels_last_with_the_same_video_out(tmp_path):
    """The loader's NHWC weights (faster convolutions on the CPU) give the NCHW model's encoding and decoding,
    the video layout ``[b, c, f, h, w]`` unchanged, the same weights hash for the latent cache (its 1×1
    convolutions are "contiguous" with a last stride above 1), and a reload saves back to the same tensors."""
    from autoencoder import decode_video, encode_video
    from pipelines.latents.shards import weights_hash

    save_autoencoder(AutoencoderKL(TINY), tmp_path / "model")
    fast, plain = load_autoencoder(tmp_path / "model"), load_autoencoder(tmp_path / "model", channels_last=False)
    weight = fast.decoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert weights_hash(fast) == weights_hash(plain)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z_fast, z_plain = encode_video(fast, video), encode_video(plain, video)
        torch.testing.assert_close(z_fast, z_plain, atol=1e-5, rtol=1e-5)
        out = decode_video(fast, z_plain)
        torch.testing.assert_close(out, decode_video(plain, z_plain), atol=1e-5, rtol=1e-5)
    assert out.shape == video.shape
    save_autoencoder(fast, tmp_path / "again")
    for key, value in load_autoencoder(tmp_path / "again", channels_last=False).state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key


def test_checkpoint_root_follows_latest_and_prefers_ema(tmp_path):
    config = TINY
    model, ema = AutoencoderKL(config), AutoencoderKL(config)
    step = tmp_path / "run" / "step_0000002"
    save_autoencoder(model, step)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, step / "ema_model.safetensors")
    save_autoencoder(AutoencoderKL(config), tmp_path / "run" / "step_0000001")  # older, not pointed at
    (tmp_path / "run" / "latest").write_text("step_0000002\n")
    key = "decoder.conv_out.weight"
    assert torch.equal(load_autoencoder(tmp_path / "run").state_dict()[key], ema.state_dict()[key])
    assert torch.equal(load_autoencoder(tmp_path / "run", prefer_ema=False).state_dict()[key],
                       model.state_dict()[key])


def test_errors_say_what_was_expected(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no autoencoder at"):
        load_autoencoder(tmp_path / "absent")
    (tmp_path / "bogus").mkdir()
    (tmp_path / "bogus" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="config.json") as error:
        load_autoencoder(tmp_path / "bogus")
    assert "\n" not in str(error.value)
    (tmp_path / "bogus" / "latest").write_text("step_9\n")
    with pytest.raises(FileNotFoundError, match="step_9"):
        load_autoencoder(tmp_path / "bogus")
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_autoencoder(tmp_path / "bad.bin")


def test_missing_weights_and_keys_are_named(tmp_path, saved):
    save_autoencoder(AutoencoderKL(TINY), tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_autoencoder(tmp_path / "model")
    theirs, _ = saved["groups32"]
    state = ldm_state_of("groups32", theirs)
    del state["decoder.up.1.upsample.conv.bias"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="decoder.up.1.upsample.conv.bias"):
        load_autoencoder(tmp_path / "partial.safetensors")
    save_file({"unet.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="no autoencoder weights"):
        load_autoencoder(tmp_path / "unet.safetensors")


def test_unknown_config_keys_are_an_error(tmp_path):
    save_autoencoder(AutoencoderKL(TINY), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "channels": 3}))
    with pytest.raises(ValueError, match="channels"):
        load_autoencoder(tmp_path)
