"""Throughput, model FLOPs utilisation, peak memory, the run's logs (``metrics.jsonl`` + TensorBoard, and the
experiment trackers of ``train.trackers``: W&B) and the PyTorch profiler of ``train.profile``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from litft.config import Config

# Dense peak tensor throughput in FLOP/s for 16-bit (bf16/fp16) matmuls, and for fp32 (TF32 on NVIDIA), by the
# start of torch.cuda.get_device_name(). Unknown devices report MFU as n/a rather than a guess.
PEAK_FLOPS = {
    "NVIDIA H200": (989e12, 494e12),
    "NVIDIA H100 NVL": (835e12, 418e12),
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H100": (989e12, 494e12),  # SXM
    "NVIDIA A100": (312e12, 156e12),
    "NVIDIA L40S": (362e12, 183e12),
    "NVIDIA L4": (121e12, 60e12),
    "NVIDIA A10G": (70e12, 35e12),
    "NVIDIA A10": (125e12, 62e12),
    "NVIDIA GeForce RTX 4090": (165e12, 83e12),
    "NVIDIA GeForce RTX 3090": (71e12, 36e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype, peak_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device for matmuls in ``dtype``: ``peak_tflops`` (``train.peak_tflops``) when given, else
    the datasheet figure of a known CUDA device; None when unknown (and on CPU/MPS unless given)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.startswith(prefix):
            half, single = PEAK_FLOPS[prefix]
            return half if dtype in (torch.bfloat16, torch.float16) else single
    return None


def flops_per_token(config: Config, n_params: int, n_trainable: int, seq_length: int, full: bool) -> float:
    """Training FLOPs per token (forward + backward), the numerator of MFU.

    With N the parameters in matmuls, L layers, H·Q the attention width (heads x head size) and T the
    sequence length:

    - full fine-tuning: ``6N + 12·L·H·Q·T``: 2N forward, 4N backward (gradients for activations and weights);
    - parameter-efficient (LoRA, adapter): ``4N + 6·N_trainable + 12·L·H·Q·T``: the frozen weights need only
      the forward and the activation gradients (2N + 2N), the trainable ones all three (6 per parameter).

    The attention term counts the score and value matmuls (2·2·T·H·Q per layer and token forward, x3 with
    backward) over the full square, as PaLM's appendix B does. N counts each weight once (a tied head once);
    recomputation (activation checkpointing) is not model FLOPs and is not counted.
    MFU = tokens/s x this / peak FLOP/s; the training loop takes T = the micro-batch's row length.
    """
    attention = 12 * config.n_layer * config.n_head * config.head_size * seq_length
    if full:
        return 6 * n_params + attention
    return 4 * (n_params - n_trainable) + 6 * n_trainable + attention


def matmul_params(model: torch.nn.Module) -> int:
    """N: the weights one token multiplies with, ``in x out`` of every linear layer (the head included, also when
    it is tied to the embedding: the lookup itself is free; LoRA's A and B included; quantized layers by their
    logical shape). Experts of a mixture of experts count by the fraction a token uses (top-k / experts); norms,
    biases and embeddings are not matmuls."""
    total = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):  # bitsandbytes' layers are nn.Linear subclasses
            continue
        n = module.in_features * module.out_features
        parent = _owner(model, name)
        experts = getattr(parent, "experts", None) if parent is not None else None
        if isinstance(experts, torch.nn.ModuleList) and ".experts." in f".{name}":
            n *= getattr(parent, "top_k", len(experts)) / len(experts)
        total += n
    return int(total)


def _owner(model: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    """The module holding the ``experts`` list ``name`` lies in (the MoE layer), if any."""
    parts = name.split(".")
    if "experts" not in parts:
        return None
    return model.get_submodule(".".join(parts[:parts.index("experts")]))


def peak_memory(device: torch.device) -> tuple[str, float]:
    """("cuda", GB allocated at peak) on CUDA, else ("rss", peak resident memory of the process in GB)."""
    if device.type == "cuda":
        return "cuda", torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
    except Exception:  # pragma: no cover - not on Linux
        return "rss", float("nan")


class RunLogger:
    """Appends one JSON object per event to ``logs/metrics.jsonl``, mirrors numbers to TensorBoard and passes every
    record on to the experiment ``trackers`` (e.g. :class:`WandbTracker`)."""

    def __init__(self, log_dir: Path, enabled: bool = True, resume_step: Optional[int] = None,
                 trackers: Sequence[Any] = ()) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        self._tb = None
        self.trackers = list(trackers) if enabled else []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            self.path.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir), purge_step=(resume_step + 1) if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """Drop entries a killed run wrote after the checkpoint it is resumed from."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.log({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}, step)

    def close(self, failed: bool = False) -> None:
        """Flush and close TensorBoard and the trackers (``failed``: the run stopped with an error)."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)


WANDB_ID_FILE = "wandb_run_id"


def import_wandb() -> Any:
    """The ``wandb`` module, or a clear error naming the extra that installs it."""
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(f"train.trackers=[wandb] needs the wandb package: pip install 'litft[wandb]' "
                           f"({e})") from None
    return wandb


class WandbTracker:
    """Logs the run to Weights & Biases: the records of ``metrics.jsonl`` as its history (at the same steps), the
    run's settings as its config. ``wandb.init`` reads the usual environment (WANDB_MODE=offline, WANDB_ENTITY,
    WANDB_API_KEY, WANDB_DIR); W&B's files go to ``log_dir`` unless WANDB_DIR is set. The run's id is kept in
    ``log_dir/wandb_run_id``, so a resumed run (``resume``) continues the same W&B run."""

    def __init__(self, log_dir: Path, project: str, name: str, config: dict[str, Any], resume: bool) -> None:
        wandb = import_wandb()
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / WANDB_ID_FILE
        run_id = (id_file.read_text().strip() or None) if resume and id_file.is_file() else None
        try:
            self.run = wandb.init(project=project, name=name, config=config, id=run_id,
                                  resume="allow" if run_id else None,
                                  dir=None if os.environ.get("WANDB_DIR") else str(log_dir))
        except Exception as e:  # no API key, no network, a project the account cannot write to
            raise RuntimeError(f"train.trackers=[wandb]: W&B could not start the run ({type(e).__name__}: {e}); log "
                               "in (`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on "
                               "disk and `wandb sync` it later") from e
        tmp = id_file.with_name(f".{id_file.name}.tmp")
        tmp.write_text(self.run.id + "\n")
        os.replace(tmp, id_file)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_trackers(names: Sequence[str], log_dir: Path, project: str, run_name: str, config: dict[str, Any],
                  resume: bool) -> list[Any]:
    """The experiment trackers ``train.trackers`` names (rank 0 only)."""
    trackers = []
    for name in names:
        if name == "wandb":
            trackers.append(WandbTracker(log_dir, project, run_name, config, resume))
        else:  # TrainArgs.validate refuses unknown names first
            raise ValueError(f"unknown tracker {name!r}")
    return trackers


def start_profiler(log_dir: Path, rank: int, device: torch.device, wait: int, warmup: int,
                   active: int) -> Any:
    """A started :class:`torch.profiler.profile` over one window (``wait`` skipped steps, ``warmup`` discarded,
    ``active`` recorded) that writes ``log_dir/rank<rank>.<time>.pt.trace.json`` (TensorBoard's profiler plugin,
    Perfetto, chrome://tracing) when the window ends; call ``.step()`` after every optimizer step and ``.stop()`` at
    the end (a window cut short by the end of training is written then)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(log_dir), worker_name=f"rank{rank}"),
                       record_shapes=True, profile_memory=True, with_stack=False)
    profiler.start()
    return profiler


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/logs/metrics.jsonl``."""
    path = Path(out_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
