"""What the frozen encoders make of the training data, computed once before step 1 instead of every step.

The VAE's latents go to the on-disk :class:`~datamodules.latent_cache.LatentCache` (issue #9); the frozen text
encoder's hidden states of the captions and the base model's view of the regularisation prompts (issue #12) are
kept in memory. :class:`~datamodules.face_data_module.FaceDataModule` calls :func:`prepare_encodings` when
Lightning first asks for the training loader, once the model is on its device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.latent_cache import CacheReport, LatentCache, weights_fingerprint

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.strategies import Strategy

    from datamodules.image_caption_dataset import ImageCaptionDataset


def prepare_encodings(
    dataset: ImageCaptionDataset,
    model: L.LightningModule,
    cache_latents: bool,
    cache_root: Path,
    prior_prompts: list[str],
    strategy: Strategy | None = None,
    rank: int = 0,
) -> CacheReport | None:
    """Cache what the frozen encoders of ``model`` make of ``dataset``, as far as it can be cached.

    Latents (the VAE's moments) when ``cache_latents`` and the crops never change (center, or face without
    jitter); the text encoder's hidden states of the captions and the empty prompt when
    ``model.text_encoder_frozen``; the base text encoder's view of ``prior_prompts`` when the model trains prior
    preservation (``model.use_prior_prompts``). ``model`` gives ``vae``, ``latent_moments(pixels)`` and
    ``encode_prompts(input_ids)``. Rank 0 encodes and writes the latent cache under ``cache_root``; the other ranks
    read it. Returns the latent cache's report (``None`` when no latents were cached).
    """
    report = None
    if cache_latents and not dataset.cacheable:
        why = "random crops" if dataset.crop == "random" else "face crops with data.face_scale_jitter > 0"
        rank_zero_info(
            f"{why.capitalize()} cannot be cached, so the VAE encodes every batch as it trains (data.crop center, "
            "or face without jitter, trains from cached latents)."
        )
    elif cache_latents and hasattr(model, "latent_moments"):
        vae = model.vae
        fingerprint = weights_fingerprint(vae.encoder, vae.quant_conv)
        precision = getattr(model, "encoding_precision", "32-true")
        if precision != "32-true":
            # Encoded under autocast the moments differ (~1 % in bf16): a float32 run must not train on them.
            fingerprint = hashlib.sha256(f"{fingerprint}|{precision}".encode()).hexdigest()
        cache = LatentCache(cache_root, fingerprint, dataset.resolution)
        flips = (False, True) if dataset.random_flip else (False,)
        if strategy is not None and rank != 0:
            strategy.barrier()  # rank 0 writes the entries first
        images = [pair.image for pair in dataset.pairs]
        crops = [dataset.crop_key(i) for i in range(len(dataset))]
        dataset.latents, report = cache.fill(
            images, flips, dataset.pixels, model.latent_moments, progress=rank == 0, crops=crops
        )
        if strategy is not None and rank == 0:
            strategy.barrier()
        parked = model.park_vae_encoder() if hasattr(model, "park_vae_encoder") else False
        rank_zero_info(
            f"Latent cache {cache.folder}: {report.reused} entries reused, {report.encoded} encoded"
            + (f" ({report.rebuilt} corrupt ones rebuilt)" if report.rebuilt else "")
            + "; the VAE encoder does not run during training"
            + (" and waits on the CPU." if parked else ".")
        )
    if getattr(model, "text_encoder_frozen", False):
        ids = dataset.input_ids
        dataset.hidden_states = torch.cat(
            [model.encode_prompts(ids[i : i + 32]).float().cpu() for i in range(0, len(ids), 32)]
        )
        if dataset.caption_dropout:  # dropped captions train on the empty prompt
            dataset.empty_hidden_state = model.encode_prompts(dataset.empty_input_ids[None]).float().cpu()[0]
        rank_zero_info(f"Text encoder frozen: embeddings of the {len(ids)} captions computed once.")
    if prior_prompts:
        model.use_prior_prompts(prior_prompts)
        rank_zero_info(
            f"Prior preservation: {len(prior_prompts)} regularisation prompt(s), weight "
            f"{model.hparams.prior_loss_weight}; the base model's view of them computed once. Each step runs the "
            "UNet on twice the batch, and once more without gradient for the base model's prediction."
        )
    return report
