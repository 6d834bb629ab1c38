"""Training and generating on a GPU as `fit` does (bf16-mixed, bfloat16 frozen weights, fused AdamW, CUDA graphs).

Each test runs on the CPU here too, except CUDA graphs, which exist on CUDA only: ``pytest -m gpu`` on a machine
with a GPU runs the CUDA half (``benchmarks/device_check.sh`` does, with the speed benchmark).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from devices import CPU_AND_CUDA, CUDA

from datamodules.face_data_module import FaceDataModule
from lightning_modules.lora_diffusion import LoRADiffusion
from lightning_modules.parked_encoder import ParkedEncoder


class Losses(L.Callback):
    """Every step's loss, and ``generate`` prompts at the given steps as the validation callback does (eval mode,
    no gradient, then training again)."""

    def __init__(self, generate_at: tuple[int, ...] = ()) -> None:
        self.losses: list[float] = []
        self.graphs: list[int] = []  # graphs dynamo compiled in this fit, after each step (and its generation)
        self.generate_at, self.images = generate_at, []
        self.devices: set[str] = set()
        self.encoder_devices: set[str] = set()  # where the VAE encoder was during the steps

    @staticmethod
    def _compiled() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]  # for the whole process, never reset

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = self._compiled()

    def on_train_end(self, trainer, pl_module) -> None:
        # Where the weights trained: after fit, Lightning's teardown moves the module back to the CPU. (The VAE
        # encoder may still wait on the CPU here: the module's own on_train_end, which brings it back, runs next.)
        parked = ("vae.encoder.", "vae.quant_conv.")
        self.devices = {t.device.type for n, t in pl_module.state_dict().items() if not n.startswith(parked)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.encoder_devices.add(pl_module.vae.encoder.conv_in.weight.device.type)
        if trainer.global_step in self.generate_at:
            pl_module.eval()
            self.images.append(pl_module.generate(["a photo of sks person", "a red car"], [0, 1]))
            pl_module.train()
        self.graphs.append(self._compiled() - self.before)


def fit(
    tiny_sd,
    photos,
    tmp_path,
    device: str,
    steps: int,
    callback: L.Callback,
    cache_latents: bool = True,
    accumulate: int = 1,
    clip: float | None = None,
    precision: str = "bf16-mixed",
    **model_kw,
) -> LoRADiffusion:
    L.seed_everything(0, verbose=False)
    # On a CPU 32 px photos and images (latents of 16², not 32²): there these tests check wiring and dtypes, and
    # bfloat16 convolutions without bf16 instructions (AMD EPYC: ~50x float32's time) made them the suite's slowest.
    # On CUDA the 64 px the tolerances below were measured at.
    size = 32 if device == "cpu" else 64
    model_kw = {"frozen_dtype": "bfloat16" if precision == "bf16-mixed" else "float32", "image_size": size} | model_kw
    model = LoRADiffusion(str(tiny_sd), num_inference_steps=2, **model_kw)
    cache = {"cache_latents": cache_latents, "cache_dir": str(tmp_path / "cache")}
    data = FaceDataModule(data_dir=str(photos), resolution=size, batch_size=2, **cache)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, datamodule=data)
    return model


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_bf16_training_changes_only_the_float32_lora(tiny_sd, demo_photos, tmp_path, device):
    L.seed_everything(0, verbose=False)
    before = LoRADiffusion(str(tiny_sd), frozen_dtype="bfloat16", train_text_encoder=True).state_dict()
    losses = Losses()
    model = fit(tiny_sd, demo_photos, tmp_path, device, 4, losses, train_text_encoder=True)
    trainable = model.trainable_names()
    assert trainable and all(np.isfinite(losses.losses)) and len(losses.losses) == 4
    assert losses.devices == {device}
    for name, tensor in model.state_dict().items():
        if name in trainable:  # float32 master weights that trained (lora_B starts at zero)
            assert tensor.dtype == torch.float32, name
        else:  # the frozen base model: bfloat16 and bit for bit what was loaded
            assert tensor.dtype == before[name].dtype and torch.equal(tensor.cpu(), before[name]), name
    assert any(not torch.equal(model.state_dict()[n].cpu(), before[n]) for n in trainable if "lora_B" in n)
    optimizer = model.trainer.optimizers[0]
    assert bool(optimizer.defaults.get("fused")) == (device == "cuda")  # one fused AdamW kernel on a GPU


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_gradient_clipping_under_mixed_precision_trains_with_an_unfused_adam(
    tiny_sd, demo_photos, tmp_path, device, monkeypatch
):
    """Lightning's mixed precision cannot clip the gradients of a fused Adam (it unscales them in its step) and stops
    at the first step; with trainer.gradient_clip_val the optimizer stays unfused. On the CPU the fused kernel is
    let in too (torch has one there), so the same choice is made and tested here."""
    import lightning_modules.lora_optimization as lora_optimization

    monkeypatch.setattr(lora_optimization, "fused_adam", partial(lora_optimization.fused_adam, devices=("cpu", "cuda")))
    fused = {}
    for clip, precision in ((None, "bf16-mixed"), (1.0, "bf16-mixed"), (1.0, "32-true")):
        losses = Losses()
        run = tmp_path / f"{clip}-{precision}"
        model = fit(tiny_sd, demo_photos, run, device, 2, losses, clip=clip, precision=precision)
        fused[clip, precision] = bool(model.trainer.optimizers[0].defaults.get("fused"))
        assert len(losses.losses) == 2 and all(np.isfinite(losses.losses))
    # Without mixed precision Lightning clips a fused Adam's gradients like any others: it stays fused.
    assert fused == {(None, "bf16-mixed"): True, (1.0, "bf16-mixed"): False, (1.0, "32-true"): True}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_cached_latents_train_like_live_encoding_in_bf16(tiny_sd, demo_photos, tmp_path, device):
    losses, encoder_devices, models = {}, {}, {}
    for cached in (True, False):
        callback = Losses()
        models[cached] = fit(tiny_sd, demo_photos, tmp_path / str(cached), device, 4, callback, cache_latents=cached)
        losses[cached], encoder_devices[cached] = callback.losses, callback.encoder_devices
    # With every latent cached the VAE encoder holds no GPU memory while training (issue #9); live encoding
    # needs it beside the UNet. After fit the module is whole again (teardown moved it all to the CPU).
    assert encoder_devices == {True: {"cpu"}, False: {device}}
    assert {p.device.type for p in models[True].parameters()} == {"cpu"} and not models[True].parked_encoder.parked
    # Same draws: the cache holds what the VAE gives under the same autocast, up to batch-shape rounding in bf16
    # (AMD CPU: equal for 3 steps, 2e-4 apart at the 4th; other CPUs may pick other bf16 kernels per batch shape).
    # Steps differ from each other far more (7 %).
    tolerance = 5e-3
    assert losses[True] == pytest.approx(losses[False], rel=tolerance)
    assert max(losses[True]) / min(losses[True]) > 1 + 10 * tolerance


@pytest.fixture
def compile_cache(tmp_path_factory, monkeypatch) -> None:
    """One inductor cache for the CUDA graph tests: the second compiles the same blocks and reuses the kernels."""
    root = tmp_path_factory.getbasetemp() / "inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root))


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graphs_train_and_generate_like_eager(tiny_sd, demo_photos, tmp_path, device, compile_cache):
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    runs = {}
    for mode in ("eager", "reduce-overhead"):
        torch._dynamo.reset()
        # 7 photos in batches of 2: steps 4 and 8 train on the epoch's last photo alone.
        callback = Losses(generate_at=(2, 4, 6))
        compiled = {"compile": True, "compile_mode": mode} if mode != "eager" else {}
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # not a silent fallback to eager
            fit(tiny_sd, demo_photos, tmp_path / mode, device, 8, callback, **compiled)
        runs[mode] = callback
    torch._dynamo.reset()
    eager, graphed = runs["eager"], runs["reduce-overhead"]
    # CUDA graphs replay into fixed buffers: a stale or overwritten output would change the losses far more than
    # kernel rounding (3e-4 apart with inductor on the CPU), and by more than the 7-12 % they vary between steps.
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-2)
    for step_images, eager_images in zip(graphed.images, eager.images, strict=True):
        for a, b in zip(step_images, eager_images, strict=True):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() < 3
    other_seed = np.abs(np.asarray(eager.images[0][0], np.int16) - np.asarray(eager.images[0][1], np.int16)).mean()
    assert other_seed > 10
    # Inductor skips CUDA graphs where it cannot use them, silently: here it must have used them everywhere.
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips
    # Steps 1-4 met every shape (batches of 2 and 1, with and without gradient); from then on, the third
    # validation included, nothing new was compiled.
    assert graphed.graphs[3] > 0 and graphed.graphs[-1] == graphed.graphs[3]


class Grads(Losses):
    """Also sees, at every optimizer step, whether one LoRA weight's gradient is the tensor it already was before
    each of the step's backward passes: added into in place, not a tensor a backward pass handed out."""

    def __init__(self) -> None:
        super().__init__()
        self.grads_before: list[torch.Tensor | None] = []
        self.kept: list[bool] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.grads_before.append(pl_module.trainable_parameters()[0].grad)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grad = pl_module.trainable_parameters()[0].grad
        self.kept.append(len(self.grads_before) == 2 and all(g is grad for g in self.grads_before))
        self.grads_before = []


def lora_weights(model: LoRADiffusion) -> dict[str, torch.Tensor]:
    return {n: t.float().cpu() for n, t in model.state_dict().items() if n in model.trainable_names()}


def test_kept_grad_buffers_accumulate_like_fresh_gradients(tiny_sd, demo_photos, tmp_path, monkeypatch):
    """The buffers that gradient accumulation through CUDA graphs needs (LoRADiffusion.optimizer_zero_grad), on the
    CPU: each step's gradients accumulate in tensors allocated before its backward passes (a validation's zero_grad
    may drop them: the next step allocates again), and the training is the same bit for bit."""
    runs = {}
    for kept in (False, True):
        if kept:
            monkeypatch.setattr(LoRADiffusion, "keeps_grad_buffers", property(lambda self: True))
        callback = Grads()
        model = fit(tiny_sd, demo_photos, tmp_path / str(kept), "cpu", 3, callback, accumulate=2)
        runs[kept] = callback, lora_weights(model)
    (fresh, fresh_weights), (kept, kept_weights) = runs[False], runs[True]
    assert kept.kept == [True] * 3
    assert fresh.kept == [False] * 3  # the default: each step's first backward hands out a new tensor
    assert kept.losses == fresh.losses and len(kept.losses) == 6
    for name, weight in fresh_weights.items():
        assert torch.equal(kept_weights[name], weight), name


def test_grad_buffers_only_where_cuda_graphs_accumulate(tiny_sd):
    model = LoRADiffusion(str(tiny_sd))
    cases = {  # (compile, compile_mode, device, accumulate_grad_batches): keeps buffers
        (True, "reduce-overhead", "cuda", 2): True,
        (True, "max-autotune", "cuda", 4): True,
        (True, "reduce-overhead", "cuda", 1): False,  # one backward a step: nothing accumulates
        (True, "default", "cuda", 2): False,  # no CUDA graphs
        (True, "max-autotune-no-cudagraphs", "cuda", 2): False,
        (True, "reduce-overhead", "cpu", 2): False,  # inductor captures no graphs on a CPU
        (False, "reduce-overhead", "cuda", 2): False,  # nothing compiled
    }
    for (compiled, mode, device, accumulate), keeps in cases.items():
        model.hparams.compile, model.hparams.compile_mode = compiled, mode
        model._device, model._trainer = torch.device(device, 0), SimpleNamespace(accumulate_grad_batches=accumulate)
        assert model.keeps_grad_buffers == keeps, (compiled, mode, device, accumulate)
    model._trainer = None
    assert not model.keeps_grad_buffers


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graphs_accumulate_gradients_like_eager(tiny_sd, demo_photos, tmp_path, device, compile_cache):
    """Two micro-batches a step through CUDA graphs: without buffers of their own the gradients of the first would
    be overwritten by the second's replay (torch stops with an error)."""
    runs = {}
    for mode in ("eager", "reduce-overhead"):
        torch._dynamo.reset()
        compiled = {"compile": True, "compile_mode": mode} if mode != "eager" else {}
        callback = Losses()
        model = fit(tiny_sd, demo_photos, tmp_path / mode, device, 2, callback, accumulate=2, **compiled)
        runs[mode] = callback.losses, lora_weights(model)
    torch._dynamo.reset()
    (eager_losses, eager_weights), (graphed_losses, graphed_weights) = runs["eager"], runs["reduce-overhead"]
    assert graphed_losses == pytest.approx(eager_losses, rel=2e-2) and len(graphed_losses) == 4
    # Adam moves every weight by about the learning rate whatever its gradient's size: a gradient overwritten by
    # the next replay shows in the direction of the change, which must be eager's.
    L.seed_everything(0, verbose=False)
    start = lora_weights(LoRADiffusion(str(tiny_sd), frozen_dtype="bfloat16"))
    eager_change = torch.cat([(eager_weights[n] - start[n]).flatten() for n in sorted(start)])
    graphed_change = torch.cat([(graphed_weights[n] - start[n]).flatten() for n in sorted(start)])
    assert eager_change.norm() > 0
    assert torch.nn.functional.cosine_similarity(graphed_change, eager_change, dim=0) > 0.9


class NoWaits(L.Callback):
    """Makes any wait for the GPU an error (``torch.cuda.set_sync_debug_mode``) from the end of step 1 to the start
    of the last step: the batch transfers and every step in between, up to where the bar draws again."""

    def __init__(self, last: int) -> None:
        self.last, self.checked = last, 0

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.global_step < self.last:
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1

    def on_train_batch_start(self, trainer, *_) -> None:
        if trainer.global_step + 1 == self.last:
            torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, *_) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", [CUDA])
def test_steps_between_bar_draws_never_wait_for_the_gpu(tiny_sd, demo_photos, tmp_path, device):
    """README: most steps never wait for the GPU, so the CPU queues the next step while the GPU runs this one. With
    the bar drawing only the first and the last step, and the NaN check not due, a step that synchronises (reads a
    tensor back, a blocking copy to or from the host, a stream or device sync) raises, with where it did. The
    trainer holds the callbacks of a step (the bar, the NaN guard); train.py's others act every N steps."""
    from callbacks.non_finite_guard import NonFiniteGuard
    from callbacks.step_progress import StepProgressBar

    steps = 8
    L.seed_everything(0, verbose=False)
    model = LoRADiffusion(str(tiny_sd), frozen_dtype="bfloat16", train_text_encoder=True)
    data = FaceDataModule(data_dir=str(demo_photos), resolution=64, batch_size=2, cache_dir=str(tmp_path / "cache"))
    guard = NoWaits(steps)
    trainer = L.Trainer(
        accelerator=device, devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[StepProgressBar(refresh_seconds=3600), guard, NonFiniteGuard(check_every_n_steps=100)],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == steps and guard.checked == steps - 1


class MetaParking(ParkedEncoder):
    """Parks the encoder on the meta device, where its weights cannot be read: any use between park and home fails
    (the CPU's stand-in for a GPU run, where the parked encoder is on another device than the model)."""

    def park(self) -> bool:
        parts = self._parts()
        self.saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in parts]
        for module in parts:
            module.to("meta")
        self.parked = True
        return True

    def unpark(self, device: torch.device) -> None:
        if self.parked:
            for module, state in zip(self._parts(), self.saved, strict=True):
                module.to_empty(device=device).load_state_dict(state)
            self.parked = False


def test_nothing_touches_the_parked_encoder_while_training(tiny_sd, demo_photos, tmp_path, monkeypatch):
    """The wiring of the encoder's parking, on the CPU: parked once the latents are cached, brought home for
    generation, back for good after fit; training and validation in between never read it."""
    original = LoRADiffusion(str(tiny_sd), frozen_dtype="bfloat16").vae.encoder.state_dict()
    monkeypatch.setattr("lightning_modules.lora_diffusion.ParkedEncoder", MetaParking)
    parked, plain = Losses(generate_at=(2,)), Losses(generate_at=(2,))
    model = fit(tiny_sd, demo_photos, tmp_path / "parked", "cpu", 4, parked)
    monkeypatch.undo()
    fit(tiny_sd, demo_photos, tmp_path / "plain", "cpu", 4, plain)
    assert parked.encoder_devices == {"meta"} and plain.encoder_devices == {"cpu"}
    assert parked.losses == plain.losses  # same machine, same shapes: bit for bit
    for ours, theirs in zip(parked.images[0], plain.images[0], strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert not model.parked_encoder.parked
    for name, tensor in model.vae.encoder.state_dict().items():
        assert torch.equal(tensor, original[name]), name
