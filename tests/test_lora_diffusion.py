"""The LoRA module: what trains, what is saved, what a checkpoint must hold."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.lora_diffusion import LoRADiffusion


@pytest.fixture(scope="module")
def module(tiny_sd):
    return LoRADiffusion(str(tiny_sd), lora_rank=4, lora_alpha=2, train_text_encoder=True)


def test_only_lora_parameters_train_and_receive_gradients(module, tiny_tokenizer):
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(n.startswith("unet.") for n in trainable) and any(n.startswith("text_encoder.") for n in trainable)
    assert not any(n.startswith("vae.") for n in trainable)
    # Every wrapped projection of both models has its adapter.
    wrapped = {n.rsplit(".lora_", 1)[0] for n in trainable}
    assert sum(n.startswith("unet.") for n in wrapped) == sum(
        n.split(".")[-1] in {"to_q", "to_k", "to_v"} or n.endswith("to_out.0")
        for n, _ in module.unet.named_modules(prefix="unet")
        if not any(k in n for k in ("lora_", "base_layer"))
    )
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())

    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "input_ids": tiny_tokenizer(["a photo", "a face"], padding="max_length", return_tensors="pt").input_ids,
    }
    for _ in range(2):  # B starts at zero, so A gets a gradient from the second step on
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    for name, param in module.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in trainable:
            assert param.grad is not None and changed, name
        else:
            assert param.grad is None and not changed, name


def test_checkpoint_holds_only_trainable_tensors_and_refuses_missing_ones(module):
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == module.trainable_names()
    assert "torch" in checkpoint["rng_states"]
    broken = {"state_dict": dict(checkpoint["state_dict"])}
    module.on_load_checkpoint(checkpoint)  # complete: fine, and the frozen weights are filled in from the model
    assert checkpoint["state_dict"].keys() == module.state_dict().keys()
    missing = sorted(broken["state_dict"])[:3]
    for key in missing:
        del broken["state_dict"][key]
    with pytest.raises(KeyError) as info:
        module.on_load_checkpoint(broken)
    for key in missing:
        assert key in str(info.value)


def test_a_resume_on_fewer_gpus_restores_the_rng_states_it_has(module, monkeypatch):
    """A checkpoint of a 4-GPU run resumed on one GPU: the first state goes to GPU 0, the others have no GPU."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    checkpoint["rng_states"]["cuda"] = [torch.full((8,), gpu, dtype=torch.uint8) for gpu in range(4)]
    module.on_load_checkpoint(checkpoint)
    assert restored == [(0, 0)]


def test_sd15_rank4_unet_lora_checkpoint_is_a_few_megabytes():
    # SD1.5's UNet, built on the meta device (no memory): count what a checkpoint of its rank-4 LoRA holds.
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    total = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 800e6 < total < 900e6  # it is the 860M-parameter UNet
    # float32 weights + AdamW's two moments: the whole checkpoint payload.
    megabytes = lora * 4 * 3 / 2**20
    assert 3 < megabytes < 16, megabytes


def test_half_precision_frozen_weights_keep_float32_lora(tiny_sd, tiny_tokenizer):
    module = LoRADiffusion(str(tiny_sd), frozen_dtype="bfloat16", train_text_encoder=True)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    batch = {
        "pixel_values": torch.rand(1, 3, 64, 64) * 2 - 1,
        "input_ids": tiny_tokenizer(["a photo"], padding="max_length", return_tensors="pt").input_ids,
    }
    # Under bf16 autocast (Lightning's bf16-mixed) the step runs and LoRA gradients arrive in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_prediction_type_applies_to_training_and_sampling(tiny_sd):
    module = LoRADiffusion(str(tiny_sd), prediction_type="v_prediction")
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    assert module.base.sampler().config.prediction_type == "v_prediction"
    assert LoRADiffusion(str(tiny_sd)).base.sampler().config.prediction_type == "epsilon"


def test_a_module_built_in_python_saves_a_weights_only_checkpoint(tiny_sd, demo_photos, tmp_path):
    import lightning as L

    from datamodules.face_data_module import FaceDataModule

    module = LoRADiffusion(str(tiny_sd))
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(module, FaceDataModule(data_dir=str(demo_photos), resolution=64))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)  # no pickled function inside
    assert saved["hyper_parameters"]["pretrained_model_name_or_path"] == str(tiny_sd)
    again = LoRADiffusion.load_from_checkpoint(tmp_path / "x.ckpt", weights_only=True)
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(again.state_dict()[name], tensor)


def test_sampler_setting_picks_the_inference_scheduler(tiny_sd):
    from diffusers import DDIMScheduler

    from stable_diffusion.base_model import BaseModelError

    module = LoRADiffusion(str(tiny_sd), prediction_type="v_prediction")
    scheduler = module.base.pipeline(sampler="DDIMScheduler").scheduler
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(BaseModelError, match="NoSuchScheduler"):
        module.base.pipeline(sampler="NoSuchScheduler")


def _live_batch(tokenizer, size: int = 64) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1,
        "input_ids": tokenizer(["a photo", "a face"], padding="max_length", return_tensors="pt").input_ids,
    }


def test_lora_inputs_are_not_cast_twice_under_autocast(module, tiny_tokenizer, monkeypatch):
    """Under bf16 autocast peft's float32 cast of each LoRA input is skipped: same loss, fewer copy kernels."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    batch = _live_batch(tiny_tokenizer)

    def step() -> tuple[torch.Tensor, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        return loss.detach(), sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    loss, copies = step()
    assert all(layer.cast_input_dtype_enabled for layer in module._lora_layers)  # restored after the step
    monkeypatch.setattr(module, "_lora_inputs_under_autocast", nullcontext)
    peft_loss, peft_copies = step()
    assert torch.equal(loss, peft_loss)  # bf16 -> fp32 -> bf16 is exact: nothing changes but the work
    # One cast per LoRA layer saved at least (each also cost autocast a cast back).
    assert peft_copies - copies >= len(module._lora_layers)


def test_gradient_checkpointing_recomputes_and_changes_nothing(tiny_sd, tiny_tokenizer):
    batch = _live_batch(tiny_tokenizer)
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LoRADiffusion(str(tiny_sd), train_text_encoder=True, gradient_checkpointing=checkpointing)
        loss = model.training_step(batch, 0)
        # Forward calls during the backward pass: the recomputation of checkpointed layers, per model.
        again = {"unet": 0, "text_encoder": 0}
        for part in again:
            for sub in getattr(model, part).modules():
                sub.register_forward_hook(lambda *_, part=part, again=again: again.__setitem__(part, again[part] + 1))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = loss.detach(), grads, again
    (loss, grads, again), (ckpt_loss, ckpt_grads, ckpt_again) = results[False], results[True]
    assert again == {"unet": 0, "text_encoder": 0}
    assert ckpt_again["unet"] > 0 and ckpt_again["text_encoder"] > 0
    torch.testing.assert_close(ckpt_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_recomputation_skips_lora_input_casts_as_the_forward_did(tiny_sd, tiny_tokenizer):
    """Under bf16 autocast the backward pass recomputes checkpointed blocks with peft's input casts off, as the
    step's forward ran them (else extra copy kernels, and a compiled block would recompile for the other flag)."""
    batch = _live_batch(tiny_tokenizer)
    model = LoRADiffusion(str(tiny_sd), train_text_encoder=True, gradient_checkpointing=True)
    calls = []
    for layer in model._lora_layers:
        layer.register_forward_pre_hook(lambda layer, _: calls.append(layer.cast_input_dtype_enabled))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(batch, 0)
    forward, calls[:] = list(calls), []
    loss.backward()
    assert forward and not any(forward)
    assert len(calls) >= len(model.unet.down_blocks) and not any(calls)  # recomputed, casts off as in the forward
    assert all(layer.cast_input_dtype_enabled for layer in model._lora_layers)  # on again after the step
    # Without autocast (float32) the casts stay on for the recomputation, as peft needs them there.
    calls.clear()
    model.training_step(batch, 0).backward()
    assert calls and all(calls)


def test_fused_adam_where_the_config_chose_no_implementation():
    from lightning_modules.mixed_precision import fused_adam

    def groups(seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(8, 4, generator=g)) for _ in range(3)]
        return [{"params": params[:2], "name": "unet"}, {"params": params[2:], "name": "te", "lr": 1e-3}]

    plain = torch.optim.AdamW(groups(0), lr=1e-2, weight_decay=0.1)
    fused = fused_adam(torch.optim.AdamW(groups(0), lr=1e-2, weight_decay=0.1), devices=("cpu",))
    assert fused.defaults["fused"] and all(group["fused"] for group in fused.param_groups)
    assert [(g["name"], g["lr"]) for g in fused.param_groups] == [("unet", 1e-2), ("te", 1e-3)]
    for step in range(3):
        for optimizer in (plain, fused):
            g = torch.Generator().manual_seed(step)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = torch.randn(param.shape, generator=g)
            optimizer.step()
    for a, b in zip(plain.param_groups, fused.param_groups, strict=True):
        for p, q in zip(a["params"], b["params"], strict=True):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
            assert not torch.equal(p, groups(0)[0]["params"][0])
    # Left alone: parameters on other devices, a chosen implementation, other optimizers.
    assert not fused_adam(torch.optim.AdamW(groups(0))).defaults["fused"]  # CPU parameters, CUDA-only default
    assert not fused_adam(torch.optim.AdamW(groups(0), foreach=False), devices=("cpu",)).defaults["fused"]
    sgd = torch.optim.SGD(groups(0), lr=0.1)
    assert fused_adam(sgd, devices=("cpu",)) is sgd


@pytest.mark.slow
def test_compiled_unet_blocks_train_like_eager(tiny_sd, tiny_tokenizer, tmp_path, monkeypatch):
    # Compiled kernels go to the configured cache folder (kept between runs), not to /tmp.
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(variable, "unset")  # recorded, so the test's change is undone afterwards
        monkeypatch.delenv(variable)
    batch = _live_batch(tiny_tokenizer)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = LoRADiffusion(str(tiny_sd), compile=compiled, compile_cache_dir=str(tmp_path / "compiled"))
        assert any(getattr(m, "_compiled_call_impl", None) for m in model.unet.modules()) == compiled
        loss = model.training_step(batch, 0)
        loss.backward()
        losses[compiled] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-4, atol=1e-6)
    for name, grad in losses[False][1].items():
        torch.testing.assert_close(losses[True][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert any((tmp_path / "compiled").rglob("*")), "nothing compiled into the cache folder"
