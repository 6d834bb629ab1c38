"""``likeness score``: a folder of real faces against an independent recomputation, a checkpoint and its exported
LoRA through diffusers' own loader, and bad input stopped with one line before anything is written.

Faces: crops of scikit-image's astronaut photo (Eileen Collins, NASA, public domain) and strangers from
``skimage.data.lfw_subset()``; the offline face stack (deepface's Dlib model and dlib detector).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from public_faces import lfw_faces
from skimage import data

from likeness_command import cli
from stable_diffusion.tiny_sd import save_tiny_clip
from train import main as train_main

PROMPTS = [  # short: the tiny CLIP reads 32 characters
    "eileen smiling",
    "eileen, mirrored",
    "eileen, half size",
    "eileen in grey",
    "a stranger",
    "another stranger",
    "a third stranger",
    "an empty white wall",
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``likeness score ARGV`` through the console entry; (exit code, stdout, stderr)."""
    try:
        cli(["score", *map(str, argv)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> SimpleNamespace:
    """A photo folder (one astronaut portrait and its caption), 8 images to score and their prompt file."""
    root = tmp_path_factory.mktemp("faces")
    photo = Image.fromarray(data.astronaut())
    (root / "photos").mkdir()
    photo.crop((118, 19, 328, 229)).save(root / "photos" / "eileen.jpg", quality=95)
    (root / "photos" / "eileen.txt").write_text("a portrait photo of eileen\n", encoding="utf-8")
    face = photo.crop((150, 50, 300, 200))
    images = [
        face,
        ImageOps.mirror(face),
        photo.resize((256, 256), Image.Resampling.LANCZOS),
        ImageOps.grayscale(photo.crop((60, 0, 390, 330))).convert("RGB"),
        *lfw_faces(3),
        Image.new("RGB", (96, 96), "white"),  # no face
    ]
    # img10 after img7: natural order, not the string order that would put it second.
    names = [f"img{i}.png" for i in (1, 2, 3, 4, 5, 6, 7, 10)]
    (root / "images").mkdir()
    for name, image in zip(names, images, strict=True):
        image.save(root / "images" / name)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return SimpleNamespace(root=root, photos=root / "photos", images=root / "images", names=names)


def _deepface_embedding(image: Image.Image, keep_faceless: bool = False) -> np.ndarray | None:
    """deepface itself, on the pixels, as the HW called it: no face, or confidence 0, is no face."""
    from deepface import DeepFace

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    found = DeepFace.represent(bgr, model_name="Dlib", detector_backend="dlib", enforce_detection=False)
    if not found or (found[0]["face_confidence"] == 0 and not keep_faceless):
        return None
    return np.asarray(found[0]["embedding"], dtype=np.float64)


def _hw_clip(folder: Path, image: Image.Image, prompt: str) -> float:
    """The HW's CLIP score: transformers' CLIPModel on its own processor and tokenizer, ``logits_per_image``."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    model = CLIPModel.from_pretrained(folder).eval()
    inputs = CLIPTokenizer.from_pretrained(folder)(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, **Processor.from_pretrained(folder)(images=image, return_tensors="pt"))
    return out.logits_per_image.item()  # the tiny CLIP's logit scale is 100, as the HW's


def test_score_images_reproduces_an_independent_recomputation(faces, tiny_clip, tmp_path, capsys):
    code, out, err = run(
        capsys, "--images", faces.images, "--photos", faces.photos, "--prompts", faces.root / "prompts.txt",
        "--clip-model", tiny_clip, "--cache-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    document = json.loads((faces.images / "scores.json").read_text(encoding="utf-8"))
    with open(faces.images / "scores.csv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))

    # The four numbers again, from deepface, numpy and transformers directly.
    from deepface.modules.verification import find_threshold

    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    reference = unit(_deepface_embedding(Image.open(faces.photos / "eileen.jpg"), keep_faceless=True))
    images = [Image.open(faces.images / name).convert("RGB") for name in faces.names]
    embeddings = [_deepface_embedding(image) for image in images]
    distances = [None if e is None else float(np.linalg.norm(unit(e) - reference)) for e in embeddings]
    threshold = find_threshold("Dlib", "euclidean_l2")
    person = [d is not None and d <= threshold for d in distances]
    faced = [i for i, d in enumerate(distances) if d is not None]
    clips = {i: _hw_clip(tiny_clip, images[i], PROMPTS[i]) for i in faced}
    # The data tests both verdicts and a faceless image.
    assert 0 < sum(person) < len(faced) < len(images)

    assert document["face_distance"] == pytest.approx(np.mean([distances[i] for i in faced]), abs=1e-6)
    assert document["identity_match_rate"] == pytest.approx(sum(person) / len(images), rel=1e-12)
    assert document["clip_score"] == pytest.approx(np.mean(list(clips.values())), abs=1e-4)
    assert document["faceless_count"] == len(images) - len(faced)
    assert (document["images"], document["threshold"], document["face_model"]) == (len(images), threshold, "Dlib")
    assert document["rubric_points"] is None and "needs GhostFaceNet" in document["rubric"]
    settings = document["settings"]
    assert settings["photos"] == str(faces.photos) and settings["clip_model"] == str(tiny_clip)
    assert (settings["face_detector"], settings["scored"]) == ("dlib", {"images": str(faces.images)})

    # One row per image in prompt order, each the recomputed image's, and the rows average to the JSON.
    assert [(r["file"], r["prompt"]) for r in rows] == list(zip(faces.names, PROMPTS, strict=True))
    for i, row in enumerate(rows):
        assert row["face_found"] == ("true" if i in faced else "false")
        assert row["verdict"] == ("no face" if i not in faced else "the person" if person[i] else "not the person")
        if i in faced:
            assert float(row["distance"]) == pytest.approx(distances[i], abs=1e-6)
            assert float(row["clip_score"]) == pytest.approx(clips[i], abs=1e-4)
        else:
            assert row["distance"] == row["clip_score"] == ""
    found = [r for r in rows if r["face_found"] == "true"]
    assert math.fsum(float(r["distance"]) for r in found) / len(found) == pytest.approx(document["face_distance"])
    assert math.fsum(float(r["clip_score"]) for r in found) / len(found) == pytest.approx(document["clip_score"])
    assert sum(r["verdict"] == "the person" for r in rows) / len(rows) == document["identity_match_rate"]
    assert sum(r["face_found"] == "false" for r in rows) == document["faceless_count"]

    assert Image.open(faces.images / "grid.png").height > len(images) * 256  # one captioned row per image
    summary = out.splitlines()[0]
    assert f"face distance {document['face_distance']:.4f}" in summary
    assert (
        f"the person in {sum(person)}/{len(images)}" in summary and f"faceless {len(images) - len(faced)}/" in summary
    )
    assert str(faces.images / "scores.json") in out and str(faces.images / "scores.csv") in out


TWO_PROMPTS = ["a photo of eileen smiling", "eileen in front of a flag"]


@pytest.fixture(scope="module")
def trained(demo_cli, tmp_path_factory) -> Path:
    """A 2-step run of configs/demo.yaml; a large learning rate so the LoRA clearly changes the images.

    Two validation prompts and 4 sampler steps: on a 2-core CPU each tiny image still takes about a second.
    """
    root = tmp_path_factory.mktemp("run")
    (root / "prompts.txt").write_text("\n".join(TWO_PROMPTS) + "\n", encoding="utf-8")
    cli_run = train_main(
        demo_cli(
            "fit", root, "--trainer.max_steps=2", "--model.optimizer.init_args.lr=0.05", "--model.lr_warmup_steps=0",
            "--model.num_inference_steps=4", "--model.image_size=null",  # the native 64 px, as `score --lora` draws
            "--data.resolution=64",  # trained at it too: 2 steps then change the images clearly
            f"--data.validation_prompts={root / 'prompts.txt'}", "--export.name=me",
            "--validation.baseline=false", "--validation.at_end=false",
        )
    )  # fmt: skip
    return Path(cli_run.trainer.log_dir)


GREY_LEVELS = 2  # rounding across code paths (issue #8)


def _pixels(image: Path | Image.Image) -> np.ndarray:
    image = image if isinstance(image, Image.Image) else Image.open(image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_checkpoint_and_its_exported_lora_give_the_same_images(trained, demo_photos, tiny_sd, tmp_path, capsys):
    ckpt = trained / "checkpoints" / "last.ckpt"
    # The run's photos, prompts and validation settings (no CLIP) come from the checkpoint and its config.yaml.
    code, out, err = run(capsys, "--ckpt", ckpt, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    folder = trained / "checkpoints" / "score" / "last"
    names = [f"valid_image_{i}.png" for i in range(len(TWO_PROMPTS))]
    assert sorted(p.name for p in folder.glob("valid_image_*.png")) == names
    document = json.loads((folder / "scores.json").read_text(encoding="utf-8"))
    assert document["images"] == len(TWO_PROMPTS) and document["settings"]["photos"] == str(demo_photos)
    assert document["settings"]["clip_model"] is None and document["settings"]["scored"]["step"] == 2
    assert document["seconds"]["generate"] > 0 and str(folder / "scores.csv") in out
    with open(folder / "scores.csv", encoding="utf-8", newline="") as file:
        assert [(r["file"], r["prompt"]) for r in csv.DictReader(file)] == list(zip(names, TWO_PROMPTS, strict=True))
    from_ckpt = [_pixels(folder / name) for name in names]
    assert [Image.open(folder / n).text["seed"] for n in names] == ["0", "1"]  # generation_seed + prompt number

    # The base model alone, same prompts and seeds: the LoRA must change the images, or a match proves nothing.
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    generators = [torch.Generator().manual_seed(i) for i in range(len(TWO_PROMPTS))]
    base = plain(TWO_PROMPTS, num_inference_steps=4, generator=generators, height=64, width=64).images
    assert max(np.abs(_pixels(b) - c).max() for b, c in zip(base, from_ckpt, strict=True)) > 10 * GREY_LEVELS

    # The exported kohya file, and the folder (its diffusers file), through diffusers' own loader.
    prompts = trained.parents[1] / "prompts.txt"  # the run folder is <root>/demo/version_0
    for lora in (trained / "lora" / "final" / "me-step000002.safetensors", trained / "lora" / "final"):
        out_dir = tmp_path / lora.name
        code, _, err = run(
            capsys, "--lora", lora, "--base", tiny_sd, "--photos", demo_photos, "--prompts", prompts, "--steps", 4,
            "--clip-model", "none", "--out", out_dir, "--cache-dir", tmp_path / "cache",
        )  # fmt: skip
        assert code == 0, err
        for name, want in zip(names, from_ckpt, strict=True):
            assert np.abs(_pixels(out_dir / name) - want).max() <= GREY_LEVELS, (lora.name, name)
        assert json.loads((out_dir / "scores.json").read_text())["settings"]["scored"]["lora"].endswith(".safetensors")


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("count", "has 2 images but --prompts"),
        ("no_photos", "--photos"),
        ("two_sources", "argument --ckpt: not allowed with argument --images"),
        ("other_prompt", "was generated from the prompt 'a cat'"),
        ("lora_without_base", "--lora needs --base"),
        ("junk_lora", "not a readable safetensors file"),
        ("lora_base_gone", "gone-sd: no such file or folder; give a diffusers folder"),
        ("ckpt_base_gone", "the run's base model /moved/sd: no such file or folder; pass --base with where"),
        ("out_is_photos", "is the photo folder (--photos); the files scoring writes would break training"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, says, faces, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), "white").save(images / f"img{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n" if case == "count" else "one\ntwo\n", encoding="utf-8")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    common = ["--photos", faces.photos, "--prompts", prompts, "--cache-dir", tmp_path / "cache"]
    argv = {
        "count": ["--images", images, *common],
        "no_photos": ["--images", images, *common[2:], "--photos", tmp_path / "nowhere"],
        "two_sources": ["--images", images, "--ckpt", tmp_path / "x.ckpt", *common],
        "other_prompt": ["--images", images, *common],
        "lora_without_base": ["--lora", junk, *common, "--out", tmp_path / "out"],
        "junk_lora": ["--lora", junk, "--base", "any/model", *common, "--out", tmp_path / "out"],
        "lora_base_gone": ["--lora", junk, "--base", tmp_path / "gone-sd", *common, "--out", tmp_path / "out"],
        "ckpt_base_gone": ["--ckpt", tmp_path / "run.ckpt", *common, "--out", tmp_path / "out"],
        "out_is_photos": ["--images", images, *common, "--out", faces.photos],
    }[case]
    # A checkpoint of a run whose base model has moved since (read_checkpoint's minimum: hparams and LoRA tensors).
    torch.save(
        {"hyper_parameters": {"pretrained_model_name_or_path": "/moved/sd"}, "state_dict": {}}, tmp_path / "run.ckpt"
    )
    if case == "other_prompt":  # our own images carry their prompt: a wrong prompt file is caught
        from callbacks.prompt_grid import save_images

        (images / "img0.png").unlink(), (images / "img1.png").unlink()
        save_images(images, [Image.new("RGB", (32, 32))] * 2, ["one", "a cat"])
    before = sorted(p.name for p in [*tmp_path.rglob("*"), *Path(faces.photos).iterdir()])
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and says in err.splitlines()[0], err
    assert "Traceback" not in err and "usage:" not in err and len(err.splitlines()) <= 2 and not out
    assert sorted(p.name for p in [*tmp_path.rglob("*"), *Path(faces.photos).iterdir()]) == before  # nothing written


def test_image_names_map_to_prompt_lines(tmp_path):
    """The HW's valid_image_<i>.png is line i+1 whatever the listing order; a gap or a stray image is refused."""
    from metrics.score_inputs import ScoreInputError, image_files

    prompts = [f"prompt {i}" for i in range(11)]
    for i in range(11):
        Image.new("RGB", (8, 8)).save(tmp_path / f"valid_image_{i}.png")
    assert [p.name for p in image_files(tmp_path, prompts, "p.txt")] == [f"valid_image_{i}.png" for i in range(11)]
    (tmp_path / "valid_image_4.png").unlink()
    with pytest.raises(ScoreInputError, match="valid_image_4.png is missing"):
        image_files(tmp_path, prompts[:10], "p.txt")
    (tmp_path / "valid_image_4.png").write_bytes((tmp_path / "valid_image_0.png").read_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "extra.png")
    with pytest.raises(ScoreInputError, match=r"other images beside them \(extra.png\)"):
        image_files(tmp_path, prompts, "p.txt")


def test_a_shorter_run_leaves_no_stale_images_but_keeps_a_users_own(tmp_path):
    from callbacks.prompt_grid import save_images

    save_images(tmp_path, [Image.new("RGB", (8, 8))] * 4, list("abcd"), "score")
    save_images(tmp_path, [Image.new("RGB", (8, 8))] * 2, list("ab"), "score")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["valid_image_0.png", "valid_image_1.png"]
    Image.new("RGB", (8, 8)).save(tmp_path / "valid_image_2.png")  # not written by likeness: no stage in it
    save_images(tmp_path, [Image.new("RGB", (8, 8))], ["a"], "score")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["valid_image_0.png", "valid_image_2.png"]


def test_demo_scoring_sets_tell_the_person_from_strangers(demo_photos, capsys):
    # README's demo ends with these two commands: new pictures of the person are her, strangers are not (#11).
    from datamodules.sample_photos import save_scoring_sets

    sets = save_scoring_sets(demo_photos.parent / "scoring")
    rates = {}
    for name, folder in sets.items():
        code, out, err = run(
            capsys,
            "--images",
            folder,
            "--photos",
            demo_photos,
            "--prompts",
            folder / "prompts.txt",
            "--clip-model",
            "none",
        )
        assert code == 0, err
        rates[name] = json.loads((folder / "scores.json").read_text())["identity_match_rate"]
    assert rates == {"person": 1.0, "strangers": 0.0}


def test_csv_files_are_relative_to_the_csv_folder_also_outside_it(tmp_path, monkeypatch):
    """`likeness score --images DIR --out OTHER` wrote paths relative to the working directory."""
    from metrics.score_files import ScoreFiles

    out, images = tmp_path / "scores", tmp_path / "run" / "test"
    out.mkdir()
    images.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "run")
    files = ScoreFiles(out)
    assert files._relative(out / "valid_image_0.png") == "valid_image_0.png"
    given = Path("test") / "valid_image_0.png"  # as the user typed it, from the working directory
    assert files._relative(given) == "../run/test/valid_image_0.png"
    assert (out / files._relative(given)).resolve() == (images / "valid_image_0.png").resolve()
