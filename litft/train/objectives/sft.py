"""Supervised fine-tuning: next-token cross-entropy summed over the target tokens (labels != -100).

Only the hidden states of target positions go through the head, so prompt and padding positions cost no logits
memory; with ``loss_chunk_size`` the head and the cross-entropy run chunk by chunk (:mod:`litft.train.fused_loss`),
so not even the target tokens' logits exist all at once. ``offload_activations`` moves what the forward saves for
the backward to pinned CPU memory (``torch.autograd.graph.save_on_cpu``; CUDA only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.train.objectives.base import Objective, ObjectiveContext, ObjectiveOutput

IGNORE_INDEX = -100


@dataclass
class SFTArgs:
    """Supervised fine-tuning (next-token cross-entropy on the trained tokens) has no options."""


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """The target tokens of a micro-batch (labels != -100)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def target_token_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                      loss_chunk_size: Optional[int] = None) -> torch.Tensor:
    """The cross-entropy of ``model``'s head on the hidden states (B, T, C) of the positions whose label is not
    -100, summed (fp32)."""
    targets = labels != IGNORE_INDEX
    if loss_chunk_size is None:
        logits = model.head(hidden[targets])
        return F.cross_entropy(logits.float(), labels[targets], reduction="sum")
    from litft.train.fused_loss import linear_cross_entropy

    return linear_cross_entropy(hidden[targets], model.lm_head, labels[targets], model.config.final_logit_softcapping,
                                loss_chunk_size, head_fn=model.head)


class SFTObjective(Objective):
    """Units: target tokens; loss: their summed cross-entropy; no other metrics."""

    name: ClassVar[str] = "sft"
    args_type: ClassVar[type] = SFTArgs
    perplexity: ClassVar[bool] = True

    def __init__(self, model: nn.Module, args: Optional[SFTArgs] = None,
                 context: Optional[ObjectiveContext] = None) -> None:
        super().__init__()
        context = context or ObjectiveContext()
        self.model = model
        self.loss_chunk_size = context.loss_chunk_size
        self.offload_activations = context.offload_activations

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        offload = self.offload_activations and self.training and torch.is_grad_enabled()
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            hidden = self.model(input_ids, positions=positions, segment_ids=segment_ids, return_hidden=True)
            return ObjectiveOutput(loss=target_token_loss(self.model, hidden, labels, self.loss_chunk_size))
