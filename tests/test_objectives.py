"""Preference and distillation objectives against their oracles.

TRL 1.16 is the oracle for the preference losses:
- DPO and IPO: ``trl.DPOTrainer._compute_loss`` (the whole TRL step: its fused-head log-probabilities of a
  transformers model and of a reference transformers model, its loss and its metrics), called on a minimal
  trainer object holding only the attributes that method reads;
- DPO's label smoothing (conservative DPO, which TRL 1.16's DPOTrainer no longer offers for ``sigmoid``):
  ``trl.experimental.cpo.CPOTrainer.cpo_loss`` (``loss_type="sigmoid"``, its conservative form) applied to the
  policy-minus-reference log-ratios;
- SimPO: ``CPOTrainer.get_batch_logps`` (average) on the transformers logits + ``CPOTrainer.cpo_loss`` with
  ``loss_type="simpo"`` (SimPO is CPO with ``cpo_alpha=0``);
- ORPO: ``ORPOTrainer.get_batch_logps`` (average) + ``ORPOTrainer.odds_ratio_loss``, plus the NLL of the chosen
  completion from the same TRL log-probabilities (litft does not train prompt tokens; TRL's ORPO NLL does).
litft runs the same weights converted to its own model; losses, metrics and the gradients of every parameter
(mapped to transformers names) agree within 1e-5 in fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from litft.data.collate import IGNORE_INDEX
from litft.train.objectives.base import ObjectiveContext
from litft.train.objectives.dpo import DPOArgs, DPOObjective, IPOArgs, IPOObjective, dpo_loss
from litft.train.objectives.logps import sequence_logps
from litft.train.objectives.orpo import ORPOArgs, ORPOObjective
from litft.train.objectives.simpo import SimPOArgs, SimPOObjective
from litft.weights import load_model
from tests.conftest import TINY_VOCAB

trl = pytest.importorskip("trl")

TOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reference_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second tiny Llama (other weights) as the reference policy: (transformers folder, litft folder)."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("reference")
    make_hf_model("llama", root / "hf", seed=1, overrides={"vocab_size": TINY_VOCAB})
    make_bpe_tokenizer(root / "hf")
    return root / "hf", convert_from_hf(root / "hf", root / "native")


def make_pairs(seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 4, 6), (5, 2, 3), (4, 7, 2)]

    def ids(n: int) -> list[int]:
        return torch.randint(0, TINY_VOCAB, (n,), generator=g).tolist()

    return [(ids(p), ids(c), ids(r)) for p, c, r in lengths]


def litft_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """The (2B, T) layout: chosen rows then rejected rows, inputs = sequence[:-1], labels = sequence[1:] with
    the prompt's targets -100, right padded."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(c) for p, c in rows) - 1
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        input_ids[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        labels[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(completion)
    return {"input_ids": input_ids, "labels": labels}


def trl_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """The same rows as TRL's DPO collator makes them: whole sequences, attention and completion masks."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    completion = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        attention[i, :n] = 1
        completion[i, len(prompt):n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def trl_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CPO/ORPO's concatenated labels: the whole sequence with prompt and padding -100 (shifted by TRL)."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)


def hf_model(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).train()


class _Accelerator:
    """What TRL's loss code asks of accelerate on one process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather
    unwrap_model = gather


def trl_dpo(policy: Any, reference: Any, batch: dict[str, torch.Tensor], loss_type: str, beta: float
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPOTrainer._compute_loss on a minimal trainer: (mean loss over pairs, TRL's logged metrics)."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    trainer = SimpleNamespace(
        model=policy, ref_model=reference, accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    loss = DPOTrainer._compute_loss(trainer, policy, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def hf_grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def litft_grads_as_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from litft.convert.hf import native_tensors_to_hf

    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return dict(native_tensors_to_hf(Path("."), model.config, state=grads))


def assert_same_grads(litft_model: torch.nn.Module, hf: Any) -> None:
    ours, theirs = litft_grads_as_hf(litft_model), hf_grads(hf)
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, **TOL, msg=lambda m: f"{name}: {m}")


def run_objective(objective: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Forward + backward of the mean loss over pairs; returns it and the metrics averaged over pairs."""
    units = objective.units(batch)
    out = objective(**batch)
    (out.loss / units).backward()
    return out.loss.detach() / units, {k: float(v) / units for k, v in out.metrics.items()}


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected")


# ------------------------------------------------------------------------------------------------ DPO / IPO


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl(loss_type: str, tiny_llama_hf: Path, tiny_llama_native: Path,
                               reference_checkpoints: tuple[Path, Path]) -> None:
    ref_hf, ref_native = reference_checkpoints
    pairs = make_pairs()
    beta = 0.3
    policy_hf = hf_model(tiny_llama_hf)
    trl_loss, trl_metrics = trl_dpo(policy_hf, hf_model(ref_hf), trl_batch(pairs), loss_type, beta)
    trl_loss.backward()

    model = load_model(tiny_llama_native)
    context = ObjectiveContext(load_frozen_copy=lambda: load_model(ref_native))
    objective = (DPOObjective(model, DPOArgs(beta=beta), context) if loss_type == "sigmoid"
                 else IPOObjective(model, IPOArgs(beta=beta), context))
    assert objective.reference_model is not None and not any(p.requires_grad
                                                             for p in objective.reference_model.parameters())
    assert "reference_model" not in dict(objective.named_children())  # never saved or trained with the policy
    loss, metrics = run_objective(objective, litft_batch(pairs))

    assert loss.item() > 0.1  # the reference differs from the policy: a non-trivial loss
    torch.testing.assert_close(loss, trl_loss.detach(), **TOL)
    for name in PREFERENCE_METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert_same_grads(model, policy_hf)


def test_dpo_label_smoothing_matches_trl_conservative_loss() -> None:
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    chosen = (torch.randn(6, generator=g) * 3).requires_grad_()
    rejected = (torch.randn(6, generator=g) * 3).requires_grad_()
    beta, eps = 0.2, 0.15
    ours = dpo_loss(chosen, rejected, beta, eps).mean()
    ours_grads = torch.autograd.grad(ours, (chosen, rejected))
    trainer = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps,
                              simpo_gamma=0.0, accelerator=_Accelerator())
    theirs = CPOTrainer.cpo_loss(trainer, chosen, rejected)[0].mean()
    theirs_grads = torch.autograd.grad(theirs, (chosen, rejected))
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, **TOL)


@contextlib.contextmanager
def lora_off(model: torch.nn.Module) -> Iterator[None]:
    """The reference of a LoRA policy: every LoRA branch scaled by 0 (what the method registry will provide)."""
    from litft.peft.lora import lora_modules

    modules = lora_modules(model).values()
    saved = [m.scaling for m in modules]
    for m in modules:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(modules, saved):
            m.scaling = s


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_at_init_is_ln2(method: str, tiny_llama_native: Path) -> None:
    from litft.peft.lora import LoRAArgs, apply_lora

    model = load_model(tiny_llama_native)
    if method == "lora":
        model = apply_lora(model, LoRAArgs(r=4, targets=["all-linear"]))
        context = ObjectiveContext(reference=lambda: lora_off(model))
    else:
        context = ObjectiveContext(load_frozen_copy=lambda: load_model(tiny_llama_native))
    objective = DPOObjective(model, DPOArgs(beta=0.1), context)
    loss, metrics = run_objective(objective, litft_batch(make_pairs()))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == 0.0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_lora_reference_is_the_base_model(tiny_llama_native: Path) -> None:
    """With LoRA trained away from zero, the reference forward (LoRA off) gives the base model's log-probs."""
    from litft.peft.lora import LoRAArgs, apply_lora, lora_modules

    model = apply_lora(load_model(tiny_llama_native), LoRAArgs(r=4, targets=["all-linear"]))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)
    objective = DPOObjective(model, DPOArgs(), ObjectiveContext(reference=lambda: lora_off(model)))
    batch = litft_batch(make_pairs())
    reference = objective.reference_logps(**batch)
    with torch.no_grad():
        base = sequence_logps(load_model(tiny_llama_native), **batch)
        policy = sequence_logps(model, **batch)
    torch.testing.assert_close(reference.sum, base.sum, **TOL)
    assert (policy.sum - base.sum).abs().max() > 1e-2  # the LoRA policy itself differs
    assert run_objective(objective, batch)[0].item() != pytest.approx(math.log(2), abs=1e-3)


def test_chunked_head_gives_the_same_loss_and_grads(tiny_llama_native: Path,
                                                    reference_checkpoints: tuple[Path, Path]) -> None:
    batch = litft_batch(make_pairs())
    results = []
    for chunk in (None, 3):
        model = load_model(tiny_llama_native)
        context = ObjectiveContext(load_frozen_copy=lambda: load_model(reference_checkpoints[1]),
                                   loss_chunk_size=chunk)
        loss, metrics = run_objective(DPOObjective(model, DPOArgs(), context), batch)
        results.append((loss, metrics, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    assert metrics_a == pytest.approx(metrics_b, abs=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **TOL)


# ------------------------------------------------------------------------------------------------ SimPO / ORPO


def _trl_average_logps(policy_hf: Any, batch: dict[str, torch.Tensor], trainer_cls: Any) -> tuple[torch.Tensor, ...]:
    logits = policy_hf(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = trainer_cls.get_batch_logps(logits, trl_labels(batch), average_log_prob=True)
    return logps.chunk(2)


def test_simpo_matches_trl(tiny_llama_hf: Path, tiny_llama_native: Path) -> None:
    from trl.experimental.cpo import CPOTrainer

    pairs, args = make_pairs(1), SimPOArgs(beta=2.0, gamma=0.7, label_smoothing=0.1)
    policy_hf = hf_model(tiny_llama_hf)
    chosen, rejected = _trl_average_logps(policy_hf, trl_batch(pairs), CPOTrainer)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=args.beta, simpo_gamma=args.gamma,
                              label_smoothing=args.label_smoothing, accelerator=_Accelerator())
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    trl_loss = losses.mean()  # + cpo_alpha (0 for SimPO) * NLL
    trl_loss.backward()

    model = load_model(tiny_llama_native)
    loss, metrics = run_objective(SimPOObjective(model, args, ObjectiveContext()), litft_batch(pairs))
    torch.testing.assert_close(loss, trl_loss.detach(), **TOL)
    expected = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value.item(), abs=1e-5), name
    assert_same_grads(model, policy_hf)


def test_orpo_matches_trl(tiny_llama_hf: Path, tiny_llama_native: Path) -> None:
    from trl.experimental.orpo import ORPOTrainer

    pairs, args = make_pairs(2), ORPOArgs(beta=0.25)
    policy_hf = hf_model(tiny_llama_hf)
    chosen, rejected = _trl_average_logps(policy_hf, trl_batch(pairs), ORPOTrainer)
    trainer = SimpleNamespace(beta=args.beta, accelerator=_Accelerator())
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected)
    nll = -chosen.mean()  # the chosen completion's mean token NLL (litft trains no prompt token)
    trl_loss = nll - losses.mean()
    trl_loss.backward()

    model = load_model(tiny_llama_native)
    loss, metrics = run_objective(ORPOObjective(model, args, ObjectiveContext()), litft_batch(pairs))
    torch.testing.assert_close(loss, trl_loss.detach(), **TOL)
    expected = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": nll,
                "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds_chosen}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value.item(), abs=1e-5), name
    assert_same_grads(model, policy_hf)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_arguments_and_batches_are_refused(tiny_llama_native: Path) -> None:
    with pytest.raises(ValueError, match=r"objective.beta must be > 0 for dpo, got 0"):
        DPOArgs(beta=0)
    with pytest.raises(ValueError, match=r"objective.label_smoothing must be in \[0, 0.5\), got 0.5"):
        DPOArgs(label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"objective.beta must be > 0 for simpo"):
        SimPOArgs(beta=-1.0)
    model = load_model(tiny_llama_native)
    with pytest.raises(ValueError, match="'dpo' needs a reference policy"):
        DPOObjective(model, DPOArgs(), ObjectiveContext())
    batch = litft_batch(make_pairs())
    with pytest.raises(ValueError, match="'simpo' takes padded preference pairs, not packed rows"):
        SimPOObjective(model, SimPOArgs(), ObjectiveContext())(**batch, segment_ids=torch.ones_like(batch["labels"]))
    with pytest.raises(ValueError, match="even number of rows"):
        SimPOObjective.units({"input_ids": batch["input_ids"][:3]})
    assert SimPOObjective.units(batch) == 3 and SimPOObjective.needs_pairs


def test_per_row_logps_are_the_log_softmax_of_the_logits(tiny_llama_native: Path) -> None:
    """The hidden-state path scores exactly the target tokens: compare with the full logits."""
    model = load_model(tiny_llama_native)
    batch = litft_batch(make_pairs())
    with torch.no_grad():
        logps = sequence_logps(model, **batch)
        full = F.log_softmax(model(batch["input_ids"]).float(), dim=-1)
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX
    token = full.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2) * mask
    torch.testing.assert_close(logps.sum, token.sum(1), **TOL)
    assert logps.count.tolist() == mask.sum(1).tolist()


# ------------------------------------------------------------------------------------------------ KD


def sft_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    """Padded SFT rows with prompt positions masked."""
    pairs = make_pairs(seed)
    batch = litft_batch(pairs)
    return {"input_ids": batch["input_ids"][:3], "labels": batch["labels"][:3]}


def direct_kd(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
              weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD written out with torch.nn.functional on the full logits: (loss, kd, ce) summed over target tokens."""
    mask = batch["labels"] != IGNORE_INDEX
    student_logits = student(batch["input_ids"])[mask]
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"])[mask]
    kd = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                  F.log_softmax(teacher_logits / temperature, dim=-1), log_target=True,
                  reduction="sum") * temperature ** 2
    ce = F.cross_entropy(student_logits, batch["labels"][mask], reduction="sum")
    return weight * kd + (1 - weight) * ce, kd, ce


@pytest.mark.parametrize("chunk", [None, 4])
def test_kd_matches_a_direct_computation(chunk: Any, tiny_llama_native: Path,
                                         reference_checkpoints: tuple[Path, Path]) -> None:
    from litft.train.objectives.kd import KDArgs, KDObjective, load_teacher

    args = KDArgs(teacher=reference_checkpoints[1], temperature=2.0, kd_weight=0.7)
    batch = sft_batch()
    expected_model = load_model(tiny_llama_native)
    expected, expected_kd, expected_ce = direct_kd(expected_model, load_model(args.teacher), batch, 2.0, 0.7)
    expected.backward()

    model = load_model(tiny_llama_native)
    teacher = load_teacher(args, tiny_llama_native)
    objective = KDObjective(model, args, ObjectiveContext(teacher=teacher, loss_chunk_size=chunk))
    assert "teacher" not in dict(objective.named_children())
    out = objective(**batch)
    out.loss.backward()
    assert KDObjective.units(batch) == int((batch["labels"] != IGNORE_INDEX).sum())
    assert expected_kd.item() > 0.1
    torch.testing.assert_close(out.loss, expected.detach(), **TOL)
    torch.testing.assert_close(out.metrics["kd_loss"], expected_kd.detach(), **TOL)
    torch.testing.assert_close(out.metrics["ce_loss"], expected_ce.detach(), **TOL)
    grads = dict(expected_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, **TOL, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_kd_on_packed_rows_equals_padded_rows(tiny_llama_native: Path,
                                              reference_checkpoints: tuple[Path, Path]) -> None:
    from litft.data import Sample
    from litft.data.collate import pack_batch, pad_batch
    from litft.train.objectives.kd import KDArgs, KDObjective

    padded = sft_batch()
    samples = []
    for ids, labels in zip(padded["input_ids"], padded["labels"]):
        n = int((labels != IGNORE_INDEX).nonzero().max()) + 1
        samples.append(Sample(ids[:n].tolist(), labels[:n].tolist()))
    objective = KDObjective(load_model(tiny_llama_native), KDArgs(temperature=1.5),
                            ObjectiveContext(teacher=load_model(reference_checkpoints[1])))
    with torch.no_grad():
        one = objective(**pad_batch(samples, 0))
        packed = objective(**pack_batch([samples], 0))
    torch.testing.assert_close(packed.loss, one.loss, **TOL)
    torch.testing.assert_close(packed.metrics["kd_loss"], one.metrics["kd_loss"], **TOL)


def test_teacher_with_another_vocabulary_is_refused(tiny_llama_native: Path, tmp_path: Path) -> None:
    import json

    from litft.train.objectives.kd import KDArgs, check_teacher_vocabulary, load_teacher
    from tests.fixtures_tokenizers import copy_checkpoint, make_sentencepiece_tokenizer

    bigger = copy_checkpoint(tiny_llama_native, tmp_path / "bigger")
    spec = json.loads((bigger / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": TINY_VOCAB, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (bigger / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"the teacher {bigger} has a vocabulary of {TINY_VOCAB + 1} tokens, the "
                                         rf"student {tiny_llama_native} has {TINY_VOCAB}: knowledge distillation"):
        load_teacher(KDArgs(teacher=bigger), tiny_llama_native)

    other = copy_checkpoint(tiny_llama_native, tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (other / name).unlink(missing_ok=True)
    make_sentencepiece_tokenizer(other)
    with pytest.raises(ValueError, match=r"both have 400 tokens but different vocabularies \(token id \d+ is"):
        check_teacher_vocabulary(other, tiny_llama_native)
    with pytest.raises(FileNotFoundError, match="objective.teacher '.*missing' is not a checkpoint directory"):
        check_teacher_vocabulary(tmp_path / "missing", tiny_llama_native)
    with pytest.raises(ValueError, match="objective 'kd' needs a teacher"):
        load_teacher(KDArgs(), tiny_llama_native)
    with pytest.raises(ValueError, match=r"objective.kd_weight must be in \[0, 1\], got 1.5"):
        KDArgs(kd_weight=1.5)
    with pytest.raises(ValueError, match=r"objective.temperature must be > 0, got 0"):
        KDArgs(temperature=0)


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("cls, argv, expected", [
    ("dpo:DPOArgs", ["--objective.beta", "0.2", "--objective.label_smoothing", "0.1"],
     dict(beta=0.2, label_smoothing=0.1)),
    ("dpo:IPOArgs", ["--objective.beta", "0.5"], dict(beta=0.5)),
    ("simpo:SimPOArgs", ["--objective.gamma", "1.0"], dict(beta=2.0, gamma=1.0, label_smoothing=0.0)),
    ("orpo:ORPOArgs", ["--objective.beta", "0.2"], dict(beta=0.2)),
    ("kd:KDArgs", ["--objective.teacher", "teacher_dir", "--objective.temperature", "2"],
     dict(teacher=Path("teacher_dir"), temperature=2.0, kd_weight=0.5)),
])
def test_objective_arguments_parse_with_jsonargparse(cls: str, argv: list[str], expected: dict) -> None:
    import dataclasses
    import importlib
    import io

    from jsonargparse import ArgumentParser

    module, name = cls.split(":")
    args_class = getattr(importlib.import_module(f"litft.train.objectives.{module}"), name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(args_class, "objective")
    parsed = parser.instantiate(parser.parse_args(argv)).objective
    assert dataclasses.asdict(parsed) == expected
    help_text = io.StringIO()
    parser.print_help(help_text)
    for field in dataclasses.fields(args_class):  # every option is documented in --help
        assert f"--objective.{field.name}" in help_text.getvalue()
    assert "(type:" in help_text.getvalue() and args_class.__doc__.split("\n")[0][:20] in help_text.getvalue()


# ------------------------------------------------------------------------------------------------ learning


def test_a_short_dpo_lora_run_learns_held_out_preferences(tiny_llama_native: Path, tmp_path: Path) -> None:
    """Preference rows → PairBatchIterator → DPO with a LoRA policy (reference: LoRA off) → AdamW: the implicit
    reward ranks held-out pairs correctly (at step 0 every reward is 0, so the accuracy is 0)."""
    import json

    from litft.data import DataArgs
    from litft.data.preference import PairBatchIterator, load_preference_datasets
    from litft.peft.lora import LoRAArgs, apply_lora
    from litft.tokenizer import Tokenizer

    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window", "candle", "forest", "pencil",
             "bridge", "mirror", "rocket", "saddle", "lemon", "harbor", "violin", "meadow", "castle"]
    rows = [{"prompt": f"Is the {w} good?", "chosen": " Yes, it is fine.", "rejected": " No, it is bad."}
            for w in words]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[14:]))
    train, val, _ = load_preference_datasets(DataArgs(train_path=tmp_path), Tokenizer(tiny_llama_native), 64)
    assert (len(train), len(val)) == (14, 6)

    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_llama_native), LoRAArgs(r=8, alpha=16, targets=["all-linear"]))
    objective = DPOObjective(model, DPOArgs(beta=0.5), ObjectiveContext(reference=lambda: lora_off(model)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    held_out = PairBatchIterator(val, 6, 64, pad_id=0, shuffle=False).batch(0, 0)

    def accuracy() -> float:
        with torch.no_grad():
            return float(objective(**held_out).metrics["rewards/accuracies"]) / 6

    assert accuracy() == 0.0
    batches = PairBatchIterator(train, 7, 64, pad_id=0, seed=1)
    for _ in range(5):
        for batch in batches:
            out = objective(**batch)
            optimizer.zero_grad()
            (out.loss / objective.units(batch)).backward()
            optimizer.step()
    assert accuracy() == 1.0


# ------------------------------------------------------------------------------------------------ DDP


def _objective_for(kind: str, native: Path, teacher: Path) -> torch.nn.Module:
    from litft.peft.lora import LoRAArgs, apply_lora
    from litft.train.objectives.kd import KDArgs, KDObjective

    torch.manual_seed(0)
    model = apply_lora(load_model(native), LoRAArgs(r=4, dropout=0.0, targets=["all-linear"]))
    with torch.no_grad():  # a LoRA policy away from its reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    if kind == "dpo":
        return DPOObjective(model, DPOArgs(beta=0.5), ObjectiveContext(reference=lambda: lora_off(model)))
    return KDObjective(model, KDArgs(temperature=2.0), ObjectiveContext(teacher=load_model(teacher)))


def _ddp_batches(kind: str) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches (one per rank) of the same global batch."""
    pairs = make_pairs(4) + make_pairs(5)
    if kind == "dpo":
        return [litft_batch(pairs[:3]), litft_batch(pairs[3:])]
    return [sft_batch(4), sft_batch(5)]


def _lora_grads(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.requires_grad}


def _ddp_worker(rank: int, kind: str, native: str, teacher: str, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        objective = _objective_for(kind, Path(native), Path(teacher))
        wrapped = DistributedDataParallel(objective)
        batches = _ddp_batches(kind)
        units = sum(type(objective).units(b) for b in batches)  # the whole step's units, as the Trainer counts them
        out_ = wrapped(**batches[rank])
        (out_.loss * 2 / units).backward()  # DDP averages over the 2 ranks
        torch.save(_lora_grads(objective), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "kd"])
def test_ddp_two_processes_match_one_process(kind: str, tiny_llama_native: Path,
                                             reference_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    """DPO (reference = the DDP-wrapped model with LoRA off) and KD (teacher outside the wrapped module) under
    DistributedDataParallel on 2 gloo processes: the averaged gradients equal one process's over the same pairs."""
    import socket

    import torch.multiprocessing as mp

    objective = _objective_for(kind, tiny_llama_native, reference_checkpoints[1])
    batches = _ddp_batches(kind)
    units = sum(type(objective).units(b) for b in batches)
    for batch in batches:
        (objective(**batch).loss / units).backward()
    expected = _lora_grads(objective)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(kind, str(tiny_llama_native), str(reference_checkpoints[1]), port, str(tmp_path)),
             nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sorted(got) == sorted(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, **TOL, msg=lambda m: f"rank {rank} {name}: {m}")
