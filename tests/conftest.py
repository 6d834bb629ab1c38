"""Shared fixtures: the tiny SD model and the demo photos, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never reach the Hub: anything that tries must fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (README's test command: one worker per core) each worker computes on one thread: two workers
# of two threads each on two cores would fight for them, and the tiny models gain nothing from a second thread.
# The environment variables carry the setting into the train.py subprocesses that some tests start.
# A thread count the developer set is left as it is.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from stable_diffusion.tiny_sd import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def demo_photos(tmp_path_factory):
    from datamodules.sample_photos import save_sample_photos

    return save_sample_photos(tmp_path_factory.mktemp("demo") / "photos")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


@pytest.fixture(scope="session")
def demo_cli(tiny_sd, demo_photos, tmp_path_factory):
    """``demo_cli(subcommand, log_dir, *extra)``: train.py arguments running configs/demo.yaml on the fixtures."""

    cache_dir = tmp_path_factory.mktemp("face-cache")  # embed the demo photos once per session
    latent_dir = tmp_path_factory.mktemp("latent-cache")  # encode them once per session, never in ~/.cache

    def args(subcommand: str, log_dir: Path, *extra: str, photos: Path | None = None) -> list[str]:
        photos = photos or demo_photos
        return [
            subcommand,
            "--config",
            str(ROOT / "configs/demo.yaml"),
            f"--model.pretrained_model_name_or_path={tiny_sd}",
            f"--data.data_dir={photos}",
            f"--data.validation_prompts={demo_photos.parent / 'validation_prompts.txt'}",
            f"--trainer.logger.init_args.save_dir={log_dir}",
            f"--validation.cache_dir={cache_dir}",
            f"--data.cache_dir={latent_dir}",
            "--validation.clip_model=null",
            # Validation images of 32 px (latents of 16², attention over 256 places, not 1,024) in 4 steps, not the
            # demo's 64 px in 10: a tenth of the sampling time, in every validation of every fit the tests run.
            "--model.image_size=32",
            "--model.num_inference_steps=4",
            # Training photos of 32 px too (latents of 16²): a quarter of every training step's work.
            "--data.resolution=32",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *extra,
        ]

    return args
