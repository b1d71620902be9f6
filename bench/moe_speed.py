"""Forward + backward time of litft's MoE layer beside transformers' ``Qwen3MoeSparseMoeBlock``, in the same run.

The same weights in both (litft's expert weights are views of transformers' 3-D expert tensors, so the two hold one
copy), the same tokens and the same output gradient; the outputs are checked equal before timing. transformers runs
with each of its experts implementations given by ``--hf_experts`` ("grouped_mm", its default, and "eager", its loop
over experts). Default shape: one Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts of 768, top-8, renormalised),
512 tokens, fp32 (about 8 GB of memory; on a CPU core, tens of seconds per step). ``--quick``: 16 experts of 384,
hidden 1024, 256 tokens. The implementations take turns, one step each per round (``--repeats`` rounds after one
warm-up round), so that the load of a shared machine weighs on all of them alike.

    OMP_NUM_THREADS=1 python bench/moe_speed.py --quick
    OMP_NUM_THREADS=1 python bench/moe_speed.py --experts 32 --tokens 256     # Qwen3-30B-A3B expert sizes
    python bench/moe_speed.py --device cuda --dtype bfloat16 --tokens 8192

Prints one table row per implementation: copy it into bench/RESULTS.md with the device and date it prints.
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
from litft.model import MoE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, MoE]:
    """transformers' block with random weights and litft's MoE viewing the same tensors."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_config = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
                               num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True)
    hf = Qwen3MoeSparseMoeBlock(hf_config).to(device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(dtype))
    config = Config(n_embd=args.hidden, n_head=16, intermediate_size=args.moe_intermediate, n_expert=args.experts,
                    n_expert_per_token=args.top_k, moe_normalize_topk=True, moe_intermediate_size=args.moe_intermediate)
    with torch.device("meta"):
        ours = MoE(config)
    size = args.moe_intermediate
    ours.router.weight = torch.nn.Parameter(hf.gate.weight.detach())
    for e, expert in enumerate(ours.experts):
        expert.gate_proj.weight = torch.nn.Parameter(hf.experts.gate_up_proj.detach()[e, :size])
        expert.up_proj.weight = torch.nn.Parameter(hf.experts.gate_up_proj.detach()[e, size:])
        expert.down_proj.weight = torch.nn.Parameter(hf.experts.down_proj.detach()[e])
    return hf, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe_intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hf_experts", default="grouped_mm,eager")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.moe_intermediate, args.experts, args.tokens = 1024, 384, 16, 256
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hf, ours = build(args, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    grad_out = torch.randn(1, args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            inp = x.detach().requires_grad_(True)
            module(inp).backward(grad_out)
        return run

    kinds = [k for k in args.hf_experts.split(",") if k]
    hf.experts.config._experts_implementation = kinds[0]
    with torch.no_grad():
        reference = hf(x)
        err = (ours(x) - reference).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if err > tol:
        raise SystemExit(f"litft's MoE output differs from transformers' by {err:.2e} (> {tol})")

    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu}, {threads} thread(s)"
    print(f"# {datetime.date.today()} {where}; torch {torch.__version__}; hidden {args.hidden}, {args.experts} experts "
          f"of {args.moe_intermediate}, top-{args.top_k}, {args.tokens} tokens, {args.dtype}; max |diff| {err:.1e}",
          flush=True)
    print("| implementation | forward+backward s (median) | min | time / litft's |")
    print("|---|---:|---:|---:|", flush=True)
    runs = [("litft MoE", None, ours)]
    runs += [(f"transformers Qwen3MoeSparseMoeBlock ({kind})", kind, hf) for kind in kinds]

    def timed(kind: str | None, module: torch.nn.Module) -> float:
        if kind is not None:
            hf.experts.config._experts_implementation = kind
        seconds = _seconds(step(module), device)
        module.zero_grad(set_to_none=True)
        return seconds

    for _, kind, module in runs:  # warm-up
        timed(kind, module)
    # interleaved (one step of each per round), so that the load of a shared machine weighs on all alike
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(args.repeats):
        for name, kind, module in runs:
            times[name].append(timed(kind, module))
    base = statistics.median(times["litft MoE"])
    for name, _, _ in runs:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {min(times[name]):.3f} | {med / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
