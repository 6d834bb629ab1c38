"""Shared fixtures: the tiny SD model and the demo photos, written once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach the Hub: anything that tries must fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from lightning_modules.tiny_sd import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def demo_photos(tmp_path_factory):
    from datamodules.sample_photos import save_sample_photos

    return save_sample_photos(tmp_path_factory.mktemp("demo") / "photos")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
