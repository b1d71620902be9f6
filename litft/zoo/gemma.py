"""Gemma 1 (2B, 7B), Gemma 2 (2B, 9B, 27B: softcapping, alternating sliding window, sandwich norms) and
Gemma 3 text models (1B, 4B, 12B, 27B: qk-norm, local/global RoPE bases)."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules

_GEMMA_TRAITS = dict(norm_unit_offset=True, scale_embeddings=True)


def _gemma_activation(hf: dict, fields: dict) -> None:
    # official Gemma 1 configs say "gelu" but mean the tanh approximation (transformers does the same)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    fields["mlp_activation"] = "gelu_tanh" if act in ("gelu", "gelu_pytorch_tanh", "gelu_new") else act


def _write_activation(config: Config, hf: dict) -> None:
    hf["hidden_activation"] = hf["hidden_act"]


def _read_gemma2(hf: dict, fields: dict) -> None:
    _gemma_activation(hf, fields)
    if not hf.get("layer_types") and fields.get("sliding_window"):
        fields["layer_types"] = ["sliding" if (i + 1) % 2 else "full" for i in range(hf["num_hidden_layers"])]


def _read_gemma3(hf: dict, fields: dict) -> None:
    _gemma_activation(hf, fields)
    if not hf.get("layer_types") and fields.get("sliding_window"):
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        fields["layer_types"] = ["sliding" if (i + 1) % pattern else "full" for i in range(hf["num_hidden_layers"])]
    fields.setdefault("rope_local_theta", float(hf.get("rope_local_base_freq", 10000.0)))


def _write_gemma3(config: Config, hf: dict) -> None:
    _write_activation(config, hf)
    hf["rope_local_base_freq"] = config.rope_local_theta


def _sandwich_rules() -> list[WeightRule]:
    layer = "model.layers.{i}."
    rules = [r for r in llama_rules() if not r.hf.endswith("post_attention_layernorm.weight")]
    rules += [
        WeightRule("blocks.{i}.post_attn_norm.weight", layer + "post_attention_layernorm.weight"),
        WeightRule("blocks.{i}.mlp_norm.weight", layer + "pre_feedforward_layernorm.weight"),
        WeightRule("blocks.{i}.post_mlp_norm.weight", layer + "post_feedforward_layernorm.weight"),
    ]
    return rules


def _g(name: str, hf_id: str, model_type: str, **kw) -> Config:
    return Config(name=name, hf_id=hf_id, hf_model_type=model_type, mlp_activation="gelu_tanh", norm_eps=1e-6,
                  tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, **_GEMMA_TRAITS, **kw)


GEMMA1_CONFIGS = [
    _g(f"gemma-{size}{suffix}", f"google/gemma-{size}{suffix}", "gemma", vocab_size=256000, block_size=8192,
       head_size=256, rope_theta=10000.0, **dims)
    for size, dims in (
        ("2b", dict(n_layer=18, n_embd=2048, n_head=8, n_query_groups=1, intermediate_size=16384)),
        ("7b", dict(n_layer=28, n_embd=3072, n_head=16, n_query_groups=16, intermediate_size=24576)),
    )
    for suffix in ("", "-it")
]


def _alternating(n: int, every: int) -> list[str]:
    return ["sliding" if (i + 1) % every else "full" for i in range(n)]


GEMMA2_CONFIGS = [
    _g(f"gemma-2-{size}{suffix}", f"google/gemma-2-{size}{suffix}", "gemma2", vocab_size=256000, block_size=8192,
       rope_theta=10000.0, sliding_window=4096, layer_types=_alternating(dims["n_layer"], 2),
       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, post_block_norms=True, **dims)
    for size, dims in (
        ("2b", dict(n_layer=26, n_embd=2304, n_head=8, n_query_groups=4, head_size=256, intermediate_size=9216,
                    query_pre_attn_scalar=256)),
        ("9b", dict(n_layer=42, n_embd=3584, n_head=16, n_query_groups=8, head_size=256, intermediate_size=14336,
                    query_pre_attn_scalar=256)),
        ("27b", dict(n_layer=46, n_embd=4608, n_head=32, n_query_groups=16, head_size=128, intermediate_size=36864,
                     query_pre_attn_scalar=144)),
    )
    for suffix in ("", "-it")
]

GEMMA3_CONFIGS = [
    _g(f"gemma-3-{size}{suffix}", f"google/gemma-3-{size}{suffix}", "gemma3_text", head_size=dims.pop("head_size", 256),
       rope_theta=1000000.0, rope_local_theta=10000.0, layer_types=_alternating(dims["n_layer"], 6), qk_norm=True,
       post_block_norms=True, **dims)
    for size, dims in (
        ("1b", dict(n_layer=26, n_embd=1152, n_head=4, n_query_groups=1, intermediate_size=6912, vocab_size=262144,
                    block_size=32768, sliding_window=512, query_pre_attn_scalar=256)),
        ("4b", dict(n_layer=34, n_embd=2560, n_head=8, n_query_groups=4, intermediate_size=10240, vocab_size=262208,
                    block_size=131072, sliding_window=1024, query_pre_attn_scalar=256,
                    rope_scaling={"rope_type": "linear", "factor": 8.0})),
        ("12b", dict(n_layer=48, n_embd=3840, n_head=16, n_query_groups=8, intermediate_size=15360,
                     vocab_size=262208, block_size=131072, sliding_window=1024, query_pre_attn_scalar=256,
                     rope_scaling={"rope_type": "linear", "factor": 8.0})),
        ("27b", dict(n_layer=62, n_embd=5376, n_head=32, n_query_groups=16, head_size=128, intermediate_size=21504,
                     vocab_size=262208, block_size=131072, sliding_window=1024, query_pre_attn_scalar=168,
                     rope_scaling={"rope_type": "linear", "factor": 8.0})),
    )
    for suffix in ("-pt", "-it")
    for dims in [dict(dims)]
]

GEMMA = Family(
    model_type="gemma",
    architecture="GemmaForCausalLM",
    weight_rules=llama_rules(),
    configs=GEMMA1_CONFIGS,
    traits=dict(_GEMMA_TRAITS),
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                 "rope_theta": 10000.0, "head_dim": 256},
    read_hf=_gemma_activation,
    write_hf=_write_activation,
)

GEMMA2 = Family(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    weight_rules=_sandwich_rules(),
    configs=GEMMA2_CONFIGS,
    traits=dict(_GEMMA_TRAITS, post_block_norms=True),
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                 "rope_theta": 10000.0, "head_dim": 256, "sliding_window": 4096, "query_pre_attn_scalar": 256,
                 "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    read_hf=_read_gemma2,
    write_hf=_write_activation,
)

GEMMA3 = Family(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    weight_rules=_sandwich_rules(),
    configs=GEMMA3_CONFIGS,
    traits=dict(_GEMMA_TRAITS, post_block_norms=True, qk_norm=True),
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 131072,
                 "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "head_dim": 256, "sliding_window": 4096,
                 "query_pre_attn_scalar": 256},
    read_hf=_read_gemma3,
    write_hf=_write_gemma3,
    # multimodal Gemma 3 repos (4B+) wrap the text model; only its weights are taken
    hf_prefix_aliases={"model.language_model.": "model.", "language_model.model.": "model.",
                       "language_model.lm_head.": "lm_head."},
    hf_ignored_prefixes=("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                         "multi_modal_projector."),
)

FAMILIES = [GEMMA, GEMMA2, GEMMA3]
