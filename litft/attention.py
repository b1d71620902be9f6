"""FlexAttention for packed sequences and sliding windows: attention confined to each sample with no (T, T) mask.

``GPT.attention_backend = "flex"`` (set by the training loop, ``--train.attention``) makes the uncached forward pass
build a :class:`~torch.nn.attention.flex_attention.BlockMask` per layer kind instead of a dense boolean mask: a
list of the (128 x 128)-tiles of the score matrix that are fully visible, partly visible (the kernel evaluates
the rule per element) or skipped. The rule is the same as :func:`litft.model.build_attention_mask`'s: a query at
position ``q`` sees a key at ``k`` when ``k <= q``, both carry the same segment id (packing) and ``q - k < window``
(sliding layers). Attention-logit softcapping becomes a ``score_mod``.

The tile list is computed here from the segment ids, a slab of query rows at a time (memory
O(B x slab x T) booleans, never B x T x T), and handed to ``BlockMask.from_kv_blocks``. On CUDA the attention
runs through ``torch.compile(flex_attention)`` (fused kernels; tiles skipped); on the CPU PyTorch has no
FlexAttention backward, so the training loop refuses ``attention='flex'`` there (the unfused forward still runs,
which the tests use to check this module against SDPA with a dense mask).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

BLOCK_SIZE = 128  # FlexAttention's default tile


def flex_available() -> Optional[str]:
    """None when FlexAttention can be used for training here, else the reason it cannot."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.6)"
    import inspect

    if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        return f"torch {torch.__version__}'s FlexAttention is too old (needs torch >= 2.6)"
    return None


def block_mask(T: int, window: Optional[int], segment_ids: Optional[torch.Tensor], device: torch.device,
               batch: int = 1) -> Any:
    """The BlockMask of causal attention over ``T`` positions, within segments (``segment_ids`` (B, T)) and a
    sliding ``window`` when given."""
    from torch.nn.attention.flex_attention import BlockMask

    n_blocks = -(-T // BLOCK_SIZE)
    padded = n_blocks * BLOCK_SIZE
    pos = torch.arange(padded, device=device)
    valid = pos < T
    if segment_ids is not None:
        B = segment_ids.shape[0]
        # positions past T get segment -1 (and are invalid): the mask_mod may index them on the last tile
        seg = torch.full((B, padded), -1, dtype=segment_ids.dtype, device=device)
        seg[:, :T] = segment_ids
    else:
        B, seg = 1, None

    partial, full = [], []
    pos32 = pos.to(torch.int32)
    # a slab of query tiles against the keys up to its end (causal: later keys are never visible), sized so that
    # one slab holds at most ~2^26 booleans per row of the batch
    slab_tiles = max(1, min(n_blocks, (1 << 26) // (padded * BLOCK_SIZE)))
    for start in range(0, padded, slab_tiles * BLOCK_SIZE):
        end = min(start + slab_tiles * BLOCK_SIZE, padded)
        q, k = pos32[start:end], pos32[:end]
        diff = q.unsqueeze(1) - k.unsqueeze(0)  # (S, end)
        allowed = (diff >= 0) & valid[start:end].unsqueeze(1) & valid[:end].unsqueeze(0)
        if window is not None:
            allowed = allowed & (diff < window)
        allowed = allowed.unsqueeze(0)  # (1, S, end)
        if seg is not None:
            allowed = allowed & (seg[:, start:end].unsqueeze(2) == seg[:, :end].unsqueeze(1))  # (B, S, end)
        tiles = allowed.view(allowed.shape[0], (end - start) // BLOCK_SIZE, BLOCK_SIZE, end // BLOCK_SIZE, BLOCK_SIZE)
        count = tiles.sum(dim=(2, 4), dtype=torch.int32)  # (B|1, slab tiles, tiles up to the slab's end)
        count = torch.nn.functional.pad(count, (0, n_blocks - end // BLOCK_SIZE))
        full.append(count == BLOCK_SIZE * BLOCK_SIZE)
        partial.append((count > 0) & (count < BLOCK_SIZE * BLOCK_SIZE))
    partial_t = torch.cat(partial, dim=1).unsqueeze(1)  # (B|1, 1, n_blocks, n_blocks)
    full_t = torch.cat(full, dim=1).unsqueeze(1)

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = dense.sum(dim=-1, dtype=torch.int32)
        indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, indices

    kv_num, kv_idx = ordered(partial_t)
    full_num, full_idx = ordered(full_t)
    mask_mod = _mask_mod(window, seg)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=(T, T))
    return mask


def _mask_mod(window: Optional[int], seg: Optional[torch.Tensor]) -> Any:
    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        allowed = q >= k
        if window is not None:
            allowed = allowed & (q - k < window)
        if seg is not None:
            allowed = allowed & (seg[b, q] == seg[b, k])
        return allowed

    return mask_mod


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float,
                softcap: Optional[float]) -> torch.Tensor:
    """Attention of (B, nh, T, hs) queries over (B, ng, S, hs) keys/values under a BlockMask (GQA included)."""
    score_mod = None
    if softcap is not None:
        def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return torch.tanh(score / softcap) * softcap

    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:  # the unfused reference implementation (forward only on CPU)
        from torch.nn.attention.flex_attention import flex_attention as fn
    return fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
