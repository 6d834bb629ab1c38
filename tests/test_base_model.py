"""Tests for stable_diffusion.base_model: folders, single files (original LDM layout), errors, offline."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from ldm_layout import ldm_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stable_diffusion import base_model as bm
from stable_diffusion import hub_access
from stable_diffusion import single_file_checkpoint as sfc
from stable_diffusion.base_model import BaseModelError, load_base_model
from stable_diffusion.tiny_sd import save_tiny_sd


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("base_model") / "tiny-sd")


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> dict:
    """The tiny model loaded straight through diffusers/transformers, independent of base_model."""
    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer"),
    }


@pytest.fixture(scope="module")
def ldm_state(reference: dict) -> dict[str, torch.Tensor]:
    return ldm_state_dict(reference["unet"], reference["vae"], reference["text_encoder"])


@pytest.fixture(scope="module")
def single_files(ldm_state: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single")
    safetensors.torch.save_file(ldm_state, folder / "tiny.safetensors")
    torch.save({"state_dict": ldm_state, "global_step": 3}, folder / "tiny.ckpt")
    return {"safetensors": folder / "tiny.safetensors", "ckpt": folder / "tiny.ckpt"}


def assert_same_model(model: bm.BaseModel, reference: dict) -> None:
    """Every weight equal, and equal forward outputs on the same inputs."""
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(model, part).state_dict(), reference[part].state_dict()
        assert set(got) == set(want), part
        for key in want:
            assert torch.equal(got[key], want[key]), f"{part}.{key}"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 77), generator=gen)
    latents, image = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(1, 3, 16, 16, generator=gen)
    with torch.no_grad():
        hidden = reference["text_encoder"](ids)[0]
        assert torch.equal(model.text_encoder(ids)[0], hidden)
        unet_in = (latents, torch.tensor([10, 900]), hidden)
        assert torch.equal(model.unet(*unet_in).sample, reference["unet"](*unet_in).sample)
        assert torch.equal(model.vae(image).sample, reference["vae"](image).sample)
    assert model.tokenizer("a photo").input_ids == reference["tokenizer"]("a photo").input_ids


def sd15_betas() -> torch.Tensor:
    """SD1.x's "scaled_linear" training schedule, computed from its definition."""
    return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).pow(2).float()


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def test_diffusers_folder(tiny_dir: Path, reference: dict) -> None:
    model = load_base_model(str(tiny_dir))
    assert_same_model(model, reference)
    assert model.source == str(tiny_dir)
    torch.testing.assert_close(model.noise_scheduler.betas, sd15_betas(), rtol=1e-6, atol=0)
    assert type(model.noise_scheduler).__name__ == "DDPMScheduler"
    assert model.sampler_config["_class_name"] == "PNDMScheduler"
    assert isinstance(model.sampler(), PNDMScheduler)


def test_torch_dtype(tiny_dir: Path) -> None:
    model = load_base_model(str(tiny_dir), torch_dtype=torch.bfloat16)
    assert {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_single_file_equals_folder(kind: str, single_files: dict, tiny_dir: Path, reference: dict) -> None:
    model = load_base_model(str(single_files[kind]), config=str(tiny_dir))
    assert_same_model(model, reference)
    assert model.source == str(single_files[kind])
    torch.testing.assert_close(model.noise_scheduler.betas, sd15_betas(), rtol=1e-6, atol=0)


def test_pipeline_shares_modules_and_matches_diffusers(tiny_dir: Path) -> None:
    model = load_base_model(str(tiny_dir))
    other_unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    pipe = model.pipeline(unet=other_unet)
    assert pipe.unet is other_unet and pipe.vae is model.vae and pipe.text_encoder is model.text_encoder
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.safety_checker is None
    want_pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    run = {"num_inference_steps": 2, "output_type": "np", "height": 64, "width": 64}
    got = model.pipeline()("a face", generator=torch.Generator().manual_seed(1), **run).images
    want = want_pipe("a face", generator=torch.Generator().manual_seed(1), **run).images
    np.testing.assert_array_equal(got, want)


def test_bundled_sd15_configs_describe_sd15() -> None:
    """The shipped configs build SD1.5's architecture (known parameter counts), on the meta device."""
    folder = sfc.SD15_CONFIG_DIR
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    count = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert count == [859_520_964, 83_653_863, 123_060_480]
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "PNDMScheduler",
    ]


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["./nowhere", "~/no/such/model", "/abs/missing", "model.safetensors", "a\\b"])
def test_missing_path(name: str) -> None:
    with pytest.raises(BaseModelError, match="no such file or folder") as info:
        load_base_model(name)
    assert name in str(info.value)


def test_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(BaseModelError, match="model_index.json") as info:
        load_base_model(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "weights.safetensors" in str(info.value)


def _variant_folder(tiny_dir: Path, tmp_path: Path, index: dict | None = None, unet: dict | None = None) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(tiny_dir, folder)
    for rel, update in (("model_index.json", index), ("unet/config.json", unet)):
        data = json.loads((folder / rel).read_text())
        (folder / rel).write_text(json.dumps(data | (update or {})))
    return folder


@pytest.mark.parametrize(
    ("index", "unet", "says"),
    [
        ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, None, "SDXL"),
        (None, {"cross_attention_dim": 1024}, "SD2"),
        (None, {"cross_attention_dim": 2048}, "SDXL"),
        (None, {"in_channels": 9}, "9 input channels"),
        ({"transformer": ["diffusers", "SD3Transformer2DModel"], "unet": [None, None]}, None, "unet is None"),
    ],
)
def test_refuses_non_sd1_folder(tiny_dir: Path, tmp_path: Path, index, unet, says: str) -> None:
    folder = _variant_folder(tiny_dir, tmp_path, index, unet)
    with pytest.raises(BaseModelError, match="not a Stable Diffusion 1.x model") as info:
        load_base_model(str(folder))
    assert says in str(info.value) and str(folder) in str(info.value)


@pytest.fixture
def hub_cache(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Hugging Face cache holding the tiny model as if downloaded earlier; returns its repo id."""
    repo = tmp_path / "hub" / "models--likeness-test--cached-tiny"
    commit = "0123456789" * 4
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # The env var is read at import time; the libraries look the constant up at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "likeness-test/cached-tiny"


def test_offline_hub_id_from_cache(hub_cache: str, reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_base_model(hub_cache)
    assert_same_model(model, reference)
    assert model.source == hub_cache


def test_cached_hub_model_needs_no_network(hub_cache: str, reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_HUB_OFFLINE: a model in the local cache loads without asking the Hub (no probe, no retries)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    class DeadHub:
        def model_info(self, *args, **kwargs):
            asked.append(args)
            raise ConnectionError("no route to host")

    monkeypatch.setattr(hub_access, "HfApi", DeadHub)
    assert_same_model(load_base_model(hub_cache), reference)
    assert not asked


def test_offline_hub_id_without_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="hf download likeness-test/made-up-model --local-dir DIR"):
        load_base_model("likeness-test/made-up-model")


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE: no network (here) or an unknown repo (with network): fast and clear."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(BaseModelError, match="likeness-test/made-up-model: (cannot download|not a local path)"):
        load_base_model("likeness-test/made-up-model")
    assert time.monotonic() - start < hub_access.HUB_PROBE_TIMEOUT_S + 5


def test_ckpt_with_objects_is_not_unpickled(tmp_path: Path, tiny_dir: Path, ldm_state: dict) -> None:
    marker = tmp_path / "executed"
    torch.save({"state_dict": ldm_state, "callbacks": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(BaseModelError, match="not loaded for safety"):
        load_base_model(str(tmp_path / "evil.ckpt"), config=str(tiny_dir))
    assert not marker.exists()


class _Payload:
    """Unpickling this would create a file: proof that user pickles are never executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
            "2.x",
        ),
        ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "SDXL"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}, "inpainting"),
    ],
)
def test_refuses_non_sd1_checkpoint(tmp_path: Path, tiny_dir: Path, ldm_state: dict, extra: dict, says: str) -> None:
    state = ldm_state | {k: torch.zeros(shape) for k, shape in extra.items()}
    safetensors.torch.save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(BaseModelError, match=f"this is .*{says}.*not a Stable Diffusion 1.x model"):
        load_base_model(str(tmp_path / "other.safetensors"), config=str(tiny_dir))


def test_refuses_partial_checkpoint(tmp_path: Path, tiny_dir: Path) -> None:
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    safetensors.torch.save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(BaseModelError, match="not a full SD1.x checkpoint"):
        load_base_model(str(tmp_path / "lora.safetensors"), config=str(tiny_dir))


def test_single_file_without_tokenizer_offline(
    monkeypatch: pytest.MonkeyPatch, single_files: dict, tmp_path: Path
) -> None:
    """Bundled configs have no tokenizer; offline with nothing cached, the error says how to get one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sfc, "SD15_HUB_ID", "likeness-test/not-cached")
    with pytest.raises(BaseModelError, match="has no tokenizer.*hf download likeness-test/not-cached"):
        load_base_model(str(single_files["safetensors"]))


def test_single_file_weights_not_matching_config(single_files: dict, tiny_dir: Path, tmp_path: Path) -> None:
    folder = _variant_folder(tiny_dir, tmp_path, unet={"block_out_channels": [32, 32]})
    with pytest.raises(BaseModelError, match="do not fit the configs"):
        load_base_model(str(single_files["safetensors"]), config=str(folder))


def test_options_that_do_not_apply(single_files: dict, tiny_dir: Path) -> None:
    with pytest.raises(BaseModelError, match="single files"):
        load_base_model(str(single_files["safetensors"]), variant="fp16")
    with pytest.raises(BaseModelError, match="single checkpoint files only"):
        load_base_model(str(tiny_dir), config=str(tiny_dir))


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_reads_no_timestep_from_the_device(tiny_dir: Path, skip_prk_steps: bool) -> None:
    """SD1.x's sampler takes each timestep from a host copy of its schedule (issue #9: PNDM's own code copies it
    from the GPU three times a step, each a wait). A schedule on the meta device, whose values cannot be read,
    stands for the GPU: PNDM fails on it, ours steps through it to the same samples, bit for bit."""
    config = {**load_base_model(str(tiny_dir)).sampler_config, "skip_prk_steps": skip_prk_steps}
    model = load_base_model(str(tiny_dir))
    model.sampler_config = config
    ours, theirs = model.sampler(), PNDMScheduler.from_config(config)
    assert isinstance(ours, PNDMScheduler) and type(ours) is not PNDMScheduler
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 4, 8, 8, generator=g)
    outputs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(60)]

    def run(scheduler, device: str) -> torch.Tensor:
        scheduler.set_timesteps(30, device=device)
        sample = start
        for t, output in zip(scheduler.timesteps, outputs, strict=False):  # as the pipeline loops
            sample = scheduler.step(output, t, sample).prev_sample
        return sample

    want = run(theirs, "cpu")
    assert torch.equal(run(ours, "meta"), want) and torch.equal(run(ours, "cpu"), want)
    if not skip_prk_steps:
        assert len(ours.timesteps) > 30  # the Runge-Kutta warm-up steps ran too
    with pytest.raises(RuntimeError, match="meta"):
        run(PNDMScheduler.from_config(config), "meta")
    # A timestep that is not an element of the schedule is used as PNDM uses it.
    ours.set_timesteps(30)
    theirs.set_timesteps(30)
    t = int(ours.timesteps[0])
    assert torch.equal(ours.step(outputs[0], t, start).prev_sample, theirs.step(outputs[0], t, start).prev_sample)


def test_the_pipeline_hands_pndm_elements_of_its_schedule(tiny_dir: Path, monkeypatch) -> None:
    """diffusers' pipeline loops over the scheduler's own timesteps: each step takes the host path (a copy of them
    would silently bring the GPU waits back)."""
    from stable_diffusion.host_timestep_pndm import HostTimestepPNDMScheduler

    kinds, host = [], HostTimestepPNDMScheduler._host_timestep
    monkeypatch.setattr(
        HostTimestepPNDMScheduler, "_host_timestep", lambda self, t: kinds.append(type(host(self, t))) or host(self, t)
    )
    pipe = load_base_model(str(tiny_dir)).pipeline()
    pipe("a face", num_inference_steps=4, height=64, width=64, output_type="np", generator=torch.Generator())
    assert kinds == [int] * len(pipe.scheduler.timesteps) and len(kinds) >= 4
