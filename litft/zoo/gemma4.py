"""Gemma 4 text (``Gemma4ForCausalLM``; the text model inside the multimodal ``Gemma4ForConditionalGeneration``
checkpoints, whose ``model.language_model.`` weights are taken and whose vision and audio towers are skipped).

Sliding-window layers alternate with full ("global") layers (``layer_types``, 5:1 or 4:1, the last layer full). The
full layers have their own larger head size and key/value heads (``global_head_dim``, ``num_global_key_value_heads``,
or transformers' ``per_layer_config``), with ``attention_k_eq_v`` no ``v_proj`` (the values are the key projection)
and proportional RoPE rotating only a fraction of each head (``rope_parameters``' ``partial_rotary_factor``); the
sliding layers default RoPE with their own base. q and k are RMS-normed per head, v without a weight, and the
attention scale is 1. Per-layer inputs (``hidden_size_per_layer_input``): a second token embedding plus a projection
of the input embeddings, gated into every layer's residual stream after its MLP. The last ``num_kv_shared_layers``
layers compute no keys or values: each attends over those of the last earlier layer of its kind (in the generation
cache too: :class:`litft.cache.SharedKVCache`), with MLPs twice as wide under ``use_double_wide_mlp``. Every layer's
output is multiplied by its ``layer_scalar`` (a buffer of the checkpoint, not trained). The MoE block
(``enable_moe_block``, 26B-A4B): beside every dense MLP, ``num_experts`` experts of ``moe_intermediate_size``, the
top ``top_k_experts`` by softmax (renormalised, times ``router.per_expert_scale``) of a router that sees the residual
stream RMS-normed without a weight, times ``router.scale`` and 1 / sqrt(hidden_size); the experts take the residual
through ``pre_feedforward_layernorm_2``; the dense and expert outputs are normed (``post_feedforward_layernorm_1``,
``_2``) and summed. transformers stacks the experts (``experts.gate_up_proj`` (E, 2I, C), ``experts.down_proj``
(E, C, I)); the table unstacks them to one module per expert and back.

Not implemented, refused by name: bidirectional attention over all tokens (``use_bidirectional_attention: "all"``;
"vision" only changes attention among image tokens, which a text model has none of).

LoRA can target q, k, v, o (k and v where the layer has them: not on KV-shared layers, no v on ``attention_k_eq_v``
full layers), gate, up, down (the dense MLPs and every expert) and lm_head; all-linear also takes the blocks'
``per_layer_input_gate`` and ``per_layer_projection``. ``to_peft`` refuses a LoRA on experts (3-D parameters in
transformers). Prompt tuning and LLaMA-Adapter are refused by name (per-layer inputs, KV sharing, value norms).

Named configs (numbers from the released config.json ``text_config`` sections, as found with the search tool: the
E2B preset transcribed in a public repository's model_preset file, the E4B config transcribed from
google/gemma-4-E4B-it-qat-w4a16-ct in a public test, the 31B fields locked in a public checkpoint-contract test;
26B-A4B's from configs transcribed in several public repositories that agree (one of them the mlx-community
4-bit conversion's, another the released config.json with its text_config); the vocabulary size and token ids are
those shared by every size): E2B, E4B, 26B-A4B, 31B, base and ``-it``.
"""

from __future__ import annotations

import re
from typing import Any

from litft.config import Config
from litft.zoo.base import (Family, WeightRule, refuse_scaled_sliding_rope, stack_experts, stack_gate_up_rows,
                             unstack_experts, unstack_gate_up_rows)
from litft.zoo.gemma import _sandwich_rules

_TRAITS = dict(norm_unit_offset=False, scale_embeddings=True, post_block_norms=True, qk_norm=True, value_norm=True,
               layer_scalars=True, query_pre_attn_scalar=1.0)
_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1000000.0}}
_PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


def _global_attention(hf: dict, fields: dict) -> None:
    """The full layers' head size and key/value heads: from ``per_layer_config`` (what transformers writes) or
    ``global_head_dim`` / ``num_global_key_value_heads`` (what the released configs say)."""
    per_layer = hf.get("per_layer_config")
    kinds = fields["layer_types"]
    if per_layer:
        overrides = {}
        for key, entry in per_layer.items():
            index = int(key) if str(key).isdigit() else None
            if index is None or not 0 <= index < len(kinds) or kinds[index] != "full" or not isinstance(entry, dict):
                raise ValueError(f"config.json: per_layer_config[{key!r}]: litft implements per-layer overrides of "
                                 "full_attention layers only (by layer index)")
            unknown = sorted(set(entry) - set(_PER_LAYER_KEYS))
            if unknown:
                raise ValueError(f"config.json: per_layer_config[{key!r}] overrides {unknown}: litft implements "
                                 f"only {', '.join(_PER_LAYER_KEYS)}")
            overrides[index] = entry
        full = [i for i, kind in enumerate(kinds) if kind == "full"]
        if sorted(overrides) != full or any(overrides[i] != overrides[full[0]] for i in full):
            raise ValueError("config.json: per_layer_config must give every full_attention layer the same overrides "
                             f"(full layers {full}, overridden {sorted(overrides)})")
        head_size, groups = overrides[full[0]].get("head_dim"), overrides[full[0]].get("num_key_value_heads")
    else:
        # transformers applies num_global_key_value_heads only with attention_k_eq_v
        head_size = hf["global_head_dim"]
        groups = hf.get("num_global_key_value_heads") if hf.get("attention_k_eq_v") else None
    # set only where they differ from the sliding layers' (one Config for one architecture)
    if head_size is not None and int(head_size) != fields["head_size"]:
        fields["global_head_size"] = int(head_size)
    if groups is not None and int(groups) != fields["n_query_groups"]:
        fields["global_n_query_groups"] = int(groups)


def _read_moe_block(hf: dict, fields: dict) -> None:
    """The mixture of experts beside the dense MLP (``enable_moe_block``): softmax top-k routing, renormalised, from
    a normed and scaled router input, weights times a per-expert scale."""
    missing = [key for key in ("num_experts", "top_k_experts", "moe_intermediate_size") if not hf.get(key)]
    if missing:
        raise ValueError(f"config.json: enable_moe_block=true needs {', '.join(missing)} (positive integers)")
    fields.update(n_expert=int(hf["num_experts"]), n_expert_per_token=int(hf["top_k_experts"]),
                  moe_intermediate_size=int(hf["moe_intermediate_size"]), moe_beside_dense=True,
                  moe_router_norm=True, moe_per_expert_scale=True, moe_normalize_topk=True)


def _read_gemma4(hf: dict, fields: dict) -> None:
    if hf.get("enable_moe_block"):
        _read_moe_block(hf, fields)
    refuse_scaled_sliding_rope(hf, "gemma4_text")
    n_layer = int(hf["num_hidden_layers"])
    if not hf.get("layer_types"):  # transformers' default: every 6th layer full
        fields["layer_types"] = ["sliding" if (i + 1) % 6 else "full" for i in range(n_layer)]
    fields["layer_types"][-1] = "full"  # transformers forces the last layer to full attention
    _global_attention(hf, fields)
    fields["attention_k_eq_v"] = bool(hf.get("attention_k_eq_v"))
    fields["kv_shared_layers"] = int(hf.get("num_kv_shared_layers") or 0)
    fields["kv_shared_mlp_factor"] = 2 if hf.get("use_double_wide_mlp") else 1
    fields["per_layer_input_size"] = int(hf.get("hidden_size_per_layer_input") or 0)
    if fields["per_layer_input_size"]:
        fields["per_layer_input_vocab_size"] = int(hf["vocab_size_per_layer_input"])


def _write_gemma4(config: Config, hf: dict) -> None:
    for field, expected in _TRAITS.items():
        if getattr(config, field) != expected:
            raise ValueError(f"Gemma4ForCausalLM needs {field}={expected!r}, this config has {getattr(config, field)!r}")
    if config.kv_shared_mlp_factor not in (1, 2):
        raise ValueError(f"Gemma4ForCausalLM's KV-shared layers' MLPs are 1 or 2 times as wide "
                         f"(use_double_wide_mlp), this config has kv_shared_mlp_factor={config.kv_shared_mlp_factor}")
    if set(config.layer_types) - {"full", "sliding"} or config.layer_types[-1] != "full":
        raise ValueError(f"Gemma4ForCausalLM has full and sliding layers, the last one full; this config has "
                         f"{config.layer_types}")
    hf["hidden_activation"] = hf.pop("hidden_act")
    full: dict[str, Any] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    hf["rope_parameters"] = {"sliding_attention": {"rope_type": "default",
                                                   "rope_theta": config.rope_local_theta or config.rope_theta},
                             "full_attention": full}
    hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]
    hf["per_layer_config"] = {str(i): {"head_dim": config.kind_head_size("full"),
                                       "num_key_value_heads": config.kind_query_groups("full")}
                              for i, kind in enumerate(config.layer_types) if kind == "full"}
    hf["attention_k_eq_v"] = config.attention_k_eq_v
    hf["num_kv_shared_layers"] = config.kv_shared_layers
    hf["use_double_wide_mlp"] = config.kv_shared_mlp_factor == 2
    hf["hidden_size_per_layer_input"] = config.per_layer_input_size
    hf["vocab_size_per_layer_input"] = config.per_layer_input_vocab_size or config.vocab_size
    hf["enable_moe_block"] = config.moe_beside_dense
    if config.moe_beside_dense:
        if not (config.moe_router_norm and config.moe_per_expert_scale and config.moe_normalize_topk
                and config.moe_routing == "softmax" and config.moe_shared_expert_size is None):
            raise ValueError("Gemma4ForCausalLM's MoE block routes by softmax, renormalised, with moe_router_norm "
                             "and moe_per_expert_scale, and has no shared expert")
        hf.update(num_experts=config.n_expert, top_k_experts=config.n_expert_per_token,
                  moe_intermediate_size=config.moe_intermediate_size)
    elif config.n_expert:
        raise ValueError("Gemma4ForCausalLM has experts only beside the dense MLP (moe_beside_dense)")
    for key in ("rope_theta", "rope_scaling", "mlp_bias", "query_pre_attn_scalar"):
        hf.pop(key, None)


_UNUSED = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.)layers\.(?P<i>\d+)\.self_attn\."
                     r"(?:k_proj|v_proj|k_norm)\.")


def _unused_tensor(hf_key: str, config: Config) -> bool:
    """The key/value projections and k_norm some checkpoints keep for KV-shared layers (transformers skips them)."""
    m = _UNUSED.match(hf_key)
    return m is not None and int(m["i"]) < config.n_layer and config.kv_source_layer(int(m["i"])) is not None



def _gemma4_rules() -> list[WeightRule]:
    layer = "model.layers.{i}."
    expert = "blocks.{i}.moe.experts.{e}."
    return _sandwich_rules() + [
        # the MoE block: router, stacked experts (Linear-weight orientation) and the extra norms
        WeightRule("blocks.{i}.moe.router.weight", layer + "router.proj.weight"),
        WeightRule("blocks.{i}.moe.router_scale", layer + "router.scale"),
        WeightRule("blocks.{i}.moe.per_expert_scale", layer + "router.per_expert_scale"),
        WeightRule((expert + "gate_proj.weight", expert + "up_proj.weight"), layer + "experts.gate_up_proj",
                   unstack=unstack_gate_up_rows, stack=stack_gate_up_rows),
        WeightRule(expert + "down_proj.weight", layer + "experts.down_proj", unstack=unstack_experts, stack=stack_experts),
        WeightRule("blocks.{i}.pre_moe_norm.weight", layer + "pre_feedforward_layernorm_2.weight"),
        WeightRule("blocks.{i}.post_moe_norm.weight", layer + "post_feedforward_layernorm_2.weight"),
        WeightRule("blocks.{i}.post_dense_norm.weight", layer + "post_feedforward_layernorm_1.weight"),
        WeightRule("embed_per_layer.weight", "model.embed_tokens_per_layer.weight"),
        WeightRule("per_layer_model_projection.weight", "model.per_layer_model_projection.weight"),
        WeightRule("per_layer_projection_norm.weight", "model.per_layer_projection_norm.weight"),
        WeightRule("blocks.{i}.per_layer_input_gate.weight", layer + "per_layer_input_gate.weight"),
        WeightRule("blocks.{i}.per_layer_projection.weight", layer + "per_layer_projection.weight"),
        WeightRule("blocks.{i}.post_per_layer_input_norm.weight", layer + "post_per_layer_input_norm.weight"),
        WeightRule("blocks.{i}.layer_scalar", layer + "layer_scalar"),
    ]


def _layer_types(n_layer: int, every: int) -> list[str]:
    return ["sliding" if (i + 1) % every else "full" for i in range(n_layer)]


_G4 = dict(hf_model_type="gemma4_text", vocab_size=262144, head_size=256, global_head_size=512, norm_eps=1e-6,
           mlp_activation="gelu_tanh", tie_embeddings=True, final_logit_softcapping=30.0, rope_theta=1000000.0,
           rope_local_theta=10000.0, rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25},
           bos_token_id=2, eos_token_id=1, pad_token_id=0, **_TRAITS)
_SIZES = {
    "E2B": dict(n_layer=35, n_embd=1536, intermediate_size=6144, n_head=8, n_query_groups=1, block_size=131072,
                sliding_window=512, layer_types=_layer_types(35, 5), kv_shared_layers=20, kv_shared_mlp_factor=2,
                per_layer_input_size=256, per_layer_input_vocab_size=262144),
    "E4B": dict(n_layer=42, n_embd=2560, intermediate_size=10240, n_head=8, n_query_groups=2, block_size=131072,
                sliding_window=512, layer_types=_layer_types(42, 6), kv_shared_layers=18, per_layer_input_size=256,
                per_layer_input_vocab_size=262144),
    "26B-A4B": dict(n_layer=30, n_embd=2816, intermediate_size=2112, n_head=16, n_query_groups=8,
                    global_n_query_groups=2, attention_k_eq_v=True, block_size=262144, sliding_window=1024,
                    layer_types=_layer_types(30, 6), n_expert=128, n_expert_per_token=8, moe_intermediate_size=704,
                    moe_beside_dense=True, moe_router_norm=True, moe_per_expert_scale=True),
    "31B": dict(n_layer=60, n_embd=5376, intermediate_size=21504, n_head=32, n_query_groups=16,
                global_n_query_groups=4, attention_k_eq_v=True, block_size=262144, sliding_window=1024,
                layer_types=_layer_types(60, 6)),
}
CONFIGS = [
    Config(name=f"gemma-4-{size}{suffix}", hf_id=f"google/gemma-4-{size}{suffix}", **_G4, **dims)
    for size, dims in _SIZES.items()
    for suffix in ("", "-it")
]

GEMMA4 = Family(
    model_type="gemma4_text",
    architecture="Gemma4ForCausalLM",
    weight_rules=_gemma4_rules(),
    configs=CONFIGS,
    traits=dict(_TRAITS),
    # transformers' Gemma4TextConfig defaults, for keys a config.json leaves out
    hf_defaults={"vocab_size": 262144, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                 "max_position_embeddings": 131072, "head_dim": 256, "global_head_dim": 512,
                 "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512,
                 "rope_parameters": _DEFAULT_ROPE, "vocab_size_per_layer_input": 262144,
                 "hidden_size_per_layer_input": 256, "attention_k_eq_v": False, "num_kv_shared_layers": 0,
                 "use_double_wide_mlp": False, "enable_moe_block": False, "attention_bias": False,
                 "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
    read_hf=_read_gemma4,
    write_hf=_write_gemma4,
    hf_prefix_aliases={"model.language_model.": "model.", "language_model.model.": "model.",
                       "language_model.lm_head.": "lm_head."},
    hf_ignored_prefixes=("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                         "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio."),
    hf_keys=("global_head_dim", "num_global_key_value_heads", "per_layer_config", "attention_k_eq_v",
             "num_kv_shared_layers", "use_double_wide_mlp", "hidden_size_per_layer_input",
             "vocab_size_per_layer_input", "enable_moe_block", "num_experts", "top_k_experts",
             "moe_intermediate_size"),
    hf_supported_values={"use_bidirectional_attention": ("vision",)},
    hf_unused=_unused_tensor,
)

FAMILIES = [GEMMA4]
