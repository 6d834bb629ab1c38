"""Two processes through Lightning's DDP (gloo, CPU): one writer of logs, checkpoints and exports, the validation's
best-checkpoint decision shared (no deadlock) and saved, and a resume under DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


BEST_STEP = 2
# train.py with a stand-in for a trained model, so that validations see faces: strangers from scikit-image's LFW
# subset, except at BEST_STEP, where it "draws" the person herself. Lightning's DDP launcher runs this same script
# again for rank 1, so both ranks have the stand-in.
WRAPPER = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
from public_faces import lfw_faces
from datamodules.sample_photos import astronaut
from lightning_modules.lora_diffusion import LoRADiffusion


def faces(self, prompts, seeds):
    import os
    from pathlib import Path

    Path("MARKER_DIR", "generated-by-rank-" + os.environ.get("LOCAL_RANK", "0")).touch()
    if self.global_step == {BEST_STEP}:
        return [astronaut().crop((118, 19, 328, 229))] * len(prompts)
    return lfw_faces(len(prompts))


LoRADiffusion.generate = faces
import train

train.cli()
"""


def run(args: list[str], script: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=420, check=False
    )


@pytest.mark.slow
def test_two_process_fit_and_resume(demo_cli, tmp_path):
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    common = [*ddp, "--validation.every_n_steps=2", "--checkpoint.every_n_train_steps=2"]
    script = tmp_path / "train_with_faces.py"
    script.write_text(WRAPPER.replace("MARKER_DIR", str(tmp_path)))
    first = run(demo_cli("fit", tmp_path, *common, "--trainer.max_steps=4"), script)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted((tmp_path / "demo").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one writer: rank 1 made no folder of its own
    run_dir = runs[0]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [
        "best_identity.ckpt",
        "last.ckpt",
        "step000002.ckpt",
        "step000004.ckpt",
    ]
    assert sorted(p.name for p in (run_dir / "lora" / "final").iterdir()) == [
        "README.md",
        "demo-v0-step000004.safetensors",  # the run's name and version: rank 0's logger
        "pytorch_lora_weights.safetensors",
    ]
    assert sorted(p.name for p in (run_dir / "validation").iterdir()) == [f"step{s:06d}" for s in (0, 2, 4)]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # Rank 0 scored; both ranks saved together the validation it found best: the person, not the strangers.
    best = torch.load(run_dir / "checkpoints" / "best_identity.ckpt", weights_only=True)
    assert best["global_step"] == BEST_STEP
    validation_state = next(v for k, v in best["callbacks"].items() if k.startswith("IdentityValidation"))
    assert validation_state["best_face_distance"] < 0.4  # the person's own face (strangers: 0.45 and more)
    # Rank 0 alone generates the validation images it alone scores.
    assert sorted(p.name for p in tmp_path.glob("generated-by-rank-*")) == ["generated-by-rank-0"]

    resumed = run(demo_cli("fit", tmp_path, *common, "--trainer.max_steps=6", "--ckpt_path=last"), script)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = sorted((tmp_path / "demo").iterdir())[-1] / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
