"""DPO LoRA step time and peak memory: litft beside TRL's ``DPOTrainer`` with PEFT, measured in one run (issue 16).

Workload: a Llama-shaped model with random weights (``--quick``: the tiny shape of ``bench/finetune_speed.py
--quick``, 2 layers, hidden 64; default: 4 layers, hidden 256, vocab 4096), fp32, LoRA r=16 alpha=32 dropout 0 on
q, k, v, o, AdamW (fused, lr 1e-3 constant, weight decay 0), gradient clipping at 1.0 (both libraries' default),
beta 0.1, micro-batch of ``--pairs`` pairs (default 4), each a prompt of 32 tokens (BOS + 31 characters) and
completions of 32 tokens (31 characters + EOS), no gradient accumulation.

Both libraries run the SAME weights and data: the transformers model is saved once and converted to litft
(``litft.convert.hf.convert_from_hf``); the LoRA initialisation is PEFT's, saved once and loaded into both (litft
through ``from_peft_state_dict``); both tokenize the same ``{"prompt", "chosen", "rejected"}`` strings with the same
character-level tokenizer (``litft/assets/tiny/base``) in their own data code, and take the pairs in file order.

- litft: the step the Trainer runs: the LoRA-injected GPT, ``DPOObjective`` over the (2B, T) micro-batch of
  ``PairBatchIterator`` (one no-grad reference forward with LoRA switched off, one policy forward over chosen and
  rejected together), ``loss / units`` backward, clipping, AdamW step. ``TrainArgs()`` defaults (sdpa, fused head
  chunks of ``loss_chunk_size``, fused AdamW).
- TRL 1.16: ``DPOTrainer(peft_config=LoraConfig(...))`` (reference = adapters disabled), ``use_cpu``,
  ``precompute_ref_log_probs=False`` (its default), ``bf16=False`` and ``gradient_checkpointing=False`` (TRL's
  defaults are bf16 and checkpointing; litft's step is fp32 without checkpointing), sequential sampler, no
  dataloader workers, report_to none. Step time = ``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``
  (forward, backward, clipping, optimizer and scheduler step; collation and logging fall outside, as for litft).

Each library runs in its own subprocess (``OMP_NUM_THREADS=1``), ``--rounds`` times, taking turns (the order flips
every round). Per round: the median step time after ``--warmup`` steps, and litft / TRL. Memory per process: the
peak resident set of the training phase (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` just before
the first step) and of the whole process (``ru_maxrss``: imports and set-up included).

Equivalence: at step 1 the policy is the reference, so both losses are ln 2; the losses of steps 2 and 3 (after one
and two optimizer steps on the same data) are printed side by side; the first micro-batch's tokens are compared.

    OMP_NUM_THREADS=1 python bench/dpo_speed.py --quick      # a few minutes on 2 shared cores
    OMP_NUM_THREADS=1 python bench/dpo_speed.py              # the larger shape, more rounds
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "litft" / "assets" / "tiny" / "base"  # character-level: one token per character, BOS added
SMALL = dict(hidden=256, layers=4, heads=8, kv_heads=2, head_dim=32, inter=768, vocab=4096, rope_theta=500000.0,
             rms_eps=1e-5, max_pos=131072)
LR, BETA, MAX_NORM = 1e-3, 0.1, 1.0
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


# ------------------------------------------------------------------------------------------------ memory


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak resident set) to the current resident set (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_record(rss_before_kib: int) -> dict[str, float]:
    return {"rss_before_mib": rss_before_kib / 1024, "train_peak_mib": status_kib("VmHWM") / 1024,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------------ set-up


def make_rows(n: int, prompt_chars: int, completion_chars: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:  # no leading/trailing space: the prompt is a token prefix of prompt + completion
        return "".join(rng.choice(ALPHABET[:-1] if i in (0, k - 1) else ALPHABET) for i in range(k))

    return [{"prompt": text(prompt_chars), "chosen": text(completion_chars), "rejected": text(completion_chars)}
            for _ in range(n)]


def prepare(work: Path, shape: dict, n_rows: int, prompt_len: int, completion_len: int) -> None:
    """The transformers model + tokenizer, its litft conversion, PEFT's LoRA initialisation and the data."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bench import anchors as A
    from litft.convert.hf import convert_from_hf

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    model = A.build_hf(shape, torch.device("cpu"), torch.float32)
    model.save_pretrained(work / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, work / "hf" / name)
    convert_from_hf(work / "hf", work / "litft")
    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora_config(), autocast_adapter_dtype=False)
    peft_model.save_pretrained(work / "lora_init")
    rows = make_rows(n_rows, prompt_len - 1, completion_len - 1)  # + BOS, + EOS
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def lora_config() -> Any:
    from peft import LoraConfig

    from bench import anchors as A

    return LoraConfig(r=A.LORA_R, lora_alpha=A.LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=A.HF_TARGETS["qkvo"], task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------ litft


def run_litft(work: Path, pairs: int, steps: int, seq: int) -> dict[str, Any]:
    import torch

    from bench import anchors as A
    from litft.config import Config
    from litft.convert.peft import read_peft_adapter
    from litft.methods import METHODS
    from litft.data.loader import read_records
    from litft.data.preference import PairBatchIterator, encode_pairs
    from litft.peft.lora import LoRAArgs, apply_lora, from_peft_state_dict, load_state_strict, lora_state_dict
    from litft.tokenizer import Tokenizer
    from litft.train.args import TrainArgs
    from litft.train.loop import resolve_attention
    from litft.train.objectives.base import ObjectiveContext
    from litft.train.objectives.dpo import DPOArgs, DPOObjective
    from litft.train.schedule import build_optimizer
    from litft.weights import load_model

    device = torch.device("cpu")
    train = TrainArgs()
    tokenizer = Tokenizer(work / "litft")
    samples = encode_pairs(read_records(work / "pairs.jsonl"), tokenizer, seq)
    batches = list(PairBatchIterator(samples, pairs, seq, pad_id=0, shuffle=False))[:steps]

    model = load_model(work / "litft")
    apply_lora(model, LoRAArgs(r=A.LORA_R, alpha=A.LORA_ALPHA, dropout=0.0, targets=A.LITFT_TARGETS["qkvo"]))
    names = set(lora_state_dict(model))
    _, peft_state, source = read_peft_adapter(work / "lora_init")
    load_state_strict({n: p for n, p in model.named_parameters() if n in names},
                      from_peft_state_dict(peft_state, Config.from_checkpoint(work / "litft").hf_model_type),
                      "LoRA", str(source))
    model.attention_backend = resolve_attention(train.attention, device)
    model.train()
    objective = DPOObjective(model, DPOArgs(beta=BETA), ObjectiveContext(
        reference=lambda: METHODS["lora"].reference_off(model), loss_chunk_size=train.loss_chunk_size if train.fused_loss else None))
    optimizer = build_optimizer("AdamW", model, LR, 0.0, fused=train.fused_optimizer, device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # the Trainer's forward_backward + optimizer step
        units = objective.units(batch)
        out = objective(**batch)
        (out.loss / units).backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach() / units

    first = {"input_ids": batches[0]["input_ids"].tolist(), "labels": batches[0]["labels"].tolist()}
    rss_before = status_kib("VmRSS")
    reset_peak_rss()
    times, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss = step(batch)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"step_s": times, "losses": losses, "first_batch": first, "trained": sum(p.numel() for p in params),
            "fused_adamw": bool(optimizer.defaults.get("fused")), **memory_record(rss_before)}


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(work: Path, pairs: int, steps: int, seq: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        """Wall time from on_step_begin to on_step_end; the step's loss from the trainer's running sum."""

        def __init__(self) -> None:
            self.trainer: Any = None
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.loss0 = float(self.trainer._tr_loss)
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.losses.append(float(self.trainer._tr_loss) - self.loss0)

    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()][:steps * pairs]
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    config = DPOConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=pairs, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_NORM,
        beta=BETA, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
        dataloader_num_workers=0, save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True,
        max_length=seq + 1, seed=0)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(), callbacks=[timer])
    timer.trainer = trainer
    loaded = set_peft_model_state_dict(trainer.model, load_file(work / "lora_init" / "adapter_model.safetensors"))
    if loaded.unexpected_keys or any("lora_" in k for k in loaded.missing_keys):
        raise RuntimeError(f"the LoRA initialisation did not load into TRL's model: {loaded}")
    first = next(iter(trainer.get_train_dataloader()))
    first = {"input_ids": first["input_ids"].tolist(), "completion_mask": first["completion_mask"].tolist()}
    rss_before = status_kib("VmRSS")
    reset_peak_rss()
    trainer.train()
    return {"step_s": timer.times, "losses": timer.losses, "first_batch": first,
            "trained": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "fused_adamw": bool(trainer.optimizer.defaults.get("fused")), **memory_record(rss_before)}


# ------------------------------------------------------------------------------------------------ driver


def worker(lib: str, work: Path, pairs: int, steps: int, seq: int, result: Path) -> None:
    import torch

    torch.set_num_threads(1)
    rec = (run_litft if lib == "litft" else run_trl)(work, pairs, steps, seq)
    result.write_text(json.dumps(rec))


def spawn(lib: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result = work / f"{lib}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", lib, "--work", str(work),
           "--pairs", str(args.pairs), "--steps", str(args.steps + args.warmup), "--seq", str(args.seq),
           "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{lib} worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    rec = json.loads(result.read_text())
    rec["process_wall_s"] = time.perf_counter() - t0
    rec["median_step_ms"] = 1e3 * statistics.median(rec["step_s"][args.warmup:])
    return rec


def same_first_batch(ours: dict, trl: dict) -> bool:
    """litft's inputs are TRL's sequence without its last token; its labels the next tokens of the completion."""
    ids, mask = trl["input_ids"], trl["completion_mask"]
    inputs = [row[:-1] for row in ids]
    labels = [[tok if m else -100 for tok, m in zip(row[1:], mrow[1:])] for row, mrow in zip(ids, mask)]
    return ours["input_ids"] == inputs and ours["labels"] == labels


def meta(args: argparse.Namespace, shape: dict) -> dict[str, Any]:
    from bench import anchors as A

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor() or platform.machine()
    return {"date": str(datetime.date.today()), "device": f"{cpu}, {os.cpu_count()} cores",
            "load_average": os.getloadavg(), "shape": shape, "pairs": args.pairs, "seq": args.seq,
            "command": "OMP_NUM_THREADS=1 python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "versions": {n: A.version(n) for n in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")}}


def report(results: dict[str, Any]) -> str:
    m, rounds = results["meta"], results["rounds"]
    ours = [r["litft"]["median_step_ms"] for r in rounds]
    theirs = [r["trl"]["median_step_ms"] for r in rounds]
    ratios = [a / b for a, b in zip(ours, theirs)]
    eq = results["equivalence"]

    def mem(lib: str, key: str) -> float:
        return statistics.median(r[lib][key] for r in rounds)

    lines = [f"- {m['date']}, {m['device']}, load average {', '.join(f'{x:.1f}' for x in m['load_average'])} "
             f"at the start; command: `{m['command']}`",
             f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
             f"- shape: {m['shape']['layers']} layers, hidden {m['shape']['hidden']}, {m['shape']['heads']} heads, "
             f"{m['shape']['kv_heads']} KV heads, MLP {m['shape']['inter']}, vocab {m['shape']['vocab']}, fp32; "
             f"{m['pairs']} pairs x ({m['seq'] // 2} prompt + {m['seq'] // 2} completion tokens); "
             f"{len(rounds)} rounds of {results['args']['steps']} timed steps after {results['args']['warmup']} "
             f"warm-up steps", "",
             "| round | litft ms/step | TRL ms/step | litft / TRL |", "|---:|---:|---:|---:|"]
    for i, (a, b, r) in enumerate(zip(ours, theirs, ratios), 1):
        lines.append(f"| {i} | {a:.1f} | {b:.1f} | {r:.2f} |")
    lines += ["", "| | litft | TRL DPOTrainer + PEFT | litft / TRL |", "|---|---:|---:|---:|",
              f"| step time, median of the rounds' medians (ms) | {statistics.median(ours):.1f} | "
              f"{statistics.median(theirs):.1f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |"]
    for key, label in (("train_peak_mib", "peak RSS while training (MiB)"),
                       ("rss_before_mib", "RSS before the first step (MiB)"),
                       ("process_peak_mib", "peak RSS of the whole process, imports included (MiB)"),
                       ("process_wall_s", "whole process wall time (s)")):
        a, b = mem("litft", key), mem("trl", key)
        lines.append(f"| {label} | {a:,.0f} | {b:,.0f} | {a / b:.2f} |" if "MiB" in label else
                     f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    lines.append(f"| peak RSS while training minus RSS before it (MiB) | "
                 f"{mem('litft', 'train_peak_mib') - mem('litft', 'rss_before_mib'):,.1f} | "
                 f"{mem('trl', 'train_peak_mib') - mem('trl', 'rss_before_mib'):,.1f} | |")
    lines += ["", f"Equivalence (round 1): same first micro-batch tokens: {eq['same_first_batch']}; trained "
              f"parameters litft {eq['trained']['litft']:,}, TRL {eq['trained']['trl']:,}; fused AdamW "
              f"litft {eq['fused_adamw']['litft']}, TRL {eq['fused_adamw']['trl']}; ln 2 = {math.log(2):.6f}", "",
              "| step | litft loss | TRL loss | difference |", "|---:|---:|---:|---:|"]
    for i, (a, b) in enumerate(zip(eq["litft_losses"], eq["trl_losses"]), 1):
        lines.append(f"| {i} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny shape (2 layers, hidden 64), fewer rounds")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (the batch is 2 x pairs rows)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence: half prompt, half completion")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (default 30, --quick 20)")
    parser.add_argument("--rounds", type=int, default=None, help="processes per library, taking turns "
                                                                 "(default 7, --quick 5)")
    parser.add_argument("--out", default=None, help="folder for the model files and dpo_speed.json "
                                                    "(default $OUT or out/bench)")
    parser.add_argument("--worker", choices=("litft", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.pairs, args.steps, args.seq, args.result)
        return
    if args.seq < 4 or args.seq % 2:
        raise SystemExit(f"--seq must be an even number >= 4, got {args.seq}")
    args.steps = args.steps or (20 if args.quick else 30)
    args.rounds = args.rounds or (5 if args.quick else 7)
    from bench import anchors as A

    shape = A.TINY if args.quick else SMALL
    out = Path(args.out or os.environ.get("OUT") or "out/bench")
    work = out / "dpo_speed"
    results: dict[str, Any] = {"meta": meta(args, shape), "args": vars(args) | {"work": str(work)}, "rounds": []}
    results["args"].pop("result", None)
    print(f"# {results['meta']}", flush=True)
    prepare(work, shape, (args.steps + args.warmup) * args.pairs, args.seq // 2, args.seq // 2)
    for i in range(args.rounds):
        order = ("litft", "trl") if i % 2 == 0 else ("trl", "litft")
        rec = {lib: spawn(lib, args, work) for lib in order}
        results["rounds"].append(rec)
        print(f"round {i + 1}: litft {rec['litft']['median_step_ms']:.1f} ms/step, TRL "
              f"{rec['trl']['median_step_ms']:.1f} ms/step, ratio "
              f"{rec['litft']['median_step_ms'] / rec['trl']['median_step_ms']:.2f}; train peak RSS "
              f"{rec['litft']['train_peak_mib']:.0f} / {rec['trl']['train_peak_mib']:.0f} MiB", flush=True)
    first = results["rounds"][0]
    results["equivalence"] = {
        "same_first_batch": same_first_batch(first["litft"]["first_batch"], first["trl"]["first_batch"]),
        "litft_losses": first["litft"]["losses"][:3], "trl_losses": first["trl"]["losses"][:3],
        "trained": {lib: first[lib]["trained"] for lib in ("litft", "trl")},
        "fused_adamw": {lib: first[lib]["fused_adamw"] for lib in ("litft", "trl")}}
    for rec in results["rounds"]:
        for lib in rec.values():
            lib.pop("first_batch", None)
    (out / "dpo_speed.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(report(results))
    print(f"\nJSON: {out / 'dpo_speed.json'}")


if __name__ == "__main__":
    main()
