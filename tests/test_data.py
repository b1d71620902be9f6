"""Data: formats → ids/labels with prompt masking, chat assistant spans, truncation, padding/packing, resumable batches."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litft.data import (
    IGNORE_INDEX, BatchIterator, DataArgs, Sample, first_fit, format_prompt, load_datasets, pack_batch, pad_batch,
)

# ---------------------------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def trained_ids(sample: Sample) -> list[int]:
    return [label for label in sample.labels if label != IGNORE_INDEX]


def check_prompt_masking(tokenizer, sample: Sample, prompt: str, response_ids: list[int]) -> None:
    """ids = encode(prompt) + response ids; labels are -100 exactly on prompt positions."""
    prompt_ids = tokenizer.encode(prompt)
    ids = sample.input_ids + [sample.labels[-1]]
    assert ids == prompt_ids + response_ids
    expected = [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids
    assert sample.labels == expected


# ---------------------------------------------------------------------------------------------- batching


def random_samples(lengths: list[int], vocab: int = 64, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for n in lengths:
        ids = [rng.randrange(vocab) for _ in range(n)]
        labels = [IGNORE_INDEX if i < n // 3 else rng.randrange(vocab) for i in range(n)]
        samples.append(Sample(ids, labels))
    return samples


def test_pad_batch_pads_right_with_ignored_labels():
    samples = random_samples([3, 5])
    batch = pad_batch(samples, pad_id=7)
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == samples[0].input_ids + [7, 7]
    assert batch["labels"][0].tolist() == samples[0].labels + [IGNORE_INDEX] * 2
    assert batch["labels"][1].tolist() == samples[1].labels


def test_pack_batch_positions_restart_and_segments():
    samples = random_samples([3, 4, 2])
    batch = pack_batch([samples[:2], samples[2:]], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 2]
    assert batch["segment_ids"][1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert batch["positions"][1].tolist() == [0, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == samples[2].labels + [IGNORE_INDEX] * 5
    assert batch["input_ids"][0].tolist() == samples[0].input_ids + samples[1].input_ids


def test_first_fit_matches_reference_and_never_splits():
    rng = random.Random(1)
    lengths = [rng.randint(1, 32) for _ in range(300)]
    bins = first_fit(lengths, 32)
    reference: list[list[int]] = []  # the textbook O(n * bins) first fit
    free: list[int] = []
    for i, n in enumerate(lengths):
        for b, room in enumerate(free):
            if room >= n:
                reference[b].append(i)
                free[b] -= n
                break
        else:
            reference.append([i])
            free.append(32 - n)
    assert bins == reference
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    with pytest.raises(ValueError, match="more than the packing length"):
        first_fit([5, 40], 32)


# gpt-oss's features: attention sinks (non-zero below), biases, MoE with a router bias and the clamped SwiGLU
SINKS = dict(attn_logit_softcapping=None, final_logit_softcapping=None, post_block_norms=False, attention_sinks=True,
             attention_bias=True, attention_out_bias=True, mlp_bias=True, n_expert=4, n_expert_per_token=2,
             moe_router_bias=True, mlp_activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=0.5)


def tiny_gpt(**overrides):
    from litft.config import Config
    from litft.model import GPT

    # sliding-window + full layers, softcapping: attention masking has to be right on every path
    config = Config(**{**dict(vocab_size=64, block_size=64, n_layer=3, n_embd=32, n_head=4, n_query_groups=2,
                              intermediate_size=48, sliding_window=5, layer_types=["sliding", "full", "sliding"],
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0, post_block_norms=True),
                       **overrides})
    torch.manual_seed(0)
    model = GPT(config)
    model.reset_parameters(std=0.1)
    model.init_buffers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.normal_(std=1.0 if name.endswith("sinks") else 0.1)
    return model.eval()


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) fp32 per-token losses, 0 where the label is -100."""
    logits = model(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    return F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX,
                           reduction="none")


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return token_losses(model, batch).double().sum()


@pytest.mark.parametrize("features", [{}, SINKS], ids=["softcap", "sinks-moe"])
def test_packed_loss_equals_unpacked_loss(features):
    model = tiny_gpt(**features)
    samples = random_samples([7, 12, 3, 9, 15, 5, 11, 2, 8], seed=3)
    with torch.no_grad():
        padded = sum(token_loss_sum(model, b) for b in BatchIterator(samples, 2, 24, pad_id=0, shuffle=False))
        packed_iter = BatchIterator(samples, 2, 24, pad_id=0, packing=True)
        assert any(len(unit) > 1 for unit in packed_iter.units)  # really packed
        assert len(packed_iter) < len(BatchIterator(samples, 2, 24, pad_id=0))
        packed = sum(token_loss_sum(model, b) for b in packed_iter)
        # sample by sample: every packed sample's loss equals its loss alone in a padded batch
        alone = token_losses(model, pad_batch(samples, pad_id=0)).double().sum(1)
        groups = [samples[0:3], samples[3:5], samples[5:9]]
        batch = pack_batch(groups, pad_id=0)
        losses = token_losses(model, batch).double()
        per_sample = [losses[row][batch["segment_ids"][row] == seg].sum()
                      for row, group in enumerate(groups) for seg in range(1, len(group) + 1)]
        # without segment_ids/positions the same packed rows give a different loss: the masking matters
        leaky = token_loss_sum(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    assert abs(packed - padded) < 1e-5, (packed, padded)
    torch.testing.assert_close(torch.stack(per_sample), alone, rtol=0, atol=1e-5)
    assert abs(leaky - alone.sum()) > 1e-2


def test_padding_never_contributes_to_the_loss():
    model = tiny_gpt()
    samples = random_samples([4, 13], seed=5)
    with torch.no_grad():
        together = token_loss_sum(model, pad_batch(samples, pad_id=9))
        alone = sum(token_loss_sum(model, pad_batch([s], pad_id=0)) for s in samples)
        other_pad = token_loss_sum(model, pad_batch(samples, pad_id=33))
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, other_pad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_resumes_with_exactly_the_remaining_batches(packing):
    samples = random_samples([random.Random(i).randint(2, 20) for i in range(37)])

    def run(iterator, n):
        out = []
        for batch in iterator:
            out.append(batch)
            if len(out) == n:
                break
        return out

    reference = BatchIterator(samples, 3, 24, pad_id=0, packing=packing, seed=7)
    epoch0 = list(reference)
    epoch1 = list(reference)
    assert len(epoch0) == len(reference) == len(epoch1)
    assert reference.state_dict()["epoch"] == 2

    for k in (0, 1, 4, len(epoch0) - 1, len(epoch0)):
        first = BatchIterator(samples, 3, 24, pad_id=0, packing=packing, seed=7)
        consumed = run(first, k) if k else []
        state = first.state_dict()
        state = json.loads(json.dumps(state))  # survives a checkpoint round trip
        resumed = BatchIterator(samples, 3, 24, pad_id=0, packing=packing, seed=7)
        resumed.load_state_dict(state)
        rest = list(resumed)
        if k == len(epoch0):  # the epoch was complete: the resumed iterator starts the next one
            rest_expected = epoch1
        else:
            rest_expected = epoch0[k:]
        assert len(consumed) == k
        assert len(rest) == len(rest_expected)
        for got, want in zip(rest, rest_expected):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key])
        assert list(resumed) and resumed.epoch >= 1  # and it goes on with the following epoch


def test_iterator_refuses_a_state_from_other_data():
    a = BatchIterator(random_samples([3] * 10), 2, 8, pad_id=0)
    b = BatchIterator(random_samples([3] * 11), 2, 8, pad_id=0)
    with pytest.raises(ValueError, match="num_samples"):
        b.load_state_dict(a.state_dict())


def test_shuffling_is_deterministic_by_seed_and_changes_per_epoch():
    samples = [Sample([i, i], [i, i]) for i in range(50)]

    def order(seed):
        it = BatchIterator(samples, 5, 4, pad_id=0, seed=seed)
        return [[b["input_ids"][:, 0].tolist() for b in it] for _ in range(2)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    e0, e1 = order(1)
    assert e0 != e1
    assert sorted(sum(e0, [])) == list(range(50)) == sorted(sum(e1, []))
    unshuffled = BatchIterator(samples, 5, 4, pad_id=0, shuffle=False)
    assert sum((b["input_ids"][:, 0].tolist() for b in unshuffled), []) == list(range(50))


def test_iterator_rejects_samples_longer_than_max_seq_length():
    with pytest.raises(ValueError, match="max_seq_length=4"):
        BatchIterator(random_samples([5]), 1, 4, pad_id=0)


# ---------------------------------------------------------------------------------------------- formats
# Oracle: the transformers fast tokenizer of the same checkpoint. A token is trained when its last character
# lies in a response (assistant) span of the rendered text; EOS appended to a response is trained.


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    from tests.fixtures_tokenizers import make_bpe_tokenizer

    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tokenizer(bpe_dir):
    from litft.tokenizer import Tokenizer

    return Tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(bpe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe_dir))


def oracle(hf_tokenizer, text: str, trained_spans: list[tuple[int, int]], eos_id=None, special: bool = True):
    """Expected (input_ids, labels) from HF offsets: a token is trained when its last character is in a span."""
    enc = hf_tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trained = [any(a <= end - 1 < b for a, b in trained_spans) if end > start else False
               for start, end in enc["offset_mapping"]]
    if eos_id is not None:
        ids.append(eos_id)
        trained.append(True)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
    return ids[:-1], labels


def load(tmp_path, tokenizer, rows, max_seq_length=256, name="train.jsonl", **kwargs):
    path = (write_json if name.endswith(".json") else write_jsonl)(tmp_path / name, rows)
    args = DataArgs(train_path=path, val_split_fraction=0.0, **kwargs)
    train, val, stats = load_datasets(args, tokenizer, max_seq_length)
    return train, stats


ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5."},
    {"instruction": "Say hello to the world.", "input": "", "output": "Hello, world!"},
]


def test_alpaca_json_prompt_and_masking(tmp_path, tokenizer, hf_tokenizer):
    train, stats = load(tmp_path, tokenizer, ALPACA_ROWS, name="alpaca.json", format="alpaca")
    assert stats.format == "alpaca" and stats.train_rows == 2 and stats.truncated == 0
    for row, sample in zip(ALPACA_ROWS, train):
        prompt = format_prompt(row["instruction"], row["input"])
        assert prompt.endswith("### Response:\n") and ("### Input:" in prompt) == bool(row["input"])
        text = prompt + row["output"]
        assert (sample.input_ids, sample.labels) == oracle(hf_tokenizer, text, [(len(prompt), len(text))],
                                                           tokenizer.eos_id)
        assert tokenizer.decode(trained_ids(sample)) == row["output"] + tokenizer.decode([tokenizer.eos_id])
        assert sample.input_ids[0] == tokenizer.bos_id


def test_auto_detects_every_format(tmp_path, tokenizer):
    cases = [
        (ALPACA_ROWS, {}, "instruction"),
        ([{"src": "Question: 1+1?\nAnswer:", "tgt": " 2"}], {}, "instruction"),
        ([{"input": "a", "output": "b"}], {}, "input_output"),
        ([{"text": "just text"}], {}, "text"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}], {}, "chat"),
        ([{"output": "x ### Response: y"}], {"response_template": "### Response:", "text_field": "output"}, "text"),
        ([{"a": "x", "output": "y"}], {"template": "A: {{a}} B: {{output}}"}, "template"),
    ]
    for rows, kwargs, expected in cases:
        _, stats = load(tmp_path, tokenizer, rows, **kwargs)
        assert stats.format == expected, (rows, kwargs)
    with pytest.raises(ValueError, match=r"train\.jsonl:1: cannot tell the dataset format.*'question'"):
        load(tmp_path, tokenizer, [{"question": "a", "answer": "b"}])


def test_instruction_jsonl_prompt_styles_and_fairseq2_src_tgt(tmp_path, tokenizer, hf_tokenizer):
    train, _ = load(tmp_path, tokenizer, ALPACA_ROWS, format="instruction", prompt_style="plain")
    prompt = "Add the numbers.\n\n2 and 3\n"
    text = prompt + "The answer is 5."
    assert (train[0].input_ids, train[0].labels) == oracle(hf_tokenizer, text, [(len(prompt), len(text))],
                                                           tokenizer.eos_id)
    rows = [{"src": "Natalia sold clips to 48 friends. How many?\nAnswer:", "tgt": " 48 clips. #### 48"}]
    train, stats = load(tmp_path, tokenizer, rows)  # fairseq2 gsm8k rows: src is the prompt verbatim
    text = rows[0]["src"] + rows[0]["tgt"]
    assert stats.format == "instruction"
    assert (train[0].input_ids, train[0].labels) == oracle(hf_tokenizer, text, [(len(rows[0]["src"]), len(text))],
                                                           tokenizer.eos_id)


def test_input_output_boundary_token_belongs_to_the_response(tmp_path, tokenizer, hf_tokenizer):
    prompt, response = "Question: 2+2? Answer: ", "4"
    # byte-level BPE merges the prompt's trailing space into the response token: encode(prompt) is not a prefix
    assert tokenizer.encode(prompt + response)[: len(tokenizer.encode(prompt))] != tokenizer.encode(prompt)
    train, stats = load(tmp_path, tokenizer, [{"input": prompt, "output": response}])
    assert stats.format == "input_output"
    text = prompt + response
    assert (train[0].input_ids, train[0].labels) == oracle(hf_tokenizer, text, [(len(prompt), len(text))],
                                                           tokenizer.eos_id)
    assert tokenizer.decode(trained_ids(train[0])[:-1]) == " 4"


def test_single_sequence_with_response_template(tmp_path, tokenizer, hf_tokenizer):
    rows = [{"output": "### Input: The cat runs the fence.\n### Response: animal"},
            {"output": "### Input: Prices rose by 3.5%\n### Response: economy ### Response: twice"}]
    train, stats = load(tmp_path, tokenizer, rows, text_field="output", response_template="\n### Response:")
    assert stats.format == "text"
    for row, sample in zip(rows, train):
        text = row["output"]
        cut = text.index("\n### Response:") + len("\n### Response:")  # the first occurrence
        assert (sample.input_ids, sample.labels) == oracle(hf_tokenizer, text, [(cut, len(text))], tokenizer.eos_id)
    bad = rows + [{"output": "### Input: no marker here"}]
    with pytest.raises(ValueError, match=r"train\.jsonl:3: the response template '\\n### Response:' does not occur"):
        load(tmp_path, tokenizer, bad, text_field="output", response_template="\n### Response:")
    # no response template: plain text, every token trained
    train, _ = load(tmp_path, tokenizer, [{"text": "Hello, world!"}])
    assert train[0].labels == tokenizer.encode("Hello, world!")[1:] + [tokenizer.eos_id]


def test_formatter_template(tmp_path, tokenizer, hf_tokenizer):
    rows = [{"Tweet text": "I love the 7th floor", "output": "no complaint", "id": 3}]
    template = "### Text: {{Tweet text}} (id {{ id }})\n\n## Label: {{output}}"
    train, stats = load(tmp_path, tokenizer, rows, template=template)
    prompt = "### Text: I love the 7th floor (id 3)\n\n## Label: "
    text = prompt + "no complaint"
    assert stats.format == "template"
    assert (train[0].input_ids, train[0].labels) == oracle(hf_tokenizer, text, [(len(prompt), len(text))],
                                                           tokenizer.eos_id)
    # fms-hf-tuning style: the template renders the whole row, the response template marks the response
    train, _ = load(tmp_path, tokenizer, rows, template="### Text: {{Tweet text}}\n## Label: {{output}}",
                    response_template="\n## Label:")
    text = "### Text: I love the 7th floor\n## Label: no complaint"
    cut = text.index("\n## Label:") + len("\n## Label:")
    assert (train[0].input_ids, train[0].labels) == oracle(hf_tokenizer, text, [(cut, len(text))], tokenizer.eos_id)
    with pytest.raises(ValueError, match=r"train\.jsonl:2: row has no field 'Tweet text' used by the template"):
        load(tmp_path, tokenizer, rows + [{"text": "x", "output": "y"}], template=template)
    with pytest.raises(ValueError, match=r"no \{\{output\}\} placeholder"):
        load(tmp_path, tokenizer, rows, template="{{Tweet text}}")


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, world! How are you today?"},
    {"role": "assistant", "content": "I'm fine, thanks. And you?"},
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "content": "1 + 1 = 2"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "Once upon a time, there was a little tokenizer."},
]


def test_chat_trains_only_assistant_turns(tmp_path, tokenizer, hf_tokenizer):
    train, stats = load(tmp_path, tokenizer, [{"messages": CONVERSATION}])
    assert stats.format == "chat"
    sample = train[0]
    rendered = hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = sample.input_ids + [sample.labels[-1]]
    assert tokenizer.decode(ids) == rendered  # the sample is exactly the rendered conversation
    assert ids.count(tokenizer.bos_id) == 1  # the template writes BOS; none added twice
    # assistant spans located in the rendered string: content + <|eot_id|>
    spans, position = [], 0
    for message in CONVERSATION:
        if message["role"] == "assistant":
            start = rendered.index(message["content"], position)
            spans.append((start, start + len(message["content"]) + len("<|eot_id|>")))
            assert rendered[spans[-1][1] - len("<|eot_id|>"):spans[-1][1]] == "<|eot_id|>"
            position = spans[-1][1]
    assert (sample.input_ids, sample.labels) == oracle(hf_tokenizer, rendered, spans, special=False)
    # decoded trained runs are exactly the three assistant turns
    runs, current = [], []
    for label in sample.labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    assert runs == [m["content"] + "<|eot_id|>" for m in CONVERSATION if m["role"] == "assistant"]
    # the prompt of each assistant turn is what generation feeds the model
    first_prompt = hf_tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    n = len(hf_tokenizer(first_prompt, add_special_tokens=False)["input_ids"])
    assert sample.labels[: n - 1] == [IGNORE_INDEX] * (n - 1) and sample.labels[n - 1] != IGNORE_INDEX


def test_chat_with_sentencepiece_llama2_template(tmp_path):
    from transformers import AutoTokenizer

    from litft.tokenizer import Tokenizer
    from tests.fixtures_tokenizers import make_sentencepiece_tokenizer

    directory = make_sentencepiece_tokenizer(tmp_path / "sp")
    tokenizer, hf = Tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    conversation = [m for m in CONVERSATION if m["role"] != "system"]
    train, _ = load(tmp_path, tokenizer, [{"messages": conversation}])
    rendered = hf.apply_chat_template(conversation, tokenize=False)
    # an assistant turn runs from the end of the generation prompt before it to the end of the text rendered with it
    spans = [(len(hf.apply_chat_template(conversation[:i], add_generation_prompt=True, tokenize=False)),
              len(hf.apply_chat_template(conversation[: i + 1], tokenize=False)))
             for i, m in enumerate(conversation) if m["role"] == "assistant"]
    for (start, end), message in zip(spans, conversation[1::2]):
        assert message["content"] + " </s>" in rendered[start:end]
    assert (train[0].input_ids, train[0].labels) == oracle(hf, rendered, spans, special=False)
    assert sum(label == tokenizer.eos_id for label in train[0].labels) == 3


def test_mask_prompt_false_trains_every_token(tmp_path, tokenizer):
    for rows in (ALPACA_ROWS, [{"messages": CONVERSATION}]):
        masked, _ = load(tmp_path, tokenizer, rows)
        full, _ = load(tmp_path, tokenizer, rows, mask_prompt=False)
        for a, b in zip(masked, full):
            assert a.input_ids == b.input_ids
            assert b.labels == a.input_ids[1:] + [a.labels[-1]]
            assert len(trained_ids(a)) < len(trained_ids(b))


def test_truncation_is_counted(tmp_path, tokenizer):
    rows = [{"input": "Question: ", "output": "word " * 40}, {"input": "Q: ", "output": "short"},
            {"input": "word " * 40, "output": "lost"}]
    train, stats = load(tmp_path, tokenizer, rows, max_seq_length=16)
    assert stats.truncated == 2 and stats.dropped == 1  # the third keeps no response token
    assert len(train) == 2 and max(len(s) for s in train) == 16 == stats.longest
    assert "2 of 3 samples truncated to max_seq_length=16" in stats.summary()
    assert train[0].labels[-1] != IGNORE_INDEX
    with pytest.raises(ValueError, match="no training sample has a response token within max_seq_length=4"):
        load(tmp_path, tokenizer, [rows[2]], max_seq_length=4)


def test_train_val_files_directory_and_split(tmp_path, tokenizer):
    rows = [{"input": f"Line {i}: ", "output": str(i)} for i in range(40)]
    directory = tmp_path / "sft"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", rows[:30])
    write_jsonl(directory / "val.jsonl", rows[30:])
    train, val, stats = load_datasets(DataArgs(train_path=directory), tokenizer, 64)
    assert (len(train), len(val), stats.val_path) == (30, 10, str(directory / "val.jsonl"))
    only = tmp_path / "only.jsonl"
    write_jsonl(only, rows)
    args = DataArgs(train_path=only, val_split_fraction=0.1, seed=1)
    train, val, stats = load_datasets(args, tokenizer, 64)
    assert (len(train), len(val)) == (36, 4)
    again = load_datasets(args, tokenizer, 64)[1]
    other = load_datasets(replace(args, seed=2), tokenizer, 64)[1]
    assert [s.input_ids for s in val] == [s.input_ids for s in again] != [s.input_ids for s in other]


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_errors_name_the_file_and_line(tmp_path, tokenizer, bpe_dir):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: row has no field 'output'"):
        load_datasets(DataArgs(train_path=path), tokenizer, 64)
    path.write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": \n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: malformed JSON line"):
        load_datasets(DataArgs(train_path=path), tokenizer, 64)
    array = tmp_path / "rows.json"
    array.write_text('[\n  {"input": "a", "output": "b"},\n  {"input": "a" "output": "b"}\n]\n')
    with pytest.raises(ValueError, match=r"rows\.json:3: malformed JSON"):
        load_datasets(DataArgs(train_path=array), tokenizer, 64)
    array.write_text('[\n  {"input": "a", "output": "b"},\n  ["not", "an", "object"]\n]\n')
    with pytest.raises(ValueError, match=r"rows\.json:3: expected a JSON object"):
        load_datasets(DataArgs(train_path=array), tokenizer, 64)
    array.write_text('[{"input": "a", "output": ["b"]}]')
    with pytest.raises(ValueError, match=r"rows\.json:1: field 'output' must be a string"):
        load_datasets(DataArgs(train_path=array), tokenizer, 64)
    for empty in ("", "\n\n", "[]"):
        path.write_text(empty)
        with pytest.raises(ValueError, match=r"rows\.jsonl: the dataset is empty"):
            load_datasets(DataArgs(train_path=path), tokenizer, 64)
    with pytest.raises(FileNotFoundError, match=r"data\.train_path '.*missing\.jsonl' does not exist"):
        load_datasets(DataArgs(train_path=tmp_path / "missing.jsonl"), tokenizer, 64)
    with pytest.raises(FileNotFoundError, match="directory without train.jsonl"):
        load_datasets(DataArgs(train_path=tmp_path), tokenizer, 64)
    with pytest.raises(ValueError, match="train_path is not set"):
        load_datasets(DataArgs(), tokenizer, 64)
    write_jsonl(path, ALPACA_ROWS)
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'; expected one of auto, alpaca"):
        load_datasets(DataArgs(train_path=path, format="sharegpt"), tokenizer, 64)  # type: ignore[arg-type]
    write_jsonl(path, [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: message 0 must be an object with 'role' and 'content'"):
        load_datasets(DataArgs(train_path=path, val_split_fraction=0), tokenizer, 64)


def test_chat_roles_are_those_the_server_accepts(tmp_path, tokenizer):
    """A role such as "wizard" trained silently while chat/generate/serve refuse it: refused naming file, line and
    the allowed roles, one definition for both."""
    from litft.generate.chat import check_messages

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION},
                                                 {"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "wizard", "content": "poof"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: message 1 has role 'wizard': expected one of system, "
                                         r"user, assistant, tool"):
        load_datasets(DataArgs(train_path=path, val_split_fraction=0), tokenizer, 256)
    with pytest.raises(ValueError, match=r"role 'wizard' is invalid: expected one of system, user, assistant, tool"):
        check_messages([{"role": "wizard", "content": "poof"}])


def test_chat_data_without_chat_template_is_refused(tmp_path, bpe_dir):
    from litft.tokenizer import Tokenizer
    from tests.fixtures_tokenizers import copy_checkpoint

    bare = copy_checkpoint(bpe_dir, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    rows = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="chat data needs a chat template"):
        load_datasets(DataArgs(train_path=rows), Tokenizer(bare), 64)


def test_chat_template_errors_name_the_row(tmp_path, bpe_dir):
    from litft.tokenizer import Tokenizer
    from tests.fixtures_tokenizers import copy_checkpoint

    odd = copy_checkpoint(bpe_dir, tmp_path / "odd")
    # a template that marks the last message differently: earlier turns are not prefixes of the whole text
    (odd / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the chat template does not render this conversation "
                                         r"incrementally"):
        load_datasets(DataArgs(train_path=rows, val_split_fraction=0), Tokenizer(odd), 256)
    (odd / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the chat template failed.*roles must alternate"):
        load_datasets(DataArgs(train_path=rows, val_split_fraction=0), Tokenizer(odd), 256)


def test_text_files_must_be_utf8_and_a_bom_is_accepted_everywhere(tmp_path, tokenizer):
    """Training data, `generate --input` and `evaluate perplexity` files are read by one helper: a byte that is not
    UTF-8 is an error naming the file, the line and the byte offset; a UTF-8 byte-order mark is dropped alike for
    .jsonl, .json and .txt (a .jsonl with one was refused while .txt accepted it)."""
    from litft.evaluate.perplexity import read_documents
    from litft.generate.cli import _read_input

    rows = [{"text": "caf\u00e9 one", "input": "a", "output": "b"}, {"text": "two", "input": "c", "output": "d"}]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    array = json.dumps(rows, ensure_ascii=False, indent=1).encode()
    text = "first prompt\nsecond caf\u00e9\n".encode()
    readers = {  # what each command reads a file with
        "train.jsonl": lambda p: [s.input_ids for s in load_datasets(DataArgs(train_path=p, val_split_fraction=0,
                                                                              format="input_output"),
                                                                     tokenizer, 64)[0]],
        "train.json": lambda p: [s.input_ids for s in load_datasets(DataArgs(train_path=p, val_split_fraction=0,
                                                                             format="input_output"),
                                                                    tokenizer, 64)[0]],
        "prompts.txt": lambda p: [row[1] for row in _read_input(p, "prompt", "id")],
        "prompts.jsonl": lambda p: [row[1] for row in _read_input(p, "text", "id")],
        "docs.txt": read_documents,
        "docs.jsonl": read_documents,
    }
    contents = {"train.jsonl": jsonl, "train.json": array, "prompts.txt": text, "prompts.jsonl": jsonl,
                "docs.txt": text, "docs.jsonl": jsonl}
    for name, read in readers.items():
        plain, with_bom = tmp_path / "plain" / name, tmp_path / "bom" / name
        for path, data in ((plain, contents[name]), (with_bom, b"\xef\xbb\xbf" + contents[name])):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        assert read(with_bom) == read(plain), name
        assert "\ufeff" not in json.dumps(read(with_bom)), name
        latin1 = tmp_path / "latin1" / name  # "café" as Latin-1 on the second line (the first stays valid)
        latin1.parent.mkdir(exist_ok=True)
        data = contents[name].replace("caf\u00e9".encode(), b"caf\xe9")
        lines = data.split(b"\n")
        bad = next(i for i, line in enumerate(lines) if b"\xe9" in line)
        if bad == 0:  # the \xe9 on the first line: move it to the second
            data = data.replace(b"caf\xe9", b"cafe", 1).replace(b"\n", b"\n\xe9", 1)
            bad = 1
        latin1.write_bytes(data)
        offset = data.index(b"\xe9")
        with pytest.raises(ValueError) as info:
            read(latin1)
        assert str(info.value).startswith(f"{latin1}:{bad + 1}: not UTF-8 text (byte 0xe9 at column ") and \
            f"byte offset {offset}" in str(info.value) and "the file must be UTF-8" in str(info.value), name


def _random_text(rng: random.Random, n: int) -> str:
    """n characters of text with what makes cutting it hard: words, long runs without spaces, whitespace runs,
    digits, punctuation and non-ASCII letters."""
    pieces = ["the", "cat", "tokenizer", " ", "  ", "\n", "\n\n", "1234567", "é", "日本語", "!", "...",
              "supercalifragilisticexpialidocious" * 3, "    ", "\t", "ab" * 20, "Hello,"]
    out, size = [], 0
    while size < n:
        piece = rng.choice(pieces) + rng.choice(["", " "])
        out.append(piece)
        size += len(piece)
    return "".join(out)[:n]


def test_rows_near_the_limit_tokenize_as_if_whole(tmp_path, tokenizer, hf_tokenizer):
    """A row longer than max_seq_length allows is tokenized from a prefix of its text; the sample is still exactly
    the whole row's tokenization truncated (oracle: the transformers tokenizer on the whole text), for rows from
    below the point where the prefix is used to several times beyond it, prompt/response boundaries included."""
    max_seq_length = 24
    rng = random.Random(0)
    rows, expected, truncated = [], [], 0
    for n in [100, 300, 400, 420, 440, 500, 700, 1000, 2500, 6000] * 3:
        prompt, response = _random_text(rng, rng.randrange(0, 120)), _random_text(rng, n)
        rows.append({"input": prompt, "output": response})
        ids, labels = oracle(hf_tokenizer, prompt + response, [(len(prompt), len(prompt) + len(response))],
                             eos_id=tokenizer.eos_id)
        truncated += len(ids) > max_seq_length
        if any(label != IGNORE_INDEX for label in labels[:max_seq_length]):  # (else dropped: all prompt)
            expected.append((ids[:max_seq_length], labels[:max_seq_length]))
    train, stats = load(tmp_path, tokenizer, rows, max_seq_length=max_seq_length, format="input_output")
    assert [(s.input_ids, s.labels) for s in train] == expected
    assert stats.truncated == truncated and len(expected) + stats.dropped == len(rows)

    conversation = [dict(m) for m in CONVERSATION]  # a chat row: one assistant turn far longer than the limit
    conversation[4]["content"] = _random_text(rng, 3000).strip()  # (the template trims)
    train, _ = load(tmp_path, tokenizer, [{"messages": conversation}], max_seq_length=200)
    rendered = hf_tokenizer.apply_chat_template(conversation, tokenize=False)
    spans, position = [], 0
    for message in conversation:
        if message["role"] == "assistant":
            start = rendered.index(message["content"], position)
            position = start + len(message["content"]) + len("<|eot_id|>")
            spans.append((start, position))
    ids, labels = oracle(hf_tokenizer, rendered, spans, special=False)
    assert (train[0].input_ids, train[0].labels) == (ids[:200], labels[:200])


@pytest.mark.timeout(90)
def test_a_huge_row_costs_what_max_seq_length_allows(tmp_path, tokenizer, hf_tokenizer):
    """A multi-MB row (it took 48 s and 4.5 GB tokenized whole) becomes a max_seq_length sample, the first tokens
    of the row, without tokenizing the rest of it."""
    rng = random.Random(1)
    huge = _random_text(rng, 4_000_000)
    rows = [{"input": "Continue this: ", "output": huge}, {"input": "Say hi: ", "output": "hi"}]

    class LongestInput:  # the real tokenizer, recording the longest text it is asked to encode
        longest = 0

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode_batch(self, texts, **kwargs):
            LongestInput.longest = max(LongestInput.longest, *map(len, texts))
            return tokenizer.encode_batch(texts, **kwargs)

    train, stats = load(tmp_path, LongestInput(), rows, max_seq_length=64, format="input_output")
    assert LongestInput.longest < 20_000  # of 4,000,000 characters
    assert stats.truncated == 1 and len(train) == 2 and len(train[0]) == 64 and len(train[1]) < 64
    prompt = "Continue this: "
    ids, labels = oracle(hf_tokenizer, prompt + huge[:5000], [(len(prompt), len(prompt) + 5000)])
    assert (train[0].input_ids, train[0].labels) == (ids[:64], labels[:64])
