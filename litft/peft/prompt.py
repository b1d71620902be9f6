"""Prompt tuning on the one :class:`~litft.model.GPT`, computed exactly as PEFT's ``PromptTuningConfig`` (CAUSAL_LM).

``num_virtual_tokens`` learned input embeddings are put in front of every sequence: they are attended to as normal
tokens and take positions 0..N-1, so the real tokens start at position N (PEFT discards position ids and the model
counts from the first virtual token). The base model is frozen. Initialisation, as PEFT's ``PromptEmbedding``:

- ``init: text``: the input embeddings of the tokenized ``init_text`` (with the special tokens the tokenizer adds by
  default, as ``AutoTokenizer(text)``), repeated or cut to N tokens;
- ``init: random``: ``normal(0, 1)`` in float32, drawn on the CPU from torch's global generator (``nn.Embedding``'s
  init), so the same seed gives PEFT's values.

The model computes the virtual tokens' keys and values itself (:meth:`litft.model.GPT.virtual_kv`), so the data
pipeline, the training loop, the generation engine and evaluation need no change. With packing every packed sample
sees the virtual tokens before it, as if trained alone. A run's checkpoints hold ``prompt.safetensors``
(``virtual_prompt.embeddings``, N × n_embd) + ``prompt.yaml`` + ``base.yaml``; ``litft convert to_peft`` writes them
as a PEFT prompt-tuning adapter (``prompt_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn

from litft.peft.lora import check_trainable
from litft.weights import load_state_strict, read_args_yaml, read_method_weights, write_method_files

PROMPT_WEIGHTS_FILE = "prompt.safetensors"
PROMPT_CONFIG_FILE = "prompt.yaml"
PROMPT_TENSOR = "virtual_prompt.embeddings"
INITS = ("text", "random")


@dataclass
class PromptTuningArgs:
    """Prompt-tuning settings (PEFT's PromptTuningConfig).

    Args:
        num_virtual_tokens: number of learned virtual tokens put before every sequence (they take that many
            positions of the model's context).
        init: "text": start from the embeddings of ``init_text`` (repeated or cut to num_virtual_tokens tokens);
            "random": normal(0, 1), as PEFT's RANDOM.
        init_text: the text whose token embeddings start the prompt (with init text; ignored with init random,
            as in PEFT), e.g. "Classify if the tweet is a complaint or not:".
    """

    num_virtual_tokens: int = 8
    init: Literal["text", "random"] = "random"
    init_text: Optional[str] = None

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"prompt num_virtual_tokens must be an integer >= 1, got {n!r}")
        if self.init not in INITS:
            raise ValueError(f"prompt init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ValueError("prompt init='text' needs prompt init_text: the text whose token embeddings start the "
                             "prompt (--prompt.init_text \"...\"), or use --prompt.init random")


class VirtualPrompt(nn.Module):
    """The learned input embeddings of the virtual tokens, ``embeddings`` (N, n_embd), set as ``GPT.virtual_prompt``.
    ``cached_kv`` holds their keys and values for inference (see :meth:`litft.model.GPT.virtual_kv`)."""

    def __init__(self, num_tokens: int, n_embd: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(num_tokens, n_embd, device=device, dtype=dtype))
        self.cached_kv: Optional[tuple[Any, list]] = None

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]


def init_token_ids(tokenizer: Any, args: PromptTuningArgs) -> list[int]:
    """The N token ids whose embeddings start a text-initialised prompt: ``init_text`` tokenized as
    ``AutoTokenizer(text)`` does (default special tokens), repeated or cut to ``num_virtual_tokens``, as PEFT."""
    ids = tokenizer.encode(args.init_text, bos=None, eos=None)
    if not ids:
        raise ValueError(f"prompt init_text {args.init_text!r} gives no tokens")
    n = args.num_virtual_tokens
    return (ids * -(-n // len(ids)))[:n]


def add_virtual_prompt(model: nn.Module, num_virtual_tokens: int) -> VirtualPrompt:
    """Give ``model`` a (zero) virtual prompt of ``num_virtual_tokens`` tokens and freeze everything else."""
    if model.config.kv_lora_rank is not None:
        raise ValueError("prompt tuning is not implemented for multi-head latent attention (kv_lora_rank in the "
                         "model config, DeepSeek-V3): use LoRA")
    if model.config.per_layer_input_size or model.config.kv_shared_layers:
        raise ValueError("prompt tuning is not implemented for per-layer inputs or KV-shared layers "
                         "(per_layer_input_size, kv_shared_layers in the model config, Gemma 4): virtual tokens have "
                         "no token id to look up a per-layer input for, nor keys of their own there; use LoRA")
    if "linear" in model.config.layer_types:
        raise ValueError("prompt tuning is not implemented for linear-attention layers (layer_types 'linear' in the "
                         "model config, Gated DeltaNet: Qwen3.5): use LoRA")
    if model.virtual_prompt is not None:
        raise ValueError("the model already has a virtual prompt (prompt tuning): start a new prompt-tuning run from "
                         "its base checkpoint (base.yaml's base_checkpoint), or pass --resume to continue this one")
    cfg = model.config
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "longrope":
        raise ValueError("prompt tuning is not supported with rope_type 'longrope' (Phi-3 long-context RoPE): the "
                         "factors switch with the sequence length, virtual tokens included, which litft does not "
                         "track; use finetune lora or adapter for this model")
    budget = cfg.block_size - num_virtual_tokens
    if budget < 1:
        raise ValueError(f"prompt num_virtual_tokens={num_virtual_tokens} leaves no room in the model's context "
                         f"(block_size={cfg.block_size}): use fewer virtual tokens")
    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.embed.weight
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    model.virtual_prompt = VirtualPrompt(num_virtual_tokens, cfg.n_embd, weight.device, dtype)
    return model.virtual_prompt


def apply_prompt_tuning(model: nn.Module, args: PromptTuningArgs, tokenizer: Any = None) -> nn.Module:
    """Add a trainable virtual prompt to ``model`` in place, initialised as ``args`` says (``init text`` needs the
    checkpoint's ``tokenizer``), and freeze everything else. On the meta device nothing is initialised."""
    prompt = add_virtual_prompt(model, args.num_virtual_tokens)
    weight = prompt.embeddings
    if weight.device.type != "meta":
        with torch.no_grad():
            if args.init == "random":
                init = torch.empty(weight.shape, dtype=torch.float32)  # nn.Embedding's normal_, on the CPU, as PEFT
                nn.init.normal_(init)
            else:
                if tokenizer is None:
                    raise ValueError("prompt init='text' needs the checkpoint's tokenizer to embed init_text")
                ids = init_token_ids(tokenizer, args)
                vocab = model.config.vocab_size
                bad = [i for i in ids if not 0 <= i < vocab]
                if bad:
                    raise ValueError(f"prompt init_text {args.init_text!r} has token ids {bad[:5]} outside the "
                                     f"model's vocabulary [0, {vocab}): is the tokenizer the model's?")
                init = model.embed_tokens(torch.tensor(ids, device=model.embed.weight.device))
            weight.copy_(init.to(weight.device, weight.dtype))
    weight.requires_grad_(True)
    check_trainable(model, "prompt")
    return model


def prompt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the virtual prompt: ``{"virtual_prompt.embeddings": (N, n_embd)}``, detached."""
    if model.virtual_prompt is None:
        return {}
    return {PROMPT_TENSOR: model.virtual_prompt.embeddings.detach()}


def load_prompt_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "prompt state dict") -> None:
    """Load the virtual prompt into a model that has one; strict on names and shapes."""
    if model.virtual_prompt is None:
        raise ValueError(f"{source}: the model has no virtual prompt; call apply_prompt_tuning(model, args) first")
    load_state_strict({PROMPT_TENSOR: model.virtual_prompt.embeddings}, state, "prompt", source)


def save_prompt(model: nn.Module, args: PromptTuningArgs, out_dir: Union[str, Path]) -> Path:
    """Write ``prompt.safetensors`` and ``prompt.yaml`` (the PromptTuningArgs) into ``out_dir``."""
    out_dir = Path(out_dir)
    state = prompt_state_dict(model)
    if not state:
        raise ValueError("save_prompt: the model has no virtual prompt")
    return write_method_files(out_dir, state, PROMPT_WEIGHTS_FILE, PROMPT_CONFIG_FILE, args, "prompt")


def read_prompt_args(directory: Union[str, Path]) -> PromptTuningArgs:
    return read_args_yaml(Path(directory) / PROMPT_CONFIG_FILE, PromptTuningArgs)


def load_prompt(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Give ``model`` the virtual prompt saved in ``directory`` (or load it into the one it has: resume)."""
    directory = Path(directory)
    args = read_prompt_args(directory)
    weights, state = read_method_weights(directory, PROMPT_WEIGHTS_FILE, PROMPT_CONFIG_FILE)
    if model.virtual_prompt is None:
        add_virtual_prompt(model, args.num_virtual_tokens)
    load_prompt_state_dict(model, state, source=str(weights))
    return model


# ---------------------------------------------------------------------------------------------- PEFT interop

PEFT_PROMPT_TENSOR = "prompt_embeddings"  # the one tensor of a PEFT prompt-tuning adapter_model.safetensors


def peft_prompt_config_dict(args: PromptTuningArgs, config: Any, base_model_name_or_path: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of PEFT's PromptTuningConfig (task CAUSAL_LM) for a prompt of ``args`` on a model
    of ``config``. PEFT re-tokenizes a TEXT init's text from ``tokenizer_name_or_path`` when it builds a trainable
    adapter, so TEXT is written only with a base model name; the text is recorded either way (the trained
    embeddings, not the init, are what loads)."""
    text_init = args.init == "text" and bool(base_model_name_or_path)
    return {
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path or None, "inference_mode": True,
        "modules_to_save": None, "num_attention_heads": config.n_head, "num_layers": config.n_layer,
        "num_transformer_submodules": 1, "num_virtual_tokens": args.num_virtual_tokens, "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "TEXT" if text_init else "RANDOM", "prompt_tuning_init_text": args.init_text,
        "revision": None, "task_type": "CAUSAL_LM", "token_dim": config.n_embd, "tokenizer_kwargs": None,
        "tokenizer_name_or_path": base_model_name_or_path if text_init else None,
    }


def prompt_from_peft(peft_config: dict[str, Any], state: dict[str, torch.Tensor], config: Any,
                     source: str) -> tuple[PromptTuningArgs, dict[str, torch.Tensor]]:
    """PromptTuningArgs and the native state dict of a PEFT prompt-tuning adapter (``adapter_config.json`` as a dict,
    its tensors) for a base model of ``config``; clear errors naming ``source`` for what litft cannot compute."""
    task = peft_config.get("task_type")
    if task != "CAUSAL_LM":
        raise ValueError(f"{source}: task_type {task!r}: litft imports prompt tuning for CAUSAL_LM (decoder-only "
                         "models) only")
    submodules = peft_config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ValueError(f"{source}: num_transformer_submodules={submodules}: a decoder-only model has 1")
    if set(state) != {PEFT_PROMPT_TENSOR}:
        raise ValueError(f"{source}: expected one tensor {PEFT_PROMPT_TENSOR!r} (a PEFT prompt-tuning adapter), found "
                         f"{', '.join(sorted(state)[:5])}")
    embeddings = state[PEFT_PROMPT_TENSOR]
    n = peft_config.get("num_virtual_tokens")
    if embeddings.dim() != 2 or embeddings.shape[0] != n or embeddings.shape[1] != config.n_embd:
        raise ValueError(f"{source}: {PEFT_PROMPT_TENSOR} has shape {list(embeddings.shape)}, expected "
                         f"[num_virtual_tokens={n}, n_embd={config.n_embd}] (is --base the model the adapter was "
                         "trained on?)")
    init = str(peft_config.get("prompt_tuning_init") or "RANDOM").lower()
    text = peft_config.get("prompt_tuning_init_text")
    if init not in INITS:  # e.g. SAMPLE_VOCAB: only the init differs, and the trained embeddings are what loads
        init = "random"
    if init == "text" and not (isinstance(text, str) and text.strip()):
        init = "random"
    args = PromptTuningArgs(num_virtual_tokens=int(n), init=init, init_text=text)  # type: ignore[arg-type]
    return args, {PROMPT_TENSOR: embeddings}
