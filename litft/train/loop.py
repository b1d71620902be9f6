"""The parts of a training run around the loop itself (:mod:`litft.train.trainer`): checks of the run's inputs
(precision, devices, resume), the Fabric set-up, the speed and memory switches applied to a prepared model
(attention backend, activation checkpointing, ``torch.compile``, the fused loss) before the objective wraps it,
token counting, and the exact-match check of greedy generations.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from litft.config import Config
from litft.train import checkpoint as ckpt
from litft.train.args import TrainArgs
from litft.train.objectives import Objective, ObjectiveContext, SFTObjective
from litft.train.objectives.sft import IGNORE_INDEX

PRECISIONS = ("bf16-true", "bf16-mixed", "16-mixed", "32-true")
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "cuda", "mps")


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

    def checkpointed(forward: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if mode == "selective":
            return checkpoint(forward, *args, use_reentrant=False, context_fn=selective, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for i, block in enumerate(model.blocks):
        if i % every == 0:
            block.forward = functools.partial(checkpointed, block.forward)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block's forward (after activation checkpointing, which compiles along with it)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def resolve_attention(attention: str, device: torch.device, config: Optional[Config] = None) -> str:
    """The attention backend ("sdpa" or "flex") for ``train.attention`` on ``device`` and the model's ``config``; a
    clear error when flex cannot train there or cannot compute that model."""
    from litft.attention import flex_available

    sinks = config is not None and config.attention_sinks
    if attention == "auto":
        return "flex" if device.type == "cuda" and flex_available() is None and not sinks else "sdpa"
    if attention == "flex":
        reason = flex_available()
        if device.type != "cuda":
            reason = (f"PyTorch's FlexAttention has no backward pass on {device.type} (torch {torch.__version__}); "
                      "it trains on CUDA only")
        elif sinks:
            reason = "this model has attention sinks (attention_sinks: true), which litft's FlexAttention path lacks"
        if reason is not None:
            raise ValueError(f"train.attention='flex' cannot train here: {reason}. Use train.attention=sdpa (or auto)")
    return attention


def prepare_training(model: nn.Module, train: TrainArgs, device: torch.device,
                     objective: type[Objective] = SFTObjective, args: Any = None,
                     context: Optional[ObjectiveContext] = None) -> Objective:
    """Apply the speed and memory switches of ``train`` to ``model`` (after the method prepared it) and wrap it in
    the ``objective`` (with its options ``args``, default its defaults): the attention backend, activation
    checkpointing, ``torch.compile`` of the blocks, activation offloading and the fused loss (both passed to the
    objective in its ``context``). Raises ValueError for a switch the device cannot honour."""
    if train.activation_offloading and device.type != "cuda":
        raise ValueError(f"train.activation_offloading=true needs a CUDA device (it moves activations from GPU to CPU "
                         f"memory); this run is on {device.type}")
    model.attention_backend = resolve_attention(train.attention, device, model.config)
    mode = train.checkpointing_mode()
    if mode != "none":
        enable_activation_checkpointing(model, mode, train.activation_checkpointing_every)
    if train.compile:
        compile_blocks(model)
    context = context or ObjectiveContext()
    context.loss_chunk_size = train.loss_chunk_size if train.fused_loss else None
    context.offload_activations = train.activation_offloading
    return objective(model, args if args is not None else objective.args_type(), context)


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


def make_fabric(accelerator: str, devices: Union[int, str], num_nodes: int, strategy: str, precision: str,
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
        engine.release()  # the cache's memory goes back before training resumes
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
