"""Phi-3 / Phi-3.5 mini and Phi-4-mini (``Phi3ForCausalLM``: fused qkv and gate/up projections, LongRoPE,
partial rotary on Phi-4-mini)."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules


def _qkv_sizes(c: Config) -> list[int]:
    return [c.n_head * c.head_size, c.n_query_groups * c.head_size, c.n_query_groups * c.head_size]


def _gate_up_sizes(c: Config) -> list[int]:
    return [c.intermediate_size, c.intermediate_size]


def _phi3_rules() -> list[WeightRule]:
    layer = "model.layers.{i}."
    fused = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    rules = [r for r in llama_rules() if not any(f".{p}." in r.hf for p in fused)]
    rules.append(WeightRule(("blocks.{i}.attn.q_proj.weight", "blocks.{i}.attn.k_proj.weight",
                             "blocks.{i}.attn.v_proj.weight"), layer + "self_attn.qkv_proj.weight", _qkv_sizes))
    rules.append(WeightRule(("blocks.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.up_proj.weight"),
                            layer + "mlp.gate_up_proj.weight", _gate_up_sizes))
    return rules


def _write_phi3(config: Config, hf: dict) -> None:
    if config.rope_scaling and config.rope_scaling.get("original_max_position_embeddings"):
        hf["original_max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
    hf.pop("attention_bias", None)
    hf.pop("mlp_bias", None)


# LongRoPE factors of the 128k models are read from each checkpoint's config.json; the named configs here
# carry the sizes (for recipes and benchmarks) and the 4k context that needs no factors.
PHI3_CONFIGS = [
    Config(name="Phi-3-mini-4k-instruct", hf_id="microsoft/Phi-3-mini-4k-instruct", hf_model_type="phi3",
           n_layer=32, n_embd=3072, n_head=32, intermediate_size=8192, vocab_size=32064, block_size=4096,
           sliding_window=2047, norm_eps=1e-5, bos_token_id=1, eos_token_id=32000),
    Config(name="Phi-3.5-mini-instruct", hf_id="microsoft/Phi-3.5-mini-instruct", hf_model_type="phi3",
           n_layer=32, n_embd=3072, n_head=32, intermediate_size=8192, vocab_size=32064, block_size=4096,
           norm_eps=1e-5, bos_token_id=1, eos_token_id=32000),
    Config(name="Phi-4-mini-instruct", hf_id="microsoft/Phi-4-mini-instruct", hf_model_type="phi3",
           n_layer=32, n_embd=3072, n_head=24, n_query_groups=8, intermediate_size=8192, vocab_size=200064,
           block_size=4096, partial_rotary_factor=0.75, tie_embeddings=True, norm_eps=1e-5,
           bos_token_id=199999, eos_token_id=199999),
]

PHI3 = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    weight_rules=_phi3_rules(),
    configs=PHI3_CONFIGS,
    hf_defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 4096,
                 "hidden_act": "silu", "rope_theta": 10000.0, "original_max_position_embeddings": 4096},
    write_hf=_write_phi3,
)

FAMILIES = [PHI3]
