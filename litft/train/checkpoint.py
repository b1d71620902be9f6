"""The checkpoints of a training run: atomic, keep-last-K, resumable step-exactly, and loadable like any checkpoint
(their weights are written by :func:`litft.checkpoint.write_model_files`, the one writer of checkpoints).

Layout of ``out_dir``::

    run.yaml                 the resolved config (``--config run.yaml`` runs it again)
    checkpoints/step-N/      a loadable checkpoint (see below) + state.pt (optimizer, RNG, data position, counters)
    final/                   the result: a loadable checkpoint
    logs/                    metrics.jsonl + TensorBoard events

A loadable checkpoint is ``model_config.yaml`` + tokenizer files + either the full weights
(``model.safetensors``) or a method's trainable weights (``lora.safetensors`` + ``lora.yaml``,
``adapter.safetensors`` + ``adapter.yaml``, ``prompt.safetensors`` + ``prompt.yaml``) with ``base.yaml`` naming the
checkpoint they apply to. :func:`litft.checkpoint.load_checkpoint` loads either kind. Every directory is written
to a temp dir and renamed, so a kill during a save leaves the previous checkpoint intact.

The step checkpoints of an FSDP run hold their weights in ``sharded/`` instead (torch.distributed.checkpoint: every
rank writes its own shards, in parallel, with the optimizer state; they resume on any number of devices):
``litft convert consolidate checkpoints/step-N`` writes the loadable files above into it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from litft.checkpoint import FINAL, RUN_FILE, SHARDED, write_model_files  # FINAL, RUN_FILE: part of the run layout here
from litft.weights import atomic_directory

STATE_FILE = "state.pt"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
_STEP_DIR = re.compile(r"step-(\d+)")


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoints/step-N`` directories of ``out_dir`` (those holding a state file), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.fullmatch(d.name)
            if m and d.is_dir() and (d / STATE_FILE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Temp dirs left by a run killed during a save (never a complete checkpoint)."""
    for parent in (Path(out_dir), Path(out_dir) / CHECKPOINTS):
        if parent.is_dir():
            for d in parent.iterdir():
                if d.name.startswith(".") and (".tmp-" in d.name or ".old-" in d.name or ".trash-" in d.name):
                    shutil.rmtree(d, ignore_errors=True)


def prune_checkpoints(out_dir: Path, keep_last: Optional[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (renamed away first, so none is ever half-deleted)."""
    if keep_last is None:
        return
    for _, d in list_checkpoints(out_dir)[:-keep_last]:
        trash = d.parent / f".{d.name}.trash-{os.getpid()}"
        d.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- saving


def save_training_checkpoint(
    out_dir: Path, step: int, model: torch.nn.Module, save_weights: Callable[[torch.nn.Module, Path], None],
    source_dir: Path, base_dir: Optional[Path], method: str, state: dict[str, Any], keep_last: Optional[int],
    sharded: Optional[Path] = None,
) -> Path:
    """Atomically write ``checkpoints/step-N`` (model files + ``state.pt``), then prune old ones. ``sharded``: a
    directory of FSDP shards written by every rank, moved in as ``sharded/`` (then the weights are only there)."""
    target = step_dir(out_dir, step)
    with atomic_directory(target, overwrite=True) as tmp:
        write_model_files(model, tmp, save_weights, source_dir, base_dir, method)
        if sharded is not None:
            os.replace(sharded, tmp / SHARDED)
        write_training_state(tmp, state)
    prune_checkpoints(out_dir, keep_last)
    return target


def write_training_state(directory: Path, state: dict[str, Any]) -> None:
    """``directory/state.pt``: plain values and tensors only (it loads with ``torch.load(weights_only=True)``)."""
    torch.save(state, Path(directory) / STATE_FILE)


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: no {STATE_FILE} (resume needs a "
                                f"{CHECKPOINTS}/step-N directory written by litft finetune)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the training state (truncated or not written by litft?): {e}") from e
