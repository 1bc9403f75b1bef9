"""The pipeline stages on real video files: outputs, skipped broken files, shards, resumption."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from autoencoder import load_autoencoder
from pipelines.core.config import load_config
from pipelines.evaluation.reconstruction import held_out_frames
from pipelines.latents.shards import LatentDataset
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig, EncodeConfig
from pipelines.stages.encode_latents import encode_latents
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from tests.pipeline_helpers import (
    BROKEN,
    autoencoder_overrides,
    diffusion_overrides,
    encode_overrides,
    logged_losses,
)

quiet = lambda *args, **kwargs: None  # noqa: E731


def test_autoencoder_run_writes_a_loadable_model_and_its_pictures(chain):
    run = chain["autoencoder"]
    for name in ("config.yaml", "eval.json", "loss.csv", "loss.png", "samples/reconstructions.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "eval.json").read_text())
    assert summary["steps"] == 4 and -1 <= summary["ssim"] <= 1
    vae = load_autoencoder(run / "model")
    # PSNR recomputed here from its definition (data range [-1, 1], peak-to-peak 2) on the same held-out frames
    config = load_config(AutoencoderTrainConfig, None, autoencoder_overrides(chain["videos"], run))
    frames, source = held_out_frames(config.data, config.eval_frames, config.run.seed + 1)
    assert source == "eval" and summary["frames"] == len(frames) >= 2
    with torch.no_grad():
        recon = vae.decode(vae.encode(frames).mean).clamp(-1, 1)
    mse = (recon - frames).pow(2).flatten(1).mean(1)
    assert summary["psnr"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), abs=1e-3)
    assert 5 < summary["psnr"] < 60  # 4 steps of a tiny VAE: far from perfect, far from noise
    assert vae.config.latent_scale == pytest.approx(summary["latent_scale"])
    checkpoint = load_autoencoder(run / "checkpoints")  # a checkpoint root is a loadable model too
    assert checkpoint.config.base_channels == 8


def test_encoding_skips_broken_files_and_lists_them(chain):
    manifest = json.loads((chain["latents"] / "manifest.json").read_text())
    skipped = {p.split("/")[-1] for p in manifest["skipped"]}
    assert skipped == set(BROKEN)
    assert manifest["clips"] == 13  # 12 world clips + the ffmpeg clip
    assert manifest["latent_shape"] == [4, 8, 8, 8]
    dataset = LatentDataset(chain["latents"])
    assert len(dataset) == 13
    item = dataset[0]
    assert item["latents"].shape == (4, 8, 8, 8) and item["caption"].startswith("a ")
    captions = [r["caption"] for r in dataset.records]
    assert captions.count("") == 1  # the ffmpeg clip has none


def test_encoding_resumes_without_duplicates_or_gaps(chain, tmp_path):
    """Simulate a kill after the first shards: delete the last shard and the manifest, rerun, compare."""
    out = tmp_path / "lat"
    shutil.copytree(chain["latents"], out)
    shards = sorted(out.glob("shard_*.safetensors"))
    assert len(shards) >= 3
    reference = load_file(shards[-1])["latents"]
    shards[-1].unlink()
    (out / "manifest.json").unlink()
    manifest = encode_latents(load_config(EncodeConfig, None, encode_overrides(
        chain["autoencoder"] / "model", chain["videos"], out)), quiet)
    assert manifest["stats"]["encoded_clips"] == load_file(shards[-1])["latents"].shape[0]  # only the lost shard
    torch.testing.assert_close(load_file(shards[-1])["latents"], reference)
    paths = [r["path"] for r in LatentDataset(out).records]
    assert len(paths) == len(set(paths)) == 13


def test_diffusion_run_writes_checkpoints_samples_and_curves(chain):
    run = chain["diffusion"]
    for name in ("config.yaml", "loss.csv", "loss.png", "summary.json", "samples/step_0000004.png"):
        assert (run / name).is_file(), name
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    files = {p.name for p in latest.iterdir()}
    assert {"unet.safetensors", "ema_unet.safetensors", "text.safetensors", "optimizer_main.safetensors",
            "trainer_state.json"} <= files
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["latent_shape"] == [4, 6, 8, 8]


def _weights(directory):
    return {p.name: load_file(p) for p in sorted(directory.glob("*.safetensors"))}


def _assert_same_run(a, b):
    """Two runs ended in the same state: every checkpoint tensor and the logged losses."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        for key in wa[name]:
            torch.testing.assert_close(wa[name][key], wb[name][key], rtol=0, atol=0, msg=f"{name}:{key}")


def test_diffusion_training_resumes_exactly(chain, tmp_path):
    """4 steps straight equal 2 steps, a kill, and a resumed run to step 4."""
    straight = tmp_path / "straight"
    train_diffusion(load_config(DiffusionTrainConfig, None, diffusion_overrides(chain["latents"], straight)), quiet)
    resumed = tmp_path / "resumed"
    train_diffusion(load_config(DiffusionTrainConfig, None,
                                diffusion_overrides(chain["latents"], resumed, steps=2)), quiet)
    train_diffusion(load_config(DiffusionTrainConfig, None, diffusion_overrides(chain["latents"], resumed)), quiet)
    _assert_same_run(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    assert logged_losses(straight) == logged_losses(resumed)  # the curve too


def test_autoencoder_training_resumes_exactly(chain, tmp_path):
    """The same for the VAE, with the discriminator switched on mid-run (disc_start=2)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_autoencoder(load_config(AutoencoderTrainConfig, None, autoencoder_overrides(chain["videos"], straight)),
                      quiet)
    train_autoencoder(load_config(AutoencoderTrainConfig, None,
                                  autoencoder_overrides(chain["videos"], resumed, steps=2)), quiet)
    train_autoencoder(load_config(AutoencoderTrainConfig, None, autoencoder_overrides(chain["videos"], resumed)),
                      quiet)
    _assert_same_run(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    assert logged_losses(straight) == logged_losses(resumed)


def test_joint_training_with_an_image_folder_uses_each_images_caption(chain, tmp_path, monkeypatch):
    """Appended images come from an image folder, encoded on the fly, each conditioned on its own caption."""
    from tests.videos import image_file

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        image_file(folder / f"{i}.png", size=(40, 40), seed=i)
    lines = [json.dumps({"path": f"{i}.png", "caption": f"image {i}"}) for i in range(3)]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    seen = []
    from pipelines.stages import train_diffusion as module

    original = module.per_frame_conditioning

    def spy(text, batch, frames):
        conditioning, null_conditioning = original(text, batch, frames)
        seen.append((batch["image_caption"], conditioning["cond"].shape))
        return conditioning, null_conditioning

    monkeypatch.setattr(module, "per_frame_conditioning", spy)
    overrides = diffusion_overrides(chain["latents"], tmp_path / "run", steps=2) + [f"data.images=[{folder}]"]
    train_diffusion(load_config(DiffusionTrainConfig, None, overrides), quiet)
    captions, shape = seen[0]
    assert len(captions) == 3 and all(len(row) == 2 for row in captions)
    assert {c for row in captions for c in row} <= {"image 0", "image 1", "image 2"}
    assert shape == (3, 6 + 2, 16)  # per frame: 6 video frames share the clip's caption, 2 images their own


def test_evaluating_an_autoencoder_on_held_out_frames(chain, tmp_path):
    from pipelines.stages.configs import EvaluateAutoencoderConfig as EvaluateConfig
    from pipelines.stages.evaluate_autoencoder import evaluate_autoencoder

    out = tmp_path / "scores.json"
    cfg = load_config(EvaluateConfig, None, [f"autoencoder={chain['autoencoder'] / 'model'}",
                                             f"data.roots=[{chain['videos']}]", "data.size=32", "frames=8",
                                             f"out={out}", "data.eval_fraction=0.2"])
    scores = evaluate_autoencoder(cfg, quiet)
    trained = json.loads((chain["autoencoder"] / "eval.json").read_text())
    assert json.loads(out.read_text())["frames"] == trained["frames"]
    assert scores["psnr"] == pytest.approx(trained["psnr"], abs=1e-4)  # the same held-out frames as training used


def test_only_clips_cropped_from_a_videos_first_frame_are_told_they_start_it():
    """Frame positions mean "frame k of the video": a window cropped later never gets them, and a share
    ``p_unknown_start`` of the others trains the position-free mode that extension chunks are sampled in."""
    from diffusion.config import UNet3DConfig
    from pipelines.models.config import DiffusionModelConfig
    from pipelines.stages.train_diffusion import SampleDraws, crop_and_append, draw_windows, video_start

    draws = SampleDraws(0, torch.arange(400), 400, torch.device("cpu"))
    windows = draw_windows(draws, 6, 4, DiffusionModelConfig(unet=UNet3DConfig(), window="random"))
    clips = crop_and_append(torch.randn(400, 4, 6, 8, 8), windows, 4, 0, draws)
    first = windows.first
    assert clips.shape == (400, 4, 4, 8, 8) and set(first.tolist()) == {0, 1, 2}
    assert windows.known is None
    source_start = first + 3 * (torch.arange(400) % 2)  # odd clips were cut 3 frames into their video
    for p, expected in [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]:
        start = video_start({"source_start": source_start}, draws, p)
        assert not start[source_start > 0].any()
        assert abs(start[source_start == 0].float().mean().item() - expected) < 0.12


def test_training_logs_through_accelerate_trackers(chain, tmp_path):
    """``run.report_to=tensorboard``: the loss reaches TensorBoard's event files besides loss.csv."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    train_diffusion(load_config(DiffusionTrainConfig, None, diffusion_overrides(chain["latents"], out, steps=2)
                                + ["run.report_to=tensorboard", "sample_prompts=[]"]), quiet)
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    scalars = {}
    for folder in {e.parent for e in events}:  # accelerate writes hyper-parameters into a folder of their own
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        scalars |= {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    assert scalars.get("loss") == [1, 2], scalars


def test_known_first_frames_are_drawn_per_clip_and_left_out_of_the_loss():
    """``unet.known_frames``: a share ``p_known`` of the clips is given its first 1..max_known frames (never an
    appended image, never the whole window), and the loss averages over the frames not given."""
    from diffusion import Denoiser, NoiseSchedule, diffusion_loss
    from pipelines.stages.train_diffusion import SampleDraws, known_counts, known_first_frames

    draws = SampleDraws(0, torch.arange(600), 600, torch.device("cpu"))
    mask = known_first_frames(known_counts(draws, 6, p_known=0.5, max_known=8), 6, 2)
    counts = mask.sum(1)
    assert mask.shape == (600, 8) and not mask[:, 6:].any()
    assert torch.equal(mask, torch.arange(8)[None] < counts[:, None])  # always the first frames
    assert abs((counts > 0).float().mean().item() - 0.5) < 0.08 and set(counts.tolist()) == set(range(6))
    assert not known_counts(draws, 6, p_known=0.0, max_known=3).any()
    assert not known_counts(draws, 1, p_known=1.0, max_known=3).any()  # never the whole window

    class Copy(torch.nn.Module):  # x̂ = z: the error is known in closed form
        def forward(self, z, logsnr, **_):
            return z

    x0, noise = torch.randn(2, 1, 4, 2, 2), torch.randn(2, 1, 4, 2, 2)
    keep = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])[:, None, :, None, None]
    t = torch.tensor([0.3, 0.6])
    schedule = NoiseSchedule()
    loss = diffusion_loss(Denoiser(Copy(), "x"), x0, schedule, t=t, noise=noise, loss_mask=keep)
    logsnr = schedule.logsnr(t)
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    error = ((alpha - 1)[:, None, None, None, None] * x0 + sigma[:, None, None, None, None] * noise).pow(2)
    torch.testing.assert_close(loss, torch.stack([error[0, :, 2:].mean(), error[1].mean()]))


def test_windows_start_their_clip_unless_given_frames():
    """``model.window = first_unless_known``: a clip given no known frames is cropped at its first frame (a first
    chunk starts its video), one given frames anywhere (an extension's context lies anywhere); the default crops
    every clip anywhere."""
    from diffusion.config import UNet3DConfig
    from pipelines.models.config import DiffusionModelConfig
    from pipelines.stages.train_diffusion import SampleDraws, crop_and_append, draw_windows

    model = DiffusionModelConfig(unet=UNet3DConfig(known_frames=True), window="first_unless_known")
    draws = SampleDraws(3, torch.arange(2000), 2000, torch.device("cpu"))
    w = draw_windows(draws, 24, 16, model)
    assert (w.first[w.known == 0] == 0).all() and set(w.first[w.known > 0].tolist()) == set(range(9))
    frames = torch.arange(24.0)[None, None, :, None, None].expand(2000, 1, 24, 1, 1)  # each frame holds its index
    shown = crop_and_append(frames, w, 16, 0, draws)[:, 0, :, 0, 0]
    torch.testing.assert_close(shown, (w.first[:, None] + torch.arange(16)).float())
    plain = draw_windows(SampleDraws(3, torch.arange(2000), 2000, torch.device("cpu")), 24, 16,
                         DiffusionModelConfig(unet=UNet3DConfig(known_frames=True), window="random"))
    assert (plain.first[plain.known == 0] > 0).any()  # "random": anywhere


def test_training_noise_is_each_samples_own_draw():
    """The training objective's ε is the per-sample draw keyed by the sample's slot, appended images included;
    x̂ = z makes the loss a closed form of that ε."""
    from diffusion import Denoiser, NoiseSchedule, loss_weight
    from pipelines.models.conditioning import TextConditioning
    from pipelines.models.config import DiffusionModelConfig, TextConfig
    from pipelines.stages.train_diffusion import DiffusionObjective, SampleDraws

    class Copy(torch.nn.Module):
        def forward(self, z, logsnr, **_):
            return z

    schedule, x0 = NoiseSchedule(), torch.randn(3, 2, 5, 2, 2)
    batch = {"caption": ["a", "b", "c"], "source_start": torch.zeros(3, dtype=torch.long)}
    config = DiffusionModelConfig(p_uncond=0.0)
    objective = DiffusionObjective(Denoiser(Copy(), "x"), TextConditioning(None, TextConfig(kind="none")),
                                   schedule, config)
    loss = objective(x0, batch, SampleDraws(0, torch.arange(3), 3, torch.device("cpu")), num_images=1)
    draws = SampleDraws(0, torch.arange(3), 3, torch.device("cpu"))  # the same draws, in the same order
    t, eps = draws.times(), draws.normal((2, 5, 2, 2))
    logsnr = schedule.logsnr(t)
    alpha, sigma = (torch.sigmoid(s * logsnr).sqrt()[:, None, None, None, None] for s in (1, -1))
    expected = ((alpha - 1) * x0 + sigma * eps).pow(2).flatten(1).mean(1) * loss_weight(logsnr, "auto", "x")
    torch.testing.assert_close(loss, expected)
