"""On a CPU, the memory one training step frees stays in the process for the next step (issue #9).

PyTorch's CPU convolutions (oneDNN) reorder every frozen conv weight into their blocked layout on every call,
forward and backward, into a fresh weight-sized buffer. glibc's malloc serves each such buffer (above its mmap
threshold of 128 KiB to 32 MiB) with a new ``mmap`` and hands it back with ``munmap``, so the kernel maps and
zero-fills every page again on the next call: on SD1.5 at 64 px, batch 8, 3.6 GB and 920,000 page faults a step, a
third of the step spent in the kernel (AMD EPYC, 2 cores: a UNet LoRA step 3.0 s, 1.8 s with this). On a GPU the
CUDA caching allocator keeps freed memory the same way; PyTorch's performance tuning guide gets it on a CPU by
preloading jemalloc or tcmalloc. Here glibc's own switches (``mallopt``) do it for the length of a fit, validate,
test or predict: no ``mmap`` for large blocks, and the free memory at the heap's top kept. The peak memory stays
what it was (the buffers existed anyway; 4.3 GB both ways on that run), but it is not given back between steps;
at the end it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Iterator

import lightning as L

# mallopt parameters of glibc's <malloc.h> and their defaults (malloc/malloc.c).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: free memory at the heap's top up to 2 GiB stays


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else ``None``: macOS's and musl's malloc have no such switches."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def cpu_heap_reuse(enabled: bool = True) -> Iterator[bool]:
    """The same switches around work done outside a trainer (``likeness score`` generating on a CPU, the
    benchmark's plain recipe); yields whether they are on. ``enabled=False`` leaves malloc as it is."""
    heap = CPUHeapReuse()
    try:
        yield enabled and heap.hold()
    finally:
        heap.release()


class CPUHeapReuse(L.Callback):
    """Keeps freed memory in glibc's heap while a trainer runs on the CPU; gives it back when it ends.

    Attached by :meth:`LoRADiffusion.configure_callbacks`, so every fit, validate, test or predict has it. Does
    nothing on a GPU or without glibc. The switches are process-wide: two trainers of one process share them,
    and they are set back when the last one ends (also when it fails). After that glibc's threshold for ``mmap``
    stays fixed at its default instead of adapting to the sizes it has seen.
    """

    _holders = 0  # trainers of this process running with the switches on

    def __init__(self) -> None:
        self.holding = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu":
            self.hold()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()  # Lightning calls no teardown hook after an error

    def hold(self) -> bool:
        """Switch on (once per callback); ``False`` where glibc is not there to switch."""
        if self.holding:
            return True
        libc = glibc()
        if libc is None:
            return False
        if CPUHeapReuse._holders == 0:
            # Both calls return 1 on success; glibc accepts these values in every version.
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
        CPUHeapReuse._holders += 1
        self.holding = True
        return True

    def release(self) -> None:
        """Switch off when this was the last holder, and return the free memory to the system."""
        if not self.holding:
            return
        self.holding = False
        CPUHeapReuse._holders -= 1
        libc = glibc()
        if CPUHeapReuse._holders == 0 and libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
