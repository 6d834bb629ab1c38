"""ClipScore loaded from a local folder holding a tiny random CLIP, against independent computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from metrics.clip_score import ClipScore, _ImageProcessor
from stable_diffusion.tiny_sd import save_tiny_clip

IMAGE_SIZE = 32
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
CONTEXT = 32  # the tiny model's text context, in tokens (one per character here)
PROMPTS = ["a photo of brad pitt", "a man on the beach", "portrait, studio light, 85mm"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP saved like a Hub checkpoint: model, char-level tokenizer, PIL image processor."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=IMAGE_SIZE, context=CONTEXT)


def _images(size: tuple[int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in PROMPTS]


def _reference_scores(folder: Path, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """100 * cos computed by hand: own preprocessing (images already at the model size), own pooling."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            pixels = (np.asarray(image, dtype=np.float64) / 255.0 - MEAN) / STD
            pixel_values = torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float32)
            vision = model.vision_model(pixel_values=pixel_values).pooler_output
            image_vec = model.visual_projection(vision)[0].double().numpy()
            ids = tokenizer(prompt)["input_ids"]  # one prompt: no padding at all
            if len(ids) > CONTEXT:  # truncated by hand: keep the start, cut, then end with end-of-text
                ids = ids[: CONTEXT - 1] + [tokenizer.eos_token_id]
            ids = torch.tensor([ids])
            hidden = model.text_model(input_ids=ids).last_hidden_state
            eos_at = int(torch.nonzero(ids[0] == tokenizer.eos_token_id)[0])
            text_vec = model.text_projection(hidden[0, eos_at]).double().numpy()
            cos = image_vec @ text_vec / (np.linalg.norm(image_vec) * np.linalg.norm(text_vec))
            scores.append(100.0 * cos)
    return np.array(scores)


def test_clip_score_matches_hand_computation(tiny_clip: Path) -> None:
    images = _images((IMAGE_SIZE, IMAGE_SIZE))  # at model size, so resize/crop are identities
    expected = _reference_scores(tiny_clip, images, PROMPTS)
    metric = ClipScore(str(tiny_clip))
    np.testing.assert_allclose(metric.scores(images, PROMPTS).numpy(), expected, rtol=1e-4, atol=1e-4)
    metric.update(images[:1], PROMPTS[:1])
    metric.update(images[1:], PROMPTS[1:])
    assert metric.compute().item() == pytest.approx(expected.mean(), abs=1e-4)


def test_clip_score_matches_hw_logits_per_image(tiny_clip: Path) -> None:
    """The HW's way, one image and prompt at a time through the processor, on non-square images."""
    images = _images((57, 41))
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    processor = _ImageProcessor.from_pretrained(tiny_clip)
    hw = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS, strict=True):
            out = model(**tokenizer(prompt, return_tensors="pt"), **processor(images=image, return_tensors="pt"))
            hw.append(out.logits_per_image.item())
    metric = ClipScore(tiny_clip)
    metric.update(images, PROMPTS)
    assert metric.compute().item() == pytest.approx(float(np.mean(hw)), abs=1e-3)


def test_long_prompt_is_truncated_keeping_end_token(tiny_clip: Path) -> None:
    metric = ClipScore(tiny_clip)
    image = _images((IMAGE_SIZE, IMAGE_SIZE))[:1]
    long_prompt = "a very long prompt that is much longer than the context of the tiny model"
    expected = _reference_scores(tiny_clip, image, [long_prompt])
    assert metric.scores(image, [long_prompt]).numpy() == pytest.approx(expected, abs=1e-4)


def test_clip_score_nan_when_empty_and_checks_lengths(tiny_clip: Path) -> None:
    metric = ClipScore(tiny_clip)
    metric.update([], [])
    assert math.isnan(metric.compute().item())
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metric.update(_images((IMAGE_SIZE, IMAGE_SIZE))[:2], PROMPTS[:1])


def test_clip_model_is_not_a_submodule(tiny_clip: Path) -> None:
    metric = ClipScore(tiny_clip)
    assert not any(k.startswith("clip_model") for k in metric.state_dict())
    assert not any(p.requires_grad for p in metric.clip_model.parameters())


def test_clear_errors_for_missing_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScore(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScore(tmp_path)  # exists but is empty
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError, match="validation.clip_model someone/clip-that-is-not-cached: cannot download.*null"
    ):
        ClipScore("someone/clip-that-is-not-cached")
