"""The model configuration: every architectural difference between families is a field here.

Nothing in litft looks at a model's *name* to decide how it computes; a named config in
``litft.zoo`` is only a set of defaults for these fields, and a checkpoint's own
``model_config.yaml`` (or HF ``config.json``) always wins.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import yaml

MODEL_CONFIG_FILE = "model_config.yaml"


@dataclass
class Config:
    """Architecture of a decoder-only transformer as used by :class:`litft.model.GPT`."""

    name: str = ""
    hf_id: str = ""
    # which HF architecture (and so which weight-name table) the weights follow, e.g. "llama", "gemma2"
    hf_model_type: str = "llama"

    vocab_size: int = 32000
    block_size: int = 4096  # max_position_embeddings: the longest context the model supports
    n_layer: int = 16
    n_embd: int = 4096
    n_head: int = 32
    n_query_groups: Optional[int] = None  # key/value heads (GQA); None = n_head (MHA)
    head_size: Optional[int] = None  # None = n_embd // n_head
    intermediate_size: int = 11008

    # attention
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on the output projection
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3, Gemma 3)
    qk_norm_across_heads: bool = False  # with qk_norm: one RMSNorm over the whole q and k projections (OLMo 2)
    query_pre_attn_scalar: Optional[float] = None  # scores are scaled by this ** -0.5; None = head_size (Gemma 2/3)
    attn_logit_softcapping: Optional[float] = None  # Gemma 2
    # a learned logit per head as one more softmax column: it takes probability mass and adds no value (gpt-oss)
    attention_sinks: bool = False
    sliding_window: Optional[int] = None  # window size for layers of type "sliding"
    # per-layer attention kind: "full", "sliding", "chunked" or "linear" (Gated DeltaNet, the fields below); None = all
    # "sliding" if sliding_window else all "full"
    layer_types: Optional[list[str]] = None
    # chunked local attention (Llama 4): on "chunked" layers a token at position p sees only the earlier tokens of
    # its chunk, positions [p - p % attention_chunk_size, p]
    attention_chunk_size: Optional[int] = None
    # Llama 4's qk-norm: a weightless RMSNorm (L2 norm) of each q and k head after RoPE, on RoPE layers only
    qk_l2_norm: bool = False
    # attention temperature tuning on NoPE layers (Llama 4): queries at position p are scaled by
    # 1 + attn_temperature_scale * log(1 + floor((p + 1) / attn_temperature_floor_scale)); None = off
    attn_temperature_floor_scale: Optional[int] = None
    attn_temperature_scale: float = 0.0

    # rotary position embedding
    rope_theta: float = 10000.0
    rope_local_theta: Optional[float] = None  # base for sliding layers when it differs (Gemma 3)
    # {"rope_type": "llama3"|"linear"|"yarn"|"longrope"|"dynamic", ...} as in HF ``rope_parameters``
    rope_scaling: Optional[dict[str, Any]] = None
    nope_layers: list[int] = field(default_factory=list)  # layers that apply no RoPE at all (SmolLM3's NoPE)
    partial_rotary_factor: float = 1.0  # fraction of each head that is rotated (Phi-4-mini: 0.75)
    # RoPE rotates adjacent channel pairs (2i, 2i+1) (Llama 4's complex form, DeepSeek-V3's interleave) instead of
    # halves (i, i + dim / 2)
    rope_interleaved: bool = False

    # multi-head latent attention (DeepSeek-V3), on when kv_lora_rank is set: keys and values come from a per-token
    # latent of kv_lora_rank channels (kv_a_proj, kv_a_norm, kv_b_proj) plus one RoPE key of head_size channels
    # shared by all heads; each head's query and key are qk_nope_head_dim unrotated + head_size rotated channels,
    # its value v_head_dim. The generation cache holds only the latent and the RoPE key.
    kv_lora_rank: Optional[int] = None
    q_lora_rank: Optional[int] = None  # low-rank query (q_a_proj, q_a_norm, q_b_proj); None = one q_proj
    qk_nope_head_dim: int = 0
    v_head_dim: Optional[int] = None

    # Gated DeltaNet linear attention on "linear" layers (Qwen3.5, litft/linear_attention.py): linear_num_key_heads
    # query/key heads of linear_key_head_dim and linear_num_value_heads value heads of linear_value_head_dim, a causal
    # depthwise convolution of linear_conv_kernel taps; linear_chunk_size: tokens per chunk of the chunked form
    # (training and prefill), a compute setting that does not change the results
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4
    linear_chunk_size: int = 64
    # full attention gated per channel (Qwen3.5): q_proj also gives a gate, the output is multiplied by its sigmoid
    attention_output_gate: bool = False

    # normalisation
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + weight) (Gemma)
    post_block_norms: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    pre_block_norms: bool = True  # norms before attention and before the MLP; False: only the post norms (OLMo 2)

    # MLP
    # "clamped_swiglu" (gpt-oss): gate clamped above at swiglu_limit, up clamped to +-swiglu_limit,
    # (up + 1) * gate * sigmoid(swiglu_alpha * gate)
    mlp_activation: Literal["silu", "gelu_tanh", "gelu", "clamped_swiglu"] = "silu"
    swiglu_alpha: Optional[float] = None
    swiglu_limit: Optional[float] = None
    mlp_bias: bool = False
    n_expert: int = 0  # > 0: mixture of experts (Mixtral, Qwen3-MoE)
    n_expert_per_token: int = 0
    moe_normalize_topk: bool = True  # the top-k routing weights are renormalised to sum to 1
    moe_router_bias: bool = False  # the router has a bias (gpt-oss)
    moe_intermediate_size: Optional[int] = None  # each expert's hidden size; None = intermediate_size
    moe_dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP among the MoE ones
    # "softmax": top-k of the softmax of the router logits weight the experts' outputs; "sigmoid_inputs" (Llama 4):
    # sigmoid of the top-k router logits scales the experts' inputs; "sigmoid" (DeepSeek-V3): the top-k by sigmoid
    # score (plus the correction bias, among the best groups) weight the experts' outputs by those sigmoid scores
    moe_routing: Literal["softmax", "sigmoid_inputs", "sigmoid"] = "softmax"
    # the options of "sigmoid" routing:
    moe_score_correction_bias: bool = False  # a non-trained per-expert bias added to the scores for choosing only
    moe_n_group: int = 1  # experts in this many equal groups; only the moe_topk_group best groups are chosen from
    moe_topk_group: int = 1  # (a group's score: the sum of its two best expert scores)
    moe_routed_scaling: float = 1.0  # the routing weights are multiplied by this (after renormalisation)
    # hidden size of a shared expert (a gated MLP every token goes through, added to the routed experts; DeepSeek-V3's
    # n_shared_experts are one of n_shared_experts * moe_intermediate_size); None: none
    moe_shared_expert_size: Optional[int] = None
    # the shared expert's output is scaled by sigmoid(shared_expert_gate(x)), one scalar per token (Qwen3.5-MoE)
    moe_shared_expert_gate: bool = False

    # Gemma 4: "full" layers with their own head size and key/value heads (None: head_size, n_query_groups)
    global_head_size: Optional[int] = None
    global_n_query_groups: Optional[int] = None
    attention_k_eq_v: bool = False  # "full" layers have no v_proj: their values are the key projection (before k_norm)
    value_norm: bool = False  # a weightless RMSNorm of each value head
    # the last kv_shared_layers layers compute no keys or values: each attends over those of the last earlier layer of
    # its kind; their MLPs are kv_shared_mlp_factor times as wide (use_double_wide_mlp)
    kv_shared_layers: int = 0
    kv_shared_mlp_factor: int = 1
    # per-layer inputs: a second embedding (per_layer_input_vocab_size tokens, n_layer * per_layer_input_size wide)
    # plus a projection of the input embeddings give each layer per_layer_input_size channels, gated into the
    # residual stream after its MLP; 0: none
    per_layer_input_size: int = 0
    per_layer_input_vocab_size: Optional[int] = None  # None = vocab_size
    layer_scalars: bool = False  # every block's output is multiplied by its own scalar (a buffer, not trained)
    # a mixture of experts beside every layer's dense MLP (Gemma 4's MoE block): the dense MLP's output and the
    # experts' (their input normed by pre_moe_norm, their output by post_moe_norm), each post-normed, are summed
    # before the post-MLP norm; the router sees the block's residual stream
    moe_beside_dense: bool = False
    # routing options (softmax routing): the router's input is RMS-normed without a weight, times a learned
    # per-channel scale and n_embd ** -0.5; the chosen experts' weights are multiplied by a learned per-expert scale
    moe_router_norm: bool = False
    moe_per_expert_scale: bool = False

    # embeddings and head
    scale_embeddings: bool = False  # multiply embeddings by sqrt(n_embd) (Gemma)
    tie_embeddings: bool = False
    final_logit_softcapping: Optional[float] = None  # Gemma 2

    # token ids the checkpoint declares (used by generation and export; tokenizer files may refine them)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None

    extra: dict[str, Any] = field(default_factory=dict)  # HF config keys litft does not interpret, kept for export

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); set head_size")
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_query_groups ({self.n_query_groups})")
        if self.layer_types is None:
            kind = "sliding" if self.sliding_window else "full"
            self.layer_types = [kind] * self.n_layer
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but n_layer is {self.n_layer}")
        bad = sorted(set(self.layer_types) - {"full", "sliding", "chunked", "linear"})
        if bad:
            raise ValueError(f"layer_types may only hold 'full', 'sliding', 'chunked' or 'linear', got {bad}")
        self._check_linear_attention()
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has 'sliding' layers but sliding_window is not set")
        if "chunked" in self.layer_types and not (self.attention_chunk_size and self.attention_chunk_size > 0):
            raise ValueError("layer_types has 'chunked' layers but attention_chunk_size is not a positive integer "
                             f"(got {self.attention_chunk_size})")
        if self.attn_temperature_floor_scale is not None and self.attn_temperature_floor_scale <= 0:
            raise ValueError(f"attn_temperature_floor_scale must be > 0, got {self.attn_temperature_floor_scale}")
        if self.moe_shared_expert_size and not self.n_expert:
            raise ValueError("moe_shared_expert_size is set but n_expert is 0 (a shared expert belongs to a mixture "
                             "of experts)")
        if self.moe_routing not in ("softmax", "sigmoid_inputs", "sigmoid"):
            raise ValueError(f"moe_routing must be 'softmax', 'sigmoid_inputs' or 'sigmoid', got {self.moe_routing!r}")
        if self.n_expert and not 0 < self.n_expert_per_token <= self.n_expert:
            raise ValueError(f"n_expert_per_token must be in [1, n_expert={self.n_expert}], got {self.n_expert_per_token}")
        if self.moe_dense_layers and not self.n_expert:
            raise ValueError("moe_dense_layers is set but n_expert is 0 (without experts every layer is dense)")
        for key in ("moe_dense_layers", "nope_layers"):
            outside = [i for i in getattr(self, key) if not 0 <= i < self.n_layer]
            if outside:
                raise ValueError(f"{key} holds layer indices {outside} outside [0, n_layer={self.n_layer})")
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ValueError("qk_norm_across_heads needs qk_norm")
        if not self.pre_block_norms and not self.post_block_norms:
            raise ValueError("pre_block_norms and post_block_norms are both false: a block needs norms somewhere")
        clamped = self.mlp_activation == "clamped_swiglu"
        if clamped != (self.swiglu_alpha is not None) or clamped != (self.swiglu_limit is not None):
            raise ValueError("swiglu_alpha and swiglu_limit are set exactly when mlp_activation is 'clamped_swiglu' "
                             f"(got mlp_activation={self.mlp_activation!r}, swiglu_alpha={self.swiglu_alpha}, "
                             f"swiglu_limit={self.swiglu_limit})")
        self._check_latent_attention_and_routing()
        self._check_per_layer_attention()
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")

    def _check_linear_attention(self) -> None:
        if self.moe_shared_expert_gate and not self.moe_shared_expert_size:
            raise ValueError("moe_shared_expert_gate is set but there is no shared expert (moe_shared_expert_size)")
        if "linear" not in self.layer_types:
            return
        sizes = {key: getattr(self, key) for key in ("linear_num_key_heads", "linear_num_value_heads",
                                                     "linear_key_head_dim", "linear_value_head_dim",
                                                     "linear_conv_kernel", "linear_chunk_size")}
        small = [f"{key}={value}" for key, value in sizes.items() if not (isinstance(value, int) and value >= 1)]
        if small:
            raise ValueError(f"layer_types has 'linear' layers, which need positive integers: {', '.join(small)}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.kv_lora_rank is not None:
            raise ValueError("linear-attention layers and multi-head latent attention (kv_lora_rank) do not mix")
        if (self.rope_scaling or {}).get("rope_type") == "longrope":
            raise ValueError("linear-attention layers and LongRoPE (rope_scaling rope_type 'longrope') do not mix: "
                             "generation re-runs the sequence at LongRoPE's switch point, which a recurrent state "
                             "cannot take twice")

    def _check_latent_attention_and_routing(self) -> None:
        if self.kv_lora_rank is not None:
            if self.kv_lora_rank < 1 or not self.v_head_dim or self.qk_nope_head_dim < 0:
                raise ValueError("multi-head latent attention needs kv_lora_rank >= 1, v_head_dim >= 1 and "
                                 f"qk_nope_head_dim >= 0 (got {self.kv_lora_rank}, {self.v_head_dim}, "
                                 f"{self.qk_nope_head_dim})")
            unsupported = [key for key in ("attention_sinks", "attn_logit_softcapping", "qk_norm", "sliding_window",
                                           "attention_chunk_size", "qk_l2_norm", "attn_temperature_floor_scale")
                           if getattr(self, key)]
            if unsupported or self.partial_rotary_factor != 1.0:
                raise ValueError(f"multi-head latent attention (kv_lora_rank) does not implement "
                                 f"{', '.join(unsupported or ['partial_rotary_factor'])}")
        elif self.q_lora_rank is not None or self.v_head_dim is not None or self.qk_nope_head_dim:
            raise ValueError("q_lora_rank, v_head_dim and qk_nope_head_dim belong to multi-head latent attention: "
                             "set kv_lora_rank too")
        if self.n_expert and self.n_expert % self.moe_n_group:
            raise ValueError(f"n_expert ({self.n_expert}) is not divisible by moe_n_group ({self.moe_n_group})")
        if not 1 <= self.moe_topk_group <= self.moe_n_group:
            raise ValueError(f"moe_topk_group must be in [1, moe_n_group={self.moe_n_group}], "
                             f"got {self.moe_topk_group}")
        if self.moe_n_group > 1 and (self.moe_routing != "sigmoid" or self.n_expert // self.moe_n_group < 2):
            raise ValueError("moe_n_group > 1 needs moe_routing 'sigmoid' and at least 2 experts per group")
        if self.moe_score_correction_bias and self.moe_routing != "sigmoid":
            raise ValueError("moe_score_correction_bias needs moe_routing 'sigmoid'")
        if self.moe_routed_scaling != 1.0 and self.moe_routing != "sigmoid":
            raise ValueError("moe_routed_scaling needs moe_routing 'sigmoid'")

    def _check_per_layer_attention(self) -> None:
        if self.global_n_query_groups is not None and self.n_head % self.global_n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of global_n_query_groups "
                             f"({self.global_n_query_groups})")
        if not 0 <= self.kv_shared_layers < self.n_layer:
            raise ValueError(f"kv_shared_layers must be in [0, n_layer={self.n_layer}), got {self.kv_shared_layers}")
        if self.kv_shared_mlp_factor < 1:
            raise ValueError(f"kv_shared_mlp_factor must be >= 1, got {self.kv_shared_mlp_factor}")
        first_shared = self.n_layer - self.kv_shared_layers
        missing = sorted(set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared]))
        if missing:
            raise ValueError(f"kv_shared_layers={self.kv_shared_layers}: the shared layers' kinds {missing} have no "
                             "earlier layer of their kind to take keys and values from")
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "proportional" and self.partial_rotary_factor != 1.0:
            raise ValueError("proportional RoPE rotates its own fraction of each head (rope_scaling's "
                             "partial_rotary_factor): partial_rotary_factor must be 1.0")
        if self.moe_beside_dense and (not self.n_expert or self.moe_dense_layers):
            raise ValueError("moe_beside_dense needs n_expert > 0 (and puts the experts beside every layer's dense MLP: "
                             "no moe_dense_layers)")
        if (self.moe_router_norm or self.moe_per_expert_scale) and (not self.n_expert or self.moe_routing != "softmax"):
            raise ValueError("moe_router_norm and moe_per_expert_scale need n_expert > 0 and moe_routing 'softmax'")
        if self.per_layer_input_size < 0:
            raise ValueError(f"per_layer_input_size must be >= 0, got {self.per_layer_input_size}")
        if self.kv_lora_rank is not None and (self.global_head_size or self.global_n_query_groups or self.value_norm
                                              or self.attention_k_eq_v or self.kv_shared_layers):
            raise ValueError("multi-head latent attention (kv_lora_rank) does not implement global_head_size, "
                             "global_n_query_groups, value_norm, attention_k_eq_v or kv_shared_layers")

    def kind_head_size(self, kind: str) -> int:
        """The head size of layers of attention ``kind``."""
        return self.global_head_size if kind == "full" and self.global_head_size else self.head_size

    def kind_query_groups(self, kind: str) -> int:
        """The key/value heads of layers of attention ``kind``."""
        return self.global_n_query_groups if kind == "full" and self.global_n_query_groups else self.n_query_groups

    def kv_source_layer(self, index: int) -> Optional[int]:
        """The layer whose keys and values layer ``index`` attends over (``kv_shared_layers``); None: its own."""
        first_shared = self.n_layer - self.kv_shared_layers
        if index < first_shared:
            return None
        kind = self.layer_types[index]
        return max(i for i in range(first_shared) if self.layer_types[i] == kind)

    def kind_rope_dim(self, kind: str) -> int:
        """Number of dimensions of each head of layers of attention ``kind`` that RoPE rotates."""
        return int(self.kind_head_size(kind) * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` has the mixture of experts (not a dense MLP)."""
        return self.n_expert > 0 and not self.moe_beside_dense and index not in self.moe_dense_layers

    @property
    def rope_dim(self) -> int:
        """Number of dimensions of each head that RoPE rotates."""
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ named configs and files

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """A named config from the zoo, by short name (``Llama-3.2-1B``) or HF repo id."""
        from litft.zoo import get_config

        return get_config(name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        """Build a Config from a mapping, naming unknown or mistyped fields in the error."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of Config fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown field(s) {', '.join(hints)}. Valid fields: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model config not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        cfg = cls.from_dict(data or {}, source=str(path))
        _check_required(data or {}, str(path))
        return cfg

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "Config":
        """The config of a native checkpoint directory (``model_config.yaml``)."""
        checkpoint_dir = Path(checkpoint_dir)
        path = checkpoint_dir / MODEL_CONFIG_FILE
        if not path.is_file():
            hint = ""
            if (checkpoint_dir / "config.json").is_file():
                hint = f" It holds a Hugging Face config.json: run `litft convert from_hf {checkpoint_dir}` first."
            raise FileNotFoundError(f"{checkpoint_dir} is not a litft checkpoint: no {MODEL_CONFIG_FILE}.{hint}")
        return cls.from_file(path)

    def save(self, checkpoint_dir: str | Path) -> Path:
        path = Path(checkpoint_dir) / MODEL_CONFIG_FILE
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


_REQUIRED = ("vocab_size", "n_layer", "n_embd", "n_head", "intermediate_size", "hf_model_type")


def _check_required(data: dict[str, Any], source: str) -> None:
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")


def check_token_ids(ids: Iterable[int], vocab_size: int, what: str) -> None:
    """Refuse token ids outside ``[0, vocab_size)``, the rows of the model's embedding (``what``: whose ids)."""
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{what} token id(s) {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def check_tokenizer_fits(tokenizer: Any, config: Config, checkpoint_dir: Path, samples: Sequence[Any]) -> None:
    """Refuse training data whose token ids the model has no embedding row for: a tokenizer larger than the
    model's vocabulary (its ids are only checked when it is larger, so this costs nothing otherwise)."""
    if tokenizer.vocab_size <= config.vocab_size:
        return
    top = {max(s.input_ids) for s in samples if len(s.input_ids)}
    try:
        check_token_ids(sorted(top, reverse=True), config.vocab_size, "the training data's")
    except ValueError as e:
        files = [f for f in (tokenizer.checkpoint_dir / "tokenizer.json", tokenizer.checkpoint_dir / "tokenizer.model")
                 if f.is_file()]
        raise ValueError(
            f"{files[0] if files else tokenizer.checkpoint_dir}: the tokenizer has {tokenizer.vocab_size} token ids, "
            f"the model only {config.vocab_size} (vocab_size in {Path(checkpoint_dir) / MODEL_CONFIG_FILE}): {e}. "
            "Use the tokenizer the model was trained with") from None
