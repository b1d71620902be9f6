"""ORPO (Hong et al., 2024): supervised fine-tuning on the chosen completion plus an odds-ratio preference term.

With ``a_w`` and ``a_l`` the policy's log-probabilities of the chosen and rejected completions averaged over their
tokens (TRL's definition), the log odds ratio is ``l = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))`` and each
pair's loss is ``-a_w - beta log sigmoid(l)``: the mean token NLL of the chosen completion (the paper's L_SFT) and
``beta`` (lambda in the paper) times the odds-ratio term. The odds-ratio term is TRL's
``ORPOTrainer.odds_ratio_loss``; the NLL is over the completion's tokens only (prompt tokens are never trained;
TRL's ORPOTrainer averages its NLL over the prompt tokens as well, and over the batch's tokens rather than per pair).

Metrics (TRL's names, summed over pairs): ``rewards/*`` from ``beta a``, ``logps/*`` the averages ``a``,
``nll_loss``, ``log_odds_ratio`` (``log sigmoid(l)``) and ``log_odds_chosen`` (``l``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from litft.train.objectives.base import ObjectiveOutput
from litft.train.objectives.dpo import check_beta
from litft.train.objectives.logps import PREFERENCE_METRICS, PreferenceObjective, preference_metrics

_MINUS_LN2 = -math.log(2.0)


@dataclass
class ORPOArgs:
    """Odds Ratio Preference Optimization (no reference model).

    Args:
        beta: Weight of the odds-ratio term against the NLL of the chosen completion (lambda in the ORPO paper,
            TRL's ``beta``).
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        check_beta(self.beta, "orpo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-ln 2``."""
    return torch.where(x < _MINUS_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """``log(odds(y_w) / odds(y_l))`` with ``odds(y) = p / (1 - p)`` and ``p`` the length-normalised probability."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair ORPO loss: mean token NLL of the chosen completion minus ``beta`` log sigmoid(log odds ratio)."""
    odds_term = F.logsigmoid(log_odds_ratio(chosen_mean_logps, rejected_mean_logps))
    return -chosen_mean_logps.float() - beta * odds_term


class ORPOObjective(PreferenceObjective):
    """ORPO on the (2B, T) preference rows (see the module docstring)."""

    name: ClassVar[str] = "orpo"
    args_type: ClassVar[type] = ORPOArgs
    metrics: ClassVar[tuple[str, ...]] = (*PREFERENCE_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        chosen, rejected = self.policy_logps(input_ids, labels, segment_ids).pairs(average=True)
        beta = self.args.beta
        losses = orpo_loss(chosen, rejected, beta)
        log_odds = log_odds_ratio(chosen, rejected).detach()
        metrics = preference_metrics(beta * chosen, beta * rejected, chosen, rejected)
        metrics["nll_loss"] = -chosen.detach().float().sum()
        metrics["log_odds_ratio"] = F.logsigmoid(log_odds).sum()
        metrics["log_odds_chosen"] = log_odds.sum()
        return ObjectiveOutput(losses.sum(), metrics)
