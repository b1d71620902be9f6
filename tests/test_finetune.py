"""Fine-tuning end to end on CPU (full, LoRA, QLoRA, adapter) with a tiny model, plus the loop's arithmetic and its
errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import litft
from litft.cli import main
from litft.config import Config
from litft.data import DataArgs, Sample, pad_batch
from litft.model import GPT
from litft.train.args import EvalArgs, TrainArgs, parse_duration
from litft.train.checkpoint import load_checkpoint
from litft.train.loop import CausalLMLoss, count_targets, count_tokens, forward_backward, prompt_and_reference
from litft.train.metrics import read_metrics
from litft.train.schedule import lr_at
from litft.weights import copy_tokenizer_files, save_model

TINY = Path(litft.__file__).parent / "assets" / "tiny"
TEMPLATE = "Shout: {{input}}\nAnswer: {{output}}"


def make_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Llama with the tiny demo's character tokenizer (vocab 100)."""
    base = Config.from_checkpoint(TINY / "base")
    fields = dict(n_layer=2, n_embd=32, n_head=2, n_query_groups=1, intermediate_size=64, block_size=64,
                  head_size=None, layer_types=None, tie_embeddings=False)
    config = dataclasses.replace(base, **{**fields, **overrides})
    torch.manual_seed(seed)
    model = GPT(config)
    model.reset_parameters(std=0.1)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    config.save(directory)
    copy_tokenizer_files(TINY / "base", directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "base")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rows = (TINY / "data" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(rows[:48]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[48:56]) + "\n")
    return d


def data_args(data_dir: Path, **kw) -> DataArgs:
    return DataArgs(train_path=data_dir / "train.jsonl", val_path=data_dir / "val.jsonl", format="template",
                    template=TEMPLATE, **kw)


def train_args(**kw) -> TrainArgs:
    base = dict(global_batch_size=8, micro_batch_size=4, max_steps=12, lr=1e-2, warmup_steps=0, log_interval=1)
    return TrainArgs(**{**base, **kw})


COMMON = dict(accelerator="cpu", precision="32-true")


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def check_loads_and_generates(final: Path) -> None:
    from litft.generate.engine import Engine
    from litft.generate.sampling import SamplingParams
    from litft.tokenizer import Tokenizer

    model = load_checkpoint(final)
    tokenizer = Tokenizer(final)
    [result] = Engine(model, tokenizer).generate([tokenizer.encode("Shout: a\nAnswer:")],
                                                 SamplingParams(max_new_tokens=5, stop_token_ids=[]))
    assert len(result.tokens) == 5


# ------------------------------------------------------------------------------------------ end to end


def test_full_finetune_end_to_end(ckpt, data_dir, tmp_path):
    from litft.finetune.full import finetune_full

    out = tmp_path / "out"
    final = finetune_full(ckpt, out, data=data_args(data_dir), train=train_args(save_interval=4, keep_last=2),
                          eval=EvalArgs(interval=4), **COMMON)
    curve = losses(out)
    assert len(curve) == 12 and sum(curve[-3:]) < sum(curve[:3]) - 0.5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-8"]
    assert {"model.safetensors", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()}
    assert not (final / "base.yaml").exists() and not (final / "state.pt").exists()
    records = read_metrics(out)
    assert any("val_loss" in r for r in records) and records[-1]["stop_reason"] == "max_steps"
    assert all(r["tokens_per_s"] > 0 and "peak_memory_rss_gb" in r for r in records if "loss" in r)
    assert list((out / "logs").glob("events.out.tfevents.*"))
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["train"]["lr"] == 1e-2 and run["precision"] == "32-true" and run["train"]["max_seq_length"] == 64
    check_loads_and_generates(final)


def test_lora_end_to_end_merge_and_iterative_finetuning(ckpt, data_dir, tmp_path):
    """LoRA final/ holds adapter files + base.yaml (+ merged weights with merge); a second run starts from the first
    run's final/ with new data and lr, and its final/ loads through the chain."""
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs

    out = tmp_path / "lora"
    lora = LoRAArgs(r=4, alpha=8, dropout=0.1, targets=["all-linear"])
    final = finetune_lora(ckpt, out, data=data_args(data_dir), train=train_args(lr=2e-2), lora=lora, merge=True,
                          **COMMON)
    curve = losses(out)
    assert sum(curve[-3:]) < sum(curve[:3]) - 0.3
    names = {p.name for p in final.iterdir()}
    assert {"lora.safetensors", "lora.yaml", "base.yaml", "model.safetensors", "model_config.yaml",
            "tokenizer.json"} <= names
    assert yaml.safe_load((final / "base.yaml").read_text()) == {"method": "lora",
                                                                  "base_checkpoint": str(ckpt.resolve())}
    x = torch.randint(0, 100, (1, 12))
    merged = load_checkpoint(final)  # model.safetensors: the merged weights
    (final / "model.safetensors").rename(tmp_path / "merged.safetensors")
    unmerged = load_checkpoint(final, merge=False).eval()  # base + lora.safetensors
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), atol=1e-5, rtol=1e-5)
    check_loads_and_generates(final)

    # iterative: new data (val as train) and lr, from the (adapter-only) final/ of the first run
    out2 = tmp_path / "lora2"
    d2 = data_args(data_dir)
    d2 = dataclasses.replace(d2, train_path=data_dir / "val.jsonl", val_path=None, val_split_fraction=0.0)
    final2 = finetune_lora(final, out2, data=d2, train=train_args(lr=5e-3, max_steps=3), lora=lora, **COMMON)
    assert yaml.safe_load((final2 / "base.yaml").read_text())["base_checkpoint"] == str(final.resolve())
    check_loads_and_generates(final2)


def test_qlora_on_cpu_and_dora(ckpt, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs

    out = tmp_path / "qlora"
    final = finetune_lora(ckpt, out, data=data_args(data_dir), train=train_args(lr=2e-2, max_steps=8),
                          lora=LoRAArgs(r=4, alpha=8, targets=["q", "v", "down"], use_dora=True),
                          quantize="bnb.nf4", **COMMON)
    curve = losses(out)
    assert sum(curve[-2:]) < sum(curve[:2])
    assert (final / "lora.safetensors").is_file() and not (final / "model.safetensors").exists()
    check_loads_and_generates(final)


def test_adapter_end_to_end_with_packing_and_activation_checkpointing(ckpt, data_dir, tmp_path):
    from litft.finetune.adapter import finetune_adapter
    from litft.peft import AdapterArgs

    out = tmp_path / "adapter"
    final = finetune_adapter(ckpt, out, data=data_args(data_dir, packing=True),
                             train=train_args(lr=5e-2, activation_checkpointing=True, micro_batch_size=2),
                             adapter=AdapterArgs(prompt_length=4, start_layer=1), **COMMON)
    curve = losses(out)
    assert sum(curve[-3:]) < sum(curve[:3])
    assert {"adapter.safetensors", "adapter.yaml", "base.yaml"} <= {p.name for p in final.iterdir()}
    check_loads_and_generates(final)


def test_generate_samples_prints_accuracy_before_and_after(ckpt, data_dir, tmp_path, capsys):
    from litft.finetune.full import finetune_full

    finetune_full(ckpt, tmp_path / "o", data=data_args(data_dir), train=train_args(max_steps=2),
                  eval=EvalArgs(generate_samples=4, max_new_tokens=6, final_validation=False), **COMMON)
    err = capsys.readouterr().err
    assert "exact match before training:" in err and "exact match after training:" in err
    assert err.count("  reference: ") == 6  # 3 shown before, 3 after
    records = read_metrics(tmp_path / "o")
    assert any("accuracy_before" in r for r in records) and any("accuracy_after" in r for r in records)


def test_run_yaml_reproduces_the_run(ckpt, data_dir, tmp_path):
    """Running `--config out/run.yaml` (with another out_dir) gives the same per-step losses."""
    args = ["finetune", "lora", str(ckpt), "--out_dir", str(tmp_path / "a"), "--accelerator", "cpu",
            "--data.train_path", str(data_dir / "train.jsonl"), "--data.val_path", str(data_dir / "val.jsonl"),
            "--data.template", TEMPLATE, "--train.max_steps", "4", "--train.global_batch_size", "8",
            "--train.micro_batch_size", "4", "--train.lr", "0.01", "--lora.dropout", "0.2", "--lora.r", "2",
            "--eval.final_validation", "false"]
    main(args)
    main(["finetune", "lora", "--config", str(tmp_path / "a" / "run.yaml"), "--out_dir", str(tmp_path / "b")])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a = yaml.safe_load((tmp_path / "a" / "run.yaml").read_text())
    b = yaml.safe_load((tmp_path / "b" / "run.yaml").read_text())
    assert {**a, "out_dir": None} == {**b, "out_dir": None}
    assert a["lora"]["r"] == 2 and a["precision"] == "32-true"


def test_early_stopping_and_max_time(ckpt, data_dir, tmp_path):
    from litft.finetune.full import finetune_full

    # every evaluation after the first fails to improve by 100: patience 1 stops at the second
    finetune_full(ckpt, tmp_path / "early", data=data_args(data_dir), train=train_args(max_steps=20),
                  eval=EvalArgs(interval=2, early_stopping_patience=1, early_stopping_min_delta=100.0), **COMMON)
    records = read_metrics(tmp_path / "early")
    assert records[-1]["final_step"] == 4 and records[-1]["stop_reason"].startswith("early stopping")
    finetune_full(ckpt, tmp_path / "time", data=data_args(data_dir), train=train_args(max_steps=20, max_time=1e-6),
                  **COMMON)
    records = read_metrics(tmp_path / "time")
    assert records[-1]["final_step"] == 1 and records[-1]["stop_reason"].startswith("max_time")
    assert (tmp_path / "time" / "final" / "model.safetensors").is_file()


def test_epochs_bound_the_run(ckpt, data_dir, tmp_path):
    from litft.finetune.full import finetune_full

    # 48 training rows (a val file is given) → 12 micro-batches of 4 per epoch, 3 per step → 8 steps in 2 epochs
    finetune_full(ckpt, tmp_path / "o", data=data_args(data_dir), train=train_args(max_steps=None, epochs=2,
                                                                                  global_batch_size=12), **COMMON)
    records = read_metrics(tmp_path / "o")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == math.ceil(2 * 12 / 3) and steps[-1]["epoch"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ loop arithmetic


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, prompt in ((5, 2), (9, 4), (3, 1), (12, 7)):  # uneven lengths and target counts
        ids = torch.randint(3, 100, (n + 1,), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt + 1:]
        out.append(Sample(ids[:-1], labels))
    return out


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_over_4_micro_batches_equals_one_batch_of_4(ckpt):
    model = load_checkpoint(ckpt)
    loss_model = CausalLMLoss(model)
    samples = _samples()
    whole = [pad_batch(samples, 0)]
    micro = [pad_batch([s], 0) for s in samples]
    n = sum(count_targets(b) for b in micro)
    assert n == count_targets(whole[0])

    total = forward_backward(loss_model, whole, lambda loss: loss.backward(), n)
    g1 = _grads(model)
    model.zero_grad()
    total4 = forward_backward(loss_model, micro, lambda loss: loss.backward(), n)
    g4 = _grads(model)
    assert g1.keys() == g4.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g4[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(total, total4, atol=1e-5, rtol=0)
    # the step loss is the mean over target tokens of the whole step (not a mean of micro-batch means)
    logits = [model(b["input_ids"]) for b in micro]
    per_token = torch.cat([F.cross_entropy(lg[0], b["labels"][0], reduction="none")[b["labels"][0] != -100]
                           for lg, b in zip(logits, micro)])
    torch.testing.assert_close(total4 / n, per_token.mean(), atol=1e-5, rtol=0)


def test_masked_and_padding_tokens_never_contribute(ckpt):
    model = load_checkpoint(ckpt)
    loss_model = CausalLMLoss(model)
    samples = _samples()
    batch = pad_batch(samples, 0)
    n = count_targets(batch)
    forward_backward(loss_model, [batch], lambda loss: loss.backward(), n)
    g = _grads(model)
    model.zero_grad()
    # other pad ids and 5 more padding columns: same loss and gradients
    padded = {"input_ids": F.pad(batch["input_ids"], (0, 5), value=77), "labels": F.pad(batch["labels"], (0, 5),
                                                                                       value=-100)}
    for row, s in enumerate(samples):
        padded["input_ids"][row, len(s):] = 55
    assert not torch.equal(padded["input_ids"][:, :batch["input_ids"].shape[1]], batch["input_ids"])
    loss = forward_backward(loss_model, [padded], lambda loss: loss.backward(), n)
    for k, v in _grads(model).items():
        torch.testing.assert_close(v, g[k], atol=1e-6, rtol=0)
    # the loss is exactly the CE of the target positions; a masked label never enters it
    logits = model(batch["input_ids"])
    mask = batch["labels"] != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum"),
                               atol=1e-4, rtol=1e-6)
    assert count_tokens(batch) == sum(len(s) for s in samples)


def test_prompt_and_reference_split():
    s = Sample([1, 10, 11, 12, 13], [-100, -100, 12, 13, 2])
    assert prompt_and_reference(s) == ([1, 10, 11], [12, 13, 2])


def test_schedule_and_durations():
    assert lr_at(0, 100, 1.0, 0.1, warmup_steps=4) == pytest.approx(0.2)
    assert lr_at(4, 100, 1.0, 0.1, warmup_steps=4) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 0.1, warmup_steps=4) == pytest.approx(0.1)
    assert 0.1 < lr_at(99, 100, 1.0, 0.1, warmup_steps=4) < 0.101
    assert lr_at(50, 100, 1.0, 0.1, schedule="constant") == 1.0
    assert [parse_duration(v) for v in (90, "90s", "30m", "2h", "01:00:00", "1:00:00:00")] == [
        90, 90, 1800, 7200, 3600, 86400]
    with pytest.raises(ValueError, match="max_time"):
        parse_duration("soon")


# ------------------------------------------------------------------------------------------ bad input


def _cli(ckpt, data_dir, out, *extra) -> list[str]:
    return ["finetune", "lora", str(ckpt), "--out_dir", str(out), "--accelerator", "cpu",
            "--data.train_path", str(data_dir / "train.jsonl"), "--data.template", TEMPLATE,
            "--train.max_steps", "2", *extra]


def _fails(args: list[str], capsys, *words: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    return err


def test_max_seq_length_beyond_the_context_is_refused(ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(_cli(ckpt, data_dir, out, "--train.max_seq_length", "65"), capsys, "max_seq_length=65", "block_size=64")
    assert not out.exists()


def test_qlora_without_bitsandbytes(ckpt, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    out = tmp_path / "out"
    _fails(_cli(ckpt, data_dir, out, "--quantize", "bnb.nf4"), capsys, "bitsandbytes", "bnb.nf4")
    assert not out.exists()


def test_unavailable_device_and_bad_settings(ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    if not torch.cuda.is_available():
        _fails(_cli(ckpt, data_dir, out, "--accelerator", "cuda"), capsys, "no CUDA GPU")
        _fails(_cli(ckpt, data_dir, out, "--precision", "16-mixed"), capsys, "16-mixed", "needs a CUDA GPU")
    _fails(_cli(ckpt, data_dir, out, "--devices", "0"), capsys, "devices=0")
    _fails(_cli(ckpt, data_dir, out, "--train.global_batch_size", "6", "--train.micro_batch_size", "4"), capsys,
           "multiple of")
    _fails(_cli(ckpt, data_dir, out, "--optimizer", "NoSuchOptimizer"), capsys, "NoSuchOptimizer")
    assert not out.exists()


def test_bad_data_and_zero_trainable_parameters(ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "A"}\n{"input": "b"}\n')
    args = _cli(ckpt, data_dir, out)
    args[args.index("--data.train_path") + 1] = str(bad)
    _fails(args, capsys, f"{bad}:2", "output")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args[args.index("--data.train_path") + 1] = str(empty)
    _fails(args, capsys, "empty")
    adapter = ["finetune", "adapter", *_cli(ckpt, data_dir, out)[2:], "--adapter.start_layer", "2"]
    _fails(adapter, capsys, "start_layer=2", "n_layer=2")
    assert not out.exists()


def test_existing_run_is_not_overwritten_silently(ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(_cli(ckpt, data_dir, out, "--train.global_batch_size", "4", "--train.micro_batch_size", "4"))
    before = (out / "final" / "lora.safetensors").read_bytes()
    _fails(_cli(ckpt, data_dir, out, "--train.global_batch_size", "4", "--train.micro_batch_size", "4"), capsys,
           "already holds a run", "--resume auto", "--overwrite true")
    assert (out / "final" / "lora.safetensors").read_bytes() == before
    main(_cli(ckpt, data_dir, out, "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
              "--train.lr", "0.05", "--overwrite", "true"))
    assert (out / "final" / "lora.safetensors").read_bytes() != before


def test_nan_loss_stops_with_a_clear_message_and_no_final(ckpt, data_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(broken / "model.safetensors"))
    weights["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"))
    out = tmp_path / "out"
    _fails(_cli(broken, data_dir, out), capsys, "training loss is nan at step 1")
    assert not (out / "final").exists()
