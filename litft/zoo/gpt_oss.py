"""gpt-oss (``GptOssForCausalLM``, 20b and 120b): attention with biases and a learned sink logit per head, sliding
and full layers alternating, YaRN RoPE, and a mixture of experts in every layer (router with a bias, softmax over
the top-k logits, experts with biases and the clamped SwiGLU).

transformers keeps each layer's experts stacked in 3-D tensors: ``experts.gate_up_proj`` (E, C, 2I) with gate and up
interleaved along the last dim (gate the even columns, up the odd ones), ``experts.down_proj`` (E, I, C) and their
biases. litft holds one module per expert; the weight table's stacked rules convert in both directions. The released
checkpoints store those expert weights in MXFP4 (``*_blocks`` + ``*_scales``), dequantized on import
(:mod:`litft.convert.hf`); an export writes them in a plain dtype (``to_hf --dtype``), without the
``quantization_config``.
"""

from __future__ import annotations

import torch

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules, stack_transposed, unstack_transposed

_ALPHA, _LIMIT = 1.702, 7.0  # transformers' GptOssConfig defaults (swiglu_alpha, swiglu_limit)
_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
         "original_max_position_embeddings": 4096}
_THETA = 150000.0


def _alternating(n_layer: int) -> list[str]:
    """transformers' default when config.json lists no layer_types: even layers slide, odd layers are full."""
    return ["sliding" if (i + 1) % 2 else "full" for i in range(n_layer)]


def _read_gpt_oss(hf: dict, fields: dict) -> None:
    quant = hf.get("quantization_config")
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"config.json: quantization_config.quant_method={method!r} is not a format litft imports for "
                         "model_type 'gpt_oss' (supported: 'mxfp4', dequantized on import)")
    fields["n_expert"] = int(hf["num_local_experts"])
    fields["n_expert_per_token"] = int(hf["num_experts_per_tok"])
    fields["swiglu_alpha"] = float(hf["swiglu_alpha"])
    fields["swiglu_limit"] = float(hf["swiglu_limit"])
    if "rope_parameters" not in hf and "rope_scaling" not in hf:  # GptOssConfig's default RoPE
        fields["rope_scaling"] = dict(_YARN)
    if not hf.get("layer_types") and fields.get("sliding_window"):
        fields["layer_types"] = _alternating(int(hf["num_hidden_layers"]))


def _write_gpt_oss(config: Config, hf: dict) -> None:
    hf["num_local_experts"] = config.n_expert
    hf["num_experts_per_tok"] = config.n_expert_per_token
    hf["swiglu_alpha"] = config.swiglu_alpha
    hf["swiglu_limit"] = config.swiglu_limit
    hf["hidden_act"] = "silu"  # GptOssConfig's value; the experts' activation is the clamped SwiGLU above
    hf["rope_parameters"] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    hf.pop("rope_theta", None)
    hf.pop("rope_scaling", None)
    hf.pop("mlp_bias", None)
    hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]


# ------------------------------------------------------------------ stacked experts <-> one module per expert


def _unstack_gate_up(tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
    """(E, C, 2I) weights or (E, 2I) biases, gate and up interleaved → gate, up of expert 0, of expert 1, ..."""
    parts = []
    for x in tensor.unbind(0):
        gate, up = x[..., 0::2], x[..., 1::2]
        parts += [gate.T, up.T] if x.dim() == 2 else [gate, up]
    return parts


def _stack_gate_up(parts: list[torch.Tensor], config: Config) -> torch.Tensor:
    experts = []
    for gate, up in zip(parts[0::2], parts[1::2]):
        if gate.dim() == 2:
            gate, up = gate.T, up.T
        experts.append(torch.stack((gate, up), dim=-1).flatten(-2))
    return torch.stack(experts)


def _gpt_oss_rules() -> list[WeightRule]:
    layer = "model.layers.{i}."
    moe = layer + "mlp."
    expert = "blocks.{i}.mlp.experts.{e}."
    rules = [r for r in llama_rules() if ".mlp." not in r.hf and "_norm." not in r.hf]
    rules += [
        WeightRule("blocks.{i}.attn.sinks", layer + "self_attn.sinks"),
        WeightRule("blocks.{i}.mlp.router.weight", moe + "router.weight"),
        WeightRule("blocks.{i}.mlp.router.bias", moe + "router.bias"),
        WeightRule((expert + "gate_proj.weight", expert + "up_proj.weight"), moe + "experts.gate_up_proj",
                   unstack=_unstack_gate_up, stack=_stack_gate_up),
        WeightRule((expert + "gate_proj.bias", expert + "up_proj.bias"), moe + "experts.gate_up_proj_bias",
                   unstack=_unstack_gate_up, stack=_stack_gate_up),
        WeightRule(expert + "down_proj.weight", moe + "experts.down_proj", unstack=unstack_transposed,
                   stack=stack_transposed),
        WeightRule(expert + "down_proj.bias", moe + "experts.down_proj_bias", unstack=unstack_transposed,
                   stack=stack_transposed),
    ]
    return rules


_TRAITS = dict(attention_sinks=True, moe_router_bias=True, mlp_bias=True, mlp_activation="clamped_swiglu",
               moe_normalize_topk=True)
_GPT_OSS = dict(hf_model_type="gpt_oss", vocab_size=201088, block_size=131072, n_embd=2880, n_head=64,
                n_query_groups=8, head_size=64, intermediate_size=2880, n_expert_per_token=4, norm_eps=1e-5,
                attention_bias=True, attention_out_bias=True, sliding_window=128, rope_theta=_THETA,
                rope_scaling=_YARN, swiglu_alpha=_ALPHA, swiglu_limit=_LIMIT, eos_token_id=200002,
                pad_token_id=199999, **_TRAITS)
CONFIGS = [
    Config(name=f"gpt-oss-{size}", hf_id=f"openai/gpt-oss-{size}", n_layer=n_layer, n_expert=n_expert,
           layer_types=_alternating(n_layer), **_GPT_OSS)
    for size, n_layer, n_expert in (("20b", 24, 32), ("120b", 36, 128))
]

GPT_OSS = Family(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    weight_rules=_gpt_oss_rules(),
    configs=CONFIGS,
    traits=dict(_TRAITS),
    # transformers' GptOssConfig defaults, for keys a config.json leaves out
    hf_defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
                 "rope_theta": _THETA, "sliding_window": 128, "head_dim": 64, "attention_bias": True,
                 "num_local_experts": 128, "num_experts_per_tok": 4, "swiglu_alpha": _ALPHA, "swiglu_limit": _LIMIT},
    read_hf=_read_gpt_oss,
    write_hf=_write_gpt_oss,
    hf_keys=("num_local_experts", "swiglu_alpha", "swiglu_limit", "quantization_config"),
)

FAMILIES = [GPT_OSS]
