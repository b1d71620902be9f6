"""Knowledge distillation: the student learns the teacher's next-token distributions on the trained tokens.

On every target token (label != -100: the response tokens of any SFT format, packed or padded), with student logits
``s``, teacher logits ``t``, temperature ``T`` and weight ``w``::

    kd = T^2 * KL(softmax(t / T) || softmax(s / T))        (forward KL, teacher first)
    ce = cross-entropy(s, label)
    loss = w * kd + (1 - w) * ce

The ``T^2`` factor (Hinton et al., 2015) keeps the gradient scale of the KL term independent of ``T``. Only the
hidden states of target positions go through the heads; with ``loss_chunk_size`` both heads run over at most that
many tokens at a time. The teacher is frozen (no gradients, eval mode) and is not a submodule of the objective:
the Trainer places it, and shards it with FSDP when the student is. The teacher must use the student's tokenizer
(:func:`check_teacher_vocabulary`); when the two models pad their embedding matrices to different sizes, the KL
is taken over the ids both have (every id of the tokenizer).

Units are target tokens, as for SFT; metrics (sums over them): ``kd_loss`` and ``ce_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.data.collate import IGNORE_INDEX
from litft.train.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from litft.train.objectives.logps import activation_offload, target_hidden, token_chunks


@dataclass
class KDArgs:
    """Knowledge distillation from a frozen teacher.

    Args:
        teacher: litft checkpoint directory of the teacher (any family; its tokenizer must be the student's).
        temperature: Softmax temperature of both distributions in the KL term (> 0); the term is scaled by its
            square.
        kd_weight: Weight of the KL term in [0, 1]; the cross-entropy on the labels gets ``1 - kd_weight``.
    """

    teacher: Optional[Path] = None
    temperature: float = 1.0
    kd_weight: float = 0.5

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"objective.kd_weight must be in [0, 1], got {self.kd_weight}")


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``T^2 KL(teacher || student)`` at temperature ``T`` and cross-entropy, both fp32 (N,)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student = student_logits.float()
    ce = F.cross_entropy(student, labels, reduction="none")
    student_logp = F.log_softmax(student[:, :vocab] / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits[:, :vocab].float() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)
    return kl * temperature ** 2, ce


class KDObjective(Objective):
    """Forward KL to the teacher mixed with cross-entropy (see the module docstring)."""

    name: ClassVar[str] = "kd"
    args_type: ClassVar[type] = KDArgs
    needs_teacher: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = ("kd_loss", "ce_loss")

    def __init__(self, model: nn.Module, args: KDArgs, context: ObjectiveContext) -> None:
        super().__init__()
        if context.teacher is None:
            raise ValueError("objective 'kd' needs a teacher: set objective.teacher to a litft checkpoint directory")
        self.model = model
        self.args = args
        self.loss_chunk_size = context.loss_chunk_size
        self.offload_activations = context.offload_activations
        # not a submodule: the teacher is neither trained, nor saved, nor wrapped with the student
        object.__setattr__(self, "teacher", context.teacher.requires_grad_(False).eval())

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        with torch.no_grad():
            teacher_hidden, _ = target_hidden(self.teacher, input_ids, labels, positions, segment_ids)
        with activation_offload(self.offload_activations, self):
            hidden, targets = target_hidden(self.model, input_ids, labels, positions, segment_ids)
            losses = token_chunks(self._token_losses, self.loss_chunk_size, (self.model.head, self.teacher.head),
                                  hidden, teacher_hidden, labels[targets])
        kd, ce = losses.unbind(dim=1)
        weight = self.args.kd_weight
        return ObjectiveOutput((weight * kd + (1.0 - weight) * ce).sum(),
                               {"kd_loss": kd.detach().sum(), "ce_loss": ce.detach().sum()})

    def _token_losses(self, heads: tuple[Any, Any], hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        student_head, teacher_head = heads
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        kd, ce = kd_token_losses(student_head(hidden), teacher_logits, labels, self.args.temperature)
        return torch.stack((kd, ce), dim=1)


def check_teacher_vocabulary(teacher_dir: Path, student_dir: Path) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (distillation compares distributions id by id)."""
    from litft.config import Config
    from litft.tokenizer import Tokenizer

    teacher_dir, student_dir = Path(teacher_dir), Path(student_dir)
    if not teacher_dir.is_dir():
        raise FileNotFoundError(f"objective.teacher {str(teacher_dir)!r} is not a checkpoint directory")
    teacher, student = Tokenizer(teacher_dir), Tokenizer(student_dir)
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"the teacher {teacher_dir} has a vocabulary of {teacher.vocab_size} tokens, the student {student_dir} "
            f"has {student.vocab_size}: knowledge distillation needs a teacher with the student's tokenizer"
        )
    for token_id in range(student.vocab_size):
        ours, theirs = student.id_to_token(token_id), teacher.id_to_token(token_id)
        if ours != theirs:
            raise ValueError(
                f"the teacher {teacher_dir} and the student {student_dir} both have {student.vocab_size} tokens but "
                f"different vocabularies (token id {token_id} is {theirs!r} for the teacher, {ours!r} for the "
                f"student): knowledge distillation needs a teacher with the student's tokenizer"
            )
    for directory in (teacher_dir, student_dir):
        rows = Config.from_checkpoint(directory).vocab_size
        if rows < student.vocab_size:
            raise ValueError(f"{directory}: the model has {rows} vocabulary rows, fewer than its tokenizer's "
                             f"{student.vocab_size} tokens")


def load_teacher(args: KDArgs, student_dir: Path, device: str | torch.device = "cpu",
                 dtype: Optional[str | torch.dtype] = None) -> nn.Module:
    """The frozen teacher of ``args``, any litft checkpoint (vocabulary checked against the student's before any
    weight is read)."""
    from litft.checkpoint import load_checkpoint

    if args.teacher is None:
        raise ValueError("objective 'kd' needs a teacher: set objective.teacher to a litft checkpoint directory")
    check_teacher_vocabulary(args.teacher, student_dir)
    return load_checkpoint(args.teacher, device=device, dtype=dtype).requires_grad_(False).eval()
