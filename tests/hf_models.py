"""Tiny random-init transformers models of every family, built in tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.1)

_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
             "long_factor": [2.0 + 0.3 * i for i in range(8)], "original_max_position_embeddings": 16}

# (id, HF model_type, config overrides): one or more variants per family in the zoo. Numeric constants differ from
# the HF class defaults where a family's real checkpoints vary (RoPE base, norm epsilon), so a constant copied by
# hand into litft instead of read from config.json shows in the logits (rope_theta 5e5 as Llama 3; Gemma's eps 1e-4:
# a wrong 1e-6 moves the logits by ~4e-4, beyond the 1e-4 tolerance).
FAMILY_VARIANTS = {
    "llama": ("llama", dict(rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-tied": ("llama", dict(tie_word_embeddings=True, head_dim=32)),
    "llama-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 16})),
    "llama-linear-bias": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
                                        mlp_bias=True)),
    "mistral": ("mistral", dict(sliding_window=4, rope_theta=1000000.0, rms_norm_eps=1e-5)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gemma": ("gemma", dict(head_dim=16, num_key_value_heads=1, rms_norm_eps=1e-4)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 100000.0},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 1000.0}})),
    # a dense layer (mlp_only_layers) among MoE layers with 4 experts, top-2, renormalised weights
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                    norm_topk_prob=True, mlp_only_layers=[1], head_dim=32, rope_theta=1000000.0)),
    # decoder_sparse_step 2 (layers 0 and 2 dense), top-3 of 5 experts, weights not renormalised, every layer
    # sliding (use_sliding_window)
    "qwen3_moe-step": ("qwen3_moe", dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=40,
                                         norm_topk_prob=False, decoder_sparse_step=2, use_sliding_window=True,
                                         sliding_window=5)),
    # norms only after attention and MLP, qk-norm over whole projections (GQA: k_norm spans 2 heads)
    "olmo2": ("olmo2", dict(rms_norm_eps=1e-6, rope_theta=500000.0, eos_token_id=2)),
    # OLMo 2 plus a sliding window shorter than the test sequences, its own RoPE base, scaled full layers
    "olmo3": ("olmo3", dict(rms_norm_eps=1e-6, sliding_window=4, eos_token_id=2,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 100000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # NoPE every 2nd layer (layer 1 applies no RoPE)
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2, rope_theta=20000.0, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2)),
    # explicit NoPE flags and sliding layers (transformers slides the NoPE layers 0 and 2)
    "smollm3-sliding": ("smollm3", dict(no_rope_layers=[0, 1, 0], use_sliding_window=True, sliding_window=4,
                                        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # attention sinks, biases everywhere (made non-zero below), top-2 of 4 experts, sliding layers (window 4)
    # alternating with full ones, YaRN without truncation, a clamp that binds at this scale
    "gpt_oss": ("gpt_oss", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                swiglu_alpha=1.5, swiglu_limit=0.5, rms_norm_eps=1e-6, eos_token_id=2,
                                pad_token_id=0,
                                # betas that put the YaRN ramp between dims, where truncation would change it
                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 4.0,
                                                 "beta_slow": 0.5, "truncate": False, "rope_theta": 20000.0,
                                                 "original_max_position_embeddings": 16})),
    # chunks of 4 tokens on the RoPE layers 0 and 2 (interleaved RoPE, L2 qk-norm), layer 1 NoPE with full attention
    # and a temperature that grows every 2 positions, MoE layers 0 and 1 (top-2 of 4 experts, sigmoid scores on the
    # inputs, a shared expert) before the dense layer 2
    "llama4": ("llama4_text", dict(head_dim=16, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4,
                                   num_experts_per_tok=2, moe_layers=[0, 1], no_rope_layer_interval=2,
                                   attention_chunk_size=4, use_qk_norm=True, attn_temperature_tuning=True,
                                   floor_scale=2, attn_scale=0.5, rms_norm_eps=1e-6, rope_theta=20000.0,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Maverick's and Scout's other settings: top-1 routing, MoE every 2nd layer (interleave_moe_layer_step), no
    # qk-norm, no temperature tuning, Scout's llama3 RoPE scaling (low_freq_factor == high_freq_factor), chunks of 5
    "llama4-top1": ("llama4_text", dict(head_dim=16, intermediate_size=32, intermediate_size_mlp=80,
                                        num_local_experts=3, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                        no_rope_layer_interval=3, attention_chunk_size=5, use_qk_norm=False,
                                        attn_temperature_tuning=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        rope_parameters={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 1.0, "rope_theta": 500000.0,
                                                         "original_max_position_embeddings": 16})),
    # multi-head latent attention with a low-rank query, 8 experts in 4 groups (top-3 from the best 2 groups),
    # a shared expert, one dense first layer, YaRN whose mscale_all_dim scales the softmax, interleaved RoPE
    "deepseek_v3": ("deepseek_v3", dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=3,
                                        n_group=4, topk_group=2, first_k_dense_replace=1, moe_intermediate_size=32,
                                        n_shared_experts=1, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
                                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 0.9,
                                                         "mscale_all_dim": 0.7, "rope_theta": 20000.0,
                                                         "original_max_position_embeddings": 16})),
    # a plain q_proj (q_lora_rank null), rotate-half RoPE, 2 shared experts, weights not renormalised, one group
    "deepseek_v3-plain-q": ("deepseek_v3", dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=12,
                                                qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=16,
                                                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                                first_k_dense_replace=1, moe_intermediate_size=24,
                                                n_shared_experts=2, norm_topk_prob=False, rope_interleave=False,
                                                routed_scaling_factor=1.5, rope_theta=50000.0)),
    # sliding (window 4) and full layers 5:1-ish (the last full), full layers with a bigger head (32 vs 16) and
    # proportional RoPE rotating half of each head, per-layer inputs, the last 2 layers (one of each kind) KV-shared
    # with double-wide MLPs, a final softcap
    "gemma4": ("gemma4_text", dict(head_dim=8, global_head_dim=16, num_hidden_layers=6, sliding_window=4,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                "sliding_attention", "sliding_attention", "full_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 1000.0},
                                                    "full_attention": {"rope_type": "proportional",
                                                                       "partial_rotary_factor": 0.5,
                                                                       "rope_theta": 20000.0}},
                                   # a per-layer vocabulary of its own (room for the test tokenizer's 400 ids)
                                   hidden_size_per_layer_input=8, vocab_size_per_layer_input=400,
                                   num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=5.0,
                                   rms_norm_eps=1e-5)),
    # full layers with values from the key projection (no v_proj) and their own key/value heads (1), proportional
    # RoPE with a factor; no per-layer inputs, no KV sharing
    "gemma4-keqv": ("gemma4_text", dict(head_dim=16, global_head_dim=32, num_hidden_layers=4, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                     "full_attention"],
                                        attention_k_eq_v=True, num_global_key_value_heads=1,
                                        rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 5000.0},
                                                         "full_attention": {"rope_type": "proportional",
                                                                            "partial_rotary_factor": 0.25,
                                                                            "factor": 2.0, "rope_theta": 50000.0}},
                                        hidden_size_per_layer_input=0, tie_word_embeddings=False)),
    # the MoE block (26B-A4B's): top-2 of 4 experts beside every dense MLP, router input norm and scale, per-expert
    # scales (made non-trivial below); full layers with values from the keys
    "gemma4-moe": ("gemma4_text", dict(head_dim=16, global_head_dim=32, num_hidden_layers=4, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                    "full_attention"],
                                       attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True,
                                       num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                                       hidden_size_per_layer_input=0, final_logit_softcapping=10.0)),
    # Gated DeltaNet linear layers 0-2 before full attention layer 3 (q_proj with the output gate, qk-norm, RoPE on a
    # quarter of each head), 2 key heads shared by 4 value heads, a 4-tap convolution, the multimodal RoPE's sections
    "qwen3_5": ("qwen3_5_text", dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                     linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
                                     rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                                                         "partial_rotary_factor": 0.25,
                                                                         "mrope_section": [1, 1, 0],
                                                                         "mrope_interleaved": True})),
    # the same hybrid layers (full attention at layer 1 too) with a mixture of experts in every layer: top-2 of 4, a
    # shared expert scaled by its sigmoid gate
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
                                             linear_num_value_heads=2, linear_key_head_dim=12, linear_value_head_dim=8,
                                             layer_types=["linear_attention", "full_attention", "linear_attention",
                                                          "full_attention"],
                                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48, rope_theta=50000.0)),
    "qwen2": ("qwen2", dict()),
    "qwen3": ("qwen3", dict(head_dim=32)),
    "phi3": ("phi3", dict(pad_token_id=0, rope_scaling=_LONGROPE, original_max_position_embeddings=16)),
    "phi4-mini": ("phi3", dict(pad_token_id=0, partial_rotary_factor=0.75, tie_word_embeddings=True)),
}


def make_hf_model(variant: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  overrides: Optional[dict] = None):
    """Build, randomise and save a tiny HF model; returns the model (eval mode, eager attention).

    ``overrides`` change config fields on top of the variant's, e.g. ``{"vocab_size": 400}`` to fit a tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, variant_overrides = FAMILY_VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **{**TINY, **variant_overrides, **(overrides or {})})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    with torch.no_grad():  # non-trivial norm weights, biases and sinks so that they are really exercised
        for name, p in model.named_parameters():
            # (and Gemma 4's router input and per-expert scales, ones at init)
            if "norm" in name or name.endswith(("bias", "sinks", "router.scale", "per_expert_scale")):
                p.add_(torch.randn_like(p) * (1.0 if name.endswith("sinks") else 0.1))
            if name.endswith("dt_bias"):  # random per-head decay offsets (transformers initialises them to 1)
                p.add_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():  # DeepSeek-V3's routing correction bias: shifts which experts are chosen
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
            if name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale (ones at init)
                b.add_(torch.randn_like(b) * 0.2)
    model.eval()
    model.save_pretrained(directory)
    return model
