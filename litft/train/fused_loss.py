"""The LM head and the cross-entropy in one pass, chunk by chunk: the logits of all target tokens never exist at once.

The plain loss ``cross_entropy(head(hidden).float(), labels)`` holds the logits of every target token in the
compute dtype, again in fp32, the fp32 log-softmax saved for backward and its gradient: for Llama-3.2-1B (vocab
128,256) at 4 x 2048 tokens that is ~10 GB at the peak. :func:`linear_cross_entropy` walks the target tokens
``chunk_size`` rows at a time; at most one chunk of logits (fp32) exists at any moment:

- a plain linear head (tied to the embedding or not) and a LoRA head (``LoRALinear`` without DoRA, float base)
  go through :class:`LinearCrossEntropy`, an autograd Function that computes each chunk's loss *and* its
  gradients (w.r.t. the hidden states, the head weight when it trains, the LoRA factors) in the forward pass and
  keeps only those gradients: no recomputation, no extra matmul compared with the plain loss;
- any other head (DoRA, a quantized head) is evaluated chunk by chunk under non-reentrant activation
  checkpointing: the backward recomputes one chunk's logits at a time (one extra head forward).

Both return the summed token loss in fp32 and take the final logit softcap (``cap * tanh(z / cap)``) into
account. The result is exact up to float rounding (the summation order differs): see tests/test_fused_loss.py.
The gradients reach the parameters through autograd as usual, so DDP's and FSDP's gradient hooks fire; call it
inside the wrapped module's forward (:class:`litft.train.objectives.SFTObjective` does).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, softcap: Optional[float] = None,
                         chunk_size: int = 1024, head_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         ) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of ``head(hidden)`` (softcapped) against ``labels``, chunk by chunk.

    hidden: (N, D) final hidden states of the target tokens; labels: (N,) their targets (all trained).
    head: the output layer: ``nn.Linear``, or a ``LoRALinear`` wrapping one.
    head_fn: hidden -> logits (softcap included) for heads the Function cannot take (DoRA, quantized); default
        ``head`` followed by the softcap.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = _linear_parts(head)
    if parts is not None:
        weight, bias, lora = parts
        low_rank, lora_B = (None, None)
        if lora is not None:  # y = x W^T + s * B A dropout(x): the rank-r part is computed here, with autograd
            low_rank = lora.lora_A(lora.lora_dropout(hidden.to(lora.lora_A.weight.dtype))) * lora.scaling
            lora_B = lora.lora_B.weight
        return LinearCrossEntropy.apply(hidden, weight, bias, low_rank, lora_B, labels, softcap, chunk_size)
    if head_fn is None:
        def head_fn(h: torch.Tensor) -> torch.Tensor:
            logits = head(h)
            return logits if softcap is None else torch.tanh(logits / softcap) * softcap
    return _checkpointed_chunks(hidden, head_fn, labels, chunk_size)


def _linear_parts(head: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[nn.Module]]]:
    """(weight, bias, LoRA wrapper or None) when the head is a float linear layer, plain or LoRA (no DoRA)."""
    from litft.peft.lora import LoRALinear

    lora = None
    if isinstance(head, LoRALinear):
        if head.lora_magnitude_vector is not None:
            return None
        lora, head = head, head.base_layer
    if type(head) is not nn.Linear or not head.weight.is_floating_point():  # bitsandbytes layers subclass nn.Linear
        return None
    return head.weight, head.bias, lora


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(x_i W^T + b + u_i B^T), y_i), gradients computed chunk by chunk during the forward.

    Inputs: hidden x (N, D), weight W (V, D), bias b (V) or None, low-rank activations u (N, r) or None with the
    LoRA up-projection B (V, r), labels y (N), softcap (float or None), chunk_size. The matmuls run in the
    compute dtype (the autocast dtype under autocast, else the inputs' dtype), exactly as ``F.linear`` would; the
    softmax, the loss and the weight-gradient accumulation in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, low_rank, lora_B, labels, softcap, chunk_size):  # type: ignore[override]
        dtype = _compute_dtype(hidden)
        need_x, need_w, need_b, need_u, need_lb = ctx.needs_input_grad[:5]
        fp32 = torch.float32
        with torch.autocast(hidden.device.type, enabled=False):
            x, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            u = None if low_rank is None else low_rank.to(dtype)
            lb = None if lora_B is None else lora_B.to(dtype)
            n = x.shape[0]
            loss = torch.zeros((), dtype=fp32, device=x.device)
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = torch.zeros(weight.shape, dtype=fp32, device=x.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=fp32, device=x.device) if need_b else None
            grad_u = torch.empty_like(u) if need_u else None
            grad_lb = torch.zeros(lora_B.shape, dtype=fp32, device=x.device) if need_lb else None
            any_grad = need_x or need_w or need_b or need_u or need_lb
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                xc, yc = x[start:end], labels[start:end]
                z = F.linear(xc, w, b)
                if u is not None:
                    z.addmm_(u[start:end], lb.t())
                z = z.float()
                t = None
                if softcap is not None:
                    t = torch.tanh(z / softcap)
                    z = t * softcap
                lse = torch.logsumexp(z, dim=-1)
                loss += (lse - z.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
                if not any_grad:
                    continue
                g = z.sub_(lse.unsqueeze(1)).exp_()  # the softmax, in place of the logits
                g[torch.arange(end - start, device=g.device), yc] -= 1.0  # d loss / d logits
                if t is not None:
                    g.mul_(t.mul_(t).neg_().add_(1.0))  # through the softcap: 1 - tanh^2
                del t
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if grad_x is not None:
                    torch.mm(g, w, out=grad_x[start:end])
                if grad_u is not None:
                    torch.mm(g, lb, out=grad_u[start:end])
                # weight gradients: one matmul per chunk in the compute dtype (fp32 accumulation inside it, as
                # F.linear's backward does for all rows at once), summed over the chunks in fp32
                if grad_w is not None:
                    if dtype == fp32:
                        grad_w.addmm_(g.t(), xc)
                    else:
                        grad_w += g.t() @ xc
                if grad_lb is not None:
                    grad_lb += (g.t() @ u[start:end]).float()
                del g, z
        ctx.grads = (
            None if grad_x is None else grad_x.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None if grad_u is None else grad_u.to(low_rank.dtype),
            None if grad_lb is None else grad_lb.to(lora_B.dtype),
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None)


def _chunk_loss(head_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_fn(hidden).float(), labels, reduction="sum")


def _checkpointed_chunks(hidden: torch.Tensor, head_fn: Callable[[torch.Tensor], torch.Tensor],
                         labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Any head: chunk by chunk, each chunk's logits recomputed in the backward (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, max(hidden.shape[0], 1), chunk_size):  # an empty batch still connects the graph
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head_fn, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head_fn, h, y)
    return total
