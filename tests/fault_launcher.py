"""``python tests/fault_launcher.py ARGS...`` runs ``litft ARGS...`` with a fault injected from the test side.

litft itself has no test hooks: this script patches the function a fault belongs in, then calls
:func:`litft.cli.main`. Fabric starts the other ranks of a multi-process run by running this same script again
(``sys.argv``), so every rank is patched. The faults, set in the environment by the test:

- ``LITFT_FAULT_SAVE_DELAY=seconds`` (every save) or ``step:seconds`` (the save of that step): sleep after the
  training state is written into a step checkpoint's temp dir, before the dir is renamed into place (a kill then
  lands in the middle of a save).
- ``LITFT_FAULT_DIE=rank:step``: that rank exits (status 3) as the step begins.
- ``LITFT_FAULT_HANG=rank:step``: that rank sleeps as the step begins, outside any collective, until killed.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank_step(variable: str) -> tuple[int, int] | None:
    spec = os.environ.get(variable, "")
    if not spec:
        return None
    rank, _, step = spec.partition(":")
    return int(rank), int(step)


def _patch_save_delay(spec: str) -> None:
    from litft.train import checkpoint

    at, _, seconds = spec.rpartition(":")
    original = checkpoint.write_training_state

    @functools.wraps(original)
    def slow(directory: Path, state: dict[str, Any]) -> None:
        original(directory, state)
        if not at or int(at) == int(state["step"]):
            time.sleep(float(seconds))

    checkpoint.write_training_state = slow


def _patch_step_faults(die: tuple[int, int] | None, hang: tuple[int, int] | None) -> None:
    from litft.train.trainer import Trainer

    original = Trainer.train_step

    @functools.wraps(original)
    def faulty(self: Trainer, micro: Any) -> Any:
        here = (self.fabric.global_rank, self.state.step + 1)
        if here == die:
            print(f"rank {here[0]}: exiting at step {here[1]} (LITFT_FAULT_DIE)", flush=True)
            os._exit(3)
        if here == hang:
            print(f"rank {here[0]}: hanging at step {here[1]} (LITFT_FAULT_HANG)", flush=True)
            time.sleep(3600)
        return original(self, micro)

    Trainer.train_step = faulty


def main() -> None:
    delay = os.environ.get("LITFT_FAULT_SAVE_DELAY", "")
    if delay:
        _patch_save_delay(delay)
    die, hang = _rank_step("LITFT_FAULT_DIE"), _rank_step("LITFT_FAULT_HANG")
    if die or hang:
        _patch_step_faults(die, hang)
    from litft.cli import main as litft_main

    litft_main(sys.argv[1:])


if __name__ == "__main__":
    main()
