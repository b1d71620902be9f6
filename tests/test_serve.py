"""``litft serve``: the OpenAI-compatible server driven by the official ``openai`` client on a tiny model.

Greedy completions/chat (plain and streamed) equal :meth:`LLM.generate`/:meth:`LLM.chat`; 32 concurrent streaming
clients are batched together and each gets its sequential greedy output; a client that disconnects frees its row
at once; every error has OpenAI's shape and status and the server keeps serving; ``--api_key``/``LITFT_API_KEY``;
SIGTERM drains in-flight requests and exits 0 (real subprocess). Only 127.0.0.1, every wait bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from litft.api import LLM  # noqa: E402
from litft.generate.sampling import SamplingParams  # noqa: E402
from litft.serve.app import create_app  # noqa: E402
from tests.fixtures_tokenizers import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CONTEXT = 2048  # long enough for generations that are still running when a test acts on them
MODEL = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the fixture BPE tokenizer (vocab 400, Llama 3 chat template), context 2048."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("serve")
    make_hf_model("llama", root / "hf", overrides={"vocab_size": 400, "max_position_embeddings": CONTEXT,
                                                   "bos_token_id": 0, "eos_token_id": [1, 2]})
    make_bpe_tokenizer(root / "hf")
    return convert_from_hf(root / "hf", root / "native")


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> LLM:
    """The same model outside the server: the oracle for greedy outputs."""
    return LLM.load(checkpoint, device="cpu")


class ThreadServer:
    """uvicorn serving ``app`` in a thread of this process on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self, **kw: Any) -> "openai.OpenAI":
        return openai.OpenAI(**{"base_url": f"{self.url}/v1", "api_key": "none", "max_retries": 0, "timeout": 60,
                                **kw})

    def metrics(self) -> dict[str, Any]:
        return http_json(self.port, "GET", "/metrics")[1]


def http_json(port: int, method: str, path: str, body: Optional[bytes] = None,
              headers: Optional[dict[str, str]] = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    """The server under test: up to 32 requests decode together, 64 may wait."""
    llm = LLM.load(checkpoint, device="cpu")
    with ThreadServer(create_app(llm, MODEL, max_batch_size=32, max_queue=64)) as s:
        yield s


def assert_error(status: int, body: Any, expected_status: int, param: Optional[str] = None) -> dict[str, Any]:
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


PROMPTS = corpus()[::7][:32]  # 32 different prompts


# ---------------------------------------------------------------------- completions and chat


def test_models_and_health(server: ThreadServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, body = http_json(server.port, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_completions_equal_llm_generate(server: ThreadServer, reference: LLM) -> None:
    client = server.client()
    prompt = PROMPTS[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    expected = reference.engine.generate([reference.encode(prompt)], SamplingParams(max_new_tokens=24))[0]
    assert out.choices[0].text == expected.text == reference.generate(prompt, max_new_tokens=24)
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(reference.encode(prompt))
    assert out.usage.completion_tokens == expected.num_generated
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    # a list of prompts: one choice each, in order
    many = client.completions.create(model=MODEL, prompt=PROMPTS[1:4], max_tokens=12, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == reference.generate(PROMPTS[1:4], max_new_tokens=12)

    # token ids as the prompt
    ids = reference.encode(PROMPTS[4])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == reference.generate(PROMPTS[4], max_new_tokens=10)


def test_stop_strings_and_streaming(server: ThreadServer, reference: LLM) -> None:
    client = server.client()
    prompt = PROMPTS[5]
    full = reference.generate(prompt, max_new_tokens=30)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"pick a prompt whose greedy output is longer: {full!r}"
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == reference.generate(prompt, max_new_tokens=30, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 3, "the text must arrive in several chunks"
    assert "".join(pieces) == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(reference.encode(prompt))


def test_chat_equals_llm_chat(server: ThreadServer, reference: LLM) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    expected = reference.chat(messages, max_new_tokens=20)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(reference.encode_chat(messages))

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    # content as a list of text parts; max_completion_tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world!"}]}]
    by_parts = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=8, temperature=0)
    assert by_parts.choices[0].message.content == reference.chat([{"role": "user", "content": "Hello, world!"}],
                                                                 max_new_tokens=8)


def test_seeded_sampling_is_reproducible(server: ThreadServer, reference: LLM) -> None:
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[6], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b == reference.generate(PROMPTS[6], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234)


# ---------------------------------------------------------------------- continuous batching


def test_32_concurrent_streams_are_batched_and_each_equals_its_greedy_output(server: ThreadServer,
                                                                             reference: LLM) -> None:
    lengths = [16 + (7 * i) % 37 for i in range(32)]  # long enough to overlap while the 32 requests arrive
    expected = [reference.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)]  # one at a time
    before = server.metrics()
    results: list[Optional[str]] = [None] * 32
    errors: list[BaseException] = []
    barrier = threading.Barrier(32, timeout=60)

    def client_thread(i: int) -> None:
        try:
            client = server.client()
            barrier.wait()
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=lengths[i],
                                               temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    assert not errors, errors
    assert results == expected
    after = server.metrics()
    assert after["requests_completed"] - before["requests_completed"] == 32
    assert after["max_active_batch"] >= 16, after  # at least half of the clients really decoded in the same steps
    assert after["batched_steps"] > before["batched_steps"]
    assert after["active_rows"] == 0 and after["queued"] == 0


def test_a_client_that_disconnects_frees_its_row(server: ThreadServer) -> None:
    client = server.client()
    before = server.metrics()
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=1500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert server.metrics()["active_rows"] == 1
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: server.metrics()["active_rows"] == 0, 10, "the row to be freed")
    after = server.metrics()
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["requests_completed"] == before["requests_completed"]

    # a non-streaming request whose client gives up is cancelled too
    short = server.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        short.completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=1500, temperature=0,
                                 extra_body={"ignore_eos": True})
    wait_for(lambda: server.metrics()["requests_cancelled"] == before["requests_cancelled"] + 2, 10,
             "the abandoned request to be cancelled")
    assert server.metrics()["active_rows"] == 0
    assert server.metrics()["requests_completed"] == before["requests_completed"]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[8], max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_full_queue_answers_503_and_the_server_recovers(checkpoint: Path) -> None:
    llm = LLM.load(checkpoint, device="cpu")
    with ThreadServer(create_app(llm, MODEL, max_batch_size=1, max_queue=1)) as s:
        client = s.client()
        long = dict(model=MODEL, temperature=0, stream=True, extra_body={"ignore_eos": True})
        first = client.completions.create(prompt=PROMPTS[0], max_tokens=1500, **long)
        next(iter(first))  # running: holds the only row
        second = client.completions.create(prompt=PROMPTS[1], max_tokens=6, **long)  # waits in the queue
        wait_for(lambda: s.metrics()["queued"] == 1, 10, "the second request to be queued")
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=4)
        assert_error(e.value.status_code, e.value.response.json(), 503)
        assert s.metrics()["requests_rejected"] == 1
        first.close()
        assert len([c for c in second if c.choices and c.choices[0].finish_reason == "length"]) == 1
        out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=4, temperature=0)
        assert out.choices[0].text


@pytest.mark.parametrize("sync_every", [1, 4], ids=["sync-every-step", "sync-every-4-steps-as-on-gpu"])
def test_requests_of_every_length_join_at_the_edge_of_the_cache(checkpoint: Path, reference: LLM,
                                                                 sync_every: int) -> None:
    """A small context makes the KV cache shift often while rows join and leave (max_tokens=1 included)."""
    llm = LLM.load(checkpoint, device="cpu", max_seq_length=48)
    llm.engine.sync_every = sync_every  # accelerators sync every 8 steps: same results, stops noticed later
    prompts = [reference.encode(p)[:40] for p in PROMPTS[:24]]
    lengths = [max(1, 48 - len(ids) - (5 * i) % 11) if i % 4 else 1 for i, ids in enumerate(prompts)]
    expected = [reference.engine.generate([ids], SamplingParams(max_new_tokens=n))[0].text
                for ids, n in zip(prompts, lengths)]
    results: list[Optional[str]] = [None] * len(prompts)
    with ThreadServer(create_app(llm, MODEL, max_batch_size=4, max_queue=64)) as s:
        def run(i: int) -> None:
            out = s.client().completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
            results[i] = out.choices[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = s.metrics()
    assert results == expected
    assert stats["requests_completed"] == len(prompts) and stats["requests_failed"] == 0
    assert stats["max_active_batch"] >= 2
    assert llm.engine.num_shifts > 0  # the cache really shifted under running rows


# ---------------------------------------------------------------------- errors


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hello", **fields}).encode()


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


BAD_REQUESTS = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", json.dumps({"prompt": "Hi"}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    ("/v1/completions", _body(top_p=2), 400, "top_p"),
    ("/v1/completions", _body(top_p=0), 400, "top_p"),
    ("/v1/completions", _body(max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", _body(max_tokens="5"), 400, "max_tokens"),
    ("/v1/completions", _body(max_tokens=2.5), 400, "max_tokens"),
    ("/v1/completions", _body(temperature="hot"), 400, "temperature"),
    ("/v1/completions", _body(temperature=-0.5), 400, "temperature"),
    ("/v1/completions", _body(n=0), 400, "n"),
    ("/v1/completions", _body(stream="yes"), 400, "stream"),
    ("/v1/completions", _body(stop=[""]), 400, "stop"),
    ("/v1/completions", _body(stop=5), 400, "stop"),
    ("/v1/completions", _body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),  # OpenAI allows 4
    ("/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/completions", _body(seed="x"), 400, "seed"),
    ("/v1/completions", _body(seed=2**70), 400, "seed"),
    ("/v1/completions", _body(prompt=["Hi"] * 50, n=2), 400, "prompt"),  # more than max_batch_size + max_queue
    ("/v1/completions", _body(prompt=[]), 400, "prompt"),
    ("/v1/completions", _body(prompt=""), 400, "prompt"),
    ("/v1/completions", _body(prompt=[5, 99999]), 400, "prompt"),
    ("/v1/completions", _body(prompt={"a": 1}), 400, "prompt"),
    ("/v1/completions", _body(logprobs=6), 400, "logprobs"),  # OpenAI allows 5
    ("/v1/completions", _body(logprobs=-1), 400, "logprobs"),
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("/v1/chat/completions", _chat(top_logprobs=2), 400, "top_logprobs"),  # without logprobs: true
    ("/v1/completions", _body(prompt="word " * 3000), 400, "prompt"),  # longer than the context
    ("/v1/completions", _body(max_tokens=CONTEXT), 400, "prompt"),  # prompt + max_tokens > context
    ("/v1/completions", _body(model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("/v1/chat/completions", _chat(messages="Hi"), 400, "messages"),
    ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages"),
    ("/v1/chat/completions", _chat(messages=[{"content": "Hi"}]), 400, "messages"),
    ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "tools"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "word " * 3000}]), 400, "messages"),
    ("/v1/chat/completions", _chat(model="gpt-4"), 404, "model"),
]


def test_every_error_has_openai_shape_and_status_and_the_server_keeps_serving(server: ThreadServer) -> None:
    before = server.metrics()
    for path, body, status, param in BAD_REQUESTS:
        got, payload = http_json(server.port, "POST", path, body)
        error = assert_error(got, payload, status, param)
        if b"word word" in body:
            assert error["code"] == "context_length_exceeded", error
    assert_error(*http_json(server.port, "GET", "/v1/nothing"), 404)
    assert_error(*http_json(server.port, "GET", "/v1/completions"), 405)
    assert_error(*http_json(server.port, "GET", "/v1/models/gpt-4"), 404, "model")

    # the official client raises its typed errors with the body intact
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_p=2)
    assert e.value.body["param"] == "top_p"

    after = server.metrics()
    assert after["requests_submitted"] == before["requests_submitted"]  # nothing bad reached the engine
    assert after["requests_failed"] == 0 and after["active_rows"] == 0
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------- the command: API key and SIGTERM


def _start_cli(checkpoint: Path, *args: str, env: Optional[dict[str, str]] = None,
               model_name: Optional[str] = MODEL) -> tuple[subprocess.Popen, int]:
    name = ["--model_name", model_name] if model_name else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "litft", "serve", str(checkpoint), "--port", "0", *name, "--log_level", "warning",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "LITFT_API_KEY": "", **(env or {})}, start_new_session=True,
    )
    lines: list[str] = []
    port: list[int] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not port and f"http://{HOST}:" in line:
                port.append(int(line.split(f"http://{HOST}:")[1].split("/")[0]))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: bool(port) or proc.poll() is not None, 120, "the server to listen")
        assert port, "".join(lines)
        printed = time.monotonic()
        wait_for(lambda: _health(port[0]), 120, "the server to be ready")
    except BaseException:
        proc.kill()
        raise
    proc.output = lines  # type: ignore[attr-defined]
    proc.ready_after = time.monotonic() - printed  # type: ignore[attr-defined]  # ready line -> /health 200
    return proc, port[0]


def _health(port: int) -> bool:
    try:
        return http_json(port, "GET", "/health")[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def test_cli_api_key_and_graceful_sigterm(checkpoint: Path, reference: LLM) -> None:
    # --shutdown_timeout 2: ample for the short request's 40 tokens, far too little for the long one's ~2,000
    # (a decode step of this tiny model on a CPU runs at ~300 tokens/s at best)
    proc, port = _start_cli(checkpoint, "--max_batch_size", "4", "--shutdown_timeout", "2",
                            env={"LITFT_API_KEY": "s3cret"})
    try:
        url = f"http://{HOST}:{port}/v1"
        assert_error(*http_json(port, "POST", "/v1/completions", _body()), 401)
        assert_error(*http_json(port, "POST", "/v1/completions", b"{bad", {"Authorization": "Bearer nope"}), 401)
        assert http_json(port, "GET", "/health")[0] == 200  # health checks need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]
        out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0)
        assert out.choices[0].text == reference.generate(PROMPTS[3], max_new_tokens=12)

        # SIGTERM while two requests stream: the short one finishes, the one that outlives --shutdown_timeout ends
        # cleanly with finish_reason "abort"; then the process exits 0 and leaves nothing on the port
        extra = {"ignore_eos": True}
        short = iter(client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=40, temperature=0,
                                               stream=True, extra_body=extra))
        long = iter(client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=CONTEXT - 50,
                                              temperature=0, stream=True, extra_body=extra))
        next(short), next(long)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert [c.choices[0].finish_reason for c in short][-1] == "length"
        reasons = [c.choices[0].finish_reason for c in long]
        assert reasons[-1] == "abort" and reasons.count("abort") == 1
        assert 1.5 < time.monotonic() - started < 40
        assert proc.wait(60) == 0, "".join(proc.output)
        assert "Traceback" not in "".join(proc.output), "".join(proc.output)
        with pytest.raises(OSError):
            socket.create_connection((HOST, port), timeout=2).close()
        with socket.socket() as s:  # nothing is left listening on the port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, port))
            s.listen()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_api_key_flag_and_quantized_model(checkpoint: Path) -> None:
    """``--api_key`` on the command line (LITFT_API_KEY unset) guards /v1/*; ``--quantize bnb.nf4`` serves the
    quantized model: greedy completions equal ``LLM.load(quantize="bnb.nf4").generate``."""
    pytest.importorskip("bitsandbytes")
    expected = LLM.load(checkpoint, device="cpu", quantize="bnb.nf4").generate(PROMPTS[3], max_new_tokens=12)
    proc, port = _start_cli(checkpoint, "--api_key", "fl4g", "--quantize", "bnb.nf4", "--max_batch_size", "4",
                            "--device", "cpu")
    try:
        assert_error(*http_json(port, "POST", "/v1/completions", _body()), 401)
        assert_error(*http_json(port, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}), 401)
        url = f"http://{HOST}:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url, api_key="fl4g", max_retries=0, timeout=60)
        out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0)
        assert out.choices[0].text == expected
        assert "no API key" not in "".join(proc.output)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(proc.output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_busy_port_is_a_clear_error(checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "litft", "serve", str(checkpoint), "--port", str(port)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and f"cannot listen on {HOST}:{port}" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------- hardening: body size, stop lists, local paths


def test_up_to_four_stop_sequences_are_accepted(server: ThreadServer, reference: LLM) -> None:
    stops = ["zq1", "zq2", "zq3", "zq4"]  # never generated: the text is the plain greedy one
    out = server.client().completions.create(model=MODEL, prompt=PROMPTS[9], max_tokens=8, temperature=0, stop=stops)
    assert out.choices[0].text == reference.generate(PROMPTS[9], max_new_tokens=8)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                stop=stops + ["zq5"])
    assert e.value.body["param"] == "stop" and "at most 4" in e.value.body["message"]


def _timed_health(port: int) -> float:
    """Seconds /health took to answer 200 (its body holds the status only)."""
    started = time.monotonic()
    status, body = http_json(port, "GET", "/health")
    assert status == 200 and body == {"status": "ok"}, body
    return time.monotonic() - started


def _while_in_flight(port: int, send: Callable[[], Any], timeout: float) -> tuple[Any, list[float], int]:
    """Run ``send`` in a thread and time /health every 0.1 s until it returns (at most ``timeout`` s). Returns what
    ``send`` returned, the /health times and how many of them were answered while ``send`` was still running."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(send())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    times, during = [], 0
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        times.append(_timed_health(port))
        during += thread.is_alive()
        time.sleep(0.1)
    thread.join(max(deadline - time.monotonic(), 0.1))
    assert not thread.is_alive(), f"the request did not end within {timeout} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0], times, during


def test_cli_bounds_request_bodies_and_keeps_health_answering(checkpoint: Path) -> None:
    """20 MB bodies (declared or chunked) get 413 in OpenAI's shape within seconds while /health answers; a body
    just under --max_request_bytes whose prompt is too long for the context is tokenized off the event loop
    (/health answers meanwhile) and gets the usual 400."""
    httpx = pytest.importorskip("httpx")
    limit = 1_000_000
    proc, port = _start_cli(checkpoint, "--max_request_bytes", str(limit), "--max_batch_size", "2")
    url = f"http://{HOST}:{port}/v1/completions"
    try:
        huge = _body(prompt="word " * 4_000_000)  # 20 MB
        assert len(huge) > 20_000_000

        def post(content: Any) -> tuple[int, Any, float]:
            started = time.monotonic()
            r = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=60)
            return r.status_code, r.json(), time.monotonic() - started

        def chunks() -> Any:  # no Content-Length: sent with chunked transfer encoding
            for i in range(0, len(huge), 1 << 16):
                yield huge[i:i + (1 << 16)]

        for content in (huge, chunks()):
            (status, body, seconds), times, _ = _while_in_flight(port, lambda: post(content), 60)
            error = assert_error(status, body, 413)
            assert error["code"] == "request_too_large" and str(limit) in error["message"], error
            assert seconds < 10, f"the 413 took {seconds:.1f} s"
            assert max(times) < 2, times

        # just under the limit: read, tokenized in a worker thread, refused as longer than the context
        text = "word " * ((limit - 200) // 5)
        under = _body(prompt=text)
        assert limit - 300 < len(under) <= limit
        (status, body, seconds), times, during = _while_in_flight(port, lambda: post(under), 120)
        error = assert_error(status, body, 400, "prompt")
        assert error["code"] == "context_length_exceeded", error
        assert during >= 1 and max(times) < 2, (times, during, seconds)

        # the server still serves
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0).choices[0].text
    finally:
        _stop(proc)
    assert "Traceback" not in "".join(proc.output), "".join(proc.output)


def test_cli_docs_need_the_key_and_nothing_shows_the_checkpoint_path(checkpoint: Path) -> None:
    """Without --model_name the model is named after the checkpoint folder; with a key, /docs and /openapi.json
    need it like /v1/*; /health answers without one and shows the status only."""
    proc, port = _start_cli(checkpoint, "--max_batch_size", "2", env={"LITFT_API_KEY": "k3y"}, model_name=None)
    local = {str(checkpoint), str(checkpoint.resolve()), str(checkpoint.parent)}
    key = {"Authorization": "Bearer k3y"}
    try:
        status, body = http_json(port, "GET", "/health")
        assert status == 200 and body == {"status": "ok"}
        for path in ("/docs", "/openapi.json", "/metrics", "/v1/models"):
            assert_error(*http_json(port, "GET", path), 401)
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            try:
                conn.request("GET", path, headers=key)
                response = conn.getresponse()
                text = response.read().decode()
            finally:
                conn.close()
            assert response.status == 200, (path, text)
            assert not any(p in text for p in local), (path, text)
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [checkpoint.name]
        out = client.completions.create(model=checkpoint.name, prompt="Hello", max_tokens=3, temperature=0)
        assert out.model == checkpoint.name
        output = "".join(proc.output)
        assert f"litft serve: {checkpoint.name} on http://{HOST}:{port}/v1" in output, output
    finally:
        _stop(proc)


BROKEN_TEMPLATES = {  # templates that fail while rendering, each in its own way
    "include": '{% include "other.jinja" %}{{ messages[0]["content"] }}',
    "call": "{{ messages[0]['content']() }}",
    "raise": "{{ raise_exception('roles must alternate user/assistant') }}",
}


@pytest.mark.parametrize("kind", sorted(BROKEN_TEMPLATES))
def test_a_chat_template_that_fails_to_render_is_a_400(checkpoint: Path, tmp_path: Path, kind: str) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = BROKEN_TEMPLATES[kind]
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    llm = LLM.load(broken, device="cpu", max_seq_length=64)
    with ThreadServer(create_app(llm, MODEL, max_batch_size=1, max_queue=1)) as s:
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        error = assert_error(e.value.status_code, e.value.response.json(), 400, "messages")
        assert "chat template" in error["message"] and str(tmp_path) not in error["message"], error
        assert "Traceback" not in error["message"]
        if kind == "raise":
            assert "roles must alternate user/assistant" in error["message"], error
        # the server keeps serving
        out = s.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert s.metrics()["requests_failed"] == 0


# ---------------------------------------------------------------------- serving memory and readiness


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0, "".join(proc.output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the RSS from /proc")
def test_cli_defaults_size_the_kv_cache_to_a_budget_and_print_ready_when_ready(checkpoint: Path, tmp_path: Path,
                                                                               reference: LLM) -> None:
    """A model with a 131,072-token context served with the defaults: the KV cache takes the default 1 GiB (the
    old 32 rows x the whole context would take 3 GiB), the ready line says how many tokens it holds, /health
    answers 200 as soon as that line is out, and a request sent while the model loads is answered."""
    import shutil

    import yaml

    long = tmp_path / "long"
    shutil.copytree(checkpoint, long)
    config = yaml.safe_load((long / "model_config.yaml").read_text())
    config["block_size"] = 131072
    (long / "model_config.yaml").write_text(yaml.safe_dump(config))
    per_token = 2 * config["n_layer"] * config["n_query_groups"] * config["head_size"] * 4  # float32
    with socket.socket() as probe:  # a free port, known before the server prints it
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]

    early: list[Any] = []

    def request_while_loading() -> None:  # connects as soon as the port listens, before the model is ready
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                early.append(http_json(port, "POST", "/v1/completions", _body(prompt=PROMPTS[3], max_tokens=8,
                                                                               temperature=0)))
                return
            except ConnectionRefusedError:
                time.sleep(0.01)

    early_thread = threading.Thread(target=request_while_loading, daemon=True)
    early_thread.start()
    proc, _ = _start_cli(long, "--port", str(port))
    try:
        early_thread.join(60)
        assert early and early[0][0] == 200, early
        assert early[0][1]["choices"][0]["text"] == reference.generate(PROMPTS[3], max_new_tokens=8)
        assert proc.ready_after < 1.0, f"/health answered {proc.ready_after:.1f} s after the ready line"
        [line] = [x for x in proc.output if "litft serve:" in x]
        rows = int(line.split(" concurrent requests")[0].rsplit(" ", 1)[1])
        tokens = int(line.split("KV cache of ")[1].split(" ")[0])
        assert "of up to 131072 tokens" in line and "float32" in line, line
        assert tokens == rows * 131072 and tokens * per_token <= 2**30 < (rows + 1) * 131072 * per_token, line
        assert 1 <= rows < 32
        assert _rss_bytes(proc.pid) < 2**30 + 2**30, f"RSS {_rss_bytes(proc.pid) / 2**30:.2f} GiB"
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", max_retries=0, timeout=60)
        out = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=0)
        assert out.choices[0].text == reference.generate(PROMPTS[4], max_new_tokens=8)
    finally:
        _stop(proc)


def test_cli_kv_cache_memory_too_small_for_one_request_is_a_clear_error(checkpoint: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "litft", "serve", str(checkpoint), "--port", "0", "--kv_cache_memory",
                        "0.0001", "--max_seq_length", "2048"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "less than one request of max_seq_length=2048" in r.stderr, r.stderr


# ---------------------------------------------------------------------- logprobs


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4


def test_completion_logprobs_equal_transformers(server: ThreadServer, reference: LLM, checkpoint: Path) -> None:
    from tests.test_api import reference_logprobs

    client = server.client()
    prompts = [PROMPTS[10], PROMPTS[11][:20]]  # ragged, decoded together
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0, logprobs=3)
    for prompt, choice in zip(prompts, out.choices):
        expected = reference.generate(prompt, max_new_tokens=10, logprobs=3)
        ref = reference_logprobs(checkpoint.parent / "hf", reference.encode(prompt), expected.token_ids)
        lp = choice.logprobs
        assert choice.text == expected.text
        assert lp.tokens == [reference.tokenizer.decode([i]) for i in expected.token_ids]
        assert all(_close(v, ref[i, t].item()) for i, (v, t) in enumerate(zip(lp.token_logprobs,
                                                                            expected.token_ids)))
        for i, alternatives in enumerate(lp.top_logprobs):
            assert 1 <= len(alternatives) <= 3
            by_text = {}  # the reference logprob of every id whose text is that alternative
            for token_id, value in enumerate(ref[i].tolist()):
                by_text.setdefault(reference.tokenizer.decode([token_id]), []).append(value)
            assert all(any(_close(v, r) for r in by_text[text]) for text, v in alternatives.items())
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    # streamed: the chunks' logprobs together are the same
    chunks = list(client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=10, temperature=0,
                                            logprobs=3, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == out.choices[0].logprobs.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(out.choices[0].logprobs.token_logprobs,
                                                                               abs=1e-6)
    assert [o for lp in streamed for o in lp.text_offset] == out.choices[0].logprobs.text_offset


def test_chat_logprobs_equal_transformers(server: ThreadServer, reference: LLM, checkpoint: Path) -> None:
    from tests.test_api import assert_logprobs_match, reference_logprobs

    client = server.client()
    messages = [{"role": "user", "content": "Hello, world!"}]
    expected = reference.chat(messages, max_new_tokens=12, logprobs=2)
    ref = reference_logprobs(checkpoint.parent / "hf", reference.encode_chat(messages), expected.token_ids)
    assert_logprobs_match(expected, ref, 2)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.content == expected.text
    assert [c.token for c in content] == [reference.tokenizer.decode([i]) for i in expected.token_ids]
    for i, (item, token_id) in enumerate(zip(content, expected.token_ids)):
        assert _close(item.logprob, ref[i, token_id].item())
        assert bytes(item.bytes).decode("utf-8") == item.token
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(ref[i].topk(2).values.tolist(), abs=1e-4)

    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [item for c in stream if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(s.token, round(s.logprob, 5)) for s in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    # without logprobs, none are sent
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_health_is_503_once_the_server_drains(checkpoint: Path) -> None:
    llm = LLM.load(checkpoint, device="cpu", max_seq_length=64)
    with ThreadServer(create_app(llm, MODEL, max_batch_size=1, max_queue=1)) as s:
        assert http_json(s.port, "GET", "/health") == (200, {"status": "ok"})
        s.app.state.scheduler.drain(30)  # what SIGTERM does first
        assert http_json(s.port, "GET", "/health") == (503, {"status": "stopping"})


def test_an_unexpected_error_is_a_500_without_its_text(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (here: the tokenizer failing in a way nobody planned for) answers 500 in OpenAI's shape; the
    exception's text, which may hold local paths, stays in the server's log."""
    llm = LLM.load(checkpoint, device="cpu", max_seq_length=64)

    def broken(prompt: str) -> list[int]:
        raise RuntimeError(f"cannot read {checkpoint}/secret.bin")

    monkeypatch.setattr(llm, "encode", broken)
    with ThreadServer(create_app(llm, MODEL, max_batch_size=1, max_queue=1)) as s:
        status, body = http_json(s.port, "POST", "/v1/completions", _body(max_tokens=2))
        error = assert_error(status, body, 500)
        assert "secret" not in error["message"] and str(checkpoint) not in error["message"], error
        assert http_json(s.port, "GET", "/health")[0] == 200
