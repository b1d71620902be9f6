"""The Trainer's parts: RunState through state.pt, and the --objective option of every ``litft finetune`` command."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from litft.cli import main
from litft.train.checkpoint import list_checkpoints, load_training_state
from litft.train.metrics import read_metrics
from litft.train.objectives import ObjectiveOutput, SFTObjective
from litft.train.trainer import RunState
from tests.inprocess_cli import litft_error
from tests.test_finetune import TEMPLATE, ckpt, data_dir  # noqa: F401  (fixtures)


def run_args(ckpt: Path, data: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["finetune", method, str(ckpt), "--out_dir", str(out), "--accelerator", "cpu", "--precision", "32-true",
            "--data.train_path", str(data / "train.jsonl"), "--data.template", TEMPLATE,
            "--data.val_split_fraction", "0.1", "--train.max_steps", "3", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.save_interval", "2", "--eval.interval", "2", *extra]


def test_run_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    state = RunState(step=7, micro_batches=30, tokens=1234, elapsed=5.5, best_val=1.25, bad_evals=2,
                     controllers={"rules": [], "counts": []}, rng={"torch": torch.get_rng_state()},
                     data={"epoch": 1, "position": 3})
    torch.save(state.state_dict(), tmp_path / "state.pt")
    loaded = RunState()
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(loaded.rng["torch"], state.rng["torch"])
    loaded.rng, state.rng = None, None
    assert loaded == state
    assert RunState().best_val == math.inf


@pytest.mark.parametrize("method", ["full", "lora"])
def test_objective_sft_is_the_default_and_is_recorded(method, ckpt, data_dir, tmp_path):  # noqa: F811
    """``--objective sft`` (and ``--objective=sft``, ``--objective.name sft``) trains exactly as no --objective
    does; run.yaml and state.pt record the objective; ``--config run.yaml`` runs it again."""
    main(run_args(ckpt, data_dir, tmp_path / "default", method))
    main(run_args(ckpt, data_dir, tmp_path / "sft", method, "--objective", "sft"))
    main(run_args(ckpt, data_dir, tmp_path / "eq", method, "--objective=sft"))
    losses = {name: [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / name)
                     if "loss" in r or "val_loss" in r] for name in ("default", "sft", "eq")}
    assert len(losses["default"]) >= 4
    assert losses["sft"] == losses["default"] == losses["eq"]
    run = yaml.safe_load((tmp_path / "sft" / "run.yaml").read_text())
    assert run["objective"] == {"name": "sft"}
    step, path = list_checkpoints(tmp_path / "sft")[-1]
    saved = load_training_state(path)
    assert saved["objective"] == "sft" and saved["method"] == method and saved["step"] == step
    assert set(RunState().state_dict()) <= set(saved)
    main(["finetune", method, "--config", str(tmp_path / "sft" / "run.yaml"), "--out_dir", str(tmp_path / "again")])
    assert [(r["step"], r.get("loss")) for r in read_metrics(tmp_path / "again") if "loss" in r] == \
        [(s, loss) for s, loss, _ in losses["sft"] if loss is not None]


def test_an_unknown_objective_is_refused_before_anything_is_written(ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    for option in (["--objective", "nope"], ["--objective.name", "nope"]):
        err = litft_error(capsys, *run_args(ckpt, data_dir, out, "lora", *option))
        assert "objective.name='nope' is invalid: expected one of sft" in err
        assert not out.exists()


class _ProbeObjective(SFTObjective):
    """SFT whose metrics are the summed loss again and the number of units: the Trainer must log the first as the
    loss itself and the second as exactly 1 (both divided by the step's units, over all micro-batches)."""

    name = "probe"
    metrics = ("probe/loss", "probe/units")
    perplexity = False

    def forward(self, **batch):
        out = super().forward(**batch)
        units = torch.tensor(float(self.units(batch)), device=out.loss.device)
        return ObjectiveOutput(out.loss, {"probe/loss": out.loss.detach(), "probe/units": units})


def test_objective_metrics_are_means_over_the_units_under_their_own_names(ckpt, data_dir, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    from litft.finetune.lora import finetune_lora
    from litft.train import objectives

    monkeypatch.setitem(objectives.OBJECTIVES, "probe", _ProbeObjective)
    from litft.data import DataArgs
    from litft.train.args import EvalArgs, TrainArgs

    finetune_lora(ckpt, tmp_path / "out", accelerator="cpu", precision="32-true",
                  data=DataArgs(train_path=data_dir / "train.jsonl", template=TEMPLATE, val_split_fraction=0.1),
                  train=TrainArgs(max_steps=3, global_batch_size=4, micro_batch_size=2),
                  eval=EvalArgs(interval=2), objective=objectives.ObjectiveArgs(name="probe"))
    records = read_metrics(tmp_path / "out")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["probe/loss"] == pytest.approx(r["loss"], rel=1e-6) and r["probe/units"] == pytest.approx(1.0)
    vals = [r for r in records if "val_loss" in r]
    assert vals and all(r["val_probe/loss"] == pytest.approx(r["val_loss"], rel=1e-6) for r in vals)
    assert all(r["val_probe/units"] == pytest.approx(1.0) and "val_ppl" not in r for r in vals)
