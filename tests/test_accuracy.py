"""``litft evaluate accuracy``: answer extraction and pairing of generations with references."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest

from litft.evaluate.accuracy import accuracy, extract_gsm8k, extract_regex, normalize_whitespace


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the total is $1,234.\n#### 1,234", "1234"),
    ("#### -15", "-15"),
    ("#### 3.50", "3.5"),
    ("The answer is 2,500,000 dollars.", "2500000"),  # no ####: last number
    ("first 3, then -7.25 and finally -12.", "-12"),
    ("a decimal .5 here", "0.5"),
    ("I think 10 but #### 12 is final, not 13", "12"),  # #### wins over the last number
    ("1,000 apples", "1000"),
])
def test_gsm8k_extraction(text: str, expected: str) -> None:
    assert extract_gsm8k(text) == Decimal(expected)


@pytest.mark.parametrize("text", ["", "no digits here", "####", "#### none"])
def test_gsm8k_missing_answer(text: str) -> None:
    assert extract_gsm8k(text) is None


def test_regex_and_exact_helpers() -> None:
    assert normalize_whitespace("  a\n b\t\tc ") == "a b c"
    assert extract_regex("The answer is (B).", re.compile(r"\(([A-D])\)")) == "B"
    assert extract_regex("nothing", re.compile(r"\(([A-D])\)")) is None
    assert extract_regex("x  =   4 2", re.compile(r"= .*")) == "= 4 2"  # whole match without groups


def test_accuracy_gsm8k_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    refs = write_jsonl(tmp_path / "test.jsonl", [
        {"id": "a", "question": "q1", "answer": "...\n#### 1,200"},
        {"id": "b", "question": "q2", "answer": "...\n#### -3"},
        {"id": "c", "question": "q3", "answer": "...\n#### 0.5"},
        {"id": "d", "question": "q4", "answer": "...\n#### 7"},
        {"id": "e", "question": "q5", "answer": "#### 10"},
    ])
    # written in a different order than the references: pairing is by id
    gens = write_jsonl(tmp_path / "generations.jsonl", [
        {"id": "c", "prompt": "q3", "generation": "half is 0.50"},  # decimal, equal by value
        {"id": "a", "prompt": "q1", "generation": "12 * 100 = 1200\n#### 1200"},  # commas dropped
        {"id": "b", "prompt": "q2", "generation": "it drops by 3 so -3"},  # last number, negative
        {"id": "d", "prompt": "q4", "generation": "I do not know"},  # missing answer: wrong
        {"id": "e", "prompt": "q5", "generation": "#### 11"},  # wrong
    ])
    out = tmp_path / "results" / "accuracy.json"
    results = accuracy(generations=gens, references=refs, out=out)
    assert (results["correct"], results["total"], results["no_answer"]) == (3, 5, 1)
    assert results["accuracy"] == pytest.approx(0.6)
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == pytest.approx(0.6)
    assert {e["id"]: e["correct"] for e in saved["examples"]} == {"a": True, "b": True, "c": True, "d": False,
                                                                 "e": False}
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "0.6000" in printed


def test_accuracy_exact_and_regex_by_line_order(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"target": "Paris"}, {"target": "B"}, {"target": "new  york"}])
    gens = write_jsonl(tmp_path / "gens.jsonl", [{"text": " Paris\n"}, {"text": "The answer is (B)"},
                                                 {"text": "New York"}])
    exact = accuracy(generations=gens, references=refs, extract="exact", generation_field="text", answer_field="target")
    assert [e["correct"] for e in exact["examples"]] == [True, False, False]
    regex = accuracy(generations=gens, references=refs, extract="regex", regex=r"\(([A-D])\)|^\s*(\w+)\s*$",
                     generation_field="text", answer_field="target")
    assert [e["correct"] for e in regex["examples"]] == [True, True, False]  # first group that matched
    regex = accuracy(generations=gens, references=refs, extract="regex", regex=r"(\w+)\W*$", generation_field="text",
                     answer_field="target")
    assert [e["correct"] for e in regex["examples"]] == [True, True, False]


def test_accuracy_bad_input(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": 1, "answer": "#### 1"}, {"id": 2, "answer": "#### 2"}])
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": 1, "generation": "1"}])
    with pytest.raises(ValueError, match=r"has 1 rows but .*refs.jsonl has 2"):
        accuracy(generations=short, references=refs)
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": 1, "generation": "1"}, {"id": 3, "generation": "2"}])
    with pytest.raises(ValueError, match=r"other.jsonl:2: id '3' is not in .*references '2' have no generation"):
        accuracy(generations=other, references=refs)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "generation": "1"}, {"id": 1, "generation": "2"}])
    with pytest.raises(ValueError, match=r"dup.jsonl:2: duplicate id '1' \(first at .*dup.jsonl:1\)"):
        accuracy(generations=dup, references=refs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "generation": "1"}\n\n{"id": 2, "generation": "2"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        accuracy(generations=bad, references=refs)
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"id": 1, "output": "1"}, {"id": 2, "output": "2"}])
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: no 'generation' field \(fields: id, output\).*"
                                         r"--generation_field"):
        accuracy(generations=nofield, references=refs)
    with pytest.raises(ValueError, match="--regex"):
        accuracy(generations=short, references=refs, extract="regex")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        accuracy(generations=short, references=refs, extract="regex", regex="(")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        accuracy(generations=tmp_path / "missing.jsonl", references=refs)
    noanswer = write_jsonl(tmp_path / "noanswer.jsonl", [{"id": 1, "answer": "unknown"}, {"id": 2, "answer": "2"}])
    gens = write_jsonl(tmp_path / "gens.jsonl", [{"id": 1, "generation": "1"}, {"id": 2, "generation": "2"}])
    with pytest.raises(ValueError, match=r"noanswer.jsonl:1: no answer found in the reference"):
        accuracy(generations=gens, references=noanswer)


def test_accuracy_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    refs = write_jsonl(tmp_path / "refs.jsonl", [{"answer": "#### 4"}, {"answer": "#### 5"}])
    gens = write_jsonl(tmp_path / "gens.jsonl", [{"generation": "2+2=4"}, {"generation": "6"}])
    out = tmp_path / "acc.json"
    run = subprocess.run([sys.executable, "-m", "litft", "evaluate", "accuracy", "--generations", str(gens),
                          "--references", str(refs), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["accuracy"] == 0.5
    assert "0.5000" in run.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    from litft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "accuracy", "--generations", str(bad), "--references", str(refs)])
    assert exit_info.value.code == 1
    assert f"{bad}:1: malformed JSON" in capsys.readouterr().err


def test_scores_litft_generate_output(tmp_path: Path) -> None:
    """The generations file written by `litft generate --input ... --output ...` is read as it is."""
    from litft.api import LLM
    from litft.generate.cli import generate
    from tests.test_perplexity import make_tiny_llama

    make_tiny_llama(tmp_path / "hf", tmp_path / "native")
    questions = ["The cat runs", "Line 3: 3 plus 4 is", "My friend Anna likes"]
    greedy = LLM.load(tmp_path / "native", device="cpu").generate(questions[0], max_new_tokens=6)
    # the test set: no ids (litft generate numbers rows 0, 1, ...); the first answer is what the model says
    refs = write_jsonl(tmp_path / "test.jsonl", [{"question": q, "answer": a}
                                                 for q, a in zip(questions, [greedy, "7", "the fence."])])
    gens = tmp_path / "generations.jsonl"
    generate(tmp_path / "native", input=refs, output=gens, prompt_field="question", max_new_tokens=6, device="cpu",
             chat_template=False)
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    expected = [" ".join(r["generation"].split()) == " ".join(a.split())
                for r, a in zip(rows, [greedy, "7", "the fence."])]
    assert expected[0]
    results = accuracy(generations=gens, references=refs, extract="exact")
    assert [e["correct"] for e in results["examples"]] == expected
    assert results["accuracy"] == pytest.approx(sum(expected) / 3)
