"""LoRA / DoRA / rsLoRA against PEFT 0.21 (the oracle): same A/B/magnitude values in both give the same logits,
gradients and merged weights; state dicts, files and PEFT names round-trip; bad input gives clear errors."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn as nn

from litft.convert.hf import convert_from_hf
from litft.model import GPT
from litft.peft.lora import (
    LORA_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    LoRAArgs,
    LoRALinear,
    apply_lora,
    check_trainable,
    from_peft_state_dict,
    load_lora,
    load_lora_state_dict,
    lora_args_from_peft_config,
    lora_modules,
    lora_name_to_peft,
    lora_state_dict,
    merge_lora,
    peft_config_dict,
    peft_name_to_lora,
    peft_target_modules,
    save_lora,
    to_peft_state_dict,
)
from litft.weights import load_model
from tests.hf_models import make_hf_model

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """variant -> (HF model, native checkpoint dir); built once per variant."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(variant)
            hf = make_hf_model(variant, root / "hf")
            convert_from_hf(root / "hf", root / "native")
            cache[variant] = (hf, root / "native")
        return cache[variant]

    return get


def randomize(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Nonzero A, B and magnitudes (B starts at zero, which would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * scale)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
            if m.lora_magnitude_vector is not None:
                mag = m.lora_magnitude_vector
                mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=g))


def peft_pair(tiny, variant: str, args: LoRAArgs):
    """(litft model with LoRA, PEFT model) holding the same random LoRA values."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    hf, native = tiny(variant)
    model = load_model(native)
    apply_lora(model, args)
    randomize(model)
    family = model.config.hf_model_type
    state = lora_state_dict(model)
    config = LoraConfig(**peft_config_dict(args, peft_target_modules(state, family)))
    peft_model = get_peft_model(copy.deepcopy(hf), config)
    result = set_peft_model_state_dict(peft_model, to_peft_state_dict(state, family))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return model, peft_model


def peft_grads(peft_model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            name = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            out[name] = p.grad
    return out


CASES = {
    "lora-qv": ("llama", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "v"])),
    "dora-attn": ("llama", LoRAArgs(r=4, alpha=16, dropout=0.0, targets=["q", "k", "v", "o"], use_dora=True)),
    "rslora-all-linear": ("llama", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"], use_rslora=True)),
    "qwen2-bias-dora-rslora-all-linear": ("qwen2", LoRAArgs(r=8, alpha=8, dropout=0.0, targets=["all-linear"],
                                                            use_dora=True, use_rslora=True)),
    "tied-lm_head": ("llama-tied", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "lm_head"])),
    "olmo2-all-linear": ("olmo2", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"])),
    "olmo3-dora-all-linear": ("olmo3", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"], use_dora=True)),
    "smollm3-all-linear": ("smollm3", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"])),
    # PEFT reaches attention only: transformers holds the experts as 3-D parameters (see the test below)
    "qwen3_moe-attention": ("qwen3_moe", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o"])),
    # attention with biases and sinks (the experts are 3-D parameters in transformers, as for Qwen3-MoE)
    "gpt_oss-attention": ("gpt_oss", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o"])),
    # chunked and NoPE layers with L2 qk-norm and query temperature (experts 3-D in transformers, as above)
    "llama4-attention": ("llama4", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o"])),
    # per-layer input gates and projections, KV-shared layers (q and o only), double-wide MLPs
    "gemma4-all-linear": ("gemma4", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"])),
    # full layers without v_proj (values from k_proj) and with their own head size
    # attention of the MoE block's model (its experts are 3-D parameters in transformers, as above)
    "gemma4-moe-attention": ("gemma4-moe", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o"])),
    "gemma4-keqv-dora": ("gemma4-keqv", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o", "down"],
                                                 use_dora=True)),
    # gated full attention and every projection of the Gated DeltaNet layers
    "qwen3_5-all-linear": ("qwen3_5", LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"])),
    # the gated full attention (the experts are 3-D parameters in transformers, as for Qwen3-MoE)
    "qwen3_5_moe-attention": ("qwen3_5_moe", LoRAArgs(r=4, alpha=8, dropout=0.0,
                                                      targets=["q", "k", "v", "o"])),
}


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_expert_lora_of_stacked_experts_has_no_peft_name(proj, family):
    """gpt-oss and Llama 4 stack every expert in one transformers tensor: a LoRA on one expert's projection is
    refused by name, never written under the stacked tensor's name; Llama 4's shared expert is a plain module."""
    with pytest.raises(ValueError, match="mixture-of-experts weights are 3-D parameters in transformers"):
        lora_name_to_peft(f"blocks.0.mlp.experts.1.{proj}.lora_A.weight", family)
    assert lora_name_to_peft("blocks.0.attn.q_proj.lora_A.weight", family).endswith("self_attn.q_proj.lora_A.weight")
    if family == "llama4_text":
        assert lora_name_to_peft(f"blocks.0.mlp.shared_expert.{proj}.lora_A.weight", family) == \
            f"base_model.model.model.layers.0.feed_forward.shared_expert.{proj}.lora_A.weight"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_grads_and_merge_match_peft(tiny, case):
    variant, args = CASES[case]
    model, peft_model = peft_pair(tiny, variant, args)
    model.eval(), peft_model.eval()
    idx = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    ours = model(idx)
    theirs = peft_model(input_ids=idx).logits
    # relative to the logits' size, as the gradients below (fp32 rounding grows with the values: Gemma 4's logits
    # reach its softcap of 5)
    logits_tol = TOL * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max() <= logits_tol

    # gradients: the same for every LoRA tensor, and nothing else gets one
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    family = model.config.hf_model_type
    expected = peft_grads(peft_model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(expected) == len(lora_state_dict(model))
    for name, p in trainable.items():
        assert re.search(r"\.lora_(A\.weight|B\.weight|magnitude_vector)$", name), name
        g = expected[lora_name_to_peft(name, family)]
        assert (p.grad - g).abs().max() <= TOL * max(1.0, g.abs().max().item()), name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # merge: a plain GPT with plain names and the same logits as unmerged (and as PEFT's merge, untied models)
    with torch.no_grad():
        merged = merge_lora(model)(idx)
    assert (merged - ours).abs().max() <= logits_tol
    assert not lora_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))
    assert set(model.state_dict()) == set(GPT(model.config).state_dict())
    if "lm_head" in args.targets:
        assert model.config.tie_embeddings is False  # the merged head differs from the embedding
        assert model.lm_head.weight is not model.embed.weight
    else:
        with torch.no_grad():
            peft_merged = peft_model.merge_and_unload()(input_ids=idx).logits
        assert (merged - peft_merged).abs().max() <= logits_tol


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_mode_dropout_matches_peft(tiny, use_dora):
    """Dropout acts on the LoRA branch's input only (for DoRA, as PEFT: on the (m/n - 1)·W x' term too)."""
    args = LoRAArgs(r=4, alpha=8, dropout=0.3, targets=["q", "v", "down"], use_dora=use_dora)
    model, peft_model = peft_pair(tiny, "llama", args)
    model.train(), peft_model.train()
    idx = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # both call their dropouts in the same order: q, v, down per layer
    ours = model(idx)
    torch.manual_seed(123)
    theirs = peft_model(input_ids=idx).logits
    assert (ours - theirs).abs().max() <= TOL
    torch.manual_seed(7)
    assert (model(idx) - ours).abs().max() > 1e-3  # dropout really is active


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_all_linear_selects_what_peft_selects(tiny, variant):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    hf, native = tiny(variant)
    model = apply_lora(load_model(native), LoRAArgs(targets=["all-linear"]))
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(target_modules="all-linear"))
    theirs = {peft_name_to_lora(k, variant) for k in get_peft_model_state_dict(peft_model)}
    assert theirs == set(lora_state_dict(model))
    assert "lm_head" not in {n.split(".")[0] for n in lora_modules(model)}


def test_moe_lora_reaches_dense_mlps_and_experts_merges_and_exports(tiny, tmp_path):
    """Qwen3-MoE: all-linear wraps attention, the dense layer's MLP and every expert's projections (not the router);
    gradients reach the experts, merging gives the same logits, and the merged model exported with to_hf gives them
    in transformers. A PEFT adapter cannot hold expert LoRA: its names are refused."""
    from transformers import AutoModelForCausalLM

    from litft.convert.hf import convert_to_hf
    from litft.weights import save_model

    _, native = tiny("qwen3_moe")
    model = apply_lora(load_model(native), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"]))
    names = set(lora_modules(model))
    experts = {f"blocks.{i}.mlp.experts.{e}.{p}" for i in (0, 2) for e in range(4)
               for p in ("gate_proj", "up_proj", "down_proj")}
    assert experts <= names and {"blocks.1.mlp.gate_proj", "blocks.1.mlp.down_proj", "blocks.0.attn.q_proj"} <= names
    assert not any("router" in n for n in names)
    randomize(model)
    idx = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    ours = model(idx)
    ours.pow(2).mean().backward()
    expert_grads = [m.lora_A.weight.grad for n, m in lora_modules(model).items() if n in experts]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in expert_grads) >= len(experts) // 2
    with pytest.raises(ValueError, match="mixture-of-experts"):
        to_peft_state_dict(lora_state_dict(model), "qwen3_moe")

    with torch.no_grad():
        merged = merge_lora(model).eval()
        assert (merged(idx) - ours).abs().max() <= TOL
    (tmp_path / "merged").mkdir()
    save_model(merged, tmp_path / "merged")
    merged.config.save(tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(convert_to_hf(tmp_path / "merged", tmp_path / "hf"),
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(idx).logits - ours).abs().max() <= TOL


def test_init_is_identity_and_like_peft(tiny):
    _, native = tiny("llama")
    base = load_model(native).eval()
    idx = torch.randint(0, 128, (1, 7))
    expected = base(idx)
    for use_dora in (False, True):
        model = apply_lora(load_model(native), LoRAArgs(r=8, targets=["all-linear"], use_dora=use_dora)).eval()
        assert torch.equal(model(idx), expected)  # B = 0 (and magnitude = ||W||): exactly the base model
        for m in lora_modules(model).values():
            assert torch.count_nonzero(m.lora_B.weight) == 0
            bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) bound
            assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3
            if use_dora:
                assert torch.allclose(m.lora_magnitude_vector, m.base_layer.weight.norm(dim=1))
    assert LoRAArgs(r=16, alpha=8).scaling == 0.5
    assert LoRAArgs(r=16, alpha=8, use_rslora=True).scaling == 2.0


def test_peft_names_and_config_round_trip(tiny):
    _, native = tiny("llama")
    model = apply_lora(load_model(native), LoRAArgs(targets=["q", "down", "lm_head"], use_dora=True))
    state = lora_state_dict(model)
    assert lora_name_to_peft("blocks.0.attn.q_proj.lora_A.weight", "llama") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert lora_name_to_peft("blocks.2.mlp.down_proj.lora_magnitude_vector", "llama") == \
        "base_model.model.model.layers.2.mlp.down_proj.lora_magnitude_vector"
    assert lora_name_to_peft("lm_head.lora_B.weight", "llama") == "base_model.model.lm_head.lora_B.weight"
    assert from_peft_state_dict(to_peft_state_dict(state, "llama"), "llama").keys() == state.keys()
    assert peft_target_modules(state, "llama") == ["down_proj", "lm_head", "q_proj"]
    # the live PeftModel's names (with the adapter name) map back too
    assert peft_name_to_lora("base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight", "qwen2") == \
        "blocks.1.attn.v_proj.lora_B.weight"

    args = LoRAArgs(r=4, alpha=32, dropout=0.1, targets=["q", "down", "lm_head"], use_dora=True, use_rslora=True)
    config = peft_config_dict(args, peft_target_modules(state, "llama"), "meta-llama/Llama-3.2-1B")
    assert lora_args_from_peft_config(config, state) == args
    with pytest.raises(ValueError, match="rank_pattern"):
        lora_args_from_peft_config({**config, "rank_pattern": {"q_proj": 8}}, state)


def test_names_without_a_peft_counterpart():
    with pytest.raises(ValueError, match="qkv_proj.*Merge the adapter"):  # Phi-3 fuses q/k/v
        lora_name_to_peft("blocks.0.attn.q_proj.lora_A.weight", "phi3")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        lora_name_to_peft("blocks.0.mlp.experts.1.up_proj.lora_A.weight", "mixtral")
    with pytest.raises(ValueError, match="not a LoRA tensor name"):
        lora_name_to_peft("blocks.0.attn.q_proj.weight", "llama")
    with pytest.raises(ValueError, match="not a PEFT LoRA tensor name"):
        peft_name_to_lora("model.layers.0.self_attn.q_proj.lora_A.weight", "llama")


def test_save_load_round_trip_and_resume(tiny, tmp_path):
    _, native = tiny("qwen2")
    args = LoRAArgs(r=4, alpha=8, targets=["k", "o", "up"], use_dora=True)
    model = apply_lora(load_model(native), args)
    randomize(model, seed=3)
    model.eval()
    idx = torch.randint(0, 128, (2, 6))
    expected = model(idx)
    save_lora(model, args, tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == {LORA_WEIGHTS_FILE, LORA_CONFIG_FILE}

    fresh = load_lora(load_model(native), tmp_path / "final").eval()  # applies the saved LoRAArgs
    assert torch.equal(fresh(idx), expected)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    resumed = apply_lora(load_model(native), args)  # resume: LoRA already applied
    load_lora(resumed, tmp_path / "final")
    assert torch.equal(resumed.eval()(idx), expected)


def test_load_errors_are_clear(tiny, tmp_path):
    _, native = tiny("llama")
    args = LoRAArgs(r=4, targets=["q", "down"])
    model = apply_lora(load_model(native), args)
    state = lora_state_dict(model)

    # an adapter trained on another base (different intermediate size): the mismatched tensor is named
    config = dataclasses.replace(load_model(native).config, intermediate_size=80)
    other = apply_lora(GPT(config), args)
    wrong = r"shape mismatch.*blocks\.0\.mlp\.down_proj\.lora_A\.weight has shape \[4, 96\]"
    with pytest.raises(ValueError, match=wrong):
        load_lora_state_dict(other, state)
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): blocks\.0\.attn\.q_proj\.lora_A\.weight"):
        load_lora_state_dict(model, {k: v for k, v in state.items() if k != "blocks.0.attn.q_proj.lora_A.weight"})
    with pytest.raises(ValueError, match=r"unexpected 1 tensor\(s\): blocks\.0\.attn\.k_proj\.lora_A\.weight"):
        extra = {"blocks.0.attn.k_proj.lora_A.weight": state["blocks.0.attn.q_proj.lora_A.weight"]}
        load_lora_state_dict(model, {**state, **extra})
    with pytest.raises(ValueError, match="no LoRA layers; call apply_lora"):
        load_lora_state_dict(load_model(native), state)

    save_lora(model, args, tmp_path / "run")
    (tmp_path / "run" / LORA_CONFIG_FILE).write_text("r: 4\nlora_rank: 8\n")
    with pytest.raises(ValueError, match=r"lora\.yaml: unknown field\(s\) lora_rank"):
        load_lora(load_model(native), tmp_path / "run")
    (tmp_path / "run" / LORA_CONFIG_FILE).write_text("r: 4\ntargets: [q, down]\n")
    (tmp_path / "run" / LORA_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lora.safetensors: not found"):
        load_lora(load_model(native), tmp_path / "run")


def test_bad_arguments_and_zero_trainable(tiny):
    _, native = tiny("llama")
    with pytest.raises(ValueError, match="unknown 'qkv'.*all-linear"):
        LoRAArgs(targets=["q", "qkv"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRAArgs(r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAArgs(dropout=1.0)
    assert LoRAArgs(targets="q,k").targets == ["q", "k"]
    model = apply_lora(load_model(native), LoRAArgs())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAArgs())
    frozen = load_model(native).requires_grad_(False)
    with pytest.raises(ValueError, match="0 trainable parameters"):
        check_trainable(frozen, "LoRA")


def test_wrapped_model_loads_plain_checkpoint_and_keeps_tying(tiny):
    _, native = tiny("llama-tied")
    model = apply_lora(load_model(native), LoRAArgs(targets=["q", "lm_head"]))
    plain = load_model(native).state_dict()
    plain = {k: torch.randn_like(v) for k, v in plain.items()}
    result = model.load_state_dict(plain, strict=False)  # plain names land in base_layer
    assert not result.unexpected_keys
    assert all(".lora_" in k for k in result.missing_keys)
    assert torch.equal(model.blocks[1].attn.q_proj.base_layer.weight, plain["blocks.1.attn.q_proj.weight"])
    assert isinstance(model.lm_head, LoRALinear)
    model.tie_weights()  # sets lm_head.weight: reaches the wrapped layer, no stray parameter on the wrapper
    assert model.lm_head.base_layer.weight is model.embed.weight
    assert "lm_head.weight" not in dict(model.named_parameters(remove_duplicate=False))
