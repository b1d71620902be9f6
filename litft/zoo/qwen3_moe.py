"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's qk-norm attention with sparse MoE layers (top-k softmax routing,
optionally renormalised top-k weights) and dense MLP layers among them (``mlp_only_layers``,
``decoder_sparse_step``). Qwen3-30B-A3B and Qwen3-235B-A22B."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules


def _read_qwen3_moe(hf: dict, fields: dict) -> None:
    # transformers 5 writes num_local_experts (its attribute name); the released checkpoints say num_experts
    n_expert = int(hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"])
    step = int(hf["decoder_sparse_step"])
    if step < 1:
        raise ValueError(f"config.json: decoder_sparse_step must be >= 1, got {step}")
    n_layer = int(hf["num_hidden_layers"])
    only_dense = set(hf.get("mlp_only_layers") or [])
    outside = sorted(i for i in only_dense if not 0 <= i < n_layer)
    if outside:
        raise ValueError(f"config.json: mlp_only_layers holds {outside}, outside [0, num_hidden_layers={n_layer})")
    fields["n_expert"] = n_expert
    if n_expert:
        fields["n_expert_per_token"] = int(hf["num_experts_per_tok"])
        fields["moe_dense_layers"] = [i for i in range(n_layer) if i in only_dense or (i + 1) % step]
    fields["moe_normalize_topk"] = bool(hf["norm_topk_prob"])
    fields["moe_intermediate_size"] = int(hf["moe_intermediate_size"])
    # every layer slides when use_sliding_window is set (transformers' Qwen3MoeAttention); else none does
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        fields["layer_types"] = ["sliding"] * n_layer
    else:
        fields.pop("sliding_window", None)
        fields.pop("layer_types", None)


def _write_qwen3_moe(config: Config, hf: dict) -> None:
    hf["num_experts"] = config.n_expert
    hf["num_experts_per_tok"] = config.n_expert_per_token
    hf["norm_topk_prob"] = config.moe_normalize_topk
    hf["moe_intermediate_size"] = config.moe_intermediate_size or config.intermediate_size
    hf["decoder_sparse_step"] = 1
    hf["mlp_only_layers"] = list(config.moe_dense_layers)
    sliding = set(config.layer_types)
    if sliding == {"sliding", "full"}:
        raise ValueError("Qwen3MoeForCausalLM slides in every layer or in none; this config mixes both")
    hf["use_sliding_window"] = sliding == {"sliding"}
    hf.pop("layer_types", None)
    hf.pop("mlp_bias", None)


def _qwen3_moe_rules() -> list[WeightRule]:
    """Llama's table (dense layers keep ``mlp.gate_proj`` ...) plus the router and the experts of MoE layers."""
    moe = "model.layers.{i}.mlp."
    rules = llama_rules()
    rules.append(WeightRule("blocks.{i}.mlp.router.weight", moe + "gate.weight"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(WeightRule(f"blocks.{{i}}.mlp.experts.{{e}}.{p}.weight", moe + f"experts.{{e}}.{p}.weight"))
    return rules


_Q3M = dict(hf_model_type="qwen3_moe", qk_norm=True, head_size=128, vocab_size=151936, block_size=40960,
            norm_eps=1e-6, rope_theta=1000000.0, n_expert=128, n_expert_per_token=8, moe_normalize_topk=True,
            bos_token_id=151643)
_SIZES = {
    "30B-A3B": dict(n_layer=48, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=6144,
                    moe_intermediate_size=768),
    "235B-A22B": dict(n_layer=94, n_embd=4096, n_head=64, n_query_groups=4, intermediate_size=12288,
                      moe_intermediate_size=1536),
}

CONFIGS = [
    Config(name=f"Qwen3-{size}{suffix}", hf_id=f"Qwen/Qwen3-{size}{suffix}", eos_token_id=eos, **_Q3M, **dims)
    for size, dims in _SIZES.items()
    for suffix, eos in (("", 151645), ("-Base", 151643))
]

QWEN3_MOE = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    weight_rules=_qwen3_moe_rules(),
    configs=CONFIGS,
    traits={"qk_norm": True},
    # transformers' Qwen3MoeConfig defaults, for keys a config.json leaves out
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                 "hidden_act": "silu", "rope_theta": 10000.0, "use_sliding_window": False, "sliding_window": 4096,
                 "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
                 "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": []},
    read_hf=_read_qwen3_moe,
    write_hf=_write_qwen3_moe,
    hf_keys=("num_experts", "num_local_experts", "norm_topk_prob", "moe_intermediate_size", "decoder_sparse_step",
             "mlp_only_layers"),
    # a flag read with bool() would take any string as true
    hf_supported_values={"norm_topk_prob": (True, False)},
)

FAMILIES = [QWEN3_MOE]
