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

    from lightning_modules.base_model import BaseModelError

    module = LoRADiffusion(str(tiny_sd), prediction_type="v_prediction")
    scheduler = module.base.pipeline(sampler="DDIMScheduler").scheduler
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(BaseModelError, match="NoSuchScheduler"):
        module.base.pipeline(sampler="NoSuchScheduler")
