"""A Hugging Face hub model, asked for once before transformers reads it.

transformers reports a missing, gated or unreachable repository only after huggingface_hub has retried each
failed request five times, 1 to 8 s apart (~23 s a request), then raises a long traceback that names neither
the model nor what to do; with the hub unreachable it retries so even for a model it has cached. One HEAD
request for the model's first file, without retries and within HF_HUB_ETAG_TIMEOUT, tells these cases apart
at once: the hub serves the model (transformers downloads it as usual), or it cannot be asked and the cached
snapshot is read as a local directory (no request at all in offline mode), or neither, in one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_OR_LOCAL = "or pass a local directory or .gguf file"


@dataclass(frozen=True)
class HubModel:
    """Where to read a hub model from (`load_path`: the hub id, or its cached snapshot directory), or why it
    cannot be read (`problem`: one line that names the model and says what to do). Exactly one is set."""

    load_path: str | None = None
    problem: str | None = None


def find_hub_model(repo_id: str, filename: str) -> HubModel:
    """Ask for `filename` (the model's first file: config.json, or its GGUF file) of hub repository `repo_id`."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
    )
    from huggingface_hub.utils import httpx

    model = f"model {repo_id}"
    cached = try_to_load_from_cache(repo_id, filename)
    # snapshots/<commit>/<filename>: the directory transformers can read offline
    snapshot = str(Path(cached).parents[len(Path(filename).parts) - 1]) if isinstance(cached, str) else None
    if constants.is_offline_mode():
        if snapshot is not None:
            return HubModel(load_path=snapshot)
        return HubModel(problem=f"{model}: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading "
                                f"it; run `hf download {repo_id}` while online, {_OR_LOCAL}")
    hub = f"the hub at {constants.ENDPOINT}"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename))  # no retries; timeout HF_HUB_ETAG_TIMEOUT
    except RemoteEntryNotFoundError:  # the repository answers: this file is not in it (a cached copy is stale)
        if filename == "config.json":
            return HubModel(problem=f"{model}: the repository has no config.json; if it holds GGUF files, name one "
                                    "with --gguf-file")
        return HubModel(problem=f"{model}: the repository has no file {filename}; check --gguf-file")
    except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
        error: Exception = exc
        problem = (f"gated on the Hugging Face hub; request access at {constants.ENDPOINT}/{repo_id}, then log in "
                   "with `hf auth login` (or set HF_TOKEN)")
    except RepositoryNotFoundError as exc:  # also the hub's answer for a private repository without a token
        error = exc
        problem = (f"no such local path, nor a repository on {hub}; check the name, log in with `hf auth login` "
                   f"if it is private, {_OR_LOCAL}")
    except HfHubHTTPError as exc:  # the hub is down or refuses (5xx, rate limit, a disabled repository)
        error = exc
        problem = (f"not in the Hugging Face cache, and {hub} answered HTTP {exc.response.status_code}; try again "
                   f"later, {_OR_LOCAL}")
    except httpx.TimeoutException as exc:
        error = exc
        problem = (f"not in the Hugging Face cache, and {hub} did not answer within {constants.HF_HUB_ETAG_TIMEOUT} s "
                   f"(HF_HUB_ETAG_TIMEOUT); check the network or HF_ENDPOINT, {_OR_LOCAL}")
    except httpx.TransportError as exc:  # connection refused, DNS failure, TLS or proxy errors
        error = exc
        problem = (f"not in the Hugging Face cache, and {hub} cannot be reached ({exc}); check the network or "
                   f"HF_ENDPOINT, {_OR_LOCAL}")
    else:
        return HubModel(load_path=repo_id)  # transformers downloads it, or refreshes its cached copy
    if snapshot is None:
        return HubModel(problem=f"{model}: {problem}")
    log.warning("%s: %s did not serve it (%s); reading the cached copy in %s", model, hub, type(error).__name__,
                snapshot)
    return HubModel(load_path=snapshot)
