"""SimPO (Meng et al., 2024): a reference-free preference loss on length-normalised log-probabilities.

With ``a_w`` and ``a_l`` the policy's log-probabilities of the chosen and rejected completions averaged over their
tokens, each pair's loss is ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` with
``z = beta (a_w - a_l) - gamma``: the reward ``beta a`` of the chosen completion should exceed the rejected one's
by the margin ``gamma``. This is TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and ``cpo_alpha=0``.

Metrics (TRL's names, summed over pairs): ``rewards/*`` from ``beta a``; ``logps/*`` are the averages ``a``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from litft.train.objectives.base import ObjectiveOutput
from litft.train.objectives.dpo import check_beta
from litft.train.objectives.logps import PreferenceObjective, preference_metrics


@dataclass
class SimPOArgs:
    """Simple Preference Optimization (no reference model). The defaults are the SimPO authors' (beta 2.0,
    gamma/beta 0.25); TRL's CPOConfig defaults beta to 0.1.

    Args:
        beta: Scale of the reward ``beta * (mean token log-probability)``.
        gamma: Target reward margin between the chosen and the rejected completion (TRL's ``simpo_gamma``).
        label_smoothing: Probability that a preference label is flipped, in [0, 0.5) (conservative form).
    """

    beta: float = 2.0
    gamma: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_beta(self.beta, "simpo")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss from the length-normalised log-probabilities of the chosen and rejected completions."""
    logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


class SimPOObjective(PreferenceObjective):
    """SimPO on the (2B, T) preference rows (see the module docstring)."""

    name: ClassVar[str] = "simpo"
    args_type: ClassVar[type] = SimPOArgs

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        chosen, rejected = self.policy_logps(input_ids, labels, segment_ids).pairs(average=True)
        args = self.args
        losses = simpo_loss(chosen, rejected, args.beta, args.gamma, args.label_smoothing)
        return ObjectiveOutput(losses.sum(), preference_metrics(args.beta * chosen, args.beta * rejected,
                                                                chosen, rejected))
