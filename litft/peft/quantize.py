"""bitsandbytes quantization of a model's frozen linear layers (QLoRA bases and low-memory inference).

``quantize_model`` swaps ``nn.Linear`` modules for ``bitsandbytes`` ``Linear4bit`` / ``Linear8bitLt`` holding the
quantized weights (quantized right away, on the weights' own device; CPU works with bitsandbytes 0.50);
``dequantize_weight`` / ``dequantize_model`` go back to plain float weights (for merging and export).
bitsandbytes is imported only inside these functions.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8")
# mode -> (4-bit quant_type or None for int8, double quantization of the 4-bit block statistics)
_MODES: dict[str, tuple[Optional[str], bool]] = {
    "bnb.nf4": ("nf4", False),
    "bnb.nf4-dq": ("nf4", True),
    "bnb.fp4": ("fp4", False),
    "bnb.int8": (None, False),
}
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default
BLOCKSIZE = 64  # 4-bit quantization block size, bitsandbytes' and transformers' default
_BNB_LINEARS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear layer (checked without importing bitsandbytes)."""
    return type(module).__name__ in _BNB_LINEARS and type(module).__module__.startswith("bitsandbytes")


def import_bitsandbytes(mode: str) -> Any:
    """bitsandbytes, or a clear error saying what is missing for ``--quantize {mode}``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize: unknown mode {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}")
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a broken install raising something else at import time
        raise RuntimeError(
            f"quantize={mode} needs the bitsandbytes package, which cannot be imported ({type(e).__name__}: {e}). "
            "Install it with `pip install bitsandbytes`, or run without quantization."
        ) from e
    return bitsandbytes


def quantize_model(
    model: nn.Module,
    mode: str,
    compute_dtype: Optional[torch.dtype] = None,
    skip: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """Quantize, in place, every plain ``nn.Linear`` of ``model`` (the base layer inside a LoRA wrapper
    included, LoRA's own A/B never) whose name is not matched by ``skip``.

    mode: one of :data:`QUANTIZE_MODES` (``bnb.nf4-dq`` = nf4 with double-quantized statistics).
    compute_dtype: dtype of the 4-bit matmuls; default the weights' own dtype.
    skip: module names (``lm_head``) or name parts (``router``, ``blocks.0.attn.q_proj``) left in full precision.
    The quantized weights are frozen. Raises RuntimeError when bitsandbytes is missing or does not support
    the weights' device for this mode.
    """
    bnb = import_bitsandbytes(mode)
    skip = tuple(skip)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        parts = name.split(".")
        if parts[-1] in ("lora_A", "lora_B"):
            continue
        logical = ".".join(p for p in parts if p != "base_layer")  # a LoRA-wrapped layer keeps its own name
        if any(_name_matches(logical, s) for s in skip):
            continue
        if module.weight.device.type == "meta":
            raise ValueError(f"quantize: {logical} has no weights yet (meta device); load the checkpoint first")
        tied = getattr(getattr(model, "embed", None), "weight", None)
        if tied is not None and module.weight is tied:
            raise ValueError(f"quantize: {logical} shares its weight with the embedding (tied embeddings) and "
                             f"cannot be quantized; keep {parts[-1]!r} in skip")
        targets.append((name, module))
    if not targets:
        raise ValueError(f"quantize={mode}: the model has no unquantized nn.Linear outside skip={list(skip)}")
    checked: set[tuple[torch.device, torch.dtype]] = set()
    for name, module in targets:
        key = (module.weight.device, compute_dtype or module.weight.dtype)
        if key not in checked:
            _probe(bnb, mode, *key)
            checked.add(key)
        set_submodule(model, name, _quantized_linear(bnb, mode, module, compute_dtype))
    return model


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or f".{pattern}." in f".{name}."


def _quantized_linear(bnb: Any, mode: str, linear: nn.Linear, compute_dtype: Optional[torch.dtype]) -> nn.Module:
    quant_type, double = _MODES[mode]
    w = linear.weight.detach()
    dtype = w.dtype
    has_bias = linear.bias is not None
    with torch.no_grad():
        if quant_type is None:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype or dtype, compress_statistics=double,
                                  quant_type=quant_type, quant_storage=torch.uint8, device="meta")
            w4, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double,
                                                     quant_type=quant_type, quant_storage=torch.uint8)
            q.weight = bnb.nn.Params4bit(w4, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                         compress_statistics=double, quant_type=quant_type,
                                         quant_storage=torch.uint8, module=q, bnb_quantized=True)
            q.quant_state = state
            # bitsandbytes repacks CPU weights for a bf16 kernel on the first no-grad eval forward (lossy: bf16
            # block scales), which would make eval logits differ from training ones; keep one numeric path
            q.support_avx512bf16_for_cpu = False
        if has_bias:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        else:
            q.bias = None
    q.litft_dtype = dtype  # the float dtype the layer had, restored by dequantization
    q.train(linear.training)
    return q


def _probe(bnb: Any, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize and run a tiny layer on ``device``: turns bitsandbytes' device errors into one clear message."""
    try:
        lin = nn.Linear(64, 64, device=device, dtype=dtype)
        q = _quantized_linear(bnb, mode, lin, dtype)
        with torch.no_grad():
            q(torch.randn(2, 64, device=device, dtype=dtype))
    except Exception as e:
        raise RuntimeError(
            f"quantize={mode}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run it on device "
            f"{device} with dtype {dtype} ({type(e).__name__}: {e}). Use a CUDA GPU (or CPU with a recent "
            "bitsandbytes; 0.50 works), float32/bfloat16/float16 weights, another quantize mode, or no quantization."
        ) from e


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out_features, in_features) of a linear layer, dequantized when it is a bitsandbytes one.

    A LoRA wrapper gives its base layer's weight. Plain layers return their weight itself.
    """
    base = getattr(module, "base_layer", None)
    if base is not None:
        return dequantize_weight(base)
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU repacking (as its own save does)
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            weight.quant_state = module.quant_state = state
        out = bnb.functional.dequantize_4bit(weight.data, state)
        return out.to(getattr(module, "litft_dtype", out.dtype))
    if kind == "Int8Params":
        import bitsandbytes as bnb

        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        out = bnb.functional.int8_vectorwise_dequant(weight.data, scb)
        return out.to(getattr(module, "litft_dtype", torch.float32))
    return weight


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every bitsandbytes linear layer by an ``nn.Linear`` with the dequantized weight."""
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            set_submodule(model, name, dequantized_linear(module))
    return model


def dequantized_linear(module: nn.Module, weight: Optional[torch.Tensor] = None) -> nn.Linear:
    """A frozen ``nn.Linear`` with ``weight`` (default: the module's dequantized weight) and the module's bias."""
    weight = dequantize_weight(module) if weight is None else weight
    bias = module.bias
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    linear.train(module.training)
    return linear


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
