"""Llama 2, Llama 3 / 3.1 / 3.2 / 3.3 and SmolLM2 (all ``LlamaForCausalLM``)."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, llama_rules


def _cfg(name: str, hf_id: str, **kw) -> Config:
    return Config(name=name, hf_id=hf_id, hf_model_type="llama", **kw)


_LLAMA2 = dict(vocab_size=32000, block_size=4096, norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
_L2_SIZES = {
    "7b": dict(n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008),
    "13b": dict(n_layer=40, n_embd=5120, n_head=40, intermediate_size=13824),
    "70b": dict(n_layer=80, n_embd=8192, n_head=64, n_query_groups=8, intermediate_size=28672),
}
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000)
_L3_SIZES = {
    "1B": dict(n_layer=16, n_embd=2048, n_head=32, n_query_groups=8, head_size=64, intermediate_size=8192,
               tie_embeddings=True),
    "3B": dict(n_layer=28, n_embd=3072, n_head=24, n_query_groups=8, head_size=128, intermediate_size=8192,
               tie_embeddings=True),
    "8B": dict(n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336),
    "70B": dict(n_layer=80, n_embd=8192, n_head=64, n_query_groups=8, intermediate_size=28672),
    "405B": dict(n_layer=126, n_embd=16384, n_head=128, n_query_groups=8, intermediate_size=53248),
}


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


CONFIGS: list[Config] = []
for size, dims in _L2_SIZES.items():
    CONFIGS.append(_cfg(f"Llama-2-{size}", f"meta-llama/Llama-2-{size}-hf", **_LLAMA2, **dims))
    CONFIGS.append(_cfg(f"Llama-2-{size}-chat", f"meta-llama/Llama-2-{size}-chat-hf", **_LLAMA2, **dims))
for size in ("8B", "70B"):
    for suffix, eos in (("", 128001), ("-Instruct", 128009)):
        CONFIGS.append(_cfg(f"Llama-3-{size}{suffix}", f"meta-llama/Meta-Llama-3-{size}{suffix}", block_size=8192,
                            eos_token_id=eos, **_LLAMA3, **_L3_SIZES[size]))
for version, sizes, factor in (("3.1", ("8B", "70B", "405B"), 8.0), ("3.2", ("1B", "3B"), 32.0)):
    for size in sizes:
        for suffix, eos in (("", 128001), ("-Instruct", [128001, 128008, 128009])):
            CONFIGS.append(_cfg(f"Llama-{version}-{size}{suffix}", f"meta-llama/Llama-{version}-{size}{suffix}",
                                block_size=131072, rope_scaling=_llama3_rope(factor), eos_token_id=eos,
                                **_LLAMA3, **_L3_SIZES[size]))
CONFIGS.append(_cfg("Llama-3.3-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct", block_size=131072,
                    rope_scaling=_llama3_rope(8.0), eos_token_id=[128001, 128008, 128009], **_LLAMA3,
                    **_L3_SIZES["70B"]))

_SMOL = {
    "135M": dict(n_layer=30, n_embd=576, n_head=9, n_query_groups=3, intermediate_size=1536, rope_theta=100000.0),
    "360M": dict(n_layer=32, n_embd=960, n_head=15, n_query_groups=5, intermediate_size=2560, rope_theta=100000.0),
    "1.7B": dict(n_layer=24, n_embd=2048, n_head=32, n_query_groups=32, intermediate_size=8192, rope_theta=130000.0),
}
for size, dims in _SMOL.items():
    for suffix, bos, eos in (("", 0, 0), ("-Instruct", 1, 2)):
        CONFIGS.append(_cfg(f"SmolLM2-{size}{suffix}", f"HuggingFaceTB/SmolLM2-{size}{suffix}", vocab_size=49152,
                            block_size=8192, norm_eps=1e-5, tie_embeddings=True, bos_token_id=bos,
                            eos_token_id=eos, **dims))

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    weight_rules=llama_rules(),
    configs=CONFIGS,
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048,
                 "hidden_act": "silu", "rope_theta": 10000.0},
)

FAMILIES = [LLAMA]
