"""The one training loop (:mod:`litft.train.loop`) and its parts: arguments, schedule, checkpoints, metrics.

Light to import: :mod:`lightning` is imported only when a run starts.
"""

from __future__ import annotations

from litft.train.args import EvalArgs, TrainArgs

__all__ = ["TrainArgs", "EvalArgs"]
