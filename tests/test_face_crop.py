"""Face crop, face mask, face-weighted loss and caption controls (issue #12), on scikit-image's public-domain
astronaut pasted at known places and scales: the expected face box comes from deepface run once on the original
photo, moved by the known paste, never from the code under test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.face_boxes import FEATHER, FaceBoxes
from datamodules.face_data_module import FaceDataModule
from datamodules.sample_photos import astronaut
from lightning_modules.diffusion_loss import face_loss_weights

RES, FACTOR = 256, 8  # training square and latent downsampling: a 32 x 32 mask
TOL = 4  # pixels in the training square: the detector on a resized photo does not land on the scaled box exactly
REL = 0.1  # of the face's side, in the photo: dlib's box grows and shrinks a little with the face's size
# name: (canvas width, height, astronaut scale, paste x, paste y). Tall like the HW's portraits, wide, small like its
# ~160 px photos, large, a face near the edges, and a face box almost as wide as the photo.
CANVASES = {
    "tall_low": (474, 700, 0.6, 150, 450),
    "wide_top": (900, 500, 1.0, 380, -40),
    "small": (160, 220, 0.6, -60, 10),
    "large_left": (800, 1000, 1.6, -200, 300),
    "narrow": (110, 300, 1.0, -170, 50),
    "edge": (600, 400, 1.0, -170, 100),  # the face at the left edge: off-centre in its square, so a flip shows
}


def deepface_box(image: Image.Image) -> tuple[float, float, float, float]:
    from deepface import DeepFace

    from metrics.face_model import FaceModel

    FaceModel("Dlib", "dlib").check()
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    faces = DeepFace.extract_faces(bgr, detector_backend="dlib", enforce_detection=False, align=False)
    area = max(faces, key=lambda f: f["confidence"])["facial_area"]
    return area["x"], area["y"], area["w"], area["h"]


@pytest.fixture(scope="module")
def original_face():
    return deepface_box(astronaut())


@pytest.fixture(scope="module")
def canvases(tmp_path_factory, original_face):
    """The canvases as photos (plus one without a face) and each one's expected face box."""
    folder = tmp_path_factory.mktemp("canvases")
    photo, expected = astronaut(), {}
    fx, fy, fw, fh = original_face
    for name, (width, height, scale, px, py) in CANVASES.items():
        canvas = Image.new("RGB", (width, height), (90, 110, 130))
        pasted = photo.resize((round(512 * scale),) * 2, Image.Resampling.LANCZOS)
        canvas.paste(pasted, (px, py))
        canvas.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"the astronaut, {name}", encoding="utf-8")
        expected[name] = (px + fx * scale, py + fy * scale, fw * scale, fh * scale)
    Image.new("RGB", (300, 400), (200, 200, 200)).save(folder / "faceless.png")
    (folder / "faceless.txt").write_text("a grey wall", encoding="utf-8")
    return folder, expected


def face_data(folder, tokenizer, cache_dir, **kwargs) -> FaceDataModule:
    dm = FaceDataModule(data_dir=str(folder), resolution=RES, crop="face", cache_dir=str(cache_dir), **kwargs)
    dm.tokenizer, dm.serve_face_mask, dm.latent_factor = tokenizer, True, FACTOR
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dataset(canvases, tiny_tokenizer, tmp_path_factory):
    with pytest.warns(UserWarning, match=r"No face found in 1 photo\(s\).*center crop.*: faceless.png"):
        dm = face_data(canvases[0], tiny_tokenizer, tmp_path_factory.mktemp("cache"), random_flip=True)
    return dm.train_dataset


def index_of(dataset, name: str) -> int:
    return next(i for i, pair in enumerate(dataset.pairs) if pair.image.stem == name)


def in_square(window, box):
    """``box`` (canvas pixels) in pixels of the training square, by the window's left, top and side."""
    left, top, side, _ = window.box
    return tuple(v * RES / side for v in (box[0] - left, box[1] - top, box[2], box[3]))


@pytest.mark.parametrize("name", sorted(CANVASES))
def test_face_crop_holds_the_face(dataset, canvases, name):
    i, (ex, ey, ew, eh) = index_of(dataset, name), canvases[1][name]
    face, tol = dataset.faces[i], REL * ew
    window = dataset.window(i, (face.width, face.height), None)
    left, top, width, height = window.box
    assert width == height and left >= 0 and top >= 0  # a square inside the photo
    assert left + width <= face.width + 1e-9 and top + height <= face.height + 1e-9
    # It holds the whole expected face box (up to the detector's few pixels).
    assert left <= ex + tol and top <= ey + tol and left + width >= ex + ew - tol and top + height >= ey + eh - tol
    # Margin 0.75: 2.5 face boxes wide, or the photo's short side when that is less.
    assert width == pytest.approx(min(2.5 * max(ew, eh), face.width, face.height), abs=2.5 * tol)
    # The served pixels show the face where the window says: the detector finds it there in the crop.
    pixels = dataset[i]["pixel_values"]
    crop = Image.fromarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    found, want = deepface_box(crop), in_square(window, (ex, ey, ew, eh))
    assert np.allclose(found, want, atol=REL * want[2] + TOL), (found, want)


def test_mask_lines_up_with_the_face_after_crop_and_flip(dataset, canvases):
    centres = (torch.arange(RES // FACTOR, dtype=torch.float64) + 0.5) * FACTOR  # latent pixel centres
    for name in CANVASES:
        i = index_of(dataset, name)
        face = dataset.faces[i]
        x, y, w, h = in_square(dataset.window(i, (face.width, face.height), None), canvases[1][name])
        tol, masks = REL * w + TOL, {}
        for seed in range(8):
            item = dataset[(i, seed)]
            flip = bool(torch.equal(item["pixel_values"], dataset.pixels(i, True)))  # which way it was served
            mask = masks[flip] = item["face_mask"][0]
            assert mask.shape == (RES // FACTOR, RES // FACTOR)
            x_seen = RES - x - w if flip else x  # the face mirrored with the pixels
            cx = float((mask.sum(0) * centres).sum() / mask.sum())
            cy = float((mask.sum(1) * centres).sum() / mask.sum())
            assert x_seen - tol <= cx <= x_seen + w + tol and y - tol <= cy <= y + h + tol, (name, flip)
            # 1 well inside the face box, 0 beyond its feather.
            inside_x = (centres > x_seen + tol) & (centres < x_seen + w - tol)
            inside_y = (centres > y + tol) & (centres < y + h - tol)
            assert inside_x.any() and inside_y.any() and (mask[inside_y][:, inside_x] == 1).all()
            reach = FEATHER * max(w, h) + tol
            assert (mask[:, (centres < x_seen - reach) | (centres > x_seen + w + reach)] == 0).all()
            assert (mask[(centres < y - reach) | (centres > y + h + reach)] == 0).all()
        assert set(masks) == {False, True}
        assert torch.equal(masks[True], masks[False].flip(-1))  # exactly mirrored, as the pixels are


def test_a_photo_without_a_face_trains_on_the_center_crop_and_an_even_loss(dataset):
    i = index_of(dataset, "faceless")
    assert dataset.faces[i].box is None and dataset.crop_key(i) == "center"
    item = dataset[i]
    # Center crop, computed here: 300 x 400 -> 256 x 341, rows 42..298.
    photo = Image.open(dataset.pairs[i].image).resize((256, 341), Image.Resampling.BICUBIC).crop((0, 42, 256, 298))
    want = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(item["pixel_values"], want)
    assert not item["face_mask"].any()
    torch.testing.assert_close(face_loss_weights(item["face_mask"][None], 1.0, 0.3), torch.ones(1, 1, 32, 32))


@pytest.mark.filterwarnings("ignore:No face found")
def test_scale_jitter_varies_the_square_but_never_cuts_the_face(canvases, tiny_tokenizer, tmp_path):
    dm = face_data(canvases[0], tiny_tokenizer, tmp_path, face_scale_jitter=0.4)
    dataset = dm.train_dataset
    assert not dataset.cacheable  # so the data module encodes these crops live
    i, (ex, ey, ew, eh) = index_of(dataset, "tall_low"), canvases[1]["tall_low"]
    face, tol = dataset.faces[i], REL * ew
    sides = set()
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        left, top, side, _ = dataset.window(i, (face.width, face.height), generator).box
        sides.add(round(side))
        assert left <= ex + tol and top <= ey + tol and left + side >= ex + ew - tol and top + side >= ey + eh - tol
        assert left >= 0 and left + side <= face.width + 1e-9 and top >= 0 and top + side <= face.height + 1e-9
        # 2.5 face boxes x [0.6, 1.4], within the face box and the photo.
        assert max(face.box[2:]) - 1e-9 <= side <= min(2.5 * 1.4 * max(face.box[2:]), 474) + 1e-9
    assert len(sides) > 10
    assert dataset.window(i, (face.width, face.height), None).box[2] == pytest.approx(2.5 * max(face.box[2:]))


def test_face_boxes_are_detected_once_and_a_corrupt_entry_again(canvases, tmp_path):
    from datamodules.image_caption_dataset import load_rgb
    from datamodules.latent_cache import file_digest

    images = sorted(canvases[0].glob("*.png"))[:3]
    boxes = FaceBoxes(tmp_path)
    first, report = boxes.find(images, progress=False)
    assert (report.reused, report.encoded) == (0, 3)
    assert first == [boxes.detect(load_rgb(path)) for path in images]  # what is stored is what was found
    again, report = FaceBoxes(tmp_path).find(images, progress=False)
    assert again == first and (report.reused, report.encoded) == (3, 0)
    entry = boxes.entry_path(file_digest(images[1]))
    entry.write_text(entry.read_text()[:-9])  # torn JSON
    with pytest.warns(UserWarning, match="corrupt face box cache entry"):
        third, report = FaceBoxes(tmp_path).find(images, progress=False)
    assert third == first and (report.reused, report.encoded, report.rebuilt) == (2, 1, 1)
    # Another detector is another entry.
    assert FaceBoxes(tmp_path, "ssd").entry_path("d") != boxes.entry_path("d")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"crop": "square"}, "data.crop 'square': choose one of center, random, face"),
        ({"face_margin": -0.1}, "data.face_margin -0.1: give 0 or more"),
        ({"face_scale_jitter": 1.0}, r"data.face_scale_jitter 1.0: give a number in \[0, 1\)"),
        ({"caption_template": "photo of sks man"}, "data.caption_template 'photo of sks man' has no {caption}"),
        ({"caption_dropout": 1.0}, r"data.caption_dropout 1.0: give a probability in \[0, 1\)"),
        ({"center_crop": False, "crop": "face"}, "data.center_crop false .* contradicts data.crop face"),
    ],
)
def test_bad_face_and_caption_settings_fail_when_the_data_module_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        FaceDataModule(**settings)


def test_old_center_crop_false_means_a_random_crop():
    with pytest.warns(UserWarning, match="data.center_crop is deprecated"):
        assert FaceDataModule(center_crop=False).crop == "random"
    assert FaceDataModule(center_crop=True, crop="face").crop == "face"


@pytest.mark.parametrize("settings", [{"face_scale_jitter": 0.1}, {"face_margin": 1.0}])
def test_face_settings_without_a_face_crop_warn(settings):
    with pytest.warns(UserWarning, match="only shape a face crop: data.crop is center, so they are ignored"):
        FaceDataModule(**settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FaceDataModule(crop="face", **settings)  # used there
        FaceDataModule()  # the defaults
    assert not [w for w in caught if "only shape a face crop" in str(w.message)]


def test_bad_loss_weights_fail_before_the_base_model_loads(tmp_path):
    from lightning_modules.lora_diffusion import LoRADiffusion

    for setting in ("face_loss_weight", "background_loss_weight"):
        # No model at that path: the settings are checked first.
        with pytest.raises(ValueError, match=f"model.{setting} 0: give a positive number"):
            LoRADiffusion(str(tmp_path / "no-model"), **{setting: 0})


def test_caption_template_and_dropout(demo_photos, tiny_tokenizer):
    from datamodules.image_caption_dataset import ImageCaptionDataset

    template, p = "photo of sks woman, {caption}", 0.25
    dm = FaceDataModule(
        data_dir=str(demo_photos), resolution=32, random_flip=True, caption_template=template, caption_dropout=p
    )
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    dataset = dm.train_dataset
    templated = ["photo of sks woman, " + pair.caption for pair in dm.pairs]
    assert dm.captions == templated  # what the LoRA metadata counts: the trigger word shows

    def ids(text: str) -> list[int]:
        return tiny_tokenizer(text, padding="max_length", max_length=tiny_tokenizer.model_max_length).input_ids

    for seed in range(12):
        # The documented order of a sample's draws: flip, then dropout, from its seed.
        generator = torch.Generator().manual_seed(seed)
        torch.rand(1, generator=generator)
        dropped = torch.rand(1, generator=generator).item() < p
        item = dataset[(2, seed)]
        assert item["caption"] == ("" if dropped else templated[2])
        assert item["input_ids"].tolist() == ids("" if dropped else templated[2])
    assert dataset[2]["caption"] == templated[2]  # no seed, no dropout
    drops = [dataset.draw(0, seed, None)[2] for seed in range(4000)]
    assert drops == [dataset.draw(0, seed, None)[2] for seed in range(4000)]  # a function of the seed
    assert sum(drops) / len(drops) == pytest.approx(p, abs=0.025)  # binomial sd 0.007
    # Dropout is drawn after the flip: switching it on changes no flip.
    plain = ImageCaptionDataset(dm.pairs, tiny_tokenizer, resolution=32, random_flip=True)
    assert [dataset.draw(0, s, None)[1] for s in range(200)] == [plain.draw(0, s, None)[1] for s in range(200)]


def test_the_model_weighs_the_loss_by_the_served_mask(tiny_sd):
    from lightning_modules.lora_diffusion import LoRADiffusion

    model = LoRADiffusion(str(tiny_sd), face_loss_weight=1.0, background_loss_weight=0.25)
    with torch.no_grad():  # the tiny VAE turns 64 pixels into 32 latent pixels
        assert model.latent_moments(torch.zeros(1, 3, 64, 64))[0].shape[-1] * model.latent_scale_factor == 64
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, :16, :16] = 1  # a face on a quarter of the first image; none on the second
    latents = torch.zeros(2, 4, 32, 32)
    weights = model.batch_loss_weight({"face_mask": mask}, latents)
    mean = 0.25 * 1.0 + 0.75 * 0.25  # by hand: the first image's raw weights average this
    assert weights[0, 0, 0, 0].item() == pytest.approx(1 / mean) and weights[0, 0, -1, -1].item() == pytest.approx(
        0.25 / mean
    )
    torch.testing.assert_close(weights[1], torch.ones(1, 32, 32))
    # A mask at another resolution is resized to the latents' first.
    half = model.batch_loss_weight({"face_mask": mask[:, :, ::2, ::2]}, latents)
    assert half.shape == (2, 1, 32, 32) and half[0, 0, 0, 0] > half[0, 0, -1, -1]
    with pytest.raises(ValueError, match="model.face_loss_weight differs .* no face_mask"):
        model.batch_loss_weight({}, latents)
    assert LoRADiffusion(str(tiny_sd)).batch_loss_weight({}, latents) is None  # equal weights: an even loss


def test_training_crops_picture_shows_box_and_weights(dataset, canvases, monkeypatch):
    from types import SimpleNamespace

    from callbacks.training_crops import BOX_COLOUR, HEADER, TrainingCrops
    from datamodules.epoch_sampler import EpochSampler

    edge = index_of(dataset, "edge")
    # A run seed whose first epoch shows the off-centre "edge" face mirrored: a box or mask not flipped would show.
    run_seed = next(
        seed
        for seed in range(100)
        for i, sample_seed in EpochSampler(len(dataset), seed=seed)
        if i == edge and torch.equal(dataset[(i, sample_seed)]["pixel_values"], dataset.pixels(i, True))
    )
    monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
    tile = 128
    module = SimpleNamespace(hparams={"face_loss_weight": 1.0, "background_loss_weight": 0.25})
    sheet = np.asarray(TrainingCrops(num_photos=len(dataset), tile_size=tile).sheet(dataset, module)).astype(float)
    dimmed = 0
    for column, (i, seed) in enumerate(EpochSampler(len(dataset), seed=run_seed)):  # rank 0's first samples
        name = dataset.pairs[i].image.stem
        crop = sheet[HEADER : HEADER + tile, column * tile : (column + 1) * tile].copy()
        crop[:, 0] = np.nan  # the grey line between columns
        served = dataset[(i, seed)]["pixel_values"]
        plain = Image.fromarray(((served.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
        plain = np.asarray(plain.resize((tile, tile), Image.Resampling.LANCZOS)).astype(float)
        if name == "faceless":
            assert np.nanmax(np.abs(crop - plain)) <= 1  # no box, no dimming
            continue
        face = dataset.faces[i]
        x, y, w, h = in_square(dataset.window(i, (face.width, face.height), None), canvases[1][name])
        if torch.equal(served, dataset.pixels(i, True)):
            x = RES - x - w
        green = np.argwhere(np.abs(crop - BOX_COLOUR).max(axis=-1) < 2)
        scale, tol = tile / RES, (REL * w + TOL) * tile / RES
        assert np.allclose(green.min(0)[::-1], (x * scale, y * scale), atol=tol), name
        assert np.allclose(green.max(0)[::-1], ((x + w) * scale, (y + h) * scale), atol=tol + 2), name
        # Away from the face the loss weighs 0.25 of the face: shown at a quarter of the brightness.
        reach = (FEATHER * max(w, h) + REL * w + TOL) * scale
        cols = np.arange(tile)
        far = (cols < x * scale - reach - 2) | (cols > (x + w) * scale + reach + 2)
        if far.sum() >= 4:
            far[0] = False
            assert crop[:, far].sum() / plain[:, far].sum() == pytest.approx(0.25, abs=0.03), name
            dimmed += 1
    assert dimmed >= 3


@pytest.mark.slow
def test_a_face_weighted_fit_writes_the_training_crops(demo_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.training_crops import FILE_NAME, HEADER, LABEL
    from train import main

    cli = main(
        demo_cli(
            "fit",
            tmp_path,
            "--data.crop=face",
            "--model.face_loss_weight=3.0",
            "--model.background_loss_weight=1.0",
            "--trainer.max_steps=2",
            "--validation.baseline=false",
            "--validation.every_n_steps=0",
            "--validation.at_end=false",
            "--export.on_checkpoint=false",
        )
    )
    dataset = cli.datamodule.train_dataset
    assert dataset.crop == "face" and dataset.face_mask and all(face.box for face in dataset.faces)
    assert dataset.latents is not None  # face crops without jitter train from cached latents
    item = dataset[(0, 5)]
    # demo_cli trains on 32 px photos: latents of 16².
    assert "latent_mean" in item and item["face_mask"].shape == (1, 16, 16) and item["face_mask"].max() == 1
    run_dir = cli.trainer.log_dir
    picture = Image.open(f"{run_dir}/{FILE_NAME}")
    assert picture.size == (4 * 256, HEADER + 256 + LABEL)
    events = EventAccumulator(run_dir, size_guidance={"images": 0})
    events.Reload()
    assert "train/crops" in events.Tags()["images"]
