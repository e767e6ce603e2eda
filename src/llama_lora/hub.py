"""Talking to the Hugging Face hub: fail fast offline, and turn hub failures into one clear paragraph.

Offline, huggingface_hub retries every request for about 25 s before giving up with a generic message.
We first try the local cache, then check in under a few seconds whether the hub answers at all, and only
then download, so an offline machine gets an immediate explanation instead of a retry storm.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from llama_lora.errors import HubError

_PROBE_TIMEOUT_S = 3.0
T = TypeVar("T")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def token_present() -> bool:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # noqa: BLE001 - an unreadable token file is the same as none
        return False


def _advice(repo: str, kind: str) -> str:
    page = f"{hub_endpoint()}/{'datasets/' if kind == 'dataset' else ''}{repo}"
    local = (
        "data.source at a local .json/.jsonl/.csv/.parquet file"
        if kind == "dataset"
        else (
            "model.name at a local model directory or .gguf file (or use the offline default "
            "smollm2-135m-instruct)"
        )
    )
    return (
        f"If the {kind} is gated, accept its licence at {page} and provide a token (set HF_TOKEN or run "
        f"`hf auth login`). Without network access, point {local}; a copy already in the hub cache is used "
        "with HF_HUB_OFFLINE=1."
    )


def unreachable_error(repo: str, kind: str) -> HubError:
    why = (
        "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache"
        if offline_mode()
        else (f"the hub at {hub_endpoint()} cannot be reached from this machine (no network?)")
    )
    return HubError(
        f"Could not download the {kind} '{repo}' from the Hugging Face hub: {why}. {_advice(repo, kind)}"
    )


def explain(exc: BaseException, repo: str, kind: str) -> HubError:
    """Map an exception raised while fetching `repo` to one clear paragraph."""
    from huggingface_hub import errors as hf_errors

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(err, hf_errors.GatedRepoError) or status in (401, 403):
            who = "with the token provided" if token_present() else "without a token"
            return HubError(
                f"Access to the {kind} '{repo}' was refused by the Hugging Face hub ({status or 'gated'}, "
                f"tried {who}). {_advice(repo, kind)}"
            )
        if isinstance(err, hf_errors.RepositoryNotFoundError) or status == 404:
            return HubError(
                f"The {kind} '{repo}' does not exist on the Hugging Face hub (or is private). Check the name; "
                f"{_advice(repo, kind)}"
            )
        if isinstance(err, hf_errors.RevisionNotFoundError):
            return HubError(f"The {kind} '{repo}' has no such revision. Check model.revision.")
        if isinstance(err, (hf_errors.LocalEntryNotFoundError, ConnectionError)):
            return unreachable_error(repo, kind)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HubError(
        f"Could not load the {kind} '{repo}' from the Hugging Face hub: {first}. {_advice(repo, kind)}"
    )


def require_hub(repo: str, kind: str) -> None:
    """Raise the clear offline error now rather than after ~25 s of retries."""
    if offline_mode() or not hub_reachable():
        raise unreachable_error(repo, kind)


def cache_first(
    fetch: Callable[..., T], repo: str, kind: str, usable: Callable[[T], bool] | None = None
) -> T:
    """`fetch(local_files_only=True)` from the hub cache, with no network; where that fails (or gives what
    `usable` refuses) the hub is checked first (`require_hub`), then `fetch(local_files_only=False)`
    downloads, a hub failure becoming one clear error (`explain`)."""
    try:
        found = fetch(local_files_only=True)
        if usable is None or usable(found):
            return found
    except Exception:  # noqa: BLE001 - not cached (or incomplete): fall through to a download
        pass
    require_hub(repo, kind)
    try:
        return fetch(local_files_only=False)
    except (OSError, ValueError) as exc:
        raise explain(exc, repo, kind) from None
