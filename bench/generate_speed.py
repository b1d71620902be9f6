"""Decode speed of litft's generation engine beside HF transformers (and LitGPT when installed), same run.

Workload (issue 4): Llama-3.2-1B shape, random weights, bf16, prompt 128 + 256 new tokens, greedy, at batch 1
(eager and ``compile=True``) and batch 16. ``--quick`` runs a tiny shape in fp32 on the CPU.

    python bench/generate_speed.py --quick                 # CPU, tiny model, a minute
    python bench/generate_speed.py --device cuda           # GPU, Llama-3.2-1B shape (needs ~6 GB)

Prints one table row per measurement and appends nothing by itself: copy the table into bench/RESULTS.md
with the device and date it prints.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from typing import Callable

import torch

from litft.config import Config
from litft.generate.engine import Engine
from litft.generate.sampling import SamplingParams
from litft.model import GPT


def _config(quick: bool) -> Config:
    if quick:
        return Config(name="tiny", n_layer=4, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=768,
                      vocab_size=4096, block_size=512, rope_theta=500000.0, tie_embeddings=True)
    return Config.from_name("Llama-3.2-1B", block_size=2048)


def _time(fn: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Best tokens/s over ``repeats`` runs (after one warm-up)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn()
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
    params = SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=[])

    def run() -> int:
        results = engine.generate(prompts.tolist(), params, max_batch_size=batch)
        return sum(len(r.tokens) for r in results)

    return _time(run, device, repeats)


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

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        return (out.shape[1] - prompt) * batch

    return _time(run, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_hf", action="store_true")
    args = parser.parse_args()
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
    print("| workload | litft tok/s | HF transformers tok/s |")
    print("|---|---:|---:|")
    for batch, compile in ((1, False), (1, True), (16, False)):
        ours = bench_litft(config, state, device, dtype, batch, prompt, new, compile, args.repeats)
        theirs = None
        if not args.skip_hf and not compile:
            theirs = bench_hf(config, state, device, dtype, batch, prompt, new, args.repeats)
        label = f"batch {batch}" + (" compiled" if compile else " eager")
        print(f"| {label} | {ours:,.0f} | {'-' if theirs is None else f'{theirs:,.0f}'} |", flush=True)


if __name__ == "__main__":
    main()
