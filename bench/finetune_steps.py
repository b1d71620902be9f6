"""A few real ``litft finetune lora`` steps (the whole training loop: data, Fabric, checkpoint, final/) on a random
Llama-3.2-1B-shape checkpoint: bf16 LoRA and QLoRA (``--quantize bnb.nf4``), tokens/s and peak memory as the run
logs them (issue 3's GPU check).

The checkpoint (random weights, the tiny demo's character tokenizer, so one character = one token) and a JSONL
of 64 rows of ~2,000 random characters are written to a temporary folder; each run trains micro-batches of 4
samples x up to 2048 tokens for ``--steps`` steps with the default switches of ``TrainArgs`` (plus
``--train.compile`` with ``--compile``). tokens/s is the median of the logged per-step figures after the first
two steps (compilation, warm-up).

    python bench/finetune_steps.py --device cuda            # ~1 minute on an H100
    python bench/finetune_steps.py --quick                  # CPU, tiny shape: checks the script runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import litft  # noqa: E402
from litft.config import Config  # noqa: E402
from litft.model import GPT  # noqa: E402
from litft.weights import copy_tokenizer_files, save_model  # noqa: E402

TINY_ASSETS = Path(litft.__file__).parent / "assets" / "tiny" / "base"


def make_checkpoint(directory: Path, quick: bool, device: torch.device) -> Path:
    """A random-weight checkpoint of the Llama-3.2-1B shape (tiny under --quick) with the demo tokenizer."""
    if quick:
        config = Config.from_name("Llama-3.2-1B", block_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                                  head_size=16, intermediate_size=128, vocab_size=512, layer_types=None)
    else:
        config = Config.from_name("Llama-3.2-1B", block_size=2048)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = GPT(config).to(dtype)
    model.reset_parameters(std=0.02)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    config.save(directory)
    copy_tokenizer_files(TINY_ASSETS, directory)
    del model
    return directory


def make_data(path: Path, rows: int, length: int) -> Path:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    with path.open("w") as f:
        for _ in range(rows):
            n = rng.randint(length * 9 // 10, length)
            f.write(json.dumps({"input": "Repeat:", "output": "".join(rng.choice(alphabet) for _ in range(n))}) + "\n")
    return path


def run(name: str, checkpoint: Path, data: Path, out: Path, args: argparse.Namespace,
        quantize: Optional[str]) -> dict[str, Any]:
    from litft.data import DataArgs
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs
    from litft.train.args import EvalArgs, TrainArgs
    from litft.train.metrics import read_metrics

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    finetune_lora(
        checkpoint, out, data=DataArgs(train_path=data, format="input_output", val_split_fraction=0.0),
        train=TrainArgs(global_batch_size=args.mb, micro_batch_size=args.mb, max_seq_length=args.seq,
                        max_steps=args.steps, lr=1e-4, compile=args.compile, peak_tflops=args.peak_tflops),
        eval=EvalArgs(final_validation=False), lora=LoRAArgs(r=16, alpha=32, dropout=0.0, targets=["q", "k", "v", "o"]),
        quantize=quantize, accelerator=args.device, precision="bf16-true" if args.device == "cuda" else "32-true",
        overwrite=True,
    )
    wall = time.perf_counter() - t0
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    later = steps[2:] or steps
    summary = next((r for r in records if "final_step" in r), {})
    mem_key = next((k for k in summary if k.startswith("peak_memory_")), None)
    rec = {"name": name, "quantize": quantize, "steps": len(steps), "wall_s": round(wall, 1),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
           "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
           "peak_memory": (mem_key, summary.get(mem_key)),
           "mfu": statistics.median(r["mfu"] for r in later) if "mfu" in later[0] else None}
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--mb", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="--train.compile true")
    parser.add_argument("--peak_tflops", type=float, default=None, help="--train.peak_tflops (for the logged MFU)")
    parser.add_argument("--skip_qlora", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="use (or first create) the random checkpoint in this folder instead of a temporary one")
    parser.add_argument("--make_checkpoint_only", action="store_true", help="create --checkpoint and stop")
    parser.add_argument("--out", default=None, help="folder for finetune_steps.json (default $OUT or out/bench)")
    args = parser.parse_args()
    if args.quick:
        args.seq, args.mb, args.steps = min(args.seq, 128), min(args.mb, 2), min(args.steps, 4)
    out = Path(args.out or os.environ.get("OUT") or "out/bench")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    results: dict[str, Any] = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(device)
                               if device.type == "cuda" else "cpu", "torch": torch.__version__, "runs": []}
    if args.checkpoint is not None and not (args.checkpoint / "model_config.yaml").is_file():
        make_checkpoint(args.checkpoint, args.quick, device)
    if args.make_checkpoint_only:
        if args.checkpoint is None:
            raise SystemExit("--make_checkpoint_only needs --checkpoint")
        print(f"random checkpoint: {args.checkpoint}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or make_checkpoint(tmp / "base", args.quick, device)
        data = make_data(tmp / "train.jsonl", 64, args.seq - 16)
        runs = [("LoRA bf16" if device.type == "cuda" else "LoRA fp32", None)]
        if not args.skip_qlora:
            runs.append(("QLoRA nf4", "bnb.nf4"))
        for name, quantize in runs:
            try:
                results["runs"].append(run(name, checkpoint, data, tmp / name.replace(" ", "_"), args, quantize))
            except Exception as e:  # report and go on: one failing run must not lose the other's figures
                results["runs"].append({"name": name, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"{name}: {results['runs'][-1]['error']}", flush=True)
            (out / "finetune_steps.json").write_text(json.dumps(results, indent=1))
    print(f"\n| run ({results['device']}, {args.steps} steps, {args.mb} x {args.seq}) | tokens/s | peak memory | "
          f"MFU | loss first -> last |\n|---|---:|---:|---:|---|")
    for r in results["runs"]:
        if "error" in r:
            print(f"| {r['name']} | {r['error'][:60]} | | | |")
            continue
        kind, mem = r["peak_memory"]
        kind = (kind or "").replace("peak_memory_", "").replace("_gb", "")
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {mem:.2f} GB ({kind}) | {mfu} | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
