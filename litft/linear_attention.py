"""Gated DeltaNet linear attention: the "linear" layers of hybrid models (Qwen3.5).

Per token, in float32: ``q, k, v`` come from ``in_proj_qkv`` through a causal depthwise convolution of
``linear_conv_kernel`` taps and SiLU; q and k are L2-normalised per head (q also scaled by ``dk ** -0.5``);
``beta = sigmoid(in_proj_b(x))`` is the write strength and ``g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)``
the log decay. The state ``S`` (heads, dk, dv) follows the gated delta rule::

    S = exp(g) * S;   S = S + k (beta * (v - S^T k))^T;   o = S^T q

and the output is ``out_proj(norm(o) * silu(in_proj_z(x)))`` (the gated RMSNorm, per value head). Query/key heads
are shared by ``linear_num_value_heads / linear_num_key_heads`` consecutive value heads.

Two forms compute the same thing: :func:`recurrent_gated_delta_rule`, token by token (decode), and
:func:`chunked_gated_delta_rule` (training and prefill), whose cost is linear in the sequence length: within a chunk
of C tokens the updates are solved at once as a unit lower-triangular system (the WY form of the delta rule), and
only the state passes from chunk to chunk.

Segments. ``starts`` (B, T) marks the tokens that begin a new segment (a packed sample, or the prompt after left
padding; see :func:`segment_starts`): the state is forgotten before them, and the convolution does not reach across
them. The generation cache (:class:`litft.cache.LinearAttentionCache`) holds each row's last ``kernel - 1``
convolution inputs of its current segment (zeros before its start) and the float32 state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.config import Config

L2_NORM_EPS = 1e-6  # transformers' (and the FLA kernels') epsilon of the q/k L2 norm


def segment_starts(q_slots: torch.Tensor, segment_ids: Optional[torch.Tensor], cached: bool) -> Optional[torch.Tensor]:
    """(B or 1, T) flags of the tokens at ``q_slots`` that begin a segment: slot 0, or a slot whose segment id differs
    from the previous slot's. None when nothing but the first token could begin one (no cache, no segment ids)."""
    if segment_ids is None:
        return (q_slots == 0).unsqueeze(0) if cached else None
    current = segment_ids.index_select(1, q_slots)
    previous = segment_ids.index_select(1, (q_slots - 1).clamp_min(0))
    return (current != previous) | (q_slots == 0).unsqueeze(0)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each value head's output, times SiLU of the gate (float32 inside)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (self.weight * normed * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer (see the module docstring). Parameter names are transformers' (``in_proj_qkv``,
    ``in_proj_z``, ``in_proj_b``, ``in_proj_a``, ``conv1d``, ``A_log``, ``dt_bias``, ``norm``, ``out_proj``)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.n_k, self.n_v = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        key_dim, value_dim = self.n_k * self.dk, self.n_v * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(config.n_embd, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(config.n_embd, value_dim, bias=False)
        self.in_proj_b = nn.Linear(config.n_embd, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(config.n_embd, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.linear_conv_kernel, groups=self.conv_dim,
                                bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.norm = GatedRMSNorm(self.dv, config.norm_eps)
        self.out_proj = nn.Linear(value_dim, config.n_embd, bias=False)
        self.chunk_size = config.linear_chunk_size

    def reset_parameters(self) -> None:
        """Random init as transformers': decay rates A in [1, 16), dt_bias 1, gated-norm weight 1."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            self.dt_bias.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, rope: Any, starts: Optional[torch.Tensor], input_pos: Optional[torch.Tensor],
                virtual_kv: Any = None, return_kv: bool = False, cache: Any = None,
                q_scale: Any = None, shared_kv: Any = None) -> torch.Tensor:
        """The layer's output for ``x`` (B, T, C), in the attention modules' signature (``rope``, ``q_scale`` and
        ``shared_kv`` are unused: no positions, no keys). ``starts``: (B or 1, T) segment-start flags (:func:`segment_starts`) or None.
        ``cache``: this layer's :class:`litft.cache.LinearAttentionCache`, read and written for rows 0..B-1."""
        if virtual_kv is not None or return_kv:
            raise ValueError("prompt tuning (virtual tokens) is not implemented for linear-attention layers (Gated "
                             "DeltaNet): use LoRA")
        B, T, _ = x.shape
        window, state = cache.held(B) if cache is not None else (None, None)
        if starts is not None:
            starts = starts.expand(B, T)
        mixed, window = causal_conv(self.in_proj_qkv(x), self.conv1d.weight, window, starts)
        q, k, v = mixed.split([self.n_k * self.dk, self.n_k * self.dk, self.n_v * self.dv], dim=-1)
        q, k = q.view(B, T, self.n_k, self.dk), k.view(B, T, self.n_k, self.dk)
        v = v.reshape(B, T, self.n_v, self.dv)
        beta = torch.sigmoid(self.in_proj_b(x))
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if cache is not None and T == 1:
            y, state = recurrent_gated_delta_rule(q, k, v, g, beta, starts, state)
        else:
            y, state = chunked_gated_delta_rule(q, k, v, g, beta, starts, state, self.chunk_size)
        if cache is not None:
            cache.update(input_pos, window, state)
        y = self.norm(y.to(x.dtype), self.in_proj_z(x).view(B, T, self.n_v, self.dv))
        return self.out_proj(y.reshape(B, T, -1))


def causal_conv(x: torch.Tensor, weight: torch.Tensor, window: Optional[torch.Tensor],
                starts: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of the causal depthwise convolution of ``x`` (B, T, D) with ``weight`` (D, 1, K), over ``window``
    (B, K - 1, D): the inputs before ``x`` (zeros: none), and not across segment starts. Returns the output and the
    new window (the last K - 1 inputs of the current segment, zeros before its start)."""
    B, T, D = x.shape
    K = weight.shape[-1]
    if window is None:
        window = x.new_zeros(B, K - 1, D)
    padded = torch.cat((window.to(x.dtype), x), dim=1)  # (B, K - 1 + T, D)
    runs = None
    if starts is not None:  # run r: the tokens after the r-th segment start; the window belongs to run 0
        runs = F.pad(starts.long().cumsum(1), (K - 1, 0))  # (B, K - 1 + T)
    taps = weight.view(D, K).to(torch.float32)
    out = torch.zeros(B, T, D, dtype=torch.float32, device=x.device)
    for j in range(K):  # tap j reads the input K - 1 - j steps back
        inputs = padded[:, j:j + T].float()
        if runs is not None:
            inputs = inputs * (runs[:, j:j + T] == runs[:, K - 1:]).unsqueeze(-1)
        out = out + inputs * taps[:, j]
    new_window = padded[:, T:]
    if runs is not None:
        new_window = new_window * (runs[:, T:] == runs[:, -1:]).unsqueeze(-1).to(new_window.dtype)
    return F.silu(out).to(x.dtype), new_window


RuleResult = tuple[torch.Tensor, torch.Tensor]  # (output (B, T, Hv, dv), final state (B, Hv, dk, dv))


def _in_float32(rule: Callable[..., RuleResult]) -> Callable[..., RuleResult]:
    """Run a form of the delta rule with autocast off: its float32 state and triangular solves stay float32 under
    mixed precision (bf16-mixed training)."""

    @functools.wraps(rule)
    def run(q: torch.Tensor, *args: Any) -> RuleResult:
        with torch.autocast(q.device.type, enabled=False):
            return rule(q, *args)

    return run


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
             beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, heads, d) inputs → float32 (B, Hv, T, d), q and k L2-normalised and shared across their value heads,
    q scaled by dk ** -0.5; g and beta → (B, Hv, T)."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS) * q.shape[-1] ** -0.5
    k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)
    return q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float()


@_in_float32
def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               starts: Optional[torch.Tensor],
                               state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token. q, k (B, T, Hk, dk); v (B, T, Hv, dv); g, beta (B, T, Hv); starts (B, T)
    or None; state (B, Hv, dk, dv) float32 or None (zeros). Returns the output (B, T, Hv, dv) float32 and the final
    state."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, H, T, dk = k.shape
    if state is None:
        state = q.new_zeros(B, H, dk, v.shape[-1])
    state = state.float()
    outputs = []
    for t in range(T):
        decay = g[:, :, t].exp()
        if starts is not None:  # a segment start forgets the state
            decay = decay * (~starts[:, t]).unsqueeze(-1)
        state = state * decay[..., None, None]
        k_t = k[:, :, t]
        delta = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
    return torch.stack(outputs, dim=1), state


@_in_float32
def chunked_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                             starts: Optional[torch.Tensor], state: Optional[torch.Tensor],
                             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule chunk by chunk (arguments and result as :func:`recurrent_gated_delta_rule`).

    Within a chunk, with G the cumulative log decay, the writes u_t = beta_t (v_t - S_{t-1}^T k_t) solve
    (I + A) U = beta V - beta exp(G) K S_0 with A_tj = beta_t exp(G_t - G_j) k_t . k_j (j < t); the outputs are
    o_t = exp(G_t) S_0^T q_t + sum_{j<=t} exp(G_t - G_j) (q_t . k_j) u_j and the state passes on as
    exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j u_j^T. A decay across a segment start is zero (masked in log space)."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    pad = -T % C
    runs = starts.long().cumsum(1) if starts is not None else torch.zeros(1, T, dtype=torch.long, device=q.device)
    if pad:  # trailing zeros: no write (k = 0, beta = 0), no decay, no output kept
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        runs = torch.cat((runs, runs[:, -1:].expand(-1, pad)), dim=1)
    N = (T + pad) // C
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)
    before = F.pad(runs, (1, 0))[:, :-1].reshape(-1, 1, N, C)[..., :1]  # the run of the state a chunk starts from
    runs = runs.reshape(-1, 1, N, C)
    last = runs[..., -1:]
    G = g.cumsum(-1)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    same = (runs.unsqueeze(-1) == runs.unsqueeze(-2)) & lower
    pair = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~same, float("-inf")).exp()  # exp(G_t - G_j), j <= t
    from_start = G.masked_fill(runs != before, float("-inf")).exp()  # exp(G_t): the chunk's start state still counts
    to_end = (G[..., -1:] - G).masked_fill(runs != last, float("-inf")).exp()  # exp(G_C - G_j)
    carry = G[..., -1:].masked_fill(last != before, float("-inf")).exp().unsqueeze(-1)  # (B, H, N, 1, 1)

    k_beta = k * beta.unsqueeze(-1)
    system = (k_beta @ k.transpose(-1, -2)) * pair  # strictly lower part: A; the diagonal is taken as 1
    writes = torch.linalg.solve_triangular(system, v * beta.unsqueeze(-1), upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(system, k_beta * from_start.unsqueeze(-1), upper=False,
                                          unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * pair
    q_start = q * from_start.unsqueeze(-1)
    k_end = k * to_end.unsqueeze(-1)
    state = q.new_zeros(B, H, dk, dv) if state is None else state.float()
    outputs = []
    for n in range(N):
        u = writes[:, :, n] - reads[:, :, n] @ state
        outputs.append(q_start[:, :, n] @ state + scores[:, :, n] @ u)
        state = state * carry[:, :, n] + k_end[:, :, n].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).reshape(B, H, N * C, dv)[:, :, :T]
    return out.transpose(1, 2), state
