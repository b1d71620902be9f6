"""Decode speed of litft's generation engine beside HF transformers and LitGPT 0.5.13, in the same run.

Workload (issue 4): Llama-3.2-1B shape, random weights, bf16, prompt 128 + 256 new tokens, greedy, at batch 1
(eager and ``compile=True``) and batch 16. ``--quick`` runs a tiny shape in fp32 on the CPU. The anchors are
measured as ../shared/bench/anchor_gpu.py measured them: HF ``model.generate`` (DynamicCache, eager); LitGPT
``litgpt.generate.base.generate`` at batch 1 (eager, and with ``next_token`` compiled, mode "default": its own
"reduce-overhead" crashed on torch 2.11) and ``batched_generate_fn`` at batch 16. LitGPT is a bench-only
dependency (see bench/anchors.py for the install recipe); ``--skip_litgpt`` / ``--skip_hf`` leave one out.

    python bench/generate_speed.py --quick                 # CPU, tiny model, a minute
    python bench/generate_speed.py --device cuda           # GPU, Llama-3.2-1B shape (needs ~6 GB)

Prints one table row per measurement and appends nothing by itself: copy the table into bench/RESULTS.md
with the device and date it prints.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from bench import anchors`

from litft.config import Config
from litft.generate.engine import Engine
from litft.generate.sampling import SamplingParams
from litft.model import GPT


def _config(quick: bool) -> Config:
    if quick:
        return Config(name="tiny", n_layer=4, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=768,
                      vocab_size=4096, block_size=512, rope_theta=500000.0, tie_embeddings=True)
    return Config.from_name("Llama-3.2-1B", block_size=2048)


def _time(fn: Callable[[int], int], new: int, device: torch.device, repeats: int, compiled: bool) -> float:
    """Best tokens/s of ``fn(new)`` over ``repeats`` runs, after one warm-up: a full-length one when compiled (every
    shape compiles before the timing), else 16 new tokens (as the anchors warmed up)."""
    fn(new if compiled else min(16, new))
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn(new)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def bench_litft(config: Config, state: dict, device: torch.device, dtype: torch.dtype, batch: int, prompt: int,
                new: int, compile: bool, repeats: int) -> float:
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    model.init_buffers(device)
    engine = Engine(model, tokenizer=None, max_seq_length=prompt + new, compile=compile)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    def run(n: int) -> int:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[])
        results = engine.generate(prompts.tolist(), params, max_batch_size=batch)
        return sum(len(r.tokens) for r in results)

    return _time(run, new, device, repeats, compile)


def bench_hf(config: Config, state: dict, device: torch.device, dtype: torch.dtype, batch: int, prompt: int,
             new: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from litft.convert.hf import native_tensors_to_hf
    from litft.zoo import family_for

    hf_config = LlamaConfig(**{k: v for k, v in family_for("llama").config_to_hf(config).items()
                               if k not in ("architectures", "model_type")})
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.load_state_dict(dict(native_tensors_to_hf(None, config, state=state)), strict=False)
    model.tie_weights()
    model.to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def run(new: int) -> int:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        return (out.shape[1] - prompt) * batch

    return _time(run, new, device, repeats, compiled=False)


def bench_litgpt(config: Config, state: dict, device: torch.device, dtype: torch.dtype, batch: int, prompt: int,
                 new: int, compile: bool, repeats: int) -> float:
    """LitGPT with litft's random weights (same logits up to float error: the layouts map one to one)."""
    import litgpt.generate.base as gb

    from bench import anchors as A

    shape = dict(hidden=config.n_embd, layers=config.n_layer, heads=config.n_head, kv_heads=config.n_query_groups,
                 head_dim=config.head_size, inter=config.intermediate_size, vocab=config.vocab_size)
    model = A.build_lit(A.LLAMA_32_1B if config.name == "Llama-3.2-1B" else shape, device, dtype)
    model.load_state_dict(litgpt_state(state, config), strict=False)
    model.max_seq_length = prompt + new
    model.set_kv_cache(batch_size=batch, device=device, dtype=dtype)
    model.eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(device)

    def reset() -> None:
        for block in model.transformer.h:
            block.attn.kv_cache.reset_parameters()

    original = gb.next_token
    if compile:
        gb.next_token = torch.compile(original, mode="default")
    try:
        if batch == 1:
            def run(n: int) -> int:
                reset()
                out = gb.generate(model, prompts[0], prompt + n, temperature=0.0, top_k=None, eos_id=None)
                return out.size(0) - prompt
        else:
            def run(n: int) -> int:
                reset()
                steps = 0
                for _ in gb.batched_generate_fn(model, prompts, prompt + n, sample_args={"temperature": 0.0},
                                                include_prompt=False, include_eos=False):
                    steps += 1
                return steps * batch

        return _time(run, new, device, repeats, compile)
    finally:
        gb.next_token = original


def litgpt_state(state: dict, config: Config) -> dict:
    """litft's Llama tensors under LitGPT's names (q, k, v fused into qkv per block)."""
    out = {"transformer.wte.weight": state["embed.weight"], "transformer.ln_f.weight": state["norm.weight"],
           "lm_head.weight": state.get("lm_head.weight", state["embed.weight"])}
    for i in range(config.n_layer):
        b, lb = f"blocks.{i}.", f"transformer.h.{i}."
        out[lb + "attn.qkv.weight"] = torch.cat([state[b + f"attn.{x}_proj.weight"] for x in "qkv"])
        out[lb + "attn.proj.weight"] = state[b + "attn.o_proj.weight"]
        out[lb + "norm_1.weight"] = state[b + "attn_norm.weight"]
        out[lb + "norm_2.weight"] = state[b + "mlp_norm.weight"]
        out[lb + "mlp.fc_1.weight"] = state[b + "mlp.gate_proj.weight"]
        out[lb + "mlp.fc_2.weight"] = state[b + "mlp.up_proj.weight"]
        out[lb + "mlp.proj.weight"] = state[b + "mlp.down_proj.weight"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--skip_litgpt", action="store_true", help="leave LitGPT out (it is a bench-only install)")
    parser.add_argument("--litgpt_compile", action="store_true",
                        help="also time LitGPT's compiled batch-1 decode (compiling takes ~2 minutes on an H100; "
                             "the anchors measured 190 tok/s there)")
    args = parser.parse_args()
    if not args.skip_litgpt:
        from bench import anchors as A

        A.require("litgpt", skip_flag="--skip_litgpt")
    device = torch.device(args.device)
    dtype = torch.float32 if args.quick or device.type == "cpu" else torch.bfloat16
    prompt, new = (32, 64) if args.quick else (128, 256)
    config = _config(args.quick)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config).to(dtype)
    model.reset_parameters()
    state = {k: v for k, v in model.state_dict().items()}
    del model

    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f" | torch {torch.__version__} | dtype {dtype} | prompt {prompt} + {new} new tokens")
    print("| workload | litft tok/s | HF transformers tok/s | LitGPT tok/s |")
    print("|---|---:|---:|---:|")
    for batch, compile in ((1, False), (1, True), (16, False)):
        ours = bench_litft(config, state, device, dtype, batch, prompt, new, compile, args.repeats)
        hf = lit = None
        if not args.skip_hf and not compile:
            hf = bench_hf(config, state, device, dtype, batch, prompt, new, args.repeats)
        if not args.skip_litgpt and (args.litgpt_compile or not compile):
            try:
                lit = bench_litgpt(config, state, device, dtype, batch, prompt, new, compile, args.repeats)
            except Exception as e:  # LitGPT's compiled decode has crashed on some torch versions: report, go on
                lit = f"error: {type(e).__name__}"
        label = f"batch {batch}" + (" compiled" if compile else " eager")

        def fmt(v: object) -> str:
            return "-" if v is None else v if isinstance(v, str) else f"{v:,.0f}"

        print(f"| {label} | {ours:,.0f} | {fmt(hf)} | {fmt(lit)} |", flush=True)


if __name__ == "__main__":
    main()
