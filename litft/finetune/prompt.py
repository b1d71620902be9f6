"""``litft finetune prompt``: prompt tuning (learned virtual tokens before every sequence; PEFT's PROMPT_TUNING)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from litft.data import DataArgs
from litft.finetune import run_config
from litft.methods import prompt_method
from litft.peft.prompt import PromptTuningArgs
from litft.train.args import EvalArgs, TrainArgs
from litft.train.objectives import ObjectiveArgs, objective_cli_argv



def finetune_prompt(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/prompt"),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(lr=3e-2, warmup_steps=10),
    eval: EvalArgs = EvalArgs(),
    objective: ObjectiveArgs = ObjectiveArgs(),
    prompt: PromptTuningArgs = PromptTuningArgs(),
    optimizer: Union[str, dict] = "AdamW",
    precision: Optional[Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]] = None,
    devices: Union[int, str] = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
) -> Path:
    """Prompt tuning: learn virtual tokens put before every sequence of a frozen checkpoint (PEFT's PROMPT_TUNING).

    ``litft convert to_peft`` exports the result as a PEFT prompt-tuning adapter.

    Args:
        checkpoint_dir: The litft checkpoint to start from (``litft download``/``convert from_hf`` output, or the
            ``final/`` of an earlier LoRA/full run).
        out_dir: Where run.yaml, checkpoints/step-N, final/ and logs/ are written. ``final/`` holds
            prompt.safetensors + prompt.yaml, base.yaml (the checkpoint they apply to), model_config.yaml and the
            tokenizer.
        data: The training data (``--data.train_path``, ``--data.format``, ``--data.packing``, ...). With packing
            every packed sample sees the virtual tokens before it, as if it were trained alone.
        train: Optimisation, stopping and saving (``--train.lr``, ``--train.global_batch_size``, ...). Prompt tuning
            wants a large learning rate (default 3e-2). ``max_seq_length`` defaults to the model's context less
            ``num_virtual_tokens``.
        eval: Validation, early stopping and generation checks (``--eval.interval``, ...).
        objective: What the run trains towards: ``--objective sft`` (default: next-token cross-entropy on the trained
            tokens), ``dpo``/``ipo`` (preference pairs against the model without its virtual prompt), ``simpo``/``orpo``
            (preference pairs, no reference) or ``kd`` (distillation from ``--objective.teacher``, any litft checkpoint
            with this tokenizer); its options are ``--objective.<option>``. Preference objectives need rows with
            ``chosen`` and ``rejected`` (and ``prompt`` with string completions).
        prompt: Number of virtual tokens and their initialisation (``--prompt.num_virtual_tokens 8 --prompt.init
            text --prompt.init_text "Classify if the tweet is a complaint or not:"``).
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
    from litft.asset_cards import resolve_checkpoint
    from litft.train.trainer import fit

    method = prompt_method(prompt, resolve_checkpoint(Path(checkpoint_dir)))
    config = run_config(checkpoint_dir=checkpoint_dir, out_dir=out_dir, data=data, train=train, eval=eval,
                        objective=objective,
                        prompt=prompt, optimizer=optimizer, precision=precision, devices=devices,
                        num_nodes=num_nodes, strategy=strategy, accelerator=accelerator, resume=resume,
                        overwrite=overwrite)
    return fit(method, checkpoint_dir, out_dir, data, train, eval, precision=precision, devices=devices,
               num_nodes=num_nodes, strategy=strategy, accelerator=accelerator, optimizer=optimizer, resume=resume,
               overwrite=overwrite, run_config=config, objective=objective)


finetune_prompt.cli_argv = objective_cli_argv  # type: ignore[attr-defined]  # --objective NAME
