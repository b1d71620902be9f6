"""The Objective interface: given a micro-batch and the model(s), the loss to backpropagate and the metrics to log.

An objective wraps the method-prepared model (Fabric sets the wrapper up, so DDP/FSDP gradient hooks and autocast
cover the whole computation). One ``forward(**micro_batch)`` returns the SUM of its loss over the micro-batch's
units and SUMS of its metrics over the same units; ``units(batch)`` counts them on the CPU, before the copy to the
device (SFT and distillation: target tokens; preference objectives: pairs). The Trainer
(:class:`litft.train.trainer.Trainer`) counts the units of a whole optimizer step up front, over all ranks, and
divides by them: the gradient is that of the mean over the step whatever its split into micro-batches and devices,
and the logged ``loss`` and metrics are means over the same units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Optional

import torch
import torch.nn as nn


@dataclass
class ObjectiveOutput:
    """``loss``: scalar, the sum over this micro-batch's units; ``metrics``: scalars, sums over the same units
    (logged under their own names, e.g. ``rewards/chosen``)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ObjectiveContext:
    """What an objective may need besides the model.

    reference: Factory of a context manager under which the model computes the reference policy: the method's
        trainable parts switched off (``reference_off`` of its entry in :mod:`litft.methods`: LoRA, adapter,
        prompt tuning); None for full fine-tuning.
    load_frozen_copy: Returns a frozen copy of the base model (full fine-tuning's reference).
    teacher: The frozen teacher (knowledge distillation), loaded and placed by the Trainer.
    loss_chunk_size: Run the head and the cross-entropy chunk by chunk (:mod:`litft.train.fused_loss`); None: all
        target positions at once.
    offload_activations: Keep what the forward saves for the backward in pinned CPU memory (CUDA).
    """

    reference: Optional[Callable[[], ContextManager[Any]]] = None
    load_frozen_copy: Optional[Callable[[], nn.Module]] = None
    teacher: Optional[nn.Module] = None
    loss_chunk_size: Optional[int] = None
    offload_activations: bool = False


class Objective(nn.Module):
    """Base of the training objectives. A subclass sets ``name`` (the ``--objective.name`` value), ``args_type``
    (its options dataclass: ``--objective.<field>``), ``needs_pairs`` (its data must be preference pairs),
    ``needs_teacher`` (the Trainer loads the checkpoint ``args.teacher`` into ``context.teacher``),
    ``metrics`` (the names of the metrics it returns: they are summed over ranks in this order), and
    implements ``__init__(model, args, context)`` (keeping the model as ``self.model``: checkpoints name the
    trainable weights ``model.*``), ``units`` and ``forward``."""

    name: ClassVar[str]
    args_type: ClassVar[type]
    needs_pairs: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # the Trainer loads ``args.teacher`` into ``context.teacher``
    metrics: ClassVar[tuple[str, ...]] = ()  # the names of the metrics its forward returns, the same on every rank
    perplexity: ClassVar[bool] = False  # its loss is a mean token cross-entropy: validation also logs val_ppl

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def forward(self, **batch: torch.Tensor) -> ObjectiveOutput:  # type: ignore[override]
        raise NotImplementedError
