"""On a CPU the memory a step frees stays in the process for the next (callbacks/cpu_heap_reuse.py, issue #9).

Measured by what the switches are for: page faults. Filling a freshly allocated 64 MiB tensor faults in its 16,384
pages when glibc serves it with a new mmap (the default for a block that size) and almost none when it comes from
memory the heap kept.
"""

from __future__ import annotations

import resource
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks.cpu_heap_reuse import CPUHeapReuse, glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="glibc's malloc switches (Linux)")

BLOCK, FREED = 64 * 2**20, 96 * 2**20  # both above the 32 MiB up to which glibc's mmap threshold adapts
PAGES = BLOCK // resource.getpagesize()


def refill_faults(trim_first: bool = False) -> int:
    """Page faults of filling a 64 MiB tensor allocated right after a 96 MiB one was freed (the smaller block fits
    in the larger one's place whatever else the heap holds around it). ``trim_first``: return the free memory
    that earlier tests left in this process's heap first, so only what happens now counts."""
    if trim_first:
        glibc().malloc_trim(0)
    torch.ones(FREED // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(BLOCK // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_memory_is_reused_while_held_then_given_back():
    assert refill_faults(trim_first=True) > 0.9 * PAGES  # the default: a fresh mmap, every page faulted in again
    first, second = CPUHeapReuse(), CPUHeapReuse()
    try:
        assert first.hold() and second.hold()
        assert refill_faults() < 0.1 * PAGES
        kept = rss_bytes()
        first.release()  # another trainer still runs: the switches stay
        assert refill_faults() < 0.1 * PAGES
    finally:
        first.release()
        second.release()
    assert rss_bytes() < kept - BLOCK // 2  # the last release returned the free heap to the system
    assert refill_faults(trim_first=True) > 0.9 * PAGES


def test_only_a_cpu_trainer_switches():
    heap = CPUHeapReuse()
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    heap.setup(gpu, None, "fit")
    assert not heap.holding
    heap.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))), None, "fit")
    try:
        assert heap.holding and refill_faults() < 0.1 * PAGES
    finally:
        heap.teardown(None, None, "fit")
    assert not heap.holding and refill_faults(trim_first=True) > 0.9 * PAGES


class Probe(L.Callback):
    """Measures the refill faults inside the first training step; raises there when ``fail``."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.faults = fail, None

    def on_train_batch_start(self, *_) -> None:
        self.faults = refill_faults()
        if self.fail:
            raise RuntimeError("probe stops the fit")


@pytest.mark.parametrize("fail", [False, True], ids=["fit", "failed fit"])
def test_a_lora_fit_on_the_cpu_reuses_freed_memory_and_switches_back(tiny_sd, demo_photos, tmp_path, fail):
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
    assert probe.faults is not None and probe.faults < 0.1 * PAGES  # the module brought the callback along
    assert CPUHeapReuse._holders == 0 and refill_faults(trim_first=True) > 0.9 * PAGES
