"""What a GPU would punish, checked on the CPU: host synchronisations in the training step, steps skipped on the
device, precision of sampling and of the autoencoder, the compiled U-Net, throughput telemetry."""

from __future__ import annotations

import csv
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import pipelines.core.loop as loop
from pipelines.core.config import load_config
from pipelines.core.telemetry import FlopCount, HostSyncs, peak_flops, throughput
from pipelines.stages.configs import AutoencoderTrainConfig, DiffusionTrainConfig
from pipelines.stages.train_autoencoder import train_autoencoder
from pipelines.stages.train_diffusion import train_diffusion
from tests.pipeline_helpers import autoencoder_overrides, diffusion_overrides, logged_losses

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


# ----------------------------------------------------------------------------------------- skipping on the device


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_and_counted():
    """What a GradScaler skips (a gradient that overflowed) is a skipped step here too: no weight, moment or step
    count changes, and the step is counted, on the device until the row reads it."""
    from accelerate import Accelerator

    from pipelines.core.config import OptimConfig
    from pipelines.core.on_device import StepLog

    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    module = torch.nn.ParameterList([weight])
    optimizer = loop.make_optimizer(module.parameters(), OptimConfig(lr=0.1))
    module, optimizer = accelerator.prepare(module, optimizer)
    log = StepLog(accelerator.device)

    def phase(loss):
        return loop.Phase("main", optimizer, (module,), lambda batch, generator: loss(), lr=0.1)

    sqrt = lambda: (weight.sqrt().sum(), {"value": weight.sum().detach()})  # noqa: E731  d/dw √w = inf at 0
    taken = loop._run_phase(phase(sqrt), [{}], accelerator, None, OptimConfig(lr=0.1, max_grad_norm=0), log)
    log.add_step(taken)
    assert not bool(taken) and torch.equal(weight.detach(), torch.tensor([0.0, 1.0]))
    assert not optimizer.optimizer.state or float(optimizer.optimizer.state[weight]["step"]) == 0
    square = lambda: (weight.square().sum(), {"value": weight.sum().detach()})  # noqa: E731
    taken = loop._run_phase(phase(square), [{}], accelerator, None, OptimConfig(lr=0.1), log)
    log.add_step(taken)
    assert bool(taken) and float(optimizer.optimizer.state[weight]["step"]) == 1
    means, skipped, bad, worst = log.read(accelerator)
    assert means == {"value": 1.0} and (skipped, bad, worst) == (1, 0, 1)  # the skipped step's value left out


# -------------------------------------------------------------------------------------------------- precision


def tiny_vae():
    from autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4))


def test_the_vae_runs_in_its_own_dtype_whatever_the_callers_autocast():
    """On-the-fly encoding happens inside the training step's autocast, and generation samples under autocast: the
    VAE ignores both (a U-Net's fp16 would overflow SD-family VAEs) and hands float32 across its boundary."""
    from autoencoder import decode_video, encode_video

    vae, video = tiny_vae(), torch.rand(1, 3, 2, 8, 8) * 2 - 1
    with torch.no_grad():
        plain = encode_video(vae, video)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = encode_video(vae, video)
            frames = decode_video(vae, inside)
        assert inside.dtype == torch.float32 and torch.equal(inside, plain)  # not one op in bf16
        assert frames.dtype == torch.float32 and torch.equal(frames, decode_video(vae, plain))
        vae.to(torch.bfloat16)  # data.vae_dtype=bf16: its own dtype, float32 at the boundary
        assert encode_video(vae, video).dtype == torch.float32 and decode_video(vae, plain).dtype == torch.float32


def test_the_vae_dtype_is_fp32_on_a_cpu_bf16_on_a_gpu_and_fp16_only_when_asked(monkeypatch):
    from pipelines.core.devices import vae_dtype
    from pipelines.stages.configs import DiffusionDataConfig, EncodeConfig, GenerateConfig

    assert EncodeConfig().vae_dtype == GenerateConfig(prompts=["x"]).vae_dtype == DiffusionDataConfig().vae_dtype \
        == "auto"
    cuda = torch.device("cuda")
    assert vae_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert vae_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert vae_dtype("auto", cuda) == torch.float32  # never fp16 unless asked
    assert vae_dtype("fp16", cuda) == torch.float16 and vae_dtype("fp32", cuda) == torch.float32


def test_sampling_runs_under_the_training_runs_autocast_on_a_gpu_only():
    from pipelines.core.devices import autocast_dtype
    from pipelines.stages.configs import GenerateConfig
    from pipelines.stages.generate import sampling_precision

    bundle = SimpleNamespace(info={"config": {"run": {"mixed_precision": "bf16"}}})
    assert sampling_precision(GenerateConfig(prompts=["x"]), bundle) == "bf16"  # auto: the training run's
    assert sampling_precision(GenerateConfig(prompts=["x"], mixed_precision="fp32"), bundle) == "fp32"
    assert autocast_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "no") is None and autocast_dtype(torch.device("cuda"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is None  # a CPU's bf16 is emulated: fp32 there


# ---------------------------------------------------------------------------------------------------- compile


def tiny_unet(**overrides):
    from diffusion import UNet3D, UNet3DConfig

    config = dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], head_dim=8,
                  norm_groups=4, cond_dim=16, context_dim=16, known_frames=True, attention_backend="sdpa")
    torch.manual_seed(0)
    return UNet3D(UNet3DConfig(**(config | overrides)))


def unet_inputs(b: int = 2, f: int = 6) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(b, 4, f, 8, 8, generator=generator)
    return (z, torch.randn(b, generator=generator)), {
        "cond": torch.randn(b, 16, generator=generator), "context": torch.randn(b, 5, 16, generator=generator),
        "num_images": 2, "known": torch.randn(b, 4, f, 8, 8, generator=generator),
        "known_mask": torch.rand(b, f, generator=generator) < 0.5}


def test_the_unet_forward_compiles_without_a_graph_break():
    """The gpu.yaml network's features (known frames, appended images, text, cross-attention) on the SDPA backend:
    one graph, so ``run.compile`` compiles the whole forward."""
    args, kwargs = unet_inputs()
    explained = torch._dynamo.explain(tiny_unet())(*args, **kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_run_compile_trains_what_the_eager_run_trains(chain, tmp_path, monkeypatch):
    """``run.compile=true`` through the trainer (DDP wrapping, EMA, checkpoints): the same losses and weights as the
    eager run, and the same checkpoint keys. AOTAutograd's eager backend stands in for inductor, whose CPU code
    generation takes minutes here (its kernels are compared on a GPU by ``benchmarks/gpu_check.py``)."""
    compile_module, graphs = torch.nn.Module.compile, []

    def aot_eager(graph, inputs):  # records what it compiles
        graphs.append(graph)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(graph, inputs)

    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kwargs: compile_module(self, **(kwargs | {"backend": aot_eager})))
    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        overrides = [*diffusion_overrides(chain["latents"], out, steps=2), "sample_prompts=[]", f"run.compile={flag}"]
        train_diffusion(load_config(DiffusionTrainConfig, None, overrides), quiet)
        runs[flag] = load_file(out / "checkpoints" / "step_0000002" / "unet.safetensors"), logged_losses(out)
    assert len(graphs) == 1  # the second step ran the compiled U-Net (the first, its FLOPs counted, ran eagerly)
    (eager, eager_losses), (compiled, compiled_losses) = runs["false"], runs["true"]
    assert compiled.keys() == eager.keys()  # no wrapper prefix in the checkpoint
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(compiled_losses, eager_losses):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


# ---------------------------------------------------------------------------------------------- determinism


def test_run_deterministic_switches_pytorchs_deterministic_algorithms(chain, tmp_path, monkeypatch):
    """On while the run trains, off again for a run without it (a CPU run repeats bit for bit either way; on CUDA
    the switch is what makes it so: ``benchmarks/gpu_check.py`` runs the same steps twice)."""
    seen = []
    seed_step = loop.seed_step
    monkeypatch.setattr(loop, "seed_step", lambda *a: seen.append(torch.are_deterministic_algorithms_enabled())
                        or seed_step(*a))
    for flag in ("true", "false"):
        overrides = [*diffusion_overrides(chain["latents"], tmp_path / flag, steps=1), "sample_prompts=[]",
                     f"run.deterministic={flag}"]
        train_diffusion(load_config(DiffusionTrainConfig, None, overrides), quiet)
    assert seen == [True, False] and not torch.are_deterministic_algorithms_enabled()


# ------------------------------------------------------------------------------------------------- telemetry


def test_every_loss_log_row_has_the_throughput(chain, tmp_path):
    """samples/s and achieved TFLOP/s per row, from FLOPs counted once; no MFU on a CPU (no known peak)."""
    out = tmp_path / "run"
    overrides = [*diffusion_overrides(chain["latents"], out, steps=2), "sample_prompts=[]"]
    train_diffusion(load_config(DiffusionTrainConfig, None, overrides), quiet)
    with (out / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert all(float(r["samples_per_s"]) > 0 and float(r["tflops_per_s"]) > 0 and not r.get("mfu") for r in rows)


def test_the_flop_count_leaves_the_step_as_it_is_and_counts_matrix_products():
    """``FlopCounterMode`` decomposes operations it has no formula for and so changes a step's gradients by rounding
    (a resumed run would no longer repeat its twin bit for bit); :class:`FlopCount` runs every operation as is."""
    vae, frames = tiny_vae(), torch.rand(2, 3, 16, 16)

    def gradients():
        vae.zero_grad()
        recon, _ = vae(frames, sample_posterior=False)
        (recon - frames).abs().mean().backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = gradients()
    with FlopCount() as counter:
        counted = gradients()
    assert all(torch.equal(a, b) for a, b in zip(plain, counted)) and counter.total > 0
    with FlopCount() as counter:
        torch.nn.Linear(8, 4)(torch.randn(16, 8))
    assert counter.total == 2 * 16 * 8 * 4


def test_throughput_and_mfu_from_a_known_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert peak_flops(cuda, "bf16") == 989e12 and peak_flops(cuda, "no") == 495e12
    assert peak_flops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, "bf16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert peak_flops(cuda, "bf16") is None
    row = throughput(steps=10, seconds=4.0, samples_per_step=128, flops_per_step=2e15, peak=989e12)
    assert row == pytest.approx({"samples_per_s": 320.0, "tflops_per_s": 5000.0, "mfu": 5e15 / 989e12})


def test_the_generator_phase_reaches_the_discriminators_input_not_its_weights():
    """The generator's adversarial term back-propagates into the frames it judges, never into the discriminator's
    weights (they belong to the other phase's module and optimiser), and it judges them as the module does."""
    from autoencoder import PatchDiscriminator
    from pipelines.stages.train_autoencoder import detached

    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=32, num_layers=2, norm="group")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    judged = detached(disc)(x)
    torch.testing.assert_close(judged, disc(x))
    (-judged.mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
