"""Pairing photos with captions by stem, and every kind of bad input."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from datamodules.folder_scan import DataFolderError, load_pairs, scan_folder


def write_pair(folder, stem, caption="a photo", suffix=".jpg", color=(200, 100, 50)):
    Image.new("RGB", (40, 30), color).save(folder / f"{stem}{suffix}")
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")


def test_pairs_by_stem_not_by_sorted_lists(tmp_path):
    # Sorting two lists would pair a.jpg with a.txt but b.png with c.txt once b.txt is missing and c has no image;
    # pairing by stem keeps each caption on its own photo.
    write_pair(tmp_path, "a", "caption of a")
    write_pair(tmp_path, "b", "caption of b", suffix=".png")
    write_pair(tmp_path, "d", "caption of d", suffix=".webp")
    write_pair(tmp_path, "E", "caption of E", suffix=".JPEG")
    pairs = load_pairs(tmp_path)
    assert {p.image.name: p.caption for p in pairs} == {
        "a.jpg": "caption of a",
        "b.png": "caption of b",
        "d.webp": "caption of d",
        "E.JPEG": "caption of E",
    }


def test_every_problem_is_listed_in_one_error(tmp_path):
    write_pair(tmp_path, "good")
    Image.new("RGB", (8, 8)).save(tmp_path / "no_caption.jpg")
    (tmp_path / "no_image.txt").write_text("orphan caption")
    write_pair(tmp_path, "empty_caption", caption="   \n")
    write_pair(tmp_path, "latin1_caption")
    (tmp_path / "latin1_caption.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty_image.jpg").write_bytes(b"")
    (tmp_path / "empty_image.txt").write_text("caption")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "garbage.txt").write_text("caption")
    write_pair(tmp_path, "truncated")
    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])

    with pytest.raises(DataFolderError) as info:
        load_pairs(tmp_path)
    message = str(info.value)
    for name, why in [
        ("no_caption.jpg", "without a caption"),
        ("no_image.txt", "without an image"),
        ("empty_caption.txt", "empty"),
        ("latin1_caption.txt", "not UTF-8"),
        ("empty_image.jpg", "empty"),
        ("garbage.png", "cannot be read"),
        ("truncated.jpg", "cannot be read"),
    ]:
        line = next((line for line in message.splitlines() if name in line), None)
        assert line is not None, f"{name} missing from:\n{message}"
        assert why in line, line
    assert "good.jpg" not in message
    assert "skip_bad_files" in message  # says what to do


def test_skip_bad_files_keeps_the_good_pairs_and_warns(tmp_path):
    write_pair(tmp_path, "good1")
    write_pair(tmp_path, "good2")
    (tmp_path / "no_image.txt").write_text("orphan")
    with pytest.warns(UserWarning, match="no_image.txt"):
        pairs = load_pairs(tmp_path, skip_bad_files=True)
    assert sorted(p.image.name for p in pairs) == ["good1.jpg", "good2.jpg"]


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DataFolderError, match="no usable image-caption pair"):
        load_pairs(tmp_path)
    with pytest.raises(DataFolderError, match="no usable"):
        load_pairs(tmp_path, skip_bad_files=True)  # skipping cannot make an empty folder usable
    with pytest.raises(DataFolderError, match="does not exist"):
        load_pairs(tmp_path / "nope")


def test_demo_photos_scan_clean(demo_photos, tmp_path):
    scan = scan_folder(demo_photos)
    assert scan.problems == []
    assert len(scan.pairs) == len(list(demo_photos.glob("*.txt")))
    # Removing one caption is then reported, by name.
    copy = tmp_path / "copy"
    shutil.copytree(demo_photos, copy)
    (copy / "closeup.txt").unlink()
    assert [p.name for p in scan_folder(copy).images_without_caption] == ["closeup.jpg"]


def test_a_mac_zip_unpacked_names_the_photo_folder_and_counts_no_resource_forks(tmp_path):
    """A zip made on a Mac unpacks into Brad/ and __MACOSX/Brad/._*.jpg: the ._ files were counted as photos
    (14 for 7) and the advice was to move them all up."""
    brad, forks = tmp_path / "Brad", tmp_path / "__MACOSX" / "Brad"
    brad.mkdir()
    forks.mkdir(parents=True)
    for i in range(3):
        write_pair(brad, f"{i}")
        (forks / f"._{i}.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (brad / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(brad / ".thumbnails" / "0.jpg")
    with pytest.raises(DataFolderError) as info:
        load_pairs(tmp_path)
    message = str(info.value)
    assert f"3 photo(s) are in sub-folders of {tmp_path}" in message and "(Brad/ holds 3)" in message, message
    assert f"set data.data_dir to the folder that holds the photos (e.g. {brad})" in message
    assert len(load_pairs(brad)) == 3


def test_a_caption_over_several_lines_is_one_line(tmp_path):
    """The tokenizer reads any whitespace run as one space; tag counts and the card must see what it reads."""
    write_pair(tmp_path, "a", "a photo of eileen,\r\nsmiling\tin a park  \n")
    (pair,) = load_pairs(tmp_path)
    assert pair.caption == "a photo of eileen, smiling in a park"
