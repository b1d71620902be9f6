"""OLMo 2 (1B, 7B, 13B, 32B) and OLMo 3 (7B, 32B): norms after attention and after the MLP only (no norm before
them), RMSNorm over the whole q and k projections (not per head); OLMo 3 adds sliding-window layers
(``layer_types``) with their own RoPE base."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules, refuse_scaled_sliding_rope

_OLMO3_THETA = 500000.0  # Olmo3Config.default_theta
_OLMO_TRAITS = dict(qk_norm=True, qk_norm_across_heads=True, pre_block_norms=False, post_block_norms=True)


def _olmo_rules() -> list[WeightRule]:
    layer = "model.layers.{i}."
    pre_norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
    rules = [r for r in llama_rules() if not r.hf.endswith(pre_norms)]
    rules += [
        WeightRule("blocks.{i}.post_attn_norm.weight", layer + "post_attention_layernorm.weight"),
        WeightRule("blocks.{i}.post_mlp_norm.weight", layer + "post_feedforward_layernorm.weight"),
    ]
    return rules


def _write_olmo2(config: Config, hf: dict) -> None:
    hf.pop("mlp_bias", None)  # OLMo's MLP has no bias switch
    hf.pop("sliding_window", None)


def _read_olmo3(hf: dict, fields: dict) -> None:
    """Layer kinds as transformers derives them when config.json lists none (every 4th layer full); the sliding
    layers' RoPE may differ from the full layers' only in its base."""
    if not hf.get("layer_types") and fields.get("sliding_window"):
        fields["layer_types"] = ["sliding" if (i + 1) % 4 else "full" for i in range(hf["num_hidden_layers"])]
    # a config.json in the legacy layout (rope_theta, rope_scaling) sets the full layers' RoPE only: transformers
    # gives the sliding layers the class default base, unscaled
    fields.setdefault("rope_local_theta", _OLMO3_THETA)
    refuse_scaled_sliding_rope(hf, "olmo3")


def _write_olmo3(config: Config, hf: dict) -> None:
    """RoPE per layer kind in transformers' ``rope_parameters`` layout (its legacy keys give the sliding layers the
    class default base)."""
    hf.pop("mlp_bias", None)
    full = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    local = config.rope_local_theta if config.rope_local_theta is not None else config.rope_theta
    hf["rope_parameters"] = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    hf.pop("rope_theta", None)
    hf.pop("rope_scaling", None)
    hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]


_OLMO2 = dict(hf_model_type="olmo2", vocab_size=100352, block_size=4096, norm_eps=1e-6, rope_theta=500000.0,
              eos_token_id=100257, pad_token_id=100277, **_OLMO_TRAITS)
_OLMO2_SIZES = {
    "0425-1B": dict(n_layer=16, n_embd=2048, n_head=16, intermediate_size=8192),
    "1124-7B": dict(n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008),
    "1124-13B": dict(n_layer=40, n_embd=5120, n_head=40, intermediate_size=13824),
    "0325-32B": dict(n_layer=64, n_embd=5120, n_head=40, n_query_groups=8, intermediate_size=27648),
}
OLMO2_CONFIGS = [
    Config(name=f"OLMo-2-{size}{suffix}", hf_id=f"allenai/OLMo-2-{size}{suffix}", **_OLMO2, **dims)
    for size, dims in _OLMO2_SIZES.items()
    for suffix in ("", "-Instruct")
]


def _olmo3_layers(n_layer: int) -> list[str]:
    return ["sliding" if (i + 1) % 4 else "full" for i in range(n_layer)]


_OLMO3_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
               "attention_factor": 1.2079441541679836, "beta_fast": 32.0, "beta_slow": 1.0}
_OLMO3 = dict(hf_model_type="olmo3", vocab_size=100278, block_size=65536, norm_eps=1e-6, rope_theta=500000.0,
              rope_local_theta=500000.0, rope_scaling=_OLMO3_YARN, sliding_window=4096, eos_token_id=100257,
              pad_token_id=100277, **_OLMO_TRAITS)
_OLMO3_SIZES = {
    "1025-7B": dict(n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008),
    "1125-32B": dict(n_layer=64, n_embd=5120, n_head=40, n_query_groups=8, intermediate_size=27648),
}
OLMO3_CONFIGS = [
    Config(name=f"Olmo-3-{size}", hf_id=f"allenai/Olmo-3-{size}", layer_types=_olmo3_layers(dims["n_layer"]),
           **_OLMO3, **dims)
    for size, dims in _OLMO3_SIZES.items()
]

# transformers' Olmo2Config / Olmo3Config defaults, for keys a config.json leaves out
_OLMO_DEFAULTS = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 2048,
                  "hidden_act": "silu", "rope_theta": 10000.0}

OLMO2 = Family(
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    weight_rules=_olmo_rules(),
    configs=OLMO2_CONFIGS,
    traits=dict(_OLMO_TRAITS),
    hf_defaults=dict(_OLMO_DEFAULTS),
    write_hf=_write_olmo2,
)

OLMO3 = Family(
    model_type="olmo3",
    architecture="Olmo3ForCausalLM",
    weight_rules=_olmo_rules(),
    configs=OLMO3_CONFIGS,
    traits=dict(_OLMO_TRAITS),
    hf_defaults=dict(_OLMO_DEFAULTS, rope_theta=_OLMO3_THETA, sliding_window=4096),
    read_hf=_read_olmo3,
    write_hf=_write_olmo3,
)

FAMILIES = [OLMO2, OLMO3]
