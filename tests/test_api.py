"""``from litft import LLM``: loading native and Hugging Face folders, generate / stream / chat / benchmark / save,
and clear errors for what users get wrong."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from litft import LLM
from litft.generate import SamplingParams
from tests.test_generate import make_tiny_checkpoint

PROMPT = "The cat likes"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM.load(tiny["native"], device="cpu")


def test_generate_equals_transformers_on_text(tiny, llm) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["hf"])
    hf = AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == llm.encode(PROMPT)
    with torch.no_grad():  # stops at the checkpoint's stop tokens, like litft
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    for stop in ("<|end_of_text|>", "<|eot_id|>"):
        text = text.split(stop)[0]
    assert llm.generate(PROMPT, max_new_tokens=15) == text


def test_generate_str_list_and_stream(llm) -> None:
    one = llm.generate(PROMPT, max_new_tokens=12)
    assert isinstance(one, str) and one
    batch = llm.generate([PROMPT, "Hello, world! How are you today?", "1"], max_new_tokens=12)
    assert batch[0] == one and batch == [llm.generate(p, max_new_tokens=12) for p in
                                         [PROMPT, "Hello, world! How are you today?", "1"]]
    stream = llm.generate(PROMPT, max_new_tokens=12, stream=True)
    assert not isinstance(stream, str) and "".join(stream) == one
    # closing a stream early frees the engine for the next call
    stream = llm.generate(PROMPT, max_new_tokens=12, stream=True)
    next(stream)
    stream.close()
    assert llm.generate(PROMPT, max_new_tokens=12) == one
    # sampling: reproducible with a seed
    a = llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=50, seed=3)
    assert a == llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=50, seed=3)


def test_chat_uses_the_template(llm) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert llm.tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    expected = llm.engine.generate([ids], SamplingParams(max_new_tokens=10))[0].text
    assert llm.chat(messages, max_new_tokens=10) == expected
    assert "".join(llm.chat(messages, max_new_tokens=10, stream=True)) == llm.chat(messages, max_new_tokens=10)
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="non-empty list"):
        llm.chat([])


def test_hf_folder_is_converted_in_memory(tiny, llm) -> None:
    before = sorted(p.name for p in tiny["hf"].iterdir())
    hf_llm = LLM.load(tiny["hf"], device="cpu")
    assert hf_llm.generate(PROMPT, max_new_tokens=12) == llm.generate(PROMPT, max_new_tokens=12)
    assert sorted(p.name for p in tiny["hf"].iterdir()) == before  # nothing written into the user's folder


def test_save_and_reload(llm, tmp_path: Path) -> None:
    out = llm.save(tmp_path / "saved")
    assert (out / "model_config.yaml").is_file() and (out / "tokenizer.json").is_file()
    again = LLM.load(out, device="cpu")
    assert again.generate(PROMPT, max_new_tokens=12) == llm.generate(PROMPT, max_new_tokens=12)
    with pytest.raises(FileExistsError):
        llm.save(out)


def test_benchmark_reports_speed_and_memory(llm) -> None:
    stats = llm.benchmark(num_iterations=1, prompt_length=8, max_new_tokens=8, batch_size=2, warmup=0)
    assert stats["tokens_per_sec"] > 0 and stats["decode_tokens_per_sec"] > 0
    assert 0 < stats["time_to_first_token"] < stats["total_time"]
    assert stats["peak_memory_bytes"] > 0 and stats["batch_size"] == 2


def test_quantized_inference_nf4(tiny) -> None:
    pytest.importorskip("bitsandbytes")
    q = LLM.load(tiny["native"], device="cpu", quantize="bnb.nf4")
    assert type(q.model.blocks[0].attn.q_proj).__name__ == "Linear4bit"
    assert isinstance(q.generate(PROMPT, max_new_tokens=5), str)
    with pytest.raises(ValueError, match="quantized weights cannot be saved"):
        q.save(tiny["native"].parent / "q")


def test_load_errors_are_clear(tiny, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="litft download meta-llama/Llama-3.2-1B"):
        LLM.load("meta-llama/Llama-3.2-1B")  # a hub name is never fetched
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        LLM.load(tmp_path / "missing")
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("model.safetensors", "model_config.yaml"):
        shutil.copy(tiny["native"] / f, no_tok / f)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        LLM.load(no_tok, device="cpu")
    (no_tok / "model_config.yaml").unlink()
    shutil.copy(tiny["native"] / "tokenizer.json", no_tok)
    with pytest.raises(FileNotFoundError, match="neither model_config.yaml"):
        LLM.load(no_tok, device="cpu")
    with pytest.raises(ValueError, match="precision='bf16-mixed'.*bf16-true"):
        LLM.load(tiny["native"], device="cpu", precision="bf16-mixed")
    with pytest.raises(ValueError, match="precision='fp8'"):
        LLM.load(tiny["native"], device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="quantize='gptq'"):
        LLM.load(tiny["native"], device="cpu", quantize="gptq")


def test_generate_errors_are_clear(llm) -> None:
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(PROMPT, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="exceeds the context"):
        llm.generate("word " * 80, max_new_tokens=4)
    assert isinstance(llm.generate("word " * 80, max_new_tokens=4, truncate=True), str)
    with pytest.raises(ValueError, match="one prompt"):
        llm.generate([PROMPT, PROMPT], stream=True)


def reference_logprobs(hf_dir: Path, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the same model's logits (fp32, eager) at each generated token's position,
    teacher-forced: row i is the distribution ``token_ids[i]`` was drawn from."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + token_ids])).logits[0].float()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits, dim=-1)[start:start + len(token_ids)]


def assert_logprobs_match(generation: Any, reference: torch.Tensor, k: int, atol: float = 1e-4) -> None:
    """Every token's logprob and its k alternatives equal the reference log-softmax (ids and values)."""
    assert len(generation.logprobs) == len(generation.token_ids) == reference.shape[0] > 0
    for i, (entry, token) in enumerate(zip(generation.logprobs, generation.token_ids)):
        assert entry.id == token
        assert abs(entry.logprob - reference[i, token].item()) <= atol, (i, entry.logprob, reference[i, token])
        assert len(entry.top) == k
        top_values = reference[i].topk(k).values.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values, abs=atol)
        for token_id, value in entry.top:  # each alternative's id has that logprob (ties may order differently)
            assert abs(reference[i, token_id].item() - value) <= atol


def test_generate_logprobs_equal_transformers_log_softmax(tiny, llm) -> None:
    prompts = [PROMPT, "Hello, world! How are you today?", "1"]  # ragged: decoded together
    greedy = llm.generate(prompts, max_new_tokens=10, logprobs=4)
    assert [g.text for g in greedy] == llm.generate(prompts, max_new_tokens=10)
    for prompt, g in zip(prompts, greedy):
        assert g.finish_reason in ("stop", "length")
        assert_logprobs_match(g, reference_logprobs(tiny["hf"], llm.encode(prompt), g.token_ids), 4)
        # the greedy token is the most likely one
        assert all(entry.top[0][0] == entry.id for entry in g.logprobs)

    # sampled tokens: the model's own distribution (before temperature and top_k) is reported
    sampled = llm.generate(PROMPT, max_new_tokens=10, temperature=1.5, top_k=20, seed=7, logprobs=2)
    assert sampled.text == llm.generate(PROMPT, max_new_tokens=10, temperature=1.5, top_k=20, seed=7)
    assert_logprobs_match(sampled, reference_logprobs(tiny["hf"], llm.encode(PROMPT), sampled.token_ids), 2)

    # logprobs=0: the tokens' own logprobs only; chat returns a Generation too
    only = llm.generate(PROMPT, max_new_tokens=5, logprobs=0)
    assert only.token_ids == greedy[0].token_ids[:5] and all(e.top == [] for e in only.logprobs)
    messages = [{"role": "user", "content": "Hi"}]
    chat = llm.chat(messages, max_new_tokens=6, logprobs=1)
    assert chat.text == llm.chat(messages, max_new_tokens=6)
    assert_logprobs_match(chat, reference_logprobs(tiny["hf"], llm.encode_chat(messages), chat.token_ids), 1)

    with pytest.raises(ValueError, match="logprobs cannot be streamed"):
        llm.generate(PROMPT, stream=True, logprobs=1)
    with pytest.raises(ValueError, match="logprobs=-1 is invalid"):
        llm.generate(PROMPT, logprobs=-1)


@pytest.mark.parametrize("sync_every", [1, 4], ids=["sync-every-step", "sync-every-4-steps-as-on-gpu"])
def test_logprobs_follow_their_request_through_continuous_batching(tiny, sync_every: int) -> None:
    """Rows that join, leave, move down and shift with the cache keep their own logprobs: each request's equal
    those it gets alone."""
    llm = LLM.load(tiny["native"], device="cpu", max_seq_length=32)
    llm.engine.sync_every = sync_every
    text = llm.encode("Hello, world! How are you today? The cat likes milk and the dog likes bones. " * 3)
    prompts = [text[i:i + n] for i, n in enumerate([20, 18, 5, 15, 19])]
    lengths = [9, 3, 12, 6, 13]
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=[]) for n in lengths]
    alone = [llm.engine.generate([ids], p, max_batch_size=1)[0] for ids, p in zip(prompts, params)]
    solo = [llm.engine.run([llm.engine.new_request(ids, p, logprobs=3)])[0] for ids, p in zip(prompts, params)]
    llm.engine.allocate(4, 32)  # a small cache: it shifts while rows come and go
    requests = [llm.engine.new_request(ids, p, logprobs=3) for ids, p in zip(prompts, params)]
    together = llm.engine.run(requests, max_batch_size=4)
    assert llm.engine.num_shifts > 0 and llm.engine.num_row_moves > 0
    for a, t, s in zip(alone, together, solo):
        assert t.tokens == s.tokens == a.tokens and len(t.token_logprobs) == len(t.tokens)
        for x, y in zip(t.token_logprobs, s.token_logprobs):
            assert x.id == y.id and abs(x.logprob - y.logprob) < 1e-5
            assert [i for i, _ in x.top] == [i for i, _ in y.top]
            assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-5)
