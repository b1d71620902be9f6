"""DeepSeek-V3 beyond the parametrised family tests (test_zoo_parity, test_generate): the latent-only cache, every
gradient against transformers, the multi-token-prediction layers skipped on import, config keys litft does not
implement refused by name, and LoRA on the latent attention's projections exported to PEFT or merged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from litft.cache import KVCache, LatentCache
from litft.convert.hf import convert_from_hf, convert_to_hf
from litft.weights import load_model
from tests.hf_models import make_hf_model

TOL = 1e-4


def _tokens(seed: int = 1, shape: tuple[int, int] = (2, 20)) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v3-plain-q"])
def test_the_cache_holds_only_the_latent_and_the_rope_key(variant, tmp_path):
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (what transformers' MLA
    compresses to), not every head's keys and values; decoding through it gives the full forward's logits."""
    make_hf_model(variant, tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    rows, length = 2, 32
    cache = model.make_cache(rows=rows, length=length)
    per_token = hf["kv_lora_rank"] + hf["qk_rope_head_dim"]
    assert all(isinstance(layer, LatentCache) for layer in cache.layers)
    held = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert held == rows * model.cache_bytes_per_row(length) == rows * length * hf["num_hidden_layers"] * per_token * 4
    heads = hf["num_attention_heads"]
    expanded = heads * (hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"] + hf["v_head_dim"])  # keys + values per token
    assert model.cache_bytes_per_row(length) * expanded == per_token * length * hf["num_hidden_layers"] * 4 * expanded
    assert per_token < expanded
    assert not any(isinstance(layer, KVCache) for layer in cache.layers)
    idx = _tokens(2, (rows, 12))
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :5], input_pos=torch.arange(5), cache=cache)]
        for t in range(5, idx.shape[1]):
            pieces.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL
    assert cache.layers[0].latent[:, :, idx.shape[1]:].abs().sum() == 0  # slots past the tokens stay empty


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v3-plain-q"])
def test_gradients_of_every_tensor_match_transformers(variant, tmp_path):
    """Backward through the latent attention (low-rank q, kv latent, interleaved RoPE), the grouped sigmoid
    routing, the routed and shared experts and the dense first layer: litft's gradients, mapped to transformers'
    names by the weight table, equal transformers'."""
    from tests.test_zoo_parity import gradients_under_the_weight_table

    _, hf_model, ours = gradients_under_the_weight_table(variant, tmp_path)
    theirs = {}
    for name, p in hf_model.named_parameters():  # transformers' 3-D experts -> the checkpoint's per-expert names
        prefix = name.removesuffix("gate_up_proj").removesuffix("down_proj")
        if name.endswith("experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*p.grad.chunk(2, dim=1))):
                theirs[f"{prefix}{e}.gate_proj.weight"], theirs[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            theirs.update({f"{prefix}{e}.down_proj.weight": g for e, g in enumerate(p.grad)})
        else:
            theirs[name] = p.grad
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert (ours[name] - grad).abs().max() <= TOL * max(1.0, grad.abs().max().item()), name


def test_multi_token_prediction_layers_are_skipped_on_import(tmp_path):
    """A checkpoint with DeepSeek-V3's MTP layer (numbered num_hidden_layers, with its own enorm/hnorm/eh_proj and
    a full decoder layer) converts: the MTP tensors are skipped, as transformers skips them, and the logits are
    the main model's; num_nextn_predict_layers is kept in config.json on export."""
    hf_model = make_hf_model("deepseek_v3", tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    n_layer = hf_model.config.num_hidden_layers
    last = f"model.layers.{n_layer - 1}."
    for name in [k for k in state if k.startswith(last)]:
        state[f"model.layers.{n_layer}." + name[len(last):]] = state[name].clone()
    for extra in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        state[f"model.layers.{n_layer}.{extra}"] = torch.ones(64)
    state[f"model.layers.{n_layer}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    idx = _tokens(3)
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max().item() <= TOL
    out = convert_to_hf(tmp_path / "native", tmp_path / "hf_again")
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not any(k.startswith(f"model.layers.{n_layer}.") for k in load_file(out / "model.safetensors"))


@pytest.mark.parametrize("key, value, message", [
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [128, 128]},
     r"quantization_config \(quant_method 'fp8'\) is not a format litft imports for model_type 'deepseek_v3'"),
    ("scoring_func", "softmax", "scoring_func='softmax' is not a value litft implements"),
    ("topk_method", "greedy", "topk_method='greedy' is not a value litft implements"),
    ("num_key_value_heads", 2, r"num_key_value_heads \(2\) must equal num_attention_heads \(4\)"),
])
def test_config_keys_litft_does_not_implement_are_refused_by_name(key, value, message, tmp_path):
    from litft.convert.hf import hf_config_to_config

    make_hf_model("deepseek_v3", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf[key] = value
    path.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=rf"^config\.json: {message}"):
        hf_config_to_config(tmp_path / "hf")


_LATENT = dict(head_size=8, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8)


@pytest.mark.parametrize("fields, message", [
    (dict(n_expert=4, n_expert_per_token=2, moe_n_group=2),
     "moe_n_group > 1 needs moe_routing 'sigmoid' and at least 2 experts per group"),
    (dict(n_expert=4, n_expert_per_token=2, moe_routing="sigmoid_inputs", moe_score_correction_bias=True),
     "moe_score_correction_bias needs moe_routing 'sigmoid'"),
    (dict(n_expert=4, n_expert_per_token=2, moe_routing="sigmoid_inputs", moe_routed_scaling=2.5),
     "moe_routed_scaling needs moe_routing 'sigmoid'"),
    (dict(_LATENT, layer_types=["chunked", "full"], attention_chunk_size=4),
     "multi-head latent attention \\(kv_lora_rank\\) does not implement attention_chunk_size"),
    (dict(_LATENT, qk_l2_norm=True), "multi-head latent attention \\(kv_lora_rank\\) does not implement qk_l2_norm"),
])
def test_routing_and_latent_attention_fields_that_do_not_combine_are_refused(fields, message):
    """The sigmoid routing's options need moe_routing 'sigmoid' (Llama 4's 'sigmoid_inputs' has none of them), and
    latent attention refuses Llama 4's chunked attention and L2 qk-norm, by name."""
    from litft.config import Config

    with pytest.raises(ValueError, match=f"^config: {message}"):
        Config.from_dict(dict(n_layer=2, n_embd=32, n_head=4, intermediate_size=64, **fields))


def test_lora_on_the_latent_attention_exports_to_peft_with_the_same_logits(tmp_path):
    """A LoRA run on q_a, q_b, kv_a, kv_b and o (transformers' q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj,
    o_proj) exported to_peft: PeftModel over the original HF model computes what litft computes."""
    from tests.test_interop import assert_peft_export_computes_what_litft_computes

    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    config = assert_peft_export_computes_what_litft_computes(tmp_path, "deepseek_v3", "[q_a,q_b,kv_a,kv_b,o]", tokens)
    assert sorted(config["target_modules"]) == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]


def test_all_linear_lora_reaches_experts_and_shared_experts_and_merges_to_hf(tmp_path):
    """all-linear wraps the latent attention's projections, the dense layer's MLP, every routed expert and the
    shared experts (never the router); the merged model exported to_hf gives the same logits in transformers."""
    from transformers import AutoModelForCausalLM

    from litft.peft.lora import LoRAArgs, apply_lora, lora_modules, merge_lora
    from litft.weights import save_model

    make_hf_model("deepseek_v3-plain-q", tmp_path / "hf")
    model = apply_lora(load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native")),
                       LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"])).eval()
    names = set(lora_modules(model))
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.kv_a_proj", "blocks.0.attn.kv_b_proj", "blocks.0.mlp.gate_proj",
            "blocks.1.mlp.experts.3.down_proj", "blocks.2.mlp.shared_expert.up_proj"} <= names
    assert not any("router" in n for n in names)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(std=0.05)
    idx = _tokens(4)
    with torch.no_grad():
        ours = model(idx)
        merged = merge_lora(model).eval()
        assert (merged(idx) - ours).abs().max() <= TOL
    (tmp_path / "merged").mkdir()
    save_model(merged, tmp_path / "merged")
    merged.config.save(tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(convert_to_hf(tmp_path / "merged", tmp_path / "hf_merged"),
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(idx).logits - ours).abs().max() <= TOL


def test_prompt_tuning_and_llama_adapter_are_refused_on_latent_attention(tmp_path):
    """Both put learned keys/values beside each layer's own, which latent attention has no projections for: refused
    with what to use instead, before anything trains."""
    from litft.peft.adapter import AdapterArgs, apply_adapter
    from litft.peft.prompt import PromptTuningArgs, apply_prompt_tuning

    make_hf_model("deepseek_v3", tmp_path / "hf")
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native")
    with pytest.raises(ValueError, match=r"^prompt tuning is not implemented for multi-head latent attention"):
        apply_prompt_tuning(load_model(native), PromptTuningArgs(init="random"))
    with pytest.raises(ValueError, match=r"^LLaMA-Adapter is not implemented for multi-head latent attention"):
        apply_adapter(load_model(native), AdapterArgs())


def test_full_fine_tuning_exports_to_transformers_with_the_same_logits(tmp_path):
    """Two full fine-tuning steps (the routing correction bias is a buffer: it stays as loaded), exported to_hf:
    transformers computes the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from tests.inprocess_cli import litft
    from tests.test_generate import make_tiny_checkpoint
    from tests.test_interop import ROWS

    model = make_tiny_checkpoint(tmp_path / "model", "deepseek_v3")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    litft("finetune", "full", model["native"], "--out_dir", tmp_path / "run", "--data.train_path", data,
          "--data.prompt_style", "plain", "--train.max_steps", 2, "--train.global_batch_size", 4,
          "--train.micro_batch_size", 4, "--train.lr", 0.01, "--train.lr_schedule", "constant",
          "--eval.final_validation", "false")
    litft("convert", "to_hf", tmp_path / "run" / "final", tmp_path / "hf_out")
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    trained = load_model(tmp_path / "run" / "final").eval()
    before = AutoModelForCausalLM.from_pretrained(model["hf"]).eval()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out").eval()
    with torch.no_grad():
        ours = trained(tokens)
        assert (ours - before(tokens).logits).abs().max() > 1e-2, "the run should have changed the model"
        assert (after(tokens).logits - ours).abs().max() <= TOL
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(load_file(tmp_path / "hf_out" / "model.safetensors")[bias],
                       load_file(model["hf"] / "model.safetensors")[bias])


def test_the_routing_correction_bias_stays_float32_in_a_bfloat16_model(tmp_path):
    """transformers keeps e_score_correction_bias in float32 (its small differences between experts decide the
    routing); litft too, whether the model is loaded, converted or cast to bfloat16, and to_hf writes it back."""
    from litft.weights import save_model

    make_hf_model("deepseek_v3", tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    original.add_(1.0 + 1e-3 * torch.arange(original.numel()))  # differences bfloat16 cannot hold near 1
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["model.layers.1.mlp.gate.e_score_correction_bias"] = original
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native", dtype="bf16")
    model = load_model(native, dtype=torch.bfloat16)
    bias = model.blocks[1].mlp.score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, original)
    assert model.blocks[1].mlp.router.weight.dtype == torch.bfloat16
    model = load_model(native).to(torch.bfloat16).float().bfloat16()
    assert torch.equal(model.blocks[1].mlp.score_correction_bias, original)
    (tmp_path / "saved").mkdir()
    save_model(model, tmp_path / "saved")
    model.config.save(tmp_path / "saved")
    out = convert_to_hf(tmp_path / "saved", tmp_path / "hf_again", dtype="bf16")
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"],
                       original)


def test_decoding_with_a_lora_on_kv_b_expands_the_latent_and_equals_the_full_forward(tmp_path):
    """With a plain kv_b_proj the cached steps attend over the latent with kv_b_proj absorbed; under a LoRA on it
    they expand the latent per head instead. Both equal the uncached forward."""
    from litft.peft.lora import LoRAArgs, apply_lora, lora_modules

    make_hf_model("deepseek_v3", tmp_path / "hf")
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native")
    idx = _tokens(6, (2, 10))
    for model in (load_model(native), apply_lora(load_model(native), LoRAArgs(r=2, dropout=0.0, targets=["kv_b"]))):
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.normal_(std=0.1)
            full = model.eval()(idx)
            cache = model.make_cache(rows=2, length=16)
            pieces = [model(idx[:, :4], input_pos=torch.arange(4), cache=cache)]
            for t in range(4, idx.shape[1]):
                pieces.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache))
        assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


def test_packed_sequences_through_flex_attention_equal_sdpa(tmp_path):
    """Packing (segment ids) through the FlexAttention block mask (value heads narrower than query/key heads here)
    gives the dense-mask SDPA logits (CPU: FlexAttention's unfused forward)."""
    make_hf_model("deepseek_v3", tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native")).eval()
    idx = _tokens(7, (2, 20))
    segments = torch.tensor([[1] * 8 + [2] * 12, [1] * 20])
    with torch.no_grad():
        dense = model(idx, segment_ids=segments)
        model.attention_backend = "flex"
        flex = model(idx, segment_ids=segments)
    assert (flex - dense).abs().max().item() <= TOL
