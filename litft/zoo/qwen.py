"""Qwen2.5 (0.5B–72B, bias on q/k/v) and Qwen3 dense (0.6B–32B, qk-norm)."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, llama_rules


def _read_sliding(hf: dict, fields: dict) -> None:
    """Qwen layers use a sliding window only with use_sliding_window, from layer max_window_layers on."""
    if not hf.get("use_sliding_window"):
        fields.pop("sliding_window", None)
        fields.pop("layer_types", None)
    elif not hf.get("layer_types"):
        start = hf.get("max_window_layers", 28)
        fields["layer_types"] = ["sliding" if i >= start else "full" for i in range(hf["num_hidden_layers"])]


def _write_sliding(config: Config, hf: dict) -> None:
    hf["use_sliding_window"] = "sliding" in config.layer_types
    if hf["use_sliding_window"]:
        hf["max_window_layers"] = config.layer_types.index("sliding")


def _read_qwen2(hf: dict, fields: dict) -> None:
    _read_sliding(hf, fields)
    fields["attention_bias"] = True  # Qwen2 always has q/k/v biases


def _q25(size: str, instruct: bool, **kw) -> Config:
    suffix = "-Instruct" if instruct else ""
    return Config(name=f"Qwen2.5-{size}{suffix}", hf_id=f"Qwen/Qwen2.5-{size}{suffix}", hf_model_type="qwen2",
                  attention_bias=True, norm_eps=1e-6, rope_theta=1000000.0, block_size=32768,
                  bos_token_id=151643, eos_token_id=151645 if instruct else 151643, **kw)


_Q25 = {
    "0.5B": dict(n_layer=24, n_embd=896, n_head=14, n_query_groups=2, intermediate_size=4864, vocab_size=151936,
                 tie_embeddings=True),
    "1.5B": dict(n_layer=28, n_embd=1536, n_head=12, n_query_groups=2, intermediate_size=8960, vocab_size=151936,
                 tie_embeddings=True),
    "3B": dict(n_layer=36, n_embd=2048, n_head=16, n_query_groups=2, intermediate_size=11008, vocab_size=151936,
               tie_embeddings=True),
    "7B": dict(n_layer=28, n_embd=3584, n_head=28, n_query_groups=4, intermediate_size=18944, vocab_size=152064),
    "14B": dict(n_layer=48, n_embd=5120, n_head=40, n_query_groups=8, intermediate_size=13824, vocab_size=152064),
    "32B": dict(n_layer=64, n_embd=5120, n_head=40, n_query_groups=8, intermediate_size=27648, vocab_size=152064),
    "72B": dict(n_layer=80, n_embd=8192, n_head=64, n_query_groups=8, intermediate_size=29568, vocab_size=152064),
}
QWEN2_CONFIGS = [_q25(size, instruct, **dims) for size, dims in _Q25.items() for instruct in (False, True)]

_Q3 = {
    "0.6B": dict(n_layer=28, n_embd=1024, n_head=16, n_query_groups=8, intermediate_size=3072, tie_embeddings=True),
    "1.7B": dict(n_layer=28, n_embd=2048, n_head=16, n_query_groups=8, intermediate_size=6144, tie_embeddings=True),
    "4B": dict(n_layer=36, n_embd=2560, n_head=32, n_query_groups=8, intermediate_size=9728, tie_embeddings=True),
    "8B": dict(n_layer=36, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=12288),
    "14B": dict(n_layer=40, n_embd=5120, n_head=40, n_query_groups=8, intermediate_size=17408),
    "32B": dict(n_layer=64, n_embd=5120, n_head=64, n_query_groups=8, intermediate_size=25600),
}
QWEN3_CONFIGS = [
    Config(name=f"Qwen3-{size}{suffix}", hf_id=f"Qwen/Qwen3-{size}{suffix}", hf_model_type="qwen3", qk_norm=True,
           head_size=128, vocab_size=151936, block_size=40960, norm_eps=1e-6, rope_theta=1000000.0,
           bos_token_id=151643, eos_token_id=151645, **dims)
    for size, dims in _Q3.items()
    for suffix in ("", "-Base")
]

_QWEN_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                  "hidden_act": "silu", "rope_theta": 10000.0, "use_sliding_window": False, "sliding_window": 4096,
                  "max_window_layers": 28}

QWEN2 = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    weight_rules=llama_rules(),
    configs=QWEN2_CONFIGS,
    traits={"attention_bias": True, "attention_out_bias": False},
    hf_defaults=dict(_QWEN_DEFAULTS),
    read_hf=_read_qwen2,
    write_hf=_write_sliding,
)

QWEN3 = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    weight_rules=llama_rules(),
    configs=QWEN3_CONFIGS,
    traits={"qk_norm": True},
    hf_defaults=dict(_QWEN_DEFAULTS, max_position_embeddings=32768, head_dim=128),
    read_hf=_read_sliding,
    write_hf=_write_sliding,
)

FAMILIES = [QWEN2, QWEN3]
