"""What every family file declares: its named configs, how its HF ``config.json`` maps to
:class:`~litft.config.Config`, and its HF weight-name table. Each table is used in both
conversion directions (HF → litft and litft → HF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from litft.config import Config

# HF config.json key  <->  Config field, shared by all families (one table, both directions)
COMMON_CONFIG_KEYS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "block_size",
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_query_groups",
    "head_dim": "head_size",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
# keys only some families have: written back only when set
OPTIONAL_CONFIG_KEYS: dict[str, str] = {
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}

# keys that HF writes but that carry no architecture (dropped from Config.extra)
IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "initializer_range", "attention_dropout", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
    "hidden_activation", "layer_types", "sliding_window", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "pretraining_tp", "_sliding_window_pattern", "sliding_window_pattern",
    "rope_local_base_freq", "partial_rotary_factor", "original_max_position_embeddings", "use_sliding_window",
    "max_window_layers", "num_local_experts", "num_experts_per_tok", "attention_bias", "mlp_bias",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "embd_pdrop", "resid_pdrop",
    "hidden_dropout", "use_bidirectional_attention",
}


@dataclass(frozen=True)
class WeightRule:
    """One row of a weight-name table: ``native`` ↔ ``hf`` templates with ``{i}`` (layer) and ``{e}`` (expert).

    A fused HF tensor (Phi-3 ``qkv_proj``) maps to several native tensors: ``native`` is then a tuple,
    and ``split`` gives each part's size along dim 0 for a config.

    An HF tensor that stacks every expert (gpt-oss's ``experts.gate_up_proj``) has ``{e}`` in ``native`` only:
    ``unstack(tensor, config)`` gives the natives' tensors expert by expert (expert 0's natives, then expert 1's, ...)
    and ``stack`` is its inverse.
    """

    native: str | tuple[str, ...]
    hf: str
    split: Optional[Callable[[Config], list[int]]] = None
    unstack: Optional[Callable[[torch.Tensor, Config], list[torch.Tensor]]] = None
    stack: Optional[Callable[[list[torch.Tensor], Config], torch.Tensor]] = None

    @property
    def natives(self) -> tuple[str, ...]:
        return self.native if isinstance(self.native, tuple) else (self.native,)

    def part_names(self, natives: tuple[str, ...], config: Config) -> tuple[str, ...]:
        """The native names of one HF tensor's parts (``natives`` filled for its layer), every expert for a stacked
        rule."""
        if self.unstack is None:
            return natives
        return tuple(n.replace("{e}", str(e)) for e in range(config.n_expert) for n in natives)

    def to_native(self, tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
        """One HF tensor as its native parts (in ``part_names`` order)."""
        if self.unstack is not None:
            return self.unstack(tensor, config)
        return list(tensor.split(self.split(config), dim=0)) if self.split else [tensor]

    def to_hf(self, parts: list[torch.Tensor], config: Config) -> torch.Tensor:
        """The HF tensor of native parts (in ``part_names`` order)."""
        if self.stack is not None:
            return self.stack(parts, config)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}$")


@dataclass
class Family:
    """A family of architectures that share one HF weight layout."""

    model_type: str  # HF model_type written to config.json (and Config.hf_model_type)
    architecture: str  # HF class name written to config.json "architectures"
    weight_rules: list[WeightRule]
    configs: list[Config] = field(default_factory=list)
    traits: dict[str, Any] = field(default_factory=dict)  # Config fields fixed by the architecture
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # HF config-class defaults for absent keys
    # family-specific parts of the config mapping, both directions
    read_hf: Optional[Callable[[dict, dict], None]] = None  # (hf_config, fields) -> fills fields
    write_hf: Optional[Callable[[Config, dict], None]] = None  # (config, hf_config) -> fills hf_config
    # prefixes of HF checkpoints that wrap the text model (multimodal repos), mapped to the plain prefix
    hf_prefix_aliases: dict[str, str] = field(default_factory=dict)
    hf_ignored_prefixes: tuple[str, ...] = ()  # tensors that are not part of the text model
    hf_keys: tuple[str, ...] = ()  # config.json keys that read_hf interprets (kept out of Config.extra)
    # config.json keys with the only values litft implements: any other value is refused by name, never dropped
    hf_supported_values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # (hf_key, config) -> whether an HF tensor is one the architecture does not use (transformers does not load it
    # either), e.g. the key/value projections of Gemma 4's KV-shared layers
    hf_unused: Optional[Callable[[str, Config], bool]] = None
    # tensors of layers numbered num_hidden_layers and above are skipped on import (DeepSeek-V3's multi-token
    # prediction layers, which transformers does not load either)
    hf_layers_past_n_layer_ignored: bool = False

    def __post_init__(self) -> None:
        self._hf_regex = [(_template_regex(r.hf), r) for r in self.weight_rules]
        self._native_regex = [[(_template_regex(n), r, j) for j, n in enumerate(r.natives)] for r in self.weight_rules]

    # -------------------------------------------------------------- config mapping

    def config_from_hf(self, hf: dict[str, Any], name: str = "", hf_id: str = "") -> Config:
        # an explicit null window or chunk size means none (not the class default)
        hf = {**self.hf_defaults,
              **{k: v for k, v in hf.items() if v is not None or k in ("sliding_window", "attention_chunk_size")}}
        for key, supported in self.hf_supported_values.items():
            if key in hf and hf[key] not in supported:
                raise ValueError(f"config.json: {key}={hf[key]!r} is not a value litft implements for model_type "
                                 f"{self.model_type!r} (supported: {', '.join(map(repr, supported))})")
        fields: dict[str, Any] = dict(self.traits)
        for hf_key, cfg_key in COMMON_CONFIG_KEYS.items():
            if hf.get(hf_key) is not None:
                fields[cfg_key] = hf[hf_key]
        for hf_key, cfg_key in OPTIONAL_CONFIG_KEYS.items():
            if hf.get(hf_key) is not None:
                fields[cfg_key] = hf[hf_key]
        act = hf.get("hidden_activation") or hf.get("hidden_act")
        if act is not None and "mlp_activation" not in self.traits:
            if act not in ACTIVATIONS:
                raise ValueError(f"config.json: unsupported hidden_act {act!r} (supported: {sorted(ACTIVATIONS)})")
            fields["mlp_activation"] = ACTIVATIONS[act]
        for key in ("attention_bias", "mlp_bias"):
            if key in hf and key not in self.traits:
                fields[key] = bool(hf[key])
        if "attention_out_bias" not in self.traits:  # HF puts the same bias switch on o_proj, Qwen2 aside
            fields["attention_out_bias"] = fields.get("attention_bias", False)
        theta, scaling, local_theta = read_rope(hf)
        fields["rope_theta"] = theta
        fields["rope_scaling"] = scaling
        if local_theta is not None:
            fields["rope_local_theta"] = local_theta
        if hf.get("partial_rotary_factor") is not None:
            fields["partial_rotary_factor"] = float(hf["partial_rotary_factor"])
        if hf.get("sliding_window"):
            fields["sliding_window"] = int(hf["sliding_window"])
        if hf.get("layer_types"):
            fields["layer_types"] = [_layer_kind(t) for t in hf["layer_types"]]
        if self.read_hf is not None:
            self.read_hf(hf, fields)
        if not fields.get("sliding_window"):
            fields.pop("sliding_window", None)
            if fields.get("layer_types") and "sliding" in fields["layer_types"]:
                fields["layer_types"] = ["full"] * len(fields["layer_types"])
        known = set(COMMON_CONFIG_KEYS) | IGNORED_HF_KEYS | set(self.hf_keys)
        fields["extra"] = {k: v for k, v in hf.items() if k not in known and k not in self.hf_defaults}
        fields.update(name=name, hf_id=hf_id, hf_model_type=self.model_type)
        return Config.from_dict(fields, source="config.json")

    def config_to_hf(self, config: Config, dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
        hf: dict[str, Any] = dict(config.extra)
        hf["architectures"] = [self.architecture]
        hf["model_type"] = self.model_type
        for hf_key, cfg_key in COMMON_CONFIG_KEYS.items():
            hf[hf_key] = getattr(config, cfg_key)
        for hf_key, cfg_key in OPTIONAL_CONFIG_KEYS.items():
            if getattr(config, cfg_key) is not None:
                hf[hf_key] = getattr(config, cfg_key)
        if config.mlp_activation in HF_ACTIVATIONS:  # else the family's write_hf says how its config names it
            hf["hidden_act"] = HF_ACTIVATIONS[config.mlp_activation]
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = config.mlp_bias
        hf["rope_theta"] = config.rope_theta
        hf["rope_scaling"] = config.rope_scaling
        if config.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = config.partial_rotary_factor
        hf["sliding_window"] = config.sliding_window
        if config.sliding_window:
            hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]
        if self.write_hf is not None:
            self.write_hf(config, hf)
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        hf["use_cache"] = True
        return hf

    # -------------------------------------------------------------- weight names

    def hf_to_native(self, hf_key: str) -> Optional[tuple[WeightRule, tuple[str, ...]]]:
        """The rule matching an HF tensor name and the native name(s) it maps to; None if not a text weight."""
        for alias, plain in self.hf_prefix_aliases.items():
            if hf_key.startswith(alias):
                hf_key = plain + hf_key[len(alias):]
                break
        for regex, rule in self._hf_regex:
            m = regex.match(hf_key)
            if m:
                return rule, tuple(_fill(n, m) for n in rule.natives)
        return None

    def is_ignored_hf(self, hf_key: str, config: Optional[Config] = None) -> bool:
        """Whether an HF tensor is not part of the text model (with ``config``: nor of its ``n_layer`` layers, where
        the family skips layers past them)."""
        if self.hf_layers_past_n_layer_ignored and config is not None:
            m = _HF_LAYER.match(hf_key)
            if m is not None and int(m["i"]) >= config.n_layer:
                return True
        if self.hf_unused is not None and config is not None and self.hf_unused(hf_key, config):
            return True
        return hf_key.startswith(self.hf_ignored_prefixes) or hf_key.endswith("rotary_emb.inv_freq")

    def native_to_hf(self, native_key: str) -> Optional[tuple[WeightRule, int, str]]:
        """The rule matching a native tensor name, its part index in a fused HF tensor, and the HF name."""
        for entries in self._native_regex:
            for regex, rule, part in entries:
                m = regex.match(native_key)
                if m:
                    if rule.unstack is not None:  # expert e's parts come after those of experts 0..e-1
                        part += int(m["e"]) * len(rule.natives)
                    return rule, part, _fill(rule.hf, m)
        return None


_HF_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.")


def _fill(template: str, m: re.Match) -> str:
    """``template`` with the layer and expert numbers of ``m``; an ``{e}`` the match has no number for stays (a
    stacked rule's HF name holds every expert)."""
    groups = m.groupdict()
    out = template.replace("{i}", groups.get("i") or "")
    return out if groups.get("e") is None else out.replace("{e}", groups["e"])


def _layer_kind(hf_type: str) -> str:
    if hf_type in ("sliding_attention", "sliding", "local"):
        return "sliding"
    if hf_type in ("full_attention", "full", "global"):
        return "full"
    if hf_type in ("chunked_attention", "chunked"):
        return "chunked"
    if hf_type == "linear_attention":
        return "linear"
    raise ValueError(f"config.json: unsupported layer type {hf_type!r} (expected full_attention, sliding_attention, "
                     "chunked_attention or linear_attention)")


def read_rope(hf: dict[str, Any]) -> tuple[float, Optional[dict], Optional[float]]:
    """RoPE base, scaling dict and local base from either the legacy (rope_theta/rope_scaling) or the
    transformers-5 (rope_parameters) layout of config.json."""
    params = hf.get("rope_parameters")
    local_theta = hf.get("rope_local_base_freq")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        sliding = params.get("sliding_attention") or {}
        theta = full.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = _scaling(full, hf, per_layer=True)
        local_theta = sliding.get("rope_theta", local_theta)
        return float(theta), scaling, None if local_theta is None else float(local_theta)
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        return float(theta), _scaling(params, hf), None if local_theta is None else float(local_theta)
    theta = hf.get("rope_theta", 10000.0)
    scaling = _scaling(hf.get("rope_scaling") or {}, hf)
    return float(theta), scaling, None if local_theta is None else float(local_theta)


def refuse_scaled_sliding_rope(hf: dict[str, Any], model_type: str) -> None:
    """Refuse by name a ``rope_parameters.sliding_attention`` of another type than default: litft gives sliding
    layers their own base only (``Config.rope_local_theta``), scaling applies to the full layers."""
    sliding_rope = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
    kind = sliding_rope.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"config.json: rope_parameters.sliding_attention.rope_type={kind!r} is not implemented by "
                         f"litft for model_type {model_type!r} (supported: 'default'; scaling applies to full layers)")


# the keys each RoPE scaling type needs in config.json's rope_scaling / rope_parameters (as transformers validates them)
ROPE_REQUIRED_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                      "longrope": ("short_factor", "long_factor"), "proportional": ()}
_ORIGINAL_MAX = "original_max_position_embeddings"


def _scaling(params: dict[str, Any], hf: dict[str, Any], per_layer: bool = False) -> Optional[dict]:
    """The rope scaling dict of one rope_parameters/rope_scaling entry; unsupported types and missing keys are
    refused naming the key. A missing ``original_max_position_embeddings`` is filled as transformers does: the
    top-level key of config.json when present (it wins over the nested one, as for Phi-3), else
    ``max_position_embeddings``."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_REQUIRED_KEYS:
        raise ValueError(f"config.json: rope_scaling rope_type {kind!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_REQUIRED_KEYS)})")
    missing = [key for key in ROPE_REQUIRED_KEYS[kind] if key not in params]
    if missing:
        raise ValueError(f"config.json: rope_scaling of rope_type {kind!r} has no {missing[0]!r} (it needs "
                         f"{', '.join(ROPE_REQUIRED_KEYS[kind])})")
    # proportional RoPE (Gemma 4) keeps its partial_rotary_factor: it says which of the frequencies are not zero
    dropped = ("rope_theta", "type") if kind == "proportional" else ("rope_theta", "type", "partial_rotary_factor")
    scaling = {k: v for k, v in params.items() if k not in dropped}
    scaling["rope_type"] = kind
    if kind in ("llama3", "longrope", "yarn"):
        top_level = None if per_layer else hf.get(_ORIGINAL_MAX)
        if top_level is not None:
            scaling[_ORIGINAL_MAX] = top_level
        elif scaling.get(_ORIGINAL_MAX) is None:
            scaling[_ORIGINAL_MAX] = hf.get("max_position_embeddings")
        if not isinstance(scaling[_ORIGINAL_MAX], int) or scaling[_ORIGINAL_MAX] <= 0:
            raise ValueError(f"config.json: rope_scaling of rope_type {kind!r} needs {_ORIGINAL_MAX!r} (or "
                             "'max_position_embeddings') as a positive integer, got "
                             f"{scaling[_ORIGINAL_MAX]!r}")
    return scaling


def unstack_transposed(tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
    """A stacked-experts tensor of (E, in, out) weights (``x @ w``) or (E, out) biases → expert 0's, expert 1's, ...
    with weights as (out, in) Linear weights (a :class:`WeightRule` ``unstack``)."""
    return [x.T if x.dim() == 2 else x for x in tensor.unbind(0)]


def stack_transposed(parts: list[torch.Tensor], config: Config) -> torch.Tensor:
    """The inverse of :func:`unstack_transposed`."""
    return torch.stack([p.T if p.dim() == 2 else p for p in parts])


def unstack_experts(tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
    """Stacked (E, out, in) Linear weights → expert 0's, expert 1's, ... (a :class:`WeightRule` ``unstack``)."""
    return list(tensor.unbind(0))


def stack_experts(parts: list[torch.Tensor], config: Config) -> torch.Tensor:
    """The inverse of :func:`unstack_experts`."""
    return torch.stack(parts)


def unstack_gate_up_rows(tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
    """Stacked (E, 2I, C) experts whose first I rows are the gate's and last I the up projection's (Linear weights) →
    gate, up of expert 0, of expert 1, ... (a :class:`WeightRule` ``unstack``)."""
    return [part for w in tensor.unbind(0) for part in w.chunk(2, dim=0)]


def stack_gate_up_rows(parts: list[torch.Tensor], config: Config) -> torch.Tensor:
    """The inverse of :func:`unstack_gate_up_rows`."""
    return torch.stack([torch.cat((gate, up), dim=0) for gate, up in zip(parts[0::2], parts[1::2])])


def llama_rules(attention_bias: bool = False) -> list[WeightRule]:
    """The Llama layout that most families share."""
    layer = "model.layers.{i}."
    rules = [
        WeightRule("embed.weight", "model.embed_tokens.weight"),
        WeightRule("norm.weight", "model.norm.weight"),
        WeightRule("lm_head.weight", "lm_head.weight"),
        WeightRule("blocks.{i}.attn_norm.weight", layer + "input_layernorm.weight"),
        WeightRule("blocks.{i}.mlp_norm.weight", layer + "post_attention_layernorm.weight"),
    ]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(WeightRule(f"blocks.{{i}}.attn.{p}.weight", layer + f"self_attn.{p}.weight"))
        rules.append(WeightRule(f"blocks.{{i}}.attn.{p}.bias", layer + f"self_attn.{p}.bias"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(WeightRule(f"blocks.{{i}}.mlp.{p}.weight", layer + f"mlp.{p}.weight"))
        rules.append(WeightRule(f"blocks.{{i}}.mlp.{p}.bias", layer + f"mlp.{p}.bias"))
    for p in ("q_norm", "k_norm"):
        rules.append(WeightRule(f"blocks.{{i}}.attn.{p}.weight", layer + f"self_attn.{p}.weight"))
    return rules
