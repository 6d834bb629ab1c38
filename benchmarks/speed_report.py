"""The benchmark's report: the table it prints and the JSON it writes."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from pathlib import Path
from typing import Any

import torch


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
