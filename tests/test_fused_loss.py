"""The chunked (fused) LM head + cross-entropy equals the plain loss and its gradients: w.r.t. the hidden states, a
plain, tied or softcapped head weight, LoRA on the head (dropout included) and DoRA (checkpointed-chunk path).

Tolerances (fp32): the summed loss to 1e-5 relative, gradients to 1e-5 absolute + 1e-4 relative (only the
summation order differs). bf16 (autocast or bf16 weights): the fused result's error against the fp32 result is at
most 1.5x the plain bf16 loss's own error (+1% of the gradient's scale): bf16 rounding of the logits dominates
both, so comparing the two bf16 results directly would measure noise."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.config import Config
from litft.data import Sample, pad_batch
from litft.model import GPT
from litft.peft.lora import LoRAArgs, LoRALinear, apply_lora
from litft.train.fused_loss import linear_cross_entropy
from litft.train.objectives import ObjectiveContext, SFTObjective

V = 97


def tiny(**overrides) -> GPT:
    fields = dict(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48)
    torch.manual_seed(0)
    model = GPT(Config(**{**fields, **overrides}))
    model.reset_parameters(std=0.2)
    model.init_buffers()
    return model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    samples = []
    for n, prompt in ((13, 4), (29, 9), (7, 2), (21, 0)):
        ids = torch.randint(0, V, (n + 1,), generator=g).tolist()
        samples.append(Sample(ids[:-1], [-100] * prompt + ids[prompt + 1:]))
    return pad_batch(samples, 0)


def loss_and_grads(model: nn.Module, chunk, b, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    loss = SFTObjective(model, context=ObjectiveContext(loss_chunk_size=chunk))(**b).loss
    (loss * 0.37).backward()  # a non-unit upstream gradient, as the loop's 1/n_targets scale is
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, fused, rtol_loss=1e-5, atol=1e-5, rtol=1e-4):
    (l1, g1), (l2, g2) = plain, fused
    torch.testing.assert_close(l2, l1, rtol=rtol_loss, atol=0)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["plain", "tied", "softcap"])
def test_fused_loss_equals_plain_full_finetune(kind):
    overrides = {"tied": dict(tie_embeddings=True), "softcap": dict(final_logit_softcapping=3.0)}.get(kind, {})
    model = tiny(**overrides)
    b = batch()
    plain = loss_and_grads(model, None, b)
    for chunk in (5, 1024):  # several chunks (the last one partial), and one chunk for everything
        assert_same(plain, loss_and_grads(model, chunk, b))
    assert "lm_head.weight" in plain[1] or kind == "tied"
    if kind == "tied":
        assert model.lm_head.weight is model.embed.weight and "embed.weight" in plain[1]


@pytest.mark.parametrize("dora", [False, True])
def test_fused_loss_equals_plain_with_lora_on_the_head(dora):
    """LoRA on q, v and lm_head (tied head, softcap, dropout 0.1 in training mode); DoRA takes the checkpointed
    path."""
    model = tiny(tie_embeddings=True, final_logit_softcapping=4.0)
    apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.1, targets=["q", "v", "lm_head"], use_dora=dora))
    with torch.no_grad():  # B = 0 at init would give A no gradient: make both matter
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    assert isinstance(model.lm_head, LoRALinear)
    model.train()
    b = batch()
    plain = loss_and_grads(model, None, b)
    assert {"lm_head.lora_A.weight", "lm_head.lora_B.weight"} <= plain[1].keys()
    assert_same(plain, loss_and_grads(model, 6, b))


def test_linear_cross_entropy_gradients_wrt_hidden_weight_and_bias():
    """The function itself, on leaf tensors: a head with a bias, the softcap, chunks of 3."""
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=True)
    hidden = torch.randn(23, 16, requires_grad=True)
    labels = torch.randint(0, 40, (23,))

    def grads(loss):
        loss.backward()
        out = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
        hidden.grad = head.weight.grad = head.bias.grad = None
        return out

    z = head(hidden)
    plain = F.cross_entropy((torch.tanh(z / 2.5) * 2.5).float(), labels, reduction="sum")
    fused = linear_cross_entropy(hidden, head, labels, softcap=2.5, chunk_size=3)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    for a, b in zip(grads(plain * 2), grads(fused * 2)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # validation: no gradient work, same value
        torch.testing.assert_close(linear_cross_entropy(hidden, head, labels, 2.5, 3), plain.detach())


def assert_as_accurate(reference, plain, fused):
    """bf16: the fused loss is as close to the fp32 truth as the plain bf16 loss is (the two differ from each other
    by less than either differs from fp32, so comparing them directly would only measure bf16 noise)."""
    (lr, gr), (lp, gp), (lf, gf) = reference, plain, fused
    assert abs(float(lf - lr)) <= 1.5 * abs(float(lp - lr)) + 1e-3 * abs(float(lr))
    for k in gr:
        err_plain, err_fused = (gp[k].float() - gr[k]).abs().max(), (gf[k].float() - gr[k]).abs().max()
        assert err_fused <= 1.5 * err_plain + 1e-2 * gr[k].abs().max(), (k, err_plain, err_fused)


def test_fused_loss_bf16_autocast_and_no_targets():
    model = tiny()
    b = batch()
    reference = loss_and_grads(model, None, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(model, None, b)
        fused = loss_and_grads(model, 8, b)
    assert_as_accurate(reference, plain, fused)
    assert all(g.dtype == torch.float32 for g in fused[1].values())  # gradients in the parameters' dtype
    # a micro-batch without a single target: loss 0, every head gradient 0 (the graph stays connected for DDP)
    none = {"input_ids": b["input_ids"], "labels": torch.full_like(b["labels"], -100)}
    loss, grads = loss_and_grads(model, 8, none)
    assert float(loss) == 0.0 and float(grads["lm_head.weight"].abs().sum()) == 0.0


def test_bf16_true_weights():
    """bf16 parameters (precision bf16-true), LoRA on the head: as accurate as the plain loss in bf16."""
    model = tiny()
    apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["q", "lm_head"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
    b = batch()
    low = model.to(torch.bfloat16)
    reference = loss_and_grads(copy.deepcopy(low).float(), None, b)
    plain, fused = loss_and_grads(low, None, b), loss_and_grads(low, 8, b)
    assert all(g.dtype == torch.bfloat16 for g in fused[1].values())
    assert_as_accurate(reference, plain, fused)


MEMORY_PROBE = """
import sys, torch, torch.nn as nn, torch.nn.functional as F
from litft.train.fused_loss import linear_cross_entropy

def high_water_mark():  # VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's over from fork)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

torch.manual_seed(0)
N, D, V = 2048, 128, 16000
h = torch.randn(N, D, requires_grad=True); head = nn.Linear(D, V, bias=False); y = torch.randint(0, V, (N,))
before = high_water_mark()
if sys.argv[1] == "plain":
    loss = F.cross_entropy(head(h).float(), y, reduction="sum")
else:
    loss = linear_cross_entropy(h, head, y, None, 256)
loss.backward()
print(high_water_mark() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_fused_loss_never_holds_the_logits_of_all_tokens():
    """Peak memory of one loss + backward (peak RSS growth, in a fresh process each; Linux): the plain loss holds
    several (N x V) fp32 tensors at once (logits, their log-softmax, its gradient); the fused one at most a chunk's
    worth: less than one (N x V) fp32 tensor in all. (A fixed glibc mmap threshold makes every large tensor its
    own mapping, returned when freed, so the peak RSS is the peak of live tensors.)"""
    import os
    import subprocess

    def growth(kind: str) -> int:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        return int(out.stdout.split()[-1])

    logits_bytes = 2048 * 16000 * 4
    plain, fused = growth("plain"), growth("fused")
    assert plain > 2.5 * logits_bytes, plain  # measured: ~3.1x
    assert fused < 0.75 * logits_bytes, (fused, plain)  # measured: ~0.5x (the chunks, the weight gradient)
