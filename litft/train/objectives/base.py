"""The Objective interface (provisional copy of the redesign's contract, replaced when the redesign lands).

An objective wraps the method-prepared model; one ``forward(**micro_batch)`` returns the SUM of its loss over the
micro-batch's units and SUMS of its metrics over the same units. The Trainer counts the units of a whole optimizer
step up front (``units``, on the CPU, all-reduced over ranks) and divides by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Optional

import torch
import torch.nn as nn


@dataclass
class ObjectiveOutput:
    """``loss``: scalar, the sum over this micro-batch's units; ``metrics``: scalars, sums over the same units."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ObjectiveContext:
    """What an objective may need besides the model.

    reference: factory of a context manager that switches the method's trainable parts off (LoRA, adapter, prompt
        tuning), so that the model computes the reference policy; None for full fine-tuning.
    load_frozen_copy: returns a frozen copy of the base model (full fine-tuning's reference).
    teacher: the frozen teacher (knowledge distillation), placed and sharded by the Trainer.
    loss_chunk_size: run the head and the log-softmax chunk by chunk (:mod:`litft.train.fused_loss`).
    offload_activations: keep what the forward saves for the backward in pinned CPU memory (CUDA).
    """

    reference: Optional[Callable[[], ContextManager[Any]]] = None
    load_frozen_copy: Optional[Callable[[], nn.Module]] = None
    teacher: Optional[nn.Module] = None
    loss_chunk_size: Optional[int] = None
    offload_activations: bool = False


class Objective(nn.Module):
    """Given a micro-batch, the loss to backpropagate and the metrics to log (see the module docstring)."""

    name: ClassVar[str]
    needs_pairs: ClassVar[bool] = False

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def forward(self, **batch: torch.Tensor) -> ObjectiveOutput:  # type: ignore[override]
        raise NotImplementedError
