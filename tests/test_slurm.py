"""`srun -n 2 litft finetune ...` under the real Slurm on localhost (started by `.ci/run` with
`extensions/slurm/localhost.sh start`): both ranks take part, and a mismatched allocation is refused on every rank.
Skips, with the reason, where no Slurm is installed or its node is not up."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.test_distributed import RTOL, args, litft, losses, run, work  # noqa: F401  (work: the fixture)


def _slurm_up() -> str:
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


pytestmark = pytest.mark.skipif(bool(_slurm_up()), reason=_slurm_up() or "slurm up")


def srun(work, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["srun", "-n", "2", "--label", "--time", "5", sys.executable, "-m", "litft", *args(work, out, *extra)]
    return run(cmd, timeout=240)


def test_srun_two_ranks(work) -> None:  # noqa: F811
    r = srun(work, "srun", "--devices", "2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    # both tasks joined the process group (srun --label prefixes each line with the task id)
    assert "1: Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "0: Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in out
    assert "(2 micro-batches of 2 per device)" in out  # global batch 8 = 2 ranks x 2 micro-batches x 2
    assert (work / "srun" / "final" / "lora.safetensors").is_file()
    # rank 1's half of every step counted: the losses are those of one process training on the whole batch
    litft(work, "srun_ref")
    want, got = losses(work / "srun_ref"), losses(work / "srun")
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=RTOL)


def test_srun_mismatched_allocation(work) -> None:  # noqa: F811
    r = srun(work, "srun_bad", "--devices", "2", "--num_nodes", "2")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "0: litft finetune lora: error: num_nodes=2 does not match the Slurm allocation" in out
    assert "1: litft finetune lora: error: num_nodes=2 does not match the Slurm allocation" in out
    assert not (work / "srun_bad").exists()
