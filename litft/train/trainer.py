"""The one training loop, on Lightning Fabric, for every fine-tuning method and objective.

Read it in this order to understand one training step:

1. :meth:`Trainer.train` walks the steps: takes the micro-batches of one optimizer step from the data stream and
   calls :meth:`Trainer.train_step`, then logs, runs the controllers, validates, early-stops and saves.
2. :meth:`Trainer.train_step` sets the learning rate, counts the step's units (target tokens for SFT) over all
   devices, calls :func:`forward_backward`, clips and steps the optimizer.
3. :func:`forward_backward` runs the objective (:mod:`litft.train.objectives`; SFT: ``objectives/sft.py``) on each
   micro-batch and backpropagates its summed loss divided by the units of the whole step.

What a method changes (LoRA, adapter, ...) comes from its :class:`litft.methods.Method`; what is trained towards
from the objective. Everything a resumed run needs to continue step-exactly is :class:`RunState` plus the optimizer
state (``state.pt``, read with ``torch.load(weights_only=True)``); :meth:`Trainer.save` / :meth:`Trainer.load`
write and read it. :meth:`Trainer.setup` checks every input, loads data and model before anything is written to
``out_dir``; :meth:`Trainer.finish` validates, writes ``final/`` and the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import yaml

from litft.checkpoint import check_mergeable_chain, load_checkpoint, write_model_files
from litft.config import Config, check_tokenizer_fits
from litft.errors import check_writable
from litft.methods import Method
from litft.peft.lora import check_trainable, count_parameters
from litft.train import checkpoint as ckpt
from litft.train.args import EvalArgs, TrainArgs, parse_duration
from litft.train.loop import (check_devices, count_tokens, exact_match, prepare_training, resolve_precision,
                              resolve_resume)
from litft.train.metrics import (RunLogger, flops_per_token, import_wandb, matmul_params, open_trackers, peak_flops,
                                 peak_memory, start_profiler)
from litft.train.objectives import ObjectiveArgs, ObjectiveContext, ObjectiveOutput
from litft.train.objectives.kd import check_teacher_vocabulary, load_teacher
from litft.train.schedule import build_optimizer, lr_at, resolve_optimizer
from litft.train.strategy import reports_distributed_failures
from litft.weights import write_text_atomic

STATE_FORMAT = 1


@dataclass
class RunState:
    """Where a run stands: everything besides the weights and the optimizer that a resumed run continues from.

    Args:
        step: Optimizer steps done.
        micro_batches: Micro-batches consumed, over all devices (the epoch is ``micro_batches / len(data)``).
        tokens: Non-padding tokens trained on, over all devices.
        elapsed: Training time, in seconds, up to the last snapshot (:meth:`Trainer.save`).
        best_val: Best validation loss so far (early stopping).
        bad_evals: Validations since it last improved.
        controllers: The training controllers' counts (:meth:`Controllers.state_dict`).
        rng: The random number generators' states (torch, Python, CUDA).
        data: The position in the shuffled data (:meth:`BatchIterator.state_dict`).
    """

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    bad_evals: int = 0
    controllers: Optional[dict[str, Any]] = None
    rng: Optional[dict[str, Any]] = None
    data: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors, under the keys of ``state.pt``."""
        return {"step": self.step, "micro_batches": self.micro_batches, "tokens": self.tokens,
                "elapsed": self.elapsed, "best_val": self.best_val, "bad_evals": self.bad_evals,
                "controllers": self.controllers, "rng": self.rng, "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.micro_batches = int(state["step"]), int(state["micro_batches"])
        self.tokens, self.elapsed = int(state["tokens"]), float(state["elapsed"])
        self.best_val, self.bad_evals = float(state["best_val"]), int(state["bad_evals"])
        self.controllers, self.rng, self.data = state.get("controllers"), state["rng"], state["data"]


@dataclass
class StepResult:
    """What one optimizer step did: its loss and the objective's metrics (means over the step's units), the
    learning rate, the gradient norm before clipping (None without clipping), and the tokens and FLOPs it trained
    on (over all devices)."""

    loss: float
    metrics: dict[str, float]
    lr: float
    grad_norm: Optional[float]
    tokens: int
    flops: float
    micro_batches: int


def forward_backward(
    objective: Callable[..., ObjectiveOutput], micro_batches: Sequence[dict[str, torch.Tensor]],
    backward: Callable[[torch.Tensor], None], units: int, world_size: int = 1,
    no_sync: Callable[[bool], Any] = lambda accumulating: contextlib.nullcontext(),
) -> ObjectiveOutput:
    """Accumulate the gradients of one optimizer step; returns the summed loss and metrics (detached fp32 tensors
    on the model's device: reading them is the step's one device synchronisation).

    Each micro-batch's summed loss is divided by ``units``, the units of the whole step (SFT: target tokens;
    counted up front, over all devices), so the gradient is that of the mean loss over the step, whatever the
    split into micro-batches. Data-parallel gradient averaging divides by the world size, which the factor
    ``world_size`` undoes.
    """
    total: Optional[torch.Tensor] = None
    metrics: dict[str, torch.Tensor] = {}
    scale = world_size / max(units, 1)
    for i, batch in enumerate(micro_batches):
        with no_sync(i < len(micro_batches) - 1):
            out = objective(**batch)
            backward(out.loss * scale)
        loss_sum = out.loss.detach().float()
        total = loss_sum if total is None else total + loss_sum
        for name, value in out.metrics.items():
            value = value.detach().float()
            metrics[name] = metrics[name] + value if name in metrics else value
    return ObjectiveOutput(torch.zeros(()) if total is None else total, metrics)


class MicroBatches:
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
def fit(method: Method, checkpoint_dir: Path, out_dir: Path, data: Any, train: TrainArgs, eval: EvalArgs,
        precision: Optional[str] = None, devices: Union[int, str] = 1, num_nodes: int = 1, strategy: str = "auto",
        accelerator: str = "auto", optimizer: Union[str, dict] = "AdamW", resume: Union[bool, str, Path] = False,
        overwrite: bool = False, run_config: Optional[dict[str, Any]] = None,
        objective: Optional[Any] = None) -> Path:
    """Fine-tune the checkpoint in ``checkpoint_dir`` with ``method`` towards ``objective`` (an
    :class:`~litft.train.objectives.ObjectiveArgs`; default SFT); returns ``out_dir/final``.

    Every input is checked (and the data and model loaded) before anything is written to ``out_dir``.
    ``run_config`` is written to ``out_dir/run.yaml`` with the resolved values filled in.
    """
    trainer = Trainer(method, checkpoint_dir, out_dir, data, train, eval, precision=precision, devices=devices,
                      num_nodes=num_nodes, strategy=strategy, accelerator=accelerator, optimizer=optimizer,
                      resume=resume, overwrite=overwrite, run_config=run_config, objective=objective)
    return trainer.run()


class Trainer:
    """One fine-tuning run: :meth:`setup`, then :meth:`train` (:meth:`train_step` after :meth:`train_step`, with
    :meth:`validate` and :meth:`save` as the run asks), then :meth:`finish`. :meth:`run` does all of it."""

    def __init__(self, method: Method, checkpoint_dir: Path, out_dir: Path, data: Any, train: TrainArgs,
                 eval: EvalArgs, precision: Optional[str] = None, devices: Union[int, str] = 1, num_nodes: int = 1,
                 strategy: str = "auto", accelerator: str = "auto", optimizer: Union[str, dict] = "AdamW",
                 resume: Union[bool, str, Path] = False, overwrite: bool = False,
                 run_config: Optional[dict[str, Any]] = None, objective: Optional[Any] = None) -> None:
        from litft.asset_cards import resolve_checkpoint

        self.method = method
        self.checkpoint_dir = resolve_checkpoint(checkpoint_dir)  # a folder or an asset card's name
        self.out_dir = Path(out_dir)
        self.data_args, self.train_args, self.eval_args = data, train, eval
        self.precision, self.devices, self.num_nodes = precision, devices, num_nodes
        self.strategy, self.accelerator, self.optimizer_spec = strategy, accelerator, optimizer
        self.resume, self.overwrite, self.run_config = resume, overwrite, run_config
        self.objective_args = objective if objective is not None else ObjectiveArgs()
        self.state = RunState()
        self.resume_from: Optional[Path] = None

    # ------------------------------------------------------------------------------------------ the whole run

    def run(self) -> Path:
        """Check, set up, train and finish; returns ``out_dir/final`` (at once when the run had finished)."""
        if self.check():
            return self.out_dir / ckpt.FINAL
        self.setup()
        self.train()
        return self.finish()

    # ------------------------------------------------------------------------------------------ setup

    def check(self) -> bool:
        """Checks that need nothing loaded; True when ``--resume auto`` finds the run finished (nothing to do)."""
        train, eval = self.train_args, self.eval_args
        train.validate()
        eval.validate()
        check_devices(self.devices, self.num_nodes, self.strategy, self.accelerator)
        self.precision = resolve_precision(self.precision, self.accelerator)
        self.max_time = parse_duration(train.max_time)
        resolve_optimizer(self.optimizer_spec)
        self.objective_cls, self.objective_options = self.objective_args.resolve()
        teacher = getattr(self.objective_options, "teacher", None)
        if self.objective_cls.needs_teacher:
            if teacher is None:
                raise ValueError(f"objective {self.objective_cls.name!r} needs a teacher: set --objective.teacher to a "
                                 "litft checkpoint directory")
            check_teacher_vocabulary(teacher, self.checkpoint_dir)
        if "wandb" in train.trackers:
            import_wandb()  # a missing extra fails before anything is loaded
        if not self.checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint_dir {str(self.checkpoint_dir)!r} does not exist (download or convert "
                                    "a model first: litft download <repo_id>)")
        check_writable(self.out_dir)
        self.config = Config.from_checkpoint(self.checkpoint_dir)
        if self.method.full:
            check_mergeable_chain(self.checkpoint_dir, "finetune full")
        context = self.config.block_size - self.method.virtual_tokens
        self.max_seq_length = train.max_seq_length or context
        if self.max_seq_length > context:
            virtual = (f" less the {self.method.virtual_tokens} virtual tokens of prompt tuning"
                       if self.method.virtual_tokens else "")
            raise ValueError(f"train.max_seq_length={self.max_seq_length} is larger than the model's context: "
                             f"block_size={self.config.block_size} in {self.checkpoint_dir / 'model_config.yaml'}"
                             f"{virtual}")
        self.resume_from = resolve_resume(self.resume, self.out_dir, self.overwrite)
        if (self.resume is True or self.resume == "auto") and (self.out_dir / ckpt.FINAL).is_dir():
            print(f"{self.out_dir} holds a finished run (final/): nothing to resume. Pass --resume <a "
                  "checkpoints/step-N directory> to continue from a checkpoint, or --overwrite true to train again.",
                  file=sys.stderr)
            return True
        return False

    def setup(self) -> None:
        """Start the processes, load the data, the model and (when resuming) the training state, then write
        ``run.yaml`` and open the logs: the first writes to ``out_dir``."""
        self._launch()
        self._setup_data()
        saved = ckpt.load_training_state(self.resume_from) if self.resume_from is not None else None
        if saved is not None:
            self._check_saved(saved)
        if self.train_args.profile:
            done = int(saved["step"]) if saved is not None else 0
            what = (f"train.max_steps={self.train_args.max_steps}" if self.train_args.max_steps else
                    f"{self.total_steps} steps for train.epochs={self.train_args.epochs}") + (
                f", resumed at step {done}" if done else "")
            self.train_args.check_profile_window(self.total_steps - done, what)
        self._setup_model()
        if saved is not None:
            self.load(saved)
        self._open_out_dir(resumed=saved is not None)

    def _launch(self) -> None:
        """Fabric, its processes and this rank's seed (every rank initialises new weights identically)."""
        from litft.train import strategy as dist
        from litft.train.loop import make_fabric

        train, eval = self.train_args, self.eval_args
        self.devices = dist.resolve_devices(self.devices, self.num_nodes, self.accelerator)
        dist.check_strategy(self.strategy, train.sharding, self.num_nodes, self.method.name,
                            quantized=self.method.quantized)
        if self.strategy == "fsdp" and eval.generate_samples:
            raise ValueError("eval.generate_samples is not supported with strategy='fsdp' (generation needs the whole "
                             "model on one device): set it to 0, or generate from final/ after training")
        self.fabric = make_fabric(self.accelerator, self.devices, self.num_nodes, self.strategy, self.precision,
                                  train.sharding, train.timeout)
        dist.launch(self.fabric, train.timeout)  # fabric.launch(), then train.timeout for the collectives
        self.fsdp = dist.is_fsdp(self.fabric)
        self.rank_zero = self.fabric.global_rank == 0
        self.world_size = self.fabric.world_size
        self.accumulation = train.accumulation_steps(self.world_size)
        _seed(train.seed)

    def _setup_data(self) -> None:
        """Tokenizer, samples and batches (bad rows, empty files, missing chat templates fail here, before any
        write), the number of steps and the controllers."""
        from litft.data import BatchIterator, load_datasets
        from litft.data.preference import PairBatchIterator, load_preference_datasets
        from litft.tokenizer import Tokenizer
        from litft.train.controllers import Controllers, check_controllers_fit

        train, fabric, data = self.train_args, self.fabric, self.data_args
        self.tokenizer = Tokenizer(self.checkpoint_dir)
        pairs = self.objective_cls.needs_pairs  # preference objectives: (chosen, rejected) pairs, batched (2B, T)
        load = load_preference_datasets if pairs else load_datasets
        train_samples, val_samples, stats = load(data, self.tokenizer, self.max_seq_length)
        sequences = [s for p in [*train_samples, *val_samples] for s in ((p.chosen, p.rejected) if pairs else (p,))]
        check_tokenizer_fits(self.tokenizer, self.config, self.checkpoint_dir, sequences)
        self.data_format = stats.format  # how rows were rendered: final/ records it for inference
        if self.rank_zero:
            print(stats.summary(), file=sys.stderr)
        if self.world_size > 1:  # training: every rank batches all samples and takes its share of each step
            val_samples = val_samples[fabric.global_rank::self.world_size]
        self.val_samples = [p.chosen for p in val_samples] if pairs else val_samples  # generations: the chosen
        pad_id = 0
        if pairs:
            batches = functools.partial(PairBatchIterator, micro_batch_size=train.micro_batch_size,
                                        max_seq_length=self.max_seq_length, pad_id=pad_id, seed=data.seed)
        else:
            batches = functools.partial(BatchIterator, micro_batch_size=train.micro_batch_size,
                                        max_seq_length=self.max_seq_length, pad_id=pad_id, packing=data.packing,
                                        seed=data.seed)
        self.batches = batches(train_samples, shuffle=True)
        self.val_batches = batches(val_samples, shuffle=False) if val_samples else None
        self.total_steps = train.max_steps or math.ceil(train.epochs * len(self.batches)
                                                        / (self.accumulation * self.world_size))
        check_controllers_fit(train.controllers, train.max_norm, self.eval_args.interval, self.val_batches is not None)
        self.controllers = Controllers(train.controllers)

    def _check_saved(self, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method, objective or global batch size, or a sharded one without FSDP."""
        if saved.get("method") != self.method.name:
            raise ValueError(f"{self.resume_from} was written by a {saved.get('method')!r} run, not "
                             f"{self.method.name!r}")
        written_with = saved.get("objective", "sft")
        if written_with != self.objective_cls.name:
            raise ValueError(f"{self.resume_from} was written by a run with --objective {written_with}, not "
                             f"{self.objective_cls.name}: resume it with the same objective")
        saved_batch = saved.get("global_batch_size", self.train_args.global_batch_size)  # absent before litft kept it
        if saved_batch != self.train_args.global_batch_size:
            raise ValueError(
                f"{self.resume_from} was saved by a run with train.global_batch_size={saved_batch}, this run has "
                f"train.global_batch_size={self.train_args.global_batch_size}: resuming would change the samples per "
                f"step, the data position and the schedule mid-run. Resume with --train.global_batch_size "
                f"{saved_batch}, or start a new run from it (litft finetune ... {self.resume_from})")
        if (self.resume_from / ckpt.SHARDED).is_dir() and not self.fsdp:
            raise ValueError(f"{self.resume_from} is a sharded (FSDP) checkpoint: resume it with --strategy fsdp "
                             "(any number of devices)")

    def _setup_model(self) -> None:
        """Load the model, let the method prepare it, wrap it in the objective, and build the optimizer."""
        from litft.train import strategy as dist

        train, fabric, method = self.train_args, self.fabric, self.method
        sharded = self.resume_from is not None and (self.resume_from / ckpt.SHARDED).is_dir()
        full_weights = self.resume_from is not None and method.full and not sharded
        weights_dir = self.resume_from if full_weights else self.checkpoint_dir
        dtype = {"bf16-true": torch.bfloat16}.get(self.precision, torch.float32)
        model = load_checkpoint(weights_dir, device=fabric.device, dtype=dtype)
        method.prepare(model)
        dist.check_strategy(self.strategy, train.sharding, self.num_nodes, method.name,
                            quantized=dist.is_quantized(model))
        if self.resume_from is not None and not method.full and not sharded:
            method.load(model, self.resume_from)
        self.n_trainable = check_trainable(model, method.name)
        self.n_params = count_parameters(model)
        self.model = model
        context = self._objective_context(model, dtype)
        objective = prepare_training(model, train, fabric.device, self.objective_cls, self.objective_options, context)
        self.objective = fabric.setup_module(objective)
        opt = build_optimizer(self.optimizer_spec, model, train.lr, train.weight_decay, fused=train.fused_optimizer,
                              device=fabric.device)
        self.optimizer = fabric.setup_optimizers(opt)
        self.n_matmul = matmul_params(model)
        compute_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(self.precision.split("-")[0], torch.float32)
        self.peak = peak_flops(fabric.device, compute_dtype, train.peak_tflops)

    def _objective_context(self, model: torch.nn.Module, dtype: torch.dtype) -> ObjectiveContext:
        """What the objective compares against: the method's trainable parts switched off, or (full fine-tuning) a
        frozen copy of the starting checkpoint, loaded only when an objective asks for it; and the distillation
        teacher. Frozen models are on the device, sharded like the trained model under FSDP."""
        reference_off = self.method.kind.reference_off

        def place(frozen: torch.nn.Module) -> torch.nn.Module:
            from litft.train import strategy as dist
            from litft.train.loop import resolve_attention

            frozen.attention_backend = resolve_attention(self.train_args.attention, self.fabric.device, frozen.config)
            return dist.shard_frozen(frozen, self.fabric) if self.fsdp else frozen

        def frozen_copy() -> torch.nn.Module:
            copy = load_checkpoint(self.checkpoint_dir, device=self.fabric.device, dtype=dtype)
            return place(copy.requires_grad_(False).eval())

        teacher = None
        if self.objective_cls.needs_teacher:
            teacher = place(load_teacher(self.objective_options, self.checkpoint_dir, self.fabric.device, dtype))
        return ObjectiveContext(reference=(lambda: reference_off(model)) if reference_off is not None else None,
                                load_frozen_copy=frozen_copy, teacher=teacher)

    def _open_out_dir(self, resumed: bool) -> None:
        """The first writes: ``run.yaml`` (a fresh run replaces what ``--overwrite`` allows), the trackers and the
        metrics log."""
        out_dir = self.out_dir
        resolved: dict[str, Any] = {}
        if self.rank_zero:
            if self.resume_from is None and self.overwrite:
                for name in (ckpt.RUN_FILE, ckpt.CHECKPOINTS, ckpt.FINAL, ckpt.LOGS):
                    target = out_dir / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp_dirs(out_dir)
            resolved = self._resolved_run_config()
            write_text_atomic(out_dir / ckpt.RUN_FILE, yaml.safe_dump(resolved, sort_keys=False))
        train = self.train_args
        try:
            trackers = open_trackers(train.trackers, out_dir / ckpt.LOGS, train.wandb_project,
                                     train.wandb_run_name or out_dir.resolve().name, resolved,
                                     resume=resumed) if self.rank_zero else []
        except BaseException:
            if not resumed:  # a fresh run leaves no run behind (only run.yaml and logs/ were written)
                (out_dir / ckpt.RUN_FILE).unlink(missing_ok=True)
                shutil.rmtree(out_dir / ckpt.LOGS, ignore_errors=True)
            raise
        self.logger = RunLogger(out_dir / ckpt.LOGS, enabled=self.rank_zero,
                                resume_step=self.state.step if resumed else None, trackers=trackers)
        if self.rank_zero:
            where = f"resuming from {self.resume_from} at step {self.state.step}" if resumed else "starting"
            share = 100 * self.n_trainable / self.n_params
            print(f"{self.method.name}: {self.n_trainable:,} of {self.n_params:,} parameters train ({share:.2f}%); "
                  f"{where}; {self.total_steps} steps of {train.global_batch_size} samples ({self.accumulation} "
                  f"micro-batches of {train.micro_batch_size} per device); precision {self.precision}; device "
                  f"{self.fabric.device}", file=sys.stderr)

    def _resolved_run_config(self) -> dict[str, Any]:
        """``run.yaml``: the entry point's arguments with the values this run resolved filled in."""
        resolved = dict(self.run_config or {})
        if "checkpoint_dir" in resolved:  # the folder an asset-card name stood for: run.yaml reproduces the run
            resolved["checkpoint_dir"] = str(self.checkpoint_dir.resolve())
        resolved["precision"] = self.precision
        if isinstance(resolved.get("train"), dict):
            resolved["train"]["max_seq_length"] = self.max_seq_length
        if "objective" in resolved:
            options = dataclasses.asdict(self.objective_options)
            resolved["objective"] = {"name": self.objective_cls.name,
                                     **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()}}
        return resolved

    # ------------------------------------------------------------------------------------------ save and load

    def load(self, saved: dict[str, Any]) -> None:
        """Continue from a step checkpoint's training state (``state.pt``, and the shards of an FSDP run)."""
        from litft.train import strategy as dist

        if (self.resume_from / ckpt.SHARDED).is_dir():
            dist.load_sharded(self.resume_from / ckpt.SHARDED, self.objective, self.optimizer)
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.batches.load_state_dict(saved["data"])
        self.state.load_state_dict(saved)
        if self.controllers and not self.controllers.load_state_dict(saved.get("controllers")) and self.rank_zero:
            print(f"note: {self.resume_from} was written with other train.controllers: their counts start afresh",
                  file=sys.stderr)

    def save(self, step: int) -> None:
        """Write ``checkpoints/step-N`` atomically: the method's weights (FSDP: every rank's shards, with the
        optimizer state), and ``state.pt`` (:class:`RunState`, the optimizer, the schedule)."""
        from litft.train import strategy as dist

        fabric, out_dir = self.fabric, self.out_dir
        self.check_finite(step)
        staging = None
        if self.fsdp:
            staging = out_dir / ckpt.CHECKPOINTS / f".step-{step}.tmp-sharded"
            if self.rank_zero and staging.exists():
                shutil.rmtree(staging)
            fabric.barrier()
            # trainable weights + optimizer state (full fine-tuning: also the layers freeze_layers froze)
            dist.save_sharded(staging, self.objective, self.optimizer, include_frozen=self.method.full)
            fabric.barrier()
        if self.rank_zero:
            self.state.elapsed = self.elapsed()
            self.state.rng = ckpt.rng_state()
            self.state.data = self.batches.state_dict()
            self.state.controllers = self.controllers.state_dict()
            saved = {"format": STATE_FORMAT, "method": self.method.name, "objective": self.objective_cls.name,
                     **self.state.state_dict(), "step": step,
                     "optimizer": {} if self.fsdp else self.optimizer.state_dict(),
                     "scheduler": {"step": step, "total_steps": self.total_steps}, "world_size": self.world_size,
                     "global_batch_size": self.train_args.global_batch_size}
            save_weights = (lambda m, d: None) if self.fsdp else self.method.save
            base_dir = None if self.method.full else self.checkpoint_dir
            ckpt.save_training_checkpoint(out_dir, step, self.model, save_weights, self.checkpoint_dir, base_dir,
                                          self.method.name, saved, self.train_args.keep_last, sharded=staging)
        fabric.barrier()

    def check_finite(self, step: int) -> None:
        """Stop (every rank) rather than save trainable weights or optimizer state holding a NaN or an infinity."""
        bad = ckpt.first_nonfinite(self.model, self.optimizer)
        if self.world_size > 1:
            flags = self.fabric.all_reduce(torch.tensor(float(bad is not None), device=self.fabric.device),
                                           reduce_op="sum")
            bad = bad or ("the weights of another process" if float(flags) > 0 else None)
        if bad is not None:
            raise ckpt.diverged(self.out_dir, step, f"{bad} holds NaN or infinite values")

    # ------------------------------------------------------------------------------------------ one step

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on this rank's micro-batches ``micro`` (on the CPU): the learning rate of the step,
        the units and tokens counted over all devices, the gradients accumulated over the micro-batches, the
        clipping and the optimizer step. Raises :class:`~litft.errors.TrainingDivergedError` when the loss or the
        gradient norm is not finite."""
        fabric, train, step = self.fabric, self.train_args, self.state.step
        lr = lr_at(step, self.total_steps, train.lr, train.min_lr, train.warmup_steps, train.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # counted on the CPU, before the copy to the device (no device syncs)
        units = sum(self.objective_cls.units(b) for b in micro)
        tokens = [count_tokens(b) for b in micro]
        n_tokens = sum(tokens)
        n_flops = sum(n * flops_per_token(self.config, self.n_matmul, self.n_trainable, b["input_ids"].shape[1],
                                          self.method.full) for n, b in zip(tokens, micro))
        micro = [{k: v.to(fabric.device, non_blocking=True) for k, v in b.items()} for b in micro]
        if self.world_size > 1:
            counts = fabric.all_reduce(torch.tensor([units, n_tokens, int(n_flops)], device=fabric.device),
                                       reduce_op="sum")
            units, n_tokens, n_flops = int(counts[0]), int(counts[1]), int(counts[2])
        out = forward_backward(
            self.objective, micro, fabric.backward, units, self.world_size,
            no_sync=lambda accumulating: fabric.no_backward_sync(self.objective, enabled=accumulating),
        )
        loss, metrics = self._reduce_means(out, units)
        if not math.isfinite(loss):
            raise ckpt.diverged(self.out_dir, step + 1, f"the training loss is {loss} (lr {lr:.3g})")
        grad_norm = None
        if train.max_norm is not None:  # a non-finite norm stops the run (below), never torch's own error
            grad_norm = fabric.clip_gradients(self.objective, self.optimizer, max_norm=train.max_norm,
                                              error_if_nonfinite=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if grad_norm is not None:
            grad_norm = float(grad_norm)  # read after the step is queued: no extra wait
            if not math.isfinite(grad_norm):  # the weights just stepped are never saved
                raise ckpt.diverged(self.out_dir, step + 1, f"the gradient norm is {grad_norm} (lr {lr:.3g})")
        return StepResult(loss=loss, metrics=metrics, lr=lr, grad_norm=grad_norm, tokens=n_tokens, flops=n_flops,
                          micro_batches=len(micro))

    def _reduce_means(self, out: ObjectiveOutput, units: int) -> tuple[float, dict[str, float]]:
        """The loss and the metrics of ``out`` (sums on this rank) summed over all ranks and divided by ``units``."""
        sums = self._sums(out.loss, out.metrics)
        if self.world_size > 1:
            sums = self.fabric.all_reduce(sums, reduce_op="sum")
        values = [float(v) / max(units, 1) for v in sums.cpu()]  # reading them: the step's one device sync
        return values[0], dict(zip(self.objective_cls.metrics, values[1:]))

    def _sums(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` and the objective's metrics (in its ``metrics`` order; 0 for one not computed on this rank) as one
        fp32 vector on the device: what one all-reduce sums over the ranks."""
        undeclared = sorted(set(metrics) - set(self.objective_cls.metrics))
        if undeclared:
            raise RuntimeError(f"objective {self.objective_cls.name!r} returned metrics its `metrics` does not name: "
                               f"{', '.join(undeclared)}")
        device = self.fabric.device
        zero = torch.zeros((), device=device)
        return torch.stack([loss.float().to(device)] + [metrics.get(name, zero).float().to(device)
                                                        for name in self.objective_cls.metrics])

    # ------------------------------------------------------------------------------------------ validation

    def validate(self) -> Optional[tuple[float, dict[str, float]]]:
        """The objective's mean loss and metrics over the validation batches (at most ``eval.max_batches``), over
        all ranks; None without validation data."""
        if self.val_batches is None:
            return None
        fabric, objective = self.fabric, self.objective
        objective.eval()
        sums = self._sums(torch.zeros(()), {})  # the loss, then the objective's metrics
        n = torch.zeros((), device=fabric.device)
        with torch.no_grad():
            for i, batch in enumerate(self.val_batches.batch(0, k) for k in range(len(self.val_batches))):
                if self.eval_args.max_batches is not None and i >= self.eval_args.max_batches:
                    break
                units = self.objective_cls.units(batch)
                batch = {k: v.to(fabric.device) for k, v in batch.items()}
                out = objective(**batch)
                sums += self._sums(out.loss, out.metrics)
                n += units
        objective.train()
        sums, n = fabric.all_reduce(sums, reduce_op="sum"), fabric.all_reduce(n, reduce_op="sum")
        means = [float(v) for v in sums / n.clamp_min(1)]
        return means[0], dict(zip(self.objective_cls.metrics, means[1:]))

    def _log_validation(self, result: Optional[tuple[float, dict[str, float]]], step: int) -> None:
        if result is None or not self.rank_zero:
            return
        val, metrics = result
        logged = {"val_loss": val}
        if self.objective_cls.perplexity:
            logged["val_ppl"] = math.exp(min(val, 50))
        logged.update({f"val_{name}": value for name, value in metrics.items()})
        self.logger.log(logged, step)

    def generations(self, when: str) -> Optional[float]:
        """Exact match of greedy generations on the first ``eval.generate_samples`` validation samples (rank 0)."""
        if not self.eval_args.generate_samples or not self.val_samples:
            return None
        accuracy = None
        if self.rank_zero:
            accuracy = exact_match(self.model, self.tokenizer, self.val_samples[: self.eval_args.generate_samples],
                                   self.eval_args.max_new_tokens, when, show=3)
            self.logger.log({f"accuracy_{when}": accuracy}, self.state.step)
        self.fabric.barrier()
        return accuracy

    # ------------------------------------------------------------------------------------------ the loop

    def elapsed(self) -> float:
        """Training time of the run so far, in seconds (earlier processes of a resumed run included)."""
        return self._elapsed_before + time.perf_counter() - self._clock_start

    def _start(self) -> None:
        """Before the first step: the seeds of a fresh run, the validation and generations before training (or a
        resumed run's random states, restored last: nothing may draw random numbers before its first step)."""
        self.model.train()
        self.objective.train()
        if self.resume_from is None:
            _seed(self.train_args.seed + self.fabric.global_rank)
            self.generations("before")
            if self.eval_args.initial_validation:
                result = self.validate()
                self._log_validation(result, 0)
                if result is not None and self.rank_zero:
                    print(f"step 0: val_loss {result[0]:.4f}", file=sys.stderr)
        else:
            ckpt.set_rng_state(self.state.rng)
        self.stop_reason = "max_steps" if self.train_args.max_steps else "epochs"
        self._elapsed_before = self.state.elapsed
        self._clock_start = time.perf_counter()

    def train(self) -> None:
        """Optimizer steps until ``max_steps`` / the epochs, ``max_time``, early stopping or a controller stops."""
        train = self.train_args
        self._start()
        stream = MicroBatches(self.batches, self.fabric.global_rank, self.world_size)
        budget = None if train.max_steps else train.epochs * len(self.batches)  # micro-batches the epochs allow
        self.progress = _progress(self.total_steps, self.state.step, self.rank_zero)
        self._window = _Window()
        profile_dir = self.out_dir / ckpt.LOGS / "profile"
        profiler = start_profiler(profile_dir, self.fabric.global_rank, self.fabric.device, train.profile_wait,
                                  train.profile_warmup, train.profile_active) if train.profile else None
        try:
            while self.state.step < self.total_steps:
                n_micro = self.accumulation if budget is None else min(
                    self.accumulation, (budget - self.state.micro_batches) // self.world_size)
                if n_micro <= 0:
                    break
                micro_before = self.state.micro_batches
                result = self.train_step(stream.take(n_micro))
                self._advance(result)
                if profiler is not None:
                    profiler.step()
                if self._after_step(result, micro_before):
                    break
        except BaseException:
            self.logger.close(failed=True)
            raise
        finally:
            if self.progress is not None:
                self.progress.close()
            if profiler is not None:
                profiler.stop()  # writes the trace if the window was cut short
        if profiler is not None and self.rank_zero:
            print(f"profiler trace(s), one per process: {profile_dir}/rank<N>.*.pt.trace.json (open them in "
                  "TensorBoard's profiler plugin, https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)

    def _advance(self, result: StepResult) -> None:
        """Count the step in :class:`RunState`, log it every ``log_interval`` steps, move the progress bar."""
        state, train = self.state, self.train_args
        state.step += 1
        state.micro_batches += result.micro_batches * self.world_size
        state.tokens += result.tokens
        self._window.add(result.tokens, result.flops)
        if state.step % train.log_interval == 0 or state.step == self.total_steps:
            tok_s, flops_s = self._window.rates()
            mem_kind, mem = peak_memory(self.fabric.device)
            metrics: dict[str, Any] = {"loss": result.loss, **result.metrics, "lr": result.lr, "tokens_per_s": tok_s,
                                       "tokens": state.tokens, "epoch": state.micro_batches / len(self.batches),
                                       f"peak_memory_{mem_kind}_gb": mem}
            if result.grad_norm is not None:
                metrics["grad_norm"] = result.grad_norm
            metrics["model_tflops"] = flops_s / self.world_size / 1e12  # per device; see metrics.flops_per_token
            if self.peak is not None:
                metrics["mfu"] = flops_s / (self.peak * self.world_size)
            self.logger.log(metrics, state.step)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                          mfu=f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a")
        if self.progress is not None:
            self.progress.update(1)

    def _after_step(self, result: StepResult, micro_before: int) -> bool:
        """Controllers, validation, early stopping, ``max_time`` and saves after a step; True to stop."""
        state, eval, controllers = self.state, self.eval_args, self.controllers
        step, epoch = state.step, state.micro_batches / len(self.batches)
        stop_early = False
        fired = controllers.on_step({"step": step, "epoch": epoch, "lr": result.lr, "loss": result.loss,
                                     "grad_norm": result.grad_norm, "tokens": state.tokens}) if controllers else []
        if controllers and state.micro_batches // len(self.batches) > micro_before // len(self.batches):
            fired += controllers.on_epoch_end()
        if eval.interval and step % eval.interval == 0 and step < self.total_steps:
            validation = self.validate()
            val = validation[0] if validation is not None else None
            fired += controllers.on_eval(val) if controllers else []
            if val is not None:
                self._log_validation(validation, step)
                if self.rank_zero:
                    _write(self.progress, f"step {step}: val_loss {val:.4f}")
                stop_early = self._early_stop(val)
        out_of_time = self.max_time is not None and self.elapsed() >= self.max_time
        if out_of_time:
            self.stop_reason = f"max_time ({self.train_args.max_time}) reached"
        for index, action in fired:
            if self.rank_zero:
                _write(self.progress, f"step {step}: {controllers.describe(index)}: {action}")
            if action == "stop" and not stop_early:
                stop_early, self.stop_reason = True, controllers.describe(index)
        saving = bool(self.train_args.save_interval) and step % self.train_args.save_interval == 0
        if (saving or any(action == "save" for _, action in fired)) and step < self.total_steps:
            self.save(step)
        return stop_early or out_of_time

    def _early_stop(self, val: float) -> bool:
        """Track the best validation loss; True when ``eval.early_stopping_patience`` evaluations brought no
        improvement."""
        state, eval = self.state, self.eval_args
        if val < state.best_val - eval.early_stopping_min_delta:
            state.best_val, state.bad_evals = val, 0
            return False
        state.bad_evals += 1
        if eval.early_stopping_patience and state.bad_evals >= eval.early_stopping_patience:
            self.stop_reason = (f"early stopping: no validation improvement in {state.bad_evals} evaluations "
                                f"(best {state.best_val:.4f})")
            return True
        return False

    # ------------------------------------------------------------------------------------------ the end

    def finish(self) -> Path:
        """The final validation and generations, ``final/`` (atomically), the summary; returns ``final/``. Weights
        holding a NaN or an infinity stop the run first: they are neither validated nor written."""
        from litft.train import strategy as dist

        step = self.state.step
        try:
            self.check_finite(step)
        except BaseException:
            self.logger.close(failed=True)
            raise
        final_val = self.validate() if self.eval_args.final_validation else None
        self._log_validation(final_val, step)
        self.generations("after")
        final_dir = self.out_dir / ckpt.FINAL
        final_model = self.model
        if self.fsdp:
            full = dist.full_state_dict(self.model)
            final_model = dist.plain_model(self.model.config, self.method.prepare, full) if self.rank_zero else None
        if self.rank_zero:
            from litft.data.formats import PromptFormat
            from litft.weights import atomic_directory

            base_dir = None if self.method.full else self.checkpoint_dir
            with atomic_directory(final_dir, overwrite=True) as tmp:
                write_model_files(final_model, tmp, self.method.save, self.checkpoint_dir, base_dir, self.method.name)
                PromptFormat.of(self.data_format, self.data_args).save(tmp)  # inference renders prompts alike
                if self.method.finalize is not None:
                    self.method.finalize(final_model, tmp)
            self._summary(final_val[0] if final_val is not None else None, final_dir)
        self.logger.close()
        self.fabric.barrier()
        return final_dir

    def _summary(self, final_val: Optional[float], final_dir: Path) -> None:
        mem_kind, mem = peak_memory(self.fabric.device)
        elapsed, step, tokens = self.elapsed(), self.state.step, self.state.tokens
        summary = {"final_step": step, "stop_reason": self.stop_reason, "train_time_s": elapsed, "tokens": tokens,
                   f"peak_memory_{mem_kind}_gb": mem}
        if final_val is not None:
            summary["final_val_loss"] = final_val
        self.logger.log(summary, step)
        _plot_losses(self.out_dir)
        print(f"done after step {step} ({self.stop_reason}); " + (f"val_loss {final_val:.4f}; "
                                                                  if final_val is not None else "")
              + f"{tokens:,} tokens in {elapsed:.0f}s; peak memory ({mem_kind}) {mem:.2f} GB; "
              f"MFU {'n/a' if self.peak is None else 'in logs/metrics.jsonl'}\nfinal checkpoint: {final_dir}",
              file=sys.stderr)


@dataclass
class _Window:
    """Tokens and FLOPs since the last logged step, for the throughput figures."""

    tokens: int = 0
    flops: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def rates(self) -> tuple[float, float]:
        """Tokens/s and FLOP/s over the window, which then starts again."""
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        rates = self.tokens / seconds, self.flops / seconds
        self.tokens, self.flops, self.start = 0, 0.0, now
        return rates


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
