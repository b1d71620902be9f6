"""Prefill time of one Qwen3.5 linear-attention (Gated DeltaNet) layer against the sequence length, in one run.

Three layers of the same model shape take turns on the same tokens (``--lengths``, doubling from 512 to 8192 by
default), forward only (prefill), no cache:

- litft's :class:`litft.linear_attention.GatedDeltaNet` (its chunked form, ``--chunk_size`` tokens per chunk);
- transformers' ``Qwen3_5GatedDeltaNet`` with the same weights, which runs ``torch_chunk_gated_delta_rule`` (its torch
  fallback; no FLA kernels here); its output is checked equal to litft's at the shortest length first;
- litft's gated full-attention layer of the same model (SDPA, causal), whose cost grows with the square of the length.

Default shape: a Qwen3.5-35B-A3B layer (hidden 2048; linear attention with 16 key and 32 value heads of 128; full
attention with 16 query and 2 KV heads of 256); ``--model Qwen3.5-27B`` takes that one. The layers take turns, one
forward each per round (``--repeats`` rounds after one warm-up round), so that the load of a shared machine weighs on
all of them alike.

    OMP_NUM_THREADS=1 python bench/linear_attention_prefill.py --repeats 1
    python bench/linear_attention_prefill.py --device cuda --dtype bfloat16 --lengths 1024,2048,4096,8192,16384

Prints a markdown table of the time per token (microseconds) of each layer at each length: flat for linear attention
(linear cost), growing for full attention. Copy it into bench/RESULTS.md with the device and date it prints.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litft.config import Config
from litft.linear_attention import GatedDeltaNet
from litft.model import CausalSelfAttention, RotaryEmbedding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(step: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def build(config: Config, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    """litft's linear layer with random weights, transformers' with the same ones, litft's full-attention layer."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    torch.manual_seed(0)
    ours = GatedDeltaNet(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
        ours.reset_parameters()
    hf_config = Qwen3_5TextConfig(hidden_size=config.n_embd, num_hidden_layers=1, rms_norm_eps=config.norm_eps,
                                  linear_num_key_heads=config.linear_num_key_heads,
                                  linear_num_value_heads=config.linear_num_value_heads,
                                  linear_key_head_dim=config.linear_key_head_dim,
                                  linear_value_head_dim=config.linear_value_head_dim,
                                  linear_conv_kernel_dim=config.linear_conv_kernel, layer_types=["linear_attention"])
    theirs = Qwen3_5GatedDeltaNet(hf_config, 0)
    theirs.load_state_dict(ours.state_dict())
    full = CausalSelfAttention(config)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return tuple(m.to(device=device, dtype=dtype).eval() for m in (ours, theirs, full))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen3.5-35B-A3B", help="named config whose layer shape is timed")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = Config.from_name(args.model, linear_chunk_size=args.chunk_size)
    ours, theirs, full = build(config, device, dtype)
    rope = RotaryEmbedding(config).to(device)
    lengths = [int(n) for n in args.lengths.split(",")]
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = {n: torch.randn(1, n, config.n_embd, generator=g).to(device=device, dtype=dtype) for n in lengths}
    tables = {n: rope(torch.arange(n, device=device).unsqueeze(0), "full", dtype) for n in lengths}

    with torch.no_grad():
        x = inputs[lengths[0]]
        err = (ours(x, None, None, None) - theirs(x)).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if err > tol:
        raise SystemExit(f"litft's linear-attention output differs from transformers' by {err:.2e} (> {tol})")

    runs: dict[str, Callable[[int], object]] = {
        "litft GatedDeltaNet (chunked)": lambda n: ours(inputs[n], None, None, None),
        "transformers Qwen3_5GatedDeltaNet (torch_chunk_gated_delta_rule)": lambda n: theirs(inputs[n]),
        "litft full attention (gated, SDPA)": lambda n: full(inputs[n], tables[n], None, None),
    }
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {cpu}, {torch.get_num_threads()} thread(s)"
    print(f"# {datetime.date.today()} {where}; torch {torch.__version__}; {args.model} layer shape, chunk "
          f"{args.chunk_size}, {args.dtype}, forward only, median of {args.repeats}; max |diff| litft vs transformers "
          f"{err:.1e}", flush=True)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for n in lengths:
            for step in runs.values():  # warm-up
                _seconds(lambda: step(n), device)
            for _ in range(args.repeats):  # interleaved: one forward of each per round
                for name, step in runs.items():
                    times.setdefault((name, n), []).append(_seconds(lambda: step(n), device))
    print("| layer | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for name in runs:
        cells = [f"{statistics.median(times[name, n]) / n * 1e6:.1f}" for n in lengths]
        print(f"| {name}: µs / token | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
