"""Mistral 7B (v0.1 with its 4k sliding window, v0.2, v0.3) and Mixtral 8x7B / 8x22B (sparse MoE)."""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules

_M7 = dict(n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336, block_size=32768,
           norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

MISTRAL_CONFIGS = [
    Config(name="Mistral-7B-v0.1", hf_id="mistralai/Mistral-7B-v0.1", hf_model_type="mistral", vocab_size=32000,
           sliding_window=4096, rope_theta=10000.0, **_M7),
    Config(name="Mistral-7B-Instruct-v0.1", hf_id="mistralai/Mistral-7B-Instruct-v0.1", hf_model_type="mistral",
           vocab_size=32000, sliding_window=4096, rope_theta=10000.0, **_M7),
    Config(name="Mistral-7B-Instruct-v0.2", hf_id="mistralai/Mistral-7B-Instruct-v0.2", hf_model_type="mistral",
           vocab_size=32000, rope_theta=1000000.0, **_M7),
    Config(name="Mistral-7B-v0.3", hf_id="mistralai/Mistral-7B-v0.3", hf_model_type="mistral", vocab_size=32768,
           rope_theta=1000000.0, **_M7),
    Config(name="Mistral-7B-Instruct-v0.3", hf_id="mistralai/Mistral-7B-Instruct-v0.3", hf_model_type="mistral",
           vocab_size=32768, rope_theta=1000000.0, **_M7),
]

_X7 = dict(n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336, vocab_size=32000,
           block_size=32768)
_X22 = dict(n_layer=56, n_embd=6144, n_head=48, n_query_groups=8, intermediate_size=16384, vocab_size=32768,
            block_size=65536)
MIXTRAL_CONFIGS = [
    Config(name=f"Mixtral-{size}{suffix}", hf_id=f"mistralai/Mixtral-{size}{suffix}", hf_model_type="mixtral",
           n_expert=8, n_expert_per_token=2, rope_theta=1000000.0, norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
           **dims)
    for size, dims in (("8x7B", _X7), ("8x22B", _X22))
    for suffix in ("-v0.1", "-Instruct-v0.1")
]


def _read_moe(hf: dict, fields: dict) -> None:
    fields["n_expert"] = int(hf["num_local_experts"])
    fields["n_expert_per_token"] = int(hf["num_experts_per_tok"])


def _write_moe(config: Config, hf: dict) -> None:
    hf["num_local_experts"] = config.n_expert
    hf["num_experts_per_tok"] = config.n_expert_per_token
    hf.pop("mlp_bias", None)


def _mixtral_rules() -> list[WeightRule]:
    moe = "model.layers.{i}.block_sparse_moe."
    rules = [r for r in llama_rules() if ".mlp." not in r.hf]
    rules.append(WeightRule("blocks.{i}.mlp.router.weight", moe + "gate.weight"))
    for native, hf in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
        rules.append(WeightRule(f"blocks.{{i}}.mlp.experts.{{e}}.{native}.weight", moe + f"experts.{{e}}.{hf}.weight"))
    return rules


MISTRAL = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    weight_rules=llama_rules(),
    configs=MISTRAL_CONFIGS,
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 131072,
                 "hidden_act": "silu", "rope_theta": 10000.0, "sliding_window": 4096},
)

MIXTRAL = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    weight_rules=_mixtral_rules(),
    configs=MIXTRAL_CONFIGS,
    hf_defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
                 "hidden_act": "silu", "rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2},
    read_hf=_read_moe,
    write_hf=_write_moe,
)

FAMILIES = [MISTRAL, MIXTRAL]
