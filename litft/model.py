"""One decoder-only transformer for every family in the zoo.

``GPT`` → ``Block`` (norm → attention → norm → MLP or MoE) → head. Every difference between
families is a :class:`litft.config.Config` field. Module and parameter names follow the
Hugging Face Llama layout (``q_proj``, ``gate_proj``, ...) so LoRA targets and PEFT exports
use the names users already know.

Attention is computed over *slots*: positions in the sequence, or in the generation cache when one is passed
(:meth:`GPT.make_cache` builds one :class:`litft.cache.Cache` per layer, of the class its attention kind needs;
see litft/cache.py). A query at slot ``q`` may see a key at slot ``k`` when ``k <= q``, ``q - k < window`` on
sliding layers, ``q - k <= p % attention_chunk_size`` on chunked layers (``p``: the query's position, so the key is
in its chunk), and both slots carry the same segment id (packing and left padding). "linear" layers (Gated
DeltaNet, :mod:`litft.linear_attention`) have no mask: they get the flags of the tokens that start a segment, where
they forget their recurrent state.

Prompt tuning (:mod:`litft.peft.prompt`) sets ``GPT.virtual_prompt``: N learned embeddings that act as N tokens in
front of every sequence, at positions 0..N-1 (the real tokens then start at position N), as PEFT's prompt tuning
computes it. They never attend to real tokens, so their keys and values in every layer depend only on the
parameters: :meth:`GPT.virtual_kv` computes them once per forward (once per parameter version under no_grad) and
every attention layer puts them in front of its keys and values. Every query sees them (within the sliding window,
by position), so each packed sample and each row of a batch sees its own copy; the cache never holds them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.cache import Cache, ModelCache, SharedKVCache, cache_class
from litft.config import Config
from litft.linear_attention import GatedDeltaNet, segment_starts

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, 1, T, rope_dim)


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # per-layer inputs (Config.per_layer_input_size): token embeddings and a projection of the input embeddings,
        # n_layer * per_layer_input_size wide, split into one input per layer (see per_layer_inputs)
        size = config.n_layer * config.per_layer_input_size
        if size:
            self.embed_per_layer = nn.Embedding(config.per_layer_input_vocab_size or config.vocab_size, size)
            self.per_layer_model_projection = nn.Linear(config.n_embd, size, bias=False)
            self.per_layer_projection_norm = RMSNorm(config.per_layer_input_size, config.norm_eps,
                                                     config.norm_unit_offset)
        else:
            self.embed_per_layer = self.per_layer_model_projection = self.per_layer_projection_norm = None
        # prompt tuning: a litft.peft.prompt.VirtualPrompt (N learned input embeddings before every sequence)
        self.virtual_prompt: Optional[nn.Module] = None
        # "sdpa" (dense boolean masks) or "flex" (FlexAttention block masks for the uncached forward: packing and
        # sliding windows without a (T, T) mask; see litft/attention.py). Set by the training loop.
        self.attention_backend = "sdpa"

    # ------------------------------------------------------------------ weights

    def tie_weights(self) -> None:
        """Re-tie the head to the embedding after loading with ``assign=True``."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_buffers(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute non-persistent buffers (RoPE frequencies), e.g. after building on the meta device."""
        device = device or self.embed.weight.device
        self.rope.reset(device)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init for models trained from scratch and tests."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 0.0 if module.unit_offset else 1.0)
            elif isinstance(module, CausalSelfAttention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)
            elif isinstance(module, MoE):
                for scale in (module.router_scale, module.per_expert_scale):
                    if scale is not None:
                        nn.init.ones_(scale)
            elif isinstance(module, Block) and module.layer_scalar is not None:
                nn.init.ones_(module.layer_scalar)
            elif isinstance(module, GatedDeltaNet):
                module.reset_parameters()

    @property
    def num_virtual_tokens(self) -> int:
        """Virtual tokens prompt tuning puts before every sequence (they take that many positions of the context)."""
        return 0 if self.virtual_prompt is None else self.virtual_prompt.num_tokens

    def per_layer_inputs(self, idx: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Every layer's per-layer input (B, T, n_layer, per_layer_input_size) for token ids ``idx`` (B, T) and their
        input embeddings ``x``: (norm(projection of x / sqrt(n_embd)) + per-layer token embedding * sqrt(size)) /
        sqrt(2). None without per-layer inputs."""
        if self.embed_per_layer is None:
            return None
        B, T = idx.shape
        size = self.config.per_layer_input_size
        tokens = self.embed_per_layer(idx)
        tokens = (tokens * torch.tensor(size**0.5, dtype=tokens.dtype)).view(B, T, -1, size)
        projected = self.per_layer_model_projection(x) * self.config.n_embd**-0.5
        projected = self.per_layer_projection_norm(projected.view(B, T, -1, size))
        return (projected + tokens) * 2**-0.5

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """The input embeddings of token ids, as they enter the first block (scaled where the family scales)."""
        x = self.embed(idx)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        return x

    # ------------------------------------------------------------------ generation cache

    def make_cache(self, rows: int, length: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> ModelCache:
        """A generation cache of ``rows`` sequences and ``length`` slots (default ``block_size``): one
        :class:`litft.cache.Cache` per layer, of the class its attention kind needs; pass it to :meth:`forward`
        with ``input_pos``. Default dtype and device: the model's."""
        length = length or self.config.block_size
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        kinds = self.config.layer_types
        layers: list[Cache] = []
        for i, kind in enumerate(kinds):
            source = self.config.kv_source_layer(i)  # KV sharing: a view of the source layer's cache
            layers.append(SharedKVCache(layers[source]) if source is not None else
                          cache_class(self.config, kind)(self.config, rows, length, dtype, device))
        return ModelCache(layers, kinds, rows, length, dtype)

    def cache_bytes_per_row(self, length: int, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes one row of ``length`` slots takes in :meth:`make_cache`'s cache (every layer)."""
        dtype = dtype or self.embed.weight.dtype
        return sum(cache_class(self.config, kind).bytes_per_row(self.config, length, dtype)
                   for i, kind in enumerate(self.config.layer_types) if self.config.kv_source_layer(i) is None)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        cache: Optional[ModelCache] = None,
    ) -> torch.Tensor:
        """Logits (or final hidden states) for token ids ``idx`` of shape (B, T).

        input_pos: (T,) slots of ``cache`` (from :meth:`make_cache`; its first B rows) to write this chunk to.
        positions: (T,) or (B, T) RoPE positions; default = the slots (``input_pos`` or ``arange(T)``). With a
            virtual prompt they count from the first real token: the model adds ``num_virtual_tokens``.
        segment_ids: (B, S) segment of every slot (S = T without a cache, the cache length with one);
            attention never crosses segments. Used for packing and for left padding.
        """
        B, T = idx.shape
        cached = input_pos is not None
        if cached != (cache is not None):
            raise ValueError("input_pos and cache go together: pass both (cache=model.make_cache(...)) or neither")
        q_slots = input_pos if cached else torch.arange(T, device=idx.device)
        if positions is None:
            positions = q_slots
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(B, T)
        kv_len = cache.length if cached else T
        x = self.embed_tokens(idx)
        per_layer = self.per_layer_inputs(idx, x)
        n_virtual = self.num_virtual_tokens
        virtual_kv: list = [None] * len(self.blocks)
        if n_virtual:
            virtual_kv = self.virtual_kv(x.dtype)
            positions = positions + n_virtual  # the real tokens come after the virtual ones

        masks = {}
        kinds = self.attention_kinds()
        if "linear" in self.config.layer_types:  # linear layers take the segment starts instead of a mask
            masks["linear"] = segment_starts(q_slots, segment_ids, cached)
        # FlexAttention block masks have no virtual-token columns: with a virtual prompt, dense SDPA masks
        flex = self.attention_backend == "flex" and not cached and not n_virtual
        for kind in kinds:
            full_window = self.config.sliding_window if kind == "sliding" else None
            chunk = self.config.attention_chunk_size if kind == "chunked" else None
            window = full_window
            if window is not None and not cached and T <= window:
                window = None  # the window cannot bind: plain causal (SDPA's fused causal kernel, no mask)
            if flex and chunk is None and (window is not None or segment_ids is not None
                                           or self.config.attn_logit_softcapping):
                from litft.attention import block_mask

                masks[kind] = block_mask(T, window, segment_ids, idx.device)
            else:
                k_slots = cache.key_slots(kind, input_pos) if cached else None
                masks[kind] = build_attention_mask(q_slots, kv_len, window, segment_ids, cached, k_slots)
                if chunk is not None:
                    masks[kind] = within_chunks(masks[kind], q_slots, kv_len, k_slots, positions, chunk)
            if n_virtual:
                masks[kind] = with_virtual_columns(masks[kind], positions, n_virtual, full_window, T, kv_len, chunk)

        rope = {kind: self.rope(positions, kind, x.dtype) for kind in kinds}
        q_scale = self.query_temperature(positions)
        layer_caches = cache.layers if cached else [None] * len(self.blocks)
        shared_kv: dict = {}  # KV sharing: the keys and values of the last layer of each kind that others reuse
        for i, (block, kind, layer_kv, layer_cache) in enumerate(
                zip(self.blocks, self.config.layer_types, virtual_kv, layer_caches)):
            x = block(x, self.layer_rope(i, rope.get(kind)), masks[kind], input_pos, layer_kv, cache=layer_cache,
                      q_scale=self.layer_query_scale(i, q_scale), shared_kv=shared_kv,
                      per_layer_input=None if per_layer is None else per_layer[:, :, i])
        x = self.norm(x)
        if return_hidden:
            return x
        return self.head(x)

    def virtual_kv(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's keys and values (1, n_query_groups, N, head_size) of the virtual tokens, at positions
        0..N-1: the prompt embeddings run through the blocks alone (they attend only to each other). Computed on
        every call while gradients are recorded; otherwise reused until a parameter changes."""
        vp = self.virtual_prompt
        key = None
        if not torch.is_grad_enabled():
            try:
                key = (dtype, vp.embeddings.device, torch.is_inference_mode_enabled(),
                       tuple((id(p), p._version) for p in self.parameters()))
            except RuntimeError:  # inference tensors have no version counter: no reuse
                key = None
            if key is not None and vp.cached_kv is not None and vp.cached_kv[0] == key:
                return vp.cached_kv[1]
        n = vp.num_tokens
        x = vp.embeddings.to(dtype).unsqueeze(0)  # (1, N, C): already in the residual stream's scale
        positions = torch.arange(n, device=x.device).unsqueeze(0)
        rope, masks = {}, {}
        for kind in self.attention_kinds():
            window = self.config.sliding_window if kind == "sliding" else None
            rope[kind] = self.rope(positions, kind, dtype)
            masks[kind] = build_attention_mask(positions[0], n, window if window is not None and n > window
                                               else None, None, False)
            if kind == "chunked":
                masks[kind] = within_chunks(masks[kind], positions[0], n, None, positions,
                                            self.config.attention_chunk_size)
        q_scale = self.query_temperature(positions)
        kv = []
        for i, (block, kind) in enumerate(zip(self.blocks, self.config.layer_types)):
            x, layer_kv = block(x, self.layer_rope(i, rope.get(kind)), masks.get(kind), None, None, True,
                                q_scale=self.layer_query_scale(i, q_scale))
            kv.append(layer_kv)
        if key is not None:
            vp.cached_kv = (key, kv)
        return kv

    def attention_kinds(self) -> list[str]:
        """The layer kinds with (softmax) attention, which take masks and RoPE: every kind but "linear"."""
        return sorted(set(self.config.layer_types) - {"linear"})

    def layer_rope(self, index: int, rope: Optional[RopeTables]) -> Optional[RopeTables]:
        """The cos/sin tables layer ``index`` rotates with; None on a NoPE layer (``Config.nope_layers``)."""
        return None if index in self.config.nope_layers else rope

    def query_temperature(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """The factor (B, 1, T, 1) that attention temperature tuning scales the queries of NoPE layers by at
        ``positions`` (B, T) (``Config.attn_temperature_floor_scale``); None when the model has none."""
        floor_scale = self.config.attn_temperature_floor_scale
        if floor_scale is None or not self.config.nope_layers:
            return None
        steps = torch.floor((positions.float() + 1.0) / floor_scale)
        return (torch.log1p(steps) * self.config.attn_temperature_scale + 1.0)[:, None, :, None]

    def layer_query_scale(self, index: int, q_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The query temperature of layer ``index``: only NoPE layers are tuned."""
        return q_scale if index in self.config.nope_layers else None

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final (normed) hidden states, with the final softcap where the family has one."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Block(nn.Module):
    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        if config.pre_block_norms:
            self.attn_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
            self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        else:
            self.attn_norm = self.mlp_norm = None
        if config.layer_types[index] == "linear":
            self.attn = GatedDeltaNet(config)
        else:
            self.attn = CausalSelfAttention(config, index) if config.kv_lora_rank is None else LatentAttention(config)
        shared = config.kv_source_layer(index) is not None
        self.mlp = MoE(config) if config.is_moe_layer(index) else GatedMLP(
            config, config.intermediate_size * (config.kv_shared_mlp_factor if shared else 1))
        if config.moe_beside_dense:  # experts beside the dense MLP, each with its own norms
            self.moe = MoE(config)
            self.pre_moe_norm, self.post_moe_norm, self.post_dense_norm = (
                RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset) for _ in range(3))
        else:
            self.moe = self.pre_moe_norm = self.post_moe_norm = self.post_dense_norm = None
        if config.post_block_norms:
            self.post_attn_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
            self.post_mlp_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        else:
            self.post_attn_norm = self.post_mlp_norm = None
        # per-layer input (Config.per_layer_input_size): gated by the residual stream, projected, normed and added
        # after the MLP
        size = config.per_layer_input_size
        if size:
            self.per_layer_input_gate = nn.Linear(config.n_embd, size, bias=False)
            self.per_layer_projection = nn.Linear(size, config.n_embd, bias=False)
            self.post_per_layer_input_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        else:
            self.per_layer_input_gate = self.per_layer_projection = self.post_per_layer_input_norm = None
        self.activation = config.mlp_activation
        if config.layer_scalars:  # part of the checkpoint, not trained
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables], mask: Optional[torch.Tensor],
                input_pos: Optional[torch.Tensor], virtual_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                return_kv: bool = False, cache: Optional[Cache] = None, q_scale: Optional[torch.Tensor] = None,
                shared_kv: Optional[dict] = None, per_layer_input: Optional[torch.Tensor] = None) -> Any:
        """The block's output; with ``return_kv``, also this layer's keys and values of ``x`` (see attention).
        ``rope``: None on a NoPE layer. ``shared_kv``: keys and values by layer kind, for KV sharing (see attention).
        ``per_layer_input``: this layer's (B, T, per_layer_input_size) per-layer input."""
        h = self.attn(x if self.attn_norm is None else self.attn_norm(x), rope, mask, input_pos, virtual_kv,
                      return_kv, cache, q_scale, shared_kv)
        if return_kv:
            h, kv = h
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(x if self.mlp_norm is None else self.mlp_norm(x))
        if self.moe is not None:
            h = self.post_dense_norm(h) + self.post_moe_norm(self.moe(self.pre_moe_norm(x), routing_input=x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        x = x + h
        if self.per_layer_input_gate is not None:
            h = activate(self.per_layer_input_gate(x), self.activation) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar.to(x.dtype)
        return (x, kv) if return_kv else x


class CausalSelfAttention(nn.Module):
    """Attention of layer ``index``: its kind's head size and key/value heads (``Config.global_head_size``); on a
    KV-shared layer (``Config.kv_shared_layers``) no key or value projection: it attends over the keys and values
    its source layer stored in ``shared_kv``."""

    def __init__(self, config: Config, index: int = 0) -> None:
        super().__init__()
        self.config = config
        self.kind = config.layer_types[index]
        hs, nh, ng = config.kind_head_size(self.kind), config.n_head, config.kind_query_groups(self.kind)
        self.head_size = hs
        shared = config.kv_source_layer(index) is not None
        # the layer whose keys and values later layers reuse: the last one of its kind before the shared layers
        self.stores_kv = any(config.kv_source_layer(j) == index for j in range(index + 1, config.n_layer))
        # with an output gate, each head's query is followed by its gate's hs channels
        q_size = nh * hs * (2 if config.attention_output_gate else 1)
        self.q_proj = nn.Linear(config.n_embd, q_size, bias=config.attention_bias)
        self.k_proj = None if shared else nn.Linear(config.n_embd, ng * hs, bias=config.attention_bias)
        values_from_keys = shared or (config.attention_k_eq_v and self.kind == "full")
        self.v_proj = None if values_from_keys else nn.Linear(config.n_embd, ng * hs, bias=config.attention_bias)
        self.o_proj = nn.Linear(nh * hs, config.n_embd, bias=config.attention_out_bias)
        if config.qk_norm:  # per head, or (qk_norm_across_heads) over the whole projection
            q_size, k_size = (nh * hs, ng * hs) if config.qk_norm_across_heads else (hs, hs)
            self.q_norm = RMSNorm(q_size, config.norm_eps, config.norm_unit_offset)
            self.k_norm = None if shared else RMSNorm(k_size, config.norm_eps, config.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None
        self.scale = (config.query_pre_attn_scalar or hs) ** -0.5
        # attention sinks: one learned logit per head, an extra softmax column (see ``attend``)
        self.sinks = nn.Parameter(torch.zeros(nh)) if config.attention_sinks else None
        # PEFT hook (LLaMA-Adapter): ``adapter(attn, q)`` returns a term added to the attention output (B, nh, T, hs)
        self.adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables], mask: Optional[torch.Tensor],
                input_pos: Optional[torch.Tensor], virtual_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                return_kv: bool = False, cache: Optional[Cache] = None, q_scale: Optional[torch.Tensor] = None,
                shared_kv: Optional[dict] = None) -> Any:
        """Attention output for ``x`` (B, T, C). ``rope``: None on a NoPE layer. ``cache``: this layer's cache,
        written at slots ``input_pos`` and attended over. ``virtual_kv``: keys and values (1, ng, N, hs) of virtual
        tokens put in front of the keys (``mask`` then has N more columns). ``return_kv``: also return ``x``'s own
        keys and values (after RoPE), as :meth:`GPT.virtual_kv` collects them. ``q_scale``: (B, 1, T, 1) factors
        the queries are multiplied by (attention temperature tuning). ``shared_kv``: keys and values (as attended
        over, after the cache) by layer kind: a KV-shared layer reads its kind's, the layer they come from writes
        them."""
        B, T, _ = x.shape
        q, k, v, gate = self.project(x, rope)
        if q_scale is not None:
            q = (q * q_scale).to(q.dtype)
        if k is None:  # a KV-shared layer: its source layer's keys and values
            if return_kv:
                raise ValueError("a KV-shared layer (kv_shared_layers) has no keys or values of its own to return")
            k, v = shared_kv[self.kind]
        own_kv = (k, v) if return_kv else None
        if cache is not None and self.k_proj is not None:
            k, v = cache.update(input_pos, k, v)
        if self.stores_kv and shared_kv is not None:
            shared_kv[self.kind] = (k, v)
        if virtual_kv is not None:
            vk, vv = virtual_kv
            k = torch.cat((vk.to(k.dtype).expand(k.shape[0], -1, -1, -1), k), dim=2)
            v = torch.cat((vv.to(v.dtype).expand(v.shape[0], -1, -1, -1), v), dim=2)
        y = self.attend(q, k, v, mask)
        if self.adapter is not None:
            y = y + self.adapter(self, q)
        y = y.transpose(1, 2).reshape(B, T, -1)
        if gate is not None:
            y = y * torch.sigmoid(gate)
        out = self.o_proj(y)
        return (out, own_kv) if return_kv else out

    def project(self, x: torch.Tensor, rope: Optional[RopeTables]) -> tuple[
            torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Queries (B, nh, T, hs), keys and values (B, ng, T, hs) of ``x`` (B, T, C), normed and rotated, and the
        output gate (B, T, nh * hs; None without ``attention_output_gate``); on ``attention_k_eq_v`` full layers the
        values are the key projection (before k_norm); no keys or values (None) on a KV-shared layer."""
        B, T, _ = x.shape
        hs = self.head_size
        q, gate = self.q_proj(x), None
        if self.config.attention_output_gate:  # each head's query channels, then its gate's
            q, gate = q.view(B, T, -1, 2 * hs).split(hs, dim=-1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        k = None if self.k_proj is None else self.k_proj(x)
        v = k if self.v_proj is None else self.v_proj(x)
        if self.q_norm is not None and self.config.qk_norm_across_heads:
            q, k = self.q_norm(q), k if k is None else self.k_norm(k)
        q = q.view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        if k is not None:
            k = k.view(B, T, -1, hs).transpose(1, 2)  # (B, ng, T, hs)
            v = v.view(B, T, -1, hs).transpose(1, 2)
            if self.config.value_norm:
                v = l2_norm(v, self.config.norm_eps)
        if self.q_norm is not None and not self.config.qk_norm_across_heads:
            q, k = self.q_norm(q), k if k is None else self.k_norm(k)
        if rope is not None:
            rotate = apply_rope_interleaved if self.config.rope_interleaved else apply_rope
            q, k = rotate(q, rope), k if k is None else rotate(k, rope)
            if self.config.qk_l2_norm:
                q, k = l2_norm(q, self.config.norm_eps), k if k is None else l2_norm(k, self.config.norm_eps)
        return q, k, v, gate

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T * scale, masked) v over (B, nh, T, hs) queries and (B, ng, S, hs) keys/values; with
        softcapping the scores are capped before the mask, with sinks each head's sink logit is one more column of
        the softmax, dropped after it (it sees every query, so a row never has all its columns masked)."""
        cap = self.config.attn_logit_softcapping
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            if self.sinks is not None:
                raise ValueError("FlexAttention has no attention sinks: use attention 'sdpa' for this model")
            from litft.attention import flex_attend

            return flex_attend(q, k, v, mask, self.scale, cap)
        if cap is None and self.sinks is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
            )
        # the scores themselves: cap them, then mask them (never add a mask to capped scores), then the sinks
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks is None:
            return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        B, nh, T, _ = scores.shape
        sink = self.sinks.to(scores.dtype).view(1, nh, 1, 1).expand(B, nh, T, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1, dtype=torch.float32)
        return probs[..., :-1].to(q.dtype) @ v


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V3, ``Config.kv_lora_rank``): every token's keys and values come from a
    normed latent of ``kv_lora_rank`` channels (``kv_b_proj`` expands it per head into unrotated key and value
    channels) and one RoPE key of ``head_size`` channels shared by all heads; the query is low-rank when
    ``q_lora_rank`` is set. The cache (:class:`litft.cache.LatentCache`) stores the latent and the RoPE key only;
    with a cache, attention reads them as they are (``kv_b_proj`` absorbed into the query and the output, see
    :meth:`attend_latent`), except under LoRA or quantization of ``kv_b_proj``, where they are expanded per head.
    Scores are scaled by (qk_nope_head_dim + head_size) ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared
    when the RoPE scaling sets ``mscale_all_dim``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        nh, rope_dim = config.n_head, config.head_size
        self.nope_dim, self.v_dim, self.rank = config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + rope_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.n_embd, nh * qk_dim, bias=False)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(config.n_embd, config.q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, nh * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(config.n_embd, self.rank + rope_dim, bias=bias)
        self.kv_a_norm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, config.n_embd, bias=bias)
        self.scale = qk_dim**-0.5 * latent_softmax_mscale(config.rope_scaling) ** 2
        self.sinks = None

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables], mask: Optional[torch.Tensor],
                input_pos: Optional[torch.Tensor], virtual_kv: Optional[Any] = None, return_kv: bool = False,
                cache: Optional[Cache] = None, q_scale: Optional[torch.Tensor] = None,
                shared_kv: Optional[dict] = None) -> torch.Tensor:
        """As :meth:`CausalSelfAttention.forward`, without virtual tokens or KV sharing."""
        if virtual_kv is not None or return_kv:
            raise ValueError("prompt tuning (virtual tokens) is not implemented for multi-head latent attention "
                             "(kv_lora_rank): use LoRA")
        B, T, _ = x.shape
        nh = self.config.n_head
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, T, nh, -1).transpose(1, 2).split([self.nope_dim, self.config.head_size], dim=-1)
        latent, k_rot = self.kv_a_proj(x).split([self.rank, self.config.head_size], dim=-1)
        latent, k_rot = self.kv_a_norm(latent).unsqueeze(1), k_rot.unsqueeze(1)  # (B, 1, T, ...)
        if rope is not None:
            rotate = apply_rope_interleaved if self.config.rope_interleaved else apply_rope
            q_rot, k_rot = rotate(q_rot, rope), rotate(k_rot, rope)
        if q_scale is not None:
            q_nope, q_rot = (q_nope * q_scale).to(q_nope.dtype), (q_rot * q_scale).to(q_rot.dtype)
        if cache is not None:
            latent, k_rot = cache.update(input_pos, latent, k_rot)
            if type(self.kv_b_proj) is nn.Linear:  # not under LoRA or quantization: its plain weight is the map
                return self.o_proj(self.attend_latent(q_nope, q_rot, latent, k_rot, mask))
        S = latent.shape[2]
        k_nope, v = self.kv_b_proj(latent).view(B, S, nh, -1).transpose(1, 2).split([self.nope_dim, self.v_dim], -1)
        k = torch.cat((k_nope, k_rot.expand(B, nh, S, -1)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            from litft.attention import flex_attend

            y = flex_attend(q, k, v, mask, self.scale, None)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * self.v_dim))


    def attend_latent(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention read from the cache without expanding it per head (``kv_b_proj`` absorbed): a head's unrotated
        key channels are W_k latent, so q_nope . W_k latent = (W_k^T q_nope) . latent; likewise its output is
        W_v (probs @ latent). One single-head attention over (latent, rope key) with the absorbed queries, whatever
        the number of heads. Returns (B, T, n_head * v_head_dim)."""
        B, nh, T, _ = q_nope.shape
        w_k, w_v = self.kv_b_proj.weight.view(nh, self.nope_dim + self.v_dim, self.rank).split(
            [self.nope_dim, self.v_dim], dim=1)
        q = torch.cat((q_nope @ w_k, q_rot), dim=-1)  # (B, nh, T, rank + rope)
        k = torch.cat((latent, k_rot), dim=-1)  # (B, 1, S, rank + rope)
        context = F.scaled_dot_product_attention(q, k, latent, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.scale, enable_gqa=True)  # (B, nh, T, rank)
        return (context @ w_v.transpose(1, 2)).transpose(1, 2).reshape(B, T, nh * self.v_dim)


# transformers' DeepseekV3RMSNorm default: the q and kv latent norms do not take rms_norm_eps
LATENT_NORM_EPS = 1e-6


def latent_softmax_mscale(scaling: Optional[dict]) -> float:
    """YaRN's mscale(factor, mscale_all_dim), by which latent attention's softmax scale is multiplied twice; 1 without
    YaRN or ``mscale_all_dim``."""
    if not scaling or scaling.get("rope_type", "default") == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    factor = scaling["factor"]
    return 1.0 if factor <= 1 else 0.1 * scaling["mscale_all_dim"] * math.log(factor) + 1.0


def build_attention_mask(
    q_slots: torch.Tensor, kv_len: int, window: Optional[int], segment_ids: Optional[torch.Tensor], cached: bool,
    k_slots: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Boolean mask (B or 1, 1, T, S) of what each query may attend to; None means plain causal. ``k_slots``: the
    slot each key column holds (S,), negative for none (a cache's ``key_slots``); default column j = slot j."""
    if not cached and window is None and segment_ids is None:
        return None
    columns = torch.arange(kv_len, device=q_slots.device) if k_slots is None else k_slots
    diff = q_slots.unsqueeze(-1) - columns.unsqueeze(0)  # (T, S)
    mask = diff >= 0
    if k_slots is not None:
        mask = mask & (k_slots >= 0)
    if window is not None:
        mask = mask & (diff < window)
    mask = mask.unsqueeze(0)
    if segment_ids is not None:
        if segment_ids.shape[-1] != kv_len:
            raise ValueError(f"segment_ids covers {segment_ids.shape[-1]} slots, expected {kv_len}")
        q_seg = segment_ids.index_select(1, q_slots)  # (B, T)
        k_seg = segment_ids if k_slots is None else segment_ids.index_select(1, k_slots.clamp_min(0))
        mask = mask & (q_seg.unsqueeze(-1) == k_seg.unsqueeze(1))
    return mask.unsqueeze(1)


def within_chunks(mask: Optional[torch.Tensor], q_slots: torch.Tensor, kv_len: int, k_slots: Optional[torch.Tensor],
                  positions: torch.Tensor, chunk: int) -> torch.Tensor:
    """``mask`` (None = plain causal over ``kv_len`` slots) restricted to chunked local attention: a query at
    position p (``positions`` (B, T)) sees the keys at most ``p % chunk`` slots before it, the earlier tokens of its
    chunk (slot differences equal position differences within a row). ``k_slots`` as in
    :func:`build_attention_mask`."""
    columns = torch.arange(kv_len, device=q_slots.device) if k_slots is None else k_slots
    diff = q_slots.unsqueeze(-1) - columns.unsqueeze(0)  # (T, S)
    keep = ((diff >= 0) & (diff <= (positions % chunk).unsqueeze(-1))).unsqueeze(1)  # (B, 1, T, S)
    return keep if mask is None else keep & mask


def with_virtual_columns(mask: Optional[torch.Tensor], positions: torch.Tensor, n_virtual: int,
                         window: Optional[int], T: int, kv_len: int, chunk: Optional[int] = None) -> torch.Tensor:
    """``mask`` (None = plain causal over T slots) with ``n_virtual`` columns in front for the virtual tokens at
    positions 0..n-1: every query sees them, on sliding layers only within ``window`` of its position, on chunked
    layers only those in its chunk (``positions``: the queries' positions, virtual tokens counted)."""
    device = positions.device
    if mask is None:
        mask = torch.ones(T, kv_len, dtype=torch.bool, device=device).tril().view(1, 1, T, kv_len)
    virtual = torch.arange(n_virtual, device=device)
    if chunk is not None:
        seen = (positions.unsqueeze(-1) // chunk == virtual // chunk).unsqueeze(1)
    elif window is None:
        seen = torch.ones(1, 1, T, n_virtual, dtype=torch.bool, device=device)
    else:
        seen = (positions.unsqueeze(-1) - virtual < window).unsqueeze(1)
    b = max(mask.shape[0], seen.shape[0])
    return torch.cat((seen.expand(b, 1, T, n_virtual), mask.expand(b, 1, T, mask.shape[-1])), dim=-1)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu)."""

    def __init__(self, config: Config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.n_embd, size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(size, config.n_embd, bias=config.mlp_bias)
        self.activation = config.mlp_activation
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "clamped_swiglu":
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
            return self.down_proj((up + 1) * gate * torch.sigmoid(gate * self.swiglu_alpha))
        return self.down_proj(activate(gate, self.activation) * up)


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown mlp_activation {kind!r}")


class MoE(nn.Module):
    """Sparse mixture of gated-MLP experts with top-k routing (``Config.moe_routing``): softmax weights on the
    experts' outputs (Mixtral, Qwen3-MoE, gpt-oss; Gemma 4 with a normed, scaled router input and per-expert
    scales), sigmoid scores on their inputs (Llama 4) or grouped sigmoid scores with a correction bias on their
    outputs (DeepSeek-V3, :meth:`route_sigmoid`), plus an optional shared expert every token goes through
    (``Config.moe_shared_expert_size``), its output scaled by the sigmoid of a per-token gate with
    ``Config.moe_shared_expert_gate`` (Qwen3.5-MoE).

    Computed by expert, not by token: the (token, choice) pairs are sorted by expert id, each expert runs once
    on its contiguous group of rows, and every token's k outputs are summed with their routing weights (or, with
    the weights on the inputs, as they are).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=config.moe_router_bias)
        size = config.moe_intermediate_size or config.intermediate_size
        self.experts = nn.ModuleList(GatedMLP(config, size) for _ in range(config.n_expert))
        self.top_k = config.n_expert_per_token
        self.normalize = config.moe_normalize_topk
        self.config = config
        self.weights_on_inputs = config.moe_routing == "sigmoid_inputs"
        # not trained (a load-balancing offset updated outside gradient descent), but part of the checkpoint
        if config.moe_score_correction_bias:
            self.register_buffer("score_correction_bias", torch.zeros(config.n_expert, dtype=torch.float32))
        else:
            self.score_correction_bias = None
        shared = config.moe_shared_expert_size
        self.shared_expert = GatedMLP(config, shared) if shared else None
        self.router_scale = nn.Parameter(torch.ones(config.n_embd)) if config.moe_router_norm else None
        self.per_expert_scale = nn.Parameter(torch.ones(config.n_expert)) if config.moe_per_expert_scale else None
        # one scalar per token scaling the shared expert's output by its sigmoid (Qwen3.5-MoE)
        self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False) if config.moe_shared_expert_gate else None

    def _apply(self, fn: Any, recurse: bool = True) -> "MoE":
        """As nn.Module's (``.to``, ``.cuda``, ``.bfloat16`` ...), but the score correction bias only moves: it keeps
        its float32 values."""
        bias = self.score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            moved = self.score_correction_bias
            kept = moved.float() if bias.device.type == "meta" or moved.device.type == "meta" else \
                bias.to(device=moved.device, dtype=torch.float32)
            self._buffers["score_correction_bias"] = kept
        return self

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (N, k) in ``x``'s dtype and chosen expert ids (N, k) of the rows of ``x`` (N, C)."""
        if self.weights_on_inputs:  # sigmoid of the top-k logits
            top, chosen = self.router(x).topk(self.top_k, dim=-1)
            return torch.sigmoid(top.float()).to(x.dtype), chosen
        if self.config.moe_routing == "sigmoid":
            weights, chosen = self.route_sigmoid(x)
            weights = weights * self.config.moe_routed_scaling
        else:
            seen = x  # by the router: with router_scale, weightless RMSNorm times a scale per channel, / sqrt(C)
            if self.router_scale is not None:
                seen = l2_norm(x, self.config.norm_eps) * self.router_scale * self.config.n_embd**-0.5
            probs = torch.softmax(self.router(seen), dim=-1, dtype=torch.float32)
            weights, chosen = probs.topk(self.top_k, dim=-1)
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.per_expert_scale is not None:
                weights = weights * self.per_expert_scale[chosen]
        return weights.to(x.dtype), chosen

    def route_sigmoid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores in float32; the top-k by score (+ correction bias) among the experts of the
        ``moe_topk_group`` groups with the best sums of their two best scores; weights: the chosen scores."""
        if type(self.router) is nn.Linear:  # in float32, as transformers (its router weight stays float32)
            bias = None if self.router.bias is None else self.router.bias.float()
            scores = F.linear(x.float(), self.router.weight.float(), bias).sigmoid()
        else:  # a quantized router (QLoRA)
            scores = self.router(x).float().sigmoid()
        choice = scores if self.score_correction_bias is None else scores + self.score_correction_bias
        groups = self.config.moe_n_group
        if groups > 1:
            per_group = choice.view(-1, groups, choice.shape[-1] // groups)
            best = per_group.topk(2, dim=-1)[0].sum(dim=-1).topk(self.config.moe_topk_group, dim=-1)[1]
            allowed = torch.zeros_like(per_group[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = per_group.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view_as(choice)
        chosen = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, chosen)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights, chosen

    def forward(self, x: torch.Tensor, routing_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The experts' output for ``x`` (..., C), routed by ``routing_input`` (the same shape; default ``x``)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x if routing_input is None else routing_input.reshape(-1, shape[-1]))
        flat = chosen.reshape(-1)  # (N * k,): the expert of every (token, choice) pair
        order = flat.argsort(stable=True)  # pairs grouped by expert, tokens in order within a group
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        grouped = x.index_select(0, order // self.top_k)
        if self.weights_on_inputs:
            grouped = grouped * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        outputs = [expert(rows) for expert, rows in zip(self.experts, grouped.split(counts)) if rows.shape[0]]
        y = torch.cat(outputs).to(x.dtype) if outputs else grouped
        unsorted = torch.empty_like(y).index_copy_(0, order, y).view(-1, self.top_k, shape[-1])  # (token, choice)
        routed = unsorted.sum(dim=1) if self.weights_on_inputs else (unsorted * weights.unsqueeze(-1)).sum(dim=1)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            routed = shared + routed
        return routed.view(shape)


# tensors that stay float32 whatever dtype the model is loaded, converted or cast to (transformers keeps them so): a
# routing offset whose small differences between experts decide which experts run
FLOAT32_TENSORS = ("score_correction_bias",)


def keeps_float32(name: str) -> bool:
    """Whether the state-dict tensor ``name`` stays float32 when the model's dtype changes."""
    return name.rsplit(".", 1)[-1] in FLOAT32_TENSORS


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; ``unit_offset`` scales by (1 + weight) as Gemma does."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(dtype)
        return self.weight * xf.to(dtype)


# ---------------------------------------------------------------------- rotary embeddings


class RotaryEmbedding(nn.Module):
    """cos/sin tables per layer kind, computed from positions in float32 on every call."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.attention_scaling: dict[str, float] = {}
        self.long_switch: Optional[int] = None
        self.reset(None)

    def reset(self, device: Optional[torch.device]) -> None:
        cfg = self.config
        for kind in ("full", "sliding", "chunked"):
            dim = cfg.kind_rope_dim(kind)
            if kind == "sliding" and cfg.rope_local_theta is not None:
                inv, scale, long_inv = rope_inv_freq(dim, cfg.rope_local_theta, None, cfg.block_size)
            else:
                inv, scale, long_inv = rope_inv_freq(dim, cfg.rope_theta, cfg.rope_scaling, cfg.block_size)
            self.register_buffer(f"inv_freq_{kind}", inv if device is None else inv.to(device), persistent=False)
            if long_inv is not None:
                self.register_buffer(f"long_inv_freq_{kind}", long_inv if device is None else long_inv.to(device), persistent=False)
                self.long_switch = int(cfg.rope_scaling["original_max_position_embeddings"])
            self.attention_scaling[kind] = scale

    def forward(self, positions: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = getattr(self, f"inv_freq_{kind}")
        if self.long_switch is not None and hasattr(self, f"long_inv_freq_{kind}"):
            # LongRoPE: the long factors apply once the sequence is longer than the original context; each
            # row decides for itself, so a batch gives the same result as each of its rows alone
            use_long = (positions.amax(dim=-1, keepdim=True) + 1 > self.long_switch).unsqueeze(-1)  # (B, 1, 1)
            inv_freq = torch.where(use_long, getattr(self, f"long_inv_freq_{kind}"), inv_freq)
        freqs = positions.float().unsqueeze(-1) * inv_freq.float()  # (B, T, rope_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.attention_scaling[kind]
        cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # (B, 1, T, rope_dim)


def rope_inv_freq(
    dim: int, base: float, scaling: Optional[dict], max_positions: int
) -> tuple[torch.Tensor, float, Optional[torch.Tensor]]:
    """Inverse frequencies, the cos/sin scaling factor and (LongRoPE only) the long-context frequencies."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling is None or kind == "default":
        return inv_freq, 1.0, None
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0, None
    if kind == "dynamic":
        return inv_freq, 1.0, None  # dynamic NTK only changes frequencies past max_position_embeddings
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0, None
    if kind == "yarn":
        return _yarn(dim, base, scaling, max_positions)
    if kind == "proportional":
        # the first partial_rotary_factor of the frequencies (exponents over the whole dim), the rest 0: channels
        # i and i + dim / 2 rotate together, by nothing past the rotated fraction (Gemma 4's global layers)
        rotated = int(scaling.get("partial_rotary_factor", 1.0) * dim // 2)
        inv_freq = torch.cat((inv_freq[:rotated], torch.zeros(dim // 2 - rotated)))
        return inv_freq / scaling.get("factor", 1.0), 1.0, None
    if kind == "longrope":
        old_len = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or max_positions / old_len
        att = scaling.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
        short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * base**exponents)
        long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * base**exponents)
        return short, att, long
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, dynamic, llama3, yarn, longrope, "
                     "proportional)")


def _yarn(dim: int, base: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float, None]:
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = scaling.get("attention_factor")
    if att is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        att = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, att, None


def apply_rope_interleaved(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of the first ``rope_dim`` channels of each head by frequency i
    (Llama 4's complex-number form; ``Config.rope_interleaved``)."""
    cos, sin = rope
    rot = cos.shape[-1]
    cos, sin = cos[..., :rot // 2], sin[..., :rot // 2]  # the tables repeat each frequency in both halves
    x_rot, x_pass = (x[..., :rot], x[..., rot:]) if rot < x.shape[-1] else (x, None)
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim in float32, without a weight (Llama 4's qk-norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first ``rope_dim`` channels of each head (HF "rotate_half" layout)."""
    cos, sin = rope
    rot = cos.shape[-1]
    x_rot, x_pass = (x[..., :rot], x[..., rot:]) if rot < x.shape[-1] else (x, None)
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)
