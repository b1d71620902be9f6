"""LLaMA-Adapter on the one GPT: identity at init, a real effect once the gate moves, the same result through the
KV cache and through packing, only adapter parameters train, state round-trips, bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from litft.convert.hf import convert_from_hf
from litft.peft.adapter import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterArgs,
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
)
from litft.weights import load_model
from tests.hf_models import make_hf_model

TOL = 1e-5


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """variant -> native checkpoint dir of a tiny random model (3 layers, GQA 4 heads / 2 groups)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(variant)
            make_hf_model(variant, root / "hf")
            convert_from_hf(root / "hf", root / "native")
            cache[variant] = root / "native"
        return cache[variant]

    return get


def with_adapter(path, args: AdapterArgs = AdapterArgs(prompt_length=4, start_layer=1), gate_seed: int | None = 0):
    model = apply_adapter(load_model(path), args)
    if gate_seed is not None:
        g = torch.Generator().manual_seed(gate_seed)
        with torch.no_grad():
            for block in model.blocks[args.start_layer:]:
                block.attn.adapter.gate.copy_(torch.randn(block.attn.adapter.gate.shape, generator=g))
    return model.eval()


IDX = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["llama", "gemma2", "qwen3"])  # GQA; softcapping + sliding window; qk-norm
def test_identity_at_init_then_gate_matters(native, variant):
    base = load_model(native(variant)).eval()
    model = with_adapter(native(variant), gate_seed=None)
    assert torch.equal(model(IDX), base(IDX))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [f"blocks.{i}.attn.adapter.{p}" for i in (1, 2) for p in ("prompt", "gate")]
    assert model.blocks[0].attn.adapter is None
    # at init only the gates get a gradient (the prompt's contribution is multiplied by a zero gate)
    model(IDX).pow(2).mean().backward()
    assert model.blocks[1].attn.adapter.gate.grad.abs().sum() > 0
    assert model.blocks[1].attn.adapter.prompt.grad.abs().sum() == 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    perturbed = with_adapter(native(variant))
    out = perturbed(IDX)
    assert (out - base(IDX)).abs().max() > 1e-2
    out.pow(2).mean().backward()
    assert perturbed.blocks[2].attn.adapter.prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["llama", "gemma2", "qwen3"])
def test_cached_decoding_equals_full_forward(native, variant):
    model = with_adapter(native(variant))
    full = model(IDX)
    cache = model.make_cache(rows=2, length=16)
    pieces = [model(IDX[:, :4], input_pos=torch.arange(4), cache=cache)]  # prefill a chunk, then one token at a time
    for t in range(4, IDX.shape[1]):
        pieces.append(model(IDX[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= TOL
    # the prompt is not written to the cache: the first adapted layer caches exactly what the base model caches
    base = load_model(native(variant)).eval()
    base_cache = base.make_cache(rows=2, length=16)
    base(IDX[:, :4], input_pos=torch.arange(4), cache=base_cache)
    for t in range(4, IDX.shape[1]):
        base(IDX[:, t:t + 1], input_pos=torch.tensor([t]), cache=base_cache)
    assert torch.equal(cache.layers[1].k, base_cache.layers[1].k)


def test_packing_keeps_the_prompt_visible_to_every_sample(native):
    model = with_adapter(native("llama"))
    a, b = IDX[0, :4], IDX[1, :6]
    packed = torch.cat([a, b]).unsqueeze(0)
    segments = torch.tensor([[1] * 4 + [2] * 6])
    positions = torch.cat([torch.arange(4), torch.arange(6)]).unsqueeze(0)
    out = model(packed, positions=positions, segment_ids=segments)
    assert (out[:, :4] - model(a.unsqueeze(0))).abs().max() <= TOL
    assert (out[:, 4:] - model(b.unsqueeze(0))).abs().max() <= TOL


def test_start_layer_and_argument_errors(native):
    path = native("llama")
    with pytest.raises(ValueError, match=r"start_layer=3 but the model has n_layer=3.*use start_layer < 3"):
        apply_adapter(load_model(path), AdapterArgs(start_layer=3))
    with pytest.raises(ValueError, match="prompt_length must be a positive integer"):
        AdapterArgs(prompt_length=0)
    with pytest.raises(ValueError, match="start_layer must be an integer >= 0"):
        AdapterArgs(start_layer=-1)
    model = apply_adapter(load_model(path), AdapterArgs(start_layer=2))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapter(model, AdapterArgs())


def test_save_load_round_trip(native, tmp_path):
    path = native("qwen3")
    args = AdapterArgs(prompt_length=3, start_layer=1)
    model = with_adapter(path, args)
    expected = model(IDX)
    save_adapter(model, args, tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == {ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE}
    names = {f"blocks.{i}.attn.adapter.{p}" for i in (1, 2) for p in ("prompt", "gate")}
    assert set(adapter_state_dict(model)) == names
    fresh = load_adapter(load_model(path), tmp_path / "final").eval()
    assert torch.equal(fresh(IDX), expected)

    other = apply_adapter(load_model(path), AdapterArgs(prompt_length=5, start_layer=1))
    wrong = r"blocks\.1\.attn\.adapter\.prompt has shape \[3, 64\], the model expects \[5, 64\]"
    with pytest.raises(ValueError, match=wrong):
        load_adapter_state_dict(other, adapter_state_dict(model))
    with pytest.raises(ValueError, match="no adapters; call apply_adapter"):
        load_adapter_state_dict(load_model(path), adapter_state_dict(model))
    (tmp_path / "final" / ADAPTER_CONFIG_FILE).write_text("prompt_length: 3\nstart: 1\n")
    with pytest.raises(ValueError, match=r"adapter\.yaml: unknown field\(s\) start"):
        load_adapter(load_model(path), tmp_path / "final")


def test_adapter_on_a_quantized_base(native):
    pytest.importorskip("bitsandbytes")
    from litft.peft.quantize import quantize_model

    model = apply_adapter(quantize_model(load_model(native("llama")), "bnb.nf4"), AdapterArgs(prompt_length=4,
                                                                                             start_layer=1))
    assert model.blocks[1].attn.adapter.prompt.dtype == torch.float32
    with torch.no_grad():
        model.blocks[1].attn.adapter.gate.fill_(0.5)
    model(IDX).pow(2).mean().backward()
    assert model.blocks[1].attn.adapter.prompt.grad.abs().sum() > 0
