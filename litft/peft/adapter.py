"""LLaMA-Adapter (v1) on the one :class:`~litft.model.GPT`: a learned prompt on the upper layers, zero-init gating.

In each layer ``i >= start_layer`` a prompt of ``prompt_length`` vectors (n_embd wide) is projected through that
layer's own ``k_proj`` / ``v_proj`` (and ``k_norm`` where the family has one; no RoPE: the prompt has no position).
Every query attends to the whole prompt (no causal mask) in a separate softmax, and the result, scaled by a per-head
gate initialised to zero, is added to the layer's attention output: at initialisation the model is exactly the
base model. The prompt keys/values are recomputed from the parameters on each call and never enter the KV cache.
It plugs into ``CausalSelfAttention.adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from litft.peft.lora import check_trainable
from litft.weights import load_state_strict, read_args_yaml, read_method_weights, write_method_files

ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter.yaml"


@dataclass
class AdapterArgs:
    """LLaMA-Adapter settings.

    Args:
        prompt_length: number of learned prompt vectors per adapted layer.
        start_layer: index of the first adapted layer; layers start_layer .. n_layer-1 get a prompt.
    """

    prompt_length: int = 10
    start_layer: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_length, int) or self.prompt_length < 1:
            raise ValueError(f"adapter prompt_length must be a positive integer, got {self.prompt_length!r}")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"adapter start_layer must be an integer >= 0, got {self.start_layer!r}")


class AdapterPrompt(nn.Module):
    """One layer's learned prompt and per-head gate; called by the attention as ``adapter(attn, q)``."""

    def __init__(self, prompt_length: int, n_embd: int, n_head: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(prompt_length, n_embd, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.empty(n_head, device=device, dtype=dtype))
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prompt)  # as nn.Embedding, which LLaMA-Adapter and LitGPT use for the prompt
        nn.init.zeros_(self.gate)

    def forward(self, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """The gated attention of queries ``q`` (B, nh, T, hs) over this layer's prompt."""
        B, _, T, hs = q.shape
        prompt = self.prompt.unsqueeze(0)  # (1, L, C)
        L = prompt.shape[1]
        k = attn.k_proj(prompt).view(1, L, -1, hs).transpose(1, 2)  # (1, ng, L, hs)
        v = attn.v_proj(prompt).view(1, L, -1, hs).transpose(1, 2)
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        k, v = k.to(q.dtype).expand(B, -1, -1, -1), v.to(q.dtype).expand(B, -1, -1, -1)
        sees_all = torch.ones(1, 1, 1, L, dtype=torch.bool, device=q.device)
        y = attn.attend(q, k, v, sees_all)
        return self.gate.to(y.dtype).view(1, -1, 1, 1) * y


def adapter_modules(model: nn.Module) -> dict[str, AdapterPrompt]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterPrompt)}


def apply_adapter(model: nn.Module, args: AdapterArgs) -> nn.Module:
    """Give layers ``start_layer..`` of ``model`` a prompt and a zero gate, in place; freeze everything else."""
    n_layer = len(model.blocks)
    if args.start_layer >= n_layer:
        raise ValueError(f"adapter start_layer={args.start_layer} but the model has n_layer={n_layer}: no layer would "
                         f"get an adapter and training would change nothing; use start_layer < {n_layer}")
    if adapter_modules(model):
        raise ValueError("apply_adapter: the model already has adapters")
    if model.config.kv_lora_rank is not None:
        raise ValueError("LLaMA-Adapter is not implemented for multi-head latent attention (kv_lora_rank in the model "
                         "config, DeepSeek-V3): use LoRA")
    cfg = model.config
    if cfg.value_norm or cfg.attention_k_eq_v or cfg.kv_shared_layers:
        raise ValueError("LLaMA-Adapter is not implemented for Gemma 4's attention (value_norm, attention_k_eq_v or "
                         "kv_shared_layers in the model config: the prompt's values would need the value norm, the "
                         "key projection or another layer's projections): use LoRA")
    if "linear" in model.config.layer_types:
        raise ValueError("LLaMA-Adapter is not implemented for linear-attention layers (layer_types 'linear' in the "
                         "model config, Gated DeltaNet: Qwen3.5): use LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(model.blocks)[args.start_layer:]:
        attn = block.attn
        weight = attn.q_proj.weight
        dtype = weight.dtype if weight.is_floating_point() else getattr(attn.q_proj, "litft_dtype", torch.float32)
        attn.adapter = AdapterPrompt(args.prompt_length, cfg.n_embd, cfg.n_head, weight.device, dtype)
    check_trainable(model, "adapter")
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``blocks.{i}.attn.adapter.prompt`` / ``.gate``), detached."""
    return {k: v.detach() for k, v in _adapter_parameters(model).items()}


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.{p}": getattr(m, p) for name, m in adapter_modules(model).items() for p in ("prompt", "gate")}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                            source: str = "adapter state dict") -> None:
    """Load adapter tensors into a model that :func:`apply_adapter` prepared; strict on names and shapes."""
    params = _adapter_parameters(model)
    if not params:
        raise ValueError(f"{source}: the model has no adapters; call apply_adapter(model, args) first")
    load_state_strict(params, state, "adapter", source)


def save_adapter(model: nn.Module, args: AdapterArgs, out_dir: Union[str, Path]) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.yaml`` (the AdapterArgs) into ``out_dir``."""
    out_dir = Path(out_dir)
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("save_adapter: the model has no adapters")
    return write_method_files(out_dir, state, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, args, "adapter")


def read_adapter_args(directory: Union[str, Path]) -> AdapterArgs:
    return read_args_yaml(Path(directory) / ADAPTER_CONFIG_FILE, AdapterArgs)


def load_adapter(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Apply the adapter saved in ``directory`` to ``model`` (or load it into a model that already has one)."""
    directory = Path(directory)
    args = read_adapter_args(directory)
    weights, state = read_method_weights(directory, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)
    if not adapter_modules(model):
        apply_adapter(model, args)
    load_adapter_state_dict(model, state, source=str(weights))
    return model
