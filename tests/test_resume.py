"""Step-exact resume: SIGKILL mid-run or mid-save, then `--resume auto` continues with the same per-step losses as an
uninterrupted run; a kill during a checkpoint write leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litft.cli import main
from litft.checkpoint import load_checkpoint
from litft.train.checkpoint import list_checkpoints, load_training_state
from litft.train.metrics import read_metrics
from tests.test_finetune import TEMPLATE, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAULT_LAUNCHER = REPO / "tests" / "fault_launcher.py"  # litft with a fault injected (tests/fault_launcher.py)
STEPS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ckpt = make_checkpoint(root / "base", seed=1)
    rows = (REPO / "litft" / "assets" / "tiny" / "data" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:40]) + "\n")
    return root, ckpt


def args(method: str, ckpt: Path, root: Path, out: Path, *extra: str) -> list[str]:
    """A run whose steps draw random numbers (LoRA dropout, shuffled data over 2+ epochs) and save every 4 steps."""
    a = ["finetune", method, str(ckpt), "--out_dir", str(out), "--accelerator", "cpu", "--precision", "32-true",
         "--data.train_path", str(root / "train.jsonl"), "--data.template", TEMPLATE,
         "--data.val_split_fraction", "0.1", "--train.max_steps", str(STEPS), "--train.global_batch_size", "8",
         "--train.micro_batch_size", "4", "--train.lr", "0.01", "--train.save_interval", "4",
         "--train.keep_last", "2", "--eval.interval", "6"]
    if method == "lora":
        a += ["--lora.dropout", "0.3", "--lora.r", "4"]
    if method == "adapter":
        a += ["--adapter.start_layer", "1", "--adapter.prompt_length", "3"]
    return a + list(extra)


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def reference(setup):
    root, ckpt = setup
    out = root / "reference"
    main(args("lora", ckpt, root, out))
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [n for n, _ in list_checkpoints(out)] == [8, 12]  # keep_last 2
    return losses


def launch(cli_args: list[str], delay: str) -> subprocess.Popen:
    env = {**os.environ, "LITFT_FAULT_SAVE_DELAY": delay, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(FAULT_LAUNCHER), *cli_args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_run_then_resume_auto_gives_the_same_losses(setup, reference):
    root, ckpt = setup
    out = root / "killed"
    # the save of step 12 sleeps, so the run is certainly alive when step-4 appears; it is killed right then
    proc = launch(args("lora", ckpt, root, out), delay="12:60")
    wait_for(lambda: (out / "checkpoints" / "step-4" / "state.pt").is_file(), proc)
    kill9(proc)
    assert not (out / "final").exists()
    done = max(n for n, _ in list_checkpoints(out))
    assert done in (4, 8)
    main(args("lora", ckpt, root, out, "--resume", "auto"))
    assert step_losses(out) == reference
    weights = (out / "final" / "lora.safetensors").read_bytes()
    main(args("lora", ckpt, root, out, "--resume", "auto"))  # finished: nothing to do, nothing rewritten
    assert (out / "final" / "lora.safetensors").read_bytes() == weights and step_losses(out) == reference


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(setup, reference):
    root, ckpt = setup
    out = root / "killed-in-save"
    proc = launch(args("lora", ckpt, root, out), delay="8:60")
    ckpts = out / "checkpoints"
    wait_for(lambda: ckpts.is_dir() and any(p.name.startswith(".step-8.tmp-") for p in ckpts.iterdir()), proc)
    time.sleep(0.2)  # inside the save: weights written, sleeping before the rename
    kill9(proc)
    assert [n for n, _ in list_checkpoints(out)] == [4]
    assert not (ckpts / "step-8").exists()
    state = load_training_state(ckpts / "step-4")  # intact: the state and the weights load
    assert state["step"] == 4
    load_checkpoint(ckpts / "step-4")
    main(args("lora", ckpt, root, out, "--resume", "auto"))
    assert step_losses(out) == reference
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # the stale temp dir is gone


@pytest.mark.parametrize("method", ["full", "adapter"])
def test_resume_from_a_checkpoint_path(setup, method):
    """`--resume <checkpoints/step-N>` in a new out_dir continues exactly (full: weights from the checkpoint)."""
    root, ckpt = setup
    a = root / f"{method}-a"
    main(args(method, ckpt, root, a, "--train.max_steps", "8"))
    b = root / f"{method}-b"
    main(args(method, ckpt, root, b, "--train.max_steps", "8", "--resume", str(a / "checkpoints" / "step-4")))
    full = step_losses(a)
    assert step_losses(b) == {k: v for k, v in full.items() if k > 4}


def test_resume_refuses_a_checkpoint_of_another_method(setup, reference, capsys):
    root, ckpt = setup
    with pytest.raises(SystemExit):
        main(args("adapter", ckpt, root, root / "x", "--resume", str(root / "reference" / "checkpoints" / "step-8")))
    assert "written by a 'lora' run" in capsys.readouterr().err
    assert not (root / "x").exists()


def test_resume_refuses_another_global_batch_size(setup, reference, capsys):
    """The step, data position and schedule of a checkpoint are counted in its run's batches: another
    train.global_batch_size is refused (naming both values and the checkpoint), before anything is written."""
    root, ckpt = setup
    step8 = root / "reference" / "checkpoints" / "step-8"
    with pytest.raises(SystemExit) as e:
        main(args("lora", ckpt, root, root / "y", "--resume", str(step8), "--train.global_batch_size", "4"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert (f"litft finetune lora: error: {step8} was saved by a run with train.global_batch_size=8, this run has "
            "train.global_batch_size=4: resuming would change the samples per step, the data position and the "
            "schedule mid-run. Resume with --train.global_batch_size 8") in err, err
    assert not (root / "y").exists()
