"""Learning-rate schedule (a pure function of the step, so resuming needs no scheduler state) and the optimizer."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Iterable, Optional, Union

import torch


def lr_at(step: int, total_steps: int, lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
          schedule: str = "cosine") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps`` steps to ``lr``,
    then cosine decay reaching ``min_lr`` when the last step is done (at ``step == total_steps``), or constant ``lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}; expected 'cosine' or 'constant'")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay, vectors (biases, norms, gates) and embeddings do not."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name.split(".")[0]:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def resolve_optimizer(optimizer: Union[str, dict]) -> tuple[type, dict[str, Any]]:
    """The optimizer class and extra init args from ``"AdamW"``, ``"torch.optim.SGD"`` or
    ``{"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}``."""
    if isinstance(optimizer, dict):
        unknown = sorted(set(optimizer) - {"class_path", "init_args"})
        if "class_path" not in optimizer or unknown:
            raise ValueError(f"optimizer={optimizer!r} is invalid: expected a class name or a mapping with "
                             "'class_path' and optional 'init_args'")
        path, init_args = str(optimizer["class_path"]), dict(optimizer.get("init_args") or {})
    else:
        path, init_args = str(optimizer), {}
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "torch.optim")
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError):
        raise ValueError(f"optimizer {path!r} not found: give a torch.optim class name (e.g. AdamW, SGD) or a full "
                         "class path (e.g. bitsandbytes.optim.PagedAdamW8bit)") from None
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer {path!r} is not a torch.optim.Optimizer subclass")
    for key in ("lr", "weight_decay"):
        if key in init_args:
            raise ValueError(f"optimizer init_args sets {key!r}: set it with train.{key} instead")
    return cls, init_args


FUSED_DEVICES = ("cuda", "cpu")  # where train.fused_optimizer=None picks the fused implementation


def build_optimizer(optimizer: Union[str, dict], model: torch.nn.Module, lr: float, weight_decay: float,
                    fused: Optional[bool] = None, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """Instantiate ``optimizer`` over the trainable parameters of ``model``.

    fused (``train.fused_optimizer``): None = the fused implementation on CUDA and CPU when the optimizer has one
    (AdamW, Adam, SGD, Adagrad: one kernel for all parameters instead of a loop over them), torch's default
    elsewhere; True = fused (refused for an optimizer without it); False = never. ``init_args`` naming ``fused``
    take precedence over None; contradicting True/False is refused.
    """
    cls, init_args = resolve_optimizer(optimizer)
    params = inspect.signature(cls.__init__).parameters
    has_fused = "fused" in params
    if fused is True and not has_fused:
        raise ValueError(f"train.fused_optimizer=true but optimizer {cls.__name__} has no fused implementation (torch "
                         "has one for AdamW, Adam, SGD and Adagrad): set train.fused_optimizer to null or false")
    if fused is not None and "fused" in init_args and bool(init_args["fused"]) != fused:
        raise ValueError(f"optimizer init_args sets fused={init_args['fused']} but train.fused_optimizer={fused}: "
                         "set it in one place")
    if fused is None:
        fused = has_fused and device is not None and device.type in FUSED_DEVICES
    if fused and "fused" not in init_args:  # (never fused=False: that would also turn off torch's foreach default)
        init_args["fused"] = True
    groups = param_groups(model.named_parameters(), weight_decay)
    kwargs = {"lr": lr, **init_args}
    if "weight_decay" not in params:
        if weight_decay:
            raise ValueError(f"optimizer {cls.__name__} takes no weight_decay; set train.weight_decay=0")
        for g in groups:
            g.pop("weight_decay", None)
    try:
        return cls(groups, **kwargs)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"optimizer {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in init_args.items())}): {e}"
                         ) from e
