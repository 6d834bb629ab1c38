"""Image decoding and transforms, against values computed independently with NumPy/PIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.epoch_sampler import EpochSampler
from datamodules.folder_scan import Pair
from datamodules.image_caption_dataset import ImageCaptionDataset, load_rgb


def gradient_image(width=60, height=40) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)


def test_exif_orientation_is_applied(tmp_path):
    array = gradient_image()
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored landscape, shown portrait
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    loaded = np.asarray(load_rgb(tmp_path / "rotated.jpg")).astype(int)
    expected = np.rot90(array, k=-1).astype(int)  # 90 degrees clockwise
    assert loaded.shape == expected.shape == (60, 40, 3)
    assert np.abs(loaded - expected).mean() < 4  # JPEG noise only


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = gradient_image()
    gray = rgb[..., 0]
    if mode == "L":
        Image.fromarray(gray, "L").save(tmp_path / "x.png")
        expected = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "x.png")  # a 16-bit PNG
        expected = np.repeat(gray[..., None], 3, axis=2)  # 16-bit scaled back to 8 bits, not clipped at 255
    elif mode == "RGBA":
        alpha = np.full(gray.shape, 255, np.uint8)
        alpha[:, :10] = 0  # transparent strip shows white
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "x.png")
        expected = rgb.copy()
        expected[:, :10] = 255
    elif mode == "LA":
        alpha = np.full(gray.shape, 255, np.uint8)
        alpha[:5] = 0
        Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "x.png")
        expected = np.repeat(gray[..., None], 3, axis=2)
        expected[:5] = 255
    elif mode == "P":
        Image.fromarray(rgb).quantize(16).save(tmp_path / "x.png")
        expected = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
    else:  # CMYK: JPEG keeps it; PIL's CMYK->RGB is the reference
        cmyk = Image.fromarray(rgb).convert("CMYK")
        cmyk.save(tmp_path / "x.jpg", quality=100)
        expected = np.asarray(Image.open(tmp_path / "x.jpg").convert("RGB"))
    path = next(tmp_path.glob("x.*"))
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded).astype(int) - expected.astype(int)).max() <= 1


def test_resize_crop_scale(tmp_path, tiny_tokenizer):
    array = gradient_image(120, 80)
    Image.fromarray(array).save(tmp_path / "x.png")
    dataset = ImageCaptionDataset([Pair(tmp_path / "x.png", "a photo")], tiny_tokenizer, resolution=40)
    item = dataset[0]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 40, 40)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # Independent reference: short side 80 -> 40 means width 120 -> 60, center crop columns 10..50.
    reference = np.asarray(Image.fromarray(array).resize((60, 40), Image.Resampling.BICUBIC))[:, 10:50]
    reference = torch.from_numpy(reference.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pixels, reference)
    # Captions are padded to the tokenizer's max length.
    assert item["input_ids"].shape == (tiny_tokenizer.model_max_length,)
    assert (
        item["input_ids"].tolist()
        == tiny_tokenizer("a photo", padding="max_length", max_length=tiny_tokenizer.model_max_length).input_ids
    )


def test_a_caption_longer_than_the_text_encoder_reads_is_reported_with_what_it_loses(tmp_path, tiny_tokenizer):
    import warnings

    Image.fromarray(gradient_image(40, 40)).save(tmp_path / "x.png")
    limit = tiny_tokenizer.model_max_length
    words = " ".join(["a"] * (limit - 2))  # one token each: with start and end, the text encoder's whole window
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageCaptionDataset([Pair(tmp_path / "x.png", words)], tiny_tokenizer, resolution=40)
        dataset = ImageCaptionDataset([Pair(tmp_path / "x.png", f"{words} sks person")], tiny_tokenizer, resolution=40)
    messages = [str(w.message) for w in caught if "tokens and are cut" in str(w.message)]
    assert len(messages) == 1, messages  # the caption that just fits is not reported
    assert f"1 caption(s) are longer than the text encoder's {limit} tokens" in messages[0]
    assert "x.txt loses 'sks person'" in messages[0]
    # ... and that is what training sees: the trigger word is not among the input ids.
    assert tiny_tokenizer.decode(dataset[0]["input_ids"], skip_special_tokens=True).strip() == words


def test_random_crop_and_flip_follow_the_seed(tmp_path, tiny_tokenizer):
    Image.fromarray(gradient_image(90, 40)).save(tmp_path / "x.png")
    dataset = ImageCaptionDataset(
        [Pair(tmp_path / "x.png", "c")], tiny_tokenizer, resolution=40, crop="random", random_flip=True
    )
    full = torch.from_numpy(np.asarray(Image.fromarray(gradient_image(90, 40))).astype(np.float32) / 127.5 - 1).permute(
        2, 0, 1
    )
    seen = set()
    for seed in range(40):
        a, b = dataset[(0, seed)]["pixel_values"], dataset[(0, seed)]["pixel_values"]
        torch.testing.assert_close(a, b)  # same seed, same augmentation
        # Every output is some 40-wide window of the (unresized) image, maybe mirrored.
        for flipped in (False, True):
            view = a.flip(-1) if flipped else a
            offsets = [x for x in range(51) if torch.allclose(full[:, :, x : x + 40], view)]
            if offsets:
                seen.add((offsets[0], flipped))
                break
        else:
            raise AssertionError(f"seed {seed}: not a crop of the image")
    assert len({o for o, _ in seen}) > 5 and {f for _, f in seen} == {False, True}


def test_epoch_sampler_skip_resumes_the_same_order():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(i for i, _ in full) == list(range(10))
    sampler.skip = 4
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # skip applies once
    sampler.set_epoch(3)
    assert list(sampler) != full  # a new epoch, a new order
    ranks = [list(EpochSampler(10, seed=3, rank=r, world_size=2)) for r in range(2)]
    sampler.set_epoch(0)
    assert sorted(ranks[0] + ranks[1]) == sorted(EpochSampler(10, seed=3))
    # Uneven split: padded so every rank runs the same number of batches (DDP would hang otherwise).
    ranks = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    assert {i for r in ranks for i, _ in r} == set(range(10))
