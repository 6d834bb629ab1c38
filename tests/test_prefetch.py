"""`likeness prefetch`: what it downloads is what an offline run loads, and nothing else (issue #11)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

import train
from stable_diffusion import hub_access, model_prefetch
from stable_diffusion.tiny_sd import save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789" * 4
# Files a Hub repo holds that a run never reads: prefetch must leave them on the Hub.
DECOYS = {
    "base": [
        "safety_checker/model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "v1-5-pruned.ckpt",
    ],
    "clip": ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
}


@pytest.fixture
def hub(tmp_path, tiny_sd, monkeypatch):
    """A pretend Hub (repos as folders, with decoys) that answers the probe, and an empty local cache."""
    remote = {"likeness-test/tiny-sd": tmp_path / "remote" / "sd", "likeness-test/tiny-clip": tmp_path / "remote" / "c"}
    shutil.copytree(tiny_sd, remote["likeness-test/tiny-sd"])
    save_tiny_clip(remote["likeness-test/tiny-clip"])
    for repo, kind in zip(remote.values(), DECOYS, strict=True):
        for decoy in DECOYS[kind]:
            (repo / decoy).parent.mkdir(parents=True, exist_ok=True)
            (repo / decoy).write_bytes(b"not needed")
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloads: list[str] = []

    class LiveHub:
        def model_info(self, repo_id, **kwargs):
            assert repo_id in remote

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        # huggingface_hub's own pattern filter, on a cache laid out as the Hub client lays it out.
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        if local_files_only:  # the cache only, as the client does with the network off
            return str(snapshot)
        names = [p.relative_to(remote[repo_id]).as_posix() for p in remote[repo_id].rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote[repo_id] / name, snapshot / name)
            downloads.append(f"{repo_id}/{name}")
        (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
        (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
        return str(snapshot)

    monkeypatch.setattr(hub_access, "HfApi", LiveHub)
    monkeypatch.setattr(model_prefetch, "snapshot_download", snapshot_download)
    return downloads


def test_prefetch_downloads_what_an_offline_run_loads(hub, capsys, monkeypatch):
    args = [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--model.pretrained_model_name_or_path=likeness-test/tiny-sd",
        "--validation.clip_model=likeness-test/tiny-clip",
    ]
    train.prefetch_main(args)
    out = capsys.readouterr().out
    assert "base model likeness-test/tiny-sd: downloaded; loads offline" in out, out
    assert "CLIP model likeness-test/tiny-clip: downloaded; loads offline" in out, out
    assert "face model Dlib + detector dlib: ready" in out, out
    assert not [d for d in hub if any(d.endswith(decoy) for kind in DECOYS.values() for decoy in kind)], hub
    # Independently of prefetch's own check: a run's loader finds the base model with the network off.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = model_prefetch.load_base_model("likeness-test/tiny-sd", torch_dtype=torch.float32)
    assert sum(p.numel() for p in model.unet.parameters()) > 0
    # A second prefetch finds everything in the cache and downloads nothing.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    before = len(hub)
    train.prefetch_main(args)
    assert "tiny-sd: in the cache; loads offline" in capsys.readouterr().out and len(hub) == before


def test_prefetch_of_a_missing_model_says_which_setting(hub, capsys):
    with pytest.raises(SystemExit) as info:
        train.prefetch_main(
            ["--config", str(ROOT / "configs/demo.yaml"), "--model.pretrained_model_name_or_path=someone/not-there"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.pretrained_model_name_or_path someone/not-there" in err and "Traceback" not in err, err
