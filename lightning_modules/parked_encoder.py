"""The VAE encoder waits on the CPU while every training latent comes from the cache (issue #9: during training
it runs nowhere and should hold no GPU memory: 34 M parameters, 136 MB in float32, 68 MB in bfloat16)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class ParkedEncoder:
    """Moves ``vae.encoder`` and ``vae.quant_conv`` to the CPU and back; the decoder stays where it is.

    kohya's sd-scripts moves the whole VAE to the CPU once latents are cached; the decoder is kept here because
    validation decodes every few hundred steps. Anything that encodes or builds a pipeline brings the encoder home
    first (:meth:`home`): older diffusers take a pipeline's device from its first module's first parameter, the
    encoder's, and would run generation on the CPU otherwise.

    Args:
        vae: the frozen ``AutoencoderKL`` (any module with ``encoder`` and, optionally, ``quant_conv``).
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        self.parked = False

    def _parts(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae.encoder, getattr(self.vae, "quant_conv", None)) if m is not None]

    def park(self) -> bool:
        """To the CPU, from wherever the model runs; ``False`` when that is the CPU (nothing to do)."""
        parts = self._parts()
        if any(p.device.type != "cpu" for m in parts for p in m.parameters()):
            for module in parts:
                module.to("cpu")
            self.parked = True
        return self.parked

    def unpark(self, device: torch.device) -> None:
        """Back beside the rest of the model, on ``device``, if parked."""
        if self.parked:
            for module in self._parts():
                module.to(device)
            self.parked = False

    @contextmanager
    def home(self, device: torch.device) -> Iterator[None]:
        """The encoder on ``device`` for the block, parked again afterwards if it was parked before."""
        was_parked = self.parked
        self.unpark(device)
        try:
            yield
        finally:
            if was_parked:
                self.park()
