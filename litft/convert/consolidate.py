"""``litft convert consolidate``: the step checkpoint of an FSDP run → the files of a normal checkpoint.

With ``--strategy fsdp`` a step checkpoint (``<out_dir>/checkpoints/step-N/``) holds its weights as
torch.distributed.checkpoint shards in ``sharded/`` (every rank writes its own, in parallel, with the optimizer
state; they resume on any number of devices), and only the trainable weights: the frozen base of a LoRA/adapter run
stays in its base checkpoint. ``final/`` is consolidated at the end of the run; this does the same for a step
checkpoint, in one process on the CPU, so that what loads a checkpoint (generate, chat, serve, evaluate,
convert to_hf/to_peft/merge_lora, ``LLM.load``) loads it too.

The method's own save code writes the result (:func:`litft.checkpoint.write_model_files`, as for the step
checkpoints of a run without FSDP), on a model built on the meta device with the method applied as in training
(its settings from the run's ``run.yaml``) and only the trainable weights read from the shards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import yaml


def consolidate(step_dir: Path, out_dir: Optional[Path] = None, overwrite: bool = False) -> Path:
    """FSDP step checkpoint (step-N/sharded/) → normal checkpoint files, in step-N itself unless --out_dir.

    One process on the CPU (no GPU, no launcher, whatever the number of processes that wrote the shards). By
    default the files go into the step directory itself, which then loads in generate, chat, serve, evaluate,
    convert to_hf and ``LLM.load``, and still resumes. The result holds what the step checkpoint of a run without
    FSDP holds: model.safetensors (``finetune full``), or lora.safetensors + lora.yaml / adapter.safetensors +
    adapter.yaml with base.yaml naming the base checkpoint (LoRA, adapter), plus model_config.yaml and the
    tokenizer files. The whole trained model (full) or the trainable weights (LoRA, adapter) are read into memory
    once; the optimizer state is not read.

    Args:
        step_dir: a ``checkpoints/step-N`` directory of a ``litft finetune ... --strategy fsdp`` run (LoRA and
            adapter runs also need the run's ``run.yaml``, two levels up, for the method's settings).
        out_dir: write a standalone checkpoint here (without the shards and the training state). Default: into
            ``step_dir`` itself, beside ``sharded/`` and ``state.pt``, which stay: the step checkpoint then loads
            everywhere in place and still resumes with ``--strategy fsdp``. Either way the files appear at once
            (written to a temp dir, then renamed), never half-written.
        overwrite: write again over weights ``step_dir`` already holds (consolidated before), or replace a
            non-empty ``out_dir``.
    """
    from litft.checkpoint import BASE_FILE, read_base, write_model_files
    from litft.config import Config
    from litft.train import checkpoint as ckpt
    from litft.weights import atomic_directory, print_written, weight_files

    step_dir = Path(step_dir)
    sharded = _check_step_dir(step_dir)
    state = ckpt.load_training_state(step_dir)
    config = Config.from_checkpoint(step_dir)
    method = _method(state.get("method"), step_dir)
    base_dir = None
    if not method.full:
        base = read_base(step_dir)
        if base is None:
            raise FileNotFoundError(f"{step_dir / BASE_FILE}: not found (a {method.name} checkpoint names the "
                                    "base checkpoint its weights apply to there)")
        base_dir = Path(base["base_checkpoint"])
    in_place = out_dir is None or Path(out_dir).resolve() == step_dir.resolve()
    target = step_dir if in_place else Path(out_dir)
    old = weight_files(step_dir) if in_place else []
    if old and not overwrite:
        raise FileExistsError(f"{step_dir} already holds weights ({', '.join(f.name for f in old)}): it was "
                              "consolidated before and loads as it is; pass --overwrite true to write them again")
    if not in_place and target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite true to replace it")

    model = _model_from_shards(config, method, sharded)
    with atomic_directory(target, overwrite=overwrite or in_place) as tmp:
        write_model_files(model, tmp, method.save, step_dir, base_dir, method.name)
        if in_place:  # the shards and the training state (and anything else there) stay, as hard links
            skip = {f.name for f in old} | {"model.safetensors.index.json"}
            for entry in step_dir.iterdir():
                if entry.name in skip or (tmp / entry.name).exists():
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, tmp / entry.name)
    print_written(target, f"consolidated the {method.name} weights of {step_dir} (step {state.get('step')})")
    return target


def _check_step_dir(step_dir: Path) -> Path:
    """``step_dir/sharded``, or a clear error saying what ``step_dir`` is instead."""
    from litft.train import checkpoint as ckpt
    from litft.weights import weight_files

    if not step_dir.is_dir():
        raise FileNotFoundError(f"{step_dir}: no such directory (expected a checkpoints/step-N directory of a run "
                                "trained with --strategy fsdp)")
    sharded = step_dir / ckpt.SHARDED
    if sharded.is_dir() and (sharded / ".metadata").is_file() and (step_dir / ckpt.STATE_FILE).is_file():
        return sharded
    if (step_dir / ckpt.CHECKPOINTS).is_dir() or (step_dir / ckpt.RUN_FILE).is_file():
        found = [str(d) for _, d in ckpt.list_checkpoints(step_dir)]
        hint = f" (its step checkpoints: {', '.join(found)})" if found else " (it has no step checkpoints)"
        raise ValueError(f"{step_dir} is a run directory, not a step checkpoint: pass one of its "
                         f"{ckpt.CHECKPOINTS}/step-N directories{hint}")
    if not sharded.is_dir() and weight_files(step_dir):
        raise ValueError(f"{step_dir} is not an FSDP step checkpoint (no {ckpt.SHARDED}/ directory): it holds its "
                         f"weights already ({', '.join(f.name for f in weight_files(step_dir))}) and loads as it is")
    what = "no " + " and no ".join(p for p, ok in ((f"{ckpt.SHARDED}/.metadata", (sharded / ".metadata").is_file()),
                                                   (ckpt.STATE_FILE, (step_dir / ckpt.STATE_FILE).is_file())) if not ok)
    raise ValueError(f"{step_dir} is not an FSDP step checkpoint ({what}): expected a {ckpt.CHECKPOINTS}/step-N "
                     f"directory written by `litft finetune ... --strategy fsdp` ({ckpt.SHARDED}/ with the shards and "
                     f"their .metadata, {ckpt.STATE_FILE})")


def _method(name: Any, step_dir: Path) -> Any:
    """The training method of the run, as ``litft finetune`` built it, its settings read from the run's run.yaml."""
    from litft import methods
    from litft.train import checkpoint as ckpt
    from litft.weights import args_from_mapping

    kind = methods.get(name, str(step_dir / ckpt.STATE_FILE))
    if kind.args_type is None:
        return kind.build()
    run_file = step_dir.resolve().parent.parent / ckpt.RUN_FILE
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file}: not found; consolidating a {name} step checkpoint needs the run's "
                                f"run.yaml (its {name} settings) two levels above the step directory, as `litft "
                                "finetune` wrote it")
    try:
        run = yaml.safe_load(run_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{run_file}: not valid YAML: {e}") from e
    if not isinstance(run, dict) or not isinstance(run.get(name), dict):
        raise ValueError(f"{run_file}: expected a '{name}:' mapping (the {name} settings the run trained with)")
    return kind.build(args_from_mapping(run[name], kind.args_type, f"{run_file} ({name}:)"))


def _model_from_shards(config: Any, method: Any, sharded: Path) -> torch.nn.Module:
    """The model of ``config`` on the meta device, prepared by ``method``, its trainable weights read from the shards
    (the frozen ones stay on the meta device: a LoRA/adapter save writes only the method's weights)."""
    from litft.model import GPT
    from litft.train.strategy import read_sharded_model, sharded_model_shapes

    with torch.device("meta"):
        model = GPT(config)
        method.prepare(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shapes = sharded_model_shapes(sharded)
    known = set(model.state_dict()) | {n for n, _ in model.named_parameters()}
    where = f"{sharded} ({method.name} run; model_config.yaml and the method's settings in run.yaml)"
    unknown = sorted(set(shapes) - known)
    missing = sorted(set(trainable) - set(shapes))
    if unknown or missing:
        detail = "; ".join(part for part in (
            f"tensors this model does not have: {', '.join(unknown[:5])}" if unknown else "",
            f"trainable weights missing from the shards: {', '.join(missing[:5])}" if missing else "") if part)
        raise ValueError(f"{where}: the shards do not match the model: {detail}")
    wrong = [f"{n} {list(shapes[n][0])} (model: {list(p.shape)})" for n, p in trainable.items()
             if tuple(shapes[n][0]) != tuple(p.shape)]
    if wrong:
        raise ValueError(f"{where}: tensors of another shape than the model's: {', '.join(wrong[:5])}")
    model.load_state_dict(read_sharded_model(sharded, trainable), strict=False, assign=True)
    if method.full:
        model.tie_weights()
    model.init_buffers(torch.device("cpu"))
    return model


def _link_or_copy(src: Any, dst: Any) -> Any:
    """A hard link (no data copied: the shards can be large), or a copy where the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
