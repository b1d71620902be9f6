"""Sampling parameters and the logits → next-token step, vectorised over rows that each have their own
parameters (so a continuous batch can mix greedy and sampled requests).

Order of operations (as transformers does it): repetition penalty → temperature → top-k → top-p → min-p →
draw. Temperature 0 means greedy (argmax after the repetition penalty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

Scalar = Union[float, int]


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        max_new_tokens: the most tokens to generate (stop tokens included).
        temperature: 0 = greedy; higher = more random.
        top_k: keep only the ``top_k`` most likely tokens (None or 0 = off).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability sum reaches ``top_p`` (1 = off).
        min_p: drop tokens less likely than ``min_p`` times the most likely one (0 = off).
        repetition_penalty: > 1 discourages tokens already in the prompt or the output (1 = off).
        seed: seed of this request's own random generator (reproducible sampling); None = torch's global RNG.
        stop: strings that end generation; the text is cut right before the first match.
        stop_token_ids: token ids that end generation; None = the tokenizer's stop tokens, [] = none.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its allowed range."""
        def bad(name: str, value: object, expected: str) -> ValueError:
            return ValueError(f"{name}={value!r} is invalid: expected {expected}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise bad("top_k", self.top_k, "None or an integer >= 0 (0 = off)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", self.seed, "None or an integer")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", self.stop, "non-empty strings")
        if self.stop_token_ids is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
                raise bad("stop_token_ids", self.stop_token_ids, "non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------- logits processing


def _per_row(value: Union[Scalar, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """A scalar or a (B,) tensor as a (B, 1) tensor on the logits' device."""
    if isinstance(value, torch.Tensor):
        return value.to(logits.device).reshape(-1, 1)
    return torch.full((logits.shape[0], 1), value, device=logits.device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: Union[float, torch.Tensor]) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens marked in ``seen`` (B, V) by ``penalty``."""
    p = _per_row(penalty, logits).to(logits.dtype)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, top_k: Union[int, torch.Tensor], max_k: Optional[int] = None) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties at the k-th value kept); k <= 0 keeps everything.

    ``max_k`` (the largest k of any row, known on the host) avoids a device sync for per-row tensors.
    """
    vocab = logits.shape[-1]
    k = _per_row(top_k, logits).long()
    if max_k is None:
        max_k = int(k.max())
    max_k = min(max(max_k, 1), vocab)
    values = torch.topk(logits, max_k, dim=-1).values  # (B, max_k), descending
    kth = values.gather(-1, (k.clamp(1, max_k) - 1))
    kth = torch.where(k > 0, kth, float("-inf"))  # rows without top-k keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: Union[float, torch.Tensor]) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most ``1 - top_p``
    (the most likely token is always kept)."""
    p = _per_row(top_p, logits).float()
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: Union[float, torch.Tensor]) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times that of the most likely token."""
    p = _per_row(min_p, logits).float()
    probs = logits.float().softmax(dim=-1)
    remove = probs < p * probs.max(dim=-1, keepdim=True).values
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


@dataclass
class RowParams:
    """Sampling parameters of every row of a batch as (B,) device tensors, plus host-side flags that let
    :func:`sample` skip the filters nobody uses."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    generators: list[Optional[torch.Generator]]

    @classmethod
    def empty(cls, batch_size: int, device: torch.device) -> "RowParams":
        return cls(
            temperature=torch.zeros(batch_size, device=device),
            top_k=torch.zeros(batch_size, dtype=torch.long, device=device),
            top_p=torch.ones(batch_size, device=device),
            min_p=torch.zeros(batch_size, device=device),
            repetition_penalty=torch.ones(batch_size, device=device),
            generators=[None] * batch_size,
        )

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device: torch.device) -> "RowParams":
        rows = cls.empty(len(params), device)
        rows.set(list(range(len(params))), params, device)
        return rows

    def set(self, rows: list[int], params: Sequence[SamplingParams], device: torch.device) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=device)

        def put(t: torch.Tensor, values: list) -> None:
            t.index_copy_(0, idx, torch.tensor(values, dtype=t.dtype, device=device))

        put(self.temperature, [p.temperature for p in params])
        put(self.top_k, [p.top_k or 0 for p in params])
        put(self.top_p, [p.top_p for p in params])
        put(self.min_p, [p.min_p for p in params])
        put(self.repetition_penalty, [p.repetition_penalty for p in params])
        for r, p in zip(rows, params):
            self.generators[r] = None if p.seed is None else torch.Generator(device).manual_seed(p.seed)

    def head(self, n: int) -> "RowParams":
        """The first ``n`` rows (views, no copy)."""
        return RowParams(self.temperature[:n], self.top_k[:n], self.top_p[:n], self.min_p[:n],
                         self.repetition_penalty[:n], self.generators[:n])

    def move(self, moves: Sequence[tuple[int, int]]) -> None:
        """Copy the parameters (and random generator) of row ``src`` to row ``dst`` for every (src, dst)."""
        device = self.temperature.device
        src = torch.tensor([a for a, _ in moves], dtype=torch.long, device=device)
        dst = torch.tensor([b for _, b in moves], dtype=torch.long, device=device)
        for t in (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty):
            t.index_copy_(0, dst, t.index_select(0, src))
        for a, b in moves:
            self.generators[b], self.generators[a] = self.generators[a], None

    def select(self, rows: list[int]) -> "RowParams":
        idx = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        return RowParams(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.min_p[idx],
                         self.repetition_penalty[idx], [self.generators[r] for r in rows])


@dataclass
class Flags:
    """Which parts of sampling any row in use needs (known on the host, so no device sync to decide)."""

    sample: bool = False
    top_k: int = 0  # the largest top_k of any sampled row (0 = none uses it)
    top_p: bool = False
    min_p: bool = False
    repetition_penalty: bool = False
    seeded: bool = False

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> "Flags":
        sampled = [p for p in params if not p.greedy]
        return cls(
            sample=bool(sampled),
            top_k=max([p.top_k or 0 for p in sampled], default=0),
            top_p=any(p.top_p < 1 for p in sampled),
            min_p=any(p.min_p > 0 for p in sampled),
            repetition_penalty=any(p.repetition_penalty != 1 for p in params),
            seeded=any(p.seed is not None for p in sampled),
        )


def sample(logits: torch.Tensor, rows: RowParams, flags: Flags, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token of every row from its logits (B, V): (B,) long, on the logits' device, without host sync."""
    logits = logits.float()
    if flags.repetition_penalty:
        if seen is None:
            raise ValueError("repetition_penalty needs the mask of tokens seen so far")
        logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
    greedy = logits.argmax(dim=-1)
    if not flags.sample:
        return greedy
    scaled = logits / rows.temperature.clamp_min(1e-5).unsqueeze(1)
    if flags.top_k:
        scaled = top_k_filter(scaled, rows.top_k, flags.top_k)
    if flags.top_p:
        scaled = top_p_filter(scaled, rows.top_p)
    if flags.min_p:
        scaled = min_p_filter(scaled, rows.min_p)
    probs = scaled.softmax(dim=-1)
    # exponential race (= Gumbel-max): argmax(p / E) with E ~ Exp(1) draws from p; each seeded row draws its
    # noise from its own generator, so its tokens do not depend on which other requests share the batch
    noise = torch.empty_like(probs).exponential_()
    if flags.seeded:
        for r, g in enumerate(rows.generators):
            if g is not None:
                noise[r].exponential_(generator=g)
    noise.clamp_min_(1e-20)  # never 0/0 for filtered tokens
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(rows.temperature == 0, greedy, sampled)
