"""Training data: files → formatted rows → token ids with prompt masking → padded or packed micro-batches.

``load_datasets(data, tokenizer, max_seq_length)`` returns the train and validation samples and a
:class:`DataStats`; :class:`BatchIterator` turns samples into micro-batches. Formats are described
in :mod:`litft.data.formats`, batching in :mod:`litft.data.collate`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from litft.data.collate import IGNORE_INDEX, BatchIterator, first_fit, pack_batch, pad_batch
from litft.data.formats import (
    FORMATS, PROMPT_STYLES, Segments, chat_messages, chat_segments, detect_format, encode_segments_batch,
    format_prompt, render_segments,
)
from litft.data.loader import Record, read_records, resolve_paths

__all__ = [
    "DataArgs", "Sample", "DataStats", "load_datasets", "encode_record", "BatchIterator", "pad_batch", "pack_batch",
    "first_fit", "format_prompt", "IGNORE_INDEX", "FORMATS",
]


@dataclass
class DataArgs:
    """Where the training data is and how it becomes token ids.

    Args:
        train_path: A .json (list of rows, or one row per line) or .jsonl file; a directory means the
            train.jsonl (or train.json) inside it, plus val.jsonl / validation.jsonl when present.
        val_path: Validation file (or directory with val.jsonl); without one, ``val_split_fraction`` of
            the training rows are held out.
        format: How rows become prompt + response: "alpaca" (instruction/input/output with the Alpaca
            prompt), "instruction" (the same rows with ``prompt_style``; fairseq2 src/tgt rows verbatim),
            "input_output" (input is the prompt as is), "text" (one sequence; ``response_template`` marks
            where the response starts), "template" (``template`` with {{field}} placeholders), "chat"
            (``messages`` rendered with the checkpoint's chat template, assistant turns trained), or "auto"
            (from ``template``/``response_template`` when set, else from the first row's keys).
        template: Formatter template with {{field}} placeholders; the response starts at {{output}}
            (``output_field``), or after ``response_template`` when that is set.
        response_template: Marker in the text ("text" and "template" formats): everything up to and
            including its first occurrence is prompt (not trained).
        text_field: Field holding the whole sequence ("text" format).
        instruction_field: Field holding the instruction ("alpaca"/"instruction" formats).
        input_field: Field holding the input ("input_output"; optional context for "alpaca"/"instruction").
        output_field: Field holding the response.
        messages_field: Field holding the list of {role, content} messages ("chat" format).
        prompt_style: Prompt for "instruction" rows: "alpaca" or "plain" (instruction, blank line, input).
        mask_prompt: Train only on response tokens (prompt tokens get label -100); false trains on all tokens.
        val_split_fraction: Fraction of training rows held out for validation when there is no validation
            file (0 = no validation).
        packing: Pack several samples into each max_seq_length row (attention confined to each sample).
        seed: Seed for the validation split, the packing order and the shuffling.
    """

    train_path: Optional[Path] = None
    val_path: Optional[Path] = None
    format: Literal["auto", "alpaca", "instruction", "input_output", "text", "template", "chat"] = "auto"
    template: Optional[str] = None
    response_template: Optional[str] = None
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    prompt_style: Literal["alpaca", "plain"] = "alpaca"
    mask_prompt: bool = True
    val_split_fraction: float = 0.05
    packing: bool = False
    seed: int = 42


@dataclass
class Sample:
    """Model inputs and targets: ``labels[t]`` is the target for position ``t`` (already shifted; -100 = ignored)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """What loading produced; ``summary()`` is the text the training loop prints."""

    format: str = ""
    train_path: str = ""
    val_path: Optional[str] = None
    max_seq_length: int = 0
    train_rows: int = 0
    val_rows: int = 0
    samples: int = 0  # train + val samples kept
    truncated: int = 0  # samples cut to max_seq_length
    dropped: int = 0  # samples without any trained token (e.g. the prompt fills max_seq_length)
    train_tokens: int = 0
    train_target_tokens: int = 0
    val_tokens: int = 0
    val_target_tokens: int = 0
    longest: int = 0  # longest sample in tokens (after truncation)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        total = self.samples + self.dropped
        val = f"{self.val_rows} validation rows" + (f" from {self.val_path}" if self.val_path else " (held out)")
        lines = [
            f"data: {self.train_rows} training rows from {self.train_path}, {val}; format {self.format!r}",
            f"data: {self.truncated} of {total} samples truncated to max_seq_length={self.max_seq_length}; "
            f"longest sample {self.longest} tokens",
            f"data: {self.train_tokens} training tokens, {self.train_target_tokens} of them trained",
        ]
        if self.dropped:
            lines.append(f"data: {self.dropped} samples dropped: no response token within max_seq_length")
        return "\n".join(lines)


def read_train_val(data: DataArgs, max_seq_length: int) -> tuple[Path, Optional[Path], list[Record], list[Record]]:
    """The train and validation rows (validation: ``data.val_path``, or ``data.val_split_fraction`` of the train
    rows held out with ``data.seed``), after checking the settings every loader shares."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if not 0.0 <= data.val_split_fraction < 1.0:
        raise ValueError(f"data.val_split_fraction must be in [0, 1), got {data.val_split_fraction}")
    train_path, val_path = resolve_paths(data.train_path, data.val_path)
    train_records = read_records(train_path)
    if val_path is not None:
        return train_path, val_path, train_records, read_records(val_path)
    train_records, val_records = split_records(train_records, data.val_split_fraction, data.seed)
    return train_path, val_path, train_records, val_records


def load_datasets(data: DataArgs, tokenizer: Any, max_seq_length: int) -> tuple[list[Sample], list[Sample], DataStats]:
    """Read, format, tokenize, mask and truncate the train and validation data.

    Args:
        data: The data arguments.
        tokenizer: A :class:`litft.tokenizer.Tokenizer` (``encode``, ``eos_id``, ``stop_ids``,
            ``apply_chat_template``).
        max_seq_length: Longest sample in tokens; longer samples are truncated and counted.

    Raises ValueError / FileNotFoundError with the file and line for bad input.
    """
    if data.format not in FORMATS:
        raise ValueError(f"unknown data format {data.format!r}; expected one of {', '.join(FORMATS)}")
    if data.prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt_style {data.prompt_style!r}; expected one of {', '.join(PROMPT_STYLES)}")
    train_path, val_path, train_records, val_records = read_train_val(data, max_seq_length)

    fmt = detect_format(data, train_records[0]) if data.format == "auto" else data.format
    if fmt == "chat":
        check_chat_template(tokenizer)
    stats = DataStats(format=fmt, train_path=str(train_path), val_path=None if val_path is None else str(val_path),
                      max_seq_length=max_seq_length, train_rows=len(train_records), val_rows=len(val_records))
    train = _encode_all(train_records, fmt, data, tokenizer, max_seq_length, stats)
    val = _encode_all(val_records, fmt, data, tokenizer, max_seq_length, stats)
    stats.train_tokens = sum(len(s) for s in train)
    stats.train_target_tokens = sum(n_targets(s) for s in train)
    stats.val_tokens = sum(len(s) for s in val)
    stats.val_target_tokens = sum(n_targets(s) for s in val)
    stats.samples = len(train) + len(val)
    if not train:
        raise ValueError(
            f"{train_path}: no training sample has a response token within max_seq_length={max_seq_length} "
            f"({stats.dropped} dropped)"
        )
    return train, val, stats


def n_targets(sample: Sample) -> int:
    return sum(1 for label in sample.labels if label != IGNORE_INDEX)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    val_index = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_index],
            [r for i, r in enumerate(records) if i in val_index])


def check_chat_template(tokenizer: Any) -> None:
    has = getattr(tokenizer, "has_chat_template", None)
    if has is None:
        has = getattr(tokenizer, "chat_template", None) is not None
    if not has:
        where = getattr(tokenizer, "checkpoint_dir", None)
        raise ValueError(
            "chat data needs a chat template, but the tokenizer"
            + (f" in {where}" if where else "")
            + " has none (chat_template.jinja, or 'chat_template' in tokenizer_config.json); use a checkpoint with "
            "a chat template or another data format (e.g. data.format=template)"
        )


def encode_record(record: Record, fmt: str, data: DataArgs, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of one row (EOS included) and, per token, whether it is trained."""
    return _encode_records([record], fmt, data, tokenizer)[0]


def _encode_records(records: list[Record], fmt: str, data: DataArgs, tokenizer: Any,
                    max_tokens: Optional[int] = None) -> list[tuple[list[int], list[bool]]]:
    """Ids and trained flags of each row; with ``max_tokens``, only the first ``max_tokens`` are exact (a longer row
    is tokenized from a prefix of its text and comes back longer than ``max_tokens``: see encode_segments_batch)."""
    if fmt == "chat":
        rows = [chat_segments(tokenizer, chat_messages(data, record), record) for record in records]
    else:
        rows = [render_segments(fmt, data, record) for record in records]
    encoded = encode_rows(rows, tokenizer, chat=fmt == "chat", max_tokens=max_tokens)
    if not data.mask_prompt:
        encoded = [(ids, [True] * len(ids)) for ids, _ in encoded]
    return encoded


def encode_rows(rows: list[Segments], tokenizer: Any, chat: bool,
                max_tokens: Optional[int] = None) -> list[tuple[list[int], list[bool]]]:
    """Token ids of rendered rows and, per token, whether it is trained; every trained span ends with a stop token.

    ``chat``: the rows were rendered by the chat template, which writes BOS itself when the model wants one (like
    transformers' ``apply_chat_template(tokenize=True)``), and every assistant turn gets a stop token; otherwise the
    tokenizer adds BOS as configured and EOS (trained) ends each row. ``max_tokens``: only the first ``max_tokens``
    ids need be exact (a very long row is tokenized from a prefix of its text: see ``encode_segments_batch``).
    """
    if chat:
        return [_end_turns_with_stop(ids, trained, tokenizer)
                for ids, trained in encode_segments_batch(tokenizer, rows, bos=False, max_tokens=max_tokens)]
    encoded = encode_segments_batch(tokenizer, rows, max_tokens=max_tokens)
    for ids, trained in encoded:
        if not ids or ids[-1] != tokenizer.eos_id:
            ids.append(tokenizer.eos_id)
            trained.append(True)
    return encoded


def _end_turns_with_stop(ids: list[int], trained: list[bool], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Make every trained span (assistant turn) contain a stop token; insert EOS where the template has none."""
    stops = set(getattr(tokenizer, "stop_ids", None) or ()) | {tokenizer.eos_id}
    out_ids: list[int] = []
    out_trained: list[bool] = []
    span_has_stop = False
    for i, (token, is_trained) in enumerate(zip(ids, trained)):
        out_ids.append(token)
        out_trained.append(is_trained)
        if is_trained:
            span_has_stop = span_has_stop or token in stops
            span_ends = i + 1 == len(ids) or not trained[i + 1]
            if span_ends:
                if not span_has_stop:
                    out_ids.append(tokenizer.eos_id)
                    out_trained.append(True)
                span_has_stop = False
    return out_ids, out_trained


def _encode_all(records: list[Record], fmt: str, data: DataArgs, tokenizer: Any, max_seq_length: int,
                stats: DataStats) -> list[Sample]:
    samples = []
    for start in range(0, len(records), 1024):  # in chunks: bounded memory, one parallel encode call per chunk
        # the first max_seq_length + 2 tokens decide the sample (+1 for the shifted labels, +1 for whether that
        # last token ends an assistant turn): a huge row is only tokenized that far
        for ids, trained in _encode_records(records[start:start + 1024], fmt, data, tokenizer, max_seq_length + 2):
            if len(ids) > max_seq_length + 1:  # the model sees ids[:-1]: at most max_seq_length positions
                ids, trained = ids[: max_seq_length + 1], trained[: max_seq_length + 1]
                stats.truncated += 1
            labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], trained[1:])]
            if all(label == IGNORE_INDEX for label in labels):
                stats.dropped += 1
                continue
            stats.longest = max(stats.longest, len(ids) - 1)
            samples.append(Sample(ids[:-1], labels))
    return samples
