"""Fine-tuning speed and memory of litft beside HF transformers+PEFT and LitGPT 0.5.13, in the same process run.

Workloads (issue 9's table; the anchors built as ../shared/bench/anchor_gpu.py built them, see bench/anchors.py):
Llama-3.2-1B shape, random weights, bf16, LoRA r=16 alpha=32 dropout 0, AdamW (fused on CUDA), micro-batch 4 x 2048.

  qkvo    LoRA on q, k, v, o                      tokens/s, peak GiB
  all     LoRA on all linear layers of the blocks
  ckpt    LoRA q,k,v,o + activation checkpointing, micro-batch 8
  full    full fine-tuning (bf16 weights and AdamW state)
  varlen  LoRA q,k,v,o on 256 alpaca-like lengths (median ~180): non-pad tokens/s. HF and LitGPT: micro-batches
          of 8 padded to their longest sample; litft: padded, packed into 2048-token rows with SDPA and a dense mask,
          and packed with FlexAttention (CUDA)
  maxlen  LoRA q,k,v,o at micro-batch 1: the longest of 8k..128k tokens one step trains in (litft also 256k;
          stops at the first OOM);
          HF and LitGPT without activation checkpointing (as the anchors); litft like-for-like and with its memory
          switches (full checkpointing + activation offloading)

  --ladder  litft alone on the qkvo workload: tokens/s and peak memory with each speed switch turned on after the
            previous ones (plain -> fused AdamW -> fused loss -> compiled blocks), then each memory option on top
            of the eager defaults (selective / full checkpointing, + activation offloading)

litft's comparison rows use its defaults (TrainArgs(): fused loss, fused AdamW, attention sdpa), eager unless
--compile.

One timed unit = forward + backward + optimizer step (no gradient clipping, no device sync per step: as the anchors
measure). tokens/s = micro-batch x sequence x steps / wall time (varlen: non-pad tokens only). Peak memory =
torch.cuda.max_memory_allocated over the row (weights included). MFU = model FLOPs (litft.train.metrics
convention: full 6N + 12·L·H·Q·T, LoRA 4N + 6·N_LoRA + 12·L·H·Q·T) / measured bf16 matmul peak.

    python bench/finetune_speed.py --device cuda                  # every row, every library (~6 min on an H100)
    python bench/finetune_speed.py --device cuda --ladder --rows none
    OMP_NUM_THREADS=1 python bench/finetune_speed.py --quick      # CPU, tiny shape (2 layers, hidden 64), fp32
    OMP_NUM_THREADS=1 python bench/finetune_speed.py --quick --rows qkvo --rounds 7   # issue 9's CPU LoRA step

On a shared CPU use OMP_NUM_THREADS=1 (threads waiting for busy cores make every library 10-30x slower) and
--rounds: the libraries take turns, and the table's litft / anchor ratio is the median of the per-round ratios.

Results go to stdout as Markdown tables and to ``$OUT/finetune_speed.json`` (``--out``) after every measurement, so a
timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import anchors as A  # noqa: E402
from litft.config import Config  # noqa: E402
from litft.data import Sample, first_fit, pack_batch  # noqa: E402
from litft.model import GPT  # noqa: E402
from litft.peft.lora import LoRAArgs, apply_lora, count_parameters  # noqa: E402
from litft.train.args import TrainArgs  # noqa: E402
from litft.train.loop import prepare_training  # noqa: E402
from litft.train.trainer import forward_backward  # noqa: E402
from litft.train.metrics import flops_per_token, matmul_params  # noqa: E402
from litft.train.schedule import build_optimizer  # noqa: E402

ROWS = ("qkvo", "all", "ckpt", "full", "varlen", "maxlen")
LIBS = ("litft", "hf", "litgpt")
MAXLEN = (8192, 16384, 32768, 65536, 131072)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.shape = A.TINY if args.quick else A.LLAMA_32_1B
        self.t0 = time.perf_counter()
        self.peak_tflops: Optional[float] = None
        out = Path(args.out or os.environ.get("OUT") or "out/bench")
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "finetune_speed.json"
        self.results: dict[str, Any] = {"meta": self.meta(), "rows": {}, "ladder": []}

    # ---------------------------------------------------------------- bookkeeping

    def meta(self) -> dict[str, Any]:
        dev = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
               else platform.processor() or platform.machine())
        return {"date": str(datetime.date.today()), "device": dev, "cpu_threads": torch.get_num_threads(),
                "dtype": str(self.dtype), "shape": "tiny" if self.args.quick else "Llama-3.2-1B",
                "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                "versions": {n: A.version(n) for n in ("torch", "transformers", "peft", "litgpt", "lightning")}}

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.path)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> Optional[float]:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device.type == "cuda" else None

    def measure_peak(self) -> None:
        """The bf16 matmul peak of this device (8192^3, as the anchors measured it): the MFU denominator."""
        if self.device.type != "cuda":
            return
        n = 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        for _ in range(5):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(30):
            a @ b
        end.record()
        torch.cuda.synchronize()
        self.peak_tflops = 2 * n**3 * 30 / (start.elapsed_time(end) / 1e3) / 1e12
        self.results["meta"]["measured_peak_tflops"] = round(self.peak_tflops, 1)
        del a, b
        self.free()

    # ---------------------------------------------------------------- models

    def litft_config(self, block_size: int) -> Config:
        s = self.shape
        return Config.from_name("Llama-3.2-1B", block_size=block_size, n_layer=s["layers"], n_embd=s["hidden"],
                                n_head=s["heads"], n_query_groups=s["kv_heads"], head_size=s["head_dim"],
                                intermediate_size=s["inter"], vocab_size=s["vocab"], layer_types=None)

    def litft(self, variant: Optional[str], train: TrainArgs, block_size: int = 2048) -> tuple[Any, Any, Any]:
        """(model, loss model, optimizer) as the training loop builds them for ``train`` (bf16-true on CUDA)."""
        torch.manual_seed(0)
        with torch.device(self.device), A.default_dtype(self.dtype):
            model = GPT(self.litft_config(block_size))
        model.reset_parameters(std=0.02)
        model.init_buffers(self.device)
        if variant is not None:
            apply_lora(model, LoRAArgs(r=A.LORA_R, alpha=A.LORA_ALPHA, dropout=0.0, targets=A.LITFT_TARGETS[variant]))
        model.train()
        loss_model = prepare_training(model, train, self.device)
        opt = build_optimizer("AdamW", model, 1e-4, 0.0, fused=train.fused_optimizer, device=self.device)
        return model, loss_model, opt

    def litft_step(self, loss_model: Any, opt: Any) -> Callable[[dict], None]:
        def step(batch: dict) -> None:
            inputs = {k: batch[k] for k in ("input_ids", "labels", "positions", "segment_ids") if k in batch}
            forward_backward(loss_model, [inputs], lambda loss: loss.backward(), batch["n_targets"])
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def anchor_step(self, model: Any, loss_fn: Callable, opt: Any) -> Callable[[dict], None]:
        def step(batch: dict) -> None:
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def anchor(self, lib: str, variant: Optional[str], grad_ckpt: bool = False, block_size: Optional[int] = None,
               max_seq_length: Optional[int] = None) -> tuple[Any, Callable, Any]:
        torch.manual_seed(0)
        if lib == "hf":
            model = A.build_hf(self.shape, self.device, self.dtype, grad_ckpt)
            if variant is not None:
                model = A.hf_lora(model, variant, self.dtype)
            loss_fn = A.hf_loss
        else:
            model = A.build_lit(self.shape, self.device, self.dtype, variant, grad_ckpt, max_seq_length, block_size)
            loss_fn = A.lit_loss
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=self.device.type == "cuda")
        return model, loss_fn, opt

    # ---------------------------------------------------------------- timing

    def time_steps(self, step: Callable[[dict], None], batches: list[dict], warmup: int) -> dict[str, Any]:
        for b in batches[:warmup]:
            step(b)
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the timed steps' peak (weights and optimizer state included)
        timed = batches[warmup:]
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        self.sync()
        dt = time.perf_counter() - t0
        real, padded = sum(b["real"] for b in timed), sum(b["padded"] for b in timed)
        return {"tokens_per_s": real / dt, "padded_tokens_per_s": padded / dt, "ms_per_step": 1e3 * dt / len(timed),
                "peak_gb": self.peak_gb(), "steps": len(timed)}

    def flops(self, model: Any, full: bool, seq: int) -> float:
        config = model.config if isinstance(model, GPT) else self.litft_config(seq)
        n_train = count_parameters(model, trainable=True)
        return flops_per_token(config, matmul_params(model), n_train, seq, full)

    # ---------------------------------------------------------------- rows

    def run(self, key: str, fn: Callable[[], dict[str, Any]]) -> Optional[dict[str, Any]]:
        if self.left() < 20:
            print(f"[{key}] skipped: budget ({self.args.budget_s}s) spent", flush=True)
            self.results["rows"][key] = {"status": "skipped (budget)"}
            self.save()
            return None
        self.free()
        t0 = time.perf_counter()
        try:
            rec = fn()
            rec["status"] = "ok"
        except torch.cuda.OutOfMemoryError as e:
            rec = {"status": f"OOM: {str(e)[:200]}"}
        except Exception as e:  # keep going: one library failing must not lose the others' figures
            traceback.print_exc()
            rec = {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        self.results["rows"][key] = rec
        self.free()
        self.save()
        shown = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items() if k != "tried"}
        print(f"[{key}] {shown}", flush=True)
        return rec

    def fixed_batches(self, mb: int) -> list[dict]:
        a = self.args
        batches = [A.fixed_batch(self.shape, mb, a.seq, self.device, seed=i) for i in range(a.warmup + a.steps)]
        for b in batches:
            b["n_targets"] = int((b["labels"] != -100).sum())
        return batches

    def fixed_setup(self, row: str, lib: str) -> tuple[Any, Callable[[dict], None], dict[str, Any]]:
        """(model, step, info) of one library on a fixed-length row (qkvo, all, ckpt, full)."""
        a = self.args
        variant = None if row == "full" else ("all" if row == "all" else "qkvo")
        mb = a.mb_ckpt if row == "ckpt" else a.mb
        info: dict[str, Any] = {"micro_batch": mb, "seq": a.seq}
        if lib == "litft":
            train = self.litft_train(checkpointing="full" if row == "ckpt" else False)
            model, loss_model, opt = self.litft(variant, train, block_size=a.seq)
            step = self.litft_step(loss_model, opt)
            info["switches"] = describe(train)
            fpt = self.flops(model, row == "full", a.seq)
            info["flops_per_token"] = fpt
        else:
            model, loss_fn, opt = self.anchor(lib, variant, grad_ckpt=row == "ckpt", max_seq_length=a.seq)
            step = self.anchor_step(model, loss_fn, opt)
        info["trainable"] = count_parameters(model, trainable=True)
        return model, step, info

    def fixed_row(self, row: str, lib: str) -> dict[str, Any]:
        model, step, info = self.fixed_setup(row, lib)
        rec = self.time_steps(step, self.fixed_batches(info["micro_batch"]), self.args.warmup)
        rec.update(info)
        if "flops_per_token" in info:
            rec["model_tflops"] = rec["tokens_per_s"] * info["flops_per_token"] / 1e12
            if self.peak_tflops:
                rec["mfu"] = rec["model_tflops"] / self.peak_tflops
        del model, step
        return rec

    def interleaved(self, setups: dict[str, tuple[Any, Callable[[dict], None], dict[str, Any]]],
                    rounds: int) -> dict[str, dict[str, Any]]:
        """Time several set-ups taking turns (a different order every round), --steps steps each per round: on a
        noisy machine the drift hits all of them alike, and the per-round ratios cancel it. Returns, per set-up,
        the median tokens/s, the spread of the rounds and each round's figure."""
        batches = {k: self.fixed_batches(info["micro_batch"]) for k, (_, _, info) in setups.items()}
        for k, (_, step, _) in setups.items():
            for b in batches[k][:self.args.warmup]:
                step(b)
        per_round: dict[str, list[float]] = {k: [] for k in setups}
        names = list(setups)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                step, timed = setups[k][1], batches[k][self.args.warmup:]
                self.sync()
                t0 = time.perf_counter()
                for b in timed:
                    step(b)
                self.sync()
                per_round[k].append(sum(b["real"] for b in timed) / (time.perf_counter() - t0))
        out = {}
        for k, speeds in per_round.items():
            med = statistics.median(speeds)
            out[k] = {**setups[k][2], "tokens_per_s": med, "rounds": rounds, "round_tokens_per_s": speeds,
                      "spread": (max(speeds) - min(speeds)) / med, "peak_gb": None, "status": "ok"}
        return out

    def litft_train(self, checkpointing: Any = False, **overrides: Any) -> TrainArgs:
        """litft's switches for the comparison rows: its defaults (``--compile``: plus compiled blocks)."""
        return TrainArgs(activation_checkpointing=checkpointing, compile=self.args.compile, **overrides)

    def varlen_row(self, lib: str, mode: str = "padded") -> dict[str, Any]:
        a = self.args
        lengths = A.varlen_lengths(a.quick)
        samples = A.varlen_tokens(lengths, self.shape["vocab"])
        warm, steps = (1, a.steps) if a.quick else (3, 20)
        total = warm + steps
        if lib != "litft" or mode == "padded":
            batches = A.padded_batches(samples, A.VARLEN_MB, total, self.device)
        else:
            batches = self.packed_batches(samples, total)
        for b in batches:
            b["n_targets"] = int((b["labels"] != -100).sum())
        if lib == "litft":
            attention = {"padded": "auto", "packed-sdpa": "sdpa", "packed-flex": "flex"}[mode]
            train = self.litft_train(attention=attention)
            model, loss_model, opt = self.litft("qkvo", train, block_size=max(a.pack_length, max(lengths)))
            step = self.litft_step(loss_model, opt)
        else:
            model, loss_fn, opt = self.anchor(lib, "qkvo", max_seq_length=max(lengths))
            step = self.anchor_step(model, loss_fn, opt)
        rec = self.time_steps(step, batches, warm)
        rec.update(mode=mode, pad_fraction=1 - sum(b["real"] for b in batches) / sum(b["padded"] for b in batches),
                   samples_per_step=None if mode.startswith("packed") else A.VARLEN_MB)
        del model, opt, step
        return rec

    def packed_batches(self, samples: list[list[int]], n_steps: int) -> list[dict]:
        """The same samples packed first-fit into rows of --pack-length tokens, --mb rows per micro-batch (cycling
        through the packed rows so the timed steps see as many tokens as needed)."""
        items = [Sample(s, s[1:] + [-100]) for s in samples]
        bins = first_fit([len(s.input_ids) for s in items], self.args.pack_length)
        rows = [[items[i] for i in b] for b in bins]
        mb = self.args.mb
        out = []
        for i in range(n_steps):
            chosen = [rows[(i * mb + j) % len(rows)] for j in range(mb)]
            b = {k: v.to(self.device) for k, v in pack_batch(chosen, 0).items()}
            b["real"] = sum(len(s.input_ids) for r in chosen for s in r)
            b["padded"] = b["input_ids"].numel()
            out.append(b)
        return out

    def maxlen_row(self, lib: str, memory_switches: bool = False) -> dict[str, Any]:
        probe = MAXLEN + ((262144,) if lib == "litft" else ())  # the anchors' probe stops at the model's 128k context
        lengths = [n // 128 for n in probe] if self.args.quick else list(probe)
        if lib == "litft":
            train = TrainArgs(activation_checkpointing="full" if memory_switches else False,
                              activation_offloading=memory_switches and self.device.type == "cuda")
            model, loss_model, opt = self.litft("qkvo", train, block_size=max(lengths))
            step = self.litft_step(loss_model, opt)
        else:
            model, loss_fn, opt = self.anchor(lib, "qkvo", block_size=max(lengths), max_seq_length=lengths[0])
            step = self.anchor_step(model, loss_fn, opt)
        tried, best, oom_at = [], None, None
        for n in lengths:
            if self.left() < 30:
                tried.append({"seq": n, "status": "skipped (budget)"})
                break
            if lib == "litgpt":
                model.max_seq_length = n
            b = A.fixed_batch(self.shape, 1, n, self.device)
            b["n_targets"] = n - 1
            self.free()
            oom = False
            try:
                t0 = time.perf_counter()
                step(b)
                self.sync()
                dt = time.perf_counter() - t0
            except torch.cuda.OutOfMemoryError:
                oom = True
            if oom:
                opt.zero_grad(set_to_none=True)
                b = None
                self.free()
                oom_at = n
                tried.append({"seq": n, "status": "OOM"})
                break
            best = {"seq": n, "status": "ok", "ms": round(1e3 * dt, 1), "peak_gb": self.peak_gb()}
            tried.append(best)
            print(f"  {lib} len {n}: {best}", flush=True)
        del model, opt, step
        return {"max_seq": best["seq"] if best else None, "peak_gb": best["peak_gb"] if best else None,
                "first_oom": oom_at, "tried": tried,
                "switches": describe(train) if lib == "litft" else "none"}

    # ---------------------------------------------------------------- ladder

    def ladder(self) -> None:
        """litft alone, LoRA q,k,v,o at --mb x --seq. Speed: each switch on top of the previous ones (plain ->
        fused AdamW -> fused loss -> compiled blocks); memory: each option on top of the eager defaults."""
        cuda = self.device.type == "cuda"
        steps: list[tuple[str, TrainArgs]] = []
        t = TrainArgs(fused_loss=False, attention="sdpa", compile=False, fused_optimizer=False)
        steps.append(("plain: full fp32 logits, unfused AdamW", t))
        t = dataclasses.replace(t, fused_optimizer=None)
        steps.append(("+ fused AdamW (default)", t))
        t = dataclasses.replace(t, fused_loss=True)
        defaults = t
        steps.append(("+ fused chunked linear+cross-entropy (default)", t))
        if not self.args.no_compile:
            steps.append(("+ torch.compile of the blocks", dataclasses.replace(t, compile=True)))
        steps.append(("defaults + selective activation checkpointing",
                      dataclasses.replace(defaults, activation_checkpointing="selective")))
        steps.append(("defaults + full activation checkpointing",
                      dataclasses.replace(defaults, activation_checkpointing="full")))
        if cuda:
            steps.append(("defaults + full checkpointing + activation offloading",
                          dataclasses.replace(defaults, activation_checkpointing="full", activation_offloading=True)))
        a = self.args
        if a.rounds > 1:  # taking turns, as the comparison rows do
            def together() -> dict[str, Any]:
                setups = {}
                for label, train in steps:
                    model, loss_model, opt = self.litft("qkvo", train, block_size=a.seq)
                    setups[label] = (model, self.litft_step(loss_model, opt),
                                     {"micro_batch": a.mb, "seq": a.seq, "switches": describe(train)})
                for label, rec in self.interleaved(setups, a.rounds).items():
                    self.results["ladder"].append({"step": label, "ms_per_step": 1e3 * a.mb * a.seq /
                                                   rec["tokens_per_s"], **rec})
                return {"steps": len(steps)}

            self.run("ladder (interleaved)", together)
            return
        batches = [A.fixed_batch(self.shape, a.mb, a.seq, self.device, seed=i) for i in range(a.warmup + a.steps)]
        for b in batches:
            b["n_targets"] = int((b["labels"] != -100).sum())
        for label, train in steps:
            def one(train: TrainArgs = train) -> dict[str, Any]:
                model, loss_model, opt = self.litft("qkvo", train, block_size=a.seq)
                rec = self.time_steps(self.litft_step(loss_model, opt), batches, a.warmup)
                rec["switches"] = describe(train)
                del model, loss_model, opt
                return rec

            rec = self.run(f"ladder: {label}", one)
            if rec is not None:
                self.results["ladder"].append({"step": label, **rec})
                self.save()

    # ---------------------------------------------------------------- tables

    def table(self) -> str:
        rows = self.results["rows"]
        meta = self.results["meta"]
        lines = [f"#### {meta['device']} | {meta['date']} | dtype {meta['dtype']} | shape {meta['shape']} | "
                 f"measured peak {meta.get('measured_peak_tflops', '-')} TFLOP/s",
                 f"versions: {meta['versions']}; command: `{meta['command']}`", "",
                 "| workload | litft | HF+PEFT | LitGPT | litft / LitGPT | litft / HF |",
                 "|---|---:|---:|---:|---:|---:|"]

        def cell(rec: Optional[dict]) -> str:
            if not rec:
                return "-"
            if rec.get("status") != "ok":
                return rec.get("status", "-").split(":")[0]
            if "max_seq" in rec:  # "≥": no OOM anywhere in the probe (the true limit is higher)
                return (("≥" if rec.get("first_oom") is None else "") + f"{rec['max_seq']:,}"
                        + (f" / {rec['peak_gb']:.1f} GiB" if rec.get("peak_gb") else ""))
            mem = f" / {rec['peak_gb']:.1f} GiB" if rec.get("peak_gb") is not None else ""
            spread = f" (±{rec['spread'] / 2:.0%})" if rec.get("spread") else ""
            return f"{rec['tokens_per_s']:,.0f}{spread}{mem}"

        def ratio(x: Optional[dict], y: Optional[dict], lib: str) -> str:
            if not x or not y or x.get("status") != "ok" or y.get("status") != "ok":
                return "-"
            pairs = x.get(f"ratio_vs_{lib}_rounds")
            if pairs:  # the median of the per-round ratios, and their range
                return f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"
            if "max_seq" in x:  # a ratio only where the anchor found its limit; "≥" where litft did not
                if y.get("first_oom") is None or not x.get("max_seq") or not y.get("max_seq"):
                    return "-"
                return ("≥" if x.get("first_oom") is None else "") + f"{x['max_seq'] / y['max_seq']:.2f}x"
            key = "tokens_per_s"
            return f"{x[key] / y[key]:.2f}x" if x.get(key) and y.get(key) else "-"

        names = {"qkvo": "LoRA q,k,v,o", "all": "LoRA all linear", "ckpt": f"LoRA + act. ckpt, mb {self.args.mb_ckpt}",
                 "full": "full fine-tune", "varlen": "var-length data, non-pad tok/s",
                 "maxlen": "longest seq, LoRA mb 1"}
        for row in ROWS:
            if not any(k.startswith(f"{row}/") for k in rows):
                continue
            variants = sorted({k.split("/", 2)[2] for k in rows if k.startswith(f"{row}/litft/")}) or [""]
            for v in variants:
                ours = rows.get(f"{row}/litft/{v}") if v else rows.get(f"{row}/litft")
                hf, lit = rows.get(f"{row}/hf"), rows.get(f"{row}/litgpt")
                label = names[row] + (f" — litft {v}" if v else "")
                lines.append(f"| {label} | {cell(ours)} | {cell(hf)} | {cell(lit)} | {ratio(ours, lit, 'litgpt')} | "
                             f"{ratio(ours, hf, 'hf')} |")
        if self.results["ladder"]:
            lines += ["", "| ladder step (litft, LoRA q,k,v,o) | tokens/s | ms/step | peak GiB |",
                      "|---|---:|---:|---:|"]
            for r in self.results["ladder"]:
                if r.get("status") == "ok":
                    peak = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"
                    spread = f" (±{r['spread'] / 2:.0%})" if r.get("spread") else ""
                    lines.append(f"| {r['step']} | {r['tokens_per_s']:,.0f}{spread} | {r['ms_per_step']:.1f} | "
                                 f"{peak} |")
                else:
                    lines.append(f"| {r['step']} | {r.get('status')} | | |")
        return "\n".join(lines)


def describe(train: TrainArgs) -> str:
    keys = ("fused_loss", "attention", "compile", "activation_checkpointing", "activation_offloading",
            "fused_optimizer")
    return ", ".join(f"{k}={getattr(train, k)}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape, fp32 on the CPU (seq 64, mb 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)} (or none)")
    parser.add_argument("--skip", default="", help="comma list of libraries to leave out: hf, litgpt (or litft)")
    parser.add_argument("--ladder", action="store_true", help="also run the optimisation ladder (litft alone)")
    parser.add_argument("--mb", type=int, default=4)
    parser.add_argument("--mb-ckpt", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--pack-length", type=int, default=2048, help="row length of litft's packed varlen rows")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None,
                        help="time the libraries (and the ladder's steps) taking turns, --steps steps each, this many "
                             "rounds, all models alive at once; report the median round and the median of the "
                             "per-round ratios (default: 1 = one after another, each model freed before the next, "
                             "as memory figures need; --quick: 10)")
    parser.add_argument("--compile", action="store_true", help="litft's comparison rows with --train.compile true")
    parser.add_argument("--no-compile", action="store_true", help="leave the compile step out of the ladder")
    parser.add_argument("--budget-s", type=int, default=560, help="skip what is left after this many seconds")
    parser.add_argument("--out", default=None, help="folder for finetune_speed.json (default $OUT or out/bench)")
    args = parser.parse_args()
    if args.quick:
        args.seq, args.mb, args.mb_ckpt = min(args.seq, 64), min(args.mb, 2), min(args.mb_ckpt, 4)
        args.pack_length = min(args.pack_length, 256)
        args.warmup, args.steps = min(args.warmup, 3), max(args.steps, 20)
        args.rounds = 10 if args.rounds is None else args.rounds
    args.rounds = args.rounds or 1
    rows = [r for r in args.rows.split(",") if r and r != "none"]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; expected some of {', '.join(ROWS)}")
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(LIBS):
        raise SystemExit(f"--skip: unknown {sorted(skip - set(LIBS))}; expected some of {', '.join(LIBS)}")
    libs = [lib for lib in LIBS if lib not in skip]
    for lib in libs:
        if lib != "litft":
            A.require(lib)

    bench = Bench(args)
    print(f"# {bench.results['meta']}", flush=True)
    bench.measure_peak()
    for row in rows:
        if row in ("qkvo", "all", "ckpt", "full"):
            if args.rounds > 1:  # all libraries' models alive at once, taking turns (CPU: no memory figures)
                def together(row: str = row) -> dict[str, Any]:
                    recs = bench.interleaved({lib: bench.fixed_setup(row, lib) for lib in libs}, args.rounds)
                    for lib in (libs[1:] if "litft" in recs else []):
                        recs["litft"][f"ratio_vs_{lib}_rounds"] = [
                            a / b for a, b in zip(recs["litft"]["round_tokens_per_s"], recs[lib]["round_tokens_per_s"])]
                    for lib, rec in recs.items():
                        bench.results["rows"][f"{row}/{lib}"] = rec
                    return {"libraries": libs}

                bench.run(f"{row}/interleaved", together)
            else:
                for lib in libs:
                    bench.run(f"{row}/{lib}", lambda lib=lib: bench.fixed_row(row, lib))
        elif row == "varlen":
            for lib in libs:
                if lib == "litft":
                    modes = ["padded", "packed-sdpa"] + (["packed-flex"] if bench.device.type == "cuda" else [])
                    for mode in modes:
                        bench.run(f"varlen/litft/{mode}", lambda mode=mode: bench.varlen_row("litft", mode))
                else:
                    bench.run(f"varlen/{lib}", lambda lib=lib: bench.varlen_row(lib))
        elif row == "maxlen":
            for lib in libs:
                if lib == "litft":
                    bench.run("maxlen/litft/defaults", lambda: bench.maxlen_row("litft"))
                    label = "ckpt+offload" if bench.device.type == "cuda" else "ckpt"
                    bench.run(f"maxlen/litft/{label}", lambda: bench.maxlen_row("litft", memory_switches=True))
                else:
                    bench.run(f"maxlen/{lib}", lambda lib=lib: bench.maxlen_row(lib))
        bench.save()
    if args.ladder:
        bench.ladder()
    bench.save()
    print()
    print(bench.table())
    print(f"\nJSON: {bench.path}")


if __name__ == "__main__":
    main()
