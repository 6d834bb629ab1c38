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
``plain_recipe.py``, likeness's in ``likeness_recipe.py``, the settings and the step clock in ``speed_settings.py``,
the inputs in ``speed_inputs.py``, the table and JSON in ``speed_report.py``.

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
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from likeness_recipe import PromptValidation, run_likeness, time_generation
from plain_recipe import run_plain
from speed_inputs import build_model_dir, write_photos
from speed_report import build_report, fmt, print_table, save_report
from speed_settings import PROMPTS, SETTINGS

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # likeness's modules are imported inside the functions below


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
