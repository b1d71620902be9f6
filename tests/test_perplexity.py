"""``litft evaluate perplexity`` equals exp(mean token NLL) computed independently with transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from litft.evaluate.perplexity import perplexity, strided_windows

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Question: What is two plus two? Answer: four",
          "Paris is the capital of France. Berlin is the capital of Germany.", "0 1 2 3 4 5 6 7 8 9 10 = + - * ?",
          "A B C D answer the question with a letter", "Once upon a time there was a small model."]


def make_tiny_llama(hf_dir: Path, native_dir: Path, tokenizer: str = "bpe") -> None:
    """A tiny random Llama (tests/hf_models.py) with a real tokenizer (tests/fixtures_tokenizers.py: ``bpe`` =
    Llama-3-style byte-level BPE, ``sentencepiece`` = Llama-2 style; both add a BOS) as an HF folder, and the
    litft checkpoint converted from it."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer, make_sentencepiece_tokenizer
    from tests.hf_models import make_hf_model

    make_hf_model("llama", hf_dir, overrides={"vocab_size": 400})  # the fixture tokenizers' vocab
    (make_bpe_tokenizer if tokenizer == "bpe" else make_sentencepiece_tokenizer)(hf_dir)
    generation = json.loads((hf_dir / "generation_config.json").read_text())  # written by the tokenizer fixture
    config = json.loads((hf_dir / "config.json").read_text())
    eos = generation["eos_token_id"]
    config.update(bos_token_id=generation["bos_token_id"], eos_token_id=eos[0] if isinstance(eos, list) else eos)
    (hf_dir / "config.json").write_text(json.dumps(config))
    convert_from_hf(hf_dir, native_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("perplexity")
    make_tiny_llama(root / "hf", root / "native")
    return {"hf": root / "hf", "native": root / "native"}


def hf_nll(hf_dir: Path, texts: list[str], window: int, stride: int) -> tuple[float, int]:
    """(sum of NLL, scored tokens) with transformers: the HF perplexity recipe (labels = -100 on the context
    part of each window, the model shifts them itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])  # BOS added by the tokenizer, as litft does
        n = ids.shape[1]
        scored_until = 1  # token 0 has no context
        end = 0
        while end < n:
            end = min(window, n) if end == 0 else min(end + stride, n)
            begin = max(0, end - window)
            labels = ids[:, begin:end].clone()
            labels[:, : scored_until - begin] = -100
            n_scored = int((labels[:, 1:] != -100).sum())
            with torch.no_grad():
                loss = model(ids[:, begin:end], labels=labels).loss
            total += loss.item() * n_scored
            count += n_scored
            scored_until = end
    return total, count


def test_windows_score_every_token_once() -> None:
    assert strided_windows(10, 6, 2) == [(0, 6, 1), (2, 8, 6), (4, 10, 8)]  # the module docstring's example
    for n in (1, 2, 5, 64, 65, 200):
        for window, stride in ((8, 1), (8, 4), (8, 7), (64, 32)):
            scored = [t for start, end, first in strided_windows(n, window, stride) for t in range(first, end)]
            assert scored == list(range(1, n))
            for start, end, first in strided_windows(n, window, stride):
                assert end - start <= window and start < first
                assert first - start >= min(window - stride, first)  # context of the first scored token


@pytest.mark.parametrize("window, stride", [(None, None), (16, 5)])
def test_perplexity_matches_transformers(tiny: dict[str, Path], tmp_path: Path, window, stride) -> None:
    texts = [" ".join(CORPUS), "Paris is the capital.", "A", CORPUS[1] * 3]  # one longer than 64 tokens
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "ppl.json"
    results = perplexity(tiny["native"], data=data, text_field="body", max_seq_length=window, stride=stride,
                         batch_size=3, device="cpu", out=out)
    window = window or 64
    stride = stride or window // 2
    total, count = hf_nll(tiny["hf"], texts, window, stride)
    assert results["tokens"] == count
    assert results["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(results["perplexity"])
    assert results["windows"] > len(texts)  # the long documents really were split


def test_perplexity_txt_and_cli(tiny: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    text = "\n".join(CORPUS)
    data = tmp_path / "doc.txt"
    data.write_text(text)
    out = tmp_path / "ppl.json"
    run = subprocess.run([sys.executable, "-m", "litft", "evaluate", "perplexity", str(tiny["native"]),
                          "--data", str(data), "--max_seq_length", "32", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    total, count = hf_nll(tiny["hf"], [text], 32, 16)
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert "perplexity" in run.stdout


def test_perplexity_bad_input(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        perplexity(tiny["native"], data=bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: no 'text' field \(fields: content\).*--text_field"):
        perplexity(tiny["native"], data=nofield)
    with pytest.raises(ValueError, match="expected a .txt, .jsonl or .json file"):
        perplexity(tiny["native"], data=tiny["native"] / "model_config.yaml")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        perplexity(tiny["native"], data=tmp_path / "missing.txt")
    txt = tmp_path / "t.txt"
    txt.write_text(" ".join(CORPUS))
    with pytest.raises(ValueError, match=r"max_seq_length=1000 is invalid: expected 2..64"):
        perplexity(tiny["native"], data=txt, max_seq_length=1000)
    with pytest.raises(ValueError, match=r"stride=16 is invalid"):
        perplexity(tiny["native"], data=txt, max_seq_length=16, stride=16)
