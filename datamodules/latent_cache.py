"""VAE latents of the training photos, encoded once before step 1 and kept on disk (issue #9).

An entry holds the mean and standard deviation of the VAE's latent distribution of one photo in one orientation:
what a training step needs to draw a latent exactly as encoding the photo then would. Entries are keyed by the
photo's bytes, the VAE encoder's weights, the resolution and the crop, so a changed photo, another base model or
another setting never reads a stale entry, while a second run and a resume reuse them. Each entry is written as
soon as it is encoded (an interrupted build keeps what it did), atomically and with a checksum: a torn or corrupt
file is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from lightning.pytorch.utilities import rank_zero_warn
from tqdm.auto import tqdm

from datamodules.files import write_atomically

# Bump when what an entry means changes (crop or resize code, stored fields): old entries are then not read.
FORMAT = "likeness-latents-1"

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(*modules: torch.nn.Module | None) -> str:
    """A digest of the modules' parameter names, dtypes, shapes and values (an edited VAE is another VAE)."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checksum(mean: torch.Tensor, std: torch.Tensor) -> str:
    return hashlib.sha256(mean.numpy().tobytes() + std.numpy().tobytes()).hexdigest()


@dataclass
class CacheReport:
    reused: int = 0
    encoded: int = 0
    rebuilt: int = 0  # corrupt entries found, encoded again


class LatentCache:
    """Latent moments on disk under ``folder/<VAE fingerprint>/``, one safetensors file per (photo, flip).

    Args:
        folder: cache root (e.g. ``~/.cache/likeness/latents``).
        vae_fingerprint: :func:`weights_fingerprint` of the VAE encoder the entries come from.
        resolution: training resolution.
    """

    def __init__(self, folder: str | Path, vae_fingerprint: str, resolution: int) -> None:
        self.folder = Path(folder).expanduser() / vae_fingerprint[:32]
        self.resolution = resolution

    def entry_path(self, image_digest: str, flip: bool, crop: str = "center") -> Path:
        """The entry of a photo's crop (``center``, or a face crop's ``CropWindow.key``) in one orientation."""
        key = f"{FORMAT}|{image_digest}|{self.resolution}|{crop}|flip={flip}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"

    def load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry's (mean, std); ``None`` when absent. A corrupt entry is removed and raises ``ValueError``."""
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as file:
                data = file.read()
            tensors = safetensors.torch.load(data)
            mean, std = tensors["mean"], tensors["std"]
            header_checksum = _read_checksum(data)
            ok = (
                mean.shape == std.shape
                and mean.ndim == 3
                and mean.dtype == std.dtype == torch.float32
                and header_checksum == _checksum(mean, std)
            )
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, it is not trusted
            ok, why = False, f"{type(err).__name__}: {err}"
        else:
            why = "checksum, shape or dtype mismatch"
        if not ok:
            path.unlink(missing_ok=True)
            raise ValueError(f"corrupt latent cache entry {path} ({why})")
        return mean, std

    def save(self, path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean, std = mean.float().contiguous(), std.float().contiguous()
        metadata = {"format": FORMAT, "sha256": _checksum(mean, std)}
        write_atomically(path, safetensors.torch.save({"mean": mean, "std": std}, metadata=metadata))

    def fill(
        self,
        images: list[Path],
        flips: Iterable[bool],
        pixels: Callable[[int, bool], torch.Tensor],
        encode: Encoder,
        batch_size: int = 4,
        progress: bool = True,
        crops: list[str] | None = None,
    ) -> tuple[dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]], CacheReport]:
        """Entries for every ``(image index, flip)``: read from disk, or ``encode(pixels(i, flip))`` and written.

        Args:
            images: the photos (their bytes key the entries).
            flips: the orientations to keep (``(False, True)`` with random flips).
            pixels: the training transform's tensor of photo ``i`` (flipped or not), in [-1, 1].
            encode: a batch of pixels -> latent (mean, std).
            batch_size: photos encoded together.
            progress: show a progress bar while encoding.
            crops: each photo's crop key (``center``, or a face crop's window); default: all ``center``.
        """
        entries: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        report, todo = CacheReport(), []
        flips = tuple(flips)
        for index, image in enumerate(images):
            digest = file_digest(image)
            for flip in flips:
                path = self.entry_path(digest, flip, crops[index] if crops is not None else "center")
                try:
                    entry = self.load(path)
                except ValueError as err:
                    rank_zero_warn(f"{err}: encoding it again.")
                    report.rebuilt += 1
                    entry = None
                if entry is None:
                    todo.append((index, flip, path))
                else:
                    entries[index, flip] = entry
                    report.reused += 1
        for start in tqdm(
            range(0, len(todo), batch_size), desc="Caching latents", unit="batch", disable=not progress or not todo
        ):
            chunk = todo[start : start + batch_size]
            mean, std = encode(torch.stack([pixels(index, flip) for index, flip, _ in chunk]))
            for (index, flip, path), m, s in zip(chunk, mean.cpu(), std.cpu(), strict=True):
                m, s = m.float().clone(), s.float().clone()  # own storage, not a view of the batch
                self.save(path, m, s)
                entries[index, flip] = (m, s)
                report.encoded += 1
        return entries, report


def _read_checksum(data: bytes) -> str | None:
    """The checksum in a safetensors file's header (8-byte little-endian length, then JSON)."""
    (header_size,) = struct.unpack("<Q", data[:8])
    return (json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}).get("sha256")
