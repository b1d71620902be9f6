"""The one training loop, on Lightning Fabric, for every fine-tuning method.

A :class:`Method` says which modules change and which parameters train (full, LoRA, adapter, ...);
:func:`fit` does everything else: precision and devices, data, gradient accumulation with the loss
normalised by the target tokens of the whole optimizer step, clipping, the schedule, validation, early
stopping, logging, atomic checkpoints and step-exact resume, and the final checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from litft.checkpoint import check_mergeable_chain, load_checkpoint, write_model_files
from litft.config import Config
from litft.methods import Method
from litft.peft.lora import check_trainable, count_parameters
from litft.train import checkpoint as ckpt
from litft.train.args import EvalArgs, TrainArgs, parse_duration
from litft.train.metrics import (RunLogger, flops_per_token, import_wandb, matmul_params, open_trackers, peak_flops,
                                 peak_memory, start_profiler)
from litft.train.schedule import build_optimizer, lr_at, resolve_optimizer
from litft.train.strategy import reports_distributed_failures

IGNORE_INDEX = -100
PRECISIONS = ("bf16-true", "bf16-mixed", "16-mixed", "32-true")
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "cuda", "mps")


class CausalLMLoss(nn.Module):
    """Wraps the model so one forward gives the summed cross-entropy over target tokens (labels != -100).

    Only the hidden states of target positions go through the head, so prompt and padding positions cost no
    logits memory; with ``loss_chunk_size`` the head and the cross-entropy run chunk by chunk
    (:mod:`litft.train.fused_loss`), so not even the target tokens' logits exist all at once. Wrapping (rather
    than calling ``model.head`` outside ``forward``) keeps autocast and distributed gradient hooks in effect for
    the whole computation. ``offload_activations`` moves what the forward saves for the backward to pinned CPU
    memory (``torch.autograd.graph.save_on_cpu``; CUDA only).
    """

    def __init__(self, model: nn.Module, loss_chunk_size: Optional[int] = None,
                 offload_activations: bool = False) -> None:
        super().__init__()
        self.model = model
        self.loss_chunk_size = loss_chunk_size
        self.offload_activations = offload_activations

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        offload = self.offload_activations and self.training and torch.is_grad_enabled()
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            hidden = self.model(input_ids, positions=positions, segment_ids=segment_ids, return_hidden=True)
            targets = labels != IGNORE_INDEX
            if self.loss_chunk_size is None:
                logits = self.model.head(hidden[targets])
                return F.cross_entropy(logits.float(), labels[targets], reduction="sum")
            from litft.train.fused_loss import linear_cross_entropy

            return linear_cross_entropy(hidden[targets], self.model.lm_head, labels[targets],
                                        self.model.config.final_logit_softcapping, self.loss_chunk_size,
                                        head_fn=self.model.head)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a micro-batch: segment ids > 0 when packed; else, per right-padded row, everything
    up to its last target (a sample ends with its trained EOS)."""
    if batch.get("segment_ids") is not None:
        return int((batch["segment_ids"] > 0).sum())
    labels = batch["labels"]
    T = labels.shape[1]
    is_target = labels != IGNORE_INDEX
    last = T - torch.flip(is_target, dims=[1]).int().argmax(dim=1)  # index after the last target
    return int(torch.where(is_target.any(dim=1), last, torch.zeros_like(last)).sum())


def forward_backward(
    loss_model: Callable[..., torch.Tensor], micro_batches: Sequence[dict[str, torch.Tensor]],
    backward: Callable[[torch.Tensor], None], n_targets: int, world_size: int = 1,
    no_sync: Callable[[bool], Any] = lambda accumulating: contextlib.nullcontext(),
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; returns the summed loss (a detached fp32 tensor on the
    model's device: reading it is the step's one device synchronisation).

    Each micro-batch's summed token loss is divided by ``n_targets``, the target tokens of the whole step
    (counted up front, over all devices), so the gradient is that of the mean token loss over the step,
    whatever the split into micro-batches. Data-parallel gradient averaging divides by the world size, which
    the factor ``world_size`` undoes.
    """
    total: Optional[torch.Tensor] = None
    scale = world_size / max(n_targets, 1)
    for i, batch in enumerate(micro_batches):
        with no_sync(i < len(micro_batches) - 1):
            loss_sum = loss_model(**batch)
            backward(loss_sum * scale)
        loss_sum = loss_sum.detach().float()
        total = loss_sum if total is None else total + loss_sum
    return torch.zeros(()) if total is None else total


def _selective_policy() -> Callable[..., Any]:
    """Selective activation checkpointing: save what matmuls and attention produce, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_mm")
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    if hasattr(torch.ops.higher_order, "flex_attention"):
        save.add(torch.ops.higher_order.flex_attention)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def enable_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> None:
    """Recompute block activations in the backward pass (``torch.utils.checkpoint``, non-reentrant): the whole
    block ("full") or all but the matmul and attention outputs ("selective"), in every ``every``-th block."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing mode {mode!r} is invalid: expected full or selective")
    policy = _selective_policy()

    def selective() -> Any:  # a plain function: what torch.compile can trace through checkpoint
        return create_selective_checkpoint_contexts(policy)

    def checkpointed(forward: Callable, *args: Any) -> torch.Tensor:
        if mode == "selective":
            return checkpoint(forward, *args, use_reentrant=False, context_fn=selective)
        return checkpoint(forward, *args, use_reentrant=False)

    for i, block in enumerate(model.blocks):
        if i % every == 0:
            block.forward = functools.partial(checkpointed, block.forward)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block's forward (after activation checkpointing, which compiles along with it)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def resolve_attention(attention: str, device: torch.device) -> str:
    """The attention backend ("sdpa" or "flex") for ``train.attention`` on ``device``; a clear error when flex
    cannot train there."""
    from litft.attention import flex_available

    if attention == "auto":
        return "flex" if device.type == "cuda" and flex_available() is None else "sdpa"
    if attention == "flex":
        reason = flex_available()
        if device.type != "cuda":
            reason = (f"PyTorch's FlexAttention has no backward pass on {device.type} (torch {torch.__version__}); "
                      "it trains on CUDA only")
        if reason is not None:
            raise ValueError(f"train.attention='flex' cannot train here: {reason}. Use train.attention=sdpa (or auto)")
    return attention


def prepare_training(model: nn.Module, train: TrainArgs, device: torch.device) -> CausalLMLoss:
    """Apply the speed and memory switches of ``train`` to ``model`` (after the method prepared it) and wrap it in
    the loss: the attention backend, activation checkpointing, ``torch.compile`` of the blocks, activation
    offloading and the fused loss. Raises ValueError for a switch the device cannot honour."""
    if train.activation_offloading and device.type != "cuda":
        raise ValueError(f"train.activation_offloading=true needs a CUDA device (it moves activations from GPU to CPU "
                         f"memory); this run is on {device.type}")
    model.attention_backend = resolve_attention(train.attention, device)
    mode = train.checkpointing_mode()
    if mode != "none":
        enable_activation_checkpointing(model, mode, train.activation_checkpointing_every)
    if train.compile:
        compile_blocks(model)
    return CausalLMLoss(model, train.loss_chunk_size if train.fused_loss else None,
                        offload_activations=train.activation_offloading)


# ------------------------------------------------------------------------------------------ validation of inputs


def resolve_precision(precision: Optional[str], accelerator: str) -> str:
    cuda = torch.cuda.is_available() and accelerator in ("auto", "cuda")
    if precision is None:
        return "bf16-true" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: expected one of {', '.join(PRECISIONS)}")
    if precision == "16-mixed" and not cuda:
        raise ValueError("precision='16-mixed' needs a CUDA GPU (float16 autocast); on this machine use "
                         "'bf16-mixed', 'bf16-true' or '32-true'")
    return precision


def check_devices(devices: Union[int, str], num_nodes: int, strategy: str, accelerator: str) -> None:
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is invalid: expected one of {', '.join(ACCELERATORS)}")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("accelerator='cuda' but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid: expected one of {', '.join(STRATEGIES)}")
    ok = (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)) or (
        isinstance(devices, str) and (devices == "auto" or all(p.strip().isdigit() for p in devices.split(",")
                                                                if p.strip()) and devices.strip(", ")))
    if not ok:
        raise ValueError(f"devices={devices!r} is invalid: expected a count >= 1, -1 or 'auto' (all), or device ids "
                         "like '0,1'")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes!r} is invalid: expected an integer >= 1")


def _dtype_of(precision: str) -> torch.dtype:
    return {"bf16-true": torch.bfloat16}.get(precision, torch.float32)


def resolve_resume(resume: Union[bool, str, Path], out_dir: Path, overwrite: bool) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run (refusing to mix a fresh run into an old one)."""
    if isinstance(resume, str) and resume.lower() in ("false", "no", "0", ""):
        resume = False
    if resume is True or (isinstance(resume, str) and resume == "auto"):
        if overwrite:
            raise ValueError("resume='auto' and overwrite=true contradict each other: pick one")
        return ckpt.latest_checkpoint(out_dir)
    if resume is False:
        existing = [n for n in (ckpt.RUN_FILE, ckpt.CHECKPOINTS, ckpt.FINAL, ckpt.LOGS) if (out_dir / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"out_dir {str(out_dir)!r} already holds a run ({', '.join(existing)}): pass --resume auto to "
                "continue it, --overwrite true to replace it, or choose another --out_dir"
            )
        return None
    path = Path(resume)
    if not (path / ckpt.STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={str(resume)!r}: not a training checkpoint (expected a directory holding "
                                f"{ckpt.STATE_FILE}, e.g. {out_dir / ckpt.CHECKPOINTS}/step-N), or use 'auto'/false")
    return path


def _is_rank_zero(fabric: Any) -> bool:
    return fabric.global_rank == 0


def _fabric(accelerator: str, devices: Union[int, str], num_nodes: int, strategy: str, precision: str,
            sharding: str = "full_shard", timeout: Union[float, str, None] = None) -> Any:
    import warnings

    from litft.train.strategy import build_strategy, cluster_environment

    import lightning as L

    # Lightning warns on every machine with Slurm installed that srun is "not used": not actionable here
    warnings.filterwarnings("ignore", message="The `srun` command is available")

    try:
        return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        strategy=build_strategy(strategy, devices, num_nodes, sharding, timeout),
                        precision=precision, plugins=[cluster_environment()])
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot set up accelerator={accelerator!r} devices={devices!r} num_nodes={num_nodes} "
                         f"strategy={strategy!r} precision={precision!r}: {e}") from e


# ------------------------------------------------------------------------------------------ the loop


class _MicroBatches:
    """An endless stream of micro-batches over epochs, whose position is the data iterator's state.

    Every rank walks the same global stream; ``take(n)`` consumes ``n * world_size`` micro-batches and keeps this
    rank's every ``world_size``-th one, so a step trains on the same samples on 1 or N devices.
    """

    def __init__(self, batches: Any, rank: int = 0, world_size: int = 1) -> None:
        self.batches = batches
        self.rank, self.world_size = rank, world_size
        self._it: Optional[Iterator] = None

    def take(self, n: int) -> list[dict[str, torch.Tensor]]:
        return self._take(n * self.world_size)[self.rank::self.world_size]

    def _take(self, n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        while len(out) < n:
            if self._it is None:
                self._it = iter(self.batches)
            try:
                out.append(next(self._it))
            except StopIteration:
                self._it = None
        return out


@reports_distributed_failures  # a timed-out collective or a dead rank: a clear error, no rank left waiting
def fit(
    method: Method,
    checkpoint_dir: Path,
    out_dir: Path,
    data: Any,
    train: TrainArgs,
    eval: EvalArgs,
    precision: Optional[str] = None,
    devices: Union[int, str] = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "auto",
    optimizer: Union[str, dict] = "AdamW",
    resume: Union[bool, str, Path] = False,
    overwrite: bool = False,
    run_config: Optional[dict[str, Any]] = None,
) -> Path:
    """Fine-tune the checkpoint in ``checkpoint_dir`` with ``method``; returns ``out_dir/final``.

    Every input is checked (and the data and model loaded) before anything is written to ``out_dir``.
    ``run_config`` is written to ``out_dir/run.yaml`` with the resolved values filled in.
    """
    from litft.asset_cards import resolve_checkpoint

    checkpoint_dir, out_dir = resolve_checkpoint(checkpoint_dir), Path(out_dir)  # a folder or an asset card's name
    # ---- checks that need nothing loaded
    train.validate()
    eval.validate()
    check_devices(devices, num_nodes, strategy, accelerator)
    precision = resolve_precision(precision, accelerator)
    max_time = parse_duration(train.max_time)
    resolve_optimizer(optimizer)
    if "wandb" in train.trackers:
        import_wandb()  # a missing extra fails before anything is loaded
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint_dir {str(checkpoint_dir)!r} does not exist (download or convert a "
                                "model first: litft download <repo_id>)")
    config = Config.from_checkpoint(checkpoint_dir)
    if method.full:
        check_mergeable_chain(checkpoint_dir, "finetune full")
    context = config.block_size - method.virtual_tokens
    max_seq_length = train.max_seq_length or context
    if max_seq_length > context:
        virtual = f" less the {method.virtual_tokens} virtual tokens of prompt tuning" if method.virtual_tokens else ""
        raise ValueError(f"train.max_seq_length={max_seq_length} is larger than the model's context: "
                         f"block_size={config.block_size} in {checkpoint_dir / 'model_config.yaml'}{virtual}")
    resume_from = resolve_resume(resume, out_dir, overwrite)
    if (resume is True or resume == "auto") and (out_dir / ckpt.FINAL).is_dir():
        print(f"{out_dir} holds a finished run (final/): nothing to resume. Pass --resume <a checkpoints/step-N "
              "directory> to continue from a checkpoint, or --overwrite true to train again.", file=sys.stderr)
        return out_dir / ckpt.FINAL

    from litft.train import strategy as dist

    devices = dist.resolve_devices(devices, num_nodes, accelerator)
    dist.check_strategy(strategy, train.sharding, num_nodes, method.name, quantized=method.quantized)
    if strategy == "fsdp" and eval.generate_samples:
        raise ValueError("eval.generate_samples is not supported with strategy='fsdp' (generation needs the whole "
                         "model on one device): set it to 0, or generate from final/ after training")
    fabric = _fabric(accelerator, devices, num_nodes, strategy, precision, train.sharding, train.timeout)
    dist.launch(fabric, train.timeout)  # fabric.launch(), then train.timeout for the collectives
    fsdp = dist.is_fsdp(fabric)
    rank_zero = _is_rank_zero(fabric)
    world_size = fabric.world_size
    accumulation = train.accumulation_steps(world_size)
    _seed(train.seed)  # every rank initialises new weights (LoRA, adapter) identically

    # ---- data (bad rows, empty files, missing chat templates fail here, before any write)
    from litft.data import BatchIterator, load_datasets
    from litft.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    train_samples, val_samples, stats = load_datasets(data, tokenizer, max_seq_length)
    if rank_zero:
        print(stats.summary(), file=sys.stderr)
    if world_size > 1:  # training: every rank batches all samples and takes its share of each step (_MicroBatches)
        val_samples = val_samples[fabric.global_rank::world_size]
    pad_id = 0
    batches = BatchIterator(train_samples, train.micro_batch_size, max_seq_length, pad_id,
                            packing=data.packing, shuffle=True, seed=data.seed)
    val_batches = (BatchIterator(val_samples, train.micro_batch_size, max_seq_length, pad_id,
                                 packing=data.packing, shuffle=False, seed=data.seed) if val_samples else None)
    total_steps = train.max_steps or math.ceil(train.epochs * len(batches) / (accumulation * world_size))
    from litft.train.controllers import Controllers, check_controllers_fit

    check_controllers_fit(train.controllers, train.max_norm, eval.interval, val_batches is not None)
    controllers = Controllers(train.controllers)

    # ---- model and method
    dtype = _dtype_of(precision)
    state = None
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        if state.get("method") != method.name:
            raise ValueError(f"{resume_from} was written by a {state.get('method')!r} run, not {method.name!r}")
    if train.profile:
        done = int(state["step"]) if state is not None else 0
        what = (f"train.max_steps={train.max_steps}" if train.max_steps else
                f"{total_steps} steps for train.epochs={train.epochs}") + (f", resumed at step {done}" if done else "")
        train.check_profile_window(total_steps - done, what)
    sharded = resume_from is not None and (resume_from / ckpt.SHARDED).is_dir()
    if sharded and not fsdp:
        raise ValueError(f"{resume_from} is a sharded (FSDP) checkpoint: resume it with --strategy fsdp (any number "
                         "of devices)")
    weights_dir = resume_from if (resume_from is not None and method.full and not sharded) else checkpoint_dir
    model = load_checkpoint(weights_dir, device=fabric.device, dtype=dtype)
    method.prepare(model)
    dist.check_strategy(strategy, train.sharding, num_nodes, method.name, quantized=dist.is_quantized(model))
    if resume_from is not None and not method.full and not sharded:
        method.load(model, resume_from)
    n_trainable = check_trainable(model, method.name)
    n_params = count_parameters(model)
    loss_model = fabric.setup_module(prepare_training(model, train, fabric.device))
    opt = build_optimizer(optimizer, model, train.lr, train.weight_decay, fused=train.fused_optimizer,
                          device=fabric.device)
    opt = fabric.setup_optimizers(opt)

    base_dir = None if method.full else checkpoint_dir
    save_weights = method.save

    step, micro_done, tokens_total, elapsed_before = 0, 0, 0, 0.0
    best_val, bad_evals = math.inf, 0
    if state is not None:
        if sharded:
            dist.load_sharded(resume_from / ckpt.SHARDED, loss_model, opt)
        else:
            opt.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        step, micro_done = int(state["step"]), int(state["micro_batches"])
        tokens_total, elapsed_before = int(state["tokens"]), float(state["elapsed"])
        best_val, bad_evals = float(state["best_val"]), int(state["bad_evals"])
        if controllers and not controllers.load_state_dict(state.get("controllers")) and rank_zero:
            print(f"note: {resume_from} was written with other train.controllers: their counts start afresh",
                  file=sys.stderr)

    # ---- first writes: out_dir only now
    if rank_zero:
        if resume_from is None and overwrite:
            for name in (ckpt.RUN_FILE, ckpt.CHECKPOINTS, ckpt.FINAL, ckpt.LOGS):
                target = out_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temp_dirs(out_dir)
        resolved = dict(run_config or {})
        if "checkpoint_dir" in resolved:  # the folder an asset-card name stood for: run.yaml reproduces the run
            resolved["checkpoint_dir"] = str(checkpoint_dir.resolve())
        resolved["precision"] = precision
        if isinstance(resolved.get("train"), dict):
            resolved["train"]["max_seq_length"] = max_seq_length
        _write_yaml_atomic(out_dir / ckpt.RUN_FILE, resolved)
    try:
        trackers = open_trackers(train.trackers, out_dir / ckpt.LOGS, train.wandb_project,
                                 train.wandb_run_name or out_dir.resolve().name, resolved,
                                 resume=state is not None) if rank_zero else []
    except BaseException:
        if state is None:  # a fresh run leaves no run behind (only run.yaml and logs/ were written)
            (out_dir / ckpt.RUN_FILE).unlink(missing_ok=True)
            shutil.rmtree(out_dir / ckpt.LOGS, ignore_errors=True)
        raise
    logger = RunLogger(out_dir / ckpt.LOGS, enabled=rank_zero, resume_step=step if state is not None else None,
                       trackers=trackers)
    if rank_zero:
        where = f"resuming from {resume_from} at step {step}" if state else "starting"
        print(f"{method.name}: {n_trainable:,} of {n_params:,} parameters train ({100 * n_trainable / n_params:.2f}%); "
              f"{where}; {total_steps} steps of {train.global_batch_size} samples ({accumulation} micro-batches of "
              f"{train.micro_batch_size} per device); precision {precision}; device {fabric.device}", file=sys.stderr)

    n_matmul = matmul_params(model)
    compute_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0], torch.float32)
    peak = peak_flops(fabric.device, compute_dtype, train.peak_tflops)

    def validate() -> Optional[float]:
        if val_batches is None:
            return None
        loss_model.eval()
        loss_sum = torch.zeros((), device=fabric.device)
        n = torch.zeros((), device=fabric.device)
        with torch.no_grad():
            for i, batch in enumerate(val_batches.batch(0, k) for k in range(len(val_batches))):
                if eval.max_batches is not None and i >= eval.max_batches:
                    break
                batch = {k: v.to(fabric.device) for k, v in batch.items()}
                loss_sum += loss_model(**batch).float()
                n += count_targets(batch)
        loss_model.train()
        loss_sum, n = fabric.all_reduce(loss_sum, reduce_op="sum"), fabric.all_reduce(n, reduce_op="sum")
        return float(loss_sum / n.clamp_min(1))

    def generations(when: str) -> Optional[float]:
        if not eval.generate_samples or not val_samples:
            return None
        accuracy = None
        if rank_zero:
            accuracy = exact_match(model, tokenizer, val_samples[: eval.generate_samples], eval.max_new_tokens,
                                   when, show=3)
            logger.log({f"accuracy_{when}": accuracy}, step)
        fabric.barrier()
        return accuracy

    def save(at_step: int) -> None:
        staging = None
        if fsdp:
            staging = out_dir / ckpt.CHECKPOINTS / f".step-{at_step}.tmp-sharded"
            if rank_zero and staging.exists():
                shutil.rmtree(staging)
            fabric.barrier()
            # trainable weights + optimizer state (full fine-tuning: also the layers freeze_layers froze)
            dist.save_sharded(staging, loss_model, opt, include_frozen=method.full)
            fabric.barrier()
        if rank_zero:
            train_state = {
                "format": 1, "method": method.name, "step": at_step, "micro_batches": micro_done,
                "tokens": tokens_total, "elapsed": elapsed_before + (time.perf_counter() - t0),
                "optimizer": {} if fsdp else opt.state_dict(),
                "scheduler": {"step": at_step, "total_steps": total_steps},
                "rng": ckpt.rng_state(), "data": batches.state_dict(), "best_val": best_val, "bad_evals": bad_evals,
                "world_size": world_size, "controllers": controllers.state_dict(),
            }
            ckpt.save_training_checkpoint(out_dir, at_step, model, (lambda m, d: None) if fsdp else save_weights,
                                          checkpoint_dir, base_dir, method.name, train_state, train.keep_last,
                                          sharded=staging)
        fabric.barrier()

    model.train()
    loss_model.train()
    if state is None:
        _seed(train.seed + fabric.global_rank)
        generations("before")
        if eval.initial_validation:
            val = validate()
            if val is not None and rank_zero:
                logger.log({"val_loss": val, "val_ppl": math.exp(min(val, 50))}, 0)
                print(f"step 0: val_loss {val:.4f}", file=sys.stderr)
    else:
        ckpt.set_rng_state(state["rng"])  # last: nothing may draw random numbers between here and the first step

    stream = _MicroBatches(batches, fabric.global_rank, world_size)
    budget = None if train.max_steps else train.epochs * len(batches)  # global micro-batches the epochs allow
    progress = _progress(total_steps, step, rank_zero)
    stop_reason = "max_steps" if train.max_steps else "epochs"
    t0 = time.perf_counter()
    window_tokens, window_flops, window_t0 = 0, 0.0, time.perf_counter()
    last_val = None
    profile_dir = out_dir / ckpt.LOGS / "profile"
    profiler = start_profiler(profile_dir, fabric.global_rank, fabric.device, train.profile_wait,
                              train.profile_warmup, train.profile_active) if train.profile else None
    try:
        while step < total_steps:
            n_micro = accumulation if budget is None else min(accumulation, (budget - micro_done) // world_size)
            dist.test_hook(fabric.global_rank, step + 1)
            if n_micro <= 0:
                break
            lr = lr_at(step, total_steps, train.lr, train.min_lr, train.warmup_steps, train.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            micro_before = micro_done
            micro = stream.take(n_micro)  # counted on the CPU, before the copy to the device (no device syncs)
            n_targets = sum(count_targets(b) for b in micro)
            tokens = [count_tokens(b) for b in micro]
            n_tokens = sum(tokens)
            n_flops = sum(n * flops_per_token(config, n_matmul, n_trainable, b["input_ids"].shape[1], method.full)
                          for n, b in zip(tokens, micro))
            micro = [{k: v.to(fabric.device, non_blocking=True) for k, v in b.items()} for b in micro]
            if world_size > 1:
                counts = fabric.all_reduce(torch.tensor([n_targets, n_tokens, int(n_flops)], device=fabric.device),
                                           reduce_op="sum")
                n_targets, n_tokens, n_flops = int(counts[0]), int(counts[1]), int(counts[2])
            loss_sum = forward_backward(
                loss_model, micro, fabric.backward, n_targets, world_size,
                no_sync=lambda accumulating: fabric.no_backward_sync(loss_model, enabled=accumulating),
            )
            if world_size > 1:
                loss_sum = fabric.all_reduce(loss_sum.to(fabric.device), reduce_op="sum")
            loss = float(loss_sum) / max(n_targets, 1)
            if not math.isfinite(loss):
                raise RuntimeError(
                    f"the training loss is {loss} at step {step + 1} (lr {lr:.3g}): stopping. Lower train.lr, keep "
                    "train.max_norm set, or use precision bf16-mixed/32-true; the last good checkpoint is in "
                    f"{out_dir / ckpt.CHECKPOINTS}"
                )
            grad_norm = None
            if train.max_norm is not None:
                grad_norm = fabric.clip_gradients(loss_model, opt, max_norm=train.max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if grad_norm is not None:
                grad_norm = float(grad_norm)  # read after the step is queued: no extra wait
            step += 1
            micro_done += n_micro * world_size
            tokens_total += n_tokens
            window_tokens += n_tokens
            window_flops += n_flops

            if step % train.log_interval == 0 or step == total_steps:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t0, 1e-9)
                flops_s = window_flops / max(now - window_t0, 1e-9)
                window_tokens, window_flops, window_t0 = 0, 0.0, now
                mem_kind, mem = peak_memory(fabric.device)
                metrics = {"loss": loss, "lr": lr, "tokens_per_s": tok_s, "tokens": tokens_total,
                           "epoch": micro_done / len(batches), f"peak_memory_{mem_kind}_gb": mem}
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                metrics["model_tflops"] = flops_s / world_size / 1e12  # per device; see metrics.flops_per_token
                if peak is not None:
                    metrics["mfu"] = flops_s / (peak * world_size)
                logger.log(metrics, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                         mfu=f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a")
            if progress is not None:
                progress.update(1)
            if profiler is not None:
                profiler.step()

            stop_early = False
            fired = controllers.on_step({"step": step, "epoch": micro_done / len(batches), "lr": lr, "loss": loss,
                                         "grad_norm": grad_norm, "tokens": tokens_total}) if controllers else []
            if controllers and micro_done // len(batches) > micro_before // len(batches):
                fired += controllers.on_epoch_end()
            if eval.interval and step % eval.interval == 0 and step < total_steps:
                last_val = validate()
                fired += controllers.on_eval(last_val) if controllers else []
                if last_val is not None:
                    if rank_zero:
                        logger.log({"val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))}, step)
                        _write(progress, f"step {step}: val_loss {last_val:.4f}")
                    if last_val < best_val - eval.early_stopping_min_delta:
                        best_val, bad_evals = last_val, 0
                    else:
                        bad_evals += 1
                        if eval.early_stopping_patience and bad_evals >= eval.early_stopping_patience:
                            stop_early, stop_reason = True, (
                                f"early stopping: no validation improvement in {bad_evals} evaluations "
                                f"(best {best_val:.4f})")
            elapsed = elapsed_before + time.perf_counter() - t0
            out_of_time = max_time is not None and elapsed >= max_time
            if out_of_time:
                stop_reason = f"max_time ({train.max_time}) reached"
            for index, action in fired:
                if rank_zero:
                    _write(progress, f"step {step}: {controllers.describe(index)}: {action}")
                if action == "stop" and not stop_early:
                    stop_early, stop_reason = True, controllers.describe(index)
            saving = bool(train.save_interval) and step % train.save_interval == 0
            if (saving or any(action == "save" for _, action in fired)) and step < total_steps:
                save(step)
            if stop_early or out_of_time:
                break
    except BaseException:
        logger.close(failed=True)
        raise
    finally:
        if progress is not None:
            progress.close()
        if profiler is not None:
            profiler.stop()  # writes the trace if the window was cut short
    if profiler is not None and rank_zero:
        print(f"profiler trace(s), one per process: {profile_dir}/rank<N>.*.pt.trace.json (open them in "
              "TensorBoard's profiler plugin, https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)

    # ---- the end: validation, generations, final/
    final_val = validate() if eval.final_validation else None
    if final_val is not None and rank_zero:
        logger.log({"val_loss": final_val, "val_ppl": math.exp(min(final_val, 50))}, step)
    generations("after")
    final_dir = out_dir / ckpt.FINAL
    final_model = model
    if fsdp:
        full = dist.full_state_dict(model)
        final_model = dist.plain_model(model.config, method.prepare, full) if rank_zero else None
    if rank_zero:
        with _atomic_overwrite(final_dir) as tmp:
            write_model_files(final_model, tmp, save_weights, checkpoint_dir, base_dir, method.name)
            if method.finalize is not None:
                method.finalize(final_model, tmp)
        mem_kind, mem = peak_memory(fabric.device)
        elapsed = elapsed_before + time.perf_counter() - t0
        summary = {"final_step": step, "stop_reason": stop_reason, "train_time_s": elapsed, "tokens": tokens_total,
                   f"peak_memory_{mem_kind}_gb": mem}
        if final_val is not None:
            summary["final_val_loss"] = final_val
        logger.log(summary, step)
        _plot_losses(out_dir)
        print(f"done after step {step} ({stop_reason}); " + (f"val_loss {final_val:.4f}; " if final_val is not None
                                                                else "")
              + f"{tokens_total:,} tokens in {elapsed:.0f}s; peak memory ({mem_kind}) {mem:.2f} GB; "
              f"MFU {'n/a' if peak is None else 'in logs/metrics.jsonl'}\nfinal checkpoint: {final_dir}",
              file=sys.stderr)
    logger.close()
    fabric.barrier()
    return final_dir


@contextlib.contextmanager
def _atomic_overwrite(target: Path) -> Iterator[Path]:
    from litft.weights import atomic_directory

    with atomic_directory(target, overwrite=True) as tmp:
        yield tmp


def _plot_losses(out_dir: Path) -> None:
    """``out_dir/logs/loss.png`` (:mod:`litft.plot`) when matplotlib is installed; a failure to plot is one line on
    stderr, never a failed run."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return
    try:
        from litft.plot import plot

        with contextlib.redirect_stdout(sys.stderr):
            plot(out_dir)
    except Exception as e:  # the run itself has succeeded: final/ and the logs are written
        print(f"could not plot {out_dir / ckpt.LOGS / 'loss.png'}: {type(e).__name__}: {e}", file=sys.stderr)


def _seed(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def _write_yaml_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    tty = sys.stderr.isatty()  # in a log file, a line every 30 s rather than a stream of carriage returns
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if tty else 30.0)


def _write(progress: Any, text: str) -> None:
    if progress is not None:
        progress.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr)


# ------------------------------------------------------------------------------------------ exact match


def prompt_and_reference(sample: Any) -> tuple[list[int], list[int]]:
    """Split a sample at its first trained token: the prompt ids (everything the model reads before it) and the
    reference response ids (the first run of trained tokens)."""
    labels = sample.labels
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return list(sample.input_ids[: start + 1]), list(labels[start:end])


def exact_match(model: nn.Module, tokenizer: Any, samples: Sequence[Any], max_new_tokens: Optional[int],
                when: str = "", show: int = 3) -> float:
    """Greedy-generate the response of each sample and return the fraction equal to the reference (text
    compared after stripping whitespace); prints the accuracy and the first ``show`` generations."""
    from litft.generate.engine import Engine
    from litft.generate.sampling import SamplingParams

    stop_ids = set(getattr(tokenizer, "stop_ids", None) or ()) | {tokenizer.eos_id}
    pairs = [prompt_and_reference(s) for s in samples]
    refs = [[t for t in ref if t not in stop_ids] for _, ref in pairs]
    longest = max(len(r) for _, r in pairs)
    was_training = model.training
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens or longest + 8, temperature=0.0)
    try:
        with torch.no_grad():
            results = engine.generate([p for p, _ in pairs], params)
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    correct = 0
    lines = []
    for i, ((prompt, _), ref, result) in enumerate(zip(pairs, refs, results)):
        got = tokenizer.decode(list(result.tokens)).strip()
        want = tokenizer.decode(ref).strip()
        correct += got == want
        if i < show:
            prompt_text = tokenizer.decode(prompt, skip_special_tokens=True).strip()
            lines.append(f"  prompt:    {prompt_text!r}\n  generated: {got!r}\n  reference: {want!r}"
                         f"  {'✓' if got == want else '✗'}")
    accuracy = correct / len(samples)
    label = f" {when} training" if when else ""
    print(f"exact match{label}: {accuracy:.1%} ({correct}/{len(samples)} validation samples)", file=sys.stderr)
    if lines:
        print("\n".join(lines), file=sys.stderr)
    return accuracy
