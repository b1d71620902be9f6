"""The generation engine: greedy decoding equals transformers' ``generate`` for every family, batches and
continuous batching equal generating alone, sampling filters equal transformers' warpers, stop tokens and
strings, streaming, compile, and clear errors for bad input. Also ``litft generate`` on a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from litft.convert.hf import convert_from_hf
from litft.generate.engine import Engine
from litft.generate.sampling import (
    Flags,
    RowParams,
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)
from litft.weights import load_model
from tests.hf_models import FAMILY_VARIANTS, make_hf_model

NEW = 20
GREEDY = SamplingParams(max_new_tokens=NEW, stop_token_ids=[])


def make_tiny_checkpoint(root: Path, variant: str = "llama", overrides: dict | None = None) -> dict[str, Path]:
    """A tiny random HF model of ``variant`` with the byte-level BPE test tokenizer (vocab 400, Llama 3 chat
    template, stop tokens <|end_of_text|> and <|eot_id|>), as an HF folder and as a native checkpoint.
    ``overrides``: more HF config fields (e.g. ``{"num_hidden_layers": 1}``)."""
    from tests.fixtures_tokenizers import make_bpe_tokenizer

    hf_dir, native = root / "hf", root / "native"
    make_hf_model(variant, hf_dir, overrides={"vocab_size": 400, "bos_token_id": 0, "eos_token_id": [1, 2],
                                              **(overrides or {})})
    make_bpe_tokenizer(hf_dir)  # after the model: its generation_config.json (eos = both stop tokens) wins
    convert_from_hf(hf_dir, native)
    return {"hf": hf_dir, "native": native}


def _prompts(lengths: tuple[int, ...], vocab: int = 128, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("llama")
    hf = make_hf_model("llama", d / "hf")
    hf.generation_config.eos_token_id = None
    return hf, load_model(convert_from_hf(d / "hf", d / "native"))


# ---------------------------------------------------------------------- greedy parity with transformers


@pytest.mark.parametrize("variant", sorted(FAMILY_VARIANTS))
def test_greedy_equals_transformers_and_batch_equals_alone(variant: str, tmp_path: Path) -> None:
    from transformers import GenerationConfig

    hf = make_hf_model(variant, tmp_path / "hf")
    engine = Engine(load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native")))
    # lengths chosen so that sequences cross every sliding window and LongRoPE's switch point (16)
    prompts = _prompts((7, 12, 3))
    batched = [r.tokens for r in engine.generate(prompts, GREEDY)]
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generation_config.eos_token_id = None  # lengths must match: never stop early
    for prompt, ours in zip(prompts, batched):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt):]
        assert ours == theirs.tolist(), variant
        assert engine.generate([prompt], GREEDY)[0].tokens == ours, f"{variant}: batch != alone"


def test_repetition_penalty_equals_transformers(llama) -> None:
    from transformers import GenerationConfig

    hf, model = llama
    prompt = _prompts((9,))[0]
    ours = Engine(model).generate([prompt], SamplingParams(max_new_tokens=NEW, repetition_penalty=1.5,
                                                           stop_token_ids=[]))[0].tokens
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.5, eos_token_id=None,
                              pad_token_id=0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, 9:].tolist()
    assert ours == theirs


# ---------------------------------------------------------------------- batching, continuous batching, cache shifts


def test_continuous_batching_equals_alone(llama) -> None:
    _, model = llama
    engine = Engine(model)
    prompts = _prompts((5, 10, 3, 14, 8))
    params = [SamplingParams(max_new_tokens=m, stop_token_ids=[]) for m in (15, 12, 9, 6, 16)]
    alone = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    engine.max_rows_in_use = 0
    finished = []
    together = engine.generate(prompts, params, max_batch_size=2, on_finish=lambda i, r: finished.append(i))
    assert [r.tokens for r in together] == alone
    assert [len(t) for t in alone] == [15, 12, 9, 6, 16]
    assert sorted(finished) == list(range(5)) and engine.max_rows_in_use == 2
    assert all(r.finish_reason == "length" for r in together)


@pytest.mark.parametrize("variant", ["gemma2", "phi3", "olmo3", "smollm3-sliding", "qwen3_moe", "gpt_oss", "llama4",
                                     "deepseek_v3", "gemma4", "qwen3_5"])
def test_requests_join_a_running_batch_and_the_cache_shifts(variant: str, tmp_path: Path) -> None:
    """The step-wise API a server schedules with: a longer prompt joins mid-decode (slots shift right), the cache
    fills up (slots shift left); sliding windows, attention chunks, softcapping, LongRoPE, NoPE layers (and their
    query temperature), MoE routing, KV-shared layers and linear-attention states still give the tokens of each
    alone."""
    make_hf_model(variant, tmp_path / "hf")
    engine = Engine(load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native")))
    prompts = _prompts((5, 10, 14))
    params = [SamplingParams(max_new_tokens=m, stop_token_ids=[]) for m in (15, 12, 6)]
    alone = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    engine.allocate(batch_size=2, cache_length=24)
    a = engine.add([engine.new_request(prompts[0], params[0])])[0]
    for _ in range(4):
        engine.step()
    b = engine.add([engine.new_request(prompts[1], params[1])])[0]  # t = 9 < 10: shift right
    c = None
    while engine.active_requests():
        engine.step()
        for r in engine.sync():
            if r.finished:
                engine.remove(r)
                if r is a:
                    c = engine.add([engine.new_request(prompts[2], params[2])])[0]
    assert [a.tokens, b.tokens, c.tokens] == alone
    assert engine.num_shifts >= 2


def test_repetition_penalty_batch_equals_alone(llama) -> None:
    """Each row keeps its own seen-token mask: in a batch (with rows without a penalty, and continuous batching
    reusing rows) every request gets the tokens it gets alone."""
    _, model = llama
    engine = Engine(model)
    prompts = _prompts((9, 4, 13, 6))
    params = [SamplingParams(max_new_tokens=m, repetition_penalty=p, stop_token_ids=[])
              for m, p in ((14, 1.5), (6, 1.0), (10, 2.0), (12, 1.2))]
    alone = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    assert alone[0] != engine.generate([prompts[0]], GREEDY)[0].tokens[:14]  # the penalty changes the output
    assert [r.tokens for r in engine.generate(prompts, params)] == alone
    assert [r.tokens for r in engine.generate(prompts, params, max_batch_size=2)] == alone


def test_a_step_decodes_only_the_rows_in_use(llama) -> None:
    """A decode step runs on the smallest bucket of leading rows holding every live row; when rows finish, the
    ones left at the end move down (KV cache, positions, sampling state): tokens stay those of each alone."""
    _, model = llama
    engine = Engine(model)
    prompts = _prompts((5, 10, 3, 14, 8, 6))
    params = [SamplingParams(max_new_tokens=m, stop_token_ids=[]) for m in (3, 4, 5, 20)] + [
        SamplingParams(max_new_tokens=18, repetition_penalty=1.5, stop_token_ids=[]),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_k=20, seed=3, stop_token_ids=[])]
    alone = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    engine.allocate(batch_size=32, cache_length=64)
    one = engine.add([engine.new_request(prompts[0], GREEDY)])[0]
    engine.step()
    assert engine.last_step_rows == 1  # one request on a 32-row cache decodes one row
    engine.remove(one)
    engine.num_row_moves = 0
    requests = engine.run([engine.new_request(p, sp) for p, sp in zip(prompts, params)], max_batch_size=6)
    assert [r.tokens for r in requests] == alone
    assert engine.batch_size == 6 and engine.buckets == [1, 2, 4, 6]
    # rows 0-2 finish (3 live: bucket 4): 4 -> 0, 5 -> 1; then (2 live) 3 -> 1; then (1 live) 1 -> 0
    assert engine.num_row_moves == 4
    assert engine.last_step_rows == 1  # the longest request ended alone in row 0


@pytest.mark.parametrize("variant", ["llama", "mistral", "gemma2", "gemma3", "gpt_oss", "llama4", "gemma4",
                                     "qwen3_5_moe"])
def test_chunked_prefill_equals_one_shot(variant: str, tmp_path: Path) -> None:
    """Prompts longer than the sliding window or attention chunk (4 tokens for mistral, gemma2, gemma3, gpt_oss,
    llama4 and gemma4, whose KV-shared layers read their source's chunk) prefilled 3 tokens at a time give the
    tokens of a one-shot prefill; so do linear-attention states carried from chunk to chunk through left padding
    (qwen3_5_moe)."""
    make_hf_model(variant, tmp_path / "hf")
    model = load_model(convert_from_hf(tmp_path / "hf", tmp_path / "native"))
    assert variant == "llama" or 4 in (model.config.sliding_window, model.config.attention_chunk_size) or \
        "linear" in model.config.layer_types
    prompts = _prompts((13, 4, 9))
    whole = [r.tokens for r in Engine(model).generate(prompts, GREEDY)]
    chunked = [r.tokens for r in Engine(model, prefill_chunk_size=3).generate(prompts, GREEDY)]
    assert whole == chunked


def test_lazy_host_sync_gives_the_same_tokens_and_stops(llama) -> None:
    _, model = llama
    prompts = _prompts((6, 11))
    eager = Engine(model, sync_every=1).generate(prompts, GREEDY)
    lazy = Engine(model, sync_every=7).generate(prompts, GREEDY)
    assert [r.tokens for r in eager] == [r.tokens for r in lazy]
    # a stop token found late (after several unsynced steps) still cuts at the right place
    stop = eager[0].tokens[4]
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=[stop])
    r1, r2 = Engine(model, sync_every=1).generate([prompts[0]], params)[0], \
        Engine(model, sync_every=7).generate([prompts[0]], params)[0]
    first = eager[0].tokens.index(stop)
    assert r1.tokens == r2.tokens == eager[0].tokens[:first]
    assert r1.finish_reason == r2.finish_reason == "stop" and r1.num_generated == first + 1


def test_compiled_decode_equals_eager(tmp_path: Path, capsys) -> None:
    """torch.compile'd decode gives the eager tokens: the Engine (graphs reused, a smaller bucket once rows
    finish), ``LLM.load(compile=True)`` and ``litft generate --compile true``."""
    from litft.api import LLM

    paths = make_tiny_checkpoint(tmp_path, overrides={"num_hidden_layers": 1})  # 1 layer: compiles faster
    model = load_model(paths["native"])
    prompts = _prompts((5, 9), vocab=400)
    params = [SamplingParams(max_new_tokens=m, stop_token_ids=[]) for m in (8, 4)]
    eager = [r.tokens for r in Engine(model).generate(prompts, params)]
    compiled = Engine(model, compile=True)
    assert [r.tokens for r in compiled.generate(prompts, params)] == eager
    assert [r.tokens for r in compiled.generate(prompts, params)] == eager  # the compiled graphs are reused
    assert compiled.last_step_rows == 1

    expected = LLM.load(paths["native"], device="cpu").generate(PROMPTS[0], max_new_tokens=8)
    llm = LLM.load(paths["native"], device="cpu", compile=True)
    assert llm.engine.compiled and llm.generate(PROMPTS[0], max_new_tokens=8) == expected
    capsys.readouterr()  # drop what the checkpoint's conversion printed
    _run_cli(paths["native"], "--prompt", PROMPTS[0], "--max_new_tokens", "8", "--device", "cpu",
             "--chat_template", "false", "--compile", "true")
    assert capsys.readouterr().out == expected + "\n"


def compiled_equals_eager(variant: str, root: Path, device: str) -> None:
    """Compiled decode (on CUDA: CUDA graphs, one per bucket of rows) gives the eager tokens with continuous
    batching (rows joining, leaving and moving down), cache shifts (a longer prompt joining, the cache filling up)
    and through ``LLM.load(compile=True)``."""
    from litft.api import LLM

    paths = make_tiny_checkpoint(root, variant)
    model = load_model(paths["native"], device=device)
    prompts = _prompts((5, 10, 14, 3, 8), vocab=400)
    params = [SamplingParams(max_new_tokens=m, stop_token_ids=[]) for m in (15, 12, 6, 20, 9)]
    eager, compiled = Engine(model), Engine(model, compile=True)
    for batch in (2, 5):
        expected = [r.tokens for r in eager.generate(prompts, params, max_batch_size=batch)]
        assert [r.tokens for r in compiled.generate(prompts, params, max_batch_size=batch)] == expected, batch
    assert compiled.num_row_moves > 0

    def joined_mid_decode(engine: Engine) -> list[list[int]]:  # the schedule of the cache-shift test above
        engine.allocate(batch_size=2, cache_length=24)
        a = engine.add([engine.new_request(prompts[0], params[0])])[0]
        for _ in range(4):
            engine.step()
        b = engine.add([engine.new_request(prompts[1], params[1])])[0]
        c = None
        while engine.active_requests():
            engine.step()
            for r in engine.sync():
                if r.finished:
                    engine.remove(r)
                    if r is a:
                        c = engine.add([engine.new_request(prompts[2], params[2])])[0]
        return [a.tokens, b.tokens, c.tokens]

    shifts = compiled.num_shifts
    assert joined_mid_decode(compiled) == joined_mid_decode(eager)
    assert compiled.num_shifts >= shifts + 2
    texts = ["The cat likes", "Question: what is the capital of France? Answer:"]
    llm = LLM.load(paths["native"], device=device, precision="32-true", compile=True)
    reference = LLM.load(paths["native"], device=device, precision="32-true")
    assert llm.engine.compiled
    assert llm.generate(texts, max_new_tokens=20) == reference.generate(texts, max_new_tokens=20)
    assert "".join(llm.generate(texts[0], max_new_tokens=20, stream=True)) == \
        reference.generate(texts[0], max_new_tokens=20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["llama", "gemma2"])
def test_cuda_graph_decode_equals_eager(variant: str, tmp_path: Path, monkeypatch) -> None:
    """``--compile`` on a GPU (torch.compile mode reduce-overhead: CUDA graphs), fp32, softcapping and sliding
    windows included (gemma2). No silent fallback to eager: hitting the recompile limit is an error."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "fail_on_recompile_limit_hit", True)
    compiled_equals_eager(variant, tmp_path, "cuda")


# ---------------------------------------------------------------------- sampling


def _hf_warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float, min_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    out = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k:
        out = TopKLogitsWarper(top_k)(ids, out)
    if top_p < 1:
        out = TopPLogitsWarper(top_p)(ids, out)
    if min_p > 0:
        out = MinPLogitsWarper(min_p)(ids, out)
    return out


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (None, 0.8, 0.0), (None, 1.0, 0.1), (20, 0.9, 0.05),
                                               (1, 0.5, 0.3)])
def test_filters_equal_transformers_warpers(top_k, top_p, min_p) -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    theirs = _hf_warp(logits, 0.7, top_k, top_p, min_p)
    ours = logits / 0.7
    if top_k:
        ours = top_k_filter(ours, top_k)
    if top_p < 1:
        ours = top_p_filter(ours, top_p)
    if min_p > 0:
        ours = min_p_filter(ours, min_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    assert torch.allclose(ours[kept], theirs[kept])


def test_per_row_parameters_equal_one_row_at_a_time() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 2
    k, p, m = torch.tensor([0, 3, 10]), torch.tensor([1.0, 0.9, 0.5]), torch.tensor([0.0, 0.2, 0.05])
    rows = min_p_filter(top_p_filter(top_k_filter(logits, k, max_k=10), p), m)
    for i in range(3):
        one = logits[i:i + 1]
        if k[i]:
            one = top_k_filter(one, int(k[i]))
        one = min_p_filter(top_p_filter(one, float(p[i])), float(m[i]))
        assert torch.equal(rows[i:i + 1], one)


def test_repetition_penalty_and_sampling_rules() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    # top_k=1 and greedy agree; filtered tokens are never drawn
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.0, top_k=1)] * 8
    assert torch.equal(sample(logits, RowParams.of(params, torch.device("cpu")), Flags.of(params)),
                       logits.argmax(-1))
    params = [SamplingParams(temperature=1.5, top_k=3, seed=i) for i in range(8)]
    allowed = logits.topk(3).indices
    for _ in range(20):
        drawn = sample(logits, RowParams.of(params, torch.device("cpu")), Flags.of(params))
        assert (allowed == drawn[:, None]).any(-1).all()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llama) -> None:
    _, model = llama
    engine = Engine(model)
    prompts = _prompts((6, 9))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7, stop_token_ids=[])
    first = engine.generate([prompts[0]], params)[0].tokens
    assert engine.generate([prompts[0]], params)[0].tokens == first
    other = SamplingParams(max_new_tokens=5, temperature=0.8, seed=1, stop_token_ids=[])
    assert engine.generate(prompts, [params, other])[0].tokens == first
    reseeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=8, stop_token_ids=[])
    assert engine.generate([prompts[0]], reseeded)[0].tokens != first


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("temperature", -0.1, "temperature"),
    ("max_new_tokens", 0, "max_new_tokens"), ("top_k", -1, "top_k"), ("min_p", 2.0, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("temperature", float("nan"), "temperature"),
    ("stop", [""], "stop"),
])
def test_bad_sampling_params_are_clear_errors(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_bad_prompts_are_clear_errors(llama) -> None:
    _, model = llama
    engine = Engine(model)  # context: 64 tokens
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[5, 128]], GREEDY)
    with pytest.raises(ValueError, match=r"exceeds the context of 64 tokens.*truncate"):
        engine.generate([list(range(60))], GREEDY)
    # truncation only when asked: keeps the newest tokens
    r = engine.generate([list(range(60))], GREEDY, truncate=True)[0]
    assert r.prompt_ids == list(range(16, 60)) and len(r.tokens) == NEW
    assert r.tokens == engine.generate([list(range(16, 60))], GREEDY)[0].tokens
    with pytest.raises(ValueError, match="max_seq_length"):
        Engine(model, max_seq_length=1)


# ---------------------------------------------------------------------- text: stop strings, streaming, stop tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(tiny):
    from litft.api import LLM

    return LLM.load(tiny["native"], device="cpu")


PROMPTS = ["The cat likes", "Question: what is the capital of France? Answer:", "1 + 1 = 2, 2 * 3 ="]


def test_streaming_pieces_concatenate_to_the_text(llm) -> None:
    params = SamplingParams(max_new_tokens=30, stop_token_ids=[])
    for prompt in PROMPTS:
        request = llm.engine.new_request(llm.encode(prompt), params)
        pieces = list(llm.engine.stream(request))
        assert len(pieces) > 1 and "".join(pieces) == request.text == llm.tokenizer.decode(request.tokens)
        assert llm.engine.generate([llm.encode(prompt)], params)[0].text == request.text


def test_stop_strings_cut_exactly_across_token_boundaries(llm) -> None:
    params = SamplingParams(max_new_tokens=30, stop_token_ids=[])
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        full = llm.engine.generate([ids], params)[0]
        # a stop string that starts inside one token and ends inside a later one
        ends = [len(llm.tokenizer.decode(full.tokens[:i])) for i in range(1, len(full.tokens) + 1)]
        begin = next(e for e in ends if e >= 3) - 1
        stop = full.text[begin:begin + 5]
        assert len(stop) == 5 and any(begin < e < begin + 5 for e in ends)  # it spans a token boundary
        expected = full.text[:full.text.find(stop)]
        sp = SamplingParams(max_new_tokens=30, stop_token_ids=[], stop=["never appears", stop])
        batched = llm.engine.generate([ids, llm.encode("Hello")], sp)[0]
        assert batched.text == expected and batched.finish_reason == "stop"
        request = llm.engine.new_request(ids, sp)
        assert "".join(llm.engine.stream(request)) == expected  # nothing of the stop string was streamed


def test_stop_tokens_end_generation(llm) -> None:
    ids = llm.encode(PROMPTS[0])
    full = llm.engine.generate([ids], SamplingParams(max_new_tokens=30, stop_token_ids=[]))[0]
    stop = full.tokens[6]
    r = llm.engine.generate([ids], SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))[0]
    first = full.tokens.index(stop)
    assert r.tokens == full.tokens[:first] and r.finish_reason == "stop"
    assert r.text == llm.tokenizer.decode(full.tokens[:first])
    # by default the tokenizer's stop tokens (<|end_of_text|>, <|eot_id|>) stop generation
    assert llm.engine.default_stop_ids == frozenset(llm.tokenizer.stop_ids) == {1, 2}


# ---------------------------------------------------------------------- litft generate


def _run_cli(*args: str) -> None:
    from litft.cli import main

    main(["generate", *map(str, args)])


def test_cli_generate_prompt_streams_to_stdout(tiny, llm, capsys) -> None:
    _run_cli(tiny["native"], "--prompt", PROMPTS[0], "--max_new_tokens", "12", "--device", "cpu",
             "--chat_template", "false")
    expected = llm.generate(PROMPTS[0], max_new_tokens=12)
    assert capsys.readouterr().out == expected + "\n"
    _run_cli(tiny["native"], "--prompt", PROMPTS[0], "--max_new_tokens", "12", "--device", "cpu")
    chat = llm.chat([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=12)  # default: the chat template
    assert capsys.readouterr().out == chat + "\n"


def test_cli_generate_file_is_batched_and_resumable(tiny, llm, tmp_path: Path) -> None:
    rows = [{"question": f"Line {n}: {n} plus {n + 1} is"} for n in range(7)]
    rows[3]["question"] = [{"role": "user", "content": "Hello, world!"}]  # chat messages get the template
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "generations.jsonl"
    args = [tiny["native"], "--input", src, "--output", out, "--prompt_field", "question", "--batch_size", "3",
            "--max_new_tokens", "10", "--device", "cpu", "--chat_template", "false", "--stop", '["\\n"]']
    _run_cli(*args)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == list(range(7))  # line numbers, in input order
    for x, row in zip(lines, rows):
        q = row["question"]
        expected = llm.chat(q, max_new_tokens=10, stop="\n") if isinstance(q, list) else \
            llm.generate(q, max_new_tokens=10, stop="\n")
        assert x["generation"] == expected
    # interrupted run: the last two rows missing and a half-written line → only those two are generated
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:5]) + text[5][:10])
    _run_cli(*args)
    assert out.read_text() == "".join(text)
    _run_cli(*args)  # all done: nothing changes
    assert out.read_text() == "".join(text)


def test_cli_generate_text_file_of_prompts(tiny, llm, tmp_path: Path, capsys) -> None:
    """``--input prompts.txt`` (fms-hf-tuning's ``--text_file``): one prompt per line, blank lines skipped, ids = the
    line numbers; resumable like a JSONL input; an empty file is a clear error."""
    src = tmp_path / "prompts.txt"
    src.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\r\n   \n{PROMPTS[2]}")  # blank lines, CRLF, no final newline
    out = tmp_path / "out.jsonl"
    args = [tiny["native"], "--input", src, "--output", out, "--max_new_tokens", "8", "--device", "cpu",
            "--chat_template", "false"]
    _run_cli(*args)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 3, 5]
    assert [r["generation"] for r in rows] == [llm.generate(p, max_new_tokens=8) for p in PROMPTS]
    text = out.read_text()
    out.write_text("".join(text.splitlines(keepends=True)[:1]))  # interrupted after the first row
    _run_cli(*args)
    assert out.read_text() == text and "resuming: 1 of 3 rows" in capsys.readouterr().err
    src.write_text("\n \n")
    with pytest.raises(SystemExit):
        _run_cli(tiny["native"], "--input", src, "--output", tmp_path / "o.jsonl", "--device", "cpu")
    assert "prompts.txt: no prompts (expected one prompt per line)" in capsys.readouterr().err


def test_cli_generate_quantized(tiny, capsys) -> None:
    """``litft generate --quantize bnb.nf4`` streams what ``LLM.load(quantize="bnb.nf4")`` generates."""
    pytest.importorskip("bitsandbytes")
    from litft.api import LLM

    expected = LLM.load(tiny["native"], device="cpu", quantize="bnb.nf4").generate(PROMPTS[1], max_new_tokens=12)
    _run_cli(tiny["native"], "--prompt", PROMPTS[1], "--max_new_tokens", "12", "--device", "cpu",
             "--chat_template", "false", "--quantize", "bnb.nf4")
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_bad_input_is_a_clear_error(tiny, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(SystemExit):
        _run_cli(tiny["native"], "--input", src, "--output", tmp_path / "o.jsonl", "--device", "cpu")
    assert "in.jsonl:2: no 'prompt' field" in capsys.readouterr().err
    src.write_text('{"prompt": ""}\n')
    with pytest.raises(SystemExit):
        _run_cli(tiny["native"], "--input", src, "--output", tmp_path / "o.jsonl", "--device", "cpu")
    assert "in.jsonl:1: the prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run_cli(tiny["native"], "--prompt", "x " * 70, "--device", "cpu", "--max_new_tokens", "10",
                 "--chat_template", "false")
    assert "exceeds the context of 64 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run_cli(tiny["native"], "--prompt", "hi", "--top_p", "0", "--device", "cpu")
    assert "top_p=0.0 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
