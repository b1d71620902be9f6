"""DDP and FSDP on CPU with gloo (2 processes launched by Fabric), against a 1-process run with the same global
batch; FSDP sharded checkpoints resumed on another world size; bad launch settings refused before any process
starts; a dead rank ends the run instead of hanging.

Tolerance: losses per step agree to rel 1e-5 (fp32, LoRA dropout 0, the same samples per optimizer step; measured
differences are ~1e-7, all-reduce summation order).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litft.train.metrics import read_metrics
from tests.test_finetune import TEMPLATE, TINY, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    make_checkpoint(d / "base")
    rows = (TINY / "data" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[64:72]) + "\n")
    return d


def args(work: Path, out: str, *extra: str, method: str = "lora") -> list[str]:
    return ["finetune", method, str(work / "base"), "--out_dir", str(work / out),
            "--data.train_path", str(work / "train.jsonl"), "--data.val_path", str(work / "val.jsonl"),
            "--data.format", "template", "--data.template", TEMPLATE, "--train.global_batch_size", "8",
            "--train.micro_batch_size", "2", "--train.max_steps", "4", "--train.lr", "1e-2", "--accelerator", "cpu",
            "--precision", "32-true", "--lora.dropout", "0", *extra]


def run(cmd: list[str], env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in [k for k in full_env if k.startswith(("SLURM_", "TORCHELASTIC", "LOCAL_WORLD_SIZE"))]:
        full_env.pop(k)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def litft(work: Path, out: str, *extra: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = run([sys.executable, "-m", "litft", *args(work, out, *extra)], env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, dict[int, float]]:
    """The reference 1-process run and the 2-process DDP and FSDP runs (the FSDP one saves sharded at step 2)."""
    litft(work, "ref")
    litft(work, "ddp", "--devices", "2", "--strategy", "ddp")
    litft(work, "fsdp2", "--devices", "2", "--strategy", "fsdp", "--train.save_interval", "2")
    return {name: losses(work / name) for name in ("ref", "ddp", "fsdp2")}


def assert_close(got: dict[int, float], want: dict[int, float], steps: list[int]) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=RTOL), (s, got, want)


def test_ddp_and_fsdp_match_one_process(runs, work: Path) -> None:
    assert sorted(runs["ref"]) == [1, 2, 3, 4]
    assert_close(runs["ddp"], runs["ref"], [1, 2, 3, 4])
    assert_close(runs["fsdp2"], runs["ref"], [1, 2, 3, 4])
    # final/ of the FSDP run is a plain LoRA checkpoint (only the LoRA weights), loadable without Fabric
    final = work / "fsdp2" / "final"
    assert (final / "lora.safetensors").is_file() and not (final / "model.safetensors").exists()
    step2 = work / "fsdp2" / "checkpoints" / "step-2"
    assert (step2 / "sharded" / ".metadata").is_file() and (step2 / "state.pt").is_file()
    from safetensors.torch import load_file

    from litft.train.checkpoint import load_checkpoint

    ref_lora = load_file(work / "ref" / "final" / "lora.safetensors")
    fsdp_lora = load_file(final / "lora.safetensors")
    assert ref_lora.keys() == fsdp_lora.keys()
    for k in ref_lora:
        assert (ref_lora[k] - fsdp_lora[k]).abs().max() < 1e-4, k
    load_checkpoint(final)


def test_sharded_checkpoint_resumes_on_another_world_size(runs, work: Path) -> None:
    import shutil

    # 2 processes -> 1
    shutil.copytree(work / "fsdp2", work / "to1")
    shutil.rmtree(work / "to1" / "final")
    litft(work, "to1", "--strategy", "fsdp", "--resume", str(work / "to1" / "checkpoints" / "step-2"))
    assert_close(losses(work / "to1"), runs["ref"], [3, 4])
    # 1 process -> 2
    litft(work, "fsdp1", "--strategy", "fsdp", "--train.save_interval", "2")
    assert_close(losses(work / "fsdp1"), runs["ref"], [1, 2, 3, 4])
    shutil.copytree(work / "fsdp1", work / "to2")
    shutil.rmtree(work / "to2" / "final")
    litft(work, "to2", "--strategy", "fsdp", "--devices", "2", "--resume", str(work / "to2" / "checkpoints" / "step-2"))
    assert_close(losses(work / "to2"), runs["ref"], [3, 4])


def test_dead_rank_ends_the_run(work: Path) -> None:
    t0 = time.monotonic()
    r = litft(work, "dead", "--devices", "2", "--train.timeout", "20", env={"LITFT_TEST_DIE": "1:2"}, check=False)
    assert r.returncode != 0
    assert "rank 1: exiting at step 2" in r.stdout + r.stderr
    assert time.monotonic() - t0 < 100
    assert not (work / "dead" / "final").exists()


# ------------------------------------------------------------------------------------------ bad input (in-process)


def _finetune(work: Path, out: str, **kw):
    from litft.data import DataArgs
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs
    from litft.train.args import TrainArgs

    data = DataArgs(train_path=work / "train.jsonl", val_path=work / "val.jsonl", format="template",
                    template=TEMPLATE)
    train = kw.pop("train", TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1))
    return finetune_lora(work / "base", out_dir=work / out, data=data, train=train, lora=LoRAArgs(dropout=0.0),
                         accelerator="cpu", precision="32-true", **kw)


def test_too_many_devices(work: Path) -> None:
    from litft.train.strategy import cpu_process_limit

    with pytest.raises(ValueError, match=r"devices=.* is more than this machine has: \d+ CPU core"):
        _finetune(work, "bad1", devices=cpu_process_limit() + 1)
    assert not (work / "bad1").exists()


def test_num_nodes_inconsistent_with_slurm(work: Path, monkeypatch) -> None:
    for k, v in {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
                 "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NAME": "litft"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="num_nodes=2 does not match the Slurm allocation.*--num_nodes 1"):
        _finetune(work, "bad2", devices=2, num_nodes=2)
    with pytest.raises(ValueError, match="devices=1 does not match the Slurm allocation.*--devices 2"):
        _finetune(work, "bad2", devices=1)
    assert not (work / "bad2").exists()


def test_multinode_without_launcher(work: Path, monkeypatch) -> None:
    for k in ("MASTER_ADDR", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="num_nodes=2 but this process was not started by srun or torchrun"):
        _finetune(work, "bad3", num_nodes=2)


def test_strategy_the_method_cannot_use(work: Path) -> None:
    from litft.train.args import TrainArgs

    with pytest.raises(ValueError, match="hybrid_shard.*needs num_nodes >= 2"):
        _finetune(work, "bad4", strategy="fsdp",
                  train=TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1, sharding="hybrid_shard"))
    with pytest.raises(ValueError, match="train.timeout='soon' is invalid"):
        _finetune(work, "bad4", train=TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1, timeout="soon"))
    assert not (work / "bad4").exists()


def test_qlora_fsdp_refused_on_every_rank(work: Path) -> None:
    """Quantization happens in each process, so each rank refuses at the same point: the run ends, nothing hangs."""
    pytest.importorskip("bitsandbytes")
    r = litft(work, "bad5", "--devices", "2", "--strategy", "fsdp", "--quantize", "bnb.nf4", check=False)
    assert r.returncode != 0
    assert "strategy='fsdp' cannot shard a bitsandbytes-quantized base" in r.stderr
    assert not (work / "bad5" / "final").exists()
