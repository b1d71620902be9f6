"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention (low-rank query and key/value latent,
decoupled RoPE channels rotated as interleaved pairs, YaRN whose mscale also scales the softmax), dense MLPs in the
first ``first_k_dense_replace`` layers, then MoE layers with grouped sigmoid routing (``n_group``, ``topk_group``,
``e_score_correction_bias``, ``routed_scaling_factor``) and shared experts.

Not implemented, and how config.json's keys are treated:

- multi-token prediction (``num_nextn_predict_layers``): its layers (numbered from ``num_hidden_layers`` on in the
  released checkpoints) are skipped on import, as transformers skips them; the key is kept and written back.
- FP8 checkpoints (``quantization_config``): refused by name; transformers has no public function that
  dequantizes them tensor by tensor (convert them to bf16 first).
- ``scoring_func``, ``topk_method`` and ``moe_layer_freq`` (the original repo's config keys, which transformers
  ignores): only the values DeepSeek-V3 has are accepted (sigmoid, noaux_tc, 1); others are refused by name.
"""

from __future__ import annotations

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules


def _read_deepseek_v3(hf: dict, fields: dict) -> None:
    if hf.get("quantization_config") is not None:
        quant = hf["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"config.json: quantization_config (quant_method {method!r}) is not a format litft imports "
                         "for model_type 'deepseek_v3'; convert the checkpoint to bf16 first")
    heads, kv_heads = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    if kv_heads != heads:
        raise ValueError(f"config.json: num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) in "
                         "multi-head latent attention (every head expands the latent)")
    n_layer, dense = int(hf["num_hidden_layers"]), int(hf["first_k_dense_replace"])
    fields["head_size"] = int(hf["qk_rope_head_dim"])
    fields["n_query_groups"] = heads
    fields["kv_lora_rank"] = int(hf["kv_lora_rank"])
    fields["q_lora_rank"] = None if hf.get("q_lora_rank") is None else int(hf["q_lora_rank"])
    fields["qk_nope_head_dim"] = int(hf["qk_nope_head_dim"])
    fields["v_head_dim"] = int(hf["v_head_dim"])
    fields["rope_interleaved"] = bool(hf["rope_interleave"])
    fields["n_expert"] = int(hf["n_routed_experts"])
    fields["n_expert_per_token"] = int(hf["num_experts_per_tok"])
    fields["moe_intermediate_size"] = int(hf["moe_intermediate_size"])
    fields["moe_shared_expert_size"] = int(hf["moe_intermediate_size"]) * int(hf["n_shared_experts"] or 0) or None
    fields["moe_normalize_topk"] = bool(hf["norm_topk_prob"])
    fields["moe_routed_scaling"] = float(hf["routed_scaling_factor"])
    fields["moe_n_group"] = int(hf["n_group"])
    fields["moe_topk_group"] = int(hf["topk_group"])
    fields["moe_dense_layers"] = list(range(min(dense, n_layer)))


def _write_deepseek_v3(config: Config, hf: dict) -> None:
    dense = len(config.moe_dense_layers)
    if config.moe_dense_layers != list(range(dense)):
        raise ValueError(f"DeepseekV3ForCausalLM has its dense layers first (first_k_dense_replace); this config's "
                         f"are {config.moe_dense_layers}")
    shared, size = config.moe_shared_expert_size or 0, config.moe_intermediate_size or config.intermediate_size
    if shared % size:
        raise ValueError(f"moe_shared_expert_size ({shared}) is not a multiple of moe_intermediate_size ({size})")
    hf.update(kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank, qk_rope_head_dim=config.head_size,
              qk_nope_head_dim=config.qk_nope_head_dim, v_head_dim=config.v_head_dim,
              rope_interleave=config.rope_interleaved, n_routed_experts=config.n_expert,
              num_experts_per_tok=config.n_expert_per_token, moe_intermediate_size=size,
              n_shared_experts=shared // size, norm_topk_prob=config.moe_normalize_topk,
              routed_scaling_factor=config.moe_routed_scaling, n_group=config.moe_n_group,
              topk_group=config.moe_topk_group, first_k_dense_replace=dense)
    hf["rope_parameters"] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    for key in ("rope_theta", "rope_scaling", "mlp_bias", "sliding_window"):
        hf.pop(key, None)


def _deepseek_v3_rules() -> list[WeightRule]:
    """Llama's embedding, norms, o_proj and dense MLPs; the latent attention's projections and norms; the router
    (with its correction bias), per-expert MLPs and the shared experts of MoE layers."""
    attn, moe = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    rules = [r for r in llama_rules() if not any(p in r.hf for p in ("q_proj", "k_proj", "v_proj", "q_norm",
                                                                         "k_norm"))]
    for native, hf in (("q_proj", "q_proj"), ("q_a_proj", "q_a_proj"), ("q_b_proj", "q_b_proj"),
                       ("kv_a_proj", "kv_a_proj_with_mqa"), ("kv_b_proj", "kv_b_proj")):
        rules.append(WeightRule(f"blocks.{{i}}.attn.{native}.weight", f"{attn}{hf}.weight"))
        rules.append(WeightRule(f"blocks.{{i}}.attn.{native}.bias", f"{attn}{hf}.bias"))
    rules.append(WeightRule("blocks.{i}.attn.q_a_norm.weight", attn + "q_a_layernorm.weight"))
    rules.append(WeightRule("blocks.{i}.attn.kv_a_norm.weight", attn + "kv_a_layernorm.weight"))
    rules.append(WeightRule("blocks.{i}.mlp.router.weight", moe + "gate.weight"))
    rules.append(WeightRule("blocks.{i}.mlp.score_correction_bias", moe + "gate.e_score_correction_bias"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(WeightRule(f"blocks.{{i}}.mlp.experts.{{e}}.{p}.weight", moe + f"experts.{{e}}.{p}.weight"))
        rules.append(WeightRule(f"blocks.{{i}}.mlp.shared_expert.{p}.weight", moe + f"shared_experts.{p}.weight"))
    return rules


_TRAITS = dict(moe_routing="sigmoid", moe_score_correction_bias=True)
_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
CONFIGS = [
    Config(name="DeepSeek-V3", hf_id="deepseek-ai/DeepSeek-V3", hf_model_type="deepseek_v3", vocab_size=129280,
           block_size=163840, n_layer=61, n_embd=7168, n_head=128, n_query_groups=128, head_size=64,
           intermediate_size=18432, norm_eps=1e-6, rope_theta=10000.0, rope_scaling=_YARN, rope_interleaved=True,
           kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, v_head_dim=128, n_expert=256,
           n_expert_per_token=8, moe_intermediate_size=2048, moe_shared_expert_size=2048, moe_normalize_topk=True,
           moe_routed_scaling=2.5, moe_n_group=8, moe_topk_group=4, moe_dense_layers=[0, 1, 2], bos_token_id=0,
           eos_token_id=1, extra={"num_nextn_predict_layers": 1}, **_TRAITS),
]

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    weight_rules=_deepseek_v3_rules(),
    configs=CONFIGS,
    traits=dict(_TRAITS),
    # transformers' DeepseekV3Config defaults, for keys a config.json leaves out
    hf_defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 4096,
                 "rope_interleave": True, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 8,
                 "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": True, "qk_rope_head_dim": 64,
                 "qk_nope_head_dim": 128, "v_head_dim": 128, "kv_lora_rank": 512, "moe_intermediate_size": 2048,
                 "n_routed_experts": 256, "num_experts_per_tok": 8},
    read_hf=_read_deepseek_v3,
    write_hf=_write_deepseek_v3,
    hf_keys=("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "qk_head_dim",
             "rope_interleave", "n_routed_experts", "moe_intermediate_size", "n_shared_experts", "norm_topk_prob",
             "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace", "quantization_config",
             "scoring_func", "topk_method", "moe_layer_freq"),
    hf_supported_values={"scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",), "moe_layer_freq": (1,)},
    hf_layers_past_n_layer_ignored=True,
)

FAMILIES = [DEEPSEEK_V3]
