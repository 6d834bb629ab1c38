"""Hugging Face Hub models that load from the local cache first and fail in seconds offline (issues #10, #11).

huggingface_hub's own calls retry with backoff for 25-55 s when the network is down before they give up, and
their error names neither the setting nor the way out. Here: a copy already in the local cache is used without
touching the network; otherwise one probe with a short timeout decides between downloading and the cache.
``HF_HUB_OFFLINE=1`` skips the probe.
"""

from __future__ import annotations

import os

from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

# One probe with a short timeout instead of the Hub client's retries.
HUB_PROBE_TIMEOUT_S = 5.0


class HubAccessError(ValueError):
    """A Hub model cannot be reached or used; the message names the setting and what to do."""


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (read now, not at import, so a late ``export`` is honoured)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def is_cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """Whether ``filename`` of the Hub repo is in the local Hugging Face cache (no network)."""
    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except HFValidationError:
        return False
    return isinstance(found, str)


def hub_local_only(repo_id: str, revision: str | None, setting: str, probe_file: str = "config.json") -> bool:
    """Whether to load ``repo_id`` from the local cache only, without the network.

    Yes when offline mode is on, when ``probe_file`` of the (unpinned) repo is cached already, or when the Hub does
    not answer one quick probe; no when the Hub answers and the repo exists.

    Raises:
        HubAccessError: the Hub says the repo is gated, missing, or the revision does not exist.
    """
    if hub_offline() or (revision is None and is_cached(repo_id, probe_file)):
        return True
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as e:
        raise HubAccessError(
            f"{setting} {repo_id}: gated on the Hub. Accept its license on huggingface.co and log in (`hf auth login`)."
        ) from e
    except RevisionNotFoundError as e:
        raise HubAccessError(f"{setting} {repo_id}: revision {revision!r} not found on the Hub.") from e
    except RepositoryNotFoundError as e:
        raise HubAccessError(
            f"{setting} {repo_id}: not a local path and not a model on the Hub (or a private one: log in with "
            "`hf auth login`)."
        ) from e
    except HFValidationError as e:
        raise HubAccessError(f"{setting} {repo_id}: neither an existing path nor a valid Hub id ('org/name').") from e
    except Exception:  # noqa: BLE001 - any network failure: use the cache, whose miss says what is missing
        return True
    return False


def not_cached_message(repo_id: str, setting: str, way_out: str = "") -> str:
    """What to say when a Hub model is needed, not cached, and cannot be downloaded now."""
    return (
        f"{setting} {repo_id}: cannot download it (offline, HF_HUB_OFFLINE=1, or the Hub is unreachable) and there "
        "is no local copy in the Hugging Face cache. While online, run `likeness prefetch --config CONFIG` (it "
        f"downloads every model a config needs), or on a machine with network `hf download {repo_id} --local-dir "
        f"DIR`, copy DIR here and set {setting} DIR{way_out}."
    )
