"""LoRA, DoRA and rsLoRA as wrappers injected into the one :class:`~litft.model.GPT`, computed exactly as PEFT does.

``apply_lora`` wraps the targeted linear layers (plain or bitsandbytes-quantized) in :class:`LoRALinear` and
freezes everything else. For a base layer ``W`` (bias ``b``), input ``x`` and ``x' = dropout(x)``:

- LoRA:   ``y = W x + b + s · B A x'`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)
- DoRA:   ``y = W x + b + (m / n - 1) · W x' + (m / n) · s · B A x'`` where ``n = ||W + s·B A||`` per output row,
  detached from the graph, and the magnitude ``m`` is initialised to ``||W||`` (so ``x' = x`` gives
  ``y = m / n · (W + s·B A) x + b``).

A is initialised kaiming-uniform(a=√5) and B zero, as in PEFT. Native tensor names
(``blocks.0.attn.q_proj.lora_A.weight``, ``…lora_B.weight``, ``…lora_magnitude_vector``) map one-to-one to PEFT's
(:func:`lora_name_to_peft`) through the family's weight table in :mod:`litft.zoo`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from litft.peft.quantize import dequantize_model, dequantize_weight, dequantized_linear, set_submodule
from litft.weights import load_state_strict, read_args_yaml, read_method_weights, write_method_files

LORA_WEIGHTS_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora.yaml"
# target short name -> module attribute name (the same as Hugging Face's)
TARGETS: dict[str, str] = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "lm_head": "lm_head",
    # multi-head latent attention (DeepSeek-V3): the low-rank query's and the key/value latent's projections
    "q_a": "q_a_proj", "q_b": "q_b_proj", "kv_a": "kv_a_proj", "kv_b": "kv_b_proj",
    # Gated DeltaNet linear attention (Qwen3.5): the q/k/v, output-gate, beta and decay input projections, the output
    "in_qkv": "in_proj_qkv", "in_z": "in_proj_z", "in_b": "in_proj_b", "in_a": "in_proj_a", "out": "out_proj",
}
ALL_LINEAR = "all-linear"
# not wrapped by all-linear: the MoE router (a routing score, not a projection; no nn.Linear in HF either)
ALL_LINEAR_EXCLUDED = ("router",)
_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAArgs:
    """LoRA hyper-parameters.

    Args:
        r: rank of the update B·A.
        alpha: scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout probability on the LoRA branch's input.
        targets: projections to adapt: any of q, k, v, o, gate, up, down, lm_head (q_a, q_b, kv_a, kv_b: the
            latent attention's projections, DeepSeek-V3; in_qkv, in_z, in_b, in_a, out: the linear attention's,
            Qwen3.5); or all-linear (every linear layer of the blocks, not
            lm_head, as PEFT's all-linear), optionally with lm_head.
        use_dora: weight-decomposed LoRA (DoRA): also train a per-output-row magnitude.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = list(self.targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError(f"lora targets is empty; expected some of {', '.join(TARGETS)} or {ALL_LINEAR}")
        bad = [t for t in self.targets if t not in TARGETS and t != ALL_LINEAR]
        if bad:
            raise ValueError(f"lora targets: unknown {', '.join(map(repr, bad))}; expected any of "
                             f"{', '.join(TARGETS)}, or {ALL_LINEAR}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# ---------------------------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A linear layer (``nn.Linear`` or a bitsandbytes one, kept as ``base_layer``) plus a low-rank update.

    Loading a state dict with the plain base names (``q_proj.weight``) into a wrapped model works: they are
    read as ``q_proj.base_layer.weight``. ``disabled`` (set by the LoRA entry's ``reference_off`` in
    :mod:`litft.methods`) makes it compute the base layer alone.
    """

    disabled = False

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_dora: bool = False,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.use_dora, self.use_rslora = r, alpha, use_dora, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        in_f, out_f = base_layer.in_features, base_layer.out_features
        device, dtype = base_layer.weight.device, _float_dtype(base_layer)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_f, device=device, dtype=dtype))
        else:
            self.lora_magnitude_vector = None
        if device.type != "meta":
            self.reset_parameters()
        self.register_load_state_dict_pre_hook(_plain_base_names)

    # the wrapper stands in for the linear layer it wraps (e.g. ``GPT.tie_weights`` sets ``lm_head.weight``)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias"):
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    def reset_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=√5), B zero, DoRA magnitude = row norms of the base weight."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_magnitude_vector is not None:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm(dequantize_weight(self.base_layer)))

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` (out_features, in_features)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's per-output-row norm of ``W + s·B A``, with the LoRA product detached (as PEFT computes it)."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().to(weight.dtype)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is None:
            # the scale multiplies the rank-r activations, not the (tokens x out_features) product: one full-size
            # elementwise pass (and temporary) less per layer; A and B are applied with F.linear on their weights
            # (no module call per factor) and dropout only when there is one
            if not isinstance(self.lora_dropout, nn.Identity):
                x = self.lora_dropout(x)
            result = result + F.linear(F.linear(x, self.lora_A.weight) * self.scaling, self.lora_B.weight)
            return result.to(out_dtype)
        # DoRA, as PEFT's DoraLinearLayer: the base output is reused unless dropout is active
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result
        else:
            x = self.lora_dropout(x)
            base_result = None
        weight = dequantize_weight(self.base_layer).to(x.dtype)
        norm = self.weight_norm(weight).detach()
        mag_norm_scale = (self.lora_magnitude_vector / norm).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is None:
            base_result = F.linear(x, weight)
        elif self.base_layer.bias is not None:
            base_result = base_result - self.base_layer.bias
        result = result + (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling
        return result.to(out_dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in (dequantized first), in the layer's float dtype."""
        weight = dequantize_weight(self.base_layer)
        dtype = _float_dtype(self.base_layer)
        w = weight.float()
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        merged = w + delta
        if self.lora_magnitude_vector is not None:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.lora_magnitude_vector.float() / norm).view(-1, 1) * merged
        return merged.to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}"


def _float_dtype(module: nn.Module) -> torch.dtype:
    w = module.weight
    if w.is_floating_point():
        return w.dtype
    return getattr(module, "litft_dtype", None) or getattr(module, "compute_dtype", None) or torch.float32


def _plain_base_names(module: LoRALinear, state_dict: dict, prefix: str, *args: Any) -> None:
    """Read ``<prefix>weight`` (a plain checkpoint) as ``<prefix>base_layer.weight``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".")[0] in ("weight", "bias") and f"{prefix}base_layer.{rest}" not in state_dict:
            state_dict[f"{prefix}base_layer.{rest}"] = state_dict.pop(key)


# ---------------------------------------------------------------------------------------------- applying


def count_parameters(model: nn.Module, trainable: Optional[bool] = None) -> int:
    """Number of parameters (shared ones once); ``trainable=True/False`` counts only those that do / do not train."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable is not None and p.requires_grad != trainable):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def check_trainable(model: nn.Module, method: str) -> int:
    """The number of trainable parameters; a clear error when there are none."""
    n = count_parameters(model, trainable=True)
    if n == 0:
        raise ValueError(f"{method}: the model has 0 trainable parameters, so training would change nothing; "
                         "check the method's settings (targets, start layer) against the model's size")
    return n


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear modules the target list selects."""
    leaves = {TARGETS[t] for t in targets if t != ALL_LINEAR}
    all_linear = ALL_LINEAR in targets
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):  # bitsandbytes' layers are nn.Linear subclasses
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_blocks = name.startswith("blocks.")
        if leaf in leaves and (in_blocks or name == "lm_head"):
            names.append(name)
        elif all_linear and in_blocks and leaf not in ALL_LINEAR_EXCLUDED:
            names.append(name)
    return names


def apply_lora(model: nn.Module, args: LoRAArgs) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`LoRALinear`, in place, and freeze everything else.

    Call it after the base weights are loaded (and after :func:`~litft.peft.quantize.quantize_model` for QLoRA).
    """
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    names = _lora_targets(model, args.targets)
    if not names:
        raise ValueError(f"apply_lora: targets {args.targets} match no linear layer of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        set_submodule(model, name, LoRALinear(base, args.r, args.alpha, args.dropout, args.use_dora,
                                               args.use_rslora))
    check_trainable(model, "LoRA")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA/DoRA update into its base weight (dequantizing a bitsandbytes base first) and unwrap it to
    a plain ``nn.Linear``; any other quantized layer is dequantized too. The result is a plain GPT.

    A tied ``lm_head`` that carried LoRA gets its own merged weight, and ``config.tie_embeddings`` becomes False.
    """
    for name, module in list(lora_modules(model).items()):
        with torch.no_grad():
            merged = dequantized_linear(module.base_layer, module.merged_weight())
        base = module.base_layer
        embed = getattr(getattr(model, "embed", None), "weight", None)
        if embed is not None and base.weight is embed and getattr(model, "config", None) is not None:
            model.config.tie_embeddings = False  # the head now differs from the embedding
        set_submodule(model, name, merged)
    return dequantize_model(model)


# ---------------------------------------------------------------------------------------------- state dicts


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (A, B and DoRA magnitudes), by native name, detached."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
        if module.lora_magnitude_vector is not None:
            state[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
    return state


def _lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {}
    for name, module in lora_modules(model).items():
        params[f"{name}.lora_A.weight"] = module.lora_A.weight
        params[f"{name}.lora_B.weight"] = module.lora_B.weight
        if module.lora_magnitude_vector is not None:
            params[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector
    return params


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA state dict") -> None:
    """Load LoRA tensors (native names) into a model that :func:`apply_lora` prepared; strict on names and shapes."""
    params = _lora_parameters(model)
    if not params:
        raise ValueError(f"{source}: the model has no LoRA layers; call apply_lora(model, args) first")
    load_state_strict(params, state, "LoRA", source)


def save_lora(model: nn.Module, args: LoRAArgs, out_dir: Union[str, Path]) -> Path:
    """Write ``lora.safetensors`` (the LoRA tensors) and ``lora.yaml`` (the LoRAArgs) into ``out_dir``."""
    out_dir = Path(out_dir)
    state = lora_state_dict(model)
    if not state:
        raise ValueError("save_lora: the model has no LoRA layers")
    return write_method_files(out_dir, state, LORA_WEIGHTS_FILE, LORA_CONFIG_FILE, args, "lora")


def read_lora_args(directory: Union[str, Path]) -> LoRAArgs:
    return read_args_yaml(Path(directory) / LORA_CONFIG_FILE, LoRAArgs)


def load_lora(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Apply the LoRA saved in ``directory`` (by :func:`save_lora`) to ``model``, or load it into a model that
    already has the same LoRA layers (resume)."""
    directory = Path(directory)
    args = read_lora_args(directory)
    weights, state = read_method_weights(directory, LORA_WEIGHTS_FILE, LORA_CONFIG_FILE)
    if not lora_modules(model):
        apply_lora(model, args)
    load_lora_state_dict(model, state, source=str(weights))
    return model


# ---------------------------------------------------------------------------------------------- PEFT names


def _family(family: Any) -> Any:
    if isinstance(family, str):
        from litft.zoo import family_for

        return family_for(family)
    return family


_NATIVE_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_PEFT_LORA = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?P<weight>\.weight)?$"
)


def lora_name_to_peft(name: str, family: Any) -> str:
    """PEFT's saved-adapter name of a native LoRA tensor name, through the family's weight table.

    ``blocks.0.attn.q_proj.lora_A.weight`` → ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
    family: a :class:`litft.zoo.Family` or its HF ``model_type``.
    """
    fam = _family(family)
    m = _NATIVE_LORA.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a LoRA tensor name (expected <module>.{{{', '.join(_LORA_SUFFIXES)}}})")
    match = fam.native_to_hf(f"{m['module']}.weight")
    if match is None:
        raise ValueError(f"{name!r}: {m['module']} has no {fam.architecture} counterpart")
    rule, _, hf_key = match
    if "{e}" in rule.hf or rule.unstack is not None:  # per-expert checkpoint names or stacked experts
        raise ValueError(f"{name!r}: mixture-of-experts weights are 3-D parameters in transformers, which PEFT's "
                         "LoRA does not target by module name. Merge the adapter instead (convert to_hf)")
    if len(rule.natives) > 1:
        fused = ", ".join(n.replace("{i}", "*") for n in rule.natives)
        leaf = m["module"].rsplit(".", 1)[-1]
        raise ValueError(f"{name!r}: {fam.architecture} fuses {fused} into one tensor ({rule.hf.replace('{i}', '*')}); "
                         f"a LoRA on {leaf} alone has no PEFT module. Merge the adapter instead (convert to_hf)")
    return f"{PEFT_PREFIX}{hf_key.removesuffix('.weight')}.{m['kind']}"


def peft_name_to_lora(name: str, family: Any) -> str:
    """The native LoRA tensor name of a PEFT adapter tensor name (inverse of :func:`lora_name_to_peft`)."""
    fam = _family(family)
    m = _PEFT_LORA.match(name)
    if m is None or not name.startswith(PEFT_PREFIX):
        raise ValueError(f"{name!r} is not a PEFT LoRA tensor name (expected {PEFT_PREFIX}<module>.lora_A.weight, "
                         "lora_B.weight or lora_magnitude_vector)")
    hf_module = m["module"][len(PEFT_PREFIX):]
    match = fam.hf_to_native(f"{hf_module}.weight")
    if match is None:
        raise ValueError(f"{name!r}: {hf_module} is not a linear layer of a {fam.architecture}")
    rule, natives = match
    if len(natives) != 1:
        raise ValueError(f"{name!r}: {hf_module} is a fused {fam.architecture} tensor split into "
                         f"{', '.join(natives)} in litft; import of a LoRA on it is not supported")
    kind = "lora_magnitude_vector" if m["kind"] == "lora_magnitude_vector" else f"{m['kind']}.weight"
    return f"{natives[0].removesuffix('.weight')}.{kind}"


def to_peft_state_dict(state: dict[str, torch.Tensor], family: Any) -> dict[str, torch.Tensor]:
    """A native LoRA state dict with PEFT's names (what ``adapter_model.safetensors`` holds)."""
    return {lora_name_to_peft(k, family): v for k, v in state.items()}


def from_peft_state_dict(state: dict[str, torch.Tensor], family: Any) -> dict[str, torch.Tensor]:
    """A PEFT adapter state dict with native names."""
    return {peft_name_to_lora(k, family): v for k, v in state.items()}


def peft_target_modules(state: Iterable[str], family: Any) -> list[str]:
    """PEFT ``target_modules`` (module leaf names, e.g. ``q_proj``) covering the native LoRA tensor names."""
    leaves = set()
    for k in state:
        peft_name = lora_name_to_peft(k, family)
        module = _PEFT_LORA.match(peft_name)["module"]
        leaves.add(module.rsplit(".", 1)[-1])
    return sorted(leaves)


def peft_config_dict(args: LoRAArgs, target_modules: list[str], base_model_name_or_path: str = "") -> dict[str, Any]:
    """The ``adapter_config.json`` fields that make PEFT compute exactly what :class:`LoRALinear` does."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": args.r, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": list(target_modules),
        "use_dora": args.use_dora, "use_rslora": args.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def lora_args_from_peft_config(config: dict[str, Any], names: Iterable[str], source: str = "adapter_config.json",
                               ) -> LoRAArgs:
    """LoRAArgs equivalent to a PEFT ``adapter_config.json`` whose (native) tensor names are ``names``.

    Raises ValueError for PEFT features litft does not compute (per-module ranks/alphas, trained biases, ...).
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {
        "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
        "modules_to_save": config.get("modules_to_save") or None,
        "bias": None if config.get("bias", "none") == "none" else config.get("bias"),
        "fan_in_fan_out": config.get("fan_in_fan_out") or None, "lora_bias": config.get("lora_bias") or None,
        "use_qalora": config.get("use_qalora") or None,
    }
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        raise ValueError(f"{source}: unsupported PEFT setting(s) {bad}; litft LoRA uses one r/alpha for all modules, "
                         "no trained biases and no extra saved modules")
    leaf_to_target = {v: k for k, v in TARGETS.items()}
    targets = []
    for n in names:
        m = _NATIVE_LORA.match(n)
        leaf = m["module"].rsplit(".", 1)[-1] if m else n
        if leaf not in leaf_to_target:
            raise ValueError(f"{source}: LoRA on {n!r} is not a litft target ({', '.join(TARGETS)})")
        if leaf_to_target[leaf] not in targets:
            targets.append(leaf_to_target[leaf])
    order = list(TARGETS)
    return LoRAArgs(r=int(config["r"]), alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
                    targets=sorted(targets, key=order.index), use_dora=bool(config.get("use_dora", False)),
                    use_rslora=bool(config.get("use_rslora", False)))
