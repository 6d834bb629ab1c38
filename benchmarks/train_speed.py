"""Training speed of likeness's Lightning path against the plain diffusers-example LoRA recipe, on SD1.5.

The model is the real SD1.5 architecture with random weights (built from ``stable_diffusion/model_configs/sd15``)
and the photos are synthetic, so nothing is downloaded. Both paths train on the same model folder and photos, in
one process, one after the other. Usage, from the repo root::

    python benchmarks/train_speed.py                                   # CUDA, bf16-mixed, settings hw,unet-r4-b8
    python benchmarks/train_speed.py --settings all --json speed.json
    python benchmarks/train_speed.py --likeness-option model.compile=true --likeness-option data.cache_latents=true
    python benchmarks/train_speed.py --model-dir /tmp/sd15-random     # write the random model once, then reuse it
    python benchmarks/train_speed.py --end-to-end --e2e-steps 2000 --e2e-val-every 100
    python benchmarks/train_speed.py --settings none --generation     # 25 prompts x 30 steps, as validation does
    python benchmarks/train_speed.py --device cpu --resolution 64 --warmup 2 --steps 5
    python benchmarks/train_speed.py --device cpu --resolution 64 --plain-heap-reuse  # baseline with likeness's malloc

``benchmarks/device_check.sh`` runs it on a GPU machine with the GPU tests. The plain recipe is in
``plain_recipe.py``, the settings and the step clock in ``speed_settings.py``.

img/s is batch / median step time over the steps after warm-up; a step is timed from the batch being on the
device to the end of the optimizer step (Lightning's on_train_batch_start/end), "img/s+data" also counts loading
the next batch. "first step s" runs from ``trainer.fit`` (likeness) or from the loaded models (plain) to the end
of the first step, so it includes one-off work such as moving to the device, caching latents or compiling.
Each of those steps waits for the GPU at its start and end, so neither path gets credit for queueing a step while
the GPU runs the last one; "img/s async" does: ``--async-steps`` more steps (default: as many as timed, on cuda)
run without those waits, and their img/s is batch / median time between consecutive step ends on the GPU's clock
(CUDA events; a validation between two steps is one long gap among many).
On a CPU the run is a smoke test: SD1.5 takes seconds per step even at 64 px, and other torch processes on the
same cores (oversubscribed OpenMP threads) can make single steps several times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image
from plain_recipe import run_plain
from speed_settings import LR, PROMPTS, SETTINGS, SNR_GAMMA, StepClock, sync

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # likeness's modules are imported inside the functions below


def build_model_dir(folder: Path, seed: int) -> Path:
    """Write SD1.5 with random weights in diffusers layout to ``folder`` once (reused when it is there)."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stable_diffusion.single_file_checkpoint import SD15_CONFIG_DIR as CFG
    from stable_diffusion.tiny_sd import save_tiny_tokenizer

    print(f"writing SD1.5 with random weights to {folder} ...", flush=True)
    partial = folder.with_name(folder.name + ".partial")
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(CFG / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(CFG / "text_encoder")),
        tokenizer=save_tiny_tokenizer(partial / "tokenizer", model_max_length=77),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CFG / "unet")),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(CFG / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(partial, safe_serialization=True)
    if folder.is_dir():
        folder.rmdir()  # an empty folder given by --model-dir; a non-empty one fails here rather than be mixed
    partial.rename(folder)
    return folder


def write_photos(folder: Path, count: int, size: int, seed: int) -> Path:
    """Smooth random RGB images (bicubic-upsampled 8x8 noise) as NNN.png beside NNN.txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of sks person, variation {i}\n", encoding="utf-8")
    return folder


def accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs that ``cls.__init__`` takes; prints a note naming the others."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    dropped = sorted(set(kwargs) - set(params))
    if dropped:
        print(f"note: {cls.__name__} does not accept {dropped}; dropped", flush=True)
    return {k: v for k, v in kwargs.items() if k in params}


class PromptValidation(L.Callback):
    """Stand-in for IdentityValidation: generate the first prompts every ``every`` steps, in eval mode."""

    def __init__(self, every: int, prompts: list[str]) -> None:
        self.every, self.prompts, self.seconds, self.runs = every, prompts, 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step % self.every:
            return
        modes = {module: module.training for module in pl_module.modules()}
        sync(pl_module.device)  # the steps queued before it are training time, not the validation's
        start = time.perf_counter()
        pl_module.eval()
        try:
            pl_module.generate(self.prompts, list(range(len(self.prompts))))
        finally:
            for module, training in modes.items():
                module.train(training)
        self.seconds += time.perf_counter() - start
        self.runs += 1


def likeness_model_kwargs(args: argparse.Namespace, name: str, model_dir: Path) -> dict[str, Any]:
    """LoRADiffusion's settings for a benchmark setting, with the ``--likeness-option model.X=`` ones applied."""
    s = SETTINGS[name]
    model_kw: dict[str, Any] = {
        "pretrained_model_name_or_path": str(model_dir),
        "frozen_dtype": "bfloat16" if args.precision == "bf16-mixed" else "float32",
        "lora_rank": s.rank,
        "lora_alpha": s.alpha,
        "train_text_encoder": s.text_encoder,
        "snr_gamma": SNR_GAMMA,
        **({"text_encoder_lr": LR} if s.text_encoder else {}),
    }
    for key, value in args.likeness_option:
        if key.startswith("model."):
            model_kw[key.split(".", 1)[1]] = value
    return model_kw


def run_likeness(
    args: argparse.Namespace,
    name: str,
    model_dir: Path,
    photos: Path,
    run_dir: Path,
    max_steps: int,
    callbacks: list[L.Callback] | None = None,
    model_extra: dict[str, Any] | None = None,
    synced_steps: int | None = None,
) -> dict[str, Any]:
    """likeness as ``train.py fit`` runs it: LoRADiffusion + FaceDataModule + a Lightning Trainer. The first
    ``synced_steps`` steps (default: warm-up and timed) wait for the GPU at start and end (:class:`StepClock`)."""
    from datamodules.face_data_module import FaceDataModule
    from lightning_modules.lora_diffusion import LoRADiffusion

    s = SETTINGS[name]
    model_kw = likeness_model_kwargs(args, name, model_dir) | (model_extra or {})
    data_kw: dict[str, Any] = {"data_dir": str(photos), "resolution": args.resolution, "batch_size": s.batch}
    if "cache_dir" in inspect.signature(FaceDataModule.__init__).parameters:
        data_kw["cache_dir"] = str(run_dir / "cache")  # a fresh cache per run: its cost shows in "first step s"
    for key, value in args.likeness_option:
        if key.startswith("data."):
            data_kw[key.split(".", 1)[1]] = value
    L.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()
    module = LoRADiffusion(**accepted(LoRADiffusion, model_kw))
    data = FaceDataModule(**accepted(FaceDataModule, data_kw))
    load_s = time.perf_counter() - start
    synced = args.warmup + args.steps if synced_steps is None else synced_steps
    clock = StepClock(torch.device(args.device), synced_steps=synced)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # as train.py: FaceDataModule's sampler shards by rank itself
        default_root_dir=str(run_dir),
        callbacks=[clock, *(callbacks or [])],
    )
    clock.origin = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total_s = time.perf_counter() - clock.origin
    hparams = {"model": dict(module.hparams), "data": dict(data.hparams)}
    hparams["model"].pop("optimizer", None)
    return clock.summary(args, name, "likeness", s.batch, load_s=load_s, total_s=total_s, hparams=hparams)


def time_generation(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """The HW setting's model generating all 25 prompts at ``--generation-steps`` sampler steps and ``--resolution``,
    as a validation does (one call; fewer at a time only if memory runs out), twice: the first call warms up
    (cuDNN's algorithm search, compiling), the second is the figure."""
    from callbacks.cpu_heap_reuse import cpu_heap_reuse
    from lightning_modules.lora_diffusion import LoRADiffusion

    settings = {"num_inference_steps": args.generation_steps, "image_size": args.resolution}
    model_kw = likeness_model_kwargs(args, "hw", model_dir) | settings
    module = LoRADiffusion(**accepted(LoRADiffusion, model_kw)).to(args.device).eval()
    device, seeds, seconds = torch.device(args.device), list(range(len(PROMPTS))), []
    # As a validation inside a fit runs: under the trainer's autocast, and on a CPU with LoRADiffusion's callback.
    with cpu_heap_reuse(device.type == "cpu"), precision_context(args):
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            images = module.generate(PROMPTS, seeds)
            sync(device)
            seconds.append(time.perf_counter() - start)
    return {
        "prompts": len(images),
        "steps": args.generation_steps,
        "resolution": args.resolution,
        "first_call_s": seconds[0],
        "seconds": seconds[1],
        "images_per_call": module.batched_generation.max_batch or len(PROMPTS),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }


def precision_context(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The autocast that a Trainer of ``--precision`` runs its steps and validations under (Lightning's own)."""
    if not args.precision.endswith("-mixed"):
        return contextlib.nullcontext()
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision(args.precision, args.device).forward_context()


@contextlib.contextmanager
def plain_heap(reuse: bool) -> Iterator[None]:
    """With ``--plain-heap-reuse`` the baseline runs with likeness's malloc switches too (CPU, glibc): how much of
    the ratio on a CPU they make."""
    from callbacks.cpu_heap_reuse import cpu_heap_reuse

    with cpu_heap_reuse(reuse) as held:
        if reuse and not held:
            print("note: --plain-heap-reuse needs glibc; the plain recipe runs without it", flush=True)
        yield


def free_memory() -> None:
    # Each run compiles its own model: graphs of the last one would only count against dynamo's recompile limit.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict[str, Any]], ratios: dict[str, float | None], async_ratios: dict) -> None:
    head = ["setting", "path", "img/s", "img/s+data", "img/s async", "steps", "first step s", "load s", "total s"]
    head += ["peak GiB", "a/b", "a/b async"]
    rows = [head]
    for r in results:
        mine = r["path"] == "likeness"
        ratio = [fmt(x.get(r["setting"]), ".2f") if mine else "" for x in (ratios, async_ratios)]
        speeds = [fmt(r.get(k), ".3f") for k in ("img_per_s", "img_per_s_with_data", "img_per_s_async")]
        times = [fmt(r[k], ".1f") for k in ("first_step_s", "load_s", "total_s")]
        rows.append([r["setting"], r["path"], *speeds, str(r["steps_timed"]), *times, fmt(r["peak_gpu_gib"], ".2f")])
        rows[-1] += ratio
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    rows.insert(1, ["-" * w for w in widths])
    for row in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    p.add_argument("--precision", help="Lightning precision; default bf16-mixed on cuda, 32-true on cpu")
    p.add_argument("--settings", default="hw,unet-r4-b8", help=f"comma list of {', '.join(SETTINGS)}, all or none")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--async-steps",
        type=int,
        help="then this many steps without a sync each (img/s async; default: --steps on cuda, 0 on cpu)",
    )
    p.add_argument("--num-photos", type=int, default=64)
    p.add_argument("--photo-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, help="random SD1.5 folder to reuse (written there if missing)")
    p.add_argument("--likeness-option", action="append", default=[], metavar="KEY=VALUE", help="model.X= or data.X=")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--plain-heap-reuse",
        action="store_true",
        help="run the plain recipe with likeness's glibc malloc switches too (callbacks/cpu_heap_reuse.py)",
    )
    p.add_argument("--end-to-end", action="store_true", help="one likeness hw run with validation every N steps")
    p.add_argument("--e2e-steps", type=int, default=2000)
    p.add_argument("--e2e-val-every", type=int, default=100)
    p.add_argument("--generation", action="store_true", help="time generating the 25 prompts (HW setting's model)")
    p.add_argument("--generation-steps", type=int, default=30)
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    named = {"all": list(SETTINGS), "none": []}
    args.settings = named.get(args.settings, args.settings.split(","))
    for name in args.settings:
        if name not in SETTINGS:
            p.error(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)} or all")
    options = []
    for item in args.likeness_option:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("model.", "data.")):
            p.error(f"--likeness-option {item!r}: expected model.KEY=VALUE or data.KEY=VALUE")
        options.append((key, yaml.safe_load(value)))
    args.likeness_option = options
    args.photo_size = max(args.photo_size, args.resolution)
    if args.async_steps is None:
        args.async_steps = args.steps if args.device == "cuda" else 0
    return args


def speed_ratios(args: argparse.Namespace, results: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    by_key = {(r["setting"], r["path"]): r.get(key) for r in results}
    ratios: dict[str, float | None] = {}
    for name in args.settings:
        a, b = by_key.get((name, "likeness")), by_key.get((name, "plain"))
        ratios[name] = a / b if a and b else None
    return ratios


def build_report(args: argparse.Namespace, results: list[dict[str, Any]], **parts: Any) -> dict[str, Any]:
    ratios, async_ratios = speed_ratios(args, results, "img_per_s"), speed_ratios(args, results, "img_per_s_async")
    return {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "precision": args.precision,
        "resolution": args.resolution,
        "warmup": args.warmup,
        "steps": args.steps,
        "num_photos": args.num_photos,
        "likeness_options": dict(args.likeness_option),
        "plain_heap_reuse": args.plain_heap_reuse,
        "results": results,
        "ratio_likeness_over_plain": ratios,
        "async_steps": args.async_steps,
        "ratio_likeness_over_plain_async": async_ratios,
        "end_to_end": parts.get("end_to_end"),
        "generation": parts.get("generation"),
    }


def save_report(args: argparse.Namespace, report: dict[str, Any]) -> str:
    """The report as JSON, written to ``--json`` atomically: after every run, so a run cut short keeps the others."""
    text = json.dumps(report, default=str)
    if args.json:
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(text + "\n", encoding="utf-8")
        partial.replace(args.json)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("high")  # as train.py does; it applies to both paths
    max_steps = args.warmup + args.steps + args.async_steps
    results: list[dict[str, Any]] = []
    parts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="likeness-speed-") as tmp:
        work = Path(tmp)
        model_dir = build_model_dir((args.model_dir or work / "sd15-random").resolve(), args.seed)
        photos = write_photos(work / "photos", args.num_photos, args.photo_size, args.seed)
        # Every plain run first: a likeness fit on the CPU switches glibc's malloc (callbacks.cpu_heap_reuse) and,
        # although it switches it back, leaves its mmap threshold fixed; the baseline runs as a fresh process would.
        for path in ("plain", "likeness"):
            for name in args.settings:
                print(f"--- {name} / {path}", flush=True)
                free_memory()
                if path == "likeness":
                    results.append(run_likeness(args, name, model_dir, photos, work / f"run-{name}", max_steps))
                else:
                    with plain_heap(args.plain_heap_reuse):
                        results.append(run_plain(args, name, model_dir, photos, max_steps))
                free_memory()
                save_report(args, build_report(args, results))
        if args.end_to_end:
            print(f"--- end-to-end: hw, {args.e2e_steps} steps, 3 prompts every {args.e2e_val_every} steps", flush=True)
            validation = PromptValidation(args.e2e_val_every, PROMPTS[:3])
            extra = {"image_size": args.resolution}
            # As a real run: only the first step waits for the GPU (its time is "first step s").
            run_dir = work / "run-e2e"
            e2e = run_likeness(args, "hw", model_dir, photos, run_dir, args.e2e_steps, [validation], extra, 1)
            parts["end_to_end"] = e2e | {"validation_runs": validation.runs, "validation_s": validation.seconds}
            free_memory()
            save_report(args, build_report(args, results, **parts))
        if args.generation:
            print(f"--- generation: {len(PROMPTS)} prompts x {args.generation_steps} steps", flush=True)
            parts["generation"] = time_generation(args, model_dir)
            free_memory()
    report = build_report(args, results, **parts)
    print(f"\ndevice: {report['device']}  torch {report['torch']}  precision {args.precision}  ", end="")
    print(
        f"resolution {args.resolution}  warm-up {args.warmup} + timed {args.steps} + async {args.async_steps} steps",
        end="",
    )
    print("  (plain with likeness's heap reuse)" if args.plain_heap_reuse else "")
    print_table(results, report["ratio_likeness_over_plain"], report["ratio_likeness_over_plain_async"])
    if (e2e := report["end_to_end"]) is not None:
        print(f"end-to-end (likeness hw, {args.e2e_steps} steps): total {e2e['total_s']:.1f} s, ", end="")
        print(f"{e2e['validation_runs']} validations took {e2e['validation_s']:.1f} s")
    if (gen := report["generation"]) is not None:
        print(f"generation ({gen['prompts']} prompts x {gen['steps']} steps, {args.resolution} px, ", end="")
        print(f"{gen['images_per_call']} per call): {gen['seconds']:.1f} s ", end="")
        print(f"(first call {gen['first_call_s']:.1f} s), peak {fmt(gen['peak_gpu_gib'], '.2f')} GiB")
    print(f"JSON: {save_report(args, report)}")
    return report


if __name__ == "__main__":
    main()
