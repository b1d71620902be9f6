"""The one training loop (:mod:`litft.train.trainer`) and its parts: objectives, arguments, schedule, checkpoints,
metrics, strategies; :mod:`litft.train.loop` checks a run's inputs and sets up Fabric and the speed switches.

Light to import: :mod:`lightning` is imported only when a run starts.
"""

from __future__ import annotations

from litft.train.args import EvalArgs, TrainArgs

__all__ = ["TrainArgs", "EvalArgs"]
