"""Every family: logits of the litft model equal transformers' (fp32), cached decoding equals the full
forward, and HF → litft → HF is tensor-for-tensor identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from litft.convert.hf import convert_from_hf, convert_to_hf
from litft.weights import load_model
from tests.hf_models import FAMILY_VARIANTS, make_hf_model

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILY_VARIANTS))
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(request.param, d / "hf")
    native = convert_from_hf(d / "hf", d / "native")
    return request.param, hf_model, d, native


def _tokens(seed=1, shape=(2, 24)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(converted):
    variant, hf_model, _, native = converted
    model = load_model(native)
    idx = _tokens()
    with torch.no_grad():
        ours = model(idx)
        theirs = hf_model(idx).logits
    assert (ours - theirs).abs().max().item() <= TOL, variant


def test_kv_cache_decoding_matches_full_forward(converted):
    variant, _, _, native = converted
    model = load_model(native)
    idx = _tokens(2, (2, 14))  # within LongRoPE's original context, past every sliding window
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_length=32)
        prefill = 7
        pieces = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, idx.shape[1]):
            pieces.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max().item() <= TOL, variant


def test_round_trip_is_identical_and_loads_in_transformers(converted):
    from transformers import AutoModelForCausalLM

    variant, hf_model, d, native = converted
    out = convert_to_hf(native, d / "hf_again")
    original, again = load_file(d / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(again)
    for k in original:
        assert original[k].dtype == again[k].dtype and torch.equal(original[k], again[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    idx = _tokens(3)
    with torch.no_grad():
        assert (reloaded(idx).logits - hf_model(idx).logits).abs().max().item() <= TOL, variant
