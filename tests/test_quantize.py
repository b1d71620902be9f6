"""bitsandbytes quantization and QLoRA on CPU (bitsandbytes >= 0.48 runs nf4/fp4/int8 there).

Oracles: transformers' own ``BitsAndBytesConfig`` loading of the same HF model (our quantized logits must equal its
logits), and PEFT's LoRA/DoRA on that quantized model. Against the fp32 model the tolerance is set by the
quantization itself (stated below)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.convert.hf import convert_from_hf
from litft.peft.lora import (
    LoRAArgs,
    apply_lora,
    lora_modules,
    lora_name_to_peft,
    lora_state_dict,
    merge_lora,
    peft_config_dict,
    peft_target_modules,
    to_peft_state_dict,
)
from litft.peft.quantize import (
    QUANTIZE_MODES,
    dequantize_model,
    dequantize_weight,
    is_quantized,
    quantize_model,
)
from litft.weights import load_model
from tests.hf_models import make_hf_model

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")
TOL = 1e-5
# relative RMS error of the logits against the fp32 model, for this tiny random-weight model (measured 0.36 nf4,
# 0.45 fp4, 0.03 int8): 4-bit weights of a random 64-wide model are coarse; the exact checks are against transformers
FP32_REL_RMS = {"bnb.nf4": 0.5, "bnb.nf4-dq": 0.5, "bnb.fp4": 0.6, "bnb.int8": 0.05}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", root / "hf")
    convert_from_hf(root / "hf", root / "native")
    return root / "hf", root / "native"


def hf_quantized(hf_dir, mode: str):
    """transformers' own bitsandbytes loading of the HF model (the oracle)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode == "bnb.int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if mode == "bnb.fp4" else "nf4",
                                bnb_4bit_use_double_quant=mode == "bnb.nf4-dq", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=qc, device_map="cpu", dtype=torch.float32,
                                                 attn_implementation="eager")
    for m in model.modules():  # the same numeric path as ours (bitsandbytes' bf16 CPU repacking is lossy)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


IDX = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_quantized_logits_equal_transformers_bnb(llama, mode):
    hf_dir, native = llama
    reference = load_model(native).eval()(IDX)
    model = quantize_model(load_model(native), mode).eval()
    assert type(model.lm_head) is nn.Linear  # skipped by default, as transformers does
    block_linears = [m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)]
    assert block_linears and all(is_quantized(m) for m in block_linears)
    assert not any(p.requires_grad for m in block_linears for p in m.parameters())
    with torch.no_grad():
        ours = model(IDX)
        theirs = hf_quantized(hf_dir, mode)(input_ids=IDX).logits
        again = model(IDX)
    assert (ours - theirs).abs().max() <= TOL
    assert torch.equal(ours, again)  # eval no-grad calls keep one numeric path
    assert (ours - reference).norm() / reference.norm() < FP32_REL_RMS[mode]
    w = dequantize_weight(model.blocks[0].mlp.up_proj)
    original = load_model(native).blocks[0].mlp.up_proj.weight
    assert w.dtype == torch.float32 and w.shape == original.shape
    assert (w - original).abs().max() < (0.2 if mode != "bnb.int8" else 0.01) * original.abs().max()


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_quantized_greedy_generation_equals_transformers_bnb(llama, mode):
    """Quantized inference (the loading path of ``LLM.load(quantize=...)``) through the engine, prompts of different
    lengths in one batch: the tokens of transformers' greedy ``generate`` on its own bitsandbytes model."""
    from transformers import GenerationConfig

    from litft.api import load_checkpoint_model
    from litft.generate import Engine, SamplingParams

    hf_dir, native = llama
    engine = Engine(load_checkpoint_model(native, "cpu", None, quantize=mode))
    assert is_quantized(engine.model.blocks[0].attn.q_proj)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 12, 3)]
    ours = [r.tokens for r in engine.generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=[]))]
    hf = hf_quantized(hf_dir, mode)
    hf.generation_config.eos_token_id = None  # lengths must match: never stop early
    config = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt):]
        assert tokens == theirs.tolist()


@pytest.mark.parametrize("mode,use_dora", [("bnb.nf4", True), ("bnb.int8", False)])
def test_qlora_matches_peft_on_the_quantized_transformers_model(llama, mode, use_dora):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    hf_dir, native = llama
    args = LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "v", "down"], use_dora=use_dora)
    model = apply_lora(quantize_model(load_model(native), mode), args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
            if use_dora:
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    state = lora_state_dict(model)
    peft_model = get_peft_model(hf_quantized(hf_dir, mode),
                                LoraConfig(**peft_config_dict(args, peft_target_modules(state, "llama"))))
    result = set_peft_model_state_dict(peft_model, to_peft_state_dict(state, "llama"))
    assert not result.unexpected_keys
    model.eval(), peft_model.eval()
    ours, theirs = model(IDX), peft_model(input_ids=IDX).logits
    assert (ours - theirs).abs().max() <= TOL
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    expected = {n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
                for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = expected[lora_name_to_peft(name, "llama")]
            assert (p.grad - grad).abs().max() <= TOL * max(1.0, grad.abs().max().item()), name
        else:
            assert p.grad is None, name


def test_qlora_trains_only_lora_and_loss_falls(llama):
    _, native = llama
    model = apply_lora(quantize_model(load_model(native), "bnb.nf4"),
                       LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"]))
    frozen = {n: p.detach().clone() for n, p in model.state_dict().items() if ".lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    batch = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(2))
    losses = []
    model.train()
    for _ in range(8):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # the 4-bit base never changes


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.int8"])
def test_merge_dequantizes_to_a_plain_model(llama, mode):
    _, native = llama
    model = apply_lora(quantize_model(load_model(native), mode), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "o"],
                                                                         use_dora=True))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    model.eval()
    q = model.blocks[1].attn.q_proj
    with torch.no_grad():
        expected_q = q.merged_weight()
        w = dequantize_weight(q.base_layer) + q.delta_weight()
        dora = q.lora_magnitude_vector.view(-1, 1) * w / w.norm(dim=1, keepdim=True)
        assert torch.allclose(expected_q, dora, atol=1e-6)
        unmerged = model(IDX)
        merged = merge_lora(model)(IDX)
    assert not any(is_quantized(m) for m in model.modules()) and not lora_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert torch.equal(model.blocks[1].attn.q_proj.weight, expected_q)
    assert model.blocks[1].attn.q_proj.weight.dtype == torch.float32
    # 4-bit: the forward computes with the dequantized weight, so merging is exact; int8 also quantizes the
    # activations in its forward (LLM.int8()), which the merged float model does not
    assert (merged - unmerged).abs().max() <= (TOL if mode != "bnb.int8" else 0.3)


def test_bf16_qlora_and_skip(llama):
    _, native = llama
    model = quantize_model(load_model(native, dtype="bfloat16"), "bnb.nf4", skip=("lm_head", "down_proj"))
    assert type(model.blocks[0].mlp.down_proj) is nn.Linear and is_quantized(model.blocks[0].mlp.up_proj)
    assert model.blocks[0].mlp.up_proj.compute_dtype == torch.bfloat16
    apply_lora(model, LoRAArgs(targets=["all-linear"], use_dora=True))
    out = model(IDX)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    lora = model.blocks[0].mlp.up_proj
    assert lora.lora_A.weight.dtype == torch.bfloat16 and lora.lora_B.weight.grad.abs().sum() > 0
    assert dequantize_weight(lora).dtype == torch.bfloat16
    dequantize_model(model)
    assert not any(is_quantized(m) for m in model.modules())


def test_errors_are_clear(llama, monkeypatch):
    _, native = llama
    with pytest.raises(ValueError, match="unknown mode 'bnb.nf3'.*bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.int8"):
        quantize_model(load_model(native), "bnb.nf3")
    with pytest.raises(RuntimeError, match="cannot run it on device cpu with dtype torch.float64"):
        quantize_model(load_model(native).double(), "bnb.nf4")
    model = quantize_model(load_model(native), "bnb.nf4")
    with pytest.raises(ValueError, match="no unquantized nn.Linear"):
        quantize_model(model, "bnb.nf4")
    tied = load_model(native)
    tied.lm_head.weight = tied.embed.weight
    with pytest.raises(ValueError, match="lm_head shares its weight with the embedding"):
        quantize_model(tied, "bnb.int8", skip=())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match="needs the bitsandbytes package.*pip install bitsandbytes"):
        quantize_model(load_model(native), "bnb.nf4")
