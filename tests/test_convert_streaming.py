"""Conversion streams shard by shard: converting a checkpoint much larger than one shard holds about one shard in
memory, in both directions.

Safetensors tensors are memory-mapped (file pages the kernel can drop at any time), so the memory a conversion
really needs is its *anonymous* memory: the tensors it creates (dtype casts, fused/split tensors) and the shard being
serialised. Each conversion here casts every tensor (float32 ↔ bfloat16), so a converter that gathered all tensors
before writing would hold the whole output in anonymous memory. A child process samples its own ``RssAnon``
(/proc/self/status; tests/memory.py) while it converts, and first checks that the measurement does see tensors held
in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MB = 2**20
SHARD = 6 * MB
# Llama layout, float32: 12 layers x 13 MB + embeddings and head 2 x 16 MB = 188 MB (94 MB in bfloat16)
HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512,
             "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 8,
             "vocab_size": 8192, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
             "hidden_act": "silu", "torch_dtype": "float32"}


def write_hf_checkpoint(directory: Path, shard_bytes: int) -> int:
    """An HF Llama checkpoint in several safetensors shards (constant weights: their values do not matter here);
    returns the number of float32 bytes."""
    from litft.weights import write_shards

    c = HF_CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]

    def tensors():
        yield "model.embed_tokens.weight", torch.full((v, h), 0.01)
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{name}.weight", torch.full((h, h), 0.02)
            yield p + "mlp.gate_proj.weight", torch.full((i, h), 0.03)
            yield p + "mlp.up_proj.weight", torch.full((i, h), 0.03)
            yield p + "mlp.down_proj.weight", torch.full((h, i), 0.03)
            yield p + "input_layernorm.weight", torch.ones(h)
            yield p + "post_attention_layernorm.weight", torch.ones(h)
        yield "model.norm.weight", torch.ones(h)
        yield "lm_head.weight", torch.full((v, h), 0.01)

    directory.mkdir(parents=True)
    total = 0

    def counted():
        nonlocal total
        for name, t in tensors():
            total += t.numel() * t.element_size()
            yield name, t

    write_shards(counted(), directory, shard_bytes)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return total


CHILD = r"""
import json, sys
from pathlib import Path

from tests.memory import Peak  # (the child runs in the repository root)

import torch
from litft.convert.hf import convert_from_hf, convert_to_hf
from litft.weights import SafetensorsReader, weight_files

hf, native, back, shard = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
result = {}
from litft.convert.hf import hf_config_to_config
from litft.weights import expected_shapes

expected_shapes(hf_config_to_config(hf))  # lazy imports and the meta-device model happen before measuring
with Peak() as p:
    convert_from_hf(hf, native, dtype="bfloat16", max_shard_size=str(shard))
result["from_hf"] = p.delta
with Peak() as p:
    convert_to_hf(native, back, dtype="float32", max_shard_size=str(shard))
result["to_hf"] = p.delta
# the measurement sees tensors held in memory: all native tensors cast back to float32 at once
with Peak() as p:
    reader = SafetensorsReader(weight_files(native))
    held = [reader.get(k).float() for k in reader.keys()]
result["all_in_memory"] = p.delta
result["held_bytes"] = sum(t.numel() * t.element_size() for t in held)
print(json.dumps(result))
"""


@pytest.mark.slow
def test_conversion_holds_about_one_shard_in_memory(tmp_path):
    fp32_bytes = write_hf_checkpoint(tmp_path / "hf", SHARD)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 20
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "hf"), str(tmp_path / "native"),
                        str(tmp_path / "back"), str(SHARD)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # sanity: holding every tensor shows up (less the heap the conversions left free for reuse), so the measure would
    # catch a converter that does
    assert m["held_bytes"] == fp32_bytes and m["all_in_memory"] > 0.75 * fp32_bytes, m
    # streaming: a shard being filled, its serialised copy, one tensor in flight and allocator slack, far from the
    # 94 / 188 MB
    bound = 6 * SHARD
    assert m["from_hf"] < bound, f"from_hf held {m['from_hf'] / MB:.0f} MB (bound {bound / MB:.0f} MB): {m}"
    assert m["to_hf"] < bound, f"to_hf held {m['to_hf'] / MB:.0f} MB (bound {bound / MB:.0f} MB): {m}"
    shards = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 20  # the export is sharded too, with an index
