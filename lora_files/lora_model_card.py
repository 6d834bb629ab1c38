"""The ``README.md`` model card written beside an exported LoRA: base model, settings, metrics and how to load it.

Kept apart from :mod:`lora_files.lora_formats` (the weight files, whose ``export_lora`` writes the card) so that
either can change alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["write_model_card"]

# The diffusers file's default name; lora_formats.DIFFUSERS_WEIGHT_NAME is the same string (a test checks),
# kept literal here because lora_formats imports this module.
DEFAULT_DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

_STOPWORDS = frozenset(
    ("a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "for", "is", "photo", "picture")
)


def _top_words(captions: Iterable[str], n: int = 10) -> list[tuple[str, int]]:
    """Most common caption words (minus filler), so the card tells which trigger words the LoRA learned."""
    words = Counter(w for c in captions for w in re.findall(r"[\w'-]+", c.lower()) if w not in _STOPWORDS)
    return words.most_common(n)


def _cell(value: object) -> str:
    """A markdown table cell: scalars as they are, containers as compact JSON, pipes escaped."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def write_model_card(
    folder: str | Path,
    *,
    base_model: str,
    settings: Mapping | None = None,
    metrics: Mapping[str, float] | None = None,
    name: str = "likeness_lora",
    steps: int | None = None,
    resolution: int | tuple[int, int] | None = None,
    captions: Iterable[str] = (),
    lora: Mapping[str, Mapping] | None = None,
    diffusers_file: str = DEFAULT_DIFFUSERS_FILE,
    kohya_file: str | None = None,
) -> Path:
    """Write ``folder/README.md``: base model, settings, last validation metrics and how to load the LoRA.

    Args:
        folder: Folder holding the exported files.
        base_model: Base model id or path the LoRA was trained on.
        settings: Training settings (flat mapping) to list; ``ema_decay`` (with ``ema_start_step``, ``ema_warmup``)
            says the weights are an EMA.
        metrics: Last validation metrics; ``None`` says none were computed.
        name: LoRA name (kohya file stem and A1111 prompt tag).
        steps: Optimizer steps trained.
        resolution: Training resolution.
        captions: Training captions; their most common words are listed.
        lora: Per-model adapter config (``{"unet": {...}, "text_encoder": {...}}``).
        diffusers_file: Name of the diffusers file.
        kohya_file: Name of the kohya file (default ``<name>.safetensors``).

    Returns:
        Path of the written ``README.md``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kohya_file = kohya_file or f"{name}.safetensors"
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution or ())
    res = "x".join(map(str, size))
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags: [stable-diffusion, stable-diffusion-diffusers, text-to-image, lora]",
        "---",
        "",
        f"# {name}",
        "",
        f"A LoRA for Stable Diffusion 1.x on `{base_model}`, trained with *likeness* to draw one person.",
        "",
        *_ema_note(settings or {}),
        "| file | for |",
        "| --- | --- |",
        f"| `{diffusers_file}` | diffusers (`load_lora_weights`) |",
        f"| `{kohya_file}` | ComfyUI, AUTOMATIC1111, Forge (kohya format) |",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model | `{base_model}` |",
    ]
    if steps is not None:
        lines.append(f"| steps | {steps} |")
    if res:
        lines.append(f"| resolution | {res} |")
    for part, cfg in (lora or {}).items():
        lines.append(
            f"| LoRA {part} | r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, "
            f"targets={_cell(cfg.get('target_modules'))} |"
        )
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in (settings or {}).items()]
    lines += ["", "## Last validation metrics", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {float(v):.4g} |" for k, v in metrics.items()]
    else:
        lines.append("No validation metrics were recorded.")
    top = _top_words(captions)
    if top:
        counts = ", ".join(f"`{w}` ({n})" for w, n in top)
        lines += ["", "## Caption words", "", "Most common words of the training captions:", "", counts]
    prompt = " ".join(w for w, _ in top[:3]) or "a photo of the person"
    lines += [
        "",
        "## Use",
        "",
        "### diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        # A single checkpoint file loads with from_single_file, a Hub id or diffusers folder with from_pretrained.
        f'pipe = StableDiffusionPipeline.{_loader(base_model)}("{base_model}", torch_dtype=torch.float16)',
        'pipe = pipe.to("cuda")',
        f'pipe.load_lora_weights("path/to/this/folder", weight_name="{diffusers_file}")',
        f'image = pipe("{prompt}", num_inference_steps=30).images[0]',
        "```",
        "",
        "### ComfyUI",
        "",
        f"Copy `{kohya_file}` into `ComfyUI/models/loras/`, add a **Load LoRA** (`LoraLoader`) node between "
        "*Load Checkpoint* and the sampler/CLIP text encoders, pick the file and set `strength_model` and "
        "`strength_clip` (1.0 = as trained).",
        "",
        "### AUTOMATIC1111 / Forge",
        "",
        f"Copy `{kohya_file}` into `stable-diffusion-webui/models/Lora/` and write `<lora:{name}:1>` in the "
        f"prompt, e.g. `{prompt} <lora:{name}:1>`.",
        "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _ema_note(settings: Mapping) -> list[str]:
    """A paragraph saying the weights are an EMA, when the settings say so (``ema_*`` from callbacks/lora_ema.py)."""
    decay = settings.get("ema_decay")
    if not decay:
        return []
    how = f"decay {decay}"
    if settings.get("ema_warmup"):
        how += ", warmed up as min(decay, (1 + n) / (10 + n)) at the n-th averaged step"
    if settings.get("ema_start_step"):
        how += f", averaged after optimizer step {settings['ema_start_step']}"
    return [f"The weights are an exponential moving average (EMA) of the trained ones ({how}).", ""]


def _loader(base_model: str) -> str:
    return "from_single_file" if base_model.lower().endswith((".safetensors", ".ckpt")) else "from_pretrained"
