"""Checkpoints of a run: atomic, keep-last-K, resumable step-exactly, and loadable like any checkpoint.

Layout of ``out_dir``::

    run.yaml                 the resolved config (``--config run.yaml`` runs it again)
    checkpoints/step-N/      a loadable checkpoint (see below) + state.pt (optimizer, RNG, data position, counters)
    final/                   the result: a loadable checkpoint
    logs/                    metrics.jsonl + TensorBoard events

A loadable checkpoint is ``model_config.yaml`` + tokenizer files + either the full weights
(``model.safetensors``) or a method's trainable weights (``lora.safetensors`` + ``lora.yaml``,
``adapter.safetensors`` + ``adapter.yaml``, ``prompt.safetensors`` + ``prompt.yaml``) with ``base.yaml`` naming the checkpoint they apply to.
:func:`load_checkpoint` loads either kind. Every directory is written to a temp dir and renamed, so a kill
during a save leaves the previous checkpoint intact.

The step checkpoints of an FSDP run hold their weights in ``sharded/`` instead (torch.distributed.checkpoint: every
rank writes its own shards, in parallel, with the optimizer state; they resume on any number of devices):
``litft convert consolidate checkpoints/step-N`` writes the loadable files above into it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from litft.config import Config
from litft.errors import TrainingDivergedError, WriteError
from litft.weights import atomic_directory, copy_tokenizer_files, is_finite, load_model, weight_files

STATE_FILE = "state.pt"
SHARDED = "sharded"  # FSDP checkpoints: model + optimizer shards (torch.distributed.checkpoint), any world size
BASE_FILE = "base.yaml"
CHECKPOINTS = "checkpoints"
FINAL = "final"
RUN_FILE = "run.yaml"
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


def write_model_files(
    model: torch.nn.Module, directory: Path, save_weights: Callable[[torch.nn.Module, Path], None],
    source_dir: Path, base_dir: Optional[Path], method: str,
) -> None:
    """Write a loadable checkpoint into the existing (temp) ``directory``: weights via ``save_weights``, the
    model config, the tokenizer files of ``source_dir`` and, for weights that apply to a base, ``base.yaml``."""
    save_weights(model, directory)
    model.config.save(directory)
    copy_tokenizer_files(source_dir, directory)
    if base_dir is not None:
        write_base_file(directory, method, base_dir, quantize_mode(model))


def write_base_file(directory: Path, method: str, base_dir: Path, quantize: Optional[str] = None) -> None:
    """``directory/base.yaml``: the method of the weights in ``directory`` and the checkpoint they apply to (and, for
    QLoRA, the quantization of that base they were trained against)."""
    base = {"method": method, "base_checkpoint": str(Path(base_dir).resolve())}
    if quantize is not None:
        base["quantize"] = quantize
    (directory / BASE_FILE).write_text(yaml.safe_dump(base, sort_keys=False))


def quantize_mode(model: torch.nn.Module) -> Optional[str]:
    """The ``--quantize`` mode of a model whose base layers are bitsandbytes-quantized (QLoRA), else None."""
    from litft.peft.quantize import is_quantized

    for module in model.modules():
        if not is_quantized(module):
            continue
        if type(module).__name__ == "Linear8bitLt":
            return "bnb.int8"
        weight = module.weight
        quant_type = getattr(weight, "quant_type", None) or getattr(module.quant_state, "quant_type", "nf4")
        double = bool(getattr(weight, "compress_statistics", False))
        return f"bnb.{quant_type}" + ("-dq" if double and quant_type == "nf4" else "")
    return None


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
            with open(tmp / STATE_FILE, "wb") as f:  # a file object: a short write is an OSError naming its cause
                torch.save(state, f)
            _test_delay(step)
    except WriteError as e:
        kept = (f"the previous checkpoint, {previous}, is intact: free space and resume with --resume auto"
                if previous is not None else "no earlier checkpoint exists")
        raise WriteError(e.path, f"{e.cause}; {kept}") from e
    prune_checkpoints(out_dir, keep_last)
    return target


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


def _test_delay(step: int) -> None:
    """Tests kill the process in the middle of a save: ``LITFT_TEST_SAVE_DELAY=seconds`` (every save) or
    ``step:seconds`` (the save of that step) sleeps inside the temp dir, before it is renamed into place."""
    spec = os.environ.get("LITFT_TEST_SAVE_DELAY", "")
    if not spec:
        return
    at, _, seconds = spec.rpartition(":")
    if not at or int(at) == step:
        time.sleep(float(seconds))


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: no {STATE_FILE} (resume needs a "
                                f"{CHECKPOINTS}/step-N directory written by litft finetune)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the training state (truncated or not written by litft?): {e}") from e


# ---------------------------------------------------------------------------------------------- loading


def check_consolidated(checkpoint_dir: Path) -> None:
    """Refuse, saying what to run, an FSDP step checkpoint whose weights are only in its ``sharded/`` directory
    (shards for resuming with ``--strategy fsdp``): ``litft convert consolidate`` writes its loadable files."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / SHARDED).is_dir() and not weight_files(checkpoint_dir):
        raise FileNotFoundError(
            f"{checkpoint_dir} is an FSDP step checkpoint: its weights are only in {SHARDED}/ (torch.distributed"
            ".checkpoint shards, which resume training with --strategy fsdp on any number of devices). Run "
            f"`litft convert consolidate {checkpoint_dir}` to write its weights as a normal checkpoint (in place), "
            "then use it")


def read_base(checkpoint_dir: Path) -> Optional[dict[str, Any]]:
    """``base.yaml`` of a checkpoint holding only a method's weights; None for a checkpoint with full weights."""
    checkpoint_dir = Path(checkpoint_dir)
    if weight_files(checkpoint_dir) and any(f.name.startswith("model") for f in weight_files(checkpoint_dir)):
        return None
    path = checkpoint_dir / BASE_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "base_checkpoint" not in data or "method" not in data:
        raise ValueError(f"{path}: expected 'method' and 'base_checkpoint' keys")
    return data


def check_mergeable_chain(checkpoint_dir: Path, purpose: str) -> None:
    """Refuse a checkpoint whose chain of ``base.yaml`` runs holds a method that cannot become plain model weights
    (adapter, prompt tuning): what full fine-tuning starts from must be a whole model it can save again."""
    checkpoint_dir = Path(checkpoint_dir)
    base = read_base(checkpoint_dir)
    while base is not None:
        if base["method"] in ("adapter", "prompt"):
            kind = {"adapter": "a LLaMA-Adapter", "prompt": "a prompt-tuning"}[base["method"]]
            raise ValueError(
                f"{purpose}: {checkpoint_dir} is {kind} run: its learned {base['method']} weights are not part of "
                "the model's own weights, so full fine-tuning (which saves plain model weights) cannot start from "
                f"it. Continue it with `litft finetune {base['method']} {checkpoint_dir} ...` (new data, new lr), or "
                f"fully fine-tune its base, {base['base_checkpoint']}")
        checkpoint_dir = Path(base["base_checkpoint"])
        base = read_base(checkpoint_dir) if checkpoint_dir.is_dir() else None


def run_quantize(checkpoint_dir: Path, base: dict[str, Any]) -> Optional[str]:
    """The ``--quantize`` mode the method's weights were trained with (QLoRA), or None.

    Read from ``base.yaml`` (``quantize:``) when it says, else from the ``run.yaml`` of the run the checkpoint
    belongs to (``<out_dir>/final`` or ``<out_dir>/checkpoints/step-N``; runs written before base.yaml said).
    """
    if "quantize" in base:
        return base["quantize"] or None
    checkpoint_dir = Path(checkpoint_dir).resolve()
    for run_file in (checkpoint_dir.parent / RUN_FILE, checkpoint_dir.parent.parent / RUN_FILE):
        if run_file.is_file():
            try:
                run = yaml.safe_load(run_file.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{run_file}: not valid YAML: {e}") from e
            return (run.get("quantize") or None) if isinstance(run, dict) else None
    return None


def load_checkpoint(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: Optional[str | torch.dtype] = None,
    merge: bool = True, quantize: Optional[str] = None,
) -> torch.nn.Module:
    """Load any litft checkpoint as the model it was trained to be: full weights, or LoRA/adapter weights applied
    to the base named in ``base.yaml`` (recursively, so a fine-tune of a fine-tune loads too).

    A QLoRA run's base is quantized as the run quantized it (``quantize`` in base.yaml or run.yaml) before its
    LoRA weights apply, so the result is the trained model, not the unquantized base plus an update learned
    against another one. LoRA weights are then merged (into the *dequantized* base for QLoRA: a plain float
    model) unless ``merge=False``; adapter weights and a prompt-tuning run's virtual prompt stay separate modules.

    ``quantize`` (e.g. ``"bnb.nf4"``): quantize the base's linear layers with this mode instead (quantized
    inference); LoRA layers then stay unmerged over the quantized base, so their update keeps full precision
    (for a QLoRA run asked for its own mode, exactly the trained model).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    check_consolidated(checkpoint_dir)
    base = read_base(checkpoint_dir)
    if base is None:
        model = load_model(checkpoint_dir, device=device, dtype=dtype)
        return _quantize(model, quantize) if quantize else model
    base_dir = Path(base["base_checkpoint"])
    if not base_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir / BASE_FILE}: base checkpoint {str(base_dir)!r} does not exist "
                                "(the LoRA/adapter weights here apply to it)")
    model = load_checkpoint(base_dir, device=device, dtype=dtype, merge=True)
    mode = quantize or run_quantize(checkpoint_dir, base)
    if mode:
        _quantize(model, mode)  # as `finetune --quantize` prepared the base: before the method's layers
    method = base["method"]
    if method == "lora":
        from litft.peft import load_lora, merge_lora

        load_lora(model, checkpoint_dir)
        if merge and not quantize:
            model = merge_lora(model) or model  # dequantizes a QLoRA base first
    elif method == "adapter":
        from litft.peft import load_adapter

        load_adapter(model, checkpoint_dir)
    elif method == "prompt":
        from litft.peft.prompt import load_prompt

        load_prompt(model, checkpoint_dir)
    else:
        raise ValueError(f"{checkpoint_dir / BASE_FILE}: unknown method {method!r} (expected lora, adapter or "
                         "prompt)")
    return model


def _quantize(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    from litft.peft.quantize import quantize_model

    quantize_model(model, mode)  # every linear layer but the head, as finetune --quantize does
    return model


def checkpoint_config(checkpoint_dir: Path) -> Config:
    """The model config of a checkpoint (its own ``model_config.yaml``)."""
    return Config.from_checkpoint(checkpoint_dir)
