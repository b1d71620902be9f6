"""tutorials/multi-node.md run as written, on a tiny model on the CPU: the one-device run, `--devices 2` (DDP),
`torchrun --nproc-per-node 2` (FSDP), `srun --ntasks 2` (FSDP) and `sbatch --wait` of
extensions/slurm/sbatch_1node.sh on the localhost Slurm. Every 2-process run must log the same loss per step as
the one-device run (rel 1e-5, fp32), and each must show that two ranks took part.

Only the model path is substituted; the reader's data file is written where the tutorial says. Without a Slurm
(tests/test_slurm.py: `slurm_problem`), the srun/sbatch commands are left out and the test skips after checking
the rest; with LITFT_REQUIRE_SLURM=1 (CI as root) it fails instead.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from tests.test_distributed import RTOL, losses
from tests.test_finetune import make_checkpoint
from tests.test_slurm import slurm_problem
from tests.tutorials import REPO, bash_commands, blocks, run_tutorial

TUTORIAL = REPO / "tutorials" / "multi-node.md"
MODEL = "checkpoints/meta-llama/Llama-3.2-1B"
SLURM_COMMANDS = ("srun", "sbatch")
WORDS = ["good morning", "thank you", "good night", "the cat", "a red ball", "the river", "my friend", "apples",
         "blue sky", "hot tea", "old house", "fast car", "small dog", "big tree", "cold water", "new book"]


def _clean_env() -> dict[str, str]:
    """The test's environment without launcher variables (a pytest run inside an allocation must not look like an
    srun step to the commands)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "LOCAL_WORLD_SIZE"))}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_multinode_tutorial(tmp_path: Path) -> None:
    text = TUTORIAL.read_text()
    commands = bash_commands(text)
    firsts = [shlex.split(c.text)[0] for c in commands]
    assert firsts == ["litft", "litft", "torchrun", "srun", "sbatch"], firsts
    assert all("..." not in c.text for c in commands), "a ```bash command must run as written"

    make_checkpoint(tmp_path / "model", block_size=256)  # the alpaca prompt is ~160 characters
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Shout: {w}", "output": w.upper()}) + "\n" for w in WORDS * 3))
    (tmp_path / "extensions").symlink_to(REPO / "extensions")  # the reader runs from the root of the clone
    subs = {MODEL: str(tmp_path / "model")}

    problem = slurm_problem()
    if problem and os.environ.get("LITFT_REQUIRE_SLURM"):
        pytest.fail(f"LITFT_REQUIRE_SLURM is set but {problem}")
    only = None
    if problem:  # the commands that need no Slurm; run_tutorial writes no file then: write the recipe here
        only = [i for i, first in enumerate(firsts) if first not in SLURM_COMMANDS]
        for block in blocks(text):
            if block.title is not None:
                (tmp_path / block.title).write_text(block.text.replace(MODEL, subs[MODEL]) + "\n")
    ran = run_tutorial(TUTORIAL, cwd=tmp_path, substitutions=subs, env=_clean_env(), timeout=300, only=only)
    logs = [r.stdout + r.stderr for r in ran if r.kind == "bash"]  # in the order of the commands run

    out = tmp_path / "out"
    want = losses(out / "one-device")
    assert sorted(want) == [1, 2, 3, 4]
    runs = ["ddp", "torchrun"] + ([] if problem else ["srun", "sbatch-1node"])
    for run in runs:
        assert (out / run / "final" / "lora.safetensors").is_file(), run
        got = losses(out / run)
        assert sorted(got) == [1, 2, 3, 4], run
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=RTOL), (run, step, got, want)
    assert "(4 micro-batches of 2 per device)" in logs[0]
    assert "(2 micro-batches of 2 per device)" in logs[1] and "(2 micro-batches of 2 per device)" in logs[2]
    if problem:
        pytest.skip(f"the srun and sbatch commands of the tutorial did not run: {problem}")
    # srun --label: each task prefixes its lines; both joined the process group
    srun_log = logs[3]
    assert "0: Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in srun_log, srun_log[-3000:]
    assert "1: Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in srun_log, srun_log[-3000:]
    # the sbatch job's log (its --output): both ranks of the template's srun step, and the run finished
    job_log = (out / "sbatch-1node.log").read_text()
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in job_log, job_log[-3000:]
    assert "final checkpoint: out/sbatch-1node/final" in job_log
