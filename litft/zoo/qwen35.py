"""Qwen3.5 text (``Qwen3_5ForCausalLM``, model_type ``qwen3_5_text``) and Qwen3.5-MoE text (``Qwen3_5MoeForCausalLM``,
``qwen3_5_moe_text``); also the text model inside the multimodal ``qwen3_5`` / ``qwen3_5_moe`` checkpoints
(``Qwen3_5ForConditionalGeneration``: config.json's ``text_config``, weights under ``model.language_model.``; the
vision tower and the multi-token-prediction layers ``mtp.*`` are left out, as transformers' causal LM leaves them).

Hybrid layers (``layer_types``): ``linear_attention`` layers are Gated DeltaNet linear attention
(:mod:`litft.linear_attention`, Config ``layer_types`` "linear"), ``full_attention`` layers are softmax attention whose
``q_proj`` also gives a per-channel output gate (``attention_output_gate``), with qk-norm and partial RoPE
(``partial_rotary_factor``, 0.25). Every RMSNorm but the linear layers' gated one scales by (1 + weight)
(``norm_unit_offset``). Qwen3.5-MoE: every layer's MLP routes each token to its top-k experts by softmax (weights
renormalised) and adds a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.

RoPE: the multimodal RoPE (``mrope_section``, ``mrope_interleaved``) rotates the channels of each section by the
token's temporal, height or width position; for text these three positions are the same, so it is plain RoPE of the
text position, which litft computes (the mrope keys are not kept). ``mamba_ssm_dtype`` must be float32 (litft keeps
the recurrent state in float32).

LoRA can target q, k, v, o (full attention), gate, up, down (the dense MLPs, every expert and the shared expert) and
the linear layers' projections (in_qkv, in_z, in_b, in_a, out); ``all-linear`` takes all of them and the shared expert
gate. ``to_peft`` refuses a LoRA on Qwen3.5-MoE's experts by name (transformers holds them as 3-D tensors, which
PEFT's LoRA does not target, as for Qwen3-MoE): ``to_hf`` merges it instead.

Named configs, from the text_config values of the released config.json files as public code quotes them (found with
the search tool); every size has 262144 positions, a 248320-token vocabulary, RoPE base 1e7 on a quarter of each
256-channel head, linear heads of 128 with 16 key heads, and a full-attention layer every 4th:

- Qwen3.5-9B: 32 layers of 4096, 16 query / 4 KV heads, 12288 MLP, 32 value heads (transformers'
  Qwen3_5TextConfig defaults, which its docstring calls the 9B configuration, and a model card's table);
- Qwen3.5-27B: 64 layers of 5120, 24 / 4 heads, 17408 MLP, 48 value heads;
- Qwen3.5-35B-A3B: 40 layers of 2048, 16 / 2 heads, 32 value heads, 256 experts of 512, top-8, a shared expert of 512;
- Qwen3.5-122B-A10B: 48 layers of 3072, 32 / 2 heads, 64 value heads, 256 experts of 1024, top-8, a shared expert of
  1024 (one source);
- Qwen3.5-397B-A17B: 60 layers of 4096, 32 / 2 heads, 64 value heads, 512 experts of 1024, top-10, a shared expert
  of 1024 (two sources; a third says 4096 for the shared expert).

The text models built from them hold 8.95B, 26.9B, 34.7B, 122.1B and 396.4B parameters, as the names say. The smaller
sizes (0.8B, 2B, 4B) are left out: their numbers were not found.
"""

from __future__ import annotations

from typing import Any

from litft.config import Config
from litft.zoo.base import (Family, WeightRule, llama_rules, stack_experts, stack_gate_up_rows, unstack_experts,
                             unstack_gate_up_rows)

_LINEAR_KEYS = {"linear_num_key_heads": "linear_num_key_heads", "linear_num_value_heads": "linear_num_value_heads",
                "linear_key_head_dim": "linear_key_head_dim", "linear_value_head_dim": "linear_value_head_dim",
                "linear_conv_kernel_dim": "linear_conv_kernel"}
_HF_LAYER_TYPES = {"linear": "linear_attention", "full": "full_attention"}


def _read_layers(hf: dict, fields: dict) -> None:
    n_layer = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is None:  # transformers' default: every full_attention_interval-th layer is full attention
        interval = int(hf.get("full_attention_interval", 4))
        if interval < 1:
            raise ValueError(f"config.json: full_attention_interval must be >= 1, got {interval}")
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layer)]
    bad = sorted(set(types) - set(_HF_LAYER_TYPES.values()))
    if bad:
        raise ValueError(f"config.json: layer_types holds {bad}; Qwen3.5 layers are 'linear_attention' or "
                         "'full_attention'")
    fields["layer_types"] = ["linear" if t == "linear_attention" else "full" for t in types]
    fields.pop("sliding_window", None)
    for hf_key, field in _LINEAR_KEYS.items():
        fields[field] = int(hf[hf_key])


def _read_rotary(hf: dict, fields: dict) -> None:
    """partial_rotary_factor from rope_parameters (transformers 5) or the top level; mrope_section checked."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    nested, top = params.get("partial_rotary_factor"), hf.get("partial_rotary_factor")
    if nested is not None and top is not None and float(nested) != float(top):
        raise ValueError(f"config.json: partial_rotary_factor is {top} but rope_parameters.partial_rotary_factor is "
                         f"{nested}")
    fields["partial_rotary_factor"] = float(nested if nested is not None else top if top is not None else 0.25)
    section = params.get("mrope_section")
    if section is not None and (not isinstance(section, list) or len(section) != 3
                                or any(not isinstance(s, int) or s < 0 for s in section)):
        raise ValueError(f"config.json: rope_parameters.mrope_section must hold 3 non-negative integers (temporal, "
                         f"height, width sections), got {section!r}")


def _read_qwen35(hf: dict, fields: dict) -> None:
    quant = hf.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"config.json: quantization_config (quant_method={method!r}) is not a format litft imports "
                         f"for model_type {hf['model_type']!r}; convert the unquantized (bf16) checkpoint")
    _read_layers(hf, fields)
    _read_rotary(hf, fields)


def _read_qwen35_moe(hf: dict, fields: dict) -> None:
    _read_qwen35(hf, fields)
    if hf.get("mlp_only_layers"):
        raise ValueError(f"config.json: mlp_only_layers={hf['mlp_only_layers']!r}: Qwen3.5-MoE has a mixture of "
                         "experts in every layer (transformers' Qwen3_5MoeForCausalLM); dense layers among them are "
                         "not implemented")
    fields["n_expert"] = int(hf["num_experts"])
    fields["n_expert_per_token"] = int(hf["num_experts_per_tok"])
    fields["moe_intermediate_size"] = int(hf["moe_intermediate_size"])
    fields["moe_shared_expert_size"] = int(hf["shared_expert_intermediate_size"])
    fields.setdefault("intermediate_size", fields["moe_intermediate_size"])  # no dense MLP: unused


def _write_qwen35(config: Config, hf: dict) -> None:
    for field, expected in (("attention_output_gate", True), ("qk_norm", True), ("norm_unit_offset", True),
                            ("qk_norm_across_heads", False), ("attention_sinks", False)):
        if getattr(config, field) != expected:
            raise ValueError(f"{hf['architectures'][0]} needs {field}={expected!r}, this config has "
                             f"{getattr(config, field)!r}")
    bad = sorted(set(config.layer_types) - set(_HF_LAYER_TYPES))
    if bad:
        raise ValueError(f"{hf['architectures'][0]} has linear and full layers only, this config has {bad}")
    hf["layer_types"] = [_HF_LAYER_TYPES[t] for t in config.layer_types]
    for hf_key, field in _LINEAR_KEYS.items():
        hf[hf_key] = getattr(config, field)
    # a new dict: transformers adds to the one it is given
    hf["rope_parameters"] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta,
                             "partial_rotary_factor": config.partial_rotary_factor}
    for key in ("rope_theta", "rope_scaling", "partial_rotary_factor", "mlp_bias", "sliding_window"):
        hf.pop(key, None)


def _write_qwen35_moe(config: Config, hf: dict) -> None:
    _write_qwen35(config, hf)
    if config.moe_dense_layers or not config.moe_shared_expert_gate or config.moe_routing != "softmax" or \
            not config.moe_normalize_topk:
        raise ValueError("Qwen3_5MoeForCausalLM has experts in every layer, softmax routing with renormalised weights "
                         "and a gated shared expert; this config differs (moe_dense_layers, moe_shared_expert_gate, "
                         "moe_routing or moe_normalize_topk)")
    hf["num_experts"] = config.n_expert
    hf["num_experts_per_tok"] = config.n_expert_per_token
    hf["moe_intermediate_size"] = config.moe_intermediate_size
    hf["shared_expert_intermediate_size"] = config.moe_shared_expert_size


def _linear_attention_rules() -> list[WeightRule]:
    rules = []
    for name in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight", "out_proj.weight",
                 "conv1d.weight", "A_log", "dt_bias", "norm.weight"):
        rules.append(WeightRule(f"blocks.{{i}}.attn.{name}", f"model.layers.{{i}}.linear_attn.{name}"))
    return rules



def _moe_rules() -> list[WeightRule]:
    """The router, the experts (one tensor per expert and projection, as transformers saves them; first, so that
    exports use it) and their stacked 3-D form (``experts.gate_up_proj`` (E, 2I, C), ``experts.down_proj``
    (E, C, I), as transformers holds them; read on import), the shared expert and its gate."""
    moe, expert = "model.layers.{i}.mlp.", "blocks.{i}.mlp.experts.{e}."
    rules = [WeightRule("blocks.{i}.mlp.router.weight", moe + "gate.weight"),
             WeightRule("blocks.{i}.mlp.shared_expert_gate.weight", moe + "shared_expert_gate.weight")]
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(WeightRule(expert + f"{p}.weight", moe + f"experts.{{e}}.{p}.weight"))
        rules.append(WeightRule(f"blocks.{{i}}.mlp.shared_expert.{p}.weight", moe + f"shared_expert.{p}.weight"))
    rules += [
        WeightRule((expert + "gate_proj.weight", expert + "up_proj.weight"), moe + "experts.gate_up_proj",
                   unstack=unstack_gate_up_rows, stack=stack_gate_up_rows),
        WeightRule(expert + "down_proj.weight", moe + "experts.down_proj", unstack=unstack_experts, stack=stack_experts),
    ]
    return rules


_TRAITS: dict[str, Any] = dict(qk_norm=True, norm_unit_offset=True, attention_output_gate=True)
_MOE_TRAITS: dict[str, Any] = dict(_TRAITS, moe_shared_expert_gate=True, moe_normalize_topk=True)
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                "hidden_act": "silu", "attention_bias": False, "head_dim": 256, "linear_conv_kernel_dim": 4,
                "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
                "linear_num_value_heads": 32}
_HF_KEYS = (*_LINEAR_KEYS, "full_attention_interval", "attn_output_gate", "mamba_ssm_dtype", "mtp_num_hidden_layers",
            "mtp_use_dedicated_embeddings")
# attn_output_gate and mamba_ssm_dtype: the only values transformers (and litft) implement
_SUPPORTED = {"attn_output_gate": (True,), "mamba_ssm_dtype": ("float32",)}
# the multimodal Qwen3_5ForConditionalGeneration checkpoints wrap the text model; only its weights are taken
_ALIASES = {"model.language_model.": "model."}
_IGNORED = ("model.visual.", "mtp.")


def _layers(n_layer: int) -> list[str]:
    return ["full" if i % 4 == 3 else "linear" for i in range(n_layer)]


_COMMON = dict(vocab_size=248320, block_size=262144, head_size=256, norm_eps=1e-6, rope_theta=10000000.0,
               partial_rotary_factor=0.25, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel=4,
               eos_token_id=248044)
DENSE_CONFIGS = [
    Config(name="Qwen3.5-9B", hf_id="Qwen/Qwen3.5-9B", hf_model_type="qwen3_5_text", n_layer=32, n_embd=4096,
           n_head=16, n_query_groups=4, intermediate_size=12288, layer_types=_layers(32), linear_num_key_heads=16,
           linear_num_value_heads=32, **_COMMON, **_TRAITS),
    Config(name="Qwen3.5-27B", hf_id="Qwen/Qwen3.5-27B", hf_model_type="qwen3_5_text", n_layer=64, n_embd=5120,
           n_head=24, n_query_groups=4, intermediate_size=17408, layer_types=_layers(64), linear_num_key_heads=16,
           linear_num_value_heads=48, **_COMMON, **_TRAITS),
]
MOE_CONFIGS = [
    Config(name="Qwen3.5-35B-A3B", hf_id="Qwen/Qwen3.5-35B-A3B", hf_model_type="qwen3_5_moe_text", n_layer=40,
           n_embd=2048, n_head=16, n_query_groups=2, intermediate_size=512, layer_types=_layers(40),
           linear_num_key_heads=16, linear_num_value_heads=32, n_expert=256, n_expert_per_token=8,
           moe_intermediate_size=512, moe_shared_expert_size=512, **_COMMON, **_MOE_TRAITS),
    Config(name="Qwen3.5-122B-A10B", hf_id="Qwen/Qwen3.5-122B-A10B", hf_model_type="qwen3_5_moe_text", n_layer=48,
           n_embd=3072, n_head=32, n_query_groups=2, intermediate_size=1024, layer_types=_layers(48),
           linear_num_key_heads=16, linear_num_value_heads=64, n_expert=256, n_expert_per_token=8,
           moe_intermediate_size=1024, moe_shared_expert_size=1024, **_COMMON, **_MOE_TRAITS),
    Config(name="Qwen3.5-397B-A17B", hf_id="Qwen/Qwen3.5-397B-A17B", hf_model_type="qwen3_5_moe_text", n_layer=60,
           n_embd=4096, n_head=32, n_query_groups=2, intermediate_size=1024, layer_types=_layers(60),
           linear_num_key_heads=16, linear_num_value_heads=64, n_expert=512, n_expert_per_token=10,
           moe_intermediate_size=1024, moe_shared_expert_size=1024, **_COMMON, **_MOE_TRAITS),
]

QWEN35 = Family(
    model_type="qwen3_5_text",
    architecture="Qwen3_5ForCausalLM",
    weight_rules=llama_rules() + _linear_attention_rules(),
    configs=DENSE_CONFIGS,
    traits=dict(_TRAITS),
    # transformers' Qwen3_5TextConfig defaults, for keys a config.json leaves out
    hf_defaults=dict(_HF_DEFAULTS, intermediate_size=12288),
    read_hf=_read_qwen35,
    write_hf=_write_qwen35,
    hf_prefix_aliases=_ALIASES,
    hf_ignored_prefixes=_IGNORED,
    hf_keys=_HF_KEYS,
    hf_supported_values=_SUPPORTED,
)

QWEN35_MOE = Family(
    model_type="qwen3_5_moe_text",
    architecture="Qwen3_5MoeForCausalLM",
    weight_rules=[r for r in llama_rules() if ".mlp." not in r.hf] + _linear_attention_rules() + _moe_rules(),
    configs=MOE_CONFIGS,
    traits=dict(_MOE_TRAITS),
    # transformers' Qwen3_5MoeTextConfig defaults, for keys a config.json leaves out
    hf_defaults=dict(_HF_DEFAULTS, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                     shared_expert_intermediate_size=512),
    read_hf=_read_qwen35_moe,
    write_hf=_write_qwen35_moe,
    hf_prefix_aliases=_ALIASES,
    hf_ignored_prefixes=_IGNORED,
    hf_keys=(*_HF_KEYS, "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "mlp_only_layers", "norm_topk_prob"),
    # transformers' router always renormalises the top-k weights
    hf_supported_values={**_SUPPORTED, "norm_topk_prob": (True,)},
)

FAMILIES = [QWEN35, QWEN35_MOE]
