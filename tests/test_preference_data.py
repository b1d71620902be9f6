"""Preference data: rows → masked (chosen, rejected) samples → (2B, T) micro-batches; transformers is the oracle
for the tokenization and the chat rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from litft.data import DataArgs, load_datasets
from litft.data.collate import IGNORE_INDEX
from litft.data.preference import (
    PairBatchIterator, PreferenceSample, load_preference_datasets, pad_pairs,
)
from tests.test_data import CONVERSATION, oracle, write_jsonl


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures_tokenizers import make_bpe_tokenizer

    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tokenizer(bpe_dir: Path) -> Any:
    from litft.tokenizer import Tokenizer

    return Tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(bpe_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe_dir))


def load(tmp_path: Path, tokenizer: Any, rows: list, max_seq_length: int = 256, **kwargs: Any):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    train, _, stats = load_preference_datasets(DataArgs(train_path=path, val_split_fraction=0.0, **kwargs),
                                               tokenizer, max_seq_length)
    return train, stats


STRING_ROWS = [
    {"prompt": "Question: what is 2 + 3?\nAnswer:", "chosen": " It is 5.", "rejected": " It is 6, I think."},
    {"prompt": "Say hello.", "chosen": " Hello, world!", "rejected": " No."},
]


def test_string_pairs_train_only_the_completions(tmp_path: Path, tokenizer: Any, hf_tokenizer: Any) -> None:
    train, stats = load(tmp_path, tokenizer, STRING_ROWS)
    assert stats.format == "input_output" and stats.train_rows == 2 and stats.truncated == 0
    for row, pair in zip(STRING_ROWS, train):
        for side in ("chosen", "rejected"):
            sample = getattr(pair, side)
            text = row["prompt"] + row[side]
            expected = oracle(hf_tokenizer, text, [(len(row["prompt"]), len(text))], eos_id=tokenizer.eos_id)
            assert (sample.input_ids, sample.labels) == expected
            trained = [label for label in sample.labels if label != IGNORE_INDEX]
            assert tokenizer.decode(trained) == row[side] + tokenizer.decode([tokenizer.eos_id])


PROMPT = CONVERSATION[:4]  # system, user, assistant, user: an assistant turn inside the prompt is never trained
CHOSEN = [{"role": "assistant", "content": "1 + 1 = 2"}]
REJECTED = [{"role": "assistant", "content": "It is 3, obviously."}]


def test_conversational_pairs_with_and_without_a_prompt(tmp_path: Path, tokenizer: Any, hf_tokenizer: Any) -> None:
    explicit, _ = load(tmp_path, tokenizer, [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
    implicit, _ = load(tmp_path, tokenizer, [{"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}])
    assert explicit == implicit
    prompt_text = hf_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    for side, completion in (("chosen", CHOSEN), ("rejected", REJECTED)):
        sample = getattr(explicit[0], side)
        rendered = hf_tokenizer.apply_chat_template(PROMPT + completion, tokenize=False)
        assert rendered.startswith(prompt_text)
        end = rendered.index(completion[0]["content"]) + len(completion[0]["content"]) + len("<|eot_id|>")
        assert (sample.input_ids, sample.labels) == oracle(hf_tokenizer, rendered, [(len(prompt_text), end)],
                                                           special=False)
        trained = [label for label in sample.labels if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == completion[0]["content"] + "<|eot_id|>"


def test_pairs_batch_as_chosen_rows_then_rejected_rows(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"prompt": f"Count to {i}:", "chosen": " 1 2 3" * (i + 1), "rejected": " no"} for i in range(5)]
    train, _ = load(tmp_path, tokenizer, rows)
    batch = pad_pairs(train[:2], pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    for row, sample in enumerate([train[0].chosen, train[1].chosen, train[0].rejected, train[1].rejected]):
        n = len(sample)
        assert batch["input_ids"][row, :n].tolist() == sample.input_ids
        assert batch["labels"][row, :n].tolist() == sample.labels
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == 0).all()


def test_pair_iterator_resumes_step_exactly(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"prompt": f"Item {i}:", "chosen": " good" * (i % 4 + 1), "rejected": " bad"} for i in range(7)]
    train, _ = load(tmp_path, tokenizer, rows)
    full = PairBatchIterator(train, micro_batch_size=2, max_seq_length=256, pad_id=0, seed=3)
    assert len(full) == 4
    epochs = [list(full) for _ in range(2)]
    assert [b["input_ids"].shape[0] for b in epochs[0]] == [4, 4, 4, 2]
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*epochs))  # reshuffled every epoch

    first = PairBatchIterator(train, micro_batch_size=2, max_seq_length=256, pad_id=0, seed=3)
    seen = list(first) + [b for _, b in zip(range(2), first)]  # one epoch and two batches of the next
    state = first.state_dict()
    assert state["pairs"] is True and (state["epoch"], state["index"]) == (1, 2)
    resumed = PairBatchIterator(train, micro_batch_size=2, max_seq_length=256, pad_id=0, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    for a, b in zip(seen + rest, epochs[0] + epochs[1]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert len(seen) + len(rest) == 8
    with pytest.raises(ValueError, match="cannot resume the data position: it was saved with micro_batch_size=2"):
        PairBatchIterator(train, micro_batch_size=3, max_seq_length=256, pad_id=0, seed=3).load_state_dict(state)


def test_long_pairs_keep_the_prompt_and_truncate_the_completions(tmp_path: Path, tokenizer: Any) -> None:
    prompt = "Tell me a long story about a tokenizer."
    rows = [{"prompt": prompt, "chosen": " Once upon a time" * 20, "rejected": " No."}]
    prompt_tokens = len(tokenizer.encode(prompt))
    max_seq_length = prompt_tokens + 5
    train, stats = load(tmp_path, tokenizer, rows, max_seq_length=max_seq_length)
    chosen, rejected = train[0].chosen, train[0].rejected
    assert stats.truncated == 1 and stats.longest == max_seq_length
    assert len(chosen) == max_seq_length and len(rejected) < max_seq_length
    untrained = [label == IGNORE_INDEX for label in chosen.labels]
    assert untrained == [True] * (prompt_tokens - 1) + [False] * (max_seq_length - prompt_tokens + 1)
    full, _ = load(tmp_path, tokenizer, rows, max_seq_length=512)
    assert chosen.input_ids == full[0].chosen.input_ids[:max_seq_length]  # the same tokens, cut at the end
    assert rejected == full[0].rejected

    path = tmp_path / "train.jsonl"
    with pytest.raises(ValueError, match=rf"^{path}:1: the prompt of the chosen sequence has {prompt_tokens} tokens, "
                                         rf"max_seq_length=4 leaves no room for a completion token; raise "
                                         rf"max_seq_length or shorten the prompt$"):
        load(tmp_path, tokenizer, rows, max_seq_length=4)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"},
     r":2: row has no field 'rejected'; preference data needs 'chosen' and 'rejected' \(and 'prompt' with string "
     r"completions\) \(its fields: chosen, prompt\)$"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
     r":2: 'chosen' is a str but 'rejected' is a list: both must be strings or both lists of messages$"),
    ({"prompt": "p", "chosen": "", "rejected": "b"},
     r":2: field 'chosen' is empty: a completion needs at least one character$"),
    ({"chosen": "a", "rejected": "b"}, r":2: row has no field 'prompt'"),
    ({"prompt": PROMPT, "chosen": [], "rejected": REJECTED},
     r":2: 'chosen' must be a non-empty list of \{role, content\} objects$"),
    ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT},
     r":2: field 'rejected' has no message after the prompt: the completion is empty$"),
    ({"prompt": PROMPT[:2], "chosen": CHOSEN + PROMPT[1:2], "rejected": REJECTED},
     r":2: the completion in 'chosen' \(the messages after the prompt\) must be assistant turns, got roles "
     r"\['assistant', 'user'\]$"),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path: Path, tokenizer: Any, row: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [STRING_ROWS[0], row])
    with pytest.raises(ValueError, match=f"^{path}{message}"):
        load_preference_datasets(DataArgs(train_path=path, val_split_fraction=0.0), tokenizer, 256)


def test_sft_rows_and_settings_that_do_not_apply_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Add.", "output": "5"}])
    with pytest.raises(ValueError, match=rf"^{path}:1: row has no field 'chosen'; preference data needs 'chosen' and "
                                         r"'rejected'"):
        load_preference_datasets(DataArgs(train_path=path), tokenizer, 256)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", STRING_ROWS)
    for kwargs, message in (({"packing": True}, "data.packing cannot be used with a preference objective"),
                            ({"mask_prompt": False}, "data.mask_prompt=false cannot be used"),
                            ({"format": "chat"}, "leave data.format at 'auto'")):
        with pytest.raises(ValueError, match=message):
            load_preference_datasets(DataArgs(train_path=pairs, **kwargs), tokenizer, 256)
    sft, _, _ = load_datasets(DataArgs(train_path=path, val_split_fraction=0.0), tokenizer, 256)
    with pytest.raises(ValueError, match="the data are not preference pairs"):
        PairBatchIterator(sft, 1, 256, 0)
    assert isinstance(load(tmp_path, tokenizer, STRING_ROWS)[0][0], PreferenceSample)


def test_validation_split_and_file(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"prompt": f"Item {i}:", "chosen": " good", "rejected": " bad"} for i in range(10)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    train, val, stats = load_preference_datasets(DataArgs(train_path=path, val_split_fraction=0.2), tokenizer, 256)
    assert (len(train), len(val), stats.val_rows) == (8, 2, 2)
    assert stats.train_target_tokens == sum(
        sum(label != IGNORE_INDEX for label in s.labels) for p in train for s in (p.chosen, p.rejected))
