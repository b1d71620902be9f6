"""Fine-tuning entry points: ``litft finetune full|lora|adapter|prompt``.

Each entry function's signature *is* its CLI and its YAML (``--config``): jsonargparse turns the
dataclass arguments into ``--train.lr``, ``--lora.r``, ``--data.packing`` and so on. The functions only
build their method (:mod:`litft.methods`) and call the one training loop, :func:`litft.train.trainer.fit`.
``--objective`` (:mod:`litft.train.objectives`) says what every one of them trains towards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["run_config", "finetune_full", "finetune_lora", "finetune_adapter", "finetune_prompt"]


def run_config(**values: Any) -> dict[str, Any]:
    """The arguments of an entry function as plain YAML data (dataclasses → mappings, paths made absolute), the
    content of ``out_dir/run.yaml``."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value.resolve())
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in values.items()}


def __getattr__(name: str) -> Any:
    if name in ("finetune_full", "finetune_lora", "finetune_adapter", "finetune_prompt"):
        import importlib

        return getattr(importlib.import_module(f"litft.finetune.{name.split('_')[1]}"), name)
    raise AttributeError(f"module 'litft.finetune' has no attribute {name!r}")
