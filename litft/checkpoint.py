"""Checkpoints: what a checkpoint directory is, and the one place that reads and writes one. Training, inference
(generate, serve, evaluate, ``LLM``) and conversion all load and write checkpoints through here.

A loadable checkpoint is ``model_config.yaml`` + tokenizer files + either the full weights (``model.safetensors``,
possibly sharded) or one method's trainable weights (``lora.safetensors`` + ``lora.yaml``, ``adapter.safetensors``
+ ``adapter.yaml``, ``prompt.safetensors`` + ``prompt.yaml``: the files its entry in :mod:`litft.methods` names)
with ``base.yaml`` naming the method and the checkpoint they apply to. :func:`load_checkpoint` loads either kind
(a chain of bases too), :func:`write_model_files` writes one.

A training run's ``out_dir`` (``run.yaml``, ``checkpoints/step-N``, ``final/``, ``logs/``) and the training state
beside the weights of a step checkpoint (``state.pt``) are :mod:`litft.train.checkpoint`'s. The step checkpoints
of an FSDP run hold their weights as shards in ``sharded/`` until ``litft convert consolidate`` writes them here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from litft import methods
from litft.config import MODEL_CONFIG_FILE, Config
from litft.weights import copy_tokenizer_files, load_model, weight_files

BASE_FILE = "base.yaml"
SHARDED = "sharded"  # FSDP checkpoints: model + optimizer shards (torch.distributed.checkpoint), any world size
FINAL = "final"
RUN_FILE = "run.yaml"


# ---------------------------------------------------------------------------------------------- finding


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint a user means: ``path`` itself, ``path/final`` when ``path`` is a run's out_dir, or the
    checkpoint of the asset card named ``path`` (``litft assets ls``)."""
    from litft.asset_cards import resolve_checkpoint as resolve_name

    path = resolve_name(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / MODEL_CONFIG_FILE).is_file():
        return path
    if (path / FINAL / MODEL_CONFIG_FILE).is_file():
        return path / FINAL
    if (path / RUN_FILE).is_file():
        raise FileNotFoundError(f"{path} is a run directory without a final/ checkpoint (the run did not finish?); "
                                f"pass one of its checkpoints/step-N directories instead")
    hint = ""
    if (path / "config.json").is_file():
        hint = f" It holds a Hugging Face config.json: run `litft convert from_hf {path}` first."
    raise FileNotFoundError(f"{path} is not a litft checkpoint: no {MODEL_CONFIG_FILE}.{hint}")


# ---------------------------------------------------------------------------------------------- writing


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


# ---------------------------------------------------------------------------------------------- reading


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
        kind = methods.get(base["method"], str(checkpoint_dir / BASE_FILE))
        if kind.merge is None:
            raise ValueError(
                f"{purpose}: {checkpoint_dir} is {kind.article} run: its learned {kind.name} weights are not part of "
                "the model's own weights, so full fine-tuning (which saves plain model weights) cannot start from "
                f"it. Continue it with `litft finetune {kind.name} {checkpoint_dir} ...` (new data, new lr), or "
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
    kind = methods.get(base["method"], str(checkpoint_dir / BASE_FILE))
    kind.load_weights(model, checkpoint_dir)
    if merge and not quantize and kind.merge is not None:
        model = kind.merge(model)  # LoRA: into the base (a QLoRA base dequantized first)
    return model


def _quantize(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    from litft.peft.quantize import quantize_model

    quantize_model(model, mode)  # every linear layer but the head, as finetune --quantize does
    return model


def checkpoint_config(checkpoint_dir: Path) -> Config:
    """The model config of a checkpoint (its own ``model_config.yaml``)."""
    return Config.from_checkpoint(checkpoint_dir)


def checkpoint_method(checkpoint_dir: Path) -> Optional[dict[str, Any]]:
    """``base.yaml`` of a checkpoint that holds a method's weights (None: it holds full weights), with its files
    checked so that a missing one is named before anything is loaded."""
    checkpoint_dir = Path(checkpoint_dir)
    check_consolidated(checkpoint_dir)
    base = read_base(checkpoint_dir)
    if base is None:
        if not any(f.name.startswith("model") for f in weight_files(checkpoint_dir)):
            lora = methods.METHODS["lora"]
            found = [k.weights_file for k in methods.METHODS.values()
                     if k.weights_file and (checkpoint_dir / k.weights_file).is_file()]
            extra = f" ({', '.join(found)} is there but {BASE_FILE}, naming the base checkpoint, is missing)" \
                if found else ""
            raise FileNotFoundError(f"{checkpoint_dir}: no weights: expected model.safetensors (full weights) or "
                                    f"{lora.weights_file} + {lora.args_file} + {BASE_FILE}{extra}")
        return None
    kind = methods.get(base["method"], str(checkpoint_dir / BASE_FILE))
    for name in (kind.weights_file, kind.args_file):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(f"{checkpoint_dir / name}: not found ({checkpoint_dir / BASE_FILE} says this is a "
                                    f"{base['method']} checkpoint)")
    base_dir = Path(base["base_checkpoint"])
    if not base_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir / BASE_FILE}: base checkpoint {str(base_dir)!r} does not exist "
                                "(the weights here apply to it); restore it or edit base_checkpoint")
    return base
