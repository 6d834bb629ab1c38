"""``likeness score``: the HW's numbers for a folder of images, an exported LoRA on a base model, or a checkpoint.

Usage::

    likeness score --photos data/brad --prompts data/brad_prompts.txt --images DIR
    likeness score --photos data/brad --prompts data/brad_prompts.txt --lora LORA_FILE_OR_DIR --base MODEL
    likeness score --ckpt logs/brad/version_0/checkpoints/best_identity.ckpt    # the run's photos and prompts

prints the face distance (with the rubric or why none), how many images show the person, the CLIP score and the
faceless count, and writes ``scores.json``, ``scores.csv`` and ``grid.png`` (see :mod:`metrics.score_files`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from callbacks.prompt_grid import prompt_grid, save_images
from datamodules.files import default_cache_dir
from metrics.clip_score import HW_CLIP
from metrics.score_files import ScoreFiles
from metrics.score_inputs import ScoreInputs

# A run's own validation settings (config.yaml), else these: the offline face stack and the HW's CLIP.
DEFAULTS = {"face_model": "Dlib", "face_detector": "dlib", "clip_model": HW_CLIP}
HW_STEPS, HW_GUIDANCE = 30, 7.5  # LoRADiffusion's generation defaults (the HW's)
EXAMPLES = """examples:
  likeness score --images DIR --photos data/brad --prompts data/brad_prompts.txt
  likeness score --lora lora/final --base MODEL --photos data/brad --prompts data/brad_prompts.txt
  likeness score --ckpt logs/brad/version_0/checkpoints/best_identity.ckpt   (the run's photos, prompts, models)"""


class ScoreCommand:
    """Score images against a person's photos and prompts; generate them first from a LoRA or a checkpoint.

    Exactly one of ``images``, ``lora`` (with ``base``) or ``ckpt`` says what is scored. Every input is checked
    before a model loads: a wrong path or a prompt count that does not match the images stops in a second.

    Args:
        photos: the training photo folder (``NAME.jpg`` beside ``NAME.txt``); with ``ckpt``, default: its run's.
        prompts: text file, one prompt per line (HW: 25); with ``ckpt``, default: its run's validation prompts.
        images: folder of images to score: ``valid_image_<i>.png`` is prompt line ``i`` (from 0, the HW's names),
            other names pair with the prompt lines in natural order (``img2`` before ``img10``).
        lora: an exported LoRA (kohya or diffusers ``.safetensors``, or a folder holding one) to generate with.
        base: the base model for ``lora`` (Hub id, diffusers folder or ``.safetensors`` file); with ``ckpt``: a
            base model that moved since training.
        ckpt: a checkpoint of a likeness run: its LoRA generates the prompts as ``likeness test`` does.
        face_model: deepface recognition model (``Dlib`` offline; the HW graded with ``GhostFaceNet``); default: the
            checkpoint run's, else ``Dlib``.
        face_detector: deepface detector (``dlib`` offline; the HW's ``ssd``); default: the run's, else ``dlib``.
        clip_model: CLIP Hub id or folder, ``"none"`` to skip the CLIP score; default: the run's, else the HW's.
        out: folder for generated images and the files; default: the images folder, else ``score/<name>`` beside
            the LoRA or checkpoint.
        steps: sampler steps (default: the checkpoint's, or 30).
        seed: prompt ``i`` is generated with seed ``seed + i`` (default: the checkpoint's ``generation_seed``,
            so the images are ``likeness test``'s; else 0).
        cache_dir: where the photos' face embeddings are cached.
        skip_bad_files: score against the good photos of a folder with broken files, instead of stopping.
    """

    def __init__(
        self,
        photos: str | None = None,
        prompts: str | None = None,
        images: str | None = None,
        lora: str | None = None,
        base: str | None = None,
        ckpt: str | None = None,
        face_model: str | None = None,
        face_detector: str | None = None,
        clip_model: str | None = None,
        out: str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        cache_dir: str | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        self.inputs = ScoreInputs(photos, prompts, images, lora, base, ckpt, out, steps, skip_bad_files)
        self.face_model, self.face_detector, self.clip_model = face_model, face_detector, clip_model
        self.steps, self.seed = steps, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def _setting(self, name: str, given: str | None) -> str | None:
        """An option as given, else the run's validation setting (``--ckpt``), else the default."""
        if given is None:
            return (self.inputs.run_config.get("validation") or {}).get(name, DEFAULTS[name])
        return None if name == "clip_model" and given.lower() in ("none", "null") else given

    def run(self) -> dict[str, Path]:
        """Check, generate (``lora``/``ckpt``), score and write the files; return their paths."""
        from metrics.face_model import FaceModel
        from metrics.identity_scorer import IdentityScorer

        inputs = self.inputs
        inputs.check()  # everything that can be wrong with the input, before any model loads
        face_model = FaceModel(
            self._setting("face_model", self.face_model), self._setting("face_detector", self.face_detector)
        )
        clip_model = self._setting("clip_model", self.clip_model)
        # Face model, CLIP and the photos' embeddings before generating: a missing model fails before minutes of it.
        scorer = IdentityScorer(
            face_model, [p.image for p in inputs.pairs], self.cache_dir / "face_embeddings", clip_model
        )
        started = time.perf_counter()
        seconds = {}
        if inputs.images is None:
            generated, seeds, scored = self._generate()
            files = save_images(inputs.out, generated, inputs.prompts, "score", seeds)
            images, seconds["generate"] = generated, time.perf_counter() - started
        else:
            images, files, scored = inputs.loaded, inputs.files, {"images": str(inputs.images)}
        scores = scorer.score(images, inputs.prompts)
        scores.seconds = seconds | scores.seconds
        grid = prompt_grid(images, inputs.prompts, scores.labels(), scores.matches)
        scores.seconds["total"] = time.perf_counter() - started
        settings = {"photos": str(inputs.photos), "prompts": str(inputs.prompts_file)} | scorer.settings
        written = ScoreFiles(inputs.out).write(scores, files, inputs.prompts, settings | {"scored": scored}, grid)
        print(f"[score] {scores.summary()} ({scores.seconds['total']:.1f}s)")
        print(f"images: {Path(files[0]).parent}")
        for kind in ("json", "csv", "grid"):
            print(f"{Path(written[kind]).name}: {written[kind]}")
        return written

    def _generate(self) -> tuple[list, list[int], dict[str, object]]:
        """One image per prompt, prompt ``i`` with seed ``seed + i``: the LoRA on its base, or the checkpoint."""
        import torch

        from callbacks.cpu_heap_reuse import cpu_heap_reuse

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # On a CPU the memory one UNet call frees serves the next, as in a fit (a tenth off SD1.5's time at 64 px).
        with cpu_heap_reuse(device == "cpu"):
            return self._from_checkpoint(device) if self.inputs.ckpt is not None else self._from_lora(device)

    def _from_checkpoint(self, device: str) -> tuple[list, list[int], dict[str, object]]:
        """The checkpoint's LoRA, as ``likeness test`` generates: its seeds, steps, sampler and precision."""
        import torch

        from lightning_modules.lora_diffusion import LoRADiffusion

        inputs = self.inputs
        overrides: dict[str, object] = {"compile": False}  # a one-off run: compiling would cost more than it saves
        if inputs.base:
            overrides["pretrained_model_name_or_path"] = inputs.base
        if device == "cpu":
            overrides["frozen_dtype"] = "float32"  # half precision on a CPU: slow, or not implemented
        module = LoRADiffusion.load_from_checkpoint(inputs.ckpt, map_location="cpu", weights_only=True, **overrides)
        hp = module.hparams
        if self.steps is not None:
            hp.num_inference_steps = self.steps
        seed = hp.generation_seed if self.seed is None else self.seed
        seeds = [seed + i for i in range(len(inputs.prompts))]
        # `test` generates under the trainer's autocast: the run's precision (config.yaml), on a GPU.
        precision = str((inputs.run_config.get("trainer") or {}).get("precision") or "32")
        half = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
        with torch.autocast(device, dtype=half or torch.float32, enabled=device == "cuda" and half is not None):
            images = module.eval().to(device).generate(inputs.prompts, seeds)
        scored = {"ckpt": str(inputs.ckpt), "step": int(inputs.checkpoint.get("global_step", 0))}
        scored |= {"base": str(hp.pretrained_model_name_or_path), "steps": hp.num_inference_steps, "seed": seed}
        return images, seeds, scored

    def _from_lora(self, device: str) -> tuple[list, list[int], dict[str, object]]:
        """The LoRA file on the base model through diffusers' own loader, with the HW's generation settings."""
        import torch

        from lightning_modules.generation import BatchedGeneration
        from stable_diffusion.base_model import load_base_model

        inputs = self.inputs
        base = load_base_model(inputs.base, torch_dtype=torch.float16 if device == "cuda" else None)
        pipeline = base.pipeline()
        # diffusers reads both formats: kohya's lora_unet_*/lora_te_* keys and its own unet.*/text_encoder.* keys.
        pipeline.load_lora_weights(str(inputs.lora.parent), weight_name=inputs.lora.name)
        pipeline.to(device).set_progress_bar_config(disable=True)
        seed, steps = self.seed or 0, self.steps or HW_STEPS
        seeds = [seed + i for i in range(len(inputs.prompts))]
        size = base.unet.config.sample_size * pipeline.vae_scale_factor
        images = BatchedGeneration()(
            pipeline,
            inputs.prompts,
            seeds,
            num_inference_steps=steps,
            guidance_scale=HW_GUIDANCE,
            height=size,
            width=size,
        )
        return images, seeds, {"lora": str(inputs.lora), "base": str(inputs.base), "steps": steps, "seed": seed}


def parser() -> argparse.ArgumentParser:
    from likeness_command import CommandParser

    p = CommandParser(
        prog="likeness score",
        description="Face distance, the person in n/N, CLIP score and faceless count of images against a person's "
        "photos; writes scores.json, scores.csv and grid.png.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", metavar="DIR", help="images to score: valid_image_<i>.png = prompt line i")
    what.add_argument("--lora", metavar="FILE_OR_DIR", help="a LoRA .safetensors (kohya or diffusers); needs --base")
    what.add_argument(
        "--ckpt", metavar="CKPT", help="a likeness checkpoint (its run's photos, prompts, models by default)"
    )
    p.add_argument("--photos", metavar="DIR", help="the training photos (NAME.jpg beside NAME.txt)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (HW: 25)")
    p.add_argument("--base", metavar="MODEL", help="base model for --lora: Hub id, diffusers folder, .safetensors")
    p.add_argument("--face-model", metavar="NAME", help="Dlib (offline default) or GhostFaceNet (the HW's grading)")
    p.add_argument("--face-detector", metavar="NAME", help="dlib (offline, default) or ssd (the HW's)")
    p.add_argument("--clip-model", metavar="MODEL", help="CLIP Hub id or folder (default: the HW's); none skips it")
    p.add_argument("--out", metavar="DIR", help="output folder (default: --images DIR, else score/NAME beside it)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (default: the checkpoint's, or 30)")
    p.add_argument("--seed", type=int, metavar="N", help="prompt i gets seed SEED+i (default: the checkpoint's, or 0)")
    p.add_argument("--cache-dir", metavar="DIR", help="face-embedding cache (default ~/.cache/likeness)")
    p.add_argument("--skip-bad-files", action="store_true", help="ignore broken files in the photo folder")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """``likeness score ...``; bad input exits 2 with one ``error: ...`` line."""
    from likeness_command import reported_errors

    args = vars(parser().parse_args(argv))
    with reported_errors():
        return ScoreCommand(**args).run()


if __name__ == "__main__":
    main()
