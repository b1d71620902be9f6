"""The training speed and memory switches keep the numbers right: activation checkpointing (full, selective,
every N-th block), torch.compile of the blocks, FlexAttention block masks for packing and sliding windows, the
fused optimizer, and the FLOPs count behind the logged MFU.

Tolerances: checkpointing recomputes the same float operations, so gradients agree to 1e-6; compiled kernels
reorder float sums, so loss and gradients agree to 1e-5 absolute + 1e-4 relative (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from litft.config import Config
from litft.data import Sample, pack_batch, pad_batch
from litft.model import GPT
from litft.peft.lora import LoRAArgs, LoRALinear, apply_lora
from litft.train.args import TrainArgs
from litft.train.loop import prepare_training, resolve_attention
from litft.train.objectives import ObjectiveContext, SFTObjective
from litft.train.metrics import flops_per_token, matmul_params, peak_flops
from litft.train.schedule import build_optimizer

V = 61
CPU = torch.device("cpu")


def tiny(**overrides) -> GPT:
    fields = dict(vocab_size=V, block_size=256, n_layer=3, n_embd=32, n_head=4, n_query_groups=2,
                  intermediate_size=48)
    torch.manual_seed(0)
    model = GPT(Config(**{**fields, **overrides}))
    model.reset_parameters(std=0.2)
    model.init_buffers()
    return model


def samples(lengths, seed=0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, V, (n + 1,), generator=g).tolist()
        out.append(Sample(ids[:-1], [-100] * (n // 3) + ids[n // 3 + 1:]))
    return out


def step(loss_model: torch.nn.Module, b: dict, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_model(**b).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in loss_model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-6, rtol=0.0):
    torch.testing.assert_close(b[0], a[0], atol=atol * 10, rtol=rtol)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(b[1][k], a[1][k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("mode, every", [("full", 1), ("selective", 1), ("full", 2)])
def test_activation_checkpointing_gives_the_plain_gradients(mode, every, lora):
    model = tiny(sliding_window=7, layer_types=["sliding", "full", "sliding"])
    if lora:  # dropout 0.1 in training mode: the recomputation must draw the same masks
        apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.1, targets=["all-linear"]))
    model.train()
    b = pad_batch(samples([9, 17, 4]), 0)
    plain = step(SFTObjective(model, context=ObjectiveContext(loss_chunk_size=16)), b)
    checkpointed = copy.deepcopy(model)
    loss_model = prepare_training(checkpointed, TrainArgs(activation_checkpointing=mode,
                                                          activation_checkpointing_every=every), CPU)
    wrapped = [i for i, blk in enumerate(checkpointed.blocks) if "forward" in vars(blk)]
    assert wrapped == list(range(0, 3, every))
    assert_same(plain, step(loss_model, b))


def test_checkpointing_setting_accepts_booleans_and_names():
    assert TrainArgs(activation_checkpointing=True).checkpointing_mode() == "full"
    assert TrainArgs(activation_checkpointing=False).checkpointing_mode() == "none"
    assert TrainArgs(activation_checkpointing="selective").checkpointing_mode() == "selective"
    for bad in (dict(activation_checkpointing="some"), dict(activation_checkpointing_every=0),
                dict(loss_chunk_size=0), dict(attention="xformers"), dict(peak_tflops=0)):
        with pytest.raises(ValueError, match="train."):
            TrainArgs(**bad).validate()


def test_flex_attention_is_refused_for_a_model_with_attention_sinks():
    """litft's FlexAttention path has no sinks: auto picks SDPA for such a model, flex is refused by name (the check
    needs only the device type, so a CUDA device object shows it here)."""
    cuda = torch.device("cuda")
    sinks = Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, attention_sinks=True)
    assert resolve_attention("auto", cuda, sinks) == "sdpa"
    with pytest.raises(ValueError, match=r"attention='flex' cannot train here: this model has attention sinks "
                                         r"\(attention_sinks: true\)"):
        resolve_attention("flex", cuda, sinks)
    # the model itself never computes a BlockMask attention without its sinks
    model = tiny(attention_sinks=True)
    model.attention_backend = "flex"
    with pytest.raises(ValueError, match="FlexAttention has no attention sinks"):
        model(torch.zeros(1, 8, dtype=torch.long), segment_ids=torch.ones(1, 8, dtype=torch.long))


def test_cpu_refuses_flex_attention_and_activation_offloading_clearly():
    assert resolve_attention("auto", CPU) == "sdpa"
    with pytest.raises(ValueError, match="attention='flex'.*no backward.*cpu"):
        resolve_attention("flex", CPU)
    with pytest.raises(ValueError, match="activation_offloading=true needs a CUDA device"):
        prepare_training(tiny(), TrainArgs(activation_offloading=True), CPU)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, "selective"])
def test_compiled_training_step_equals_eager(checkpointing):
    """One LoRA training step with torch.compile'd blocks (inductor, CPU; also with selective checkpointing traced
    into the compiled graph) against eager: loss, gradients and the weights after an AdamW step. Compiling takes
    ~15-30 s on 2 cores. (Dropout is 0: compiled kernels draw other random numbers than eager ones.)"""
    model = tiny(n_layer=2, layer_types=None)
    apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "v", "down"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    model.train()
    compiled = copy.deepcopy(model)
    eager_loss = SFTObjective(model, context=ObjectiveContext(loss_chunk_size=16))
    compiled_loss = prepare_training(compiled, TrainArgs(compile=True, activation_checkpointing=checkpointing), CPU)
    b = pad_batch(samples([9, 17, 4]), 0)
    results = []
    for m, lm in ((model, eager_loss), (compiled, compiled_loss)):
        loss, grads = step(lm, b)
        opt = build_optimizer("AdamW", m, lr=1e-2, weight_decay=0.0)
        opt.step()
        results.append((loss, grads, {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}))
    assert_same(results[0][:2], results[1][:2], atol=1e-5, rtol=1e-4)
    for k, w in results[0][2].items():
        torch.testing.assert_close(results[1][2][k], w, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_the_dense_mask():
    """FlexAttention's forward (the unfused reference implementation: PyTorch has no CPU backward) with the
    block masks built from segment ids and sliding windows gives what SDPA with the dense boolean mask gives,
    across several 128-token tiles: packed rows, sliding layers, attention-logit softcapping (score_mod)."""
    model = tiny(block_size=512, sliding_window=150, layer_types=["sliding", "full", "sliding"],
                 attn_logit_softcapping=5.0)
    model.eval()
    b = pack_batch([samples([100, 180, 30], 1), samples([300], 2), samples([5, 200], 3)], 0)
    assert b["input_ids"].shape[1] > 2 * 128
    keep = b["segment_ids"] > 0
    with torch.no_grad():
        dense = model(b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"])
        model.attention_backend = "flex"
        flex = model(b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"])
        flex_causal = model(b["input_ids"][:2, :260])  # no segments: causal + window + softcap block masks
        model.attention_backend = "sdpa"
        dense_causal = model(b["input_ids"][:2, :260])
    torch.testing.assert_close(flex[keep], dense[keep], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(flex_causal, dense_causal, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_packed_loss_and_gradients_equal_padded(fused_loss):
    """The training loss through the loop's loss module (SDPA with the dense packing mask, as on CPU): packed rows
    give the summed loss and the gradients of the same samples padded one per row (fp32, 1e-5), with sliding
    windows, both softcaps, LoRA; and the mask matters (without segment ids the loss differs)."""
    model = tiny(sliding_window=9, layer_types=["sliding", "full", "sliding"], attn_logit_softcapping=5.0,
                 final_logit_softcapping=8.0)
    apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["all-linear", "lm_head"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    group = samples([13, 30, 6, 21, 9, 17], 5)
    loss_model = prepare_training(model, TrainArgs(fused_loss=fused_loss, loss_chunk_size=7), CPU)
    padded = step(loss_model, pad_batch(group, 0))
    packed_batch = pack_batch([group[:3], group[3:4], group[4:]], 0)
    assert packed_batch["input_ids"].shape[0] == 3
    assert_same(padded, step(loss_model, packed_batch), atol=1e-5, rtol=1e-5)
    leaky = step(loss_model, {k: packed_batch[k] for k in ("input_ids", "labels")})
    assert abs(float(leaky[0] - padded[0])) > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_flex_packed_loss_and_gradients_equal_unpacked_cuda(softcap):
    """On CUDA: packed rows with FlexAttention give the loss and gradients of the same samples padded one per row
    with SDPA (fp32; tolerance 1e-4 relative, the kernels' own float error)."""
    device = torch.device("cuda")
    model = tiny(block_size=512, n_embd=64, sliding_window=150, layer_types=["sliding", "full", "sliding"],
                 attn_logit_softcapping=softcap)  # head size 16: FlexAttention's smallest on CUDA
    model.to(device).train()
    group = samples([100, 180, 30, 300, 5, 200], 4)
    padded = {k: v.to(device) for k, v in pad_batch(group, 0).items()}
    packed = {k: v.to(device) for k, v in pack_batch([group[:3], group[3:4], group[4:]], 0).items()}
    reference = step(prepare_training(model, TrainArgs(attention="sdpa"), device), padded)
    flex_model = copy.deepcopy(model)
    result = step(prepare_training(flex_model, TrainArgs(attention="auto"), device), packed)
    assert flex_model.attention_backend == "flex"
    assert_same(reference, result, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activation_offloading_gives_the_plain_gradients_cuda():
    device = torch.device("cuda")
    model = tiny().to(device).train()
    b = {k: v.to(device) for k, v in pad_batch(samples([9, 17, 4]), 0).items()}
    plain = step(SFTObjective(model, context=ObjectiveContext(loss_chunk_size=16)), b)
    offloaded = prepare_training(copy.deepcopy(model), TrainArgs(activation_offloading=True,
                                                                 activation_checkpointing=True), device)
    assert_same(plain, step(offloaded, b), atol=1e-5)


def test_fused_optimizer_switch():
    model = tiny(n_layer=1, layer_types=None)
    assert build_optimizer("AdamW", model, 1e-3, 0.0, fused=None, device=CPU).defaults["fused"] is True  # auto
    assert build_optimizer("AdamW", model, 1e-3, 0.0, fused=True, device=CPU).defaults["fused"] is True
    off = build_optimizer("AdamW", model, 1e-3, 0.0, fused=False, device=CPU)
    assert not off.defaults.get("fused") and off.defaults.get("foreach") is None  # torch's own default kept
    mps = build_optimizer("AdamW", model, 1e-3, 0.0, fused=None, device=torch.device("mps"))
    assert not mps.defaults.get("fused")  # auto: fused on CUDA and CPU only
    # the same update as the default implementation
    twin = copy.deepcopy(model)
    for m, fuse in ((model, False), (twin, True)):
        opt = build_optimizer("AdamW", m, 1e-2, 0.1, fused=fuse, device=CPU)
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 0.3
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="RMSprop has no fused implementation"):
        build_optimizer("RMSprop", model, 1e-3, 0.0, fused=True, device=CPU)
    assert build_optimizer("RMSprop", model, 1e-3, 0.0, fused=None, device=torch.device("cuda"))  # auto: no fused
    with pytest.raises(ValueError, match="set it in one place"):
        build_optimizer({"class_path": "AdamW", "init_args": {"fused": True}}, model, 1e-3, 0.0, fused=False)


def test_flops_per_token_by_hand_llama_3_2_1b():
    """The MFU convention of bench/RESULTS.md: full fine-tuning 6N + 12·L·H·Q·T per token, LoRA
    4N + 6·N_LoRA + 12·L·H·Q·T, N = every linear layer's in x out (the tied head once)."""
    config = Config.from_name("Llama-3.2-1B")
    with torch.device("meta"):
        model = GPT(config)
    L, D, Q, KV, I, Vocab = 16, 2048, 32 * 64, 8 * 64, 8192, 128256
    N = L * (D * Q + 2 * D * KV + Q * D + 3 * D * I) + Vocab * D
    assert N == 1_235_746_816 == matmul_params(model)
    attention = 12 * L * 32 * 64 * 2048
    assert flops_per_token(config, N, 0, 2048, full=True) == 6 * N + attention
    with torch.device("meta"):
        apply_lora(model, LoRAArgs(r=16, alpha=32, targets=["q", "k", "v", "o"]))
    n_lora = L * 16 * ((D + Q) + (D + KV) + (D + KV) + (Q + D))
    assert matmul_params(model) == N + n_lora
    assert flops_per_token(config, N + n_lora, n_lora, 2048, full=False) == 4 * N + 6 * n_lora + attention
    assert peak_flops(CPU, torch.bfloat16) is None and peak_flops(CPU, torch.bfloat16, 771.0) == 771e12


def test_fit_logs_model_tflops_and_mfu_with_the_given_peak(tmp_path):
    """A real run logs model TFLOP/s per step on any device, and MFU = that / train.peak_tflops when a peak is given
    (on a CPU there is no datasheet figure); FLOPs from the micro-batch's own length T."""
    from pathlib import Path

    import litft
    from litft.data import DataArgs
    from litft.finetune.lora import finetune_lora
    from litft.train.args import EvalArgs
    from litft.train.metrics import read_metrics

    tiny_assets = Path(litft.__file__).parent / "assets" / "tiny"
    data = DataArgs(train_path=tiny_assets / "data" / "train.jsonl", format="template",
                    template="Shout: {{input}}\nAnswer: {{output}}", val_split_fraction=0.0, packing=True)
    finetune_lora(tiny_assets / "base", tmp_path / "out", data=data,
                  train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=2, max_seq_length=64,
                                  peak_tflops=0.5),
                  eval=EvalArgs(final_validation=False), lora=LoRAArgs(r=2, alpha=4, dropout=0.0),
                  accelerator="cpu", precision="32-true")
    steps = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["model_tflops"] > 0 and r["mfu"] == pytest.approx(r["model_tflops"] / 0.5, rel=1e-9)
