"""``likeness prefetch``: download every model a config needs while online, so that the run can go offline after.

The base model (only the files the loader reads: SD1.x's five parts in safetensors, no safety checker, no other
formats or variants), the CLIP model of the CLIP score and the face model's weights. Each is then loaded the way a
run loads it, with ``HF_HUB_OFFLINE=1``: "ready" means an offline run will find it (issue #11).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from stable_diffusion.base_model import SD15_HUB_ID, load_base_model
from stable_diffusion.hub_access import hub_local_only


@dataclass
class PrefetchSettings:
    """What a run needs, as its config names it (``model.*`` and ``validation.*``)."""

    base_model: str
    revision: str | None = None
    variant: str | None = None
    model_config: str | None = None
    clip_model: str | None = None
    face_model: str = "Dlib"
    face_detector: str = "dlib"


def base_model_files(variant: str | None) -> list[str]:
    """The files of a diffusers SD1.x repo that ``load_base_model`` reads (``allow_patterns``)."""
    suffix = f".{variant}" if variant else ""
    return [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/*",
        *(f"{part}/config.json" for part in ("unet", "vae", "text_encoder")),
        f"unet/diffusion_pytorch_model{suffix}.safetensors",
        f"vae/diffusion_pytorch_model{suffix}.safetensors",
        f"text_encoder/model{suffix}.safetensors",
    ]


# A CLIP model's configs, tokenizer and image processor, and its weights in safetensors.
CLIP_FILES = ["*.json", "*.txt", "model.safetensors"]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for a while: what a run that finds everything locally sees."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _is_hub_id(name: str) -> bool:
    return not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None, patterns: list[str], setting: str, probe_file: str) -> str:
    """Download the files of ``repo_id`` matching ``patterns``; "in the cache" when they are there already."""
    local_only = hub_local_only(repo_id, revision, setting, probe_file=probe_file)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only)
    except Exception as err:  # noqa: BLE001 - the offline load after this says what is missing
        return f"not downloaded ({type(err).__name__})"
    if patterns == CLIP_FILES and not (Path(folder) / "model.safetensors").is_file():
        # Older CLIP repos hold only PyTorch's format; transformers reads it with torch.load(weights_only=True).
        snapshot_download(repo_id, revision=revision, allow_patterns=["pytorch_model.bin"], local_files_only=local_only)
    return "in the cache" if local_only else "downloaded"


def prefetch(settings: PrefetchSettings, say: Callable[[str], None] = print) -> None:
    """Download what ``settings`` name, then load each offline; raise the loader's clear error if one is missing."""
    from metrics.clip_score import SETTING as CLIP_SETTING
    from metrics.clip_score import load_clip
    from metrics.face_model import FaceModel

    base = settings.base_model
    if _is_hub_id(base):
        patterns = base_model_files(settings.variant)
        status = _download(base, settings.revision, patterns, "model.pretrained_model_name_or_path", patterns[0])
    else:
        status = "a local file or folder"
        if Path(base).expanduser().is_file() and settings.model_config is None:
            # A single-file checkpoint takes SD1.5's tokenizer from the Hub cache.
            _download(SD15_HUB_ID, None, ["tokenizer/*"], "model.model_config", "tokenizer/vocab.json")
    with offline():
        load_base_model(base, settings.revision, settings.variant, torch.float16, settings.model_config)
    say(f"base model {base}: {status}; loads offline")

    if settings.clip_model is None:
        say("CLIP model: none (validation.clip_model null)")
    else:
        status = "a local folder"
        if _is_hub_id(settings.clip_model):
            status = _download(settings.clip_model, None, CLIP_FILES, CLIP_SETTING, "config.json")
        with offline():
            load_clip(settings.clip_model)
        say(f"CLIP model {settings.clip_model}: {status}; loads offline")

    face = FaceModel(settings.face_model, settings.face_detector, allow_download=True)
    face.check()  # deepface downloads what it lacks; the bundled offline weights are copied
    say(f"face model {settings.face_model} + detector {settings.face_detector}: ready (weights in {face.weights_dir})")
