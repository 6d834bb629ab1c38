"""Prompts for validation, test and predict; the training loader's batches."""

from __future__ import annotations

import warnings

import pytest

from datamodules.data_settings import read_prompts
from datamodules.face_data_module import FaceDataModule


def test_prompts_from_a_file_or_a_list(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# brad's prompts\nfirst prompt\n\n  second prompt  \n  # not this one\nthird\n", encoding="utf-8")
    assert read_prompts(str(path), "x") == ["first prompt", "second prompt", "third"]  # comment lines skipped
    assert read_prompts(["a", " ", "b "], "x") == ["a", "b"]
    assert read_prompts(None, "x") == []
    with pytest.raises(FileNotFoundError, match="data.validation_prompts: prompt file .*nope.txt does not exist"):
        read_prompts(str(tmp_path / "nope.txt"), "data.validation_prompts")
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(str(path), "x")
    with pytest.raises(ValueError, match=f"x: {tmp_path} is a folder; give the prompt file itself .*prompts.txt"):
        read_prompts(str(tmp_path), "x")


def test_prompt_lines_end_at_line_breaks_only(tmp_path):
    """One prompt per line as an editor shows lines: a Unicode line separator inside a prompt made two of it, and
    every later prompt moved (its seed, its valid_image_<i>); a BOM before an indented comment made it a prompt."""
    path = tmp_path / "prompts.txt"
    text = "\ufeff  # comment\r\neileen\u2028in a red hat\reileen\x85on the moon\x0bat night\n\x0c\nlast one\n"
    path.write_text(text, encoding="utf-8", newline="")
    prompts = read_prompts(str(path), "x")
    assert prompts == ["eileen in a red hat", "eileen on the moon at night", "last one"]


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


def test_ranks_train_on_disjoint_shards_that_cover_the_data(demo_photos, tiny_tokenizer):
    """What each DDP rank's train loader serves: its own share of every epoch, together all photos."""
    from types import SimpleNamespace

    import torch

    served = []
    for rank in range(2):
        dm = FaceDataModule(data_dir=str(demo_photos), resolution=32, batch_size=1, cache_latents=False)
        dm.tokenizer = tiny_tokenizer
        dm.setup("fit")
        dm._encodings_ready = True  # no model here: the loader serves pixels
        dm.trainer = SimpleNamespace(
            world_size=2, global_rank=rank, strategy=SimpleNamespace(root_device=torch.device("cpu"))
        )
        served.append([batch["caption"][0] for batch in dm.train_dataloader()])
    captions = [pair.caption for pair in dm.pairs]
    assert len(served[0]) == len(served[1]) == (len(captions) + 1) // 2  # same number of steps on each rank
    assert set(served[0]) | set(served[1]) == set(captions)
    # Disjoint but for the one photo that pads an odd count (as DistributedSampler pads).
    assert len(set(served[0]) & set(served[1])) == len(served[0]) + len(served[1]) - len(captions)


def test_faces_are_found_only_when_the_crop_or_the_loss_needs_them(demo_photos, tiny_tokenizer, tmp_path):
    def setup(**kwargs) -> FaceDataModule:
        dm = FaceDataModule(data_dir=str(demo_photos), resolution=32, cache_dir=str(tmp_path), **kwargs)
        dm.tokenizer = tiny_tokenizer
        dm.setup("fit")
        return dm

    plain = setup()
    assert plain.train_dataset.faces is None and plain.face_report is None
    assert not (tmp_path / "face_boxes").exists()  # no detector run, nothing written
    for kwargs, mask in (({"crop": "face"}, False), ({}, True)):
        dm = FaceDataModule(data_dir=str(demo_photos), resolution=32, cache_dir=str(tmp_path), **kwargs)
        dm.tokenizer, dm.serve_face_mask = tiny_tokenizer, mask
        dm.setup("fit")
        faces = dm.train_dataset.faces
        assert faces is not None and len(faces) == len(dm.pairs) and all(face.box for face in faces)
        assert ("face_mask" in dm.train_dataset[0]) == mask
    assert len(list((tmp_path / "face_boxes").glob("*.json"))) == len(dm.pairs)  # detected once, then reused
    assert (dm.face_report.reused, dm.face_report.encoded) == (len(dm.pairs), 0)


@pytest.mark.parametrize("batch_size", [2, 64])
def test_a_batch_larger_than_the_photos_is_reported(demo_photos, tiny_tokenizer, batch_size):
    """A short data set and a large batch: every step is the one short batch; the user is told, not left to guess."""
    dm = FaceDataModule(data_dir=str(demo_photos), resolution=32, batch_size=batch_size)
    dm.tokenizer = tiny_tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    said = [str(w.message) for w in caught if "data.batch_size" in str(w.message)]
    photos = len(dm.pairs)
    assert 2 <= photos < 64
    assert len(said) == (batch_size > photos)
    assert all(s.startswith(f"data.batch_size 64 is more than the {photos} photo(s)") for s in said)
    assert len(next(iter(dm.train_dataloader()))["caption"]) == min(batch_size, photos)


def test_prompts_longer_than_the_text_encoder_reads_are_reported(demo_photos, tiny_tokenizer):
    """Their images ignore the end (a trigger word, a setting); said once, in words, naming the setting."""
    limit = tiny_tokenizer.model_max_length
    long = "a photo of eileen " + " ".join(["smiling"] * limit) + " on the moon"
    prompts = ["a photo of eileen", long]
    dm = FaceDataModule(data_dir=str(demo_photos), validation_prompts=prompts, predict_prompts=[long, long])
    dm.tokenizer = tiny_tokenizer
    for stage, setting, index in (("validate", "data.validation_prompts", 1), ("predict", "data.predict_prompts", 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.setup(stage)
        said = [str(w.message) for w in caught if "longer than the text encoder" in str(w.message)]
        assert len(said) == 1 and said[0].startswith(f"{2 - index} prompt(s) of {setting} are longer"), said
        assert f"prompt {index} loses '" in said[0] and said[0].endswith("on the moon'). Shorten them.")
    dm = FaceDataModule(data_dir=str(demo_photos), validation_prompts=prompts[:1])
    dm.tokenizer = tiny_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("validate")
