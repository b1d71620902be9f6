"""LoRA and prompt-tuning runs ↔ PEFT adapters: ``litft convert to_peft`` and ``litft convert from_peft``.

A PEFT adapter folder is ``adapter_config.json`` + ``adapter_model.safetensors`` with transformers' module names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). The names come from the family's one
weight table (:func:`litft.peft.lora.lora_name_to_peft`) and the config from :func:`litft.peft.lora.peft_config_dict`,
so that ``PeftModel.from_pretrained(base, folder)`` computes what litft computes (LoRA, DoRA, rsLoRA). A prompt-tuning
run is PEFT's PROMPT_TUNING adapter: one tensor, ``prompt_embeddings`` (num_virtual_tokens × hidden size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from litft import methods
from litft.checkpoint import BASE_FILE, checkpoint_method, resolve_checkpoint, run_quantize
from litft.weights import atomic_directory, print_written, save_safetensors

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"


def to_peft(
    checkpoint_dir: Path,
    out_dir: Path,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write the LoRA/DoRA weights (or the virtual prompt of a prompt-tuning run) of a run as a PEFT adapter folder
    (adapter_config.json + safetensors).

    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads it onto the Hugging Face version of the base
    model (``litft convert to_hf <base checkpoint>``, or the original Hub model).

    Args:
        checkpoint_dir: a LoRA or prompt-tuning run's ``final/`` (or ``checkpoints/step-N``), or the run's out_dir.
        out_dir: the adapter folder to create.
        base_model_name_or_path: recorded in adapter_config.json for ``AutoPeftModelForCausalLM``; default the
            base model's Hub id when litft knows it (``hf_id`` in model_config.yaml), else empty.
        overwrite: replace ``out_dir`` if it exists and is not empty.
    """
    from litft.config import Config
    from litft.peft.lora import (
        LORA_WEIGHTS_FILE,
        peft_config_dict,
        peft_target_modules,
        read_lora_args,
        to_peft_state_dict,
    )
    from litft.weights import SafetensorsReader

    checkpoint_dir = resolve_checkpoint(Path(checkpoint_dir))
    base = checkpoint_method(checkpoint_dir)
    kind = methods.METHODS["full"] if base is None else methods.get(base["method"], str(checkpoint_dir / BASE_FILE))
    if kind.peft_type is None:
        extra = f". To export the full model, use `litft convert to_hf {checkpoint_dir} <out_dir>`" if kind.full else ""
        raise ValueError(f"to_peft: {checkpoint_dir} cannot be written as a PEFT adapter: {kind.peft_refusal}{extra}")
    if kind.peft_type == "PROMPT_TUNING":
        return _prompt_to_peft(checkpoint_dir, Path(base["base_checkpoint"]), Path(out_dir), base_model_name_or_path,
                               overwrite)
    config = Config.from_checkpoint(checkpoint_dir)
    args = read_lora_args(checkpoint_dir)
    reader = SafetensorsReader([checkpoint_dir / LORA_WEIGHTS_FILE])
    state = {k: reader.get(k) for k in reader.keys()}
    if not state:
        raise ValueError(f"{checkpoint_dir / LORA_WEIGHTS_FILE}: holds no tensors")
    try:
        peft_state = to_peft_state_dict(state, config.hf_model_type)
        targets = peft_target_modules(state, config.hf_model_type)
    except ValueError as e:
        raise ValueError(f"to_peft: {checkpoint_dir / LORA_WEIGHTS_FILE}: {e}") from e
    if base_model_name_or_path is None:
        base_model_name_or_path = config.hf_id or ""
    peft_config = peft_config_dict(args, targets, base_model_name_or_path)
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        save_safetensors(peft_state, tmp / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(base_model_name_or_path, args, targets))
    quantize = run_quantize(checkpoint_dir, base)
    print_written(Path(out_dir), f"wrote a PEFT adapter (r={args.r}, lora_alpha={args.alpha}, target_modules={targets}"
                  f"{', use_dora' if args.use_dora else ''}{', use_rslora' if args.use_rslora else ''})")
    if not base_model_name_or_path:
        print("note: base_model_name_or_path is empty: pass --base_model_name_or_path <hub id or HF folder> for "
              "AutoPeftModelForCausalLM, or load the base yourself and call PeftModel.from_pretrained(base, dir)",
              flush=True)
    if quantize:
        print(f"note: these weights were trained on a {quantize}-quantized base; load the base in 4-bit "
              "(transformers BitsAndBytesConfig) for the closest match", flush=True)
    return Path(out_dir)


def _prompt_to_peft(checkpoint_dir: Path, base_dir: Path, out_dir: Path, base_model_name_or_path: Optional[str],
                    overwrite: bool) -> Path:
    """A prompt-tuning run's virtual prompt (trained on the checkpoint ``base_dir``) as PEFT's PROMPT_TUNING adapter
    (``prompt_embeddings``, float32 as PEFT keeps it)."""
    from litft.config import Config
    from litft.peft.prompt import PROMPT_TENSOR, PROMPT_WEIGHTS_FILE, peft_prompt_config_dict, read_prompt_args
    from litft.checkpoint import read_base
    from litft.weights import SafetensorsReader

    config = Config.from_checkpoint(checkpoint_dir)
    args = read_prompt_args(checkpoint_dir)
    reader = SafetensorsReader([checkpoint_dir / PROMPT_WEIGHTS_FILE])
    if set(reader.keys()) != {PROMPT_TENSOR}:
        raise ValueError(f"to_peft: {checkpoint_dir / PROMPT_WEIGHTS_FILE}: expected one tensor {PROMPT_TENSOR!r}, "
                         f"found {', '.join(sorted(reader.keys())[:5]) or 'none'}")
    embeddings = reader.get(PROMPT_TENSOR).float()
    if base_model_name_or_path is None:
        base_model_name_or_path = config.hf_id or ""
    peft_config = peft_prompt_config_dict(args, config, base_model_name_or_path)
    with atomic_directory(out_dir, overwrite) as tmp:
        save_safetensors({"prompt_embeddings": embeddings}, tmp / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        header = "---\nlibrary_name: peft\n" + (f"base_model: {base_model_name_or_path}\n"
                                                 if base_model_name_or_path else "") + "---\n\n"
        init = f"from the text {args.init_text!r}" if args.init == "text" else "at random"
        (tmp / "README.md").write_text(
            header + f"# Prompt-tuning adapter\n\nTrained with litft: {args.num_virtual_tokens} virtual tokens, "
            f"initialised {init}.\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained("
            "base_model, \"path/to/this/folder\")\n```\n")
    print_written(out_dir, f"wrote a PEFT prompt-tuning adapter (num_virtual_tokens={args.num_virtual_tokens})")
    inner = read_base(base_dir)
    if inner is not None:
        print(f"note: the prompt was trained on {base_dir}, itself a {inner['method']} run: load the adapter onto that "
              "model (for a LoRA run: `litft convert to_hf` of it, which merges the LoRA weights), not onto its base",
              flush=True)
    if not base_model_name_or_path:
        print("note: base_model_name_or_path is empty: pass --base_model_name_or_path <hub id or HF folder> for "
              "AutoPeftModelForCausalLM, or load the base yourself and call PeftModel.from_pretrained(base, dir)",
              flush=True)
    return out_dir


def _model_card(base_model: str, args: Any, targets: list[str]) -> str:
    header = "---\nlibrary_name: peft\n" + (f"base_model: {base_model}\n" if base_model else "") + "---\n\n"
    method = "DoRA" if args.use_dora else "LoRA"
    return (header + f"# {method} adapter\n\nTrained with litft (r={args.r}, lora_alpha={args.alpha}, "
            f"target_modules={', '.join(targets)}).\n\n```python\nfrom peft import PeftModel\n"
            "model = PeftModel.from_pretrained(base_model, \"path/to/this/folder\")\n```\n")


def read_peft_adapter(peft_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(adapter_config.json as a dict, the adapter's tensors by PEFT name, the weights file) of a PEFT folder."""
    peft_dir = Path(peft_dir)
    if not peft_dir.is_dir():
        raise FileNotFoundError(f"{peft_dir}: no such PEFT adapter directory")
    config_path = peft_dir / PEFT_CONFIG_FILE
    if not config_path.is_file():
        hint = (" It holds a model's config.json: a full Hugging Face model is imported with "
                f"`litft convert from_hf {peft_dir}`." if (peft_dir / "config.json").is_file() else "")
        raise FileNotFoundError(f"{peft_dir} is not a PEFT adapter: no {PEFT_CONFIG_FILE}.{hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object (a PEFT adapter config)")
    peft_type = config.get("peft_type", "LORA")
    if peft_type not in ("LORA", "PROMPT_TUNING"):
        raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported: litft imports LORA (LoRA, DoRA, "
                         "rsLoRA) and PROMPT_TUNING adapters")
    if peft_type == "PROMPT_TUNING":
        if not isinstance(config.get("num_virtual_tokens"), int):
            raise ValueError(f"{config_path}: a PROMPT_TUNING config needs an integer num_virtual_tokens")
    elif "r" not in config or "lora_alpha" not in config:
        raise ValueError(f"{config_path}: expected a PEFT LoRA config (a JSON object with peft_type, r, lora_alpha)")
    if config.get("layers_to_transform") is not None:
        raise ValueError(f"{config_path}: layers_to_transform={config['layers_to_transform']} (LoRA on some layers "
                         "only) is not supported: litft applies LoRA to every layer of the targeted projections")
    weights = peft_dir / PEFT_WEIGHTS_FILE
    if weights.is_file():
        from litft.weights import SafetensorsReader

        reader = SafetensorsReader([weights])
        state = {k: reader.get(k) for k in reader.keys()}
    elif (peft_dir / PEFT_WEIGHTS_BIN).is_file():
        weights = peft_dir / PEFT_WEIGHTS_BIN
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{weights}: cannot read it as a tensor dict: {e}") from e
    else:
        raise FileNotFoundError(f"{peft_dir}: no adapter weights ({PEFT_WEIGHTS_FILE} or {PEFT_WEIGHTS_BIN})")
    if not state:
        raise ValueError(f"{weights}: holds no tensors")
    return config, state, weights


def from_peft(
    peft_dir: Path,
    base: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    overwrite: bool = False,
) -> Path:
    """Import a PEFT LoRA/DoRA adapter as a litft LoRA checkpoint (a PEFT prompt-tuning adapter as a prompt-tuning
    checkpoint) on top of the --base checkpoint.

    The result loads, generates, evaluates and fine-tunes further like the ``final/`` of a ``litft finetune lora``
    run (``lora.safetensors`` + ``lora.yaml`` + ``base.yaml``; prompt tuning: ``prompt.safetensors`` +
    ``prompt.yaml`` + ``base.yaml``).

    Args:
        peft_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``).
        base: the litft checkpoint of the model the adapter was trained on (``litft download`` / ``convert from_hf``
            output). Required: names and shapes are checked against it.
        out_dir: where to write the litft checkpoint; default ``<peft_dir>-litft``.
        overwrite: replace ``out_dir`` if it exists and is not empty.
    """

    from litft.config import Config
    from litft.model import GPT
    from litft.peft.lora import (
        apply_lora,
        from_peft_state_dict,
        lora_args_from_peft_config,
        lora_state_dict,
    )
    from litft.weights import load_state_strict

    if base is None:
        raise ValueError("from_peft: --base is required: the litft checkpoint of the model the adapter was trained "
                         "on (`litft download <hub id>` or `litft convert from_hf <HF folder>` makes one)")
    peft_dir = Path(peft_dir)
    peft_config, peft_state, weights = read_peft_adapter(peft_dir)
    base = resolve_checkpoint(Path(base))
    config = Config.from_checkpoint(base)
    source = str(weights)
    out_dir = Path(out_dir) if out_dir is not None else peft_dir.parent / f"{peft_dir.name}-litft"
    if peft_config.get("peft_type") == "PROMPT_TUNING":
        return _prompt_from_peft(peft_config, peft_state, config, base, out_dir, overwrite, peft_dir)
    try:
        state = from_peft_state_dict(peft_state, config.hf_model_type)
    except ValueError as e:
        raise ValueError(f"{source}: {e} (is --base {base} the model the adapter was trained on?)") from e
    args = lora_args_from_peft_config(peft_config, state, source=str(peft_dir / PEFT_CONFIG_FILE))
    # names and shapes against the base, on the meta device (no weights are loaded)
    with torch.device("meta"):
        model = GPT(config)
    apply_lora(model, args)
    expected = {k: torch.empty(p.shape, dtype=p.dtype) for k, p in lora_state_dict(model).items()}
    try:
        load_state_strict(expected, state, "LoRA", source)
    except ValueError as e:
        raise ValueError(f"{e} (--base {base}: {config.name or config.hf_model_type}, n_layer={config.n_layer}, "
                         f"n_embd={config.n_embd})") from e
    _write_imported(out_dir, overwrite, methods.METHODS["lora"], state, args, config, base,
                    peft_config)
    print_written(out_dir, f"wrote a LoRA checkpoint (r={args.r}, alpha={args.alpha}, targets={','.join(args.targets)}"
                           f"{', DoRA' if args.use_dora else ''}; base {base})")
    return out_dir


def _write_imported(out_dir: Path, overwrite: bool, kind: methods.MethodKind,
                    state: dict[str, torch.Tensor], args: Any, config: Any, base: Path,
                    peft_config: dict[str, Any]) -> None:
    """Write an imported adapter as a litft checkpoint of method ``kind`` on ``base`` (weights, their args, base.yaml, the
    model config and the tokenizer), atomically; a note when the adapter names another base model."""
    from litft.checkpoint import write_base_file
    from litft.weights import copy_tokenizer_files, write_method_files

    declared = peft_config.get("base_model_name_or_path") or ""
    if declared and config.hf_id and declared != config.hf_id:
        print(f"note: the adapter says it was trained on {declared!r}, --base is {config.hf_id!r} (names and shapes "
              "match, so it loads; check that this is the model you mean)", flush=True)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_method_files(tmp, {k: v.contiguous() for k, v in state.items()}, kind.weights_file, kind.args_file,
                           args, kind.name)
        write_base_file(tmp, kind.name, base)
        config.save(tmp)
        copy_tokenizer_files(base, tmp)


def _prompt_from_peft(peft_config: dict[str, Any], peft_state: dict[str, torch.Tensor], config: Any, base: Path,
                      out_dir: Path, overwrite: bool, peft_dir: Path) -> Path:
    """A PEFT prompt-tuning adapter as a litft prompt-tuning checkpoint (prompt.safetensors + prompt.yaml +
    base.yaml) on ``base``."""

    from litft.peft.prompt import prompt_from_peft

    args, state = prompt_from_peft(peft_config, peft_state, config, str(peft_dir))
    if args.num_virtual_tokens >= config.block_size:
        raise ValueError(f"{peft_dir / PEFT_CONFIG_FILE}: num_virtual_tokens={args.num_virtual_tokens} leaves no room "
                         f"in --base {base}'s context (block_size={config.block_size})")
    _write_imported(out_dir, overwrite, methods.METHODS["prompt"], state, args, config, base,
                    peft_config)
    print_written(out_dir, f"wrote a prompt-tuning checkpoint (num_virtual_tokens={args.num_virtual_tokens}; base "
                           f"{base})")
    return out_dir
