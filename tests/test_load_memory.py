"""Issue 2: a model is built on the meta device and its weights are memory-mapped, so loading never materialises it
twice. A child process loads a 94 MB bfloat16 checkpoint (the Llama layout of tests/test_convert_streaming.py) with
``litft.weights.load_model`` and ``LLM.load`` on the CPU and measures its anonymous memory (tests/memory.py): in the
stored dtype the weights stay file pages (almost no anonymous memory); cast to float32 they are one float32 copy
(188 MB), not that plus a bfloat16 copy or two float32 ones.

glibc's malloc is given a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_), so every freed tensor goes back to the
system and each measurement starts from the same memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import litft
from litft.convert.hf import hf_config_to_config
from litft.weights import copy_tokenizer_files, expected_shapes, write_shards
from tests.memory import MB
from tests.test_convert_streaming import HF_CONFIG

REPO = Path(__file__).resolve().parents[1]
TINY = Path(litft.__file__).parent / "assets" / "tiny" / "base"

CHILD = r"""
import json, sys
from pathlib import Path

from tests.memory import Peak  # (the child runs in the repository root)

import torch
from litft.api import LLM
from litft.weights import load_model

big, small = Path(sys.argv[1]), Path(sys.argv[2])
LLM.load(small, device="cpu").generate("a", max_new_tokens=2)  # lazy imports and one-time set-up, not measured
result = {}
for name, load in [
    ("load_model", lambda: load_model(big)),
    ("load_model_fp32", lambda: load_model(big, dtype=torch.float32)),
    ("llm_bf16", lambda: LLM.load(big, device="cpu", precision="bf16-true")),
    ("llm_fp32", lambda: LLM.load(big, device="cpu")),  # the CPU default: 32-true
]:
    with Peak() as p:
        loaded = load()
    model = loaded.model if hasattr(loaded, "model") else loaded
    result[name] = p.delta
    result[name + "_dtype"] = str(next(model.parameters()).dtype)
    del loaded, model
print(json.dumps(result))
"""


def write_native_checkpoint(directory: Path) -> int:
    """A native bfloat16 checkpoint of HF_CONFIG's sizes (constant weights, the tiny tokenizer); returns its bytes."""
    hf = directory.parent / "hf_config"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    config = hf_config_to_config(hf)
    directory.mkdir()
    shapes = expected_shapes(config)
    write_shards(((k, torch.full(s, 0.01, dtype=torch.bfloat16)) for k, s in shapes.items()), directory, 32 * MB)
    config.save(directory)
    copy_tokenizer_files(TINY, directory)
    return sum(s.numel() * 2 for s in shapes.values())


def test_loading_maps_the_weights_and_casts_them_once(tmp_path):
    bf16_bytes = write_native_checkpoint(tmp_path / "big")
    fp32_bytes = 2 * bf16_bytes
    assert 90 * MB < bf16_bytes < 100 * MB
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(TINY)], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mb = {k: f"{v / MB:.0f} MB" for k, v in m.items() if isinstance(v, int)}
    assert m["load_model_dtype"] == m["llm_bf16_dtype"] == "torch.bfloat16", m
    assert m["load_model_fp32_dtype"] == m["llm_fp32_dtype"] == "torch.float32", m
    # the stored dtype: memory-mapped, a few MB of bookkeeping (RoPE tables, the tokenizer) for 94 MB of weights
    assert m["load_model"] < 0.1 * bf16_bytes, mb
    assert m["llm_bf16"] < 0.1 * bf16_bytes, mb
    # cast: one float32 copy (188 MB), which the measurement does see; two copies would be >= 282 MB
    for name in ("load_model_fp32", "llm_fp32"):
        assert 0.9 * fp32_bytes < m[name] < fp32_bytes + 0.2 * bf16_bytes, (name, mb)
