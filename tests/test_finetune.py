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
from litft.checkpoint import load_checkpoint
from litft.train.loop import count_tokens, prompt_and_reference
from litft.train.objectives import ObjectiveArgs, SFTObjective
from litft.train.objectives.sft import count_targets
from litft.train.trainer import forward_backward
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


def test_qlora_on_gemma4(data_dir, tmp_path):
    """QLoRA (NF4 base) on Gemma 4's per-layer inputs, KV-shared layers, k_eq_v full layers and MoE block learns,
    and its final/ loads and generates."""
    pytest.importorskip("bitsandbytes")
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs
    from litft.zoo import family_for

    base = make_checkpoint(tmp_path / "base", hf_model_type="gemma4_text", **family_for("gemma4_text").traits,
                           **NEW_ARCHITECTURES["gemma4_text"])
    out = tmp_path / "qlora"
    final = finetune_lora(base, out, data=data_args(data_dir), train=train_args(lr=2e-2, max_steps=8),
                          lora=LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"]), quantize="bnb.nf4",
                          **COMMON)
    curve = losses(out)
    assert sum(curve[-2:]) < sum(curve[:2]), curve
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


# the newer architectures, as Config fields on the tiny checkpoint (the family's traits from the zoo)
NEW_ARCHITECTURES = {
    "qwen3_moe": dict(n_expert=4, n_expert_per_token=2, moe_intermediate_size=24, moe_dense_layers=[1]),
    "olmo2": {},
    "olmo3": dict(sliding_window=4, layer_types=["sliding", "full"], rope_local_theta=1000.0),
    "smollm3": dict(nope_layers=[1]),
    # sinks, biases, router bias, clamped SwiGLU (traits); sliding and full layers; LoRA on every expert
    "gpt_oss": dict(n_expert=4, n_expert_per_token=2, sliding_window=4, layer_types=["sliding", "full"],
                    attention_bias=True, attention_out_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0),
    # a chunked RoPE layer and a NoPE full layer (query temperature), a sigmoid-routed MoE layer with a shared
    # expert before a dense one; LoRA on every expert and the shared one
    "llama4_text": dict(n_expert=4, n_expert_per_token=1, moe_intermediate_size=24, moe_shared_expert_size=24,
                        moe_dense_layers=[1], attention_chunk_size=4, layer_types=["chunked", "full"],
                        nope_layers=[1], qk_l2_norm=True, attn_temperature_floor_scale=2, attn_temperature_scale=0.5),
    # latent attention (low-rank q, interleaved RoPE) on a dense first layer, then grouped sigmoid routing with the
    # correction bias and a shared expert; LoRA on the latent projections, every expert and the shared one
    "deepseek_v3": dict(n_query_groups=2, head_size=8, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                        v_head_dim=8, rope_interleaved=True, n_expert=4, n_expert_per_token=2, moe_intermediate_size=24,
                        moe_shared_expert_size=24, moe_dense_layers=[0], moe_n_group=2, moe_topk_group=1,
                        moe_routed_scaling=2.5),
    # sliding and full layers with a bigger head on the full ones (values from the keys, proportional RoPE),
    # per-layer inputs, the last two layers (one of each kind) KV-shared with double-wide MLPs, the MoE block beside
    # every dense MLP; LoRA on every expert too
    "gemma4_text": dict(n_layer=4, head_size=16, global_head_size=32, sliding_window=4,
                        layer_types=["sliding", "full", "sliding", "full"], rope_local_theta=1000.0,
                        rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.5},
                        attention_k_eq_v=True, kv_shared_layers=2, kv_shared_mlp_factor=2, per_layer_input_size=8,
                        mlp_activation="gelu_tanh", final_logit_softcapping=30.0, n_expert=4, n_expert_per_token=2,
                        moe_intermediate_size=16, moe_beside_dense=True, moe_router_norm=True,
                        moe_per_expert_scale=True),
    # a Gated DeltaNet linear layer before a gated full-attention layer; LoRA on both kinds of attention
    "qwen3_5_text": dict(layer_types=["linear", "full"], head_size=16, partial_rotary_factor=0.25,
                         linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
                         linear_value_head_dim=8, linear_chunk_size=8),
    # the same with top-2 of 4 experts and a gated shared expert in both layers; LoRA on every expert
    "qwen3_5_moe_text": dict(layer_types=["linear", "full"], head_size=16, partial_rotary_factor=0.25,
                             linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8, n_expert=4, n_expert_per_token=2, moe_intermediate_size=24,
                             moe_shared_expert_size=24),
}
# LoRA targets where attention has no q/k/v projections (multi-head latent attention) or more (linear attention)
LORA_TARGETS = {"deepseek_v3": ["q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down"],
                **{t: ["q", "k", "v", "o", "gate", "up", "down", "in_qkv", "in_z", "out"]
                   for t in ("qwen3_5_text", "qwen3_5_moe_text")}}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("model_type", sorted(NEW_ARCHITECTURES))
def test_short_runs_on_the_newer_architectures(model_type, method, data_dir, tmp_path):
    """A short LoRA run on attention and MLPs (for Qwen3-MoE: the dense layer's and every expert's) and a short full
    fine-tune learn; the final/ (LoRA merged) loads and generates, and its to_hf export gives litft's logits in
    transformers."""
    from transformers import AutoModelForCausalLM

    from litft.convert.hf import convert_to_hf
    from litft.finetune.full import finetune_full
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs
    from litft.zoo import family_for

    ckpt = make_checkpoint(tmp_path / "base", hf_model_type=model_type, **family_for(model_type).traits,
                           **NEW_ARCHITECTURES[model_type])
    out = tmp_path / method
    if method == "lora":
        targets = LORA_TARGETS.get(model_type, ["q", "k", "v", "o", "gate", "up", "down"])
        lora = LoRAArgs(r=4, alpha=8, dropout=0.0, targets=targets)
        final = finetune_lora(ckpt, out, data=data_args(data_dir), train=train_args(lr=2e-2), lora=lora,
                              merge=True, **COMMON)
    else:
        final = finetune_full(ckpt, out, data=data_args(data_dir), train=train_args(lr=3e-3), **COMMON)
    curve = losses(out)
    assert sum(curve[-3:]) < sum(curve[:3]) - 0.3, curve
    check_loads_and_generates(final)
    hf = AutoModelForCausalLM.from_pretrained(convert_to_hf(final, tmp_path / "hf"), attn_implementation="eager")
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf.eval()(tokens).logits - load_checkpoint(final).eval()(tokens)).abs().max() < 1e-4


def test_full_finetune_cannot_start_from_an_adapter_run(ckpt, data_dir, tmp_path, capsys):
    """Full fine-tuning saves plain model weights, which have no place for an adapter's learned prompts: starting it
    from an adapter run's final/ is refused before anything is written, saying what to do instead."""
    from litft.finetune.adapter import finetune_adapter
    from litft.peft import AdapterArgs

    final = finetune_adapter(ckpt, tmp_path / "adapter", data=data_args(data_dir), train=train_args(max_steps=1),
                             adapter=AdapterArgs(prompt_length=2, start_layer=1), **COMMON)
    out = tmp_path / "full"
    args = ["finetune", "full", *_cli(final, data_dir, out)[2:]]
    _fails(args, capsys, "LLaMA-Adapter run", "litft finetune adapter", str(ckpt))
    assert not out.exists()


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
    loss_model = SFTObjective(model)
    samples = _samples()
    whole = [pad_batch(samples, 0)]
    micro = [pad_batch([s], 0) for s in samples]
    n = sum(count_targets(b) for b in micro)
    assert n == count_targets(whole[0])

    total = forward_backward(loss_model, whole, lambda loss: loss.backward(), n).loss
    g1 = _grads(model)
    model.zero_grad()
    total4 = forward_backward(loss_model, micro, lambda loss: loss.backward(), n).loss
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
    loss_model = SFTObjective(model)
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
    loss = forward_backward(loss_model, [padded], lambda loss: loss.backward(), n).loss
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
    _fails(_cli(broken, data_dir, out), capsys, "training diverged at step 1: the training loss is nan",
           "no checkpoint was saved before it")
    assert not (out / "final").exists()


def test_a_tokenizer_larger_than_the_model_is_refused_before_anything_is_written(data_dir, tmp_path, capsys):
    small = make_checkpoint(tmp_path / "small", vocab_size=60)  # the tiny tokenizer has 100 ids
    out = tmp_path / "out"
    err = _fails(_cli(small, data_dir, out), capsys)
    assert (f"litft finetune lora: error: {small / 'tokenizer.json'}: the tokenizer has 100 token ids, the model only "
            f"60 (vocab_size in {small / 'model_config.yaml'}): the training data's token id(s) [") in err, err
    assert "are outside the vocabulary [0, 60). Use the tokenizer the model was trained with" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ audit: correctness


def val_loss_of(model: torch.nn.Module, data: DataArgs, checkpoint: Path, max_seq_length: int = 64) -> float:
    """Mean target-token loss of ``model`` on the validation rows of ``data``, as the loop computes it."""
    from litft.data import load_datasets
    from litft.tokenizer import Tokenizer

    _, val, _ = load_datasets(data, Tokenizer(checkpoint), max_seq_length)
    batch = pad_batch(val, 0)
    model.eval()
    with torch.no_grad():
        return float(SFTObjective(model)(**batch).loss) / count_targets(batch)


def test_full_finetune_of_a_tied_model_stays_tied_through_export(data_dir, tmp_path):
    """The shipped demo base ties lm_head to the embedding: a full fine-tune trains the one shared matrix, final/
    stores it once with tie_embeddings true, and transformers loads the export with the very same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from litft.convert.hf import convert_to_hf
    from litft.finetune.full import finetune_full

    base = TINY / "base"
    assert Config.from_checkpoint(base).tie_embeddings
    data = data_args(data_dir)
    out = tmp_path / "out"
    final = finetune_full(base, out, data=data, train=train_args(max_steps=4, lr=1e-2), **COMMON)
    weights = load_file(final / "model.safetensors")
    assert "lm_head.weight" not in weights and Config.from_checkpoint(final).tie_embeddings
    assert not torch.equal(weights["embed.weight"], load_file(base / "model.safetensors")["embed.weight"])
    # the model that trained (its final val loss, logged) is the tied model final/ loads: the head did not drift away
    # from the embedding during training (an untied head would be lost on save and change this loss)
    model = load_checkpoint(final)
    assert model.lm_head.weight is model.embed.weight
    logged = [r["final_val_loss"] for r in read_metrics(out) if "final_val_loss" in r][0]
    assert val_loss_of(model, data, final) == pytest.approx(logged, abs=1e-5)

    hf_dir = convert_to_hf(final, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    idx = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method, precision", [("full", "bf16-true"), ("lora", "bf16-true"), ("full", "bf16-mixed"),
                                               ("lora", "bf16-mixed")])
def test_bf16_precisions_train_on_cpu(ckpt, data_dir, tmp_path, method, precision):
    """Every recipe trains in bf16: bf16-true (bf16 weights) and bf16-mixed (fp32 weights, bf16 autocast) run,
    their loss is finite and falls, and final/ loads and generates."""
    from safetensors.torch import load_file

    from litft.finetune.full import finetune_full
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs

    out = tmp_path / "out"
    kw = dict(data=data_args(data_dir), train=train_args(max_steps=8, lr=2e-2), accelerator="cpu", precision=precision)
    if method == "full":
        final = finetune_full(ckpt, out, **kw)
    else:
        final = finetune_lora(ckpt, out, lora=LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear"]), **kw)
    curve = losses(out)
    assert len(curve) == 8 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-3:]) < sum(curve[:3]) - 0.3, curve
    assert yaml.safe_load((out / "run.yaml").read_text())["precision"] == precision
    weights = load_file(final / ("model.safetensors" if method == "full" else "lora.safetensors"))
    want = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {t.dtype for t in weights.values()} == {want}
    check_loads_and_generates(final)


def test_optimizer_by_class_path_from_yaml_is_used_and_run_yaml_reproduces_it(ckpt, data_dir, tmp_path):
    """`optimizer: {class_path: torch.optim.SGD, init_args: {momentum: 0.9}}` in a YAML config builds that optimizer
    (its state is in the checkpoint: SGD momentum buffers, two weight-decay groups), and run.yaml replays the run."""
    config = tmp_path / "sgd.yaml"
    config.write_text(yaml.safe_dump({
        "checkpoint_dir": str(ckpt), "out_dir": str(tmp_path / "a"), "accelerator": "cpu", "precision": "32-true",
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9, "nesterov": True}},
        "data": {"train_path": str(data_dir / "train.jsonl"), "val_path": str(data_dir / "val.jsonl"),
                 "format": "template", "template": TEMPLATE},
        "train": {"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "lr": 0.05, "weight_decay": 0.01,
                  "save_interval": 2},
        "eval": {"final_validation": False},
    }))
    main(["finetune", "full", "--config", str(config)])
    state = torch.load(tmp_path / "a" / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [(g["momentum"], g["nesterov"], g["weight_decay"]) for g in groups] == [(0.9, True, 0.01), (0.9, True, 0.0)]
    assert all("betas" not in g for g in groups)  # not AdamW
    buffers = state["optimizer"]["state"].values()
    assert buffers and all(set(s) == {"momentum_buffer"} for s in buffers)
    from litft.train.schedule import param_groups

    expected = param_groups(load_checkpoint(ckpt).named_parameters(), 0.01)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in expected]
    run = yaml.safe_load((tmp_path / "a" / "run.yaml").read_text())
    assert run["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9, "nesterov": True}}
    main(["finetune", "full", "--config", str(tmp_path / "a" / "run.yaml"), "--out_dir", str(tmp_path / "b")])
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    # the same from the command line, as JSON
    main(["finetune", "full", str(ckpt), "--out_dir", str(tmp_path / "c"), "--accelerator", "cpu",
          "--data.train_path", str(data_dir / "train.jsonl"), "--data.template", TEMPLATE, "--train.max_steps", "1",
          "--optimizer", '{"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.5}}'])
    assert yaml.safe_load((tmp_path / "c" / "run.yaml").read_text())["optimizer"]["init_args"] == {"momentum": 0.5}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(ckpt, mode):
    """Recomputing the blocks in the backward pass changes no gradient, LoRA dropout included (the recompute
    replays the same random mask)."""
    from litft.peft import LoRAArgs, apply_lora
    from litft.train.loop import enable_activation_checkpointing

    batch = pad_batch(_samples(), 0)
    n = count_targets(batch)
    grads = []
    for checkpointing in (False, True):
        model = load_checkpoint(ckpt)
        torch.manual_seed(1)
        apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.3, targets=["all-linear"]))
        for name, p in model.named_parameters():  # non-zero B so that every LoRA weight gets a gradient
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            enable_activation_checkpointing(model, mode)
        model.train()
        torch.manual_seed(2)
        forward_backward(SFTObjective(model), [batch], lambda loss: loss.backward(), n)
        grads.append(_grads(model))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 7 * 2  # A and B of 7 linears in 2 blocks
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5)


def _update_norm(before: Path, after: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    return math.sqrt(sum(float(((b[k] - a[k]) ** 2).sum()) for k in a))


def test_grad_norm_is_logged_and_clipping_caps_the_update(ckpt, data_dir, tmp_path):
    """One plain-SGD step moves the weights by lr x the gradient: with max_norm above the logged grad_norm the step's
    length is lr x grad_norm (so grad_norm is the true norm before clipping); with a small max_norm it is
    lr x max_norm."""
    from litft.finetune.full import finetune_full

    kw = dict(data=data_args(data_dir), eval=EvalArgs(final_validation=False), optimizer="SGD", **COMMON)
    lr = 0.5
    finetune_full(ckpt, tmp_path / "free", train=train_args(max_steps=1, lr=lr, max_norm=1e6), **kw)
    [record] = [r for r in read_metrics(tmp_path / "free") if "loss" in r]
    grad_norm = record["grad_norm"]
    assert grad_norm > 0.1
    assert _update_norm(ckpt, tmp_path / "free" / "final") == pytest.approx(lr * grad_norm, rel=1e-4)
    max_norm = grad_norm / 10
    finetune_full(ckpt, tmp_path / "clipped", train=train_args(max_steps=1, lr=lr, max_norm=max_norm), **kw)
    [record] = [r for r in read_metrics(tmp_path / "clipped") if "loss" in r]
    assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)  # logged before clipping
    assert _update_norm(ckpt, tmp_path / "clipped" / "final") == pytest.approx(lr * max_norm, rel=1e-4)


def test_weight_decay_applies_to_matrices_only(ckpt, tmp_path):
    """Linear weights (and LoRA matrices) decay; norms, biases, gates and the embedding do not."""
    from litft.peft import AdapterArgs, LoRAArgs, apply_adapter, apply_lora
    from litft.train.schedule import build_optimizer, param_groups

    def split(model: torch.nn.Module) -> tuple[set[str], set[str]]:
        groups = param_groups(model.named_parameters(), 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
        none = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        return decay, none

    model = load_checkpoint(make_checkpoint(tmp_path / "bias", attention_bias=True, attention_out_bias=True))
    decay, none = split(model)
    assert decay == {n for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight"}
    assert {"lm_head.weight", "blocks.0.attn.q_proj.weight", "blocks.1.mlp.down_proj.weight"} <= decay
    assert none == {"embed.weight", "norm.weight"} | {n for n, _ in model.named_parameters()
                                                      if n.endswith(("bias", "_norm.weight"))}
    assert "blocks.0.attn.q_proj.bias" in none
    opt = build_optimizer("AdamW", model, lr=1e-3, weight_decay=0.1)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]

    lora = load_checkpoint(ckpt)
    apply_lora(lora, LoRAArgs(r=2, targets=["q", "v"], use_dora=True))
    decay, none = split(lora)
    assert decay and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in decay)
    assert none and all(n.endswith("lora_magnitude_vector") for n in none)  # DoRA's per-row magnitudes: vectors
    adapter = load_checkpoint(ckpt)
    apply_adapter(adapter, AdapterArgs(prompt_length=2, start_layer=1))
    decay, none = split(adapter)
    assert {n.rsplit(".", 1)[-1] for n in decay} == {"prompt"} and {n.rsplit(".", 1)[-1] for n in none} == {"gate"}


@pytest.mark.parametrize("first", ["lora", "full"])
def test_iterative_finetuning_starts_from_the_previous_run(ckpt, data_dir, tmp_path, first):
    """Run 2 (from run 1's final/, new training data, new lr) starts from run 1's weights: its step-0 validation
    loss equals run 1's final validation loss on the same validation file."""
    from litft.finetune.full import finetune_full
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs

    lora = LoRAArgs(r=4, alpha=8, dropout=0.1, targets=["all-linear"])
    data = data_args(data_dir)
    out1 = tmp_path / "run1"
    if first == "lora":
        final1 = finetune_lora(ckpt, out1, data=data, train=train_args(max_steps=6, lr=2e-2), lora=lora, **COMMON)
    else:
        final1 = finetune_full(ckpt, out1, data=data, train=train_args(max_steps=6), **COMMON)
    val1 = [r["final_val_loss"] for r in read_metrics(out1) if "final_val_loss" in r][0]
    base_val = val_loss_of(load_checkpoint(ckpt), data, ckpt)
    assert val1 < base_val - 0.3  # run 1 learned something run 2 must keep

    new_rows = (TINY / "data" / "train.jsonl").read_text().splitlines()[100:132]
    (tmp_path / "new.jsonl").write_text("\n".join(new_rows) + "\n")
    data2 = dataclasses.replace(data, train_path=tmp_path / "new.jsonl")
    out2 = tmp_path / "run2"
    finetune_lora(final1, out2, data=data2, train=train_args(max_steps=2, lr=5e-3), lora=lora,
                  eval=EvalArgs(initial_validation=True), **COMMON)
    step0 = [r["val_loss"] for r in read_metrics(out2) if r.get("step") == 0 and "val_loss" in r]
    assert step0 and step0[0] == pytest.approx(val1, abs=1e-5)
    run2 = yaml.safe_load((out2 / "run.yaml").read_text())
    assert run2["train"]["lr"] == 5e-3 and run2["data"]["train_path"] == str(tmp_path / "new.jsonl")


def test_chat_data_without_a_chat_template_is_refused_before_anything_is_written(ckpt, data_dir, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "HI"}]}) + "\n")
    out = tmp_path / "out"
    for fmt in ("chat", "auto"):
        args = ["finetune", "lora", str(ckpt), "--out_dir", str(out), "--accelerator", "cpu",
                "--data.train_path", str(chat), "--data.format", fmt, "--train.max_steps", "1"]
        _fails(args, capsys, "chat template", "data.format")
        assert not out.exists()


# ------------------------------------------------------------------------------------------ every advertised flag runs

# A value for every option `litft finetune <method> --help` shows: one run per method passes them all at once, so no
# advertised flag is refused at run time. A new option fails test_every_help_option_has_a_value until it gets one.
# Non-default values where the machine allows (CUDA-only settings get their CPU value; compile=true would spend
# a minute compiling on CPU: it has its own tests).
# `--data FILE`: a YAML for the group
GROUP_FILES = ("--data", "--train", "--eval", "--objective", "--lora", "--adapter", "--prompt")
HELP_VALUES = {
    "--config": "{config}", "--out_dir": "{out}",
    "--data.train_path": "{data}/train.jsonl", "--data.val_path": "{data}/val.jsonl", "--data.format": "template",
    "--data.template": TEMPLATE, "--data.response_template": "Answer:", "--data.text_field": "body",
    "--data.instruction_field": "task", "--data.input_field": "input", "--data.output_field": "output",
    "--data.messages_field": "conversation", "--data.prompt_style": "plain", "--data.mask_prompt": "true",
    "--data.val_split_fraction": "0.1", "--data.packing": "true", "--data.seed": "7",
    "--train.global_batch_size": "4", "--train.micro_batch_size": "2", "--train.max_seq_length": "48",
    "--train.epochs": "2", "--train.max_steps": "2", "--train.max_time": "1h", "--train.lr": "0.01",
    "--train.min_lr": "0.001", "--train.warmup_steps": "1", "--train.lr_schedule": "constant",
    "--train.weight_decay": "0.01", "--train.max_norm": "0.5", "--train.seed": "3",
    "--train.activation_checkpointing": "selective", "--train.activation_checkpointing_every": "2",
    "--train.activation_offloading": "false", "--train.fused_loss": "true", "--train.loss_chunk_size": "8",
    "--train.attention": "sdpa", "--train.compile": "false", "--train.fused_optimizer": "true",
    "--train.peak_tflops": "1.5", "--train.log_interval": "1", "--train.save_interval": "1", "--train.keep_last": "1",
    "--train.sharding": "shard_grad_op", "--train.timeout": "10m",
    "--train.profile": "true", "--train.profile_wait": "0", "--train.profile_warmup": "1", "--train.profile_active": "1",
    "--train.trackers": "[]",  # [wandb] runs (offline) in tests/test_run_tools.py
    "--train.wandb_project": "litft-help", "--train.wandb_run_name": "help", "--freeze_layers": "1",
    "--train.controllers": '[{"rule": "step > 99 or grad_norm < 0", "action": "save"}, '
                           '{"rule": "val_loss > prev_val_loss + 1000", "when": "eval", "patience": 2}]',
    "--eval.interval": "1", "--eval.max_batches": "1", "--eval.initial_validation": "true",
    "--eval.final_validation": "true", "--eval.early_stopping_patience": "5",
    "--eval.early_stopping_min_delta": "0.001",
    "--eval.generate_samples": "2", "--eval.max_new_tokens": "4", "--objective.name": "sft",
    "--lora.r": "2", "--lora.alpha": "4", "--lora.dropout": "0.1", "--lora.targets": "[all-linear,lm_head]",
    "--lora.use_dora": "true", "--lora.use_rslora": "true", "--quantize": "bnb.nf4", "--merge": "true",
    "--adapter.prompt_length": "3", "--adapter.start_layer": "1",
    "--prompt.num_virtual_tokens": "3", "--prompt.init": "text", "--prompt.init_text": "Shout it:",
    "--optimizer": '{"class_path": "torch.optim.AdamW", "init_args": {"betas": [0.9, 0.95], "eps": 1e-6}}',
    "--precision": "bf16-mixed", "--devices": "1", "--num_nodes": "1", "--strategy": "auto", "--accelerator": "cpu",
    "--resume": "auto", "--overwrite": "false",
}
# --print_config: checked with all the other flags, then the real run; --train.controllers.help: jsonargparse's help
# the options of the objectives other than the default sft (refused with sft: each is run by
# tests/test_post_training.py and tests/test_objectives.py)
OTHER_OBJECTIVES = {f"--objective.{f.name}" for f in dataclasses.fields(ObjectiveArgs) if f.name != "name"}
NOT_RUN = {"-h", "--help", "--print_config", "--train.controllers.help", *OTHER_OBJECTIVES}


def help_options(method: str, capsys) -> list[str]:
    import re

    with pytest.raises(SystemExit) as e:
        main(["finetune", method, "--help"])
    assert e.value.code in (0, None)
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0] if "\n\n" in text else text
    return sorted(set(re.findall(r"\[(--?[\w.]+)", usage)) | {m for m in re.findall(r"^\s+(--[\w.]+)", text, re.M)})


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "prompt"])
def test_every_help_option_has_a_value(method, capsys):
    options = set(help_options(method, capsys)) - NOT_RUN - set(GROUP_FILES)
    missing = sorted(options - set(HELP_VALUES))
    assert not missing, f"add a value for {missing} to HELP_VALUES in tests/test_finetune.py"
    assert "--print_config" in help_options(method, capsys)


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "prompt"])
def test_every_advertised_flag_is_accepted_at_run_time(method, ckpt, data_dir, tmp_path, capsys):
    if method == "lora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "overridden")}))
    options = set(help_options(method, capsys))
    paths = {"{config}": str(config), "{out}": str(out), "{data}": str(data_dir)}
    values = {k: paths.get(v, v).replace("{data}", str(data_dir)) for k, v in HELP_VALUES.items()}
    argv = ["finetune", method, str(ckpt), "--config", values["--config"]]
    for group in GROUP_FILES:  # a group's own config file first, then its dotted options override it
        if group in options:
            path = tmp_path / f"{group[2:]}.yaml"
            path.write_text(yaml.safe_dump({"seed": 5} if group in ("--data", "--train") else {}))
            argv += [group, str(path)]
    for option in sorted(options - NOT_RUN - set(GROUP_FILES) - {"--config"}):
        argv += [option, values[option]]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["out_dir"] == str(out) and printed["train"]["max_steps"] == 2 and printed["data"]["seed"] == 7
    main(argv)  # raises SystemExit(1) with the message if any value is refused
    err = capsys.readouterr().err
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2], err
    assert (out / "final" / "model_config.yaml").is_file()
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["precision"] == "bf16-mixed" and run["train"]["activation_checkpointing"] == "selective"
    assert run["objective"] == {"name": "sft"}
    if method == "lora":  # QLoRA + merge: merged into the dequantized base, as `litft convert merge_lora` does
        assert run["quantize"] == "bnb.nf4" and (out / "final" / "model.safetensors").is_file()
        from litft.weights import load_model

        merged = load_model(out / "final").eval()  # the merged weights alone
        trained = load_checkpoint(out / "final").eval()  # the 4-bit base + the LoRA weights, as trained
        idx = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(merged(idx), trained(idx), atol=1e-4, rtol=1e-4)
        check_loads_and_generates(out / "final")


# ------------------------------------------------------------------------------------------ the README's main job


@pytest.mark.slow
def test_readme_main_job_learns(tmp_path, monkeypatch):
    """`litft finetune lora --config config_hub/finetune/tiny/lora.yaml` from the repository root, as the README
    says, with half the steps: the exact-match accuracy on the validation set rises and the validation loss falls."""
    root = Path(litft.__file__).parent.parent
    command = "litft finetune lora --config config_hub/finetune/tiny/lora.yaml"
    assert command in (root / "README.md").read_text()
    monkeypatch.chdir(root)  # the recipe's paths are relative to the repository root
    out = tmp_path / "out"
    main([*command.split()[1:], "--out_dir", str(out), "--train.max_steps", "150", "--train.save_interval", "null",
          "--eval.interval", "null", "--eval.initial_validation", "true"])
    records = read_metrics(out)
    before = next(r["accuracy_before"] for r in records if "accuracy_before" in r)
    after = next(r["accuracy_after"] for r in records if "accuracy_after" in r)
    assert after > before, (before, after)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] - 1.0, val
    assert (out / "final" / "model.safetensors").is_file()  # merge: true in the recipe
    check_loads_and_generates(out / "final")
