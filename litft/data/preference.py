"""Preference pairs: rows → (chosen, rejected) samples sharing a prompt → (2B, T) micro-batches.

Rows are recognised by their keys ``chosen`` and ``rejected`` (TRL's names), in two forms:

- strings: ``{"prompt": str, "chosen": str, "rejected": str}``. Each sequence is the prompt followed directly by
  the completion (as the ``input_output`` SFT format does), EOS appended; the tokenizer adds BOS as configured.
- conversational: ``{"chosen": [messages], "rejected": [messages]}`` with ``{role, content}`` messages, with or
  without a shared ``"prompt": [messages]``. With a prompt list each conversation is ``prompt + chosen`` (resp.
  ``rejected``); without it, the messages that chosen and rejected share from the start are the prompt. What
  follows the prompt must be assistant turns. Conversations are rendered with the checkpoint's chat template;
  the completion starts where the prompt rendered with the generation prompt ends (what the model sees at
  inference), as for the ``chat`` SFT format.

Prompt tokens are never trained (label -100); the completion's tokens and its end-of-turn / EOS token are.

Too long: a sequence longer than ``max_seq_length`` keeps its whole prompt and loses the end of its completion
(counted in :attr:`DataStats.truncated`, as SFT counts truncated samples); a prompt that leaves no room for a
single completion token is refused with the row's ``file:line``.

Batches: :class:`PairBatchIterator` is :class:`~litft.data.collate.BatchIterator` over pairs (same shuffling,
``state_dict`` and step-exact resume); each micro-batch of B pairs holds ``input_ids`` and ``labels`` of shape
(2B, T): rows ``0..B-1`` the chosen sequences, rows ``B..2B-1`` the rejected ones of the same pairs, right
padded. Pairs are never packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from litft.data import DataArgs, DataStats, Sample, check_chat_template, encode_rows, n_targets, read_train_val
from litft.data.collate import IGNORE_INDEX, BatchIterator, pad_batch
from litft.data.formats import Segments, chat_segments, check_messages
from litft.data.loader import Record


@dataclass
class PreferenceSample:
    """A pair: the chosen and the rejected sequence of one prompt (each a :class:`Sample`)."""

    chosen: Sample
    rejected: Sample

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def _field_value(record: Record, name: str) -> Any:
    value = record.data.get(name)
    if value is None:
        keys = ", ".join(sorted(map(str, record.data))) or "none"
        raise ValueError(f"{record.source}: row has no field {name!r}; preference data needs 'chosen' and 'rejected' "
                         f"(and 'prompt' with string completions) (its fields: {keys})")
    return value


def pair_segments(record: Record, tokenizer: Any) -> tuple[Segments, Segments, bool]:
    """The chosen and rejected sequences of a row as prompt/completion segments, and whether they are chat."""
    chosen, rejected = _field_value(record, "chosen"), _field_value(record, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str) or isinstance(chosen, list) != isinstance(rejected, list):
        raise ValueError(f"{record.source}: 'chosen' is a {type(chosen).__name__} but 'rejected' is a "
                         f"{type(rejected).__name__}: both must be strings or both lists of messages")
    if isinstance(chosen, str):
        prompt = _field_value(record, "prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{record.source}: 'prompt' must be a string when 'chosen' and 'rejected' are strings, "
                             f"got {type(prompt).__name__}")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text:
                raise ValueError(f"{record.source}: field {name!r} is empty: a completion needs at least one character")
        return [(prompt, False), (chosen, True)], [(prompt, False), (rejected, True)], False
    if not isinstance(chosen, list):
        raise ValueError(f"{record.source}: 'chosen' and 'rejected' must be strings or lists of messages, got "
                         f"{type(chosen).__name__}")
    prompt_messages, chosen_turns, rejected_turns = _split_conversations(record, chosen, rejected)
    return (_chat_pair_side(tokenizer, prompt_messages, chosen_turns, record),
            _chat_pair_side(tokenizer, prompt_messages, rejected_turns, record), True)


def _split_conversations(record: Record, chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt messages, chosen completion messages, rejected completion messages)."""
    check_messages(chosen, "chosen", record)
    check_messages(rejected, "rejected", record)
    explicit = record.data.get("prompt")
    if explicit is not None:
        prompt = check_messages(explicit, "prompt", record)
    else:  # implicit prompt: the messages both conversations start with
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise ValueError(f"{record.source}: 'chosen' and 'rejected' share no first message and the row has no "
                             f"'prompt': cannot tell the prompt from the completions")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise ValueError(f"{record.source}: field {name!r} has no message after the prompt: the completion is "
                             f"empty")
        roles = {m["role"] for m in turns}
        if roles != {"assistant"}:
            raise ValueError(f"{record.source}: the completion in {name!r} (the messages after the prompt) must be "
                             f"assistant turns, got roles {sorted(roles)}")
    return prompt, chosen, rejected


def _chat_pair_side(tokenizer: Any, prompt: list, completion: list, record: Record) -> Segments:
    """Chat segments of ``prompt + completion`` with only the completion's assistant turns trained."""
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    except Exception as e:  # template errors (raise_exception, bad roles) name the row
        raise ValueError(f"{record.source}: the chat template failed on this prompt: {e}") from None
    segments = chat_segments(tokenizer, prompt + completion, record)
    out: Segments = []
    offset = 0
    for text, trained in segments:
        out.append((text, trained and offset >= len(prompt_text)))
        offset += len(text)
    return out


def _to_sample(ids: list[int], trained: list[bool], max_seq_length: int, record: Record, side: str
               ) -> tuple[Sample, bool]:
    """Inputs/targets of one sequence cut to ``max_seq_length`` positions, and whether it was cut."""
    first = trained.index(True) if True in trained else len(ids)
    if first > max_seq_length:  # the target of the last position max_seq_length - 1 is token max_seq_length
        raise ValueError(f"{record.source}: the prompt of the {side} sequence has {first} tokens, max_seq_length="
                         f"{max_seq_length} leaves no room for a completion token; raise max_seq_length or shorten "
                         f"the prompt")
    cut = len(ids) > max_seq_length + 1
    if cut:
        ids, trained = ids[:max_seq_length + 1], trained[:max_seq_length + 1]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], trained[1:])]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"{record.source}: the {side} completion has no token to train")
    return Sample(ids[:-1], labels), cut


def encode_pairs(records: Sequence[Record], tokenizer: Any, max_seq_length: int,
                 stats: Optional[DataStats] = None) -> list[PreferenceSample]:
    """Tokenize, mask and truncate preference rows (see the module docstring)."""
    pairs = []
    for start in range(0, len(records), 1024):  # in chunks: bounded memory, one parallel encode call per kind
        chunk = records[start:start + 1024]
        rendered = [pair_segments(record, tokenizer) for record in chunk]
        if any(is_chat for _, _, is_chat in rendered):
            check_chat_template(tokenizer)
            if stats is not None:  # how prompts were rendered, recorded in final/ for inference (PromptFormat)
                stats.format = "chat"
        encoded: list[Optional[tuple]] = [None] * len(chunk)
        for chat in (False, True):
            index = [i for i, (_, _, is_chat) in enumerate(rendered) if is_chat == chat]
            rows = [side for i in index for side in rendered[i][:2]]
            sides = encode_rows(rows, tokenizer, chat) if rows else []
            for n, i in enumerate(index):
                encoded[i] = (sides[2 * n], sides[2 * n + 1])
        for record, (chosen, rejected) in zip(chunk, encoded):
            chosen_sample, cut_chosen = _to_sample(*chosen, max_seq_length, record, "chosen")
            rejected_sample, cut_rejected = _to_sample(*rejected, max_seq_length, record, "rejected")
            pair = PreferenceSample(chosen_sample, rejected_sample)
            if stats is not None:
                stats.truncated += int(cut_chosen or cut_rejected)
                stats.longest = max(stats.longest, len(pair))
            pairs.append(pair)
    return pairs


def check_preference_data_args(data: DataArgs) -> None:
    """Refuse the data settings that do not apply to preference pairs (rather than ignoring them)."""
    if data.packing:
        raise ValueError("data.packing cannot be used with a preference objective: pairs are batched padded, "
                         "chosen and rejected side by side (set data.packing=false)")
    if not data.mask_prompt:
        raise ValueError("data.mask_prompt=false cannot be used with a preference objective: prompt tokens are never "
                         "trained")
    if data.format != "auto" or data.template is not None or data.response_template is not None:
        raise ValueError("preference data is recognised by its 'prompt'/'chosen'/'rejected' fields: leave data.format "
                         "at 'auto' and data.template / data.response_template unset")


def load_preference_datasets(data: DataArgs, tokenizer: Any, max_seq_length: int
                             ) -> tuple[list[PreferenceSample], list[PreferenceSample], DataStats]:
    """Read, render, tokenize, mask and truncate the train and validation pairs (file:line in every error)."""
    check_preference_data_args(data)
    train_path, val_path, train_records, val_records = read_train_val(data, max_seq_length)
    # prompts are rendered as the input_output format renders its input, or by the chat template ("chat")
    stats = DataStats(format="input_output", train_path=str(train_path),
                      val_path=None if val_path is None else str(val_path), max_seq_length=max_seq_length,
                      train_rows=len(train_records), val_rows=len(val_records))
    train = encode_pairs(train_records, tokenizer, max_seq_length, stats)
    val = encode_pairs(val_records, tokenizer, max_seq_length, stats)
    stats.samples = len(train) + len(val)
    stats.train_tokens = sum(len(p.chosen) + len(p.rejected) for p in train)
    stats.train_target_tokens = sum(n_targets(p.chosen) + n_targets(p.rejected) for p in train)
    stats.val_tokens = sum(len(p.chosen) + len(p.rejected) for p in val)
    stats.val_target_tokens = sum(n_targets(p.chosen) + n_targets(p.rejected) for p in val)
    return train, val, stats


def pad_pairs(pairs: Sequence[PreferenceSample], pad_id: int) -> dict[str, torch.Tensor]:
    """(2B, T) ``input_ids`` / ``labels``: the chosen sequences, then the rejected ones, right padded."""
    return pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


class PairBatchIterator(BatchIterator):
    """:class:`BatchIterator` over preference pairs: same order, resume and fingerprint; (2B, T) micro-batches."""

    def __init__(self, pairs: Sequence[PreferenceSample], micro_batch_size: int, max_seq_length: int, pad_id: int,
                 shuffle: bool = True, seed: int = 42) -> None:
        if pairs and not isinstance(pairs[0], PreferenceSample):
            raise ValueError("the data are not preference pairs: a preference objective needs rows with 'chosen' and "
                             "'rejected'")
        super().__init__(pairs, micro_batch_size, max_seq_length, pad_id, packing=False, shuffle=shuffle, seed=seed)

    def pad(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return pad_pairs(samples, self.pad_id)

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "pairs": True}
