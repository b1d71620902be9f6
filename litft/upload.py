"""``litft upload <dir> <repo_id>``: push a folder (``convert to_hf`` / ``to_peft`` output) to the Hugging Face Hub.

A thin layer over ``huggingface_hub`` (``create_repo`` + ``upload_folder``) that checks the arguments before any
network call and turns offline/connection/authorisation failures into one clear line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional


def upload(
    directory: Path,
    repo_id: str,
    private: bool = False,
    access_token: Optional[str] = None,
    commit_message: str = "Upload with litft",
) -> str:
    """Upload a folder to a Hugging Face Hub model repository (created if it does not exist).

    Args:
        directory: the folder to upload, e.g. the output of ``litft convert to_hf`` or ``litft convert to_peft``.
        repo_id: the Hub repository, ``<user or organisation>/<name>``.
        private: create the repository as private (an existing repository keeps its visibility).
        access_token: a Hub token with write access; default the HF_TOKEN environment variable or the token
            saved by ``hf auth login``.
        commit_message: the message of the upload commit.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory to upload")
    files = [f for f in directory.rglob("*") if f.is_file() and not any(p.startswith(".") for p in
                                                                         f.relative_to(directory).parts)]
    if not files:
        raise ValueError(f"{directory}: nothing to upload (the folder is empty)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id {repo_id!r}: expected <user or organisation>/<name>, e.g. my-name/my-model")
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError as e:
        raise RuntimeError(f"upload needs huggingface_hub ({e}); install it with `pip install huggingface_hub`") \
            from e
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repository name: {e}") from e
    names = {f.name for f in directory.iterdir()}
    if "config.json" not in names and "adapter_config.json" not in names:
        hint = (" It is a litft checkpoint (model_config.yaml): transformers/vLLM users need "
                f"`litft convert to_hf {directory} <out_dir>` first." if "model_config.yaml" in names else "")
        print(f"note: {directory} has neither config.json (a transformers model) nor adapter_config.json (a PEFT "
              f"adapter).{hint}", file=sys.stderr, flush=True)

    from huggingface_hub import HfApi, constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("cannot upload: the Hugging Face Hub is switched off on this machine (HF_HUB_OFFLINE=1); "
                           "unset HF_HUB_OFFLINE to upload")
    api = HfApi(token=access_token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message, repo_type="model",
                          ignore_patterns=[".*", "**/.*"])
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the likely cause
        raise RuntimeError(_explain(e, repo_id, endpoint)) from e
    print(f"uploaded {len(files)} file(s) from {directory} to {url}", flush=True)
    return str(url)


def _explain(error: Exception, repo_id: str, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "cannot upload: the Hugging Face Hub is switched off on this machine (HF_HUB_OFFLINE=1)"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return (f"the Hub refused the upload to {repo_id!r} (HTTP {status}): pass --access_token with a token that "
                "has write access, or log in with `hf auth login`")
    if isinstance(error, HfHubHTTPError):
        return f"the Hub refused the upload to {repo_id!r}: {error}"
    return (f"cannot reach the Hugging Face Hub at {endpoint} ({type(error).__name__}: {error}); check the network "
            "connection, proxy settings and HF_ENDPOINT")
