"""Prompts for validation, test and predict; the training loader's batches."""

from __future__ import annotations

import pytest

from datamodules.face_data_module import FaceDataModule, read_prompts


def test_prompts_from_a_file_or_a_list(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second prompt  \nthird\n", encoding="utf-8")
    assert read_prompts(str(path), "x") == ["first prompt", "second prompt", "third"]
    assert read_prompts(["a", " ", "b "], "x") == ["a", "b"]
    assert read_prompts(None, "x") == []
    with pytest.raises(FileNotFoundError, match="data.validation_prompts: prompt file .*nope.txt does not exist"):
        read_prompts(str(tmp_path / "nope.txt"), "data.validation_prompts")
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(str(path), "x")


def test_loaders_serve_prompts_and_training_batches(demo_photos, tiny_tokenizer):
    prompts = [f"prompt {i}" for i in range(5)]
    dm = FaceDataModule(
        data_dir=str(demo_photos),
        resolution=32,
        batch_size=3,
        validation_prompts=prompts,
        num_validation_prompts=3,
        validation_batch_size=2,
        predict_prompts=["p", "q"],
        images_per_prompt=2,
    )
    dm.tokenizer = tiny_tokenizer
    assert dm.validation_prompt_list() == prompts[:3]  # what fit generates (the HW's first 3)
    assert [b["prompt"] for b in dm.test_dataloader()] == [prompts[0:2], prompts[2:4], prompts[4:]]
    batches = list(dm.predict_dataloader())
    assert [p for b in batches for p in b["prompt"]] == ["p", "p", "q", "q"]
    assert [int(r) for b in batches for r in b["repeat"]] == [0, 1, 0, 1]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape == (3, tiny_tokenizer.model_max_length)
    captions = {p.caption for p in dm.pairs}
    assert set(batch["caption"]) <= captions and len(dm.captions) == len(dm.pairs)
