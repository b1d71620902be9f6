"""``litft chat`` driven through its stdin: multi-line input, history, /reset, Ctrl-D (end of input), /exit, and
Ctrl-C (SIGINT) during a reply and at the prompt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_generate import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("chat"))


def _chat(checkpoint: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "litft", "chat", str(checkpoint), "--temperature", "0", "--max_new_tokens", "6",
         "--device", "cpu", *args],
        input=stdin, capture_output=True, text=True, encoding="utf-8", cwd=ROOT, env=env, timeout=120,
    )


def test_chat_session_over_stdin(tiny) -> None:
    from litft import LLM

    llm = LLM.load(tiny["native"], device="cpu")

    def reply(messages: list[dict[str, str]]) -> str:
        return llm.chat(messages, max_new_tokens=6)

    first = [{"role": "user", "content": "Hello,\nworld"}]
    a1 = reply(first)
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "Bye"}]
    a2 = reply(second)
    a3 = reply([{"role": "user", "content": "Hi"}])
    assert a2 != reply([{"role": "user", "content": "Bye"}])  # so the history really matters

    done = _chat(tiny["native"], "Hello,\\\nworld\nBye\n/reset\nHi\n")  # then end of input (Ctrl-D)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f">> .. {a1}\n>> {a2}\n>> >> {a3}\n>> \n"
    assert "(history cleared)" in done.stderr and "dropped" not in done.stderr


def _chat_in_process(checkpoint: Path, stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    import io

    from litft.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        main(["chat", str(checkpoint), "--temperature", "0", "--max_new_tokens", "6", "--device", "cpu"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exit_command_and_errors(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    import shutil

    from litft import LLM

    a = LLM.load(tiny["native"], device="cpu").chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
    code, out, _ = _chat_in_process(tiny["native"], "\nHi\n/exit\nnever read\n", monkeypatch, capsys)
    assert code == 0 and out == f">> >> {a}\n>> "  # an empty line is skipped; /exit leaves

    plain = tmp_path / "no_template"
    shutil.copytree(tiny["native"], plain)
    config = plain / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    code, _, err = _chat_in_process(plain, "Hi\n", monkeypatch, capsys)
    assert code == 1 and "has no chat template" in err and "Traceback" not in err


def test_a_long_conversation_drops_its_oldest_turns(tiny) -> None:
    from litft import LLM
    from litft.generate.chat import ChatSession
    from litft.generate.sampling import SamplingParams

    llm = LLM.load(tiny["native"], device="cpu")
    session = ChatSession(llm, SamplingParams(max_new_tokens=6), system="S")
    text = "Hi"
    for _ in range(3):
        reply = "".join(session.send(text))
    assert session.dropped >= 2 and session.messages[0] == {"role": "system", "content": "S"}
    assert reply == llm.chat(session.messages[:-1], max_new_tokens=6)  # the reply saw the trimmed history
    assert len(llm.encode_chat(session.messages[:-1])) <= 64 - 6
    with pytest.raises(ValueError, match="more than the 58"):
        "".join(session.send("word " * 60))


@pytest.fixture(scope="module")
def endless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a 4096-token context whose stop tokens are never the greedy choice (their head rows are
    zero, so their logit is 0 while the largest of the 398 others is positive): a reply runs for seconds."""
    import torch

    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("endless")
    model = make_hf_model("llama", root / "hf", overrides={"vocab_size": 400, "bos_token_id": 0,
                                                           "eos_token_id": [1, 2], "max_position_embeddings": 4096})
    with torch.no_grad():
        model.lm_head.weight[[1, 2]] = 0.0
    model.save_pretrained(root / "hf")
    make_bpe_tokenizer(root / "hf")
    return convert_from_hf(root / "hf", root / "native")


def test_ctrl_c_stops_the_reply_then_leaves_at_the_prompt(endless: Path) -> None:
    """SIGINT during a reply stops it and shows the prompt again (the session goes on); SIGINT at the prompt
    leaves with status 0 and no traceback."""
    import signal
    import threading
    import time

    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    # chat starts as from a terminal, where Ctrl-C arrives: a test run started as a background job of a script has
    # SIGINT ignored, and an ignored signal stays ignored in every process it starts
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "litft", "chat", str(endless), "--temperature", "0", "--max_new_tokens", "3000",
             "--device", "cpu"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    finally:
        signal.signal(signal.SIGINT, inherited)
    out, err = bytearray(), bytearray()

    def pump(stream, buffer: bytearray) -> None:
        while chunk := stream.read1(4096):
            buffer.extend(chunk)

    for stream, buffer in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=pump, args=(stream, buffer), daemon=True).start()

    def wait_for(condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert proc.poll() is None or condition(), f"chat exited ({proc.returncode}) before {what}: {err.decode()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {out.decode()!r} {err.decode()}"
            time.sleep(0.02)

    try:
        wait_for(lambda: out.endswith(b">> "), "the prompt")
        proc.stdin.write(b"Tell me everything\n")
        proc.stdin.flush()
        wait_for(lambda: len(out) > 40, "the reply to stream")
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        wait_for(lambda: b"(interrupted)" in err and out.count(b">> ") == 2 and out.endswith(b">> "),
                 "the reply to stop and the prompt to return")
        assert time.monotonic() - sent < 10
        reply = out.decode("utf-8", "replace").split(">> ")[1]
        assert 10 < len(reply.strip()) and reply.endswith("\n")  # part of the reply, then a clean line
        proc.stdin.write(b"/reset\n")  # the session goes on reading messages
        proc.stdin.flush()
        wait_for(lambda: b"(history cleared)" in err and out.count(b">> ") == 3, "the next prompt")
        proc.send_signal(signal.SIGINT)  # at the prompt: leave
        assert proc.wait(30) == 0, err.decode()
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
