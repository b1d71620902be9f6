"""Llama 4 text (``Llama4ForCausalLM``; the text model of Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E).

Layers with RoPE (interleaved pairs, Llama 4's complex form) attend within chunks of ``attention_chunk_size``
tokens and L2-normalise q and k after RoPE (``use_qk_norm``); every ``no_rope_layer_interval``-th layer (or as
``no_rope_layers`` flags) is a NoPE layer with full attention whose queries are scaled up with the position
(``attn_temperature_tuning``, ``floor_scale``, ``attn_scale``). MoE layers (``moe_layers``, else every
``interleave_moe_layer_step``-th layer) route each token to its top-k experts with the sigmoid of the router
logit scaling the expert's *input*, plus a shared expert; the other layers have a dense MLP of
``intermediate_size_mlp``.

transformers keeps each layer's experts stacked: ``experts.gate_up_proj`` (E, C, 2I) with gate the first I
columns and up the last I, ``experts.down_proj`` (E, I, C); the table's stacked rules convert them to one module
per expert and back.
"""

from __future__ import annotations

import torch

from litft.config import Config
from litft.zoo.base import Family, WeightRule, llama_rules, stack_transposed, unstack_transposed

_ROPE_SCOUT = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}


def _flags(hf: dict, key: str, n_layer: int) -> list[int]:
    flags = hf[key]
    if len(flags) != n_layer or any(f not in (0, 1) for f in flags):
        raise ValueError(f"config.json: {key} must hold {n_layer} flags of 0 or 1 (one per layer), got {flags}")
    return list(flags)


def _read_llama4(hf: dict, fields: dict) -> None:
    quant = hf.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"config.json: quantization_config (quant_method={method!r}) is not a format litft imports "
                         "for model_type 'llama4_text'; convert the unquantized (bf16) checkpoint")
    n_layer = int(hf["num_hidden_layers"])
    if hf.get("no_rope_layers"):  # 1: the layer applies RoPE, 0: it does not (transformers' convention)
        rope_flags = _flags(hf, "no_rope_layers", n_layer)
    else:
        interval = int(hf["no_rope_layer_interval"])
        if interval < 1:
            raise ValueError(f"config.json: no_rope_layer_interval must be >= 1, got {interval}")
        rope_flags = [int((i + 1) % interval != 0) for i in range(n_layer)]
    fields["nope_layers"] = [i for i, f in enumerate(rope_flags) if not f]
    chunk = hf.get("attention_chunk_size")
    if chunk is not None:
        fields["attention_chunk_size"] = int(chunk)
    if not hf.get("layer_types"):  # transformers' default: RoPE layers are chunked when a chunk size is set
        fields["layer_types"] = ["chunked" if f and chunk is not None else "full" for f in rope_flags]

    fields["n_expert"] = int(hf["num_local_experts"])
    fields["n_expert_per_token"] = int(hf["num_experts_per_tok"])
    moe_layers = hf.get("moe_layers")
    if moe_layers is None:
        step = int(hf["interleave_moe_layer_step"])
        if step < 1:
            raise ValueError(f"config.json: interleave_moe_layer_step must be >= 1, got {step}")
        moe_layers = range(step - 1, n_layer, step)
    outside = sorted(i for i in moe_layers if not 0 <= i < n_layer)
    if outside:
        raise ValueError(f"config.json: moe_layers holds {outside}, outside [0, num_hidden_layers={n_layer})")
    fields["moe_dense_layers"] = [i for i in range(n_layer) if i not in set(moe_layers)]
    # experts and the shared expert have intermediate_size; the dense layers intermediate_size_mlp
    fields["moe_intermediate_size"] = fields["moe_shared_expert_size"] = int(hf["intermediate_size"])
    fields["intermediate_size"] = int(hf["intermediate_size_mlp"])

    fields["qk_l2_norm"] = bool(hf["use_qk_norm"])
    # truthiness as transformers tests it (the released configs say 4)
    if hf["attn_temperature_tuning"]:
        fields["attn_temperature_floor_scale"] = int(hf["floor_scale"])
        fields["attn_temperature_scale"] = float(hf["attn_scale"])


def _write_llama4(config: Config, hf: dict) -> None:
    for field, expected in (("moe_routing", "sigmoid_inputs"), ("rope_interleaved", True),
                            ("moe_shared_expert_size", config.moe_intermediate_size)):
        if getattr(config, field) != expected:
            raise ValueError(f"Llama4ForCausalLM needs {field}={expected!r}, this config has "
                             f"{getattr(config, field)!r}")
    if set(config.layer_types) - {"full", "chunked"}:
        raise ValueError(f"Llama4ForCausalLM has full and chunked layers only, this config has {config.layer_types}")
    hf["intermediate_size"] = config.moe_intermediate_size
    hf["intermediate_size_mlp"] = config.intermediate_size
    hf["num_local_experts"] = config.n_expert
    hf["num_experts_per_tok"] = config.n_expert_per_token
    hf["moe_layers"] = [i for i in range(config.n_layer) if config.is_moe_layer(i)]
    nope = set(config.nope_layers)
    hf["no_rope_layers"] = [0 if i in nope else 1 for i in range(config.n_layer)]
    hf["attention_chunk_size"] = config.attention_chunk_size
    hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]
    hf["use_qk_norm"] = config.qk_l2_norm
    tuned = config.attn_temperature_floor_scale is not None
    hf["attn_temperature_tuning"] = tuned
    if tuned:
        hf["floor_scale"] = config.attn_temperature_floor_scale
        hf["attn_scale"] = config.attn_temperature_scale
    # a new dict: transformers adds rope_theta to the one it is given
    hf["rope_parameters"] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    for key in ("rope_theta", "rope_scaling", "mlp_bias", "sliding_window"):
        hf.pop(key, None)


# ------------------------------------------------------------------ stacked experts <-> one module per expert


def _unstack_gate_up(tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
    """(E, C, 2I), gate the first I columns and up the last I → gate, up of expert 0 (as (I, C) Linear weights),
    of expert 1, ..."""
    parts = []
    for x in tensor.unbind(0):
        gate, up = x.chunk(2, dim=-1)
        parts += [gate.T, up.T]
    return parts


def _stack_gate_up(parts: list[torch.Tensor], config: Config) -> torch.Tensor:
    return torch.stack([torch.cat((gate.T, up.T), dim=-1) for gate, up in zip(parts[0::2], parts[1::2])])


def _llama4_rules() -> list[WeightRule]:
    layer = "model.layers.{i}."
    ff = layer + "feed_forward."
    expert = "blocks.{i}.mlp.experts.{e}."
    # Llama's table less its MLP (here ``feed_forward``) and its q/k norms (Llama 4's have no weight)
    rules = [r for r in llama_rules() if ".mlp." not in r.hf and "_norm." not in r.hf]
    for p in ("gate_proj", "up_proj", "down_proj"):  # the dense layers' MLP and the MoE layers' shared expert
        rules.append(WeightRule(f"blocks.{{i}}.mlp.{p}.weight", ff + f"{p}.weight"))
        rules.append(WeightRule(f"blocks.{{i}}.mlp.shared_expert.{p}.weight", ff + f"shared_expert.{p}.weight"))
    rules += [
        WeightRule("blocks.{i}.mlp.router.weight", ff + "router.weight"),
        WeightRule((expert + "gate_proj.weight", expert + "up_proj.weight"), ff + "experts.gate_up_proj",
                   unstack=_unstack_gate_up, stack=_stack_gate_up),
        WeightRule(expert + "down_proj.weight", ff + "experts.down_proj", unstack=unstack_transposed,
                   stack=stack_transposed),
    ]
    return rules


_TRAITS = dict(rope_interleaved=True, moe_routing="sigmoid_inputs", moe_normalize_topk=False)
_L4 = dict(hf_model_type="llama4_text", vocab_size=202048, n_layer=48, n_embd=5120, n_head=40, n_query_groups=8,
           head_size=128, intermediate_size=16384, moe_intermediate_size=8192, moe_shared_expert_size=8192,
           n_expert_per_token=1, norm_eps=1e-5, rope_theta=500000.0, nope_layers=[i for i in range(48) if i % 4 == 3],
           attention_chunk_size=8192, layer_types=["full" if i % 4 == 3 else "chunked" for i in range(48)],
           attn_temperature_floor_scale=8192, attn_temperature_scale=0.1, bos_token_id=200000,
           eos_token_id=[200001, 200007, 200008], pad_token_id=200018, **_TRAITS)
_SIZES = {
    # every layer MoE, L2 qk-norm, llama3 RoPE scaling to 10M positions
    "Scout-17B-16E": dict(n_expert=16, block_size=10485760, rope_scaling=_ROPE_SCOUT, qk_l2_norm=True),
    # MoE every 2nd layer (1, 3, ...), no qk-norm, no RoPE scaling
    "Maverick-17B-128E": dict(n_expert=128, block_size=1048576, moe_dense_layers=list(range(0, 48, 2))),
}
CONFIGS = [
    Config(name=f"Llama-4-{size}{suffix}", hf_id=f"meta-llama/Llama-4-{size}{suffix}", **_L4, **dims)
    for size, dims in _SIZES.items()
    for suffix in ("", "-Instruct")
]

LLAMA4 = Family(
    model_type="llama4_text",
    architecture="Llama4ForCausalLM",
    weight_rules=_llama4_rules(),
    configs=CONFIGS,
    traits=dict(_TRAITS),
    # transformers' Llama4TextConfig defaults, for keys a config.json leaves out
    hf_defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
                 "hidden_act": "silu", "rope_theta": 500000.0, "head_dim": 128, "intermediate_size": 8192,
                 "intermediate_size_mlp": 16384, "num_local_experts": 16, "num_experts_per_tok": 1,
                 "interleave_moe_layer_step": 1, "use_qk_norm": True, "no_rope_layer_interval": 4,
                 "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
                 "attn_scale": 0.1, "attention_bias": False},
    read_hf=_read_llama4,
    write_hf=_write_llama4,
    # the multimodal Llama4ForConditionalGeneration checkpoints wrap the text model; only its weights are taken
    hf_prefix_aliases={"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                       "model.language_model.": "model."},
    hf_ignored_prefixes=("vision_model.", "model.vision_model.", "multi_modal_projector.",
                         "model.multi_modal_projector."),
    hf_keys=("intermediate_size_mlp", "moe_layers", "interleave_moe_layer_step", "use_qk_norm", "no_rope_layers",
             "no_rope_layer_interval", "attention_chunk_size", "attn_temperature_tuning", "floor_scale",
             "attn_scale"),
    hf_supported_values={"use_qk_norm": (True, False)},
)

FAMILIES = [LLAMA4]
