"""Every family: logits of the litft model equal transformers' (fp32), cached decoding equals the full
forward, and HF → litft → HF is tensor-for-tensor identical."""

from __future__ import annotations

from pathlib import Path

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
        cache = model.make_cache(rows=2, length=32)
        prefill = 7
        pieces = [model(idx[:, :prefill], input_pos=torch.arange(prefill), cache=cache)]
        for t in range(prefill, idx.shape[1]):
            pieces.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache))
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


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe", "qwen3_moe-step", "deepseek_v3", "qwen3_5_moe"])
def test_moe_gradients_match_transformers(variant, tmp_path):
    """The backward of the MoE computed by expert: router and every expert's weight gradients equal transformers'
    (which holds the experts as 3-D tensors: gate and up stacked in ``gate_up_proj``)."""
    hf_model = make_hf_model(variant, tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    idx = _tokens(5)
    model(idx).pow(2).mean().backward()
    hf_model(idx).logits.pow(2).mean().backward()
    theirs = dict(hf_model.named_parameters())
    checked = 0
    for i, block in enumerate(model.blocks):
        if not hasattr(block.mlp, "experts"):
            continue
        prefix = f"model.layers.{i}.mlp."
        router = theirs.get(prefix + "gate.weight", theirs.get(prefix + "router.weight"))
        assert (block.mlp.router.weight.grad - router.grad).abs().max() <= TOL
        gate_up, down = theirs[prefix + "experts.gate_up_proj"].grad, theirs[prefix + "experts.down_proj"].grad
        for e, expert in enumerate(block.mlp.experts):
            size = expert.gate_proj.weight.shape[0]
            assert (expert.gate_proj.weight.grad - gate_up[e, :size]).abs().max() <= TOL, (i, e)
            assert (expert.up_proj.weight.grad - gate_up[e, size:]).abs().max() <= TOL, (i, e)
            assert (expert.down_proj.weight.grad - down[e]).abs().max() <= TOL, (i, e)
            checked += bool(expert.down_proj.weight.grad.abs().sum() > 0)
    assert checked >= 4  # experts that got tokens (and so a gradient)


def gradients_under_the_weight_table(variant: str, tmp_path: Path) -> tuple:
    """The tiny ``variant`` in transformers and converted to litft, both after the backward of the same loss on the
    same tokens; returns (litft model, transformers model, litft's gradients under transformers' names by the weight
    table)."""
    from litft.convert.hf import native_tensors_to_hf

    hf_model = make_hf_model(variant, tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    idx = _tokens(5)
    model(idx).pow(2).mean().backward()
    hf_model(idx).logits.pow(2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return model, hf_model, dict(native_tensors_to_hf(tmp_path / "native", model.config, state=grads))


@pytest.mark.parametrize("variant", ["gpt_oss", "llama4", "gemma4", "gemma4-moe", "qwen3_5"])
def test_gradients_of_every_tensor_match_transformers_under_the_weight_table(variant, tmp_path):
    """The backward through sinks, biases, the router bias and the clamped SwiGLU (gpt-oss), through chunked and
    NoPE layers, L2 qk-norm, the query temperature, sigmoid scores on the experts' inputs and the shared expert
    (Llama 4), through per-layer inputs and KV-shared layers (Gemma 4) and its MoE block beside the dense MLP (router
    scales, per-expert scales), through the Gated DeltaNet layers and the gated full attention (Qwen3.5): litft's
    gradients, mapped to transformers' names by the weight table (experts stacked), equal transformers'."""
    model, hf_model, ours = gradients_under_the_weight_table(variant, tmp_path)
    theirs = {name: p.grad for name, p in hf_model.named_parameters()}
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        assert (ours[name] - grad).abs().max() <= TOL * max(1.0, grad.abs().max().item()), name
    if variant == "gpt_oss":
        assert all(theirs[f"model.layers.{i}.self_attn.sinks"].abs().sum() > 0 for i in range(len(model.blocks)))


def test_numeric_constants_come_from_config_json(converted):
    """Norm epsilon, RoPE bases and softcaps are the checkpoint's, never a family default copied by hand."""
    import json

    from litft.config import Config

    variant, _, d, native = converted
    hf = json.loads((d / "hf" / "config.json").read_text())
    config = Config.from_checkpoint(native)
    assert config.norm_eps == hf["rms_norm_eps"], variant
    rope = hf.get("rope_parameters") or {}
    theta = (rope.get("full_attention") or rope).get("rope_theta", hf.get("rope_theta"))
    assert config.rope_theta == theta, variant
    if "sliding_attention" in rope:
        assert config.rope_local_theta == rope["sliding_attention"]["rope_theta"], variant
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window"):
        if hf.get(key) is not None:
            assert getattr(config, key) == hf[key], (variant, key)
    assert config.vocab_size == hf["vocab_size"] and config.n_layer == hf["num_hidden_layers"], variant


# ------------------------------------------------------------------------------ nothing keyed on model names

_FAMILY_WORDS = ("llama", "gemma", "mistral", "mixtral", "qwen", "phi", "smollm", "olmo", "gpt_oss", "gpt-oss",
                 "deepseek")
_ALLOWED_LITERALS = {"llama3"}  # an HF rope_type value, read from config.json like any other field
_NAME_FIELDS = {"name", "hf_id", "model_name", "repo_id", "model_id", "name_or_path", "_name_or_path"}
_STRING_TESTS = {"startswith", "endswith", "match", "search", "fullmatch", "find", "index", "count"}


def _terminal(node) -> str:
    """The last identifier of an expression: ``config.hf_id`` → hf_id, ``hf["_name_or_path"]`` → _name_or_path."""
    import ast

    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("lower", "upper",
                                                                                                  "casefold", "strip"):
        return _terminal(node.func.value)
    return ""


def _is_model_name(node) -> bool:
    import ast

    term = _terminal(node)
    if term in _NAME_FIELDS - {"name"}:
        return True
    # `.name` of a config (not of a Path or a module): config.name, self.config.name, cfg.name
    target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else node
    return term == "name" and isinstance(target, ast.Attribute) and _terminal(target.value) in ("config", "cfg")


def _family_literal(node) -> bool:
    import ast

    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.lower() not in _ALLOWED_LITERALS:
            if any(w in sub.value.lower() for w in _FAMILY_WORDS):
                return True
    return False


def name_keyed_tests(source: str) -> list[int]:
    """Line numbers of comparisons / string tests on a model name or a family name string."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        operands = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _STRING_TESTS:
            operands = [node.func.value, *node.args]
        if operands and any(_is_model_name(o) or _family_literal(o) for o in operands):
            lines.append(node.lineno)
    return lines


def test_the_name_checker_catches_name_keyed_code():
    bad = ('if config.name.startswith("gemma-2"):\n    pass\n'
           'x = "llama" in hf_id\n'
           'y = self.config.hf_id == "google/gemma-2b"\n'
           'z = re.match(r"qwen.*", model_name)\n'
           'w = hf["_name_or_path"].lower().endswith("-it")\n')
    assert name_keyed_tests(bad) == [1, 3, 4, 5, 6]
    ok = ('if kind == "llama3":\n    pass\n'  # an HF rope_type
          'if f.name.startswith("model"):\n    pass\n'  # a file name
          'c = Config(name="gemma-2b", hf_id="google/gemma-2b")\n')  # declaring a named config is not testing one
    assert name_keyed_tests(ok) == []


def test_no_behaviour_is_keyed_on_model_names():
    """The model, the zoo's mappings, PEFT, conversion and generation never test a model's name or repo id."""
    import litft

    root = Path(litft.__file__).parent
    files = [root / "model.py", *sorted((root / "zoo").glob("*.py"))]
    for sub in ("peft", "convert", "generate"):
        files += sorted((root / sub).glob("*.py"))
    assert len(files) > 10
    found = set()
    for f in files:
        text = f.read_text().splitlines()
        for line in name_keyed_tests(f.read_text()):
            rel = f.relative_to(root.parent).as_posix()
            if not any(rel == file and snippet in text[line - 1] for file, snippet in _NAME_TEST_ALLOWED):
                found.add(f"{rel}:{line}: {text[line - 1].strip()}")
    assert not found, f"behaviour keyed on a model name: {sorted(found)}"


# comparisons of names that only choose a message, never what is computed: (file, text on the line)
_NAME_TEST_ALLOWED = [
    ("litft/convert/peft.py", "declared != config.hf_id"),  # from_peft notes an adapter trained on another repo id
]


@pytest.mark.parametrize("variant, folder", [("gemma2", "gemma-2b"), ("gemma", "gemma-2-2b")])
def test_folder_name_of_another_model_does_not_change_the_architecture(variant, folder, tmp_path):
    """A Gemma 2 checkpoint in a folder named like Gemma 1 (and the reverse) converts by its own config.json."""
    from litft.config import Config

    hf_model = make_hf_model(variant, tmp_path / folder)
    native = convert_from_hf(tmp_path / folder, tmp_path / f"{folder}-native")
    config = Config.from_checkpoint(native)
    assert config.name == folder and config.hf_model_type == variant
    assert config.post_block_norms == (variant == "gemma2")
    assert config.attn_logit_softcapping == (5.0 if variant == "gemma2" else None)
    idx = _tokens(4)
    with torch.no_grad():
        assert (load_model(native)(idx) - hf_model(idx).logits).abs().max().item() <= TOL
    out = convert_to_hf(native, tmp_path / f"{folder}-hf")
    import json

    assert json.loads((out / "config.json").read_text())["model_type"] == variant


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmo2", "olmo3", "smollm3", "gpt_oss", "llama4_text",
                                        "deepseek_v3", "gemma4_text"])
def test_named_configs_build_the_transformers_model_with_the_same_weights(model_type):
    """Every named config of the newer families, written as config.json, makes transformers build a model (on the
    meta device: no memory) whose tensors are exactly litft's under the family's weight table, and reads back as
    the same Config."""
    import dataclasses

    from transformers import AutoConfig, AutoModelForCausalLM

    from litft.model import GPT
    from litft.zoo import family_for

    family = family_for(model_type)
    assert family.configs
    shapes_seen = set()
    for config in family.configs:
        assert family.config_from_hf(family.config_to_hf(config), config.name, config.hf_id) == config, config.name
        shape = (config.n_embd, config.n_head, config.n_query_groups, config.intermediate_size, config.n_expert)
        if shape in shapes_seen:  # base and instruct variants of one size
            continue
        shapes_seen.add(shape)
        # the first layers only (their kinds as in the full model): every size at the cost of a small one; up to a
        # full layer at least (Gemma 4's last layer is one), twice that with the second half KV-shared
        n = max(4, config.layer_types.index("full") + 1 if "full" in config.layer_types else 0)
        n *= 2 if config.kv_shared_layers else 1
        config = dataclasses.replace(config, n_layer=n, layer_types=config.layer_types[:n],
                                     kv_shared_layers=n // 2 if config.kv_shared_layers else 0,
                                     nope_layers=[i for i in config.nope_layers if i < n],
                                     moe_dense_layers=[i for i in config.moe_dense_layers if i < n])
        hf_config = family.config_to_hf(config)
        with torch.device("meta"):
            theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config)).state_dict()
            ours = GPT(dataclasses.replace(config)).state_dict()
        if config.tie_embeddings:
            ours.pop("lm_head.weight")
            theirs.pop("lm_head.weight", None)
        from litft.convert.hf import native_tensors_to_hf

        mapped = _fuse_experts_as_transformers_holds_them(
            {k: tuple(v.shape) for k, v in native_tensors_to_hf(Path(config.name), config, state=ours)})
        assert mapped == {k: tuple(v.shape) for k, v in theirs.items()}, config.name


def _fuse_experts_as_transformers_holds_them(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Checkpoint names and shapes with per-expert tensors (``mlp.experts.{e}.gate_proj.weight`` ...) replaced by
    the 3-D parameters a transformers 5 model holds in memory (``mlp.experts.gate_up_proj`` (E, 2I, C) and
    ``mlp.experts.down_proj`` (E, C, I)); its save_pretrained splits them back into the checkpoint names."""
    import re

    out, experts = {}, {}
    for name, shape in shapes.items():
        m = re.match(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m is None:
            out[name] = shape
        else:
            experts.setdefault(m[1], {}).setdefault(m[3], []).append(shape)
    for prefix, parts in experts.items():
        (inter, hidden), n = parts["gate_proj"][0], len(parts["gate_proj"])
        assert all(len(v) == n for v in parts.values()) and set(parts["up_proj"]) == {(inter, hidden)}
        assert set(parts["down_proj"]) == {(hidden, inter)}
        out[f"{prefix}.gate_up_proj"] = (n, 2 * inter, hidden)
        out[f"{prefix}.down_proj"] = (n, hidden, inter)
    return out


def _mxfp4_checkpoint(directory: Path):
    """The tiny gpt-oss checkpoint with its expert weights stored as transformers' MXFP4 checkpoints hold them:
    ``<name>_blocks`` (E, out, in/32, 16) packed 4-bit values and ``<name>_scales`` (E, out, in/32) exponents + 127,
    and ``quantization_config`` in config.json."""
    import json

    from safetensors.torch import save_file

    make_hf_model("gpt_oss", directory)
    state = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        n_expert, fan_in, fan_out = state.pop(k).shape
        state[k + "_blocks"] = torch.randint(0, 256, (n_expert, fan_out, fan_in // 32, 16), dtype=torch.uint8,
                                             generator=g)
        state[k + "_scales"] = torch.randint(122, 126, (n_expert, fan_out, fan_in // 32), dtype=torch.uint8,
                                             generator=g)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((directory / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(hf))


def test_mxfp4_experts_are_dequantized_on_import_and_exported_plain(tmp_path):
    """gpt-oss's MXFP4 expert weights: litft's import equals transformers' own dequantization (its MXFP4 loader
    with dequantize=True) weight for weight and in the logits; to_hf writes the plain weights, no quantization."""
    import json

    from transformers import AutoModelForCausalLM, Mxfp4Config

    _mxfp4_checkpoint(tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32, attn_implementation="eager").eval()
    native = convert_from_hf(tmp_path / "hf", tmp_path / "native")
    ours = load_model(native)
    for i, block in enumerate(ours.blocks):
        experts = theirs.model.layers[i].mlp.experts
        for e, expert in enumerate(block.mlp.experts):
            assert torch.equal(expert.gate_proj.weight, experts.gate_up_proj[e, :, 0::2].T), (i, e)
            assert torch.equal(expert.up_proj.weight, experts.gate_up_proj[e, :, 1::2].T), (i, e)
            assert torch.equal(expert.down_proj.weight, experts.down_proj[e].T), (i, e)
    idx = _tokens(6)
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= TOL
    out = convert_to_hf(native, tmp_path / "plain")
    exported = load_file(out / "model.safetensors")
    assert not [k for k in exported if k.endswith(("_blocks", "_scales"))]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for name, p in theirs.state_dict().items():
        assert torch.equal(exported[name], p), name
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (reloaded(idx).logits - theirs(idx).logits).abs().max().item() <= TOL


def test_an_unknown_quantization_of_gpt_oss_is_refused_by_name(tmp_path):
    import json

    make_hf_model("gpt_oss", tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"quantization_config.quant_method='fp8' is not a format litft imports"):
        convert_from_hf(tmp_path / "hf", tmp_path / "native")
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_quantized_llama4_is_refused_by_name(wrapped, tmp_path):
    """The FP8 Llama 4 releases keep quantization_config beside text_config (the multimodal wrapper): it is refused
    by name there too, never imported as if the weights were plain."""
    import json

    make_hf_model("llama4", tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    quant = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    hf = {"model_type": "llama4", "text_config": hf, "quantization_config": quant} if wrapped else \
        {**hf, "quantization_config": quant}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method='fbgemm_fp8'\) is not a format litft "
                                         r"imports for model_type 'llama4_text'"):
        convert_from_hf(tmp_path / "hf", tmp_path / "native")
    assert not (tmp_path / "native").exists()


def test_llama4_inside_its_multimodal_wrapper_imports_the_text_model(tmp_path):
    """A Llama4ForConditionalGeneration checkpoint (config in text_config, weights under language_model., a vision
    tower beside them) converts to the text model with the same logits."""
    import json

    from safetensors.torch import save_file

    hf_model = make_hf_model("llama4", tmp_path / "hf")
    text = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text}))
    weights = {("language_model." + k): v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    weights["vision_model.patch_embedding.linear.weight"] = torch.ones(2, 2)
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    idx = _tokens()
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max().item() <= TOL


def test_llama4_layer_kinds_follow_config_json(tmp_path):
    """transformers' defaults: RoPE layers chunked unless attention_chunk_size is null (then every layer is full),
    NoPE layers every no_rope_layer_interval-th, MoE layers every interleave_moe_layer_step-th."""
    import json

    from litft.zoo import family_for

    make_hf_model("llama4", tmp_path / "hf", overrides={"num_hidden_layers": 4})
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("layer_types", "no_rope_layers", "moe_layers"):
        hf.pop(key)
    family = family_for("llama4_text")
    config = family.config_from_hf({**hf, "interleave_moe_layer_step": 2})
    assert config.layer_types == ["chunked", "full", "chunked", "full"] and config.nope_layers == [1, 3]
    assert config.moe_dense_layers == [0, 2] and config.attention_chunk_size == 4
    assert family.config_from_hf({**hf, "attention_chunk_size": None}).layer_types == ["full"] * 4


@pytest.mark.parametrize("fields, message", [
    (dict(layer_types=["chunked", "full"]), r"layer_types has 'chunked' layers but attention_chunk_size is not a "
                                            r"positive integer \(got None\)"),
    (dict(layer_types=["chunked", "full"], attention_chunk_size=0),
     r"layer_types has 'chunked' layers but attention_chunk_size is not a positive integer \(got 0\)"),
    (dict(layer_types=["chunked", "banded"], attention_chunk_size=4),
     r"layer_types may only hold 'full', 'sliding', 'chunked' or 'linear', got \['banded'\]"),
    (dict(nope_layers=[1], attn_temperature_floor_scale=0), "attn_temperature_floor_scale must be > 0, got 0"),
    (dict(n_expert=4, n_expert_per_token=1, moe_routing="sigmoid_outputs"),
     "moe_routing must be 'softmax', 'sigmoid_inputs' or 'sigmoid', got 'sigmoid_outputs'"),
    (dict(moe_shared_expert_size=8), r"moe_shared_expert_size is set but n_expert is 0"),
])
def test_the_llama4_config_fields_are_checked(fields, message):
    from litft.config import Config

    with pytest.raises(ValueError, match=f"^config: {message}"):
        Config.from_dict(dict(n_layer=2, n_embd=32, n_head=4, intermediate_size=64, **fields))
