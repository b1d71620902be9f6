"""Qwen3.5 beyond the parametrised family tests (test_zoo_parity, test_generate): the Gated DeltaNet's chunked form
against its recurrent form and transformers' torch reference, several chunks per sequence, packing and segment
resets, bf16 autocast, the multimodal RoPE of text positions, the linear-attention cache, the multimodal checkpoints'
text model, stacked experts on import, config keys and fields refused by name, prompt tuning / LLaMA-Adapter refused,
bitsandbytes quantization against transformers', and LoRA on the linear attention exported to PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from litft.cache import KVCache, LinearAttentionCache
from litft.config import Config
from litft.convert.hf import convert_from_hf, convert_to_hf
from litft.linear_attention import chunked_gated_delta_rule, recurrent_gated_delta_rule
from litft.weights import load_model
from tests.hf_models import make_hf_model

TOL = 1e-4


def _tokens(seed: int = 1, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _rule_inputs(seed: int = 0, B: int = 2, T: int = 24, n_k: int = 2, n_v: int = 4, dk: int = 8, dv: int = 12):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, n_k, dk, generator=g), torch.randn(B, T, n_k, dk, generator=g)
    v = torch.randn(B, T, n_v, dv, generator=g)
    decay = -torch.rand(B, T, n_v, generator=g) * 2  # log decays in (-2, 0]
    beta = torch.rand(B, T, n_v, generator=g)
    state = torch.randn(B, n_v, dk, dv, generator=g) * 0.5
    return q, k, v, decay, beta, state


def _native(tmp_path: Path, variant: str, chunk_size: int = 8):
    """(HF model, native checkpoint) of ``variant`` with ``linear_chunk_size`` set in model_config.yaml."""
    hf_model = make_hf_model(variant, tmp_path / "hf")
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native")
    config = Config.from_checkpoint(native)
    config.linear_chunk_size = chunk_size
    config.save(native)
    return hf_model, native


# ---------------------------------------------------------------------- the two forms of the gated delta rule


def test_chunked_form_equals_recurrent_form_and_transformers_reference():
    """24 tokens in chunks of 8 from a non-zero state (GQA-style shared q/k heads): the chunked form gives the
    recurrent form's outputs and final state, and both give transformers' torch_chunk_gated_delta_rule and
    torch_recurrent_gated_delta_rule."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    q, k, v, g, beta, state = _rule_inputs()
    chunked, chunked_state = chunked_gated_delta_rule(q, k, v, g, beta, None, state, 8)
    recurrent, recurrent_state = recurrent_gated_delta_rule(q, k, v, g, beta, None, state)
    torch.testing.assert_close(chunked, recurrent, atol=TOL, rtol=0)
    torch.testing.assert_close(chunked_state, recurrent_state, atol=TOL, rtol=0)
    theirs, their_state = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8, initial_state=state,
                                                       output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(chunked, theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(chunked_state, their_state, atol=TOL, rtol=0)
    theirs, _ = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(recurrent, theirs, atol=TOL, rtol=0)


def test_both_forms_stay_float32_under_autocast():
    """Under bf16 autocast (bf16-mixed training) the delta rule still runs in float32: the outputs equal those
    computed without autocast."""
    q, k, v, g, beta, state = _rule_inputs()
    for form in (lambda *a: chunked_gated_delta_rule(*a, 8), recurrent_gated_delta_rule):
        reference = form(q, k, v, g, beta, None, state)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = form(q, k, v, g, beta, None, state)[0]
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("starts_at", [[0, 5, 17], [8, 9, 23], [3]])
def test_a_segment_start_forgets_the_state_in_both_forms(starts_at):
    """Segment starts inside a chunk, at a chunk's first token and at the last token: both forms give, for every
    segment, what that segment alone gives from a zero state (the first segment: from the given state), with their
    gradients."""
    q, k, v, g, beta, state = _rule_inputs(1)
    starts = torch.zeros(2, 24, dtype=torch.bool)
    starts[0, starts_at] = True
    tensors = [t.requires_grad_() for t in (q, k, v, g, beta)]
    chunked, chunked_state = chunked_gated_delta_rule(*tensors, starts, state, 8)
    recurrent, recurrent_state = recurrent_gated_delta_rule(*tensors, starts, state)
    torch.testing.assert_close(chunked, recurrent, atol=TOL, rtol=0)
    torch.testing.assert_close(chunked_state, recurrent_state, atol=TOL, rtol=0)
    grads = torch.autograd.grad(chunked.pow(2).sum() + chunked_state.sum(), tensors)
    expected = torch.autograd.grad(recurrent.pow(2).sum() + recurrent_state.sum(), tensors)
    for ours, theirs in zip(grads, expected):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)
    bounds = sorted({0, *starts_at, 24})
    for a, b in zip(bounds, bounds[1:]):
        first = state[:1] if a == 0 and 0 not in starts_at else None
        alone, _ = recurrent_gated_delta_rule(*(t[:1, a:b] for t in tensors), None, first)
        torch.testing.assert_close(chunked[:1, a:b], alone, atol=TOL, rtol=0)
    alone, _ = recurrent_gated_delta_rule(*(t[1:] for t in tensors), None, state[1:])  # row 1 has no start
    torch.testing.assert_close(chunked[1:], alone, atol=TOL, rtol=0)


# ---------------------------------------------------------------------- the model


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_moe"])
def test_several_chunks_match_transformers_and_the_cache(variant, tmp_path):
    """Chunks of 8 tokens over 24: logits equal transformers'; a 10-token prefill (two chunks) then decoding one token
    at a time through the linear layers' recurrent form gives the full forward's logits."""
    hf_model, native = _native(tmp_path, variant)
    model = load_model(native)
    idx = _tokens()
    with torch.no_grad():
        full = model(idx)
        assert (full - hf_model(idx).logits).abs().max().item() <= TOL
        cache = model.make_cache(rows=2, length=32)
        pieces = [model(idx[:, :10], input_pos=torch.arange(10), cache=cache)]
        for t in range(10, 24):
            pieces.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_moe"])
def test_packed_forward_equals_separate_forwards(variant, tmp_path):
    """Two samples packed in one row (segment ids, positions restarting) and a padded row give each sample's logits
    alone: the linear layers forget their state and stop their convolution at the segment start; the FlexAttention
    backend (full-attention layers) gives the same."""
    _, native = _native(tmp_path, variant)
    model = load_model(native).eval()
    first, second = _tokens(3, (1, 11)), _tokens(4, (1, 13))
    packed = torch.cat((torch.cat((first, second), dim=1), torch.cat((second, first[:, :9], first[:, :2]), dim=1)))
    segments = torch.tensor([[1] * 11 + [2] * 13, [1] * 13 + [2] * 9 + [0] * 2])
    positions = torch.tensor([list(range(11)) + list(range(13)), list(range(13)) + list(range(9)) + [0, 0]])
    with torch.no_grad():
        alone = [model(first), model(second), model(first[:, :9])]
        for backend in ("sdpa", "flex"):
            model.attention_backend = backend
            out = model(packed, positions=positions, segment_ids=segments)
            for got, want in ((out[0, :11], alone[0][0]), (out[0, 11:], alone[1][0]), (out[1, :13], alone[1][0]),
                              (out[1, 13:22], alone[2][0])):
                assert (got - want).abs().max().item() <= TOL, backend


def test_linear_layers_hold_a_state_whose_size_does_not_grow(tmp_path):
    """Linear layers get a LinearAttentionCache (a convolution window and a float32 state per row), full layers a
    KVCache; a row's bytes grow with the length only through the full layers."""
    _, native = _native(tmp_path, "qwen3_5")
    model = load_model(native)
    cache = model.make_cache(rows=3, length=16)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [LinearAttentionCache] * 3 + [KVCache]
    linear = cache.layers[0]
    assert linear.state.dtype == torch.float32 and tuple(linear.state.shape) == (3, 4, 8, 12)
    assert tuple(linear.conv.shape) == (3, 3, 2 * 2 * 8 + 4 * 12)
    kv_per_slot = KVCache.bytes_per_row(model.config, 1, torch.float32)
    assert model.cache_bytes_per_row(64) - model.cache_bytes_per_row(16) == 48 * kv_per_slot
    held = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert held == 3 * model.cache_bytes_per_row(16)


def test_cached_rows_move_reset_and_copy_with_their_state(tmp_path):
    """A prompt cache copied into row 1 of a larger cache, moved to row 0, decodes as the prompt alone; reset rows
    start from zeros."""
    _, native = _native(tmp_path, "qwen3_5")
    model = load_model(native)
    idx = _tokens(8, (1, 9))
    with torch.no_grad():
        full = model(idx)
        prompt = model.make_cache(rows=1, length=8)
        model(idx[:, :8], input_pos=torch.arange(8), cache=prompt)
        cache = model.make_cache(rows=2, length=16)
        cache.copy_rows_from(prompt, torch.tensor([1]), 4)  # the prompt's slots 0..7 at 4..11
        cache.move_rows(torch.tensor([1]), torch.tensor([0]))
        step = model(idx[:, 8:], input_pos=torch.tensor([12]), positions=torch.tensor([8]), cache=cache,
                     segment_ids=torch.tensor([[0] * 4 + [1] * 9 + [0] * 3]))
        assert (step[0, 0] - full[0, 8]).abs().max().item() <= TOL
        cache.reset_rows(torch.tensor([0, 1]))
    assert all(b.abs().sum() == 0 for layer in cache.layers for b in layer.buffers())


def test_the_multimodal_rope_of_text_positions_is_plain_rope():
    """transformers' Qwen3.5 rotary embedding with the released multimodal sections ([11, 11, 10], interleaved, a
    quarter of 256 channels, base 1e7) gives, for text positions (the same on the temporal, height and width axes),
    litft's plain RoPE tables of Qwen3.5-27B; positions that differ per axis (vision tokens) would not."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    from litft.model import RotaryEmbedding

    config = Config.from_name("Qwen3.5-27B")
    hf_config = Qwen3_5TextConfig(head_dim=256, rope_parameters={
        "rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    rotary = Qwen3_5TextRotaryEmbedding(hf_config)
    positions = torch.tensor([[0, 1, 2, 7, 100, 5000, 70000]])
    x = torch.zeros(1, 7, 8)
    cos, sin = rotary(x, positions)
    ours_cos, ours_sin = RotaryEmbedding(config)(positions, "full", torch.float32)
    assert cos.shape[-1] == config.rope_dim == 64
    torch.testing.assert_close(ours_cos[:, 0], cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_sin[:, 0], sin, atol=1e-6, rtol=0)
    per_axis = torch.stack((positions, positions + 3, positions * 2))  # (3, B, T): a vision token's grid positions
    assert not torch.allclose(rotary(x, per_axis)[0], cos)


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("moe, tied", [(False, False), (True, False), (False, True)])
def test_the_text_model_of_a_multimodal_checkpoint_converts(moe, tied, tmp_path):
    """A multimodal Qwen3.5 checkpoint (text_config, weights under model.language_model., a vision tower, a
    multi-token-prediction layer): the conversion takes the text model, whose logits equal the multimodal model's on
    text. ``tied``: the wrapper's tie_word_embeddings (which transformers ties the head by) is true while the
    text_config's is false: the head is the embedding."""
    import transformers

    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=12, max_position_embeddings=64)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf_model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf_model.save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert any(k.startswith("model.visual.") for k in weights)
    weights["mtp.fc.weight"] = torch.randn(64, 128)  # a multi-token-prediction layer, as the released files have
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    assert model.config.hf_model_type == ("qwen3_5_moe_text" if moe else "qwen3_5_text")
    assert model.config.tie_embeddings == tied and json.loads((tmp_path / "hf" / "config.json").read_text())[
        "text_config"].get("tie_word_embeddings") in (None, False)
    idx = _tokens(2)
    with torch.no_grad():
        assert (model(idx) - hf_model(input_ids=idx).logits).abs().max().item() <= TOL


def test_stacked_experts_import_as_transformers_holds_them(tmp_path):
    """A checkpoint with each layer's experts stacked (experts.gate_up_proj (E, 2I, C), experts.down_proj (E, C, I),
    as transformers holds them) converts to the same model; the export writes one tensor per expert."""
    from transformers import AutoModelForCausalLM

    hf_model = make_hf_model("qwen3_5_moe", tmp_path / "hf")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, stacked / "model.safetensors")
    model = load_model(convert_from_hf(stacked, tmp_path / "native"))
    idx = _tokens(5)
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max().item() <= TOL
    out = convert_to_hf(tmp_path / "native", tmp_path / "hf_again")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reloaded(idx).logits - hf_model(idx).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("variant, key, value, message", [
    ("qwen3_5", "attn_output_gate", False, "attn_output_gate=False is not a value litft implements"),
    ("qwen3_5", "mamba_ssm_dtype", "bfloat16", "mamba_ssm_dtype='bfloat16' is not a value litft implements"),
    ("qwen3_5", "layer_types", ["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
     r"layer_types holds \['sliding_attention'\]; Qwen3.5 layers are 'linear_attention' or 'full_attention'"),
    ("qwen3_5", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2]},
     r"rope_parameters.mrope_section must hold 3 non-negative integers"),
    ("qwen3_5", "partial_rotary_factor", 0.5, "partial_rotary_factor is 0.5 but rope_parameters.partial_rotary_factor "
                                              "is 0.25"),
    ("qwen3_5", "linear_num_key_heads", 3, r"linear_num_value_heads \(4\) must be a multiple of linear_num_key_heads"),
    ("qwen3_5_moe", "mlp_only_layers", [1], r"mlp_only_layers=\[1\]: Qwen3.5-MoE has a mixture of experts in every "
                                            "layer"),
    ("qwen3_5_moe", "norm_topk_prob", False, "norm_topk_prob=False is not a value litft implements"),
    ("qwen3_5_moe", "quantization_config", {"quant_method": "fp8"}, r"quantization_config \(quant_method='fp8'\) is "
                                                                     "not a format litft imports for model_type "
                                                                     "'qwen3_5_moe_text'"),
])
def test_config_keys_litft_does_not_implement_are_refused_by_name(variant, key, value, message, tmp_path):
    from litft.convert.hf import hf_config_to_config

    make_hf_model(variant, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf[key] = value
    path.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=rf"^config\.json: {message}"):
        hf_config_to_config(tmp_path / "hf")


@pytest.mark.parametrize("fields, message", [
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                        "original_max_position_embeddings": 16}),
     "linear-attention layers and LongRoPE \\(rope_scaling rope_type 'longrope'\\) do not mix"),
    (dict(linear_num_key_heads=3), r"linear_num_value_heads \(4\) must be a multiple of linear_num_key_heads \(3\)"),
    (dict(linear_conv_kernel=0), "layer_types has 'linear' layers, which need positive integers: linear_conv_kernel=0"),
    (dict(moe_shared_expert_gate=True), r"moe_shared_expert_gate is set but there is no shared expert"),
])
def test_config_fields_linear_layers_cannot_take_are_refused(fields, message):
    base = dict(n_layer=2, n_embd=32, n_head=4, intermediate_size=64, layer_types=["linear", "full"],
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    with pytest.raises(ValueError, match=f"^config: {message}"):
        Config.from_dict({**base, **fields})


@pytest.mark.parametrize("method", ["prompt", "adapter"])
def test_prompt_tuning_and_llama_adapter_are_refused_by_name(method, tmp_path):
    from litft.peft.adapter import AdapterArgs, apply_adapter
    from litft.peft.prompt import add_virtual_prompt

    _, native = _native(tmp_path, "qwen3_5")
    model = load_model(native)
    what = "prompt tuning" if method == "prompt" else "LLaMA-Adapter"
    with pytest.raises(ValueError, match=f"^{what} is not implemented for linear-attention layers \\(layer_types "
                                         "'linear' in the model config, Gated DeltaNet: Qwen3.5\\): use LoRA$"):
        if method == "prompt":
            add_virtual_prompt(model, 4)
        else:
            apply_adapter(model, AdapterArgs(prompt_length=2, start_layer=0))


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_quantized_logits_equal_transformers_bnb(mode, tmp_path):
    """QLoRA's base: the Gated DeltaNet's and the gated attention's projections quantized by bitsandbytes give the
    logits of transformers' own BitsAndBytesConfig loading of the same checkpoint; a LoRA on every linear layer
    trains on top of it."""
    pytest.importorskip("bitsandbytes")
    from litft.peft.lora import LoRAArgs, apply_lora
    from litft.peft.quantize import is_quantized, quantize_model
    from tests.test_quantize import hf_quantized

    make_hf_model("qwen3_5", tmp_path / "hf")
    model = quantize_model(load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native")), mode).eval()
    assert is_quantized(model.blocks[0].attn.in_proj_qkv) and is_quantized(model.blocks[3].attn.q_proj)
    idx = _tokens(0, (2, 13))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf_quantized(tmp_path / "hf", mode)(input_ids=idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    apply_lora(model, LoRAArgs(r=2, dropout=0.0, targets=["all-linear"]))
    model(idx).pow(2).mean().backward()
    assert model.blocks[0].attn.in_proj_a.lora_B.weight.grad.abs().sum() > 0


def test_lora_on_linear_and_full_attention_exports_to_peft_with_the_same_logits(tmp_path):
    """A LoRA run on the full attention (q, k, v, o), the MLPs and the linear attention's projections (in_qkv, in_z,
    in_b, in_a, out) exported to_peft: PeftModel over the original HF model computes what litft computes."""
    from tests.test_interop import assert_peft_export_computes_what_litft_computes

    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    config = assert_peft_export_computes_what_litft_computes(tmp_path, "qwen3_5", "[q,k,v,o,gate,up,down,in_qkv,in_z,in_b,in_a,out]", tokens)
    assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj"} <= set(config["target_modules"])
