"""``litft finetune adapter``: LLaMA-Adapter (a learned prompt on the upper layers, zero-init gating)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from litft.data import DataArgs
from litft.finetune import run_config
from litft.methods import adapter_method
from litft.peft import AdapterArgs
from litft.train.args import EvalArgs, TrainArgs
from litft.train.objectives import ObjectiveArgs, objective_cli_argv



def finetune_adapter(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/adapter"),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(lr=3e-3, weight_decay=0.02, warmup_steps=20),
    eval: EvalArgs = EvalArgs(),
    objective: ObjectiveArgs = ObjectiveArgs(),
    adapter: AdapterArgs = AdapterArgs(),
    optimizer: Union[str, dict] = "AdamW",
    precision: Optional[Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]] = None,
    devices: Union[int, str] = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
) -> Path:
    """Fine-tune a LLaMA-Adapter (learned prompt + zero-init gate on the upper layers) on a frozen checkpoint.

    Args:
        checkpoint_dir: The litft checkpoint to start from (``litft download``/``convert from_hf`` output, or the
            ``final/`` of an earlier run).
        out_dir: Where run.yaml, checkpoints/step-N, final/ and logs/ are written. ``final/`` holds
            adapter.safetensors + adapter.yaml, base.yaml (the checkpoint they apply to), model_config.yaml and the
            tokenizer.
        data: The training data (``--data.train_path``, ``--data.format``, ``--data.packing``, ...).
        train: Optimisation, stopping and saving (``--train.lr``, ``--train.global_batch_size``, ...).
        eval: Validation, early stopping and generation checks (``--eval.interval``, ...).
        objective: What the run trains towards: ``--objective sft`` (default: next-token cross-entropy on the trained
            tokens), ``dpo``/``ipo`` (preference pairs against the model with its adapters switched off),
            ``simpo``/``orpo`` (preference pairs, no reference) or ``kd`` (distillation from ``--objective.teacher``,
            any litft checkpoint with this tokenizer); its options are ``--objective.<option>``. Preference objectives
            need rows with ``chosen`` and ``rejected`` (and ``prompt`` with string completions).
        adapter: Prompt length and the first layer that gets an adapter (``--adapter.prompt_length 10``).
        optimizer: A torch.optim class name ("AdamW", "SGD"), a class path, or
            ``{class_path: ..., init_args: {...}}``; lr and weight decay come from ``train``.
        precision: "bf16-true", "bf16-mixed", "16-mixed" or "32-true"; default bf16-true on a GPU with bfloat16,
            else 32-true.
        devices: Devices per node: a count, -1/"auto" for all, or ids like "0,1".
        num_nodes: Number of machines.
        strategy: "auto" (one device: plain; several: DDP), "ddp" or "fsdp".
        accelerator: "auto", "cpu", "cuda" or "mps".
        resume: "auto" continues from the newest checkpoint in out_dir (if any), a path from that checkpoint;
            false starts fresh (refused when out_dir already holds a run, unless ``overwrite``).
        overwrite: Replace a run already in out_dir.
    """
    from litft.train.trainer import fit

    method = adapter_method(adapter)
    config = run_config(checkpoint_dir=checkpoint_dir, out_dir=out_dir, data=data, train=train, eval=eval,
                        objective=objective,
                        adapter=adapter, optimizer=optimizer, precision=precision, devices=devices,
                        num_nodes=num_nodes, strategy=strategy, accelerator=accelerator, resume=resume,
                        overwrite=overwrite)
    return fit(method, checkpoint_dir, out_dir, data, train, eval, precision=precision, devices=devices,
               num_nodes=num_nodes, strategy=strategy, accelerator=accelerator, optimizer=optimizer, resume=resume,
               overwrite=overwrite, run_config=config, objective=objective)


finetune_adapter.cli_argv = objective_cli_argv  # type: ignore[attr-defined]  # --objective NAME
