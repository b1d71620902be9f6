"""The anchors litft is measured against, built exactly as ../shared/bench/anchor_gpu.py builds them (the script that
measured the figures issue 9 quotes): HF transformers + PEFT, and LitGPT 0.5.13.

Same shape for every library (Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, head 64, MLP 8192,
vocab 128256, rope_theta 500000 with llama3 scaling, tied embeddings; ``TINY`` for --quick), random weights, LoRA
r=16 alpha=32 dropout 0. HF's loss is ``model(x, labels=x).loss`` (full fp32 logits); LitGPT's is its finetune
recipe (``lm_head_chunk_size=128`` + ``chunked_cross_entropy``); LitGPT's head is tied to ``wte``.

LitGPT is a bench-only dependency, never one of litft's: install it into a folder of its own
(``bash bench/fetch_wheels.sh`` downloads the wheels; ``bench/gpu_all.sh`` and the ``--quick`` commands in
bench/RESULTS.md show the ``pip install --no-deps --target`` + ``PYTHONPATH`` recipe). :func:`require` fails with
that recipe when an anchor is not importable; every bench script has ``--skip`` to leave an anchor out.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

LLAMA_32_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, inter=8192, vocab=128256,
                   rope_theta=500000.0, rms_eps=1e-5, max_pos=131072)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=512, rope_theta=500000.0,
            rms_eps=1e-5, max_pos=131072)
ROPE_LLAMA3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
LORA_R, LORA_ALPHA = 16, 32
HF_TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LITFT_TARGETS = {"qkvo": ["q", "k", "v", "o"], "all": ["all-linear"]}

INSTALL_HINT = ("LitGPT is a bench-only dependency: run `bash bench/fetch_wheels.sh`, then `python -m pip install "
                "--no-deps --target .bench-anchor/site .bench-anchor/whl/litgpt-*.whl "
                ".bench-anchor/whl/jsonargparse-*.whl` and prefix the command with "
                "`PYTHONPATH=.bench-anchor/site:$PYTHONPATH`")


def require(name: str, skip_flag: str = "--skip") -> None:
    """Import an anchor ("hf" or "litgpt") or fail with what to do (``skip_flag``: how the script leaves it out)."""
    try:
        if name == "hf":
            import peft  # noqa: F401
            import transformers  # noqa: F401
        elif name == "litgpt":
            import litgpt.lora  # noqa: F401
            import litgpt.model  # noqa: F401
            import litgpt.utils  # noqa: F401
        else:
            raise ValueError(f"unknown anchor {name!r}: expected hf or litgpt")
    except ImportError as e:
        hint = INSTALL_HINT if name == "litgpt" else "pip install transformers peft"
        skip = f"{skip_flag} {name}" if skip_flag == "--skip" else skip_flag
        raise SystemExit(f"anchor {name!r} is not importable ({e}). {hint}; or leave it out: {skip}") from None


def version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version as v

        return v(name)
    except Exception:
        try:
            return __import__(name).__version__
        except Exception:
            return None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------ HF + PEFT


def build_hf(shape: dict, device: torch.device, dtype: torch.dtype, grad_ckpt: bool = False) -> nn.Module:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = dict(rope_parameters=dict(rope_theta=shape["rope_theta"], **ROPE_LLAMA3))
    else:
        rope = dict(rope_theta=shape["rope_theta"], rope_scaling=dict(ROPE_LLAMA3))
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], hidden_act="silu", max_position_embeddings=shape["max_pos"],
        rms_norm_eps=shape["rms_eps"], tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
        use_cache=False, **rope,
    )
    with torch.device(device), default_dtype(dtype):  # as from_pretrained(dtype=...): fp32 buffers stay fp32
        model = LlamaForCausalLM(config)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def hf_lora(model: nn.Module, variant: str, dtype: torch.dtype) -> nn.Module:
    """PEFT LoRA with the adapters in the model's dtype (as the anchor's A1-A4 rows)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                        target_modules=HF_TARGETS[variant], task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 labels=batch["hf_labels"], use_cache=False).loss


# ------------------------------------------------------------------------------------------------ LitGPT


def lit_config(shape: dict, variant: Optional[str], block_size: Optional[int] = None) -> Any:
    import litgpt.config
    import litgpt.lora

    kw: dict[str, Any] = {}
    if shape is not LLAMA_32_1B:
        kw = dict(n_layer=shape["layers"], n_embd=shape["hidden"], n_head=shape["heads"],
                  n_query_groups=shape["kv_heads"], head_size=shape["head_dim"], intermediate_size=shape["inter"],
                  vocab_size=shape["vocab"], padded_vocab_size=shape["vocab"])
    if block_size is not None:
        kw["block_size"] = block_size
    if variant is None:
        return litgpt.config.Config.from_name("Llama-3.2-1B", **kw)
    return litgpt.lora.Config.from_name("Llama-3.2-1B", lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                        lora_query=True, lora_key=True, lora_value=True, lora_projection=True,
                                        lora_mlp=variant == "all", lora_head=False, **kw)


def build_lit(shape: dict, device: torch.device, dtype: torch.dtype, variant: Optional[str] = None,
              grad_ckpt: bool = False, max_seq_length: Optional[int] = None, block_size: Optional[int] = None,
              ) -> nn.Module:
    import litgpt.lora
    import litgpt.model

    config = lit_config(shape, variant, block_size)
    cls = litgpt.model.GPT if variant is None else litgpt.lora.GPT
    with torch.device(device), default_dtype(dtype):  # what Fabric(bf16-true).init_module() amounts to
        model = cls(config)
    model.to(device=device, dtype=dtype)
    head = model.lm_head.linear if hasattr(model.lm_head, "linear") else model.lm_head
    head.weight = model.transformer.wte.weight  # tied, like the HF and litft models
    model.apply(model._init_weights)
    if variant is not None:
        litgpt.lora.mark_only_lora_as_trainable(model)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length  # as litgpt's finetune fit() does (rebuilds the RoPE cache)
    if grad_ckpt:  # litgpt's multi-device LoRA path (finetune/lora.py::parallelize_fn)
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.transformer.h = nn.ModuleList(checkpoint_wrapper(b, preserve_rng_state=False)
                                            for b in model.transformer.h)
    return model


def lit_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """litgpt/finetune/lora.py::fit: chunked head + chunked cross-entropy, no attention mask."""
    from litgpt.utils import chunked_cross_entropy

    logits = model(batch["input_ids"], lm_head_chunk_size=128)
    logits[-1] = logits[-1][..., :-1, :]
    return chunked_cross_entropy(logits, batch["hf_labels"][..., 1:])


# ------------------------------------------------------------------------------------------------ data


def fixed_batch(shape: dict, mb: int, seq: int, device: torch.device, seed: int = 0) -> dict:
    """mb x seq random tokens, every next token a target (the anchors' A-C workload)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, shape["vocab"], (mb, seq), generator=g)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100  # litft's labels are pre-shifted; HF and LitGPT shift x themselves
    return {"input_ids": x.to(device), "labels": labels.to(device), "hf_labels": x.to(device),
            "real": mb * seq, "padded": mb * seq}


VARLEN_SAMPLES, VARLEN_MB = 256, 8
VARLEN_MEDIAN, VARLEN_SIGMA, VARLEN_MIN, VARLEN_MAX = 180.0, 0.8, 24, 1024


def varlen_lengths(quick: bool) -> list[int]:
    """256 alpaca-like lengths: log-normal, median ~180 tokens, clipped to [24, 1024] (/8 under --quick), seed 1234:
    the anchors' section E."""
    scale = 8 if quick else 1
    rng = random.Random(1234)
    lo, hi = max(2, VARLEN_MIN // scale), VARLEN_MAX // scale
    return [int(min(hi, max(lo, round(math.exp(rng.gauss(math.log(VARLEN_MEDIAN / scale), VARLEN_SIGMA))))))
            for _ in range(VARLEN_SAMPLES)]


def varlen_tokens(lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def padded_batches(samples: list[list[int]], mb: int, n_steps: int, device: torch.device) -> list[dict]:
    """Step i takes samples [i*mb, (i+1)*mb) (wrapping), right-padded to the longest of them; labels -100 on pads
    (HF: with an attention mask; LitGPT: without, as its finetune does)."""
    out = []
    for i in range(n_steps):
        rows = [samples[(i * mb + j) % len(samples)] for j in range(mb)]
        T = max(len(r) for r in rows)
        ids = torch.zeros(mb, T, dtype=torch.long)
        mask = torch.zeros(mb, T, dtype=torch.long)
        hf_labels = torch.full((mb, T), -100, dtype=torch.long)
        for r, toks in enumerate(rows):
            ids[r, :len(toks)] = torch.tensor(toks)
            mask[r, :len(toks)] = 1
            hf_labels[r, :len(toks)] = torch.tensor(toks)
        labels = torch.roll(hf_labels, -1, dims=1)
        labels[:, -1] = -100
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "hf_labels": hf_labels.to(device),
                    "labels": labels.to(device), "real": sum(len(r) for r in rows), "padded": mb * T})
    return out
