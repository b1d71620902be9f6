"""Micro-batches from samples: right padding, or packing whole samples into ``max_seq_length`` rows.

Packing (first-fit, in a seeded shuffled order, done once): a sample is never split; positions
restart at 0 for every sample and ``segment_ids`` number the samples of a row 1..n (0 = padding),
so that the model confines attention to each sample (see :mod:`litft.model`). The sum of token
losses over a packed batch equals the sum over the same samples padded one per row.

:class:`BatchIterator` is deterministic for a seed and resumable: ``state_dict()`` records the epoch
and the number of micro-batches already yielded in it; a fresh iterator given that state yields
exactly the remaining micro-batches.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from litft.data import Sample

IGNORE_INDEX = -100


def pad_batch(samples: Sequence["Sample"], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples to the longest one: ``input_ids`` with ``pad_id``, ``labels`` with -100."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def pack_batch(packs: Sequence[Sequence["Sample"]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pack, padded to the longest pack, with per-sample ``positions`` and ``segment_ids``."""
    length = max(sum(len(s.input_ids) for s in pack) for pack in packs)
    shape = (len(packs), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for row, pack in enumerate(packs):
        start = 0
        for segment, sample in enumerate(pack, start=1):
            n = len(sample.input_ids)
            input_ids[row, start:start + n] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[row, start:start + n] = torch.tensor(sample.labels, dtype=torch.long)
            positions[row, start:start + n] = torch.arange(n)
            segment_ids[row, start:start + n] = segment
            start += n
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "segment_ids": segment_ids}


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing: each item goes into the first bin with room (O(n log n)).

    Returns bins as lists of item indices, in the order bins were opened.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    # segment tree over bins (leaf i = free space of bin i; unopened bins have `capacity`)
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"sample {item} has {length} tokens, more than the packing length {capacity}")
        node = 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        index = node - size
        if index == len(bins):
            bins.append([])
        bins[index].append(item)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


class BatchIterator:
    """Deterministic, resumable micro-batches over samples; iterating once yields (the rest of) one epoch.

    Yields dicts of (B, T) long tensors: ``input_ids`` and ``labels`` (-100 = not trained), plus
    ``positions`` and ``segment_ids`` when packing. Padding batches group ``micro_batch_size``
    samples in a shuffled order that changes every epoch; packing builds its rows once (first-fit
    over a seeded shuffle) and shuffles the rows every epoch.
    """

    def __init__(
        self, samples: Sequence["Sample"], micro_batch_size: int, max_seq_length: int, pad_id: int,
        packing: bool = False, shuffle: bool = True, seed: int = 42,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if not samples:
            raise ValueError("no samples to batch")
        longest = max(len(s) for s in samples)
        if longest > max_seq_length:
            raise ValueError(f"a sample has {longest} tokens, more than max_seq_length={max_seq_length}")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.index = 0  # micro-batches of `epoch` already yielded
        if packing:
            order = list(range(len(samples)))
            if shuffle:
                random.Random(seed).shuffle(order)
            bins = first_fit([len(samples[i].input_ids) for i in order], max_seq_length)
            self.units: list[list[int]] = [[order[i] for i in b] for b in bins]
        else:
            self.units = [[i] for i in range(len(samples))]

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return -(-len(self.units) // self.micro_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The order of the units (samples, or packed rows) in ``epoch``."""
        order = list(range(len(self.units)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(order)
        return order

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of ``epoch`` (a pure function of the samples, the settings and the seed)."""
        return self._collate(self.epoch_order(epoch), index)

    def _collate(self, order: list[int], index: int) -> dict[str, torch.Tensor]:
        picked = order[index * self.micro_batch_size:(index + 1) * self.micro_batch_size]
        if self.packing:
            return pack_batch([[self.samples[i] for i in self.units[u]] for u in picked], self.pad_id)
        return self.pad([self.samples[self.units[u][0]] for u in picked])

    def pad(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """One padded micro-batch of (unpacked) samples."""
        return pad_batch(samples, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.index >= len(self):  # the previous epoch was fully consumed
            self.epoch += 1
            self.index = 0
        epoch = self.epoch
        order = self.epoch_order(epoch)
        while self.epoch == epoch and self.index < len(self):
            batch = self._collate(order, self.index)
            self.index += 1
            yield batch
        if self.epoch == epoch and self.index >= len(self):
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_samples": len(self.samples), "micro_batch_size": self.micro_batch_size,
                "packing": self.packing, "shuffle": self.shuffle, "num_units": len(self.units)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved with different data or batching settings."""
        for key, current in self._fingerprint().items():
            if key in state and state[key] != current:
                raise ValueError(
                    f"cannot resume the data position: it was saved with {key}={state[key]!r}, this run has "
                    f"{key}={current!r} (the dataset or the batching settings changed)"
                )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
