"""The latent and text-embedding caches: what they serve equals encoding now, and they never serve stale data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.face_data_module import FaceDataModule
from datamodules.latent_cache import LatentCache, file_digest, weights_fingerprint
from lightning_modules.lora_diffusion import LoRADiffusion


@pytest.fixture(scope="module")
def model(tiny_sd):
    return LoRADiffusion(str(tiny_sd), train_text_encoder=False)


@pytest.fixture
def photos(demo_photos, tmp_path):
    """A private copy of the demo photos (tests change them)."""
    return Path(shutil.copytree(demo_photos, tmp_path / "photos"))


def data_module(model, photos, cache_dir, **kwargs) -> FaceDataModule:
    dm = FaceDataModule(data_dir=str(photos), resolution=64, cache_dir=str(cache_dir), **kwargs)
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    dm.prepare_encodings(model)
    return dm


def live_flip(seed: int) -> bool:
    """The flip `ImageCaptionDataset.transform` draws for a center crop: its first draw from the seed."""
    return torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < 0.5


def test_cache_serves_the_latents_of_the_drawn_orientation(model, photos, tmp_path):
    dm = data_module(model, photos, tmp_path / "cache", random_flip=True)
    dataset = dm.train_dataset
    assert len(dataset.latents) == 2 * len(dataset)  # both orientations of every photo
    seen = set()
    for seed in range(12):
        item = dataset[(1, seed)]
        flip = live_flip(seed)
        seen.add(flip)
        assert "pixel_values" not in item
        mean, std = model.latent_moments(dataset.pixels(1, flip)[None])
        # Encoded in another batch shape: equal up to float rounding.
        torch.testing.assert_close(item["latent_mean"], mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["latent_std"], std[0], rtol=1e-4, atol=1e-5)
        # ... and the other orientation's latents are far from it: the test can tell them apart.
        other, _ = dataset.latents[1, not flip]
        assert (other - item["latent_mean"]).abs().max() > 100 * 1e-5
    assert seen == {False, True}
    # The flipped entry is the encoding of the image mirrored after the crop, exactly as the live path flips.
    live = dataset.latents
    dataset.latents = None
    for seed in range(6):
        pixels = dataset[(1, seed)]["pixel_values"]
        assert torch.equal(pixels, dataset.pixels(1, live_flip(seed)))
    dataset.latents = live


def test_frozen_text_encoder_embeddings_are_computed_once(model, photos, tmp_path):
    dataset = data_module(model, photos, tmp_path / "cache").train_dataset
    item = dataset[(2, 0)]
    want = model.text_encoder(item["input_ids"][None], return_dict=False)[0][0]
    torch.testing.assert_close(item["encoder_hidden_states"], want, rtol=1e-4, atol=1e-5)
    batch = {"latent_mean": item["latent_mean"][None], "input_ids": item["input_ids"][None]}
    batch["encoder_hidden_states"] = item["encoder_hidden_states"][None]
    assert model.batch_text_embeddings(batch) is batch["encoder_hidden_states"]


def test_a_trained_text_encoder_gets_tokens(tiny_sd, photos, tmp_path):
    model = LoRADiffusion(str(tiny_sd), train_text_encoder=True)
    item = data_module(model, photos, tmp_path / "cache").train_dataset[(0, 0)]
    assert "encoder_hidden_states" not in item and "latent_mean" in item


def test_random_crops_are_encoded_live(model, photos, tmp_path):
    dm = data_module(model, photos, tmp_path / "cache", crop="random")
    assert dm.train_dataset.latents is None and "pixel_values" in dm.train_dataset[(0, 3)]
    assert not (tmp_path / "cache").exists()


def test_face_crops_are_cached_and_equal_their_live_encoding(model, photos, tmp_path):
    cache = tmp_path / "cache"
    center = data_module(model, photos, cache, random_flip=True)
    dm = FaceDataModule(data_dir=str(photos), resolution=64, cache_dir=str(cache), crop="face", random_flip=True)
    dm.tokenizer, dm.serve_face_mask, dm.latent_factor = model.tokenizer, True, model.latent_scale_factor
    dm.setup("fit")
    dm.prepare_encodings(model)
    dataset, n = dm.train_dataset, len(dm.train_dataset)
    # Each face square is an entry of its own (the demo photos are square: some face squares are the whole photo).
    sizes = [(face.width, face.height) for face in dataset.faces]
    moved = [i for i in range(n) if dataset.window(i, sizes[i], None).box != (0, 0, *sizes[i])]
    assert 0 < len(moved) < n and dm.latent_cache_report.encoded == 2 * n
    cached = dataset.latents
    for i in range(n):
        for seed in range(3):
            item = dataset[(i, seed)]
            dataset.latents = None  # the same sample, served live: pixels to encode now
            live = dataset[(i, seed)]
            dataset.latents = cached
            mean, std = model.latent_moments(live["pixel_values"][None])
            torch.testing.assert_close(item["latent_mean"], mean[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(item["latent_std"], std[0], rtol=1e-4, atol=1e-5)
            assert torch.equal(item["face_mask"], live["face_mask"])  # the mask needs no pixels and no VAE
        if i in moved:  # and it is another crop than the center crop
            assert (center.train_dataset.latents[i, False][0] - cached[i, False][0]).abs().max() > 1e-2


def test_dropped_captions_get_the_empty_prompts_embedding(model, photos, tmp_path):
    dataset = data_module(model, photos, tmp_path / "cache", caption_dropout=0.5).train_dataset
    seeds = {dataset.draw(3, seed, None)[2]: seed for seed in range(20)}
    empty = model.tokenizer("", padding="max_length", return_tensors="pt").input_ids
    want = {True: model.text_encoder(empty, return_dict=False)[0][0]}
    want[False] = model.text_encoder(dataset.input_ids[3][None], return_dict=False)[0][0]
    for dropped, seed in seeds.items():
        item = dataset[(3, seed)]
        torch.testing.assert_close(item["encoder_hidden_states"], want[dropped], rtol=1e-4, atol=1e-5)
    assert (want[True] - want[False]).abs().max() > 1e-3


def test_second_run_reuses_and_changed_or_corrupt_entries_are_rebuilt(model, photos, tmp_path):
    cache = tmp_path / "cache"
    first = data_module(model, photos, cache)
    n = len(first.train_dataset)
    assert (first.latent_cache_report.reused, first.latent_cache_report.encoded) == (0, n)
    again = data_module(model, photos, cache)
    assert (again.latent_cache_report.reused, again.latent_cache_report.encoded) == (n, 0)
    for key, (mean, std) in first.train_dataset.latents.items():
        assert torch.equal(again.train_dataset.latents[key][0], mean) and torch.equal(
            again.train_dataset.latents[key][1], std
        )

    # A changed photo: its entry is encoded again, the others are reused.
    changed = first.pairs[0].image
    Image.open(changed).transpose(Image.Transpose.ROTATE_180).save(changed)
    # One flipped bit inside another entry's tensor data: the checksum catches it.
    fingerprint = weights_fingerprint(model.vae.encoder, model.vae.quant_conv)
    victim = LatentCache(cache, fingerprint, 64).entry_path(file_digest(first.pairs[1].image), False)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt latent cache entry"):
        third = data_module(model, photos, cache)
    report = third.latent_cache_report
    assert (report.reused, report.encoded, report.rebuilt) == (n - 2, 2, 1)
    index = next(i for i, pair in enumerate(third.pairs) if pair.image == changed)
    assert (
        third.train_dataset.latents[index, False][0] - first.train_dataset.latents[index, False][0]
    ).abs().max() > 1e-2
    # What was rebuilt is served correctly, and what is on disk now loads.
    fresh = data_module(model, photos, tmp_path / "fresh-cache")
    for key, (mean, _) in fresh.train_dataset.latents.items():
        assert torch.equal(third.train_dataset.latents[key][0], mean)
    assert data_module(model, photos, cache).latent_cache_report.reused == n


def test_entries_made_under_autocast_are_not_served_to_a_float32_run(model, photos, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    n = len(data_module(model, photos, cache).train_dataset)
    monkeypatch.setattr(LoRADiffusion, "encoding_precision", property(lambda self: "bf16-mixed"))
    assert (data_module(model, photos, cache).latent_cache_report.reused) == 0
    assert (data_module(model, photos, cache).latent_cache_report.reused) == n
    monkeypatch.undo()
    assert (data_module(model, photos, cache).latent_cache_report.reused) == n


def test_entries_depend_on_the_vae_and_resolution(model, tmp_path):
    fingerprint = weights_fingerprint(model.vae.encoder, model.vae.quant_conv)
    a = LatentCache(tmp_path, fingerprint, 64)
    assert a.entry_path("d", False) != LatentCache(tmp_path, fingerprint, 32).entry_path("d", False)
    assert a.entry_path("d", False) != a.entry_path("d", True) != a.entry_path("e", True)
    with torch.no_grad():
        model.vae.encoder.conv_in.bias.add_(1e-3)
    try:
        assert weights_fingerprint(model.vae.encoder, model.vae.quant_conv) != fingerprint
    finally:
        with torch.no_grad():
            model.vae.encoder.conv_in.bias.sub_(1e-3)


def test_cached_run_trains_like_an_uncached_one(demo_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train import main

    quiet = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]
    common = [*quiet, "--trainer.max_steps=6", "--trainer.log_every_n_steps=1", "--export.on_checkpoint=false"]
    common += ["--model.train_text_encoder=false", "--data.random_flip=true"]  # both caches, both orientations
    runs = {
        cached: main(demo_cli("fit", tmp_path / str(cached), *common, f"--data.cache_latents={cached}"))
        for cached in (True, False)
    }
    losses = {}
    for cached, cli in runs.items():
        acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
        acc.Reload()
        losses[cached] = [e.value for e in acc.Scalars("train/loss")]
    assert "latent_mean" not in runs[False].datamodule.train_dataset[(0, 0)]
    assert "encoder_hidden_states" in runs[True].datamodule.train_dataset[(0, 0)]
    # Same draws, same batches: equal up to the rounding of encoding in other batch shapes.
    assert len(losses[True]) == 6 and losses[True] == pytest.approx(losses[False], rel=1e-4)
    for (name, a), b in zip(
        runs[True].model.state_dict().items(), runs[False].model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
