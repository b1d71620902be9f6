"""LoRA/DoRA runs → one plain model: ``litft convert merge_lora`` and the merge step of ``convert to_hf``.

A run's ``final/`` (or ``checkpoints/step-N/``) holding ``lora.safetensors`` + ``lora.yaml`` + ``base.yaml`` is
loaded with :func:`litft.checkpoint.load_checkpoint`; a QLoRA run's base is quantized the way it was
during training and dequantized again, so the merged weights are ``dequant(quant(W)) + s·B A`` (DoRA: rescaled
per output row): the model that was trained and evaluated, not the unquantized base plus an update learned
against another one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from litft import methods
from litft.checkpoint import BASE_FILE, checkpoint_method, resolve_checkpoint


def load_merged(
    checkpoint_dir: Path, dtype: Optional[torch.dtype] = None, purpose: str = "merge",
) -> Optional[torch.nn.Module]:
    """A LoRA/DoRA/QLoRA checkpoint loaded and merged into a plain GPT on the CPU; None when the checkpoint
    already holds full weights. An adapter or prompt-tuning checkpoint is refused with what to do instead."""
    from litft.checkpoint import load_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    base = checkpoint_method(checkpoint_dir)
    if base is None:
        return None
    kind = methods.get(base["method"], str(checkpoint_dir / BASE_FILE))
    if kind.merge is None:
        raise ValueError(f"{purpose}: {checkpoint_dir} cannot be merged: {kind.merge_refusal}")
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
