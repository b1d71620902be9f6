"""The run's prompt format everywhere: a run records in final/ how it rendered its rows, and `litft generate` of that
final/ renders prompts and training-format rows exactly as training did (the token ids of the training sample's
prompt), writing the prompt, the generation and the reference, which `litft evaluate accuracy` scores directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from litft.api import LLM
from litft.data import IGNORE_INDEX, DataArgs, format_prompt, load_datasets
from litft.data.formats import PROMPT_FORMAT_FILE
from litft.tokenizer import Tokenizer
from tests.inprocess_cli import litft

ALPACA = [{"instruction": f"Repeat {w}", "input": "twice" if i % 2 else "", "output": f"{w} {w}"}
          for i, w in enumerate(("cat", "dog", "the fence", "apples"))]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}"},
                      {"role": "assistant", "content": w}]} for w in ("cat", "dog", "the fence", "apples")]


@pytest.fixture(scope="module")
def long_context_llama(tmp_path_factory) -> Path:
    """A tiny Llama with a 512-token context (the Alpaca prompt alone is ~100 fixture-tokenizer tokens)."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    directory = tmp_path_factory.mktemp("llama512")
    make_hf_model("llama-tied", directory / "hf", overrides={"vocab_size": 400, "max_position_embeddings": 512})
    make_bpe_tokenizer(directory / "hf")
    return convert_from_hf(directory / "hf", directory / "native")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _finetune(tmp_path: Path, checkpoint: Path, rows: list[dict], *args: object) -> Path:
    out = tmp_path / "run"
    litft("finetune", "full", checkpoint, "--out_dir", out, "--data.train_path", _jsonl(tmp_path / "train.jsonl", rows),
          "--train.max_steps", 1, "--train.global_batch_size", 2, "--train.micro_batch_size", 2,
          "--data.val_split_fraction", 0, "--eval.final_validation", "false", "--accelerator", "cpu", *args)
    return out / "final"


def _generate(final: Path, rows: list[dict], tmp_path: Path, *args: object) -> list[dict]:
    out = tmp_path / "generations.jsonl"
    litft("generate", final, "--input", _jsonl(tmp_path / "test.jsonl", rows), "--output", out,
          "--max_new_tokens", 4, "--device", "cpu", *args)
    return [json.loads(line) for line in out.read_text().splitlines()]


def _training_prompt_ids(final: Path, rows_file: Path, **data: object) -> list[list[int]]:
    """The prompt part (untrained prefix) of each training sample, as training tokenized it."""
    samples, _, _ = load_datasets(DataArgs(train_path=rows_file, val_split_fraction=0, **data), Tokenizer(final), 256)
    prompts = []
    for s in samples:
        first_target = next(t for t, label in enumerate(s.labels) if label != IGNORE_INDEX)
        prompts.append(s.input_ids[: first_target + 1])
    return prompts


def test_alpaca_run_generates_from_rows_rendered_as_in_training(long_context_llama, tmp_path, capsys):
    final = _finetune(tmp_path, long_context_llama, ALPACA, "--data.format", "alpaca")
    recorded = yaml.safe_load((final / PROMPT_FORMAT_FILE).read_text())
    assert recorded["format"] == "alpaca" and recorded["prompt_style"] == "alpaca"

    generations = _generate(final, ALPACA, tmp_path)  # the training rows themselves: no 'prompt' field
    tokenizer, llm = Tokenizer(final), LLM.load(final, device="cpu")
    for row, generated, prompt_ids in zip(ALPACA, generations,
                                          _training_prompt_ids(final, tmp_path / "train.jsonl", format="alpaca")):
        assert tokenizer.encode(generated["prompt"]) == prompt_ids  # exactly the ids training gave the model
        assert generated["prompt"] == format_prompt(row["instruction"], row["input"])
        assert generated["reference"] == row["output"]
        assert generated["generation"] == llm.generate(generated["prompt"], max_new_tokens=4)

    # a plain --prompt is the instruction of an Alpaca prompt (not wrapped in the chat template); false: as it is
    capsys.readouterr()
    litft("generate", final, "--prompt", "Repeat owl", "--max_new_tokens", 4, "--device", "cpu")
    assert capsys.readouterr().out == llm.generate(format_prompt("Repeat owl"), max_new_tokens=4) + "\n"
    assert llm.format_prompt("Repeat owl") == format_prompt("Repeat owl")
    litft("generate", final, "--prompt", "Repeat owl", "--max_new_tokens", 4, "--device", "cpu",
          "--chat_template", "false")
    assert capsys.readouterr().out == llm.generate("Repeat owl", max_new_tokens=4) + "\n"

    # `litft chat` of this run: each message alone, in the run's prompt format (not the chat template)
    from litft.generate.chat import ChatSession
    from litft.generate.sampling import SamplingParams

    session = ChatSession(llm, SamplingParams(max_new_tokens=4))
    assert "".join(session.send("Repeat owl")) == llm.generate(format_prompt("Repeat owl"), max_new_tokens=4)
    assert "".join(session.send("Repeat cat")) == llm.generate(format_prompt("Repeat cat"), max_new_tokens=4)
    with pytest.raises(ValueError, match="was trained on 'alpaca' rows, which have none"):
        ChatSession(llm, SamplingParams(), system="Be brief.")
    # LLM.chat (and the server's /v1/chat/completions, which encodes with LLM.encode_chat) alike
    assert llm.chat([{"role": "user", "content": "Repeat owl"}], max_new_tokens=4) == \
        llm.generate(format_prompt("Repeat owl"), max_new_tokens=4)
    with pytest.raises(ValueError, match="trained on 'alpaca' rows .* give it one user message"):
        llm.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Repeat owl"}])

    # `litft serve` of this run: a chat completion is the run's rendering of the user message (official client)
    pytest.importorskip("openai")
    from litft.serve.app import create_app
    from tests.test_serve import ThreadServer

    with ThreadServer(create_app(llm, "run", max_batch_size=2, max_queue=4)) as server:
        reply = server.client().chat.completions.create(
            model="run", messages=[{"role": "user", "content": "Repeat owl"}], max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == llm.generate(format_prompt("Repeat owl"), max_new_tokens=4)

    # the file scores directly: its own references
    litft("evaluate", "accuracy", "--generations", tmp_path / "generations.jsonl", "--extract", "exact",
          "--out", tmp_path / "accuracy.json")
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert results["total"] == len(ALPACA) and [e["reference"] for e in results["examples"]] == \
        [row["output"] for row in ALPACA]


def test_chat_run_gives_message_rows_the_chat_template(long_context_llama, tmp_path):
    final = _finetune(tmp_path, long_context_llama, CHAT)
    assert yaml.safe_load((final / PROMPT_FORMAT_FILE).read_text())["format"] == "chat"
    tokenizer = Tokenizer(final)
    generations = _generate(final, CHAT, tmp_path)
    for row, generated in zip(CHAT, generations):
        assert generated["prompt"] == tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)
        assert generated["reference"] == row["messages"][-1]["content"]
    with pytest.raises(ValueError, match="trained on chat messages: use llm.chat"):
        LLM.load(final, device="cpu").format_prompt("hi")
