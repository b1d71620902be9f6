"""Gemma 4 beyond the per-family parity tests: its multimodal checkpoints import the text model, packing through
FlexAttention, and what litft refuses for it by name (prompt tuning and LLaMA-Adapter where its attention or
per-layer inputs have no place for them, PEFT names for LoRA on its stacked experts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from litft.convert.hf import convert_from_hf
from litft.weights import load_model
from tests.hf_models import make_hf_model

TOL = 1e-4


def _tokens(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_the_multimodal_checkpoint_imports_the_text_model(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (config in text_config, weights under model.language_model.,
    vision and audio towers beside them, k/v projections kept for the KV-shared layers, which transformers does not
    load either) converts to the text model with transformers' logits."""
    hf_model = make_hf_model("gemma4", tmp_path / "hf")
    text = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text}))
    weights = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    for name in ("model.vision_tower.encoder.weight", "model.audio_tower.conv.weight",
                 "model.embed_vision.embedding_projection.weight"):
        weights[name] = torch.ones(2, 2)
    for layer in (4, 5):  # the KV-shared layers
        for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            weights[f"model.language_model.layers.{layer}.self_attn.{name}"] = torch.ones(2)
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    idx = _tokens(1, (2, 24))
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max().item() <= TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("variant", ["gemma4", "gemma4-keqv", "gemma4-moe"])
def test_packed_sequences_through_flex_attention_equal_each_alone(variant, tmp_path):
    """Packing (segment ids, positions restarting per sample) through FlexAttention's block masks gives the
    dense-mask SDPA logits and each sample's logits alone: per-layer inputs, KV-shared layers and the full layers'
    own head size see only their sample."""
    make_hf_model(variant, tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native")).eval()
    a, b = _tokens(2, (1, 9)), _tokens(3, (1, 11))
    idx = torch.cat((a, b), dim=1)
    positions = torch.cat((torch.arange(9), torch.arange(11)))[None]
    segments = torch.tensor([[1] * 9 + [2] * 11])
    with torch.no_grad():
        dense = model(idx, positions=positions, segment_ids=segments)
        model.attention_backend = "flex"
        flex = model(idx, positions=positions, segment_ids=segments)
        model.attention_backend = "sdpa"
        alone = torch.cat((model(a), model(b)), dim=1)
    assert (flex - dense).abs().max().item() <= TOL
    assert (dense - alone).abs().max().item() <= TOL


def test_prompt_tuning_and_adapter_are_refused_where_they_have_no_place(tmp_path):
    """Virtual tokens have no token id for a per-layer input, and a KV-shared layer has no keys of its own; the
    adapter's prompt would need the value norm (and, on k_eq_v layers, the key projection as values)."""
    from litft.peft import AdapterArgs, PromptTuningArgs, apply_adapter, apply_prompt_tuning

    make_hf_model("gemma4", tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    with pytest.raises(ValueError, match=r"prompt tuning is not implemented for per-layer inputs or KV-shared layers "
                                         r"\(per_layer_input_size, kv_shared_layers in the model config, Gemma 4\)"):
        apply_prompt_tuning(model, PromptTuningArgs(num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"LLaMA-Adapter is not implemented for Gemma 4's attention \(value_norm, "
                                         r"attention_k_eq_v or kv_shared_layers in the model config"):
        apply_adapter(model, AdapterArgs(prompt_length=2, start_layer=1))
    assert model.virtual_prompt is None and all(block.attn.adapter is None for block in model.blocks)


def test_a_lora_on_the_moe_blocks_experts_has_no_peft_name():
    """transformers stacks the MoE block's experts in 3-D parameters: to_peft refuses a LoRA on one by name; the
    dense MLP beside them and the attention map to PEFT's module names."""
    from litft.peft.lora import lora_name_to_peft

    with pytest.raises(ValueError, match="mixture-of-experts weights are 3-D parameters in transformers"):
        lora_name_to_peft("blocks.0.moe.experts.1.gate_proj.lora_A.weight", "gemma4_text")
    assert lora_name_to_peft("blocks.0.mlp.gate_proj.lora_A.weight", "gemma4_text") == \
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    assert lora_name_to_peft("blocks.3.per_layer_input_gate.lora_B.weight", "gemma4_text") == \
        "base_model.model.model.layers.3.per_layer_input_gate.lora_B.weight"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_gradients_of_kv_shared_layers(mode, tmp_path):
    """Blocks recomputed in the backward pass (the KV-shared layers read keys and values another block computed)
    give the gradients of the plain backward, for every parameter."""
    from litft.train.loop import enable_activation_checkpointing

    make_hf_model("gemma4-moe" if mode == "selective" else "gemma4", tmp_path / "hf")
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native")
    idx = _tokens(4, (2, 16))
    grads = []
    for checkpointed in (False, True):
        model = load_model(native)
        if checkpointed:
            enable_activation_checkpointing(model, mode)
        model(idx).pow(2).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and all(g is not None for g in recomputed.values())
    for name, grad in plain.items():
        assert (recomputed[name] - grad).abs().max() <= 1e-6 * max(1.0, grad.abs().max().item()), name


def _released(n_layer: int, every: int, **fields) -> dict:
    """A text_config as the released Gemma 4 config.json files write it (global_head_dim and
    num_global_key_value_heads, not transformers' per_layer_config)."""
    return {"model_type": "gemma4_text", "vocab_size": 262144, "num_hidden_layers": n_layer, "head_dim": 256,
            "global_head_dim": 512, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0, "layer_types": ["sliding_attention" if (i + 1) % every else "full_attention"
                                               for i in range(n_layer)],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1000000.0}}, **fields}


@pytest.mark.parametrize("name, hf", [
    ("gemma-4-E2B-it", _released(35, 5, hidden_size=1536, intermediate_size=6144, num_attention_heads=8,
                                 num_key_value_heads=1, max_position_embeddings=131072, sliding_window=512,
                                 hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
                                 num_kv_shared_layers=20, use_double_wide_mlp=True)),
    ("gemma-4-31B-it", _released(60, 6, hidden_size=5376, intermediate_size=21504, num_attention_heads=32,
                                 num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True,
                                 max_position_embeddings=262144, sliding_window=1024, hidden_size_per_layer_input=0,
                                 num_kv_shared_layers=0, use_bidirectional_attention="vision")),
    ("gemma-4-26B-A4B-it", _released(30, 6, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
                                     num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True,
                                     max_position_embeddings=262144, sliding_window=1024,
                                     hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
                                     top_k_experts=8, moe_intermediate_size=704)),
])
def test_the_released_config_layout_reads_as_the_named_config(name, hf):
    """config.json as released (the full layers' head size and key/value heads as global_* keys; transformers applies
    num_global_key_value_heads only with attention_k_eq_v) gives the named config's architecture."""
    import dataclasses

    from litft.config import Config
    from litft.zoo import family_for

    named = Config.from_name(name)
    read = family_for("gemma4_text").config_from_hf(hf, named.name, named.hf_id)
    assert dataclasses.replace(read, extra={}) == named
