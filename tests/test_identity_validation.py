"""The validation callback in real runs: TensorBoard scalars and images, unchanged training, test and predict."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.prompt_grid import ROW_HEIGHT
from datamodules.folder_scan import load_pairs
from lightning_modules.lora_diffusion import LoRADiffusion
from metrics.clip_score import ClipScore
from metrics.face_model import FaceModel
from metrics.identity_scorer import IdentityScores
from stable_diffusion.tiny_sd import save_tiny_clip
from train import main


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def args(demo_cli, tiny_clip):
    def build(subcommand, log_dir, *extra):
        return demo_cli(subcommand, log_dir, f"--validation.clip_model={tiny_clip}", *extra)

    return build


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def scalar(acc: EventAccumulator, tag: str, step: int) -> float:
    return next(e.value for e in acc.Scalars(tag) if e.step == step)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def test_fit_logs_metrics_and_images_without_changing_training(args, demo_photos, tmp_path):
    common = ["--trainer.max_steps=6", "--trainer.log_every_n_steps=1", "--model.lora_dropout=0.2"]
    common += ["--checkpoint.every_n_train_steps=100", "--export.on_checkpoint=false"]
    watched = main(args("fit", tmp_path / "a", *common, "--validation.every_n_steps=2"))
    plain = main(
        args(
            "fit",
            tmp_path / "b",
            *common,
            "--validation.every_n_steps=0",
            "--validation.baseline=false",
            "--validation.at_end=false",
        )
    )
    run = Path(watched.trainer.log_dir)
    acc = events(run)
    # Baseline at step 0, then every 2 steps; the last step (6) is one of them, so no extra end validation.
    assert steps(acc, "val/faceless_count") == [0, 2, 4, 6]
    assert steps(acc, "val/faceless_rate") == [0, 2, 4, 6]
    assert steps(acc, "val/seconds") == [0, 2, 4, 6]
    # No face is no match: the match rate is defined (0), unlike the face distance.
    assert [(e.step, e.value) for e in acc.Scalars("val/identity_match_rate")] == [(s, 0.0) for s in (0, 2, 4, 6)]
    # The random tiny model draws no face: face distance and CLIP score are undefined, so not logged (not 0).
    assert not {"val/face_distance", "val/clip_score", "val/rubric_points"} & set(acc.Tags()["scalars"])
    assert all(e.value == 3 for e in acc.Scalars("val/faceless_count"))  # 3 prompts during fit
    # The training photos against themselves: a real face distance from the offline face stack.
    reference = acc.Scalars("reference/face_distance")
    assert len(reference) == 1 and 0 < reference[0].value < 0.5
    assert [e.value for e in acc.Scalars("reference/identity_match_rate")] == [1.0]  # every photo is the person
    images = acc.Images("val/images")
    assert [e.step for e in images] == [0, 2, 4, 6]
    assert images[0].height == 3 * ROW_HEIGHT  # one row per prompt
    assert sorted(p.name for p in (run / "validation" / "step000004").glob("*.png")) == [
        "grid.png",
        *(f"valid_image_{i}.png" for i in range(3)),
    ]
    prompts = (demo_photos.parent / "validation_prompts.txt").read_text().splitlines()
    assert Image.open(run / "validation/step000004/valid_image_1.png").text["prompt"] == prompts[1]
    # Each validation's scores.json, scores.csv and grid.png beside its images (issue #11).
    step_dir = run / "validation" / "step000004"
    document = json.loads((step_dir / "scores.json").read_text(encoding="utf-8"))
    assert (document["images"], document["faceless_count"], document["face_distance"]) == (3, 3, None)
    assert document["identity_match_rate"] == 0.0 and document["settings"]["scored"]["step"] == 4
    assert document["settings"]["photos"] == str(demo_photos)
    rows = read_csv(step_dir / "scores.csv")
    assert [(r["file"], r["prompt"], r["verdict"]) for r in rows] == [
        (f"valid_image_{i}.png", prompts[i], "no face") for i in range(3)
    ]
    assert Image.open(step_dir / "grid.png").height == 3 * ROW_HEIGHT
    # val/seconds is the whole validation: generating, then each scoring stage (issue #11).
    for step in (0, 2, 4, 6):
        parts = [scalar(acc, f"val/seconds_{part}", step) for part in ("generate", "face", "clip")]
        assert scalar(acc, "val/seconds", step) >= sum(parts) and parts[0] > 0 and parts[1] > 0
    assert document["seconds"]["total"] == pytest.approx(scalar(acc, "val/seconds", 4), abs=1e-3)
    # Validation changed nothing in training: same losses, same LoRA weights (dropout on, so modes matter).
    losses_a = [e.value for e in acc.Scalars("train/loss")]
    losses_b = [e.value for e in events(Path(plain.trainer.log_dir)).Scalars("train/loss")]
    assert len(losses_a) == 6 and losses_a == losses_b
    for (name, a), b in zip(watched.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Every module's train/eval mode was restored (LoRA layers train; the frozen VAE stays in eval).
    assert [m.training for m in watched.model.modules()] == [m.training for m in plain.model.modules()]
    assert any(m.training for m in watched.model.modules()) and not watched.model.vae.training


def photo_generator(photos: Path):
    """Stand-in for generation that returns real photos of the person (and a blank image for prompt 2)."""
    pairs = load_pairs(photos)

    def generate(self, prompts, seeds):
        return [
            Image.new("RGB", (64, 64), "white")
            if seed % 4 == 2
            else Image.open(pairs[seed % len(pairs)].image).convert("RGB")
            for seed in seeds
        ]

    return generate, pairs


def test_validate_scores_like_the_hw_formula(args, demo_photos, tiny_clip, tmp_path, monkeypatch, caplog):
    generate, pairs = photo_generator(demo_photos)
    monkeypatch.setattr(LoRADiffusion, "generate", generate)
    with (
        caplog.at_level(logging.INFO),
        pytest.warns(UserWarning, match="validate without --ckpt_path: this is the base"),
    ):
        cli = main(args("validate", tmp_path))
    # validate scores the prompts fit validates with (data.num_validation_prompts: 3 of the demo's 4).
    prompts = (demo_photos.parent / "validation_prompts.txt").read_text().splitlines()[:3]
    images = generate(None, prompts, list(range(len(prompts))))
    # Independent computation of the HW formulas from the face model's raw embeddings.
    face_model = FaceModel()
    generated = face_model.embed(images)
    reference = [e for e in face_model.embed([Image.open(p.image).convert("RGB") for p in pairs]) if e is not None]
    with_face = [e for e in generated if e is not None]
    norm = lambda v: np.asarray(v, dtype=np.float64) / np.linalg.norm(v)  # noqa: E731
    expected_distance = np.mean([np.linalg.norm(norm(g) - norm(r)) for g in with_face for r in reference])
    clip = ClipScore(tiny_clip)
    faced = [i for i, e in enumerate(generated) if e is not None]
    expected_clip = float(clip.scores([images[i] for i in faced], [prompts[i] for i in faced]).mean())
    assert len(with_face) == len(prompts) - 1  # the blank image has no face
    # The person or not: each face's mean distance to the training faces within deepface's own Dlib threshold.
    from deepface.config.threshold import thresholds

    threshold = thresholds["Dlib"]["euclidean_l2"]
    matches = sum(np.mean([np.linalg.norm(norm(g) - norm(r)) for r in reference]) <= threshold for g in with_face)
    assert matches == len(with_face)  # real photos of the person, all of them

    acc = events(Path(cli.trainer.log_dir))
    # Its own tags and folder: a checkpoint validated into its run leaves fit's val/* curves and validation/ as is.
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("val/")]
    logged = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"] if tag.startswith("validate/")}
    assert logged["validate/face_distance"] == pytest.approx(expected_distance, rel=1e-5)
    assert logged["validate/clip_score"] == pytest.approx(expected_clip, rel=1e-4, abs=1e-4)
    assert logged["validate/faceless_count"] == 1
    assert logged["validate/faceless_rate"] == pytest.approx(1 / len(prompts))
    assert logged["validate/identity_match_rate"] == pytest.approx(matches / len(prompts))  # faceless: not him
    # Dlib is not the rubric's model: no points logged, and the summary says why.
    assert "validate/rubric_points" not in logged
    assert "rubric n/a: rubric needs GhostFaceNet, not Dlib" in caplog.text
    assert f"the person in {matches}/{len(prompts)} (Dlib euclidean_l2 distance <= {threshold:.3f})" in caplog.text
    # scores.csv: each image's own distance and CLIP score; the faced rows average to the logged numbers.
    assert not (Path(cli.trainer.log_dir) / "validation").exists()
    rows = read_csv(Path(cli.trainer.log_dir) / "validate" / "step000000" / "scores.csv")
    per_image = clip.scores([images[i] for i in faced], [prompts[i] for i in faced]).tolist()
    assert [r["face_found"] == "true" for r in rows] == [e is not None for e in generated]
    assert [float(rows[i]["clip_score"]) for i in faced] == pytest.approx(per_image, rel=1e-6, abs=1e-6)
    expected_each = [np.mean([np.linalg.norm(norm(generated[i]) - norm(r)) for r in reference]) for i in faced]
    assert [float(rows[i]["distance"]) for i in faced] == pytest.approx(expected_each, rel=1e-6)
    assert np.mean([float(rows[i]["clip_score"]) for i in faced]) == pytest.approx(
        logged["validate/clip_score"], abs=1e-4
    )
    assert [r["verdict"] for r in rows].count("no face") == logged["validate/faceless_count"]


def test_best_identity_checkpoint(args, demo_photos, tiny_clip, tmp_path, monkeypatch):
    generate, _ = photo_generator(demo_photos)
    monkeypatch.setattr(LoRADiffusion, "generate", generate)
    extra = ["--trainer.max_steps=2", "--validation.every_n_steps=1", "--export.on_checkpoint=false"]
    # A random CLIP scores near 0: lower the CLIP floor so the floors pass; faceless 1 of 3 prompts > 20%.
    cli = main(args("fit", tmp_path / "strict", *extra, "--validation.min_clip_score=-1000"))
    assert not (Path(cli.trainer.log_dir) / "checkpoints" / "best_identity.ckpt").exists()
    cli = main(
        args(
            "fit",
            tmp_path / "loose",
            *extra,
            "--validation.min_clip_score=-1000",
            "--validation.max_faceless_fraction=0.34",
            "--validation.best_by=identity_match_rate",
        )
    )
    best = Path(cli.trainer.log_dir) / "checkpoints" / "best_identity.ckpt"
    saved = torch.load(best, weights_only=True)
    # Identical photos at every step: the first validation (step 0) stays the best.
    assert saved["global_step"] == 0
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("IdentityValidation"))
    assert math.isfinite(state["best_face_distance"])
    assert state["best_identity_match_rate"] == pytest.approx(2 / 3)  # 2 photos of the person, 1 blank image


def _scores(
    face_distance: float, matched: int, faceless: int = 0, images: int = 4, clip_score: float = 30.0
) -> IdentityScores:
    distances = [None] * faceless + [0.1] * matched + [0.9] * (images - faceless - matched)
    return IdentityScores(
        face_distance=face_distance,
        clip_score=clip_score,
        faceless_count=faceless,
        images=images,
        distances=distances,
        matches=[d is not None and d < 0.5 for d in distances],
        identity_match_rate=matched / images,
        threshold=0.5,
        face_model="Dlib",
    )


@pytest.mark.parametrize(
    ("best_by", "expected"),
    [
        # (face distance, matching images) per validation; which ones become the best in turn.
        ("face_distance", [True, True, False, False, False]),
        ("identity_match_rate", [True, False, True, True, False]),
    ],
)
def test_best_by_ranks_validations(best_by: str, expected: list[bool]) -> None:
    from callbacks.identity_validation import IdentityValidation

    callback = IdentityValidation(best_by=best_by)
    validations = [
        _scores(0.40, matched=2),
        _scores(0.30, matched=1),  # closer on average, fewer images of the person
        _scores(0.35, matched=3),  # more images of the person
        _scores(0.33, matched=3),  # as many, and closer: the tie goes to the face distance
        _scores(0.20, matched=4, clip_score=21.0),  # the best numbers, but below the CLIP floor (22)
    ]
    seen = []
    for scores in validations:
        better = callback.is_better(scores)
        if better:  # as _report does
            callback.best_face_distance = scores.face_distance
            callback.best_identity_match_rate = scores.identity_match_rate
        seen.append(better)
    assert seen == expected
    with pytest.raises(ValueError, match="best_by"):
        IdentityValidation(best_by="clip_score")


def test_grid_shows_each_verdict_under_its_image() -> None:
    from callbacks.prompt_grid import LABEL, MATCH_COLOUR, NO_MATCH_COLOUR, ROW, prompt_grid

    scores = _scores(0.5, matched=1, faceless=1, images=3)  # faceless, the person, not the person
    images = [Image.new("RGB", (64, 64), c) for c in ("black", "gray", "white")]
    grid = np.asarray(prompt_grid(images, ["a", "b", "c"], scores.labels(), scores.matches))
    assert grid.shape[0] == 3 * (ROW + LABEL)
    for row, match in enumerate(scores.matches):
        strip = grid[row * (ROW + LABEL) + ROW : (row + 1) * (ROW + LABEL), :ROW].reshape(-1, 3)
        colours, counts = np.unique(strip, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == (MATCH_COLOUR if match else NO_MATCH_COLOUR)
        assert (strip == 255).all(axis=1).any()  # white label text drawn on the strip


def test_test_and_predict_write_their_files(args, demo_photos, tmp_path, capsys, caplog):
    fit = main(args("fit", tmp_path, "--trainer.max_steps=1", "--validation.baseline=false"))
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    prompts = (demo_photos.parent / "validation_prompts.txt").read_text().splitlines()
    run = Path(fit.trainer.log_dir)
    config = (run / "config.yaml").read_text()
    test = main(args("test", tmp_path, f"--ckpt_path={ckpt}"))
    # Beside the run it scored (issue #10): no new version_N, the training config.yaml untouched.
    assert Path(test.trainer.log_dir) == run and (run / "config.yaml").read_text() == config
    assert (run / "config_test.yaml").is_file() and sorted(p.name for p in run.parent.iterdir()) == [run.name]
    test_dir = run / "test" / "step000001"  # the checkpoint's step
    acc = events(run)
    assert steps(acc, "test/faceless_count") == [1]  # logged at the checkpoint's step
    assert acc.Scalars("test/seconds")[0].value > 0
    images = sorted(f"valid_image_{i}.png" for i in range(len(prompts)))
    assert sorted(p.name for p in test_dir.glob("valid_image_*.png")) == images
    assert {"scores.json", "scores.csv", "grid.png"} <= {p.name for p in test_dir.iterdir()}  # as validation does
    assert json.loads((test_dir / "scores.json").read_text())["settings"]["scored"]["stage"] == "test"
    # Each test image says how it was made, as predict's do.
    made = Image.open(test_dir / "valid_image_0.png").text
    assert made["prompt"] == prompts[0] and made["global_step"] == "1" and made["stage"] == "test"
    assert made["num_inference_steps"] == "4" and made["base_model"] == test.model.hparams.pretrained_model_name_or_path
    out = tmp_path / "predicted"
    out.mkdir()
    from callbacks.image_writer import checkpoint_id
    from callbacks.prompt_grid import save_png

    predict = [
        "predict",
        tmp_path,
        f"--ckpt_path={ckpt}",
        "--data.predict_prompts=[a photo of eileen, eileen on the moon]",
        "--data.images_per_prompt=2",
        f"--predict_writer.output_dir={out}",
        f"--data.data_dir={tmp_path / 'no-photos-needed'}",  # predict does not read the training photos
    ]
    # Another checkpoint's predicted image is refused, not deleted or overwritten; a user's own 002_01.png is left.
    save_png(out / "002_00.png", Image.new("RGB", (8, 8)), {"prompt": "old", "global_step": 7})
    Image.new("RGB", (8, 8)).save(out / "002_01.png")
    with pytest.raises(SystemExit) as info:
        main(args(*predict))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds 1 image(s) predicted with another checkpoint" in err, err
    assert "(002_00.png)" in err and sorted(f.name for f in out.glob("*.png")) == ["002_00.png", "002_01.png"]
    # The same file at another step (a last.ckpt a longer run overwrote) is another checkpoint too.
    earlier = {"prompt": "old", "global_step": 7, "checkpoint_id": checkpoint_id(ckpt)}
    save_png(out / "002_00.png", Image.new("RGB", (8, 8)), earlier)
    with pytest.raises(SystemExit) as info:
        main(args(*predict))
    assert info.value.code == 2 and "(002_00.png)" in capsys.readouterr().err
    # An earlier predict of this checkpoint with more images left 002_00.png: it goes, and the log says so.
    save_png(
        out / "002_00.png",
        Image.new("RGB", (8, 8)),
        {"prompt": "old", "global_step": 1, "checkpoint_id": checkpoint_id(ckpt)},
    )
    with caplog.at_level(logging.INFO):
        main(args(*predict))
    assert f"Removed 1 image(s) of an earlier predict of this checkpoint from {out}" in caplog.text
    assert sorted(f.name for f in out.glob("*.png")) == ["000_00.png", "000_01.png", "001_00.png", "001_01.png",
                                                        "002_01.png"]  # fmt: skip
    (out / "002_01.png").unlink()
    files = sorted(out.glob("*.png"))
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # predict made no run folder either
    meta = [Image.open(f).text for f in files]
    assert [m["prompt"] for m in meta] == ["a photo of eileen"] * 2 + ["eileen on the moon"] * 2
    assert len({m["seed"] for m in meta}) == 4  # each image its own seed
    # The seed in the metadata regenerates the image. Alone (batch 1, not predict's batch of 4) the float sums
    # run in another order, so pixels may move by rounding (a grey level or two), never in content.
    model = LoRADiffusion.load_from_checkpoint(ckpt, map_location="cpu")
    written = [pixels(Image.open(f)) for f in files]
    alone = pixels(model.generate([meta[3]["prompt"]], [int(meta[3]["seed"])])[0])
    assert np.abs(alone - written[3]).max() <= GREY_LEVELS
    # The tolerance still tells images apart: another seed of the same prompt is far outside it.
    assert np.abs(written[2] - written[3]).max() > 10 * GREY_LEVELS
    # Like with like (same batch, same machine): bit for bit.
    batch = model.generate([m["prompt"] for m in meta], [int(m["seed"]) for m in meta])
    for image, want in zip(batch, written, strict=True):
        assert np.array_equal(pixels(image), want)


GREY_LEVELS = 2  # rounding across batch shapes, CPUs and thread counts (issue #8)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_reference_scores_see_photos_as_training_does(demo_photos, tmp_path, monkeypatch):
    """EXIF-rotated and 16-bit photos reach the reference scores upright and scaled, as the training loader has them."""
    from types import SimpleNamespace

    from callbacks.identity_validation import IdentityValidation
    from datamodules.folder_scan import Pair
    from datamodules.image_caption_dataset import load_rgb

    tall = Image.new("RGB", (40, 80), "red")
    tall.paste((0, 0, 255), (0, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    tall.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(tmp_path / "deep.png")
    callback = IdentityValidation()
    callback._pairs = [Pair(tmp_path / "rotated.jpg", "a"), Pair(tmp_path / "deep.png", "b")]
    seen = []
    scores = SimpleNamespace(as_metrics=lambda stage: {}, summary=lambda: "")
    callback.scorer = SimpleNamespace(score=lambda images, captions: seen.extend(images) or scores)
    callback._log_reference(SimpleNamespace(loggers=[]))
    for image, pair in zip(seen, callback._pairs, strict=True):
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(load_rgb(pair.image)))
    assert seen[0].size == (40, 80)  # upright
    assert len(np.unique(np.asarray(seen[1]))) > 100  # 16-bit greys scaled, not clipped to black and white


def test_fit_time_validation_runs_in_the_trainers_precision(args, tmp_path, monkeypatch):
    """Validation inside fit generates as `test` does: under the trainer's bf16 autocast, not in float32 (twice as
    slow on a GPU, and other pixels than `likeness test` of the same checkpoint gives).

    Lightning wraps only the *_step hooks in the precision context; the callback generates outside them.
    """
    import lightning_modules.lora_diffusion as lora_diffusion

    seen = []
    original = lora_diffusion.generate_images

    def recording(base, unet, *rest):
        lora = next(m for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), lora.cast_input_dtype_enabled))
        return original(base, unet, *rest)

    monkeypatch.setattr(lora_diffusion, "generate_images", recording)
    bf16 = "--trainer.precision=bf16-mixed"
    fit = main(args("fit", tmp_path, bf16, "--trainer.max_steps=1", "--validation.baseline=false"))
    assert len(seen) >= 1 and all(s == (True, torch.bfloat16, False) for s in seen), seen
    # Lightning's own path (test_step inside its precision context) generates the same way: the reference.
    seen.clear()
    main(args("test", tmp_path, bf16, f"--ckpt_path={Path(fit.trainer.log_dir) / 'checkpoints' / 'last.ckpt'}"))
    assert len(seen) >= 1 and all(s == (True, torch.bfloat16, False) for s in seen), seen
    # Outside generation peft's input casts are back on (needed without autocast).
    lora = next(m for m in fit.model.unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
    assert lora.cast_input_dtype_enabled
