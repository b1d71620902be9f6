"""Post-training through the real command line (``litft finetune <method> ... --objective dpo|simpo|orpo|kd``) on
tiny models: DPO starts at ln 2 and raises the held-out implicit-reward accuracy computed with transformers on the
``convert to_hf`` export against the base model; SimPO and ORPO runs train and export; distillation lowers the
held-out KL(teacher || student); a DPO run resumes step-exactly; DDP (2 gloo processes) gives one process's losses
for DPO and KD, FSDP for DPO (full fine-tuning: the frozen reference copy is sharded too); bad input is refused
before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F

from litft.train.metrics import read_metrics
from tests.inprocess_cli import litft, litft_error
from tests.test_finetune import TEMPLATE, TINY, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window", "candle", "forest", "pencil",
         "bridge", "mirror", "rocket", "saddle", "lemon", "harbor", "violin", "meadow", "castle"]
PAIRS = [{"prompt": f"Is the {w} good?", "chosen": " Yes, it is fine.", "rejected": " No, it is bad."} for w in WORDS]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("prefs")
    write_jsonl(d / "train.jsonl", PAIRS[:14])
    write_jsonl(d / "val.jsonl", PAIRS[14:])
    return d


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def pref_args(method: str, checkpoint: Path, data: Path, out: Path, *extra: object) -> list[object]:
    lora = ["--lora.r", 8, "--lora.alpha", 16, "--lora.dropout", 0, "--lora.targets", "[all-linear]"] \
        if method == "lora" else []
    return ["finetune", method, checkpoint, "--out_dir", out, "--data.train_path", data / "train.jsonl",
            "--data.val_path", data / "val.jsonl", "--train.global_batch_size", 7, "--train.micro_batch_size", 7,
            "--train.max_seq_length", 64, "--train.lr_schedule", "constant", "--accelerator", "cpu",
            "--precision", "32-true", *lora, *extra]


# ------------------------------------------------------------------------------------------------ DPO learns


def completion_logps(model, tokenizer, rows: list[dict], side: str) -> torch.Tensor:
    """Summed log-probabilities (transformers) of each row's completion after its prompt."""
    sums = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row[side])["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        sums.append(logp[len(prompt) - 1:].sum())
    return torch.stack(sums)


def implicit_reward_accuracy(policy_dir: Path, base_dir: Path, rows: list[dict]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, torch_dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    rewards = {side: completion_logps(policy, tokenizer, rows, side) - completion_logps(base, tokenizer, rows, side)
               for side in ("chosen", "rejected")}
    return float((rewards["chosen"] > rewards["rejected"]).float().mean())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_ln2_and_learns_held_out_preferences(method: str, tiny_llama_native: Path, tiny_llama_hf: Path,
                                                          prefs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    lr = 1e-2 if method == "lora" else 2e-3
    litft(*pref_args(method, tiny_llama_native, prefs, out, "--objective", "dpo", "--objective.beta", 0.5,
                     "--train.max_steps", 10, "--train.lr", lr))
    records = read_metrics(out)
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert name in first and math.isfinite(first[name])
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["objective"] == {"name": "dpo", "beta": 0.5, "label_smoothing": 0.0}
    litft("convert", "to_hf", out / "final", tmp_path / "hf")
    assert implicit_reward_accuracy(tiny_llama_hf, tiny_llama_hf, PAIRS[14:]) == 0.0  # the base ties every pair
    assert implicit_reward_accuracy(tmp_path / "hf", tiny_llama_hf, PAIRS[14:]) >= 5 / 6


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_simpo_and_orpo_train_and_export(objective: str, tiny_llama_native: Path, prefs: Path,
                                         tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from litft.checkpoint import load_checkpoint

    out = tmp_path / "run"
    litft(*pref_args("lora", tiny_llama_native, prefs, out, "--objective", objective, "--train.max_steps", 6,
                     "--train.lr", 1e-2))
    got = losses(out)
    assert got[6] < got[1], got
    assert any("rewards/accuracies" in r for r in read_metrics(out))  # TRL's names
    litft("convert", "to_hf", out / "final", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        want = load_checkpoint(out / "final").eval()(ids)
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ distillation


@pytest.fixture(scope="module")
def kd_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kd")
    make_checkpoint(d / "student", seed=0)
    make_checkpoint(d / "teacher", seed=1)
    rows = (TINY / "data" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[64:80]) + "\n")
    return d


def kd_args(work: Path, out: Path, *extra: object, method: str = "full") -> list[object]:
    return ["finetune", method, work / "student", "--out_dir", out, "--data.train_path", work / "train.jsonl",
            "--data.val_path", work / "val.jsonl", "--data.format", "template", "--data.template", TEMPLATE,
            "--train.global_batch_size", 8, "--train.micro_batch_size", 4, "--accelerator", "cpu",
            "--precision", "32-true", "--objective", "kd", "--objective.teacher", work / "teacher", *extra]


def held_out_kl(student_dir: Path, teacher_dir: Path, val: Path) -> float:
    """Mean KL(teacher || student) over the trained tokens of the validation rows, computed here."""
    from litft.checkpoint import load_checkpoint
    from litft.data import DataArgs, load_datasets
    from litft.tokenizer import Tokenizer

    _, samples, _ = load_datasets(DataArgs(train_path=val, val_path=val, format="template", template=TEMPLATE),
                                  Tokenizer(student_dir), 64)
    student, teacher = load_checkpoint(student_dir).eval(), load_checkpoint(teacher_dir).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids, labels = torch.tensor([s.input_ids]), torch.tensor(s.labels)
            keep = labels != -100
            t = F.log_softmax(teacher(ids)[0][keep].float(), -1)
            p = F.log_softmax(student(ids)[0][keep].float(), -1)
            total += float((t.exp() * (t - p)).sum())
            n += int(keep.sum())
    return total / n


def test_kd_lowers_the_held_out_kl(kd_work: Path, tmp_path: Path) -> None:
    out = tmp_path / "kd"
    litft(*kd_args(kd_work, out, "--objective.kd_weight", 1.0, "--train.max_steps", 12, "--train.lr", 1e-2))
    before = held_out_kl(kd_work / "student", kd_work / "teacher", kd_work / "val.jsonl")
    after = held_out_kl(out / "final", kd_work / "teacher", kd_work / "val.jsonl")
    assert after < 0.7 * before, (before, after)
    logged = [r for r in read_metrics(out) if "kd_loss" in r]
    assert logged and all("ce_loss" in r for r in logged)
    assert logged[0]["loss"] == pytest.approx(logged[0]["kd_loss"], rel=1e-5)  # kd_weight 1: the loss is the KL
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["objective"]["name"] == "kd" and run["objective"]["teacher"] == str(kd_work / "teacher")


# ------------------------------------------------------------------------------------------------ resume


def test_dpo_resumes_step_exactly(tiny_llama_native: Path, prefs: Path, tmp_path: Path) -> None:
    common = ["--objective", "dpo", "--train.max_steps", 4, "--train.lr", 1e-2, "--train.save_interval", 2,
              "--train.global_batch_size", 4, "--train.micro_batch_size", 2]
    litft(*pref_args("lora", tiny_llama_native, prefs, tmp_path / "whole", *common))
    cut = tmp_path / "cut"
    args = [str(a) for a in pref_args("lora", tiny_llama_native, prefs, cut, *common)]
    r = subprocess.run([sys.executable, str(REPO / "tests" / "fault_launcher.py"), *args], cwd=REPO,
                       env={**os.environ, "LITFT_FAULT_DIE": "0:3"}, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert not (cut / "final").exists() and (cut / "checkpoints" / "step-2").is_dir()
    litft(*pref_args("lora", tiny_llama_native, prefs, cut, *common, "--resume", "auto"))
    assert losses(cut) == losses(tmp_path / "whole")


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_anything_is_written(tiny_llama_native: Path, prefs: Path, kd_work: Path,
                                                         tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    write_jsonl(bad / "train.jsonl", PAIRS[:3] + [{"prompt": "Is it?", "chosen": " Yes."}])
    write_jsonl(bad / "val.jsonl", PAIRS[14:])
    out = tmp_path / "out"
    err = litft_error(capsys, *pref_args("lora", tiny_llama_native, bad, out, "--objective", "dpo"))
    assert f"{bad / 'train.jsonl'}:4: row has no field 'rejected'" in err, err
    assert not out.exists()

    err = litft_error(capsys, *kd_args(kd_work, out, "--train.max_steps", 1)[:2], tiny_llama_native,
                      *kd_args(kd_work, out, "--train.max_steps", 1)[3:])
    assert (f"the teacher {kd_work / 'teacher'} has a vocabulary of 100 tokens, the student {tiny_llama_native} "
            "has 400") in err, err
    assert not out.exists()

    err = litft_error(capsys, "finetune", "lora", tiny_llama_native, "--out_dir", out, "--data.train_path",
                      kd_work / "train.jsonl", "--accelerator", "cpu", "--objective", "dpo")
    assert f"{kd_work / 'train.jsonl'}:1: row has no field 'chosen'" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ DDP and FSDP


def torchrun2(args: list[object]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "litft", *[str(a) for a in args], "--devices", "2"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


@pytest.fixture(scope="module")
def char_prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preference pairs for the character-tokenizer checkpoints of :func:`make_checkpoint`."""
    d = tmp_path_factory.mktemp("char_prefs")
    write_jsonl(d / "train.jsonl", PAIRS[:16])
    write_jsonl(d / "val.jsonl", PAIRS[16:])
    return d


@pytest.mark.parametrize("objective", ["dpo", "kd"])
def test_ddp_matches_one_process(objective: str, kd_work: Path, char_prefs: Path, tmp_path: Path) -> None:
    steps = ["--train.max_steps", 3, "--train.lr", 1e-2, "--train.global_batch_size", 8, "--train.micro_batch_size",
             2, "--train.lr_schedule", "constant"]

    def make(out: Path) -> list[object]:
        if objective == "dpo":
            return pref_args("lora", kd_work / "student", char_prefs, out, "--objective", "dpo", *steps)
        return kd_args(kd_work, out, *steps, "--lora.dropout", 0, method="lora")

    litft(*make(tmp_path / "one"))
    torchrun2(make(tmp_path / "two") + ["--strategy", "ddp"])
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (got, want)


@pytest.mark.slow
def test_fsdp_full_dpo_matches_one_process(kd_work: Path, char_prefs: Path, tmp_path: Path) -> None:
    """Full fine-tuning's frozen reference copy is sharded like the policy."""
    steps = ["--objective", "dpo", "--train.max_steps", 3, "--train.lr", 1e-3, "--train.global_batch_size", 8,
             "--train.micro_batch_size", 2, "--train.lr_schedule", "constant"]
    litft(*pref_args("full", kd_work / "student", char_prefs, tmp_path / "one", *steps))
    torchrun2(pref_args("full", kd_work / "student", char_prefs, tmp_path / "two", *steps) + ["--strategy", "fsdp"])
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3] and got[1] == pytest.approx(math.log(2), abs=1e-4)
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (got, want)
