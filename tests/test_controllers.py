"""Training controllers (`--train.controllers`, fms-hf-tuning's trainer controller rules): the rule language, its
errors, and real runs that stop or save exactly where a run without rules shows the rule first holds (the runs are
deterministic: same seed, same data order, fp32 on the CPU, so the losses of the reference run are the ones the
controlled run sees up to its stop)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from litft.cli import main
from litft.train.checkpoint import list_checkpoints, load_training_state
from litft.train.controllers import Controller, Controllers, check_controllers_fit, validate_controllers
from litft.train.metrics import read_metrics
from tests.test_finetune import TEMPLATE, TINY, make_checkpoint

STEPS = 12


# ----------------------------------------------------------------------------------------- the rule language


@pytest.mark.parametrize("rule, values, holds", [
    ("loss < 0.5", {"loss": 0.4}, True),
    ("loss < 0.5", {"loss": 0.5}, False),
    ("loss <= 0.5 and step > 3", {"loss": 0.5, "step": 4}, True),
    ("not (loss < 1) or step % 5 == 0", {"loss": 0.1, "step": 10}, True),
    ("0.1 < lr * 1000 <= 0.2", {"lr": 1.5e-4}, True),
    ("0.1 < lr * 1000 <= 0.2", {"lr": 2.5e-4}, False),
    ("-loss > -1", {"loss": 2.0}, False),
    ("tokens / step >= 100 or epoch > 2", {"tokens": 500, "step": 5, "epoch": 0.5}, True),
])
def test_rules_evaluate_like_python(rule, values, holds):
    assert eval(rule, {"__builtins__": {}}, dict(values)) is holds  # the oracle: Python itself
    assert Controllers([Controller(rule)]).on_step(values) == ([(0, "stop")] if holds else [])


def test_a_division_by_zero_does_not_hold_and_does_not_stop_the_run():
    c = Controllers([Controller("loss / (step - 1) > 0")])
    assert c.on_step({"step": 1, "loss": 1.0}) == []
    assert c.on_step({"step": 2, "loss": 1.0}) == [(0, "stop")]


def test_prev_values_are_those_of_the_rules_previous_check():
    c = Controllers([Controller("val_loss / prev_val_loss > 1.01", when="eval")])
    assert c.on_eval(2.0) == []  # no previous check yet: the rule does not hold
    assert c.on_eval(2.01) == []
    assert c.on_eval(2.04) == [(0, "stop")]


@pytest.mark.parametrize("rule, message", [
    ("loss <", "is not a valid rule"),
    ("", "is empty"),
    ("los < 1", "reads 'los', which is not a training metric: expected one of step, epoch, lr, loss"),
    ("loss", "is a value, not a condition"),
    ("loss + 1", "is a value, not a condition"),
    ("__import__('os').system('true')", "is not allowed in a rule"),
    ("loss.real < 1", "is not allowed in a rule"),
    ("abs(loss) < 1", "is not allowed in a rule"),
    ("loss < 'a'", "is not allowed in a rule"),
    ("loss < 1 if True else 2", "is not allowed in a rule"),
    ("loss ** 2 < 1", "is not allowed in a rule"),
    ("loss in [1]", "is not allowed in a rule"),
])
def test_bad_rules_are_named_with_what_is_expected(rule, message):
    with pytest.raises(ValueError, match="train.controllers\\[0\\].rule=") as e:
        validate_controllers([{"rule": rule}])
    assert message in str(e.value)


@pytest.mark.parametrize("controller, message", [
    ({"rule": "loss < 1", "patience": 0}, "train.controllers[0].patience=0 is invalid: expected an integer >= 1"),
    ({"rule": "loss < 1", "when": "epochs"}, "train.controllers[0].when='epochs' is invalid"),
    ({"rule": "loss < 1", "action": "halt"},
     "train.controllers[0].action='halt' is invalid: expected one of stop, save"),
    ({"rule": "loss < 1", "patiance": 2}, "train.controllers[0] has unknown field(s) patiance"),
    ({"when": "step"}, "train.controllers[0] has no rule"),
])
def test_bad_fields_are_named(controller, message):
    with pytest.raises(ValueError) as e:
        validate_controllers([controller])
    assert message in str(e.value)


def test_rules_that_could_never_read_their_values_are_refused():
    with pytest.raises(ValueError, match=r"reads grad_norm, which is only measured with clipping: set train.max_norm"):
        check_controllers_fit([Controller("grad_norm > 10")], None, 5, True)
    with pytest.raises(ValueError, match=r"validation only runs at the end: set eval.interval"):
        check_controllers_fit([Controller("val_loss < 1")], 1.0, None, True)
    with pytest.raises(ValueError, match=r"checked after each validation, but the run has no validation data"):
        check_controllers_fit([Controller("step > 1", when="eval")], 1.0, 5, False)
    check_controllers_fit([Controller("grad_norm > 10 or val_loss < 1")], 1.0, 5, True)


def test_patience_missing_values_and_the_epoch_mean():
    c = Controllers([Controller("loss > prev_loss", patience=2), Controller("val_loss < 9", action="save"),
                     Controller("loss < 2.5", when="epoch")])
    fired = [c.on_step({"step": s, "loss": x}) for s, x in enumerate([3.0, 2.0, 2.5, 2.6, 2.4, 2.7, 2.8], 1)]
    # prev_loss is unknown at the first check; the loss goes up at steps 3, 4 (fires, the count restarts), 6, 7 (fires)
    assert [s for s, f in enumerate(fired, 1) if f] == [4, 7]
    assert all(f == [(0, "stop")] for f in fired if f)
    assert c.on_step({"step": 8, "loss": 1.0}) == []  # rule 1 reads val_loss, not known yet: it does not hold
    assert c.on_eval(None) == [] and c.on_eval(10.0) == []  # no "eval" rules
    assert c.on_epoch_end() == [(2, "stop")]  # the mean of the 8 step losses, 19.0 / 8 = 2.375 < 2.5
    assert c.on_step({"step": 9, "loss": 1.0}) == []  # val_loss 10 is known now, and not < 9
    c.on_eval(8.0)
    assert c.on_step({"step": 10, "loss": 1.0}) == [(1, "save")]
    c2 = Controllers([Controller("loss < 2.5", when="epoch")])
    for x in [3.0, 2.0, 2.5, 2.6]:
        c2.on_step({"loss": x})
    assert c2.on_epoch_end() == []  # mean 2.525
    for x in [2.0, 2.8]:
        c2.on_step({"loss": x})
    assert c2.on_epoch_end() == [(0, "stop")]  # mean 2.4: only this epoch's steps count


def test_eval_rules_and_save_actions_fire_after_validation():
    c = Controllers([Controller("val_loss < prev_val_loss", when="eval", action="save"),
                     Controller("val_ppl < 3", when="eval")])
    assert c.on_eval(2.0) == []
    assert c.on_eval(1.5) == [(0, "save")]
    assert c.on_eval(1.0) == [(0, "save"), (1, "stop")]  # exp(1.0) = 2.7 < 3


def test_state_round_trips_through_a_weights_only_load():
    rules = [Controller("loss > prev_loss", patience=3), Controller("loss < 1", when="epoch")]
    a = Controllers(rules)
    for x in [1.0, 2.0, 3.0]:
        a.on_step({"step": 1, "loss": x})
    buf = io.BytesIO()
    torch.save({"controllers": a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["controllers"]
    b = Controllers(rules)
    assert b.load_state_dict(state)
    assert b.on_step({"step": 4, "loss": 4.0}) == [(0, "stop")]  # the count of 2 carried over
    assert not Controllers([Controller("loss > prev_loss", patience=4)]).load_state_dict(state)  # other rules
    assert not Controllers(rules).load_state_dict(None)


# ----------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("controllers")
    make_checkpoint(root / "base", seed=3)
    rows = (TINY / "data" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:40]) + "\n")
    return root


def run(work: Path, out: str, *extra: str) -> Path:
    """12 LoRA steps of 8 samples (2 micro-batches of 4) over 36 training rows (an epoch is 9 micro-batches), with
    validation every 2 steps."""
    main(["finetune", "lora", str(work / "base"), "--out_dir", str(work / out), "--accelerator", "cpu",
          "--precision", "32-true", "--data.train_path", str(work / "train.jsonl"), "--data.template", TEMPLATE,
          "--data.val_split_fraction", "0.1", "--train.max_steps", str(STEPS), "--train.global_batch_size", "8",
          "--train.micro_batch_size", "4", "--train.lr", "0.02", "--lora.dropout", "0", "--eval.interval", "2",
          "--overwrite", "true", *extra])
    return work / out


def records(out: Path) -> list[dict]:
    return list(read_metrics(out))


@pytest.fixture(scope="module")
def reference(work: Path) -> list[dict]:
    out = run(work, "reference")
    recs = records(out)
    assert recs[-1]["final_step"] == STEPS
    return recs


def losses(recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def controlled(work: Path, out: str, controllers: str, *extra: str) -> tuple[Path, list[dict]]:
    path = run(work, out, "--train.controllers", controllers, *extra)
    return path, records(path)


def test_stop_when_the_loss_fell_twice_in_a_row(work, reference):
    ref = losses(reference)
    expected = next((s for s in range(3, STEPS + 1) if ref[s] < ref[s - 1] < ref[s - 2]), None)
    assert expected is not None and expected < STEPS, ref  # a learning run: the loss falls early
    out, recs = controlled(work, "fell", '[{"rule": "loss < prev_loss", "patience": 2}]')
    summary = recs[-1]
    assert summary["final_step"] == expected
    assert summary["stop_reason"] == "train.controllers[0] ('loss < prev_loss') held for 2 step checks in a row"
    assert losses(recs) == {s: x for s, x in ref.items() if s <= expected}
    assert (out / "final" / "lora.safetensors").is_file() and "final_val_loss" in summary


def test_stop_on_a_validation_threshold_after_the_validation_that_reaches_it(work, reference):
    val = {r["step"]: r["val_loss"] for r in reference if "val_loss" in r and "final_step" not in r}
    evals = sorted(s for s in val if 1 <= s < STEPS)
    threshold = sorted(val[s] for s in evals)[len(evals) // 2]  # reached at some validation before the end
    expected = next(s for s in evals if val[s] <= threshold)
    out, recs = controlled(work, "val", f'[{{"rule": "val_loss <= {threshold!r}", "when": "eval"}}]')
    assert recs[-1]["final_step"] == expected
    assert recs[-1]["stop_reason"].startswith("train.controllers[0] ('val_loss <= ")


def test_stop_at_the_end_of_an_epoch_on_its_mean_loss(work, reference):
    ref = losses(reference)
    end = next(r["step"] for r in reference if r.get("epoch", 0) >= 1)  # the step that finishes epoch 1
    mean = sum(ref[s] for s in range(1, end + 1)) / end
    # holds for the mean of the epoch's step losses, for none of the step losses themselves
    assert all(abs(ref[s] - mean) > 1e-6 for s in range(1, end + 1))
    rule = f"loss > {mean - 1e-6!r} and loss < {mean + 1e-6!r}"
    _, recs = controlled(work, "epoch", f'[{{"rule": "{rule}", "when": "epoch"}}]')
    assert recs[-1]["final_step"] == end


def test_save_action_writes_a_resumable_checkpoint_and_the_run_goes_on(work, reference):
    out, recs = controlled(work, "save", '[{"rule": "step == 3 or step == 5", "action": "save"}]',
                           "--train.keep_last", "null")
    assert recs[-1]["final_step"] == STEPS and recs[-1]["stop_reason"] == "max_steps"
    assert [n for n, _ in list_checkpoints(out)] == [3, 5]
    assert load_training_state(out / "checkpoints" / "step-5")["step"] == 5
    assert losses(recs) == losses(reference)  # rules change nothing of the training itself


def test_a_resumed_run_continues_the_patience_count(work):
    rule = '[{"rule": "lr > 0", "patience": 6}]'  # holds at every step: fires at step 6
    a, recs = controlled(work, "count-a", rule, "--train.save_interval", "4")
    assert recs[-1]["final_step"] == 6
    # resumed from step 4 with its count of 4: fires 2 steps later, not 6 (which would be step 10)
    _, recs_b = controlled(work, "count-b", rule, "--resume", str(a / "checkpoints" / "step-4"))
    assert recs_b[-1]["final_step"] == 6
    assert math.isclose(losses(recs_b)[6], losses(recs)[6], rel_tol=1e-6)


def test_cli_errors_come_before_anything_is_written(work, capsys):
    for controllers, message in [
        ('[{"rule": "grad_norm > 5"}]', "reads grad_norm, which is only measured with clipping"),
        ('[{"rule": "loss <"}]', "train.controllers[0].rule='loss <' is not a valid rule"),
    ]:
        with pytest.raises(SystemExit):
            run(work, "bad", "--train.controllers", controllers, "--train.max_norm", "null")
        assert message in capsys.readouterr().err
        assert not (work / "bad").exists()
