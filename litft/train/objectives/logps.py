"""Per-sequence log-probabilities of completions, and what the preference objectives share.

A preference micro-batch holds ``input_ids`` and ``labels`` of shape (2B, T): rows ``0..B-1`` are the chosen
completions, rows ``B..2B-1`` the rejected completions of the same pairs (prompt and padding labelled -100).
:func:`sequence_logps` runs the model once over all 2B rows and returns, per row, the summed log-probability of
its target tokens and their number. Only the hidden states of target positions go through the head, as in SFT, so
prompt and padding positions cost no logits memory; with ``loss_chunk_size`` the head runs over at most that many
tokens at a time and each chunk's logits are recomputed in the backward (:func:`token_chunks`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.data.collate import IGNORE_INDEX
from litft.train.objectives.base import Objective, ObjectiveContext


@dataclass
class SequenceLogps:
    """Per-row sums of target-token log-probabilities (fp32) and per-row target-token counts, both (rows,)."""

    sum: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised log-probabilities (a row without targets counts as one token, like TRL)."""
        return self.sum / self.count.clamp(min=1).to(self.sum.dtype)

    def pairs(self, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves of the sums, or of the means with ``average``."""
        values = self.mean if average else self.sum
        return values.chunk(2, dim=0)


def activation_offload(enabled: bool, module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Pinned-CPU storage of the tensors saved for backward while training with gradients (CUDA only)."""
    if enabled and module.training and torch.is_grad_enabled():
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def target_hidden(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                  positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the target positions (N, D) and the mask of those positions (rows, T)."""
    hidden = model(input_ids, positions=positions, segment_ids=segment_ids, return_hidden=True)
    targets = labels != IGNORE_INDEX
    return hidden[targets], targets


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   loss_chunk_size: Optional[int] = None) -> SequenceLogps:
    """Per-row summed log-probabilities of the target tokens (labels != -100) under ``model``, and their counts.

    ``model`` is a :class:`litft.model.GPT` (possibly with LoRA, adapters or a virtual prompt): it must take
    ``return_hidden=True`` and have ``head`` / ``lm_head``.
    """
    hidden, targets = target_hidden(model, input_ids, labels)
    token_logps = token_chunks(_token_logps, loss_chunk_size, model.head, hidden, labels[targets])
    rows = targets.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return SequenceLogps(sums.index_add(0, rows, token_logps), targets.sum(dim=1))


def _token_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), labels, reduction="none")


def token_chunks(fn: Callable[..., torch.Tensor], chunk_size: Optional[int], head: Any,
                 *per_token: torch.Tensor) -> torch.Tensor:
    """``fn(head, *per_token)`` (a per-token fp32 result) over all tokens at once, or ``chunk_size`` tokens at a
    time with each chunk's logits recomputed in the backward (non-reentrant activation checkpointing): then at
    most one chunk of logits exists at any moment, at the cost of one more head forward."""
    if chunk_size is None:
        return fn(head, *per_token)
    if chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be >= 1, got {chunk_size}")
    from torch.utils.checkpoint import checkpoint

    n = per_token[0].shape[0]
    parts = []
    for start in range(0, max(n, 1), chunk_size):  # an empty batch still connects the graph
        chunk = [t[start:start + chunk_size] for t in per_token]
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, head, *chunk, use_reentrant=False))
        else:
            parts.append(fn(head, *chunk))
    return torch.cat(parts)


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Units of a preference micro-batch: its number of pairs (half its rows)."""
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"a preference micro-batch needs an even number of rows (chosen, then rejected), got {rows}")
    return rows // 2


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected")


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's preference metrics, each summed over the pairs (the Trainer divides by the number of pairs)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_logps.detach().float().sum(),
        "logps/rejected": rejected_logps.detach().float().sum(),
    }


class PreferenceObjective(Objective):
    """Base of the preference objectives: pairs as units, one policy forward over the (2B, T) rows."""

    needs_pairs: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = PREFERENCE_METRICS
    units = staticmethod(count_pairs)

    def __init__(self, model: nn.Module, args: Any, context: ObjectiveContext) -> None:
        super().__init__()
        self.model = model
        self.args = args
        self.loss_chunk_size = context.loss_chunk_size
        self.offload_activations = context.offload_activations

    def policy_logps(self, input_ids: torch.Tensor, labels: torch.Tensor,
                     segment_ids: Optional[torch.Tensor] = None) -> SequenceLogps:
        """The trained model's per-row log-probabilities (with gradients while training)."""
        if segment_ids is not None:
            raise ValueError(f"objective {self.name!r} takes padded preference pairs, not packed rows "
                             f"(set data.packing=false)")
        with activation_offload(self.offload_activations, self):
            return sequence_logps(self.model, input_ids, labels, self.loss_chunk_size)
