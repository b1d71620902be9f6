"""Generation caches: what each attention layer keeps between forward passes, behind one interface.

The model owns the layout: :meth:`litft.model.GPT.make_cache` builds a :class:`ModelCache` holding one
:class:`Cache` per layer, of the class the layer's attention kind needs, and the engine passes it back to
``model(idx, input_pos=..., cache=cache)``. The engine (``litft/generate/engine.py``) only schedules rows: it
calls the operations below and never reads or writes cache tensors or model attributes itself.

Slots. A cache has ``rows`` sequences and ``length`` slots; a forward pass with ``input_pos`` (T,) writes the T new
tokens of its first B rows at those slots (prefill: a run of slots; decode: one). Rows are independent; a slot
index means the same thing in every row (the engine left-pads rows so that they decode at a shared slot), and
the attention mask is built from slots: a query at slot q sees the key at slot k when ``k <= q`` (within the
window on sliding layers) and both slots belong to the same segment.

Operations (every :class:`Cache` implements them):

- ``update(input_pos, *entries)``: store this step's entries (keys and values) of rows ``0..B-1`` at
  ``input_pos`` and return what attention reads for those rows.
- ``key_slots(input_pos)``: the slot each column of what ``update`` returns holds (negative: none), from which
  ``GPT.forward`` builds the layer kind's mask.
- ``copy_rows_from(source, rows, first_slot)``: prefill rows: a cache of ``len(rows)`` rows that a prompt batch
  was prefilled into (made by ``make_cache`` like this one) lands in ``rows``, its slot 0 at ``first_slot``.
- ``move_rows(src, dst)``: row ``src[i]`` becomes row ``dst[i]`` (compaction into fewer rows).
- ``reset_rows(rows)``: those rows start empty.
- ``shift_slots(start, end, offset)``: slots ``[start, end)`` of every row move by ``offset`` (the engine makes room
  left of the decode slot, or reclaims it); attention depends on slot differences only, so results are unchanged.
- ``bytes_per_row(config, length, dtype)`` (class method): memory one row of ``length`` slots takes, what the
  engine sizes ``--kv_cache_memory`` with before allocating.

Kinds implemented: :class:`KVCache` (full attention: every slot), :class:`SlidingKVCache` (sliding window: a
ring buffer of the window's slots; prompts longer than the window prefill in chunks), :class:`ChunkedKVCache`
(chunked local attention, Llama 4: the same ring of one chunk's slots; the mask keeps a key when it is in the
query's chunk, from the query's position), :class:`LatentCache` (multi-head latent attention, DeepSeek-V3: per
slot only the compressed latent and the shared RoPE key, which the attention reads instead of every head's keys
and values) and :class:`LinearAttentionCache` (Gated DeltaNet, below). :func:`cache_class` picks a layer's kind. How
KV sharing (not in litft yet) and linear attention fit the same interface:

- KV shared across layers (Gemma 4, :class:`SharedKVCache`, made by ``make_cache`` for those layers): the reading
  layer's cache is a view of the writing layer's: the model hands the reading layer the keys and values the
  source's ``update`` returned (its own ``update`` is never called), ``key_slots`` are the source's,
  ``bytes_per_row`` is 0 and the row and slot operations do nothing (the source layer's cache does them).
- Linear attention (Gated DeltaNet): :class:`LinearAttentionCache` holds a per-row convolution window (rows,
  kernel - 1, channels) and recurrent state (rows, heads, dk, dv) instead of slots: ``held`` gives the layer its
  rows' window and state, ``update`` stores the ones it ran forward over the new tokens (the layer forgets them at
  segment starts, so left padding never reaches a prompt's state), ``key_slots`` is empty, ``copy_rows_from``
  takes the source's final state, ``move_rows``/``reset_rows`` copy or zero it, ``shift_slots`` does nothing, and
  ``bytes_per_row`` is independent of ``length``.
"""

from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch
import torch.nn as nn

from litft.config import Config


class Cache(nn.Module, abc.ABC):
    """One layer's generation state for ``rows`` sequences of up to ``length`` slots (see the module docstring)."""

    def __init__(self, rows: int, length: int) -> None:
        super().__init__()
        self.rows, self.length = rows, length

    def check_copy_source(self, source: "Cache", first_slot: int) -> None:
        """Refuse, for ``copy_rows_from``, a source of another class or one whose slots from ``first_slot`` on fall
        outside this cache."""
        if type(source) is not type(self):
            raise TypeError(f"cannot copy a {type(source).__name__} into a {type(self).__name__}")
        end = first_slot + source.length
        if first_slot < 0 or end > self.length:
            raise ValueError(f"slots [{first_slot}, {end}) are outside the cache's {self.length} slots")

    @classmethod
    @abc.abstractmethod
    def bytes_per_row(cls, config: Config, length: int, dtype: torch.dtype) -> int:
        """Bytes one row of ``length`` slots takes."""

    @abc.abstractmethod
    def update(self, input_pos: torch.Tensor, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this step's entries of rows 0..B-1 at ``input_pos``; return what attention reads."""

    @abc.abstractmethod
    def key_slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        """The slot (S,) each column of what ``update(input_pos, ...)`` returns holds; negative: none."""

    @abc.abstractmethod
    def copy_rows_from(self, source: "Cache", rows: torch.Tensor, first_slot: int) -> None:
        """Prefill rows: ``source``'s rows become ``rows``, its slot 0 at ``first_slot``."""

    @abc.abstractmethod
    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Row ``src[i]`` becomes row ``dst[i]``."""

    @abc.abstractmethod
    def reset_rows(self, rows: torch.Tensor) -> None:
        """Those rows start empty."""

    @abc.abstractmethod
    def shift_slots(self, start: int, end: int, offset: int) -> None:
        """Slots ``[start, end)`` of every row move by ``offset``."""


class SlotCache(Cache):
    """A cache of per-slot entries: buffers of shape (rows, heads, length, dim), one per entry, slots on dim 2."""

    def __init__(self, rows: int, length: int, entries: dict[str, tuple[int, int]], dtype: torch.dtype,
                 device: Optional[torch.device]) -> None:
        super().__init__(rows, length)
        for name, (heads, dim) in entries.items():
            # zeros, not empty: masked slots must not hold NaNs that 0 * NaN would leak through
            # module buffers, updated in place: torch.compile treats them as static inputs (CUDA graphs read them
            # where they are)
            self.register_buffer(name, torch.zeros(rows, heads, length, dim, dtype=dtype, device=device),
                                 persistent=False)

    def update(self, input_pos: torch.Tensor, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write the entries (B, heads, T, dim) of rows 0..B-1 at slots ``input_pos`` (T,); return those rows'
        buffers (B, heads, length, dim). A decode step may run on the first rows only."""
        batch = entries[0].shape[0]
        if batch > self.rows:
            raise ValueError(f"batch of {batch} rows but the cache holds {self.rows}")
        out = []
        for buf, new in zip(self.buffers(), entries, strict=True):
            rows = buf[:batch]
            rows.index_copy_(2, input_pos, new.to(rows.dtype))
            out.append(rows)
        return tuple(out)

    def copy_rows_from(self, source: Cache, rows: torch.Tensor, first_slot: int) -> None:
        self.check_copy_source(source, first_slot)
        end = first_slot + source.length
        for buf, src in zip(self.buffers(), source.buffers(), strict=True):
            buf[rows, :, first_slot:end] = src.to(buf.dtype)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for buf in self.buffers():
            buf.index_copy_(0, dst, buf.index_select(0, src))

    def reset_rows(self, rows: torch.Tensor) -> None:
        for buf in self.buffers():
            buf.index_fill_(0, rows, 0)

    def shift_slots(self, start: int, end: int, offset: int) -> None:
        if start + offset < 0 or end + offset > self.length:
            raise ValueError(f"cannot shift slots [{start}, {end}) by {offset} in a cache of {self.length} slots")
        for buf in self.buffers():
            buf[:, :, start + offset:end + offset] = buf[:, :, start:end].clone()


class KVCache(SlotCache):
    """Keys and values of a full-attention layer: ``k`` and ``v`` of shape (rows, n_query_groups, length,
    head_size) (the full layers' own ``global_n_query_groups`` and ``global_head_size`` where set), keys after
    RoPE."""

    kind = "full"  # the layer kind (Config.layer_types) whose heads the cache holds

    def __init__(self, config: Config, rows: int, length: int, dtype: torch.dtype,
                 device: Optional[torch.device]) -> None:
        shape = (config.kind_query_groups(self.kind), config.kind_head_size(self.kind))
        super().__init__(rows, length, {"k": shape, "v": shape}, dtype, device)

    @classmethod
    def bytes_per_row(cls, config: Config, length: int, dtype: torch.dtype) -> int:
        return 2 * config.kind_query_groups(cls.kind) * config.kind_head_size(cls.kind) * length * dtype.itemsize

    def key_slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.length, device=input_pos.device)


class SlidingKVCache(SlotCache):
    """Keys and values of a sliding-window layer in a ring buffer: ``k`` and ``v`` of shape (rows, n_query_groups,
    ring, head_size) with ``ring = min(length, window)``, slot ``s`` at ring position ``s % ring``. Memory stops
    growing at the window.

    A step's slots must be consecutive and follow the last slot written (as the engine's prefill chunks and decode
    steps do). One new token (decode) is written first and attends over the ring, which then holds exactly its
    window; a chunk of several tokens (prefill) attends over the ring as it was plus its own keys, then its last
    ``ring`` entries are written, so chunks longer than the window need nothing special.
    """

    kind = "sliding"

    def __init__(self, config: Config, rows: int, length: int, dtype: torch.dtype,
                 device: Optional[torch.device]) -> None:
        window = self.window_size(config)
        ring = min(length, window)
        shape = (config.kind_query_groups(self.kind), config.kind_head_size(self.kind))
        super().__init__(rows, ring, {"k": shape, "v": shape}, dtype, device)
        self.window, self.ring = window, ring
        self.length = length  # slots addressed; only the last ``ring`` of them are held

    @classmethod
    def window_size(cls, config: Config) -> int:
        """The most recent slots a query may see: the sliding window."""
        return config.sliding_window

    @classmethod
    def bytes_per_row(cls, config: Config, length: int, dtype: torch.dtype) -> int:
        slots = min(length, cls.window_size(config))
        return 2 * config.kind_query_groups(cls.kind) * config.kind_head_size(cls.kind) * slots * dtype.itemsize

    def update(self, input_pos: torch.Tensor, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, steps = entries[0].shape[0], entries[0].shape[2]
        if batch > self.rows:
            raise ValueError(f"batch of {batch} rows but the cache holds {self.rows}")
        keep = min(steps, self.ring)  # the step's last entries the ring keeps
        where = input_pos[steps - keep:] % self.ring
        out = []
        for buf, new in zip(self.buffers(), entries, strict=True):
            held = buf[:batch]
            if steps > 1:  # a prefill chunk attends over the ring before it and itself
                out.append(torch.cat((held, new.to(held.dtype)), dim=2))
            held.index_copy_(2, where, new[:, :, steps - keep:].to(held.dtype))
            if steps == 1:
                out.append(held)
        return tuple(out)

    def key_slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        steps = input_pos.shape[0]
        last = input_pos[0] if steps == 1 else input_pos[0] - 1  # the last slot in the ring when attending
        position = torch.arange(self.ring, device=input_pos.device)
        held = last - (last - position) % self.ring  # the latest slot <= last at each ring position
        return held if steps == 1 else torch.cat((held, input_pos))

    def copy_rows_from(self, source: Cache, rows: torch.Tensor, first_slot: int) -> None:
        self.check_copy_source(source, first_slot)
        kept = min(source.ring, self.ring)  # the source's last slots that land in the ring
        slots = torch.arange(source.length - kept, source.length, device=rows.device)
        for buf, src in zip(self.buffers(), source.buffers(), strict=True):
            held = buf[rows]
            held[:, :, (first_slot + slots) % self.ring] = src[:, :, slots % source.ring].to(buf.dtype)
            buf[rows] = held

    def shift_slots(self, start: int, end: int, offset: int) -> None:
        """Slots ``[start, end)`` move by ``offset``; ``end`` must follow the last slot written."""
        if start + offset < 0 or end + offset > self.length:
            raise ValueError(f"cannot shift slots [{start}, {end}) by {offset} in a cache of {self.length} slots")
        for buf in self.buffers():
            buf.copy_(buf.roll(offset, dims=2))


class ChunkedKVCache(SlidingKVCache):
    """Keys and values of a chunked-attention layer (Llama 4): a query sees only the earlier keys of its chunk,
    which are among the last ``attention_chunk_size`` slots, so the ring of :class:`SlidingKVCache` with one
    chunk's slots holds all it needs; the mask (built from the queries' positions) drops the ring's keys of the
    previous chunk."""

    kind = "chunked"

    @classmethod
    def window_size(cls, config: Config) -> int:
        return config.attention_chunk_size


class LatentCache(SlotCache):
    """What a multi-head latent attention layer (``Config.kv_lora_rank``) keeps per slot: ``latent`` (rows, 1,
    length, kv_lora_rank), the normed compressed keys and values, and ``rope_key`` (rows, 1, length, head_size), the
    RoPE key all heads share, after RoPE. Not the per-head keys and values: the layer expands them from these."""

    def __init__(self, config: Config, rows: int, length: int, dtype: torch.dtype,
                 device: Optional[torch.device]) -> None:
        entries = {"latent": (1, config.kv_lora_rank), "rope_key": (1, config.head_size)}
        super().__init__(rows, length, entries, dtype, device)

    @classmethod
    def bytes_per_row(cls, config: Config, length: int, dtype: torch.dtype) -> int:
        return (config.kv_lora_rank + config.head_size) * length * dtype.itemsize

    def key_slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.length, device=input_pos.device)


class SharedKVCache(Cache):
    """A KV-shared layer's cache (``Config.kv_shared_layers``): a view of its source layer's cache. It holds nothing
    (``bytes_per_row`` 0); the row and slot operations are the source's to do; its ``key_slots`` are the source's.
    ``update`` is never called: the model hands the layer the keys and values its source's ``update`` returned (for
    a sliding layer's prefill chunk those include the chunk's own, which the ring may not keep)."""

    def __init__(self, source: Cache) -> None:
        super().__init__(source.rows, source.length)
        object.__setattr__(self, "source", source)  # a plain reference, not a submodule: its buffers are the source's

    @classmethod
    def bytes_per_row(cls, config: Config, length: int, dtype: torch.dtype) -> int:
        return 0

    def update(self, input_pos: torch.Tensor, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise RuntimeError("a KV-shared layer's cache is its source layer's: the model passes it the source's keys "
                           "and values")

    def key_slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        return self.source.key_slots(input_pos)

    def copy_rows_from(self, source: Cache, rows: torch.Tensor, first_slot: int) -> None:
        self.check_copy_source(source, first_slot)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        pass

    def reset_rows(self, rows: torch.Tensor) -> None:
        pass

    def shift_slots(self, start: int, end: int, offset: int) -> None:
        pass


class LinearAttentionCache(Cache):
    """What a Gated DeltaNet layer (``"linear"`` layers, :mod:`litft.linear_attention`) keeps per row, whatever the
    length: ``conv`` (rows, linear_conv_kernel - 1, channels), the last convolution inputs of the row's current
    segment, and ``state`` (rows, value heads, dk, dv), the recurrent state in float32. Slots play no part: a step
    continues from the state its rows hold."""

    def __init__(self, config: Config, rows: int, length: int, dtype: torch.dtype,
                 device: Optional[torch.device]) -> None:
        super().__init__(rows, length)
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
            config.linear_num_value_heads * config.linear_value_head_dim
        self.register_buffer("conv", torch.zeros(rows, config.linear_conv_kernel - 1, conv_dim, dtype=dtype,
                                                 device=device), persistent=False)
        self.register_buffer("state", torch.zeros(rows, config.linear_num_value_heads, config.linear_key_head_dim,
                                                  config.linear_value_head_dim, dtype=torch.float32, device=device),
                             persistent=False)

    @classmethod
    def bytes_per_row(cls, config: Config, length: int, dtype: torch.dtype) -> int:
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
            config.linear_num_value_heads * config.linear_value_head_dim
        state = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
        return (config.linear_conv_kernel - 1) * conv_dim * dtype.itemsize + state * torch.float32.itemsize

    def held(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution window and state of rows 0..batch-1."""
        if batch > self.rows:
            raise ValueError(f"batch of {batch} rows but the cache holds {self.rows}")
        return self.conv[:batch], self.state[:batch]

    def update(self, input_pos: torch.Tensor, *entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the window and state (``entries``) of rows 0..B-1 after the step at ``input_pos``; return them."""
        window, state = entries
        batch = window.shape[0]
        self.conv[:batch].copy_(window)
        self.state[:batch].copy_(state)
        return self.conv[:batch], self.state[:batch]

    def key_slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long, device=input_pos.device)

    def copy_rows_from(self, source: Cache, rows: torch.Tensor, first_slot: int) -> None:
        self.check_copy_source(source, first_slot)
        self.conv[rows] = source.conv.to(self.conv.dtype)
        self.state[rows] = source.state

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for buf in (self.conv, self.state):
            buf.index_copy_(0, dst, buf.index_select(0, src))

    def reset_rows(self, rows: torch.Tensor) -> None:
        for buf in (self.conv, self.state):
            buf.index_fill_(0, rows, 0)

    def shift_slots(self, start: int, end: int, offset: int) -> None:
        """Nothing moves: the state holds no slots."""
        if start + offset < 0 or end + offset > self.length:
            raise ValueError(f"cannot shift slots [{start}, {end}) by {offset} in a cache of {self.length} slots")


CACHE_BY_LAYER_TYPE: dict[str, type[Cache]] = {"full": KVCache, "sliding": SlidingKVCache, "chunked": ChunkedKVCache,
                                               "linear": LinearAttentionCache}


def cache_class(config: Config, kind: str) -> type[Cache]:
    """The cache class of a layer of attention ``kind`` ("full", "sliding", "chunked" or "linear") in a model of
    ``config``: :class:`LatentCache` for every layer of a multi-head latent attention model (``kv_lora_rank``)."""
    if config.kv_lora_rank is not None:
        return LatentCache
    return CACHE_BY_LAYER_TYPE[kind]


class ModelCache(nn.Module):
    """Every layer's :class:`Cache` for ``rows`` sequences of ``length`` slots, made by
    :meth:`litft.model.GPT.make_cache`; the row and slot operations apply to every layer."""

    def __init__(self, layers: Sequence[Cache], kinds: Sequence[str], rows: int, length: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.kinds = list(kinds)  # each layer's attention kind (``Config.layer_types``)
        self.rows, self.length, self.dtype = rows, length, dtype

    def key_slots(self, kind: str, input_pos: torch.Tensor) -> torch.Tensor:
        """The slot each key column of a layer of ``kind`` holds for a step at ``input_pos`` (for its mask)."""
        return self.layers[self.kinds.index(kind)].key_slots(input_pos)

    def copy_rows_from(self, source: "ModelCache", rows: torch.Tensor, first_slot: int) -> None:
        """Prefill rows: ``source`` (a cache of ``len(rows)`` rows) becomes ``rows``, its slot 0 at ``first_slot``."""
        for layer, src in zip(self.layers, source.layers, strict=True):
            layer.copy_rows_from(src, rows, first_slot)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Row ``src[i]`` becomes row ``dst[i]`` (its old place keeps stale entries until reset or overwritten)."""
        for layer in self.layers:
            layer.move_rows(src, dst)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Those rows start empty."""
        for layer in self.layers:
            layer.reset_rows(rows)

    def shift_slots(self, start: int, end: int, offset: int) -> None:
        """Slots ``[start, end)`` of every row move by ``offset``."""
        for layer in self.layers:
            layer.shift_slots(start, end, offset)
