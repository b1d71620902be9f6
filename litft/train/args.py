"""The training settings shared by every fine-tuning method: ``--train.*`` and ``--eval.*`` on the CLI and in YAML."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from litft.train.controllers import Controller, validate_controllers

TRACKERS = ("wandb",)


@dataclass
class TrainArgs:
    """How the optimisation runs, when it stops and when it saves.

    Args:
        global_batch_size: Samples (or packed rows) per optimizer step; ``global_batch_size / (micro_batch_size *
            devices * num_nodes)`` micro-batches are accumulated per step. A resumed run keeps its checkpoint's.
        micro_batch_size: Samples (or packed rows) per forward/backward pass on one device.
        max_seq_length: Longest sample in tokens (longer ones are truncated and counted); None = the model's context.
        epochs: Passes over the training data (used when ``max_steps`` is not set).
        max_steps: Optimizer steps to run; overrides ``epochs``.
        max_time: Stop after this much training time: seconds, "90s", "30m", "2h" or "HH:MM:SS" (a resumed run
            counts the time of the runs before it).
        lr: Peak learning rate.
        min_lr: Learning rate at the end of the cosine decay.
        warmup_steps: Steps of linear warmup from 0 to ``lr``.
        lr_schedule: "cosine" (warmup, then cosine decay to ``min_lr`` at the end) or "constant" (warmup, then
            ``lr``).
        weight_decay: Decoupled weight decay (AdamW) applied to matrices; biases, norms and embeddings get none.
        max_norm: Clip the gradient norm to this value (None = no clipping). A non-finite (NaN/inf) gradient norm
            stops the run, naming the step and the last finite checkpoint (the step is not skipped).
        seed: Seed for initialisation of new weights, dropout and the data order.
        activation_checkpointing: Trade compute for activation memory. "full" (or true): keep only each block's
            input and recompute the whole block in the backward pass (least memory, about 30% more compute).
            "selective": keep the outputs of the matmuls and of attention, recompute only the elementwise
            operations (norms, RoPE, activations): part of the saving at a fraction of the recompute (on a GPU;
            with a tiny model on a CPU its per-operator bookkeeping costs more than it saves). "none" (or
            false): keep everything.
        activation_checkpointing_every: With ``activation_checkpointing``, apply it to every N-th block only
            (1 = all blocks, 2 = every other block: half the saving, half the recompute).
        activation_offloading: Move the activations saved for the backward pass to pinned CPU memory during the
            forward and back during the backward (``torch.autograd.graph.save_on_cpu``): GPU memory for long
            sequences at the cost of PCIe traffic. CUDA only (refused on CPU, where there is nothing to offload to).
        fused_loss: Compute the LM head and the cross-entropy ``loss_chunk_size`` target tokens at a time, with
            the gradients computed in the same pass, so the fp32 logits of the whole batch never exist (Llama-3
            vocabulary at 4 x 2048 tokens: ~10 GB less at the peak). Exact up to float rounding; false = one plain
            ``cross_entropy`` over all target tokens.
        loss_chunk_size: Target tokens per chunk of ``fused_loss``.
        attention: "sdpa": ``scaled_dot_product_attention`` (packed rows and sliding windows with a dense
            (B, 1, T, T) boolean mask). "flex": FlexAttention with a block mask built from the packing segment ids
            and the sliding window: no dense mask, and the tiles no query sees are skipped (CUDA only: PyTorch has
            no FlexAttention backward on CPU; needs torch >= 2.6). "auto": flex on CUDA (for packed batches,
            sliding windows and attention softcapping), sdpa elsewhere. Plain causal batches always use SDPA's
            fused causal kernel. The default is sdpa until the FlexAttention path has been measured on a GPU
            (bench/gpu_all.sh); choose flex or auto for long packed rows on CUDA.
        compile: ``torch.compile`` every transformer block (the loss and the optimizer stay eager): fused kernels
            and less activation memory; the first steps are slower while it compiles (and recompiles once for
            varying sequence lengths).
        fused_optimizer: Use the optimizer's fused implementation (one kernel over all parameters instead of a
            loop over them; torch has one for AdamW, Adam, SGD and Adagrad): None = on CUDA and CPU when the
            optimizer has one; true = always (refused for an optimizer without one); false = never.
        peak_tflops: The device's peak dense TFLOP/s for the training precision, the denominator of the logged MFU
            (model FLOPs utilisation). None = the datasheet figure for known NVIDIA GPUs (MFU is not logged on
            other devices unless this is given). Pass a measured matmul peak to compare with figures measured that
            way (e.g. 771 for the H100 SXM of bench/RESULTS.md's anchors).
        log_interval: Log loss, learning rate and throughput every N optimizer steps.
        save_interval: Save a resumable checkpoint to ``out_dir/checkpoints/step-N`` every N steps (None = only
            ``final/``).
        keep_last: How many of the newest ``checkpoints/step-N`` to keep (None = all).
        sharding: With ``--strategy fsdp``: "full_shard" (parameters, gradients, optimizer state), "shard_grad_op"
            (gradients and optimizer state; parameters stay gathered from forward to backward), "hybrid_shard"
            (shard within a node, replicate across nodes) or "no_shard" (replicate, like DDP).
        timeout: How long a collective (all-reduce, barrier) waits for the other processes before the run stops
            with an error, e.g. when a rank died: seconds, "90s", "30m", "HH:MM:SS".
        profile: Record a window of optimizer steps with the PyTorch profiler (CPU and CUDA operators, shapes,
            memory) and write one trace per process to ``out_dir/logs/profile/rank<N>.<time>.pt.trace.json``: open it
            in TensorBoard's profiler plugin (``tensorboard --logdir out_dir/logs`` with torch-tb-profiler), in
            https://ui.perfetto.dev or in chrome://tracing. The window: skip ``profile_wait`` steps, trace
            ``profile_warmup`` steps without keeping them, then keep ``profile_active`` steps (counted from the
            first step this run trains; it must fit in the steps the run trains). Model FLOPs are not counted by the
            profiler: they are logged every step as ``model_tflops`` (and ``mfu``) in ``logs/metrics.jsonl``.
        profile_wait: Steps the profiler skips before its warm-up.
        profile_warmup: Steps the profiler traces but discards (the first steps it sees carry its own overhead).
        profile_active: Steps the profiler records into the trace.
        trackers: Experiment trackers the metrics also go to, besides ``logs/metrics.jsonl`` and TensorBoard
            (always written): ``[wandb]`` = Weights & Biases (needs the ``wandb`` extra and ``wandb login``, or
            WANDB_MODE=offline to keep the run on disk and ``wandb sync`` it later). The run's settings (run.yaml)
            become the W&B run config; a resumed run continues the same W&B run.
        wandb_project: The W&B project the run is logged to (WANDB_ENTITY chooses the team; WANDB_DIR the
            folder of W&B's files, by default ``out_dir/logs``).
        wandb_run_name: The W&B run's name (None = the name of ``out_dir``).
        controllers: Rules over the training metrics that stop the run or save a checkpoint when they hold
            (fms-hf-tuning's trainer controllers), each ``{rule, when, patience, action}``, e.g.
            ``[{rule: "loss > prev_loss", patience: 3}]`` = stop when the loss went up 3 steps in a row. See
            ``--train.controllers.help`` and the README section "Stopping or saving on a rule".
    """

    global_batch_size: int = 16
    micro_batch_size: int = 1
    max_seq_length: Optional[int] = None
    epochs: int = 1
    max_steps: Optional[int] = None
    max_time: Optional[Union[float, str]] = None
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_norm: Optional[float] = 1.0
    seed: int = 42
    activation_checkpointing: Union[bool, Literal["none", "full", "selective"]] = False
    activation_checkpointing_every: int = 1
    activation_offloading: bool = False
    fused_loss: bool = True
    loss_chunk_size: int = 1024
    attention: Literal["auto", "sdpa", "flex"] = "sdpa"
    compile: bool = False
    fused_optimizer: Optional[bool] = None
    peak_tflops: Optional[float] = None
    log_interval: int = 1
    save_interval: Optional[int] = None
    keep_last: Optional[int] = 2
    sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = "full_shard"
    timeout: Union[float, str] = "30m"
    profile: bool = False
    profile_wait: int = 1
    profile_warmup: int = 2
    profile_active: int = 3
    trackers: list[Literal["wandb"]] = field(default_factory=list)
    wandb_project: str = "litft"
    wandb_run_name: Optional[str] = None
    controllers: list[Controller] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        positive = {"global_batch_size": self.global_batch_size, "micro_batch_size": self.micro_batch_size,
                    "epochs": self.epochs, "log_interval": self.log_interval, "loss_chunk_size": self.loss_chunk_size,
                    "activation_checkpointing_every": self.activation_checkpointing_every}
        optional_positive = {"max_seq_length": self.max_seq_length, "max_steps": self.max_steps,
                             "save_interval": self.save_interval, "keep_last": self.keep_last}
        for name, value in {**positive, **optional_positive}.items():
            if value is None and name in optional_positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name}={value!r} is invalid: expected an integer >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                             f"train.micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0:
            raise ValueError(f"train.lr={self.lr} is invalid: expected a number > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is invalid: expected 0 <= min_lr <= lr ({self.lr})")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} is invalid: expected an integer >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay={self.weight_decay} is invalid: expected a number >= 0")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError(f"train.max_norm={self.max_norm} is invalid: expected a number > 0 (or null = no "
                             "clipping)")
        parse_duration(self.max_time)
        self.checkpointing_mode()
        if self.attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"train.attention={self.attention!r} is invalid: expected auto, sdpa or flex")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"train.peak_tflops={self.peak_tflops} is invalid: expected a number > 0 (or null)")
        if self.sharding not in ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard"):
            raise ValueError(f"train.sharding={self.sharding!r} is invalid: expected full_shard, shard_grad_op, "
                             "hybrid_shard or no_shard")
        try:
            parse_duration(self.timeout)
        except ValueError:
            raise ValueError(f"train.timeout={self.timeout!r} is invalid: expected seconds, '90s', '30m' or "
                             "'HH:MM:SS'") from None
        for name in ("profile_wait", "profile_warmup", "profile_active"):
            value = getattr(self, name)
            least = 1 if name == "profile_active" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"train.{name}={value!r} is invalid: expected an integer >= {least}")
        if self.profile and self.max_steps is not None:
            self.check_profile_window(self.max_steps, f"train.max_steps={self.max_steps}")
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            raise ValueError(f"train.trackers={self.trackers!r} is invalid: {', '.join(map(repr, unknown))} is not a "
                             f"tracker litft knows (expected a list of: {', '.join(TRACKERS)})")
        if not self.wandb_project:
            raise ValueError("train.wandb_project is empty: expected a W&B project name")
        self.controllers = validate_controllers(self.controllers)

    def profile_steps(self) -> int:
        """Optimizer steps the profiling window spans (``profile_wait + profile_warmup + profile_active``)."""
        return self.profile_wait + self.profile_warmup + self.profile_active

    def check_profile_window(self, steps: int, what: str) -> None:
        """Raise ValueError when the profiling window does not fit in the ``steps`` a run trains (``what`` says
        where that number comes from)."""
        if self.profile_steps() > steps:
            warmup = 1 if steps > 1 else 0
            raise ValueError(
                f"train.profile: the profiling window needs {self.profile_steps()} optimizer steps (profile_wait "
                f"{self.profile_wait} + profile_warmup {self.profile_warmup} + profile_active {self.profile_active}) "
                f"but the run trains {steps} ({what}): train longer or shorten the window, e.g. "
                f"--train.profile_wait 0 --train.profile_warmup {warmup} --train.profile_active "
                f"{min(3, steps - warmup)}"
            )

    def checkpointing_mode(self) -> str:
        """``activation_checkpointing`` as "none", "full" or "selective" (true/false are "full"/"none")."""
        value = self.activation_checkpointing
        if isinstance(value, bool):
            return "full" if value else "none"
        if value in ("none", "full", "selective"):
            return value
        raise ValueError(f"train.activation_checkpointing={value!r} is invalid: expected none, full, selective, true "
                         "or false")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each device."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) x devices x num_nodes ({world_size})"
            )
        return self.global_batch_size // per_step


@dataclass
class EvalArgs:
    """Validation during and after training.

    Args:
        interval: Compute the validation loss every N optimizer steps (None = only at the end).
        max_batches: Use at most this many validation micro-batches per evaluation (None = all).
        initial_validation: Also compute the validation loss before the first step.
        final_validation: Compute the validation loss after the last step.
        early_stopping_patience: Stop when the validation loss has not improved by more than
            ``early_stopping_min_delta`` for this many evaluations in a row (None = never).
        early_stopping_min_delta: Smallest decrease of the validation loss that counts as an improvement.
        generate_samples: Before and after training, greedily generate the responses of up to N validation
            samples, print the exact-match accuracy against the references and a few of the generations
            (0 = off).
        max_new_tokens: Longest generation for ``generate_samples`` (None = the longest reference + 8).
    """

    interval: Optional[int] = None
    max_batches: Optional[int] = None
    initial_validation: bool = False
    final_validation: bool = True
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0
    generate_samples: int = 0
    max_new_tokens: Optional[int] = None

    def validate(self) -> None:
        for name in ("interval", "max_batches", "early_stopping_patience", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"eval.{name}={value!r} is invalid: expected an integer >= 1 (or null)")
        if self.generate_samples < 0:
            raise ValueError(f"eval.generate_samples={self.generate_samples} is invalid: expected an integer >= 0")
        if self.early_stopping_min_delta < 0:
            raise ValueError(f"eval.early_stopping_min_delta={self.early_stopping_min_delta} is invalid: expected "
                             "a number >= 0")


Precision = Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]
Strategy = Literal["auto", "ddp", "fsdp"]
Accelerator = Literal["auto", "cpu", "cuda", "mps"]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Optional[Union[float, str]]) -> Optional[float]:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` or ``"[DD:]HH:MM:SS"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
        elif re.fullmatch(r"\d+(:\d+){1,3}", text):
            parts = [int(p) for p in text.split(":")]
            seconds = 0.0
            for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
                seconds += part * unit
        else:
            raise ValueError(f"train.max_time={value!r} is invalid: expected seconds, '30m', '2h' or 'HH:MM:SS'")
    if seconds <= 0:
        raise ValueError(f"train.max_time={value!r} is invalid: expected a positive duration")
    return seconds
