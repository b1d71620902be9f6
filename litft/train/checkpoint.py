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
from litft.errors import TrainingDivergedError, WriteError
from litft.weights import atomic_directory, is_finite

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
    previous = latest_checkpoint(out_dir)
    try:
        with atomic_directory(target, overwrite=True) as tmp:
            write_model_files(model, tmp, save_weights, source_dir, base_dir, method)
            if sharded is not None:
                os.replace(sharded, tmp / SHARDED)
            write_training_state(tmp, state)
    except WriteError as e:
        kept = (f"the previous checkpoint, {previous}, is intact: free space and resume with --resume auto"
                if previous is not None else "no earlier checkpoint exists")
        raise WriteError(e.path, f"{e.cause}; {kept}") from e
    prune_checkpoints(out_dir, keep_last)
    return target


def write_training_state(directory: Path, state: dict[str, Any]) -> None:
    """``directory/state.pt``: plain values and tensors only (it loads with ``torch.load(weights_only=True)``).
    A failed write is the OS's error ("No space left on device"), not torch's "unexpected pos"."""
    with open(Path(directory) / STATE_FILE, "wb") as f:
        sink = _WriteRecorder(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:  # torch turns the file's OSError into a short write
                raise sink.error from None
            raise


class _WriteRecorder:
    """A binary file that remembers the OSError its ``write`` raised."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def first_nonfinite(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Optional[str]:
    """The name of the first trainable parameter (or optimizer state tensor) holding a NaN or an infinity, else
    None: what must not be saved (this process's shard of them under FSDP). Frozen weights never change."""

    def finite(t: torch.Tensor) -> bool:
        return is_finite(t.to_local() if hasattr(t, "to_local") else t)  # a DTensor (FSDP): this process's shard

    for name, p in model.named_parameters():
        if p.requires_grad and not finite(p):
            return name
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and not finite(value):
                    return f"optimizer state {key!r} of {names.get(id(p), 'a parameter')}"
    return None


def diverged(out_dir: Path, step: int, what: str) -> TrainingDivergedError:
    """The error that stops a run whose ``what`` (loss, gradient norm, weights) became non-finite at ``step``,
    naming the newest checkpoint of ``out_dir`` (every saved checkpoint is finite: :func:`save_training_checkpoint`
    never writes one that is not)."""
    last = latest_checkpoint(out_dir)
    where = (f"the last finite checkpoint is {last}: resume from it with --resume {last} and a lower train.lr"
             if last is not None else "no checkpoint was saved before it")
    return TrainingDivergedError(f"training diverged at step {step}: {what}; stopping without saving it. Lower "
                                 f"train.lr, keep train.max_norm set, or use precision bf16-mixed/32-true; {where}")


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: no {STATE_FILE} (resume needs a "
                                f"{CHECKPOINTS}/step-N directory written by litft finetune)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the training state (truncated or not written by litft?): {e}") from e
