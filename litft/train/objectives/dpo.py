"""DPO and IPO: preference losses measured against a reference policy.

For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities summed over each completion's tokens, the
log-ratios are ``r_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``r_l`` likewise, and ``delta = r_w - r_l``:

- DPO (Rafailov et al., 2023): ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``; ``eps`` is
  the label smoothing of conservative DPO (the probability that a label is flipped), 0 gives plain DPO. At the
  start of training the policy is the reference, so every pair's loss is ``ln 2``.
- IPO (Azar et al., 2023), in TRL's form: the log-ratios averaged over each completion's tokens,
  ``(r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2``.

The reference: with LoRA, adapters or prompt tuning it is the same model with the method's trainable parts
switched off (``ObjectiveContext.reference``), so no second copy lives in memory; with full fine-tuning it is a
frozen copy of the base model (``ObjectiveContext.load_frozen_copy``), the simplest choice that stays exact for
any data order and with resume (precomputed reference log-probs would tie the run to one pass over fixed data).
One micro-batch costs one no-grad forward of the reference and one forward of the policy over the (2B, T) rows.

Metrics (TRL's names, summed over pairs): ``rewards/chosen`` = ``beta r_w``, ``rewards/rejected`` = ``beta r_l``,
``rewards/accuracies`` (``beta r_w > beta r_l``), ``rewards/margins``, ``logps/chosen`` and ``logps/rejected``
(the policy's summed log-probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.train.objectives.base import ObjectiveContext, ObjectiveOutput
from litft.train.objectives.logps import PreferenceObjective, SequenceLogps, preference_metrics, sequence_logps


@dataclass
class DPOArgs:
    """Direct Preference Optimization.

    Args:
        beta: Strength of the tie to the reference policy (higher = stays closer); the reward scale.
        label_smoothing: Conservative DPO's probability that a preference label is flipped, in [0, 0.5); 0 is
            plain DPO.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_beta(self.beta, "dpo")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class IPOArgs:
    """Identity Preference Optimization (TRL's length-averaged form).

    Args:
        beta: The regularisation strength (tau in the IPO paper): the loss pulls the per-token log-ratio margin
            towards ``1 / (2 beta)``.
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        check_beta(self.beta, "ipo")


def check_beta(beta: float, objective: str) -> None:
    if not beta > 0:
        raise ValueError(f"objective.beta must be > 0 for {objective}, got {beta}")


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair (conservative) DPO loss from the policy-minus-reference log-ratios of each completion."""
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(chosen_mean_logratios: torch.Tensor, rejected_mean_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss from the log-ratios averaged over each completion's tokens."""
    return (chosen_mean_logratios - rejected_mean_logratios - 1.0 / (2.0 * beta)) ** 2


class _ReferenceObjective(PreferenceObjective):
    """A preference objective that compares the policy with a reference policy (see the module docstring)."""

    def __init__(self, model: nn.Module, args: Any, context: ObjectiveContext) -> None:
        super().__init__(model, args, context)
        self.reference_off: Optional[Callable[[], Any]] = context.reference
        frozen = None
        if context.reference is None:
            if context.load_frozen_copy is None:
                raise ValueError(f"objective {self.name!r} needs a reference policy: this method can neither switch "
                                 f"its trainable parts off nor load a frozen copy of the base model")
            frozen = context.load_frozen_copy().requires_grad_(False).eval()
        # not a submodule: the frozen reference is neither trained, nor saved, nor wrapped with the policy
        object.__setattr__(self, "reference_model", frozen)

    def reference_logps(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
        """The reference policy's per-row log-probabilities (no gradients)."""
        with torch.no_grad():
            if self.reference_model is not None:
                return sequence_logps(self.reference_model, input_ids, labels, self.loss_chunk_size)
            assert self.reference_off is not None  # __init__ has one or the other
            with self.reference_off():
                return sequence_logps(self.model, input_ids, labels, self.loss_chunk_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        reference = self.reference_logps(input_ids, labels)
        policy = self.policy_logps(input_ids, labels, segment_ids)
        losses = self.pair_losses(policy, reference)
        chosen_logps, rejected_logps = policy.pairs()
        ref_chosen, ref_rejected = reference.pairs()
        beta = self.args.beta
        metrics = preference_metrics(beta * (chosen_logps - ref_chosen), beta * (rejected_logps - ref_rejected),
                                     chosen_logps, rejected_logps)
        return ObjectiveOutput(losses.sum(), metrics)

    def pair_losses(self, policy: SequenceLogps, reference: SequenceLogps) -> torch.Tensor:
        raise NotImplementedError


class DPOObjective(_ReferenceObjective):
    """DPO on the summed completion log-probabilities (see the module docstring)."""

    name: ClassVar[str] = "dpo"
    args_type: ClassVar[type] = DPOArgs

    def pair_losses(self, policy: SequenceLogps, reference: SequenceLogps) -> torch.Tensor:
        chosen, rejected = policy.pairs()
        ref_chosen, ref_rejected = reference.pairs()
        return dpo_loss(chosen - ref_chosen, rejected - ref_rejected, self.args.beta, self.args.label_smoothing)


class IPOObjective(_ReferenceObjective):
    """IPO on the length-averaged completion log-ratios (see the module docstring)."""

    name: ClassVar[str] = "ipo"
    args_type: ClassVar[type] = IPOArgs

    def pair_losses(self, policy: SequenceLogps, reference: SequenceLogps) -> torch.Tensor:
        chosen, rejected = policy.pairs(average=True)
        ref_chosen, ref_rejected = reference.pairs(average=True)
        return ipo_loss(chosen - ref_chosen, rejected - ref_rejected, self.args.beta)
