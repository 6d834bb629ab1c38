"""A careless or unlucky user's inputs, each built here: one clear message naming the file or setting, exit code 2,
no traceback, and nothing trained or written (issue #8's corpus)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from train import main

ROOT = Path(__file__).resolve().parents[1]


def first_stem(photos: Path) -> str:
    return sorted(p.stem for p in photos.glob("*.txt"))[0]


def image_of(photos: Path, stem: str) -> Path:
    return next(p for p in photos.iterdir() if p.stem == stem and p.suffix != ".txt")


def drop_caption(photos: Path) -> str:
    (photos / f"{first_stem(photos)}.txt").unlink()
    return "image without a caption file"


def drop_image(photos: Path) -> str:
    image_of(photos, first_stem(photos)).unlink()
    return "caption without an image"


def write_caption(data: bytes, expected: str) -> Callable[[Path], str]:
    def make(photos: Path) -> str:
        (photos / f"{first_stem(photos)}.txt").write_bytes(data)
        return expected

    return make


def write_image(make_image: Callable[[Path], None], expected: str) -> Callable[[Path], str]:
    def make(photos: Path) -> str:
        stem = first_stem(photos)
        image_of(photos, stem).unlink()
        make_image(photos / stem)
        return expected

    return make


def truncated(stem: Path) -> None:
    data = Path(stem.with_suffix(".jpg"))
    Image.new("RGB", (300, 300), "red").save(data)
    data.write_bytes(data.read_bytes()[:400])


def as_format(suffix: str) -> Callable[[Path], None]:
    return lambda stem: Image.new("RGB", (64, 64), "red").save(stem.with_suffix(suffix))


def dangling_link(stem: Path) -> None:
    os.symlink(stem.parent / "nowhere.jpg", stem.with_suffix(".jpg"))


def second_caption(photos: Path) -> str:
    stem = first_stem(photos)
    shutil.copy(photos / f"{stem}.txt", photos / f"{stem}.TXT")
    return "a second caption"


def second_image(photos: Path) -> str:
    stem = first_stem(photos)
    Image.new("RGB", (64, 64)).save(photos / f"{stem}.webp")
    return "a second image"


def into_subfolder(photos: Path) -> str:
    (photos / "sub").mkdir()
    for path in list(photos.iterdir()):
        if path.is_file():
            path.rename(photos / "sub" / path.name)
    return "sub-folders .* not read"


def empty_folder(photos: Path) -> str:
    for path in photos.iterdir():
        path.unlink()
    return "no usable image-caption pair"


def missing_folder(photos: Path) -> str:
    shutil.rmtree(photos)
    return "does not exist or is not a folder"


def bomb(photos: Path) -> str:
    Image.MAX_IMAGE_PIXELS = 100  # every photo is now over twice the limit; restored by the test
    return "too large to open safely"


DATA = {
    "missing caption": drop_caption,
    "missing image": drop_image,
    "empty caption": write_caption(b"  \n", "caption is empty"),
    "caption not UTF-8": write_caption(b"caf\xe9 au lait", "not UTF-8"),
    "empty image file": write_image(lambda s: s.with_suffix(".jpg").write_bytes(b""), "image file is empty"),
    "truncated JPEG": write_image(truncated, "image cannot be read"),
    "text named .png": write_image(lambda s: s.with_suffix(".png").write_text("hello"), "image cannot be read"),
    "1x1 photo": write_image(lambda s: Image.new("RGB", (1, 1)).save(s.with_suffix(".png")), "only 1x1 pixels"),
    "GIF": write_image(as_format(".gif"), r"\.gif images are not read"),
    "BMP": write_image(as_format(".bmp"), r"\.bmp images are not read"),
    "TIFF": write_image(as_format(".tiff"), r"\.tiff images are not read"),
    "dangling symlink": write_image(dangling_link, "broken symbolic link"),
    "x.txt and x.TXT": second_caption,
    "x.jpg and x.webp": second_image,
    "photos in a sub-folder": into_subfolder,
    "empty folder": empty_folder,
    "missing folder": missing_folder,
    "decompression bomb": bomb,
}


def prompts_file(content: bytes | None, expected: str) -> Callable[[Path], tuple[list[str], str]]:
    def make(tmp: Path) -> tuple[list[str], str]:
        path = tmp / "prompts.txt"
        if content is not None:
            path.write_bytes(content)
        return [f"--data.validation_prompts={path}"], expected

    return make


def setting(arg: str, expected: str) -> Callable[[Path], tuple[list[str], str]]:
    return lambda tmp: ([arg], expected)


def lora_file(tmp: Path) -> tuple[list[str], str]:
    (tmp / "x.safetensors").write_bytes(b"{}")
    return [f"--ckpt_path={tmp / 'x.safetensors'}"], "is a LoRA file"


SETTINGS = {
    "resolution 0": setting("--data.resolution=0", "data.resolution 0"),
    "resolution 100": setting("--data.resolution=100", "data.resolution 100: give a positive multiple of 8"),
    "batch size 0": setting("--data.batch_size=0", "data.batch_size 0"),
    "negative workers": setting("--data.num_workers=-1", "data.num_workers -1"),
    "0 images per prompt": setting("--data.images_per_prompt=0", "data.images_per_prompt 0"),
    "negative text-encoder lr": setting("--model.text_encoder_lr=-1e-4", "model.text_encoder_lr -0.0001"),
    "negative lr": setting("--model.optimizer.init_args.lr=-1e-4", "model.optimizer.init_args.lr -0.0001: give"),
    "0 steps": setting("--trainer.max_steps=0", "trainer.max_steps 0: the run would train nothing"),
    "0 epochs": setting("--trainer.max_epochs=0", "trainer.max_epochs 0: the run would train nothing"),
    "validate every -1 steps": setting("--validation.every_n_steps=-1", "validation.every_n_steps -1: give"),
    "rank 0": setting("--model.lora_rank=0", "model.lora_rank 0"),
    "dropout 1.5": setting("--model.lora_dropout=1.5", "model.lora_dropout must lie in"),
    "image size 60": setting("--model.image_size=60", "model.image_size 60: give a positive multiple of 8"),
    "unknown sampler": setting("--model.sampler=NoSuchScheduler", "model.sampler NoSuchScheduler: not a diffusers"),
    "0 validation prompts": setting("--data.num_validation_prompts=0", "data.num_validation_prompts 0: give"),
    "0 sampling steps": setting("--model.num_inference_steps=0", "num_inference_steps be 1 or more"),
    "caption template without {caption}": setting("--data.caption_template=sks man", "data.caption_template"),
    "caption dropout 1": setting("--data.caption_dropout=1", "data.caption_dropout 1"),
    "face margin -1": setting("--data.face_margin=-1", "data.face_margin -1"),
    "snr gamma 0": setting("--model.snr_gamma=0", "model.snr_gamma 0.0: give a positive number"),
    "negative snr gamma": setting("--model.snr_gamma=-5", "model.snr_gamma -5.0: give a positive number"),
    "face loss weight 0": setting("--model.face_loss_weight=0", "model.face_loss_weight"),
    "missing base model": setting("--model.pretrained_model_name_or_path=/no/such/model", "/no/such/model"),
    "empty prompt file": prompts_file(b"\n  \n", "has no prompts"),
    "missing prompt file": prompts_file(None, "prompt file .* does not exist"),
    "prompt file not UTF-8": prompts_file(b"caf\xe9\n", "not UTF-8"),
    "checkpoint URL": setting("--ckpt_path=http://example.com/x.ckpt", "not loaded from URLs"),
    "LoRA file as checkpoint": lora_file,
    "missing checkpoint": setting("--ckpt_path=/no/such.ckpt", "no such file"),
}


def run_bad(demo_cli, tmp_path, capsys, args: list[str], photos: Path | None = None) -> str:
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path / "logs", "--validation.baseline=false", *args, photos=photos))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    logs = tmp_path / "logs"
    assert not list(logs.rglob("*.ckpt")) and not list(logs.rglob("*.safetensors"))  # nothing trained
    return err


@pytest.mark.parametrize("case", list(DATA))
def test_bad_data_folder(demo_cli, demo_photos, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    photos = Path(shutil.copytree(demo_photos, tmp_path / "photos"))
    expected = DATA[case](photos)
    err = run_bad(demo_cli, tmp_path, capsys, [], photos=photos)
    assert re.search(expected, err), err


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_setting(demo_cli, tmp_path, capsys, case):
    args, expected = SETTINGS[case](tmp_path)
    err = run_bad(demo_cli, tmp_path, capsys, args)
    assert re.search(expected, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(demo_cli, tmp_path, capsys):
    err = run_bad(demo_cli, tmp_path, capsys, ["--trainer.accelerator=gpu"])
    assert "GPU" in err or "gpu" in err


def test_bad_files_can_be_skipped_and_bom_is_not_a_token(demo_cli, demo_photos, tmp_path):
    photos = Path(shutil.copytree(demo_photos, tmp_path / "photos"))
    stem = first_stem(photos)
    (photos / f"{stem}.txt").write_bytes(b"\xef\xbb\xbfa photo of eileen")
    Image.new("RGB", (1, 1)).save(photos / "tiny.png")
    (photos / "tiny.txt").write_text("tiny")
    args = ["--validation.every_n_steps=0", "--validation.at_end=false", "--validation.baseline=false"]
    with pytest.warns(UserWarning, match="only 1x1 pixels"):
        cli = main(
            demo_cli("fit", tmp_path, *args, "--trainer.max_steps=1", "--data.skip_bad_files=true", photos=photos)
        )
    captions = {pair.image.stem: pair.caption for pair in cli.datamodule.pairs}
    assert "tiny" not in captions and captions[stem] == "a photo of eileen"


def test_data_folder_is_checked_before_the_base_model_loads(demo_cli, tmp_path, capsys):
    # A typo in the folder is answered in seconds, not after a minute of loading SD1.5 (issue #10).
    err = run_bad(
        demo_cli,
        tmp_path,
        capsys,
        ["--model.pretrained_model_name_or_path=/no/such/model"],
        photos=tmp_path / "no-photos",
    )
    assert "no-photos" in err and "/no/such/model" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_t4_overlay_on_a_cpu_is_refused_before_loading(demo_cli, tmp_path, capsys):
    # Each half alone runs on a CPU; together they stopped with a traceback at the first VAE encode.
    args = ["--config", str(ROOT / "configs" / "t4.yaml"), "--model.pretrained_model_name_or_path=/no/such/model"]
    err = run_bad(demo_cli, tmp_path, capsys, args)
    assert (
        "model.frozen_dtype float16 with trainer.precision 16-mixed (configs/t4.yaml) does not run on a CPU" in err
    ), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_8bit_optimizer_on_cpu_is_refused_before_loading(demo_cli, tmp_path, capsys, monkeypatch):
    # A stand-in for bitsandbytes, so that the class path parses as it does where bitsandbytes is installed.
    package = tmp_path / "fake" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "optim.py").write_text("import torch\n\nclass AdamW8bit(torch.optim.AdamW):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    args = ["--model.optimizer=bitsandbytes.optim.AdamW8bit", "--model.pretrained_model_name_or_path=/no/such/model"]
    try:
        err = run_bad(demo_cli, tmp_path, capsys, args)
    finally:  # libraries ask find_spec whether bitsandbytes exists, and it answers from sys.modules first
        for name in [n for n in sys.modules if n.split(".")[0] == "bitsandbytes"]:
            del sys.modules[name]
    assert "model.optimizer bitsandbytes.optim.AdamW8bit" in err and "CUDA" in err, err


def test_missing_clip_offline_fails_fast_naming_the_setting(demo_cli, tmp_path, capsys, monkeypatch):
    """No HF_HUB_OFFLINE, a Hub that does not answer, a CLIP not in the cache: seconds, not a minute of retries,
    and the message names the setting and the way out (issue #11)."""
    import huggingface_hub.constants

    from stable_diffusion import hub_access

    class DeadHub:
        def model_info(self, *args, **kwargs):
            raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_access, "HfApi", DeadHub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    started = time.monotonic()
    args = ["--validation.clip_model=likeness-test/clip-not-cached", "--model.pretrained_model_name_or_path=/no/model"]
    err = run_bad(demo_cli, tmp_path, capsys, args)
    assert time.monotonic() - started < 10
    assert "validation.clip_model likeness-test/clip-not-cached" in err and "null" in err, err
    assert "/no/model" not in err  # found before the base model loads


def test_missing_face_model_offline_is_named_before_the_base_model_loads(demo_cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "empty-deepface-home"))  # no weights there
    args = [
        "--validation.face_model=GhostFaceNet",
        "--validation.face_detector=ssd",
        "--model.pretrained_model_name_or_path=/no/model",
    ]
    err = run_bad(demo_cli, tmp_path, capsys, args)
    assert "--validation.face_model GhostFaceNet --validation.face_detector ssd" in err and "/no/model" not in err, err


@pytest.mark.parametrize("detector", ["ssd", "bogus"])
def test_bad_face_box_detector_is_named_as_the_data_setting_before_the_base_model_loads(
    demo_cli, tmp_path, capsys, monkeypatch, detector
):
    # data.face_detector finds the face boxes of crop: face; validation.face_detector is another setting.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "empty-deepface-home"))  # no weights there but dlib's
    args = [f"--data.face_detector={detector}", "--model.pretrained_model_name_or_path=/no/model"]
    err = run_bad(demo_cli, tmp_path, capsys, args)
    assert f"face model --data.face_detector {detector}: " in err and "/no/model" not in err, err
    assert "`--data.face_detector dlib`" in err and "--validation.face" not in err, err


@pytest.mark.parametrize("section", ["data", "validation"])
def test_a_cache_dir_that_is_a_file_is_named_before_the_base_model_loads(demo_cli, tmp_path, capsys, section):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    args = [f"--{section}.cache_dir={a_file}", "--model.pretrained_model_name_or_path=/no/model"]
    err = run_bad(demo_cli, tmp_path, capsys, args)
    assert (
        f"{section}.cache_dir {a_file}: cannot write there (it is a file, not a folder)" in err
        and "/no/model" not in err
    ), err
    assert a_file.read_text() == "mine"


def test_a_negative_prompt_without_guidance_is_reported():
    """diffusers uses the negative prompt only under classifier-free guidance (scale > 1): same pixels without it."""
    import warnings

    from lightning_modules.lora_setup import check_generation_settings

    hp = {"image_size": 512, "sampler": "EulerDiscreteScheduler", "negative_prompt": "ugly", "guidance_scale": 1.0}
    with pytest.warns(UserWarning, match="model.guidance_scale is 1.0: .* diffusers ignores negative prompts"):
        check_generation_settings(hp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_generation_settings(hp | {"guidance_scale": 7.5})
        check_generation_settings(hp | {"negative_prompt": ""})


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_check_the_face_cache_folder_before_loading(demo_cli, tmp_path, capsys, subcommand):
    # They embed the photos' faces into validation.cache_dir as fit does; a file there failed after the model loaded.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    args = [f"--validation.cache_dir={a_file}", "--model.pretrained_model_name_or_path=/no/model"]
    with pytest.raises(SystemExit) as info:
        main(demo_cli(subcommand, tmp_path / "logs", *args))
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"validation.cache_dir {a_file}: cannot write there" in err, err
    assert "/no/model" not in err and a_file.read_text() == "mine"
