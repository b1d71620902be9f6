"""The one generation engine: prefill + decode over a preallocated KV cache, with rows that come and go.

Used by ``litft generate``/``chat``, :class:`litft.LLM`, evaluation and the server.

Layout. The KV cache has ``batch_size`` rows and ``cache_length`` slots. Every decode step writes one slot,
``t``, shared by all rows (the model's 1-D ``input_pos``). A request owns one row; its prompt sits in the
slots just left of ``t`` when it joins (left padding), so rows of different lengths decode together:
each row has its own RoPE ``positions`` (slot - start of the row) and ``segment_ids`` mark its real slots
(1) apart from padding and stale slots (0). When ``t`` reaches the end of the cache the occupied slots are
shifted left; when a longer prompt joins, right. Attention only depends on slot differences within a row,
so shifting never changes results.

Rows in use. A decode step runs on the first ``n`` rows only, ``n`` the smallest *bucket* (1, 2, 4, 8, ...,
``batch_size``) holding every row that decodes, so its cost follows the rows in use while the shapes stay
static (one compiled graph per bucket). Requests take the lowest free rows, and when the rows in use fit a
smaller bucket, those beyond it move down into free rows (their KV cache rows are copied).

Step-wise API (what a continuous-batching scheduler needs)::

    engine.allocate(batch_size, cache_length)
    requests = engine.add([prompt_ids, ...], params)   # prefill joiners into free rows, first token sampled
    engine.step()                                      # one token for every active row, no host sync
    engine.sync()                                      # tokens → host: text, stop tokens/strings, finish
    request.take_text()                                # streamed text since the last call
    request.take_logprobs()                            # with new_request(..., logprobs=k): their TokenLogprobs
    engine.remove(request)                             # free its row

:meth:`Engine.generate` and :meth:`Engine.stream` are built on exactly these calls.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from litft.config import check_token_ids
from litft.generate.sampling import Flags, RowParams, SamplingParams, sample

PAD_ID = 0  # id fed at padding slots: never attended to, any valid id works


@dataclass
class TokenLogprob:
    """A generated token, its log-probability under the model (log-softmax of the model's logits, before
    temperature, filters or penalties) and the ``k`` most likely tokens at its position as (id, logprob) pairs,
    the most likely first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Request:
    """One prompt being (or having been) generated for; results live here."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    logprobs: Optional[int] = None  # record each token's logprob and this many top alternatives (0: none)
    tokens: list[int] = field(default_factory=list)  # generated ids, without a final stop token
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of ``tokens`` (with logprobs)
    text: str = ""  # generated text, cut before a stop string
    finish_reason: Optional[str] = None  # "stop" (stop token or string), "length" (max_new_tokens), "aborted"
    num_generated: int = 0  # tokens sampled and processed, a final stop token included
    row: int = -1
    _dispatched: int = 0  # tokens sampled on the device (may be ahead of num_generated until sync)
    _decoder: Any = None
    _emitted: int = 0
    _logprobs_taken: int = 0
    _start: int = 0  # host copy of the first cache slot of the prompt

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        """Text generated since the last call, holding back a tail that could still become a stop string."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            end -= _stop_prefix_len(self.text, self.params.stop)
        piece = self.text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece

    def take_logprobs(self) -> list[TokenLogprob]:
        """The :class:`TokenLogprob` s of the tokens generated since the last call (empty without logprobs)."""
        new = self.token_logprobs[self._logprobs_taken:]
        self._logprobs_taken = len(self.token_logprobs)
        return new

    def _consume(self, token: int, logprob: Optional[tuple[float, list[tuple[int, float]]]] = None) -> None:
        if self.finished:
            return
        self.num_generated += 1
        if token in self.stop_ids:
            self._finish("stop")
            return
        self.tokens.append(token)
        if logprob is not None:
            self.token_logprobs.append(TokenLogprob(token, logprob[0], logprob[1][:self.logprobs]))
        if self._decoder is not None and self._add_text(self._decoder.add(token)):
            return
        if self.num_generated >= self.params.max_new_tokens:
            self._finish("length")

    def _add_text(self, piece: str) -> bool:
        """Append decoded text; True when it completes a stop string (the text is then cut and finished)."""
        if not piece:
            return False
        old = len(self.text)
        self.text += piece
        return bool(self.params.stop) and self._cut_at_stop(old)

    def _cut_at_stop(self, old: int) -> bool:
        longest = max(len(s) for s in self.params.stop)
        begin = max(0, old - longest + 1)
        hits = [i for i in (self.text.find(s, begin) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self._finish("stop")
        return True

    def _finish(self, reason: str) -> None:
        if self._decoder is not None and reason != "aborted":
            decoder, self._decoder = self._decoder, None
            if self._add_text(decoder.flush()):  # text held back for an incomplete character
                return
        self.finish_reason = reason


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Engine:
    """Batched, streaming generation for a :class:`~litft.model.GPT`.

    Args:
        model: the model (any device/dtype; put into eval mode).
        tokenizer: a :class:`~litft.tokenizer.Tokenizer` for text, stop strings and default stop tokens;
            without one, results hold token ids only.
        max_seq_length: longest prompt + generation allowed; default the model's context (``block_size``, less the
            virtual tokens of a prompt-tuned model).
        compile: compile the decode step with ``torch.compile`` ("reduce-overhead", i.e. CUDA graphs, on CUDA).
        prefill_chunk_size: prefill long prompts this many tokens at a time (bounds attention memory).
        sync_every: decode steps between host syncs in :meth:`generate` when nothing streams; default
            1 on CPU (syncing is free there) and 8 on accelerators.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any = None, max_seq_length: Optional[int] = None,
        compile: bool = False, prefill_chunk_size: int = 2048, sync_every: Optional[int] = None,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        context = self.config.block_size - model.num_virtual_tokens  # prompt tuning's virtual tokens come first
        if max_seq_length is not None and max_seq_length < 2:
            raise ValueError(f"max_seq_length={max_seq_length} is invalid: expected an integer >= 2")
        self.max_seq_length = min(max_seq_length, context) if max_seq_length else context
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size={prefill_chunk_size} is invalid: expected an integer >= 1")
        self.prefill_chunk_size = prefill_chunk_size
        self.device = model.embed.weight.device
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else 8)
        self.compiled = compile
        self._forward: Callable[..., torch.Tensor] = self._decode_logits
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._forward = torch.compile(self._decode_logits, mode=mode, dynamic=False)
        if tokenizer is not None:
            self.default_stop_ids = frozenset(tokenizer.stop_ids)
        else:
            self.default_stop_ids = frozenset(self.config.eos_token_ids)
        self._ids = itertools.count()
        self.batch_size = 0
        self.cache_length = 0
        self.rows: list[Optional[Request]] = []
        self.buckets: list[int] = []
        self.max_rows_in_use = 0  # the most rows that ever decoded together (for tests and the server)
        self.num_row_moves = 0  # rows moved down to decode fewer rows (for tests)
        self.last_step_rows = 0  # rows the last decode step ran on (a bucket; for tests and benchmarks)

    # ------------------------------------------------------------------ allocation

    def allocate(self, batch_size: int, cache_length: int) -> None:
        """(Re)allocate the KV cache and the per-row state; only when no request is active."""
        if any(r is not None for r in self.rows):
            raise RuntimeError("cannot reallocate the KV cache while requests are active")
        if batch_size < 1 or cache_length < 2:
            raise ValueError(f"batch_size={batch_size}, cache_length={cache_length}: expected >= 1 and >= 2")
        dev = self.device
        self.model.set_kv_cache(batch_size, cache_length, dev)
        self.batch_size, self.cache_length = batch_size, cache_length
        self.rows = [None] * batch_size
        self.buckets = sorted({min(2 ** i, batch_size) for i in range(batch_size.bit_length() + 1)})
        if self.compiled:  # one graph per bucket and KV cache shape: let torch.compile keep them all
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        self.t = 0  # the slot the next decode step writes (host copy of self.input_pos)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.active = torch.zeros(batch_size, dtype=torch.long, device=dev)  # rows that decode (device copy)
        self._active_host = [False] * batch_size
        self.segment_ids = torch.zeros(batch_size, cache_length, dtype=torch.long, device=dev)
        self.next_token = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.row_params = RowParams.empty(batch_size, dev)
        self.seen: Optional[torch.Tensor] = None  # (B, V) tokens seen, for the repetition penalty
        # (members, sampled tokens, one token per cache row?, logprobs or None) per prefill or decode step
        self._pending: list[tuple[list[tuple[int, Request]], torch.Tensor, bool, Any]] = []
        self._flags = Flags()
        self.num_shifts = 0  # how often occupied slots were moved (for tests)

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Bytes one token takes in the KV cache: keys and values of every layer, in the model's dtype."""
        cfg = self.config
        return 2 * cfg.n_layer * cfg.n_query_groups * cfg.head_size * self.model.embed.weight.dtype.itemsize

    def kv_cache_rows(self, memory_bytes: int, max_rows: int) -> int:
        """How many rows of ``max_seq_length`` slots a KV cache of at most ``memory_bytes`` holds (at most
        ``max_rows``); ValueError when not even one does."""
        tokens = memory_bytes // self.kv_cache_bytes_per_token
        if tokens < self.max_seq_length:
            raise ValueError(
                f"a KV cache of {memory_bytes / 2**30:.3g} GiB holds {tokens} tokens "
                f"({self.kv_cache_bytes_per_token} bytes each), less than one request of max_seq_length="
                f"{self.max_seq_length}: raise kv_cache_memory or lower max_seq_length")
        return min(max_rows, tokens // self.max_seq_length)

    def warm_up(self) -> None:
        """One prefill and one decode step on a one-token prompt in the allocated cache, so that lazy
        initialisation (kernels, allocator, compiled graphs of the one-row bucket) happens now rather than in the
        first request."""
        if not self.batch_size:
            raise RuntimeError("allocate the KV cache before warming up")
        tokens = min(2, self.max_seq_length - 1)  # a decode step after the prefill, when the context allows one
        request = self.new_request([PAD_ID], SamplingParams(max_new_tokens=tokens, stop_token_ids=[]))
        self.add([request])
        self.step()
        self.remove(request)

    def reserve(self, batch_size: int, cache_length: int) -> None:
        """Make sure the cache has exactly ``batch_size`` rows and at least ``cache_length`` slots."""
        if batch_size == self.batch_size and cache_length <= self.cache_length:
            return
        self.allocate(batch_size, _round_up(cache_length, 64))

    def release(self) -> None:
        """Free the KV cache (e.g. before training the same model)."""
        if any(r is not None for r in self.rows):
            raise RuntimeError("cannot release the KV cache while requests are active")
        self.model.clear_kv_cache()
        self.batch_size = self.cache_length = 0
        self.rows = []

    # ------------------------------------------------------------------ prompts

    def check_prompt(self, ids: Sequence[int], params: SamplingParams, truncate: bool = False) -> list[int]:
        """Validate a prompt's ids against the vocabulary and the context; with ``truncate``, drop its oldest
        tokens (keeping a leading BOS) so that prompt + ``max_new_tokens`` fits."""
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        check_token_ids(ids, self.config.vocab_size, "prompt")
        limit = self.max_seq_length
        need = len(ids) + params.max_new_tokens
        if need > limit:
            room = limit - params.max_new_tokens
            if not truncate or room < 1:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} = {need} exceeds the "
                    f"context of {limit} tokens: shorten the prompt, lower max_new_tokens"
                    + (", or pass truncate=True (--truncate true) to drop the prompt's oldest tokens"
                       if room >= 1 else ""))
            bos = self.tokenizer.bos_id if self.tokenizer is not None else self.config.bos_token_id
            keep_bos = bos is not None and ids[0] == bos
            ids = ([ids[0]] + ids[len(ids) - room + 1:]) if keep_bos and room > 1 else ids[len(ids) - room:]
        return ids

    def new_request(self, ids: Sequence[int], params: SamplingParams, truncate: bool = False,
                    logprobs: Optional[int] = None) -> Request:
        """A validated :class:`Request` (not yet added). With ``logprobs`` (an integer >= 0) it records every
        generated token's log-probability and that many most likely alternatives (``request.token_logprobs``)."""
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= self.config.vocab_size):
            raise ValueError(f"logprobs={logprobs!r} is invalid: expected an integer from 0 to the vocabulary size "
                             f"{self.config.vocab_size}")
        ids = self.check_prompt(ids, params, truncate)
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        decoder = self.tokenizer.incremental_decoder() if self.tokenizer is not None else None
        return Request(next(self._ids), ids, params, stop_ids, logprobs=logprobs, _decoder=decoder)

    # ------------------------------------------------------------------ step-wise API

    def free_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def active_requests(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    @torch.inference_mode()
    def add(self, requests: Sequence[Request]) -> list[Request]:
        """Prefill ``requests`` (made by :meth:`new_request`) together into free rows and sample their first
        token. Needs ``len(requests) <= len(free_rows())``."""
        if not requests:
            return []
        free = self.free_rows()
        if len(requests) > len(free):
            raise RuntimeError(f"{len(requests)} requests but only {len(free)} free rows")
        lengths = [len(r.prompt_ids) for r in requests]
        longest = max(lengths)
        worst = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        if worst > self.cache_length:
            raise ValueError(f"a request needs {worst} cache slots but the cache holds {self.cache_length}")
        self.sync()
        rows = free[:len(requests)]
        if self.t < longest:  # make room left of t for the longest prompt
            if self.active_requests():
                self._shift(longest - self.t)
            else:
                self._set_t(longest)
        logits = self._prefill([r.prompt_ids for r in requests], rows, self.t)
        params = [r.params for r in requests]
        dev = self.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        lens = torch.tensor(lengths, dtype=torch.long, device=dev)
        slots = torch.arange(self.cache_length, device=dev)
        starts = self.t - lens
        self.segment_ids.index_copy_(
            0, idx, ((slots >= starts[:, None]) & (slots < self.t)).long())
        self.start.index_copy_(0, idx, starts)
        self.active.index_fill_(0, idx, 1)
        for row in rows:
            self._active_host[row] = True
        self.row_params.set(rows, params, dev)
        for row, request in zip(rows, requests):
            request.row = row
            request._start = self.t - len(request.prompt_ids)
            self.rows[row] = request
        self._flags = Flags.of([r.params for r in self.active_requests()])
        seen = None
        if self._flags.repetition_penalty:
            if self.seen is None:
                self.seen = torch.zeros(self.batch_size, self.config.vocab_size, dtype=torch.bool, device=dev)
            counts = torch.zeros(len(rows), self.config.vocab_size, dtype=torch.long, device=dev)
            for i, r in enumerate(requests):
                counts[i].index_add_(0, torch.tensor(r.prompt_ids, device=dev),
                                     torch.ones(len(r.prompt_ids), dtype=torch.long, device=dev))
            seen = counts > 0
        first = sample(logits, self.row_params.select(rows), Flags.of(params), seen)
        if self.seen is not None:
            if seen is None:
                seen = torch.zeros(len(rows), self.config.vocab_size, dtype=torch.bool, device=dev)
            self.seen.index_copy_(0, idx, seen.scatter(1, first[:, None], True))
        self.next_token.index_copy_(0, idx, first)
        for r in requests:
            r._dispatched = 1
        members = list(zip(rows, requests))
        self._pending.append((members, first, False, _logprobs(logits, first, members)))
        self.max_rows_in_use = max(self.max_rows_in_use, len(self.active_requests()))
        return list(requests)

    @torch.inference_mode()
    def step(self) -> None:
        """Decode one token for every row that still has tokens to go (no host sync)."""
        live = [(row, r) for row, r in enumerate(self.rows)
                if r is not None and not r.finished and r._dispatched < r.params.max_new_tokens]
        if not live:
            return
        if self.t >= self.cache_length:
            starts = self.start[[row for row, _ in live]].min().item()
            if starts <= 0:
                raise RuntimeError("KV cache full: a request outgrew its max_new_tokens budget")
            self._shift(-starts)
        switch = self.model.rope.long_switch
        if switch is not None and any(self.t - r._start == switch for _, r in live):
            live = self._refresh_long_rope(live, switch)
            if not live:
                return
        live_rows = {row for row, _ in live}
        for row, on in enumerate(self._active_host):
            if on and row not in live_rows:  # out of tokens: its last token awaits the next sync
                self._set_active(row, False)
        live = self._compact(live)
        n = self._bucket(max(row for row, _ in live) + 1)  # decode the first n rows: every live row is there
        self.last_step_rows = n
        self.segment_ids.index_copy_(1, self.input_pos, self.active[:, None])
        positions = ((self.input_pos - self.start[:n]).clamp_min(0) * self.active[:n])[:, None]
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._forward(self.next_token[:n, None], self.input_pos, positions, self.segment_ids[:n])
        seen = self.seen[:n] if self.seen is not None else None
        token = sample(logits, self.row_params.head(n), self._flags, seen)
        self.next_token[:n].copy_(token)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        self.input_pos.add_(1)
        self.t += 1
        for _, r in live:
            r._dispatched += 1
        self._pending.append((live, token, True, _logprobs(logits, token, live)))

    def _bucket(self, rows: int) -> int:
        """The smallest bucket (number of leading rows a decode step runs on) that holds ``rows`` rows."""
        return next(b for b in self.buckets if b >= rows)

    def _compact(self, live: list[tuple[int, Request]]) -> list[tuple[int, Request]]:
        """When the live rows would fit a smaller bucket than the one their highest row needs, move those beyond
        it into free rows below it (all or none; a row whose request awaits removal may block it until then)."""
        target = self._bucket(len(live))
        high = [(row, r) for row, r in live if row >= target]
        if not high:
            return live
        free = [row for row in range(target) if self.rows[row] is None]
        if len(free) < len(high):
            return live
        moves = [(row, dst) for (row, _), dst in zip(high, free)]
        self._move_rows(moves)
        moved = dict(moves)
        return [(moved.get(row, row), r) for row, r in live]

    def _move_rows(self, moves: list[tuple[int, int]]) -> None:
        """Move requests from row ``src`` to the free row ``dst`` for every (src, dst): KV cache rows, slots,
        sampling state. Tokens awaiting the next sync stay attributed by the row they were sampled in."""
        dev = self.device
        src = torch.tensor([a for a, _ in moves], dtype=torch.long, device=dev)
        dst = torch.tensor([b for _, b in moves], dtype=torch.long, device=dev)
        for block in self.model.blocks:
            cache = block.attn.kv_cache
            for buf in (cache.k, cache.v):
                buf.index_copy_(0, dst, buf.index_select(0, src))
        tensors = [self.segment_ids, self.start, self.active, self.next_token]
        if self.seen is not None:
            tensors.append(self.seen)
        for t in tensors:
            t.index_copy_(0, dst, t.index_select(0, src))
        self.active.index_fill_(0, src, 0)
        self.row_params.move(moves)
        for a, b in moves:
            request = self.rows[a]
            self.rows[a], self.rows[b] = None, request
            request.row = b
            self._active_host[b], self._active_host[a] = self._active_host[a], False
        self.num_row_moves += len(moves)

    def _refresh_long_rope(self, live: list[tuple[int, Request]], switch: int) -> list[tuple[int, Request]]:
        """LongRoPE switches to its long factors once a sequence grows past ``switch`` tokens; like
        transformers, recompute the cached keys of every row crossing that point now with the long factors."""
        self.sync()
        live = [(row, r) for row, r in live if not r.finished]
        crossing = [(row, r) for row, r in live if self.t - r._start == switch]
        if crossing:
            # the whole sequence, the token fed next included, so that it is longer than ``switch``
            self._prefill([r.prompt_ids + r.tokens for _, r in crossing], [row for row, _ in crossing], self.t + 1)
        return live

    def _decode_logits(self, idx: torch.Tensor, input_pos: torch.Tensor, positions: torch.Tensor,
                       segment_ids: torch.Tensor) -> torch.Tensor:
        return self.model(idx, input_pos=input_pos, positions=positions, segment_ids=segment_ids)[:, -1].float()

    def sync(self) -> list[Request]:
        """Bring the tokens sampled since the last sync to the host and process them in order (text, stop
        tokens and strings, max_new_tokens). Returns the requests that received tokens."""
        if not self._pending:
            return []
        flat = torch.cat([t.flatten() for _, t, _, _ in self._pending]).tolist()
        touched: dict[int, Request] = {}
        offset = 0
        for members, tokens, by_row, logprobs in self._pending:
            values = flat[offset:offset + tokens.numel()]
            offset += tokens.numel()
            if logprobs is not None:  # (chosen (B,), top values (B, k), top ids (B, k)) to the host
                chosen, top_values, top_ids = (t.tolist() for t in logprobs)
            # decode entries hold one token per cache row, prefill entries one per member
            for i, (row, request) in enumerate(members):
                j = row if by_row else i
                logprob = None
                if logprobs is not None and request.logprobs is not None:
                    logprob = (chosen[j], list(zip(top_ids[j], top_values[j])))
                request._consume(values[j], logprob)
                touched[request.id] = request
        self._pending.clear()
        for r in touched.values():
            if r.finished:
                self._deactivate(r)
        return list(touched.values())

    def remove(self, request: Request) -> None:
        """Free ``request``'s row (finished or not: an unfinished one is marked "aborted")."""
        self.sync()
        if not request.finished:
            request._finish("aborted")
        if 0 <= request.row < len(self.rows) and self.rows[request.row] is request:
            self._deactivate(request)
            self.rows[request.row] = None
            self._flags = Flags.of([r.params for r in self.active_requests()])

    def reset(self) -> None:
        """Drop every request (unfinished ones end "aborted") and start from an empty cache: the way back to a
        clean state after an interruption (Ctrl-C) in the middle of a step."""
        for request in self.active_requests():
            if not request.finished:
                request._finish("aborted")
        self._pending.clear()
        if self.batch_size:
            self.rows = [None] * self.batch_size
            self._active_host = [False] * self.batch_size
            self.active.zero_()
            self.segment_ids.zero_()
            self._flags = Flags()
            self._set_t(0)

    def _deactivate(self, request: Request) -> None:
        if 0 <= request.row < len(self.rows) and self.rows[request.row] is request:
            self._set_active(request.row, False)

    def _set_active(self, row: int, on: bool) -> None:
        if self._active_host[row] != on:
            self._active_host[row] = on
            self.active[row] = int(on)

    # ------------------------------------------------------------------ internals

    def _set_t(self, t: int) -> None:
        self.t = t
        self.input_pos.fill_(t)

    def _shift(self, d: int) -> None:
        """Move every row's occupied slots [a, t) by ``d`` (left if negative); positions are unchanged."""
        live = [row for row, r in enumerate(self.rows) if r is not None]
        a = int(self.start[live].min().item()) if live else self.t
        a = max(0, min(a, self.t))
        if a + d < 0 or self.t + d > self.cache_length:
            raise RuntimeError(f"cannot shift the KV cache by {d} slots (occupied [{a}, {self.t}) of "
                               f"{self.cache_length})")
        for block in self.model.blocks:
            cache = block.attn.kv_cache
            for buf in (cache.k, cache.v):
                buf[:, :, a + d:self.t + d] = buf[:, :, a:self.t].clone()
        self.segment_ids[:, a + d:self.t + d] = self.segment_ids[:, a:self.t].clone()
        if d > 0:
            self.segment_ids[:, a:a + d].zero_()
        self.start.add_(d)
        self.num_shifts += 1
        for r in self.active_requests():
            r._start += d
        self._set_t(self.t + d)

    def _prefill(self, sequences: Sequence[list[int]], rows: list[int], end: int) -> torch.Tensor:
        """Run token sequences (left-padded to the longest) through the model into a temporary cache, copy it
        to the rows' slots [end - longest, end) and return the logits of every sequence's last token."""
        from litft.model import KVCache

        dev, n = self.device, len(sequences)
        longest = max(len(s) for s in sequences)
        idx = torch.full((n, longest), PAD_ID, dtype=torch.long)
        positions = torch.zeros((n, longest), dtype=torch.long)
        segments = torch.zeros((n, longest), dtype=torch.long)
        for i, seq in enumerate(sequences):
            L = len(seq)
            idx[i, longest - L:] = torch.tensor(seq)
            positions[i, longest - L:] = torch.arange(L)
            segments[i, longest - L:] = 1
        idx, positions, segments = idx.to(dev), positions.to(dev), segments.to(dev)
        main = [block.attn.kv_cache for block in self.model.blocks]
        main_length = self.model.max_cache_length
        cfg = self.config
        dtype = main[0].k.dtype
        try:
            for block in self.model.blocks:
                block.attn.kv_cache = KVCache(n, cfg.n_query_groups, longest, cfg.head_size, dev, dtype)
            self.model.max_cache_length = longest
            hidden = None
            for a in range(0, longest, self.prefill_chunk_size):
                b = min(a + self.prefill_chunk_size, longest)
                hidden = self.model(idx[:, a:b], input_pos=torch.arange(a, b, device=dev),
                                    positions=positions[:, a:b], segment_ids=segments, return_hidden=True)
            logits = self.model.head(hidden[:, -1]).float()
            row_idx = torch.tensor(rows, dtype=torch.long, device=dev)
            lo, hi = end - longest, end
            for block, cache in zip(self.model.blocks, main):
                tmp = block.attn.kv_cache
                cache.k[row_idx, :, lo:hi] = tmp.k
                cache.v[row_idx, :, lo:hi] = tmp.v
        finally:
            for block, cache in zip(self.model.blocks, main):
                block.attn.kv_cache = cache
            self.model.max_cache_length = main_length
        return logits

    # ------------------------------------------------------------------ built on the step-wise API

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        max_batch_size: int = 64, truncate: bool = False, on_finish: Optional[Callable[[int, Request], None]] = None,
    ) -> list[Request]:
        """Generate for every prompt (lists of token ids); returns the finished requests in prompt order.

        At most ``max_batch_size`` prompts decode together; as rows finish, waiting prompts take their place
        (continuous batching). ``on_finish(index, request)`` is called as each one finishes.
        """
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        requests = [self.new_request(p, sp, truncate) for p, sp in zip(prompts, plist)]
        return self.run(requests, max_batch_size, on_finish)

    def run(self, requests: Sequence[Request], max_batch_size: int = 64,
            on_finish: Optional[Callable[[int, Request], None]] = None) -> list[Request]:
        """Generate for requests made by :meth:`new_request` (see :meth:`generate`)."""
        requests = list(requests)
        if not requests:
            return []
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid: expected an integer >= 1")
        if self.active_requests():
            raise RuntimeError("the engine is busy with other requests (finish or remove them first)")
        batch = min(len(requests), max_batch_size)
        self.reserve(batch, max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests))
        index = {r.id: i for i, r in enumerate(requests)}
        waiting = deque(requests)
        try:
            while waiting or self.active_requests():
                free = self.free_rows()
                if waiting and free:
                    self.add([waiting.popleft() for _ in range(min(len(free), len(waiting)))])
                self.step()
                active = self.active_requests()
                live = [r for r in active if r._dispatched < r.params.max_new_tokens]
                if len(self._pending) >= self.sync_every or len(live) < len(active):
                    for r in self.sync():
                        if r.finished:
                            self.remove(r)
                            if on_finish is not None:
                                on_finish(index[r.id], r)
        finally:
            for r in self.active_requests():
                self.remove(r)
        return requests

    def stream(self, request: Request) -> Iterator[str]:
        """Yield the text of one request (made by :meth:`new_request`) piece by piece as it is generated;
        the request holds the tokens and finish reason afterwards. Closing the iterator early aborts it."""
        if self.active_requests():
            raise RuntimeError("the engine is busy with other requests (finish or remove them first)")
        self.reserve(1, len(request.prompt_ids) + request.params.max_new_tokens)
        self.add([request])
        try:
            while True:
                self.sync()
                piece = request.take_text()
                if piece:
                    yield piece
                if request.finished:
                    break
                self.step()
        finally:
            self.remove(request)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor,
              members: Sequence[tuple[int, Request]]) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The log-softmax of ``logits`` (B, V) at the sampled ``tokens`` (B,) and its top-k values and ids, k the
    most alternatives a member asks for; None (nothing computed) when no member asks for logprobs."""
    asked = [r.logprobs for _, r in members if r.logprobs is not None]
    if not asked:
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_values, top_ids = logprobs.topk(max(asked), dim=-1)
    return logprobs.gather(1, tokens[:, None])[:, 0], top_values, top_ids


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
