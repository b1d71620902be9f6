"""``litft download``: fetch a model from the Hugging Face Hub and convert it to a litft checkpoint.

Only the files transformers itself would load are fetched: ``config.json``, the tokenizer files and the
weights in HF layout, safetensors preferred. Duplicates that many repos also carry (``original/*.pth``,
``consolidated*.safetensors``, ``pytorch_model*.bin`` next to safetensors, GGUF, ...) are skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

from litft.weights import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES

CONFIG_FILE = "config.json"
BIN_SINGLE_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
HF_SUBDIR = "hf"  # where --keep_hf leaves the Hugging Face files inside the checkpoint


def select_metadata_files(repo_files: list[str], tokenizer_only: bool = False) -> list[str]:
    """The small files to fetch first: tokenizer files, and (unless ``tokenizer_only``) ``config.json`` and
    the weights index (the safetensors one when the repo has safetensors weights)."""
    root = {f for f in repo_files if "/" not in f}
    wanted = list(TOKENIZER_FILES)
    if not tokenizer_only:
        wanted += [CONFIG_FILE, INDEX_FILE if _root_safetensors(root) else BIN_INDEX_FILE]
    return sorted(f for f in root if f in wanted)


def select_weight_files(repo_files: list[str], index: Optional[dict] = None) -> list[str]:
    """The weight files to fetch, given the repo's file list and its weights index (already fetched) if any.

    Order of preference, as transformers loads them: the safetensors index and the shards it names,
    ``model.safetensors``, other top-level ``*.safetensors`` except ``consolidated*`` (the original
    non-HF layout), then the same for ``pytorch_model*.bin``. Sub-folders (``original/``) are never fetched.
    """
    root = sorted(f for f in repo_files if "/" not in f)
    if index is not None:
        try:
            shards = sorted(set(index["weight_map"].values()))
        except (KeyError, AttributeError) as e:
            raise ValueError(f"the repo's weights index is not a JSON object with a 'weight_map': {e}") from None
        return shards
    if SINGLE_FILE in root:
        return [SINGLE_FILE]
    if _root_safetensors(set(root)):
        return sorted(_root_safetensors(set(root)))
    if BIN_SINGLE_FILE in root:
        return [BIN_SINGLE_FILE]
    bins = [f for f in root if f.startswith("pytorch_model") and f.endswith(".bin")]
    if bins:
        return bins
    raise ValueError("the repo has no weights in Hugging Face layout (model*.safetensors or pytorch_model*.bin); "
                     f"its top-level files are: {', '.join(root) or '(none)'}")


def _root_safetensors(root: set[str]) -> list[str]:
    return [f for f in root if f.endswith(".safetensors") and not f.startswith("consolidated")]


def known_models() -> list[str]:
    """The HF repo ids of the zoo's named configs (what ``litft download`` with no argument lists)."""
    from litft.zoo import all_configs

    return [c.hf_id or c.name for c in all_configs()]


def download(
    repo_id: Optional[str] = None,
    checkpoint_dir: Path = Path("checkpoints"),
    access_token: Optional[str] = None,
    tokenizer_only: bool = False,
    convert: bool = True,
    dtype: Optional[str] = None,
    keep_hf: bool = False,
    overwrite: bool = False,
) -> Optional[Path]:
    """Download and convert: ``litft download <repo_id>`` writes ``<checkpoint_dir>/<repo_id>``; alone, lists models.

    Any repo of a supported architecture works, named in the zoo or not: sizes are read from the repo's own
    config.json. An interrupted download resumes from ``<checkpoint_dir>/<org>/.<name>.download`` when run again.

    Args:
        repo_id: HF repo id (``meta-llama/Llama-3.2-1B``) or a zoo short name (``Llama-3.2-1B``); leave it out
            to list the zoo's models.
        checkpoint_dir: folder under which ``<repo_id>`` is created.
        access_token: Hugging Face token for gated or private repos; default the ``HF_TOKEN`` environment
            variable (or the token saved by ``hf auth login``).
        tokenizer_only: fetch only the tokenizer files (and generation_config.json), no weights.
        convert: false: leave the Hugging Face files unconverted in ``<checkpoint_dir>/<repo_id>``.
        dtype: cast floating-point weights to float32, bfloat16 or float16 while converting; default keeps them.
        keep_hf: also keep the Hugging Face files, in ``<checkpoint_dir>/<repo_id>/hf``.
        overwrite: replace ``<checkpoint_dir>/<repo_id>`` if it exists and is not empty.

    Returns:
        The checkpoint folder (None when listing).
    """
    if repo_id is None:
        print("Models in the litft zoo (`litft download <repo_id>`; any other repo of a supported architecture "
              "works too):")
        for name in known_models():
            print(f"  {name}")
        return None
    repo_id = _resolve(repo_id)
    out_dir = Path(checkpoint_dir) / repo_id
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite true to replace it")
    if dtype is not None:
        from litft.weights import parse_dtype

        parse_dtype(dtype)  # a bad --dtype fails before anything is downloaded
    staging = out_dir.parent / f".{out_dir.name}.download"
    new_dirs = [d for d in (staging.parent, *staging.parent.parents) if not d.exists()]  # deepest first
    try:
        _fetch(repo_id, staging, access_token, tokenizer_only, check_architecture=convert)
    except BaseException:
        _remove_if_nothing_fetched(staging, new_dirs)
        raise
    finish_download(staging, out_dir, repo_id=repo_id, tokenizer_only=tokenizer_only, convert=convert,
                    dtype=dtype, keep_hf=keep_hf, overwrite=overwrite)
    print(f"Saved {repo_id} to {out_dir}")
    return out_dir


def finish_download(
    hf_dir: Path, out_dir: Path, repo_id: str = "", tokenizer_only: bool = False, convert: bool = True,
    dtype: Optional[str] = None, keep_hf: bool = False, overwrite: bool = False,
) -> Path:
    """Turn a fetched Hugging Face folder into ``out_dir`` (converted unless ``convert`` is false or
    ``tokenizer_only``); ``hf_dir`` is consumed: moved into ``out_dir/hf`` with ``keep_hf``, else removed."""
    from litft.weights import atomic_directory

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    shutil.rmtree(hf_dir / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    if tokenizer_only or not convert:
        with atomic_directory(out_dir, overwrite) as tmp:
            for f in sorted(hf_dir.iterdir()):
                if not tokenizer_only or f.name in TOKENIZER_FILES:
                    f.rename(tmp / f.name)
        shutil.rmtree(hf_dir, ignore_errors=True)
        return out_dir
    from litft.convert.hf import convert_from_hf

    convert_from_hf(hf_dir, out_dir, dtype=dtype, overwrite=overwrite, hf_id=repo_id)
    if keep_hf:
        hf_dir.rename(out_dir / HF_SUBDIR)
    else:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return out_dir


def _resolve(repo_id: str) -> str:
    """A zoo short name → its HF repo id; an ``org/name`` id is taken as it is."""
    if "/" in repo_id:
        return repo_id
    from litft.zoo import get_config

    config = get_config(repo_id)  # unknown names raise with the close ones suggested
    if not config.hf_id:
        raise ValueError(f"{repo_id!r} has no Hugging Face repo id in the zoo; pass the repo id (org/name)")
    return config.hf_id


def _close_names(repo_id: str) -> str:
    import difflib

    close = difflib.get_close_matches(repo_id, known_models(), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _fetch(repo_id: str, local_dir: Path, token: Optional[str], tokenizer_only: bool,
           check_architecture: bool) -> None:
    """Fetch the selected files of ``repo_id`` into ``local_dir``, small files first."""
    from huggingface_hub import HfApi, get_token, snapshot_download

    have_token = bool(token or get_token())
    try:
        info = HfApi().model_info(repo_id, token=token)
        repo_files = [s.rfilename for s in info.siblings or []]
        if info.gated and not have_token:
            raise ValueError(f"{repo_id} is a gated repo: accept its licence at {_url(repo_id)}, then pass "
                             "--access_token <token> or set HF_TOKEN")
        metadata = select_metadata_files(repo_files, tokenizer_only)
        if not tokenizer_only and CONFIG_FILE not in metadata:
            raise ValueError(f"{repo_id} has no config.json: it is not a transformers model repo")
        local_dir.mkdir(parents=True, exist_ok=True)
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=metadata, token=token)
        if tokenizer_only:
            return
        if check_architecture:  # an unsupported model_type fails before gigabytes of weights are fetched
            from litft.convert.hf import hf_config_to_config

            hf_config_to_config(local_dir, hf_id=repo_id)
        index = None
        for name in (INDEX_FILE, BIN_INDEX_FILE):
            if (local_dir / name).is_file():
                try:
                    index = json.loads((local_dir / name).read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{repo_id}: {name} is not valid JSON: {e}") from None
                break
        weights = select_weight_files(repo_files, index)
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=weights, token=token)
    except Exception as e:
        message = _explain(e, repo_id, have_token)
        if message is None:
            raise
        raise ValueError(message) from None


def _explain(e: Exception, repo_id: str, have_token: bool) -> Optional[str]:
    """A clear message for the hub's errors (None: not a hub error, re-raise as it is)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        if not have_token:
            return (f"{repo_id} is a gated repo: accept its licence at {_url(repo_id)}, then pass "
                    "--access_token <token> or set HF_TOKEN")
        return (f"{repo_id} is a gated repo and your token has no access to it: accept its licence at "
                f"{_url(repo_id)} with the account the token belongs to (or use a token with read access)")
    if isinstance(e, RepositoryNotFoundError):
        hint = (" or your token cannot see it" if have_token
                else " or it is private: pass --access_token <token> or set HF_TOKEN")
        return f"repository {repo_id!r} not found on the Hugging Face Hub ({_url(repo_id)}){hint}.{_close_names(repo_id)}"
    if isinstance(e, HFValidationError):
        return f"{repo_id!r} is not a valid Hugging Face repo id (expected org/name): {e}"
    if isinstance(e, LocalEntryNotFoundError) or _is_network_error(e):
        if constants.HF_HUB_OFFLINE:
            return ("cannot reach the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1); unset it to "
                    f"download {repo_id}")
        return (f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {repo_id} "
                f"({type(e).__name__}: {e}); check the network connection, proxy settings and HF_ENDPOINT")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return (f"the Hugging Face Hub refused access to {repo_id} (HTTP {status}): the token is invalid, "
                    "expired or lacks read access; check --access_token / HF_TOKEN")
        return f"the Hugging Face Hub answered with an error for {repo_id}: {e}"
    return None


def _is_network_error(e: BaseException) -> bool:
    """Connection failures, whichever HTTP library huggingface_hub uses (requests, httpx, ...)."""
    if isinstance(e, (ConnectionError, TimeoutError)):  # includes the hub's OfflineModeIsEnabled
        return True
    names = {"ConnectError", "ConnectionError", "ConnectTimeout", "TransportError", "Timeout", "TimeoutException",
             "ProxyError", "SSLError"}
    return any(c.__name__ in names for c in type(e).__mro__)


def _url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}"


def _remove_if_nothing_fetched(staging: Path, new_dirs: Sequence[Path] = ()) -> None:
    """After a failure keep a partial download (it resumes) but not an empty staging folder, nor the (empty)
    folders above it that this download created (``new_dirs``, deepest first)."""
    if staging.is_dir():
        fetched = [p for p in staging.rglob("*") if p.is_file() and ".cache" not in p.relative_to(staging).parts]
        if fetched:
            return
        shutil.rmtree(staging, ignore_errors=True)
    for directory in new_dirs:
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): the folders above it stay too
            break


def _cli_argv(argv: list[str]) -> list[str]:
    """``litft download REPO ...`` → ``--repo_id REPO ...`` (the repo id is a positional that may be left out)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv[0:1] = ["--repo_id", argv[0]]
    return argv


download.cli_argv = _cli_argv  # type: ignore[attr-defined]  (see litft.cli.main)
