"""Bad input to conversion and loading: each a clear error naming what is wrong, and nothing half-written
(no out_dir, no temp folder beside it). Also sharded export and custom sizes of a supported architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from litft.config import Config
from litft.convert.hf import convert_from_hf, convert_to_hf
from litft.weights import load_model
from litft.zoo import get_config
from tests.hf_models import make_hf_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists(), f"{out_dir} was (half-)written"
    if out_dir.parent.exists():
        left = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
        assert not left, f"temp folders left beside {out_dir}: {left}"


def _tokens() -> torch.Tensor:
    return torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ not a checkpoint at all


def test_from_hf_of_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_llama_native):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"empty is not a Hugging Face checkpoint: no config\.json"):
        convert_from_hf(empty, out)
    with pytest.raises(FileNotFoundError, match="It is a litft checkpoint already"):
        convert_from_hf(tiny_llama_native, out)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        convert_from_hf(tmp_path / "missing", out)
    _assert_nothing_written(out)


def test_to_hf_and_load_of_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_llama_hf):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"not a litft checkpoint: no model_config\.yaml"):
        convert_to_hf(tmp_path, out)
    with pytest.raises(FileNotFoundError, match=r"holds a Hugging Face config\.json: run `litft convert from_hf"):
        convert_to_hf(tiny_llama_hf, out)
    with pytest.raises(FileNotFoundError, match="not a litft checkpoint"):
        load_model(tiny_llama_hf)
    _assert_nothing_written(out)


def test_hf_folder_without_weights(tmp_path, tiny_llama_hf):
    hf = _copy(tiny_llama_hf, tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"no weights \(\*\.safetensors or pytorch_model\*\.bin\) found"):
        convert_from_hf(hf, out)
    _assert_nothing_written(out)


# ------------------------------------------------------------------------------ model_config.yaml


def _edit_yaml(checkpoint: Path, edit) -> Path:
    path = checkpoint / "model_config.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_unknown_field_suggests_the_close_one(tmp_path, tiny_llama_native):
    ckpt = _copy(tiny_llama_native, tmp_path / "ckpt")
    _edit_yaml(ckpt, lambda d: d.update(n_layers=d.pop("n_layer")))
    out = tmp_path / "out"
    for call in (lambda: load_model(ckpt), lambda: convert_to_hf(ckpt, out)):
        with pytest.raises(ValueError, match=r"model_config\.yaml: unknown field\(s\) 'n_layers' "
                                             r"\(did you mean 'n_layer'\?\)"):
            call()
    _assert_nothing_written(out)


def test_missing_required_field(tmp_path, tiny_llama_native):
    ckpt = _copy(tiny_llama_native, tmp_path / "ckpt")
    _edit_yaml(ckpt, lambda d: d.pop("intermediate_size"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model_config\.yaml: missing required field\(s\) intermediate_size"):
        convert_to_hf(ckpt, out)
    with pytest.raises(ValueError, match="missing required field"):
        load_model(ckpt)
    _assert_nothing_written(out)


def test_invalid_yaml_and_wrong_type(tmp_path, tiny_llama_native):
    ckpt = _copy(tiny_llama_native, tmp_path / "ckpt")
    (ckpt / "model_config.yaml").write_text("n_layer: [unclosed\n")
    with pytest.raises(ValueError, match=r"model_config\.yaml: not valid YAML"):
        load_model(ckpt)
    (ckpt / "model_config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping of Config fields"):
        load_model(ckpt)


# ------------------------------------------------------------------------------ broken safetensors


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors_native(tmp_path, tiny_llama_native):
    ckpt = _copy(tiny_llama_native, tmp_path / "ckpt")
    _truncate(ckpt / "model.safetensors")
    out = tmp_path / "out"
    for call in (lambda: load_model(ckpt), lambda: convert_to_hf(ckpt, out)):
        with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file \(truncated"):
            call()
    _assert_nothing_written(out)


def test_truncated_safetensors_hf(tmp_path, tiny_llama_hf):
    hf = _copy(tiny_llama_hf, tmp_path / "hf")
    _truncate(hf / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        convert_from_hf(hf, out)
    _assert_nothing_written(out)


def _reshape_tensor(path: Path, name: str) -> None:
    tensors = load_file(path)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_native(tmp_path, tiny_llama_native):
    ckpt = _copy(tiny_llama_native, tmp_path / "ckpt")
    _reshape_tensor(ckpt / "model.safetensors", "blocks.1.mlp.up_proj.weight")
    out = tmp_path / "out"
    for call in (lambda: load_model(ckpt), lambda: convert_to_hf(ckpt, out)):
        with pytest.raises(ValueError, match=r"tensor 'blocks\.1\.mlp\.up_proj\.weight' has shape \[95, 64\], "
                                             r"model_config\.yaml implies \[96, 64\]"):
            call()
    _assert_nothing_written(out)


def test_wrong_shape_hf(tmp_path, tiny_llama_hf):
    hf = _copy(tiny_llama_hf, tmp_path / "hf")
    _reshape_tensor(hf / "model.safetensors", "model.layers.2.self_attn.k_proj.weight")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.2\.self_attn\.k_proj\.weight' has shape "
                                         r"\[31, 64\], config\.json implies \[32, 64\]"):
        convert_from_hf(hf, out)
    _assert_nothing_written(out)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 128}, r"has shape \[400, 64\], config\.json implies \[400, 128\]"),
    ({"num_hidden_layers": 2}, r"'model\.layers\.2\.[a-z_.]+' maps to 'blocks\.2\.[a-z_.]+', which config\.json "
                               r"does not describe \(n_layer=2"),
    ({"num_hidden_layers": 4}, r"checkpoint lacks tensor\(s\) for blocks\.3\."),
    ({"num_key_value_heads": 4}, r"k_proj\.weight' has shape \[32, 64\], config\.json implies \[64, 64\]"),
])
def test_config_json_disagrees_with_tensors(tmp_path, tiny_llama_hf, changes, message):
    hf = _copy(tiny_llama_hf, tmp_path / "hf")
    _edit_json(hf / "config.json", **changes)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        convert_from_hf(hf, out)
    _assert_nothing_written(out)


def test_unknown_model_type(tmp_path, tiny_llama_hf):
    hf = _copy(tiny_llama_hf, tmp_path / "hf")
    _edit_json(hf / "config.json", model_type="llamaa")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unsupported model_type 'llamaa'; litft supports: .*llama"):
        convert_from_hf(hf, out)
    (hf / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        convert_from_hf(hf, out)
    _assert_nothing_written(out)


_SLIDING_YARN = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                 "sliding_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1000.0,
                                       "original_max_position_embeddings": 16}}


@pytest.mark.parametrize("variant, changes, message", [
    ("qwen3_moe", {"norm_topk_prob": "yes"}, r"config\.json: norm_topk_prob='yes' is not a value litft implements "
                                             r"for model_type 'qwen3_moe' \(supported: True, False\)"),
    ("qwen3_moe", {"mlp_only_layers": [1, 5]}, r"config\.json: mlp_only_layers holds \[5\], outside "
                                               r"\[0, num_hidden_layers=3\)"),
    ("qwen3_moe-step", {"decoder_sparse_step": 0}, r"config\.json: decoder_sparse_step must be >= 1, got 0"),
    ("olmo3", {"rope_parameters": _SLIDING_YARN}, r"config\.json: rope_parameters\.sliding_attention\.rope_type="
                                                   r"'yarn' is not implemented by litft for model_type 'olmo3'"),
    ("smollm3", {"no_rope_layers": [1, 0]}, r"config\.json: no_rope_layers must hold 3 flags of 0 or 1"),
    ("smollm3", {"layer_types": ["sliding_attention", "full_attention", "full_attention"], "sliding_window": 4},
     r"config\.json: layer_types has sliding_attention layers but use_sliding_window is false"),
    ("llama4", {"no_rope_layers": [1, 0]}, r"config\.json: no_rope_layers must hold 3 flags of 0 or 1 \(one per "
                                           r"layer\), got \[1, 0\]"),
    ("llama4", {"moe_layers": [0, 5]}, r"config\.json: moe_layers holds \[5\], outside \[0, num_hidden_layers=3\)"),
    ("llama4", {"moe_layers": None, "interleave_moe_layer_step": 0},
     r"config\.json: interleave_moe_layer_step must be >= 1, got 0"),
    ("llama4", {"use_qk_norm": "yes"}, r"config\.json: use_qk_norm='yes' is not a value litft implements for "
                                       r"model_type 'llama4_text' \(supported: True, False\)"),
    ("llama4", {"attention_chunk_size": None}, r"config\.json: layer_types has 'chunked' layers but "
                                               r"attention_chunk_size is not a positive integer \(got None\)"),
    ("llama4", {"layer_types": ["chunked_attention", "banded_attention", "full_attention"]},
     r"config\.json: unsupported layer type 'banded_attention'"),
    ("llama4", {"quantization_config": {"quant_method": "fbgemm_fp8"}},
     r"config\.json: quantization_config \(quant_method='fbgemm_fp8'\) is not a format litft imports for "
     r"model_type 'llama4_text'"),
    ("gemma4", {"enable_moe_block": True, "num_experts": 4}, r"config\.json: enable_moe_block=true needs "
                                                             r"top_k_experts, moe_intermediate_size \(positive "
                                                             r"integers\)"),
    ("gemma4", {"use_bidirectional_attention": "all"}, r"config\.json: use_bidirectional_attention='all' is not a "
                                                        r"value litft implements for model_type 'gemma4_text' "
                                                        r"\(supported: 'vision'\)"),
    ("gemma4", {"rope_parameters": _SLIDING_YARN}, r"config\.json: rope_parameters\.sliding_attention\.rope_type="
                                                    r"'yarn' is not implemented by litft for model_type 'gemma4_text'"),
    ("gemma4", {"per_layer_config": {"2": {"head_dim": 32, "sliding_window": 8}, "5": {"head_dim": 32}}},
     r"config\.json: per_layer_config\['2'\] overrides \['sliding_window'\]: litft implements only head_dim, "
     r"num_key_value_heads"),
    ("gemma4", {"per_layer_config": {"1": {"head_dim": 32}, "2": {"head_dim": 32}, "5": {"head_dim": 32}}},
     r"config\.json: per_layer_config\['1'\]: litft implements per-layer overrides of full_attention layers only"),
    ("gemma4", {"per_layer_config": {"2": {"head_dim": 32}, "5": {"head_dim": 16}}},
     r"config\.json: per_layer_config must give every full_attention layer the same overrides"),
    ("gemma4", {"num_kv_shared_layers": 4}, r"config\.json: kv_shared_layers=4: the shared layers' kinds \['full'\] "
                                            r"have no earlier layer of their kind to take keys and values from"),
])
def test_config_features_litft_does_not_implement_are_refused_by_name(tmp_path, variant, changes, message):
    """A config.json value litft cannot compute is refused naming its key, before anything is written."""
    hf = tmp_path / "hf"
    make_hf_model(variant, hf)
    _edit_json(hf / "config.json", **changes)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        convert_from_hf(hf, out)
    _assert_nothing_written(out)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model name 'Llama-3.2-1b-Instrct'\. Did you mean: "
                                         r"Llama-3\.2-1B-Instruct"):
        get_config("Llama-3.2-1b-Instrct")
    with pytest.raises(ValueError, match=r"Did you mean: .*Qwen3-0\.6B"):
        get_config("Qwen3-0.7B")
    assert get_config("meta-llama/llama-3.2-1b").name == "Llama-3.2-1B"  # repo id, any case


def test_existing_out_dir_needs_overwrite(tmp_path, tiny_llama_hf, tiny_llama_native):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"out exists and is not empty; pass --overwrite true"):
        convert_from_hf(tiny_llama_hf, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_to_hf(tiny_llama_native, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    convert_from_hf(tiny_llama_hf, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model_config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine without --overwrite
    convert_to_hf(out, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


# ------------------------------------------------------------------------------ sharding and custom sizes


def test_sharded_round_trip(tmp_path, tiny_llama_hf, tiny_llama_native):
    from transformers import AutoModelForCausalLM

    hf_out = convert_to_hf(tiny_llama_native, tmp_path / "hf", max_shard_size="20KB")
    shards = sorted(hf_out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (hf_out / "model.safetensors").exists()
    index = json.loads((hf_out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                   for t in load_file(tiny_llama_hf / "model.safetensors").values())
    theirs = AutoModelForCausalLM.from_pretrained(hf_out, attn_implementation="eager").eval()
    ours = load_model(tiny_llama_native)
    idx = _tokens()
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4

    native_again = convert_from_hf(hf_out, tmp_path / "native")
    a, b = load_file(native_again / "model.safetensors"), load_file(tiny_llama_native / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Config.from_checkpoint(native_again).to_dict() | {"name": ""} == \
        Config.from_checkpoint(tiny_llama_native).to_dict() | {"name": ""}

    sharded_native = convert_from_hf(hf_out, tmp_path / "native-sharded", max_shard_size="20KB")
    assert len(list(sharded_native.glob("model-*-of-*.safetensors"))) > 3
    with torch.no_grad():
        assert torch.equal(load_model(sharded_native)(idx), ours(idx))


def test_custom_size_of_a_known_architecture_uses_the_checkpoint_sizes(tmp_path):
    """A folder named like a zoo model (Llama-3.2-1B: 16 layers, 2048 wide) holding a tiny model converts with
    the tiny model's sizes: the name never overrides the checkpoint."""
    hf_dir = tmp_path / "meta-llama" / "Llama-3.2-1B"
    hf_model = make_hf_model("llama-tied", hf_dir, overrides={"num_hidden_layers": 2, "hidden_size": 48,
                                                              "num_attention_heads": 3, "num_key_value_heads": 1,
                                                              "head_dim": 16, "intermediate_size": 80})
    native = convert_from_hf(hf_dir, tmp_path / "native", hf_id="meta-llama/Llama-3.2-1B")
    config = Config.from_checkpoint(native)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_query_groups, config.head_size,
            config.intermediate_size, config.vocab_size) == (2, 48, 3, 1, 16, 80, 128)
    assert config.hf_id == "meta-llama/Llama-3.2-1B" and config.tie_embeddings
    idx = _tokens() % 128
    with torch.no_grad():
        assert (load_model(native)(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4


def _drop_rope_key(hf_dir: Path, key: str) -> None:
    """Remove ``key`` from config.json's rope settings (transformers writes it back on save_pretrained)."""
    config = json.loads((hf_dir / "config.json").read_text())
    for section in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    config.pop(key, None)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_yarn_without_original_max_position_embeddings_matches_transformers(tmp_path):
    """rope_scaling {"rope_type": "yarn", "factor": 4} alone: transformers falls back to max_position_embeddings;
    so does convert from_hf (it was a TypeError in model.py), with the logits of transformers reading that file."""
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    make_hf_model("llama-yarn", hf_dir, overrides={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    _drop_rope_key(hf_dir, "original_max_position_embeddings")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    native = convert_from_hf(hf_dir, tmp_path / "native")
    scaling = Config.from_checkpoint(native).rope_scaling
    assert scaling["original_max_position_embeddings"] == 64  # TINY's max_position_embeddings
    idx = _tokens() % 128
    with torch.no_grad():
        assert (load_model(native)(idx) - hf_model(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_type 'llama3' has no 'low_freq_factor'"),
    ({"rope_type": "yarn"}, "rope_type 'yarn' has no 'factor'"),
    ({"rope_type": "mrope", "factor": 2.0}, "rope_scaling rope_type 'mrope' is not supported"),
])
def test_unsupported_rope_settings_are_refused_naming_the_key(tmp_path, tiny_llama_hf, rope, message):
    hf_dir = _copy(tiny_llama_hf, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = rope
    (hf_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        convert_from_hf(hf_dir, out)
    _assert_nothing_written(out)


def test_max_shard_size_forms(tmp_path, tiny_llama_native):
    from litft.weights import parse_size

    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1.5KB", " 20 kb ", "1000", 1000)] == \
        [5 * 10**9, 500 * 10**6, 2 * 2**30, 1500, 20_000, 1000, 1000]
    for bad in ("lots", "5 GBs", "-1MB", "0", "inf", "", "1e3"):
        with pytest.raises(ValueError, match=r"--max_shard_size .* is invalid: expected .* e\.g\. 5GB, 500MB, 2GiB"):
            parse_size(bad)
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match=r"--max_shard_size 'lots' is invalid"):  # was "invalid literal for int()"
        convert_to_hf(tiny_llama_native, out, max_shard_size="lots")
    _assert_nothing_written(out)
