"""litft under the real Slurm on localhost (started by `.ci/run` with `extensions/slurm/localhost.sh start`): a
mismatched allocation is refused on every rank, and the sbatch templates are valid bash whose litft command parses
to the settings the template promises. `srun -n 2` training and `sbatch --wait` of the one-node template run in
tests/test_multinode_tutorial.py (the tutorial's commands), where their losses are compared with one process.

Where no Slurm is installed or its node is not up, these tests skip with the reason; with LITFT_REQUIRE_SLURM=1
(set by `.ci/run` as root, where Slurm can always be set up) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_distributed import REPO, args, run, work  # noqa: F401  (work: the fixture)

TEMPLATES = REPO / "extensions" / "slurm"


def slurm_problem() -> str:
    """Why Slurm cannot run jobs here ("" when `sinfo` shows a node that is up)."""
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        return "Slurm is not installed (no sinfo/srun): run `bash extensions/slurm/localhost.sh start` as root"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    states = r.stdout.split()
    if r.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"the Slurm node is not up (sinfo: {r.stdout.strip() or r.stderr.strip()!r})"
    return ""


@pytest.fixture
def slurm() -> None:
    problem = slurm_problem()
    if problem and os.environ.get("LITFT_REQUIRE_SLURM"):
        pytest.fail(f"LITFT_REQUIRE_SLURM is set but {problem}")
    if problem:
        pytest.skip(problem)


def test_srun_mismatched_allocation(slurm, work) -> None:  # noqa: F811
    """Each rank refuses on its own, before any collective: no --kill-on-bad-exit, which would let the first rank to
    fail kill the other before it prints its error."""
    cmd = ["srun", "-n", "2", "--label", "--time", "5", sys.executable, "-m", "litft",
           *args(work, "srun_bad", "--devices", "2", "--num_nodes", "2")]
    r = run(cmd, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "0: litft finetune lora: error: num_nodes=2 does not match the Slurm allocation" in out
    assert "1: litft finetune lora: error: num_nodes=2 does not match the Slurm allocation" in out
    assert not (work / "srun_bad").exists()


@pytest.mark.parametrize("template, nodes, tasks, sharding", [("sbatch_1node.sh", 1, 4, "full_shard"),
                                                              ("sbatch_multinode.sh", 4, 8, "hybrid_shard")])
def test_sbatch_template_parses(template: str, nodes: int, tasks: int, sharding: str, tmp_path: Path) -> None:
    """`bash -n`, then the template run as sbatch would run it on a cluster of ``nodes`` x ``tasks`` GPUs, with
    `srun` standing in as a function that runs litft's own parser (`--print_config`) on the litft command: every
    option the template passes exists and ends up where it promises (a multi-node job cannot run here; the
    one-node template runs for real in tests/test_multinode_tutorial.py)."""
    script = TEMPLATES / template
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "srun --kill-on-bad-exit=1 litft finetune" in text
    (tmp_path / "lora.yaml").write_text("checkpoint_dir: checkpoints/my-model\ndata:\n  train_path: data/train.jsonl\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NAME="litft", SLURM_JOB_ID="7", SLURM_NNODES=str(nodes),
               SLURM_NTASKS_PER_NODE=str(tasks), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    parse = ('srun() { while [ "${1#-}" != "$1" ]; do shift; done; "$@" --print_config; }; export -f srun; '
             f'bash {script} --train.max_steps 10')
    r = subprocess.run(["bash", "-c", parse], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    config = yaml.safe_load(r.stdout)
    assert config["checkpoint_dir"] == "checkpoints/my-model" and config["data"]["train_path"] == "data/train.jsonl"
    assert (config["devices"], config["num_nodes"], config["strategy"]) == (tasks, nodes, "fsdp")
    assert config["train"]["sharding"] == sharding and config["train"]["timeout"] == "30m"
    assert config["train"]["max_steps"] == 10  # options after the script name reach litft
    if nodes > 1:
        assert config["resume"] == "auto" and config["train"]["save_interval"] == 500
