"""LoRA/DoRA runs → one plain model: ``litft convert merge_lora`` and the merge step of ``convert to_hf``.

A run's ``final/`` (or ``checkpoints/step-N/``) holding ``lora.safetensors`` + ``lora.yaml`` + ``base.yaml`` is
loaded with :func:`litft.train.checkpoint.load_checkpoint`; a QLoRA run's base is quantized the way it was
during training and dequantized again, so the merged weights are ``dequant(quant(W)) + s·B A`` (DoRA: rescaled
per output row): the model that was trained and evaluated, not the unquantized base plus an update learned
against another one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from litft.config import MODEL_CONFIG_FILE

ADAPTER_REFUSAL = (
    "it is a LLaMA-Adapter run (adapter.safetensors): its learned prompts are extra attention inside every adapted "
    "layer, not an update of existing weights, so they cannot be merged into the model, and PEFT has no exact "
    "equivalent (its adaption-prompt method learns one gate per layer where litft learns one per head). Use the "
    "run with litft itself (litft generate / chat / serve / evaluate, LLM.load), or fine-tune with "
    "`litft finetune lora` to get weights you can merge (convert to_hf, merge_lora) or share as a PEFT adapter "
    "(convert to_peft)"
)


PROMPT_REFUSAL = (
    "it is a prompt-tuning run (prompt.safetensors): its learned virtual tokens are extra inputs in front of every "
    "sequence, not an update of existing weights, so they cannot be merged into the model's weights (a Hugging Face "
    "model folder has no place for them). Export it as a PEFT prompt-tuning adapter with `litft convert to_peft "
    "<run> <adapter dir>` (load it with peft.PeftModel.from_pretrained on the base model, e.g. the output of `litft "
    "convert to_hf <base checkpoint>`), or use the run with litft itself (litft generate / chat / serve / evaluate, "
    "LLM.load)"
)


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint a user means: ``path`` itself, ``path/final`` when ``path`` is a run's out_dir, or the
    checkpoint of the asset card named ``path`` (``litft assets ls``)."""
    from litft.asset_cards import resolve_checkpoint as resolve_name

    path = resolve_name(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / MODEL_CONFIG_FILE).is_file():
        return path
    if (path / "final" / MODEL_CONFIG_FILE).is_file():
        return path / "final"
    if (path / "run.yaml").is_file():
        raise FileNotFoundError(f"{path} is a run directory without a final/ checkpoint (the run did not finish?); "
                                f"pass one of its checkpoints/step-N directories instead")
    hint = ""
    if (path / "config.json").is_file():
        hint = f" It holds a Hugging Face config.json: run `litft convert from_hf {path}` first."
    raise FileNotFoundError(f"{path} is not a litft checkpoint: no {MODEL_CONFIG_FILE}.{hint}")


def checkpoint_method(checkpoint_dir: Path) -> Optional[dict[str, Any]]:
    """``base.yaml`` of a checkpoint that holds a method's weights (None: it holds full weights), with its files
    checked so that a missing one is named before anything is loaded."""
    from litft.peft.adapter import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
    from litft.peft.lora import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE
    from litft.peft.prompt import PROMPT_CONFIG_FILE, PROMPT_WEIGHTS_FILE
    from litft.train.checkpoint import BASE_FILE, check_consolidated, read_base
    from litft.weights import weight_files

    checkpoint_dir = Path(checkpoint_dir)
    check_consolidated(checkpoint_dir)
    base = read_base(checkpoint_dir)
    if base is None:
        if not any(f.name.startswith("model") for f in weight_files(checkpoint_dir)):
            found = [n for n in (LORA_WEIGHTS_FILE, ADAPTER_WEIGHTS_FILE, PROMPT_WEIGHTS_FILE)
                     if (checkpoint_dir / n).is_file()]
            extra = f" ({', '.join(found)} is there but {BASE_FILE}, naming the base checkpoint, is missing)" \
                if found else ""
            raise FileNotFoundError(f"{checkpoint_dir}: no weights: expected model.safetensors (full weights) or "
                                    f"{LORA_WEIGHTS_FILE} + {LORA_CONFIG_FILE} + {BASE_FILE}{extra}")
        return None
    files = {"lora": (LORA_WEIGHTS_FILE, LORA_CONFIG_FILE), "adapter": (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE),
             "prompt": (PROMPT_WEIGHTS_FILE, PROMPT_CONFIG_FILE)}
    for name in files.get(base["method"], ()):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(f"{checkpoint_dir / name}: not found ({checkpoint_dir / BASE_FILE} says this is a "
                                    f"{base['method']} checkpoint)")
    base_dir = Path(base["base_checkpoint"])
    if not base_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir / BASE_FILE}: base checkpoint {str(base_dir)!r} does not exist "
                                "(the weights here apply to it); restore it or edit base_checkpoint")
    return base


def load_merged(
    checkpoint_dir: Path, dtype: Optional[torch.dtype] = None, purpose: str = "merge",
) -> Optional[torch.nn.Module]:
    """A LoRA/DoRA/QLoRA checkpoint loaded and merged into a plain GPT on the CPU; None when the checkpoint
    already holds full weights. An adapter or prompt-tuning checkpoint is refused with what to do instead."""
    from litft.train.checkpoint import load_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    base = checkpoint_method(checkpoint_dir)
    if base is None:
        return None
    if base["method"] == "adapter":
        raise ValueError(f"{purpose}: {checkpoint_dir} cannot be merged: {ADAPTER_REFUSAL}")
    if base["method"] == "prompt":
        raise ValueError(f"{purpose}: {checkpoint_dir} cannot be merged: {PROMPT_REFUSAL}")
    if base["method"] != "lora":
        raise ValueError(f"{checkpoint_dir}: unknown method {base['method']!r} in base.yaml (expected lora, adapter "
                         "or prompt)")
    # a QLoRA run's base is quantized as in training, then dequantized by the merge: the model that was trained
    model = load_checkpoint(checkpoint_dir, device="cpu", dtype=dtype)
    return model.eval()


def merge_lora(
    checkpoint_dir: Path,
    out_dir: Optional[Path] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Merge the LoRA/DoRA weights of a run into its base and write the result as plain native weights.

    Without ``out_dir``, ``model.safetensors`` is added to the checkpoint itself (it then loads as a full model
    everywhere; lora.safetensors stays for reference). With ``out_dir``, a standalone checkpoint is written there.
    A QLoRA run is merged into its dequantized base (the weights it was trained against).

    Args:
        checkpoint_dir: a LoRA run's ``final/`` (or ``checkpoints/step-N``), or the run's out_dir.
        out_dir: write a new standalone checkpoint here instead of into ``checkpoint_dir``.
        dtype: cast the merged weights to this dtype (float32, bfloat16, float16); default the base's.
        overwrite: replace ``out_dir`` if it exists and is not empty.
    """
    from litft.data.formats import PromptFormat
    from litft.weights import atomic_directory, copy_tokenizer_files, parse_dtype, print_written, save_model

    checkpoint_dir = resolve_checkpoint(Path(checkpoint_dir))
    torch_dtype = parse_dtype(dtype)
    base = checkpoint_method(checkpoint_dir)
    if base is None:
        raise ValueError(f"merge_lora: {checkpoint_dir} already holds full weights (model.safetensors); there is "
                         "nothing to merge")
    in_place = out_dir is None
    target = checkpoint_dir if in_place else Path(out_dir)
    if not in_place and target.resolve() == checkpoint_dir.resolve():
        in_place = True
    with atomic_directory(target, overwrite=overwrite or in_place) as tmp:
        model = load_merged(checkpoint_dir, torch_dtype, purpose="merge_lora")
        if in_place:  # the checkpoint's own files stay; the merged weights and (maybe untied) config are added
            for f in checkpoint_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        save_model(model, tmp)
        model.config.save(tmp)
        copy_tokenizer_files(checkpoint_dir, tmp)
        run_format = PromptFormat.load(checkpoint_dir)  # the merged model is still prompted as the run was
        if run_format is not None:
            run_format.save(tmp)
    print_written(target, "wrote merged weights")
    return target
