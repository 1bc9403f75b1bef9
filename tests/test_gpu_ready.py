"""What a GPU would punish, checked on the CPU: host synchronisations in the training step, steps skipped on the
device, precision of sampling and of the autoencoder, the compiled U-Net, throughput telemetry."""

from __future__ import annotations

from collections import Counter

import pipelines.core.loop as loop
from pipelines.core.config import load_config
from pipelines.core.telemetry import HostSyncs
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from tests.pipeline_helpers import autoencoder_overrides, diffusion_overrides

quiet = lambda *args, **kwargs: None  # noqa: E731
STEPS = ["run.steps=3", "run.log_every=3", "run.checkpoint_every=3"]  # steps 1 and 2 do not log


def syncs_per_step(monkeypatch, train) -> list[Counter]:
    """Run ``train()`` under :class:`HostSyncs`; the synchronisations of each training step, cut where the loop
    seeds the next step (the last one holds the logging, the checkpoint and what follows the loop)."""
    counter, starts = HostSyncs(), []
    seed_step = loop.seed_step

    def marked(*args, **kwargs):
        starts.append(len(counter.events))
        return seed_step(*args, **kwargs)

    monkeypatch.setattr(loop, "seed_step", marked)
    with counter:
        train()
    bounds = [*starts, len(counter.events)]
    return [Counter(f"{op} at {where}" for op, where in counter.events[a:b]) for a, b in zip(bounds, bounds[1:])]


def test_a_diffusion_step_that_does_not_log_never_waits_on_the_host(chain, tmp_path, monkeypatch):
    """Two micro-batches a step, known frames, appended images, conditioning dropout: no value is read back
    before the logging step."""
    overrides = [*diffusion_overrides(chain["latents"], tmp_path), *STEPS, "run.grad_accum=2", "sample_prompts=[]"]
    steps = syncs_per_step(monkeypatch, lambda: train_diffusion(
        load_config(DiffusionTrainConfig, None, overrides), quiet))
    assert len(steps) == 3
    assert steps[0] == Counter() and steps[1] == Counter(), steps[:2]
    assert sum(steps[2].values()) > 0  # the logging step reads the losses: the counter sees reads


def test_an_autoencoder_step_that_does_not_log_never_waits_on_the_host(chain, tmp_path, monkeypatch):
    """Generator and discriminator phases, the adaptive weight included (``disc_start=1``)."""
    overrides = [*autoencoder_overrides(chain["videos"], tmp_path), *STEPS, "loss.disc_start=1"]
    steps = syncs_per_step(monkeypatch, lambda: train_autoencoder(
        load_config(AutoencoderTrainConfig, None, overrides), quiet))
    assert len(steps) == 3
    assert steps[0] == Counter() and steps[1] == Counter(), steps[:2]
