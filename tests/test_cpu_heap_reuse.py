"""On a CPU the memory a step frees stays in the process for the next (callbacks/cpu_heap_reuse.py, issue #9).

Measured by what the switches are for: page faults. Filling a freshly allocated 64 MiB tensor faults in all its
pages when glibc serves it with a new mmap (the default for a block that size) and almost none when it comes from
memory the heap kept. The faults are counted in a fresh process: in a test process the heap holds whatever earlier
tests left (holes that a trim emptied of their pages, chunks of just the wrong size), and glibc serves a block from
those before it looks at the switches, so the same check would pass or fail by test order. In-process tests check
that the trainer and ``likeness score`` hold the switches while they run and let go after.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks.cpu_heap_reuse import CPUHeapReuse, cpu_heap_reuse, glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="glibc's malloc switches (Linux)")

ROOT = Path(__file__).resolve().parents[1]


def refill_fraction(mib: int, fills: int = 5) -> float:
    """Fraction of its pages that filling a fresh ``mib`` MiB block faults in, when blocks of that size are filled
    and freed one after another (the memory a step frees and the next asks for again): the least over the fills
    after the first. With the switches the first grows the heap; a small object allocated right after a block can
    keep the next from its place (an aligned request needs a little more than the freed chunk), so it may take a
    few fills before each takes the place of the one before."""
    fractions = []
    for _ in range(fills):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(mib * 2**20 // 4)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        fractions.append(faults / (mib * 2**20 / resource.getpagesize()))
    return min(fractions[1:])


def top_refill_fraction(mib: int = 64) -> float:
    """The same with glibc's own ``malloc`` and ``free`` and nothing allocated between: a freed block merges with
    the free memory at the heap's top, which glibc gives back to the system at once by default (trim threshold)."""
    libc, size, fractions = glibc(), mib * 2**20, []
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        fractions.append(
            (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (size / resource.getpagesize())
        )
    return min(fractions[1:])


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")]
    _fields_ += [(name, ctypes.c_size_t) for name in ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def switches() -> tuple[bool, float]:
    """glibc's state itself (``mallinfo2``, glibc >= 2.33): whether a 256 MiB block gets its own mmap, and how many
    MiB of free memory stay at the heap's top after 128 MiB of 100 KiB blocks (below any mmap threshold) are freed."""
    libc = glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], MallInfo2
    before = libc.mallinfo2().hblks
    block = libc.malloc(256 * 2**20)
    mmapped = libc.mallinfo2().hblks > before
    libc.free(block)
    blocks = [libc.malloc(100 * 1024) for _ in range(1280)]
    for block in reversed(blocks):
        libc.free(block)
    return mmapped, libc.mallinfo2().keepcost / 2**20


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def measured_in_a_fresh_process() -> dict[str, float]:
    """Runs in its own interpreter (``python tests/test_cpu_heap_reuse.py``). A check after a release uses 256 MiB
    blocks: no hole the 64 MiB blocks of a held stretch left in the heap can serve one, so it sees the switches."""
    seen = {"default": refill_fraction(64), "default_top": top_refill_fraction(), "default_switches": switches()}
    with cpu_heap_reuse(False) as held:
        seen["disabled"], seen["disabled_held"] = refill_fraction(64), held
    with cpu_heap_reuse() as held:
        seen["context"], seen["context_held"] = refill_fraction(64), held
        seen["context_top"], seen["context_switches"] = top_refill_fraction(), switches()
    seen["after_context"], seen["after_context_top"] = refill_fraction(256), top_refill_fraction(256)
    first, second = CPUHeapReuse(), CPUHeapReuse()
    seen["both_held"] = first.hold() and second.hold()
    seen["two_holders"] = refill_fraction(64)
    first.release()  # another trainer still runs: the switches stay
    seen["one_holder_left"], seen["one_holder_left_top"] = refill_fraction(64), top_refill_fraction()
    kept = rss_bytes()
    second.release()
    seen["rss_given_back_mib"] = (kept - rss_bytes()) / 2**20
    seen["after_last_release"], seen["after_last_release_switches"] = refill_fraction(256), switches()
    return seen


@pytest.mark.skipif(not hasattr(glibc(), "mallinfo2"), reason="glibc >= 2.33 (mallinfo2)")
def test_freed_memory_is_reused_while_held_then_given_back():
    # glibc's tunables, another malloc preloaded (jemalloc, as PyTorch's tuning guide suggests) or MALLOC_*
    # settings would change what is measured: the child runs with glibc's own defaults.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and "MALLOC" not in k}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    for check in ("default", "default_top", "disabled", "after_context", "after_context_top", "after_last_release"):
        assert seen[check] > 0.9, (check, seen)  # a fresh mmap each time: every page faulted in again
    for check in ("context", "context_top", "two_holders", "one_holder_left", "one_holder_left_top"):
        assert seen[check] < 0.1, (check, seen)
    assert seen["context_held"] and seen["both_held"] and not seen["disabled_held"]
    for check in ("default_switches", "after_last_release_switches"):
        mmapped, top_kept_mib = seen[check]
        assert mmapped and top_kept_mib < 64, (check, seen)  # glibc's defaults (the trim threshold adapts to 64 MiB)
    mmapped, top_kept_mib = seen["context_switches"]
    assert not mmapped and top_kept_mib > 120, seen
    assert seen["rss_given_back_mib"] > 32, seen  # the last release returned the free heap to the system


def test_only_a_cpu_trainer_switches():
    heap = CPUHeapReuse()
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    heap.setup(gpu, None, "fit")
    assert not heap.holding and CPUHeapReuse._holders == 0
    heap.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))), None, "fit")
    try:
        assert heap.holding and CPUHeapReuse._holders == 1
    finally:
        heap.teardown(None, None, "fit")
    assert not heap.holding and CPUHeapReuse._holders == 0


@pytest.mark.parametrize("fail", [False, True], ids=["generates", "fails"])
def test_likeness_score_generates_on_the_cpu_with_the_switches_held(fail):
    from metrics.score_command import ScoreCommand

    seen = {}

    def from_checkpoint(device: str):
        seen["device"], seen["holders"] = device, CPUHeapReuse._holders
        if fail:
            raise RuntimeError("generation failed")
        return [], [], {}

    command = SimpleNamespace(inputs=SimpleNamespace(ckpt="run.ckpt"), _from_checkpoint=from_checkpoint)
    if fail:
        with pytest.raises(RuntimeError, match="generation failed"):
            ScoreCommand._generate(command)
    else:
        ScoreCommand._generate(command)
    assert seen["holders"] == (seen["device"] == "cpu")
    assert CPUHeapReuse._holders == 0


class Probe(L.Callback):
    """Sees how many hold the switches inside the first training step; raises there when ``fail``."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.holders = fail, None

    def on_train_batch_start(self, *_) -> None:
        self.holders = CPUHeapReuse._holders
        if self.fail:
            raise RuntimeError("probe stops the fit")


@pytest.mark.parametrize("fail", [False, True], ids=["fit", "failed fit"])
def test_a_lora_fit_on_the_cpu_holds_the_switches_and_lets_go(tiny_sd, demo_photos, tmp_path, fail):
    from datamodules.face_data_module import FaceDataModule
    from lightning_modules.lora_diffusion import LoRADiffusion

    probe = Probe(fail)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
    )
    data = FaceDataModule(data_dir=str(demo_photos), resolution=64, cache_dir=str(tmp_path / "cache"))
    if fail:
        with pytest.raises(RuntimeError, match="probe stops the fit"):
            trainer.fit(LoRADiffusion(str(tiny_sd)), data)
    else:
        trainer.fit(LoRADiffusion(str(tiny_sd)), data)
    assert probe.holders == 1  # the module brought the callback along
    assert CPUHeapReuse._holders == 0


if __name__ == "__main__":
    # Transparent huge pages (``always`` on RHEL-like systems) fault a 2 MiB page at a time: counted per 4 KiB
    # page, a fresh mmap would look like kept memory. Off for this process (PR_SET_THP_DISABLE).
    ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)
    print(json.dumps(measured_in_a_fresh_process()))
