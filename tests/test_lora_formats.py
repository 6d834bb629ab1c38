"""Exported LoRA files load back, in diffusers and by the key rules of ComfyUI and A1111, with the real alpha.

Each case trains nothing: it adds LoRA adapters with alpha != rank to the tiny SD model, fills them with
random numbers (peft starts B at zero, which would make every check pass trivially), exports, and loads
each file into a fresh pipeline of the same base model with diffusers' own ``load_lora_weights`` (the
kohya file through diffusers' kohya converter). The reference is the in-training model's output.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors import safe_open

from lora_files.lora_formats import DIFFUSERS_WEIGHT_NAME, export_lora
from lora_files.lora_model_card import DEFAULT_DIFFUSERS_FILE, write_model_card
from stable_diffusion.tiny_sd import save_tiny_sd

CAPTIONS = ["a photo of sks person, smiling", "sks person, outdoors", "close-up of sks person, smiling"]
METRICS = {"val/loss": 0.1234, "val/face_similarity": 0.5678}
STARTED = 1_764_000_000.5  # a training start, as time.time() gives it
# name: (unet r, unet alpha, unet targets, text-encoder r, alpha, targets or None)
CASES = {
    "unet_and_te": (
        4,
        2,
        ["to_q", "to_k", "to_v", "to_out.0"],
        8,
        16,
        ["q_proj", "k_proj", "v_proj", "out_proj"],
    ),
    # kohya's default text-encoder targets (attention + MLP); float alpha below rank on the UNet.
    "te_with_mlp": (8, 1.5, ["to_q", "to_v"], 2, 3, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "unet_only": (2, 6, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"], None, None, None),
    # Outside the attention blocks: what ComfyUI and A1111 map but kohya's scripts ignore.
    "convs": (
        2,
        2,
        ["conv_in", "conv_out", "linear_1", "conv1", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
        None,
        None,
        None,
    ),  # fmt: skip
}
# Training-only: a loader that rebuilt it would drop LoRA inputs at random when generating.
DROPOUT = {"unet_and_te": 0.1}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def _fresh(base: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(base)


@torch.no_grad()
def _outputs(pipe: StableDiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder hidden states and UNet noise prediction for fixed inputs."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (2, 16), generator=g)
    sample = torch.randn(2, 4, 32, 32, generator=g)
    context = torch.randn(2, 16, pipe.unet.config.cross_attention_dim, generator=g)
    hidden = pipe.text_encoder(ids)[0]
    noise = pipe.unet(sample, torch.tensor([10, 500]), context).sample
    return hidden, noise


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, base, tmp_path_factory):
    """(case name, trained pipeline, its outputs, export folder, file paths)."""
    unet_r, unet_alpha, unet_targets, te_r, te_alpha, te_targets = CASES[request.param]
    pipe, dropout = _fresh(base), DROPOUT.get(request.param, 0.0)
    pipe.unet.add_adapter(
        LoraConfig(r=unet_r, lora_alpha=unet_alpha, target_modules=unet_targets, lora_dropout=dropout)
    )
    if te_r:
        pipe.text_encoder.add_adapter(
            LoraConfig(r=te_r, lora_alpha=te_alpha, target_modules=te_targets, lora_dropout=dropout)
        )
    pipe.unet.eval(), pipe.text_encoder.eval()  # as likeness generates: the trained model's dropout is off
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.2 * torch.randn(param.shape, generator=g))
    folder = tmp_path_factory.mktemp(request.param)
    files = export_lora(
        folder, pipe.unet, pipe.text_encoder, name="likeness_lora", base_model=str(base), steps=123,
        resolution=512, captions=CAPTIONS, metrics=METRICS, started_at=STARTED,
        settings={"learning_rate": 1e-4, "seed": 3, "precision": "bf16-mixed", "prediction_type": "epsilon"},
    )  # fmt: skip
    return request.param, pipe, _outputs(pipe), folder, files


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_file_loads_in_diffusers_with_training_outputs(exported, base, kind):
    case, _, (ref_hidden, ref_noise), folder, files = exported
    pipe = _fresh(base)
    base_hidden, base_noise = _outputs(pipe)
    pipe.load_lora_weights(folder, weight_name=files[kind].name)
    hidden, noise = _outputs(pipe)
    torch.testing.assert_close(noise, ref_noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    # The LoRA must matter, or the equalities above prove nothing.
    assert (ref_noise - base_noise).abs().max() > 1e-2
    if CASES[case][3]:
        assert (ref_hidden - base_hidden).abs().max() > 1e-2
    else:
        torch.testing.assert_close(hidden, base_hidden, atol=0, rtol=0)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


# ---- ComfyUI's key rules (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip, comfy/utils.py
# unet_to_diffusers): the accepted UNet names are "lora_unet_" + every diffusers weight name that
# unet_to_diffusers maps, with "." -> "_"; SD1 CLIP names are lora_te_text_model_encoder_layers_{b}_{c}.
COMFY_ATTENTIONS = ["proj_in", "proj_out", "norm"]
COMFY_TRANSFORMER_BLOCK = [
    "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
    *(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
]  # fmt: skip
COMFY_RESNET = ["conv1", "time_emb_proj", "conv2", "conv_shortcut", "norm1", "norm2"]
COMFY_BASIC = ["conv_in", "conv_norm_out", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
COMFY_CLIP = [
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
]


def _comfy_unet_names(config) -> set[str]:
    names = set(COMFY_BASIC)

    def block(prefix: str, n_res: int, cross: bool) -> None:
        for i in range(n_res):
            names.update(f"{prefix}.resnets.{i}.{s}" for s in COMFY_RESNET)
            if cross:
                names.update(f"{prefix}.attentions.{i}.{s}" for s in COMFY_ATTENTIONS)
                names.update(f"{prefix}.attentions.{i}.transformer_blocks.0.{s}" for s in COMFY_TRANSFORMER_BLOCK)

    for x, kind in enumerate(config.down_block_types):
        block(f"down_blocks.{x}", config.layers_per_block, "CrossAttn" in kind)
        names.add(f"down_blocks.{x}.downsamplers.0.conv")
    block("mid_block", 1, True)
    names.update(f"mid_block.resnets.1.{s}" for s in COMFY_RESNET)
    for x, kind in enumerate(config.up_block_types):
        block(f"up_blocks.{x}", config.layers_per_block + 1, "CrossAttn" in kind)
        names.add(f"up_blocks.{x}.upsamplers.0.conv")
    return {"lora_unet_" + n.replace(".", "_") for n in names}


def _comfy_clip_names(num_layers: int) -> set[str]:
    return {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(num_layers) for c in COMFY_CLIP}


def _kohya_modules(tensors: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for key in tensors:
        module, _, part = key.partition(".")
        modules.setdefault(module, set()).add(part)
    return modules


def test_kohya_keys_follow_comfyui_rules(exported, base):
    case, pipe, _, _, files = exported
    tensors, _ = _read(files["kohya"])
    fresh = _fresh(base)
    unet_names = _comfy_unet_names(fresh.unet.config)
    # ComfyUI patches a name only when the model has that weight (no conv_shortcut, no last downsampler here).
    real = {"lora_unet_" + n.replace(".", "_") for n, _ in fresh.unet.named_modules()}
    # The ported rule must name the base UNet's real attention modules, or it would prove nothing.
    assert {n for n in unet_names if "_transformer_blocks_" in n} <= real
    accepted = (unet_names & real) | _comfy_clip_names(fresh.text_encoder.config.num_hidden_layers)
    modules = _kohya_modules(tensors)
    assert set(modules) <= accepted
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    # Every adapted layer is exported, and nothing else.
    n_unet = sum(1 for m in modules if m.startswith("lora_unet_"))
    n_te = sum(1 for m in modules if m.startswith("lora_te_"))
    unet_targets, te_targets = CASES[case][2], CASES[case][5] or []
    assert n_unet == sum(
        1 for n, _ in fresh.unet.named_modules() if any(n == t or n.endswith("." + t) for t in unet_targets)
    )
    assert n_te == sum(1 for n, _ in fresh.text_encoder.named_modules() if n.split(".")[-1] in te_targets)


# ---- A1111's rules (extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis, SD1 branch):
# the kohya name is rewritten to a compvis module name that has to exist in the LDM model.
LDM_TRANSFORMER = {s.replace(".", "_") for s in COMFY_TRANSFORMER_BLOCK}
LDM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection", "norm1": "in_layers_0", "norm2": "out_layers_0"}  # fmt: skip


def _a1111_compvis(key: str) -> str | None:
    """The LDM module name A1111 maps a kohya SD1 key to, or None when it would not match."""
    if m := re.fullmatch(r"lora_unet_(conv_in|conv_out|time_embedding_linear_[12])", key):
        linear = m[1].startswith("time_embedding")
        return (
            f"time_embed_{2 * int(key[-1]) - 2}"
            if linear
            else {"conv_in": "input_blocks_0_0", "conv_out": "out_2"}[m[1]]
        )
    if m := re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(down|up)samplers_0_conv", key):
        return f"{'input' if m[1] == 'down' else 'output'}_blocks_{m[2]}_sampler"
    if m := re.fullmatch(r"lora_unet_(?:down_blocks_\d+|mid_block|up_blocks_\d+)_(attentions|resnets)_\d+_(.+)", key):
        kind, rest = m.groups()
        if kind == "resnets":
            return LDM_RESNET.get(rest)
        t = re.fullmatch(r"transformer_blocks_\d+_(.+)", rest)
        return rest if rest in ("proj_in", "proj_out", "norm") or (t and t.group(1) in LDM_TRANSFORMER) else None
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}" if m[2] in COMFY_CLIP else None
    return None


def test_kohya_keys_follow_a1111_rules(exported):
    _, _, _, _, files = exported
    tensors, _ = _read(files["kohya"])
    unmatched = [m for m in _kohya_modules(tensors) if _a1111_compvis(m) is None]
    assert not unmatched


def test_kohya_alpha_and_metadata_are_real(exported):
    case, _, _, _, files = exported
    unet_r, unet_alpha, _, te_r, te_alpha, _ = CASES[case]
    tensors, meta = _read(files["kohya"])
    for module, _parts in _kohya_modules(tensors).items():
        rank, alpha = (unet_r, unet_alpha) if module.startswith("lora_unet_") else (te_r, te_alpha)
        assert tensors[f"{module}.lora_down.weight"].shape[0] == rank
        assert tensors[f"{module}.alpha"].ndim == 0 and tensors[f"{module}.alpha"].item() == pytest.approx(alpha)
    assert meta["ss_network_dim"] == str(unet_r) and float(meta["ss_network_alpha"]) == unet_alpha
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_steps"] == "123" and meta["ss_resolution"] == "(512, 512)"
    assert meta["ss_sd_model_name"]
    expected = Counter(t.strip() for c in CAPTIONS for t in c.split(","))
    assert json.loads(meta["ss_tag_frequency"]) == {"likeness_lora": dict(expected)}
    # What A1111's LoRA card shows, in kohya's words: start and end time, precision, date, prediction type.
    assert float(meta["ss_training_started_at"]) == STARTED < float(meta["ss_training_finished_at"])
    assert meta["ss_mixed_precision"] == "bf16" and meta["modelspec.prediction_type"] == "epsilon"
    finished = datetime.fromtimestamp(int(float(meta["ss_training_finished_at"])))
    assert datetime.fromisoformat(meta["modelspec.date"]) == finished
    assert all(isinstance(v, str) for v in meta.values())


def test_diffusers_file_carries_adapter_config(exported):
    case, _, _, _, files = exported
    unet_r, unet_alpha, unet_targets, te_r, te_alpha, te_targets = CASES[case]
    assert files["diffusers"].name == DIFFUSERS_WEIGHT_NAME
    tensors, meta = _read(files["diffusers"])
    config = json.loads(meta["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (unet_r, unet_alpha)
    assert sorted(config["unet.target_modules"]) == sorted(unet_targets)
    prefixes = {k.split(".")[0] for k in tensors}
    if te_r:
        assert (config["text_encoder.r"], config["text_encoder.lora_alpha"]) == (te_r, te_alpha)
        assert sorted(config["text_encoder.target_modules"]) == sorted(te_targets)
        assert prefixes == {"unet", "text_encoder"}
    else:
        assert prefixes == {"unet"} and not any(k.startswith("text_encoder.") for k in config)


def test_model_card(exported, base):
    _, _, _, folder, files = exported
    card = files["model_card"].read_text()
    assert files["model_card"] == folder / "README.md"
    assert str(base) in card and "123" in card
    for name, value in METRICS.items():
        assert name in card and f"{value:.4g}" in card
    for how in ("load_lora_weights", "LoraLoader", "models/loras", "models/Lora", "<lora:likeness_lora:1>"):
        assert how in card
    assert "`sks` (3)" in card  # most common caption word, counted independently below
    assert Counter(w for c in CAPTIONS for w in re.findall(r"[\w'-]+", c))["sks"] == 3


def test_model_card_module_matches_formats(tmp_path):
    # The card lives in its own module and names the diffusers file that lora_formats writes.
    assert DEFAULT_DIFFUSERS_FILE == DIFFUSERS_WEIGHT_NAME
    card = write_model_card(tmp_path, base_model="some/base", captions=CAPTIONS).read_text()
    assert f"`{DIFFUSERS_WEIGHT_NAME}`" in card and "No validation metrics were recorded." in card


def test_refuses_lora_that_changed_the_base_weights(base, tmp_path):
    # PiSSA moves the top singular directions from the base weight into the LoRA, so A/B alone are no
    # delta against the published base model; exporting them would silently give another model.
    pipe = _fresh(base)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa", target_modules=["to_q"]))
    with pytest.raises(ValueError, match="pissa"):
        export_lora(tmp_path, pipe.unet, name="x", base_model=str(base), steps=1, resolution=64)


def test_modules_kohya_ignores_are_named(exported):
    """kohya's scripts build LoRA only inside attention, resnet and resampler blocks; the rest is listed."""
    from callbacks.export_facts import kohya_ignored_modules

    case, pipe, *_ = exported
    lora_modules = [n for n, m in pipe.unet.named_modules() if getattr(m, "lora_A", None)]
    outside = [n for n in lora_modules if not n.startswith(("down_blocks.", "mid_block.", "up_blocks."))]
    assert kohya_ignored_modules(pipe.unet) == outside
    assert bool(outside) == (case == "convs")  # conv_in, conv_out, time_embedding.linear_1


def test_export_callback_warns_at_start_about_modules_kohya_ignores(exported):
    from types import SimpleNamespace

    from callbacks.lora_export import LoraExport

    case, pipe, *_ = exported
    trainer = SimpleNamespace(is_global_zero=True, logger=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraExport().setup(trainer, SimpleNamespace(unet=pipe.unet, text_encoder=None), "fit")
    said = [str(w.message) for w in caught if "kohya's sd-scripts ignore" in str(w.message)]
    assert bool(said) == (case == "convs")
    assert not said or all(name in said[0] for name in ("conv_in", "conv_out", "time_embedding.linear_1"))
