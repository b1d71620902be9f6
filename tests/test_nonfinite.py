"""A diverged run never saves a NaN: the writers refuse non-finite tensors, and the loop stops naming the step and
the last finite checkpoint, which it never prunes (issue 19, item 1). The runs are the issue's own commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import litft
from litft.errors import NonFiniteError
from tests.inprocess_cli import litft_error

TINY = Path(litft.__file__).parent / "assets" / "tiny"


def issue_command(out: Path, *extra: object) -> list[object]:
    """The issue's command: the tiny model, the demo data, lr 1e6."""
    return ["finetune", "full", TINY / "base", "--data.train_path", TINY / "data" / "train.jsonl",
            "--data.format", "template", "--data.template", "{{input}} -> {{output}}", "--train.micro_batch_size", 4,
            "--train.global_batch_size", 4, "--train.lr", 1e6, "--out_dir", out, "--accelerator", "cpu", *extra]


def nonfinite_values(out_dir: Path) -> dict[str, int]:
    """Every NaN/inf in every file a run saved: the safetensors files and the training states."""
    from safetensors.torch import load_file

    found = {}
    for f in sorted(out_dir.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if t.is_floating_point() and (n := int((~torch.isfinite(t)).sum())):
                found[f"{f}:{name}"] = n
    for f in sorted(out_dir.rglob("state.pt")):
        state = torch.load(f, weights_only=True)
        for p, values in state["optimizer"]["state"].items():
            for key, t in values.items():
                if torch.is_tensor(t) and t.is_floating_point() and (n := int((~torch.isfinite(t)).sum())):
                    found[f"{f}:{p}.{key}"] = n
    return found


def test_diverged_run_without_clipping_saves_no_final(tmp_path, capsys):
    out = tmp_path / "x"
    err = litft_error(capsys, *issue_command(out, "--train.max_steps", 2, "--train.max_norm", "null"))
    assert "litft finetune full: error: training diverged at step 2: embed.weight holds NaN or infinite values; " \
           "stopping without saving it." in err and "no checkpoint was saved before it" in err, err
    assert not (out / "final").exists() and not (out / "checkpoints").exists()
    assert nonfinite_values(out) == {}


def test_diverged_run_keeps_and_names_its_last_finite_checkpoint_and_resumes_from_it(tmp_path, capsys):
    out = tmp_path / "x"
    args = issue_command(out, "--train.max_steps", 30, "--train.max_norm", "null", "--train.save_interval", 1,
                         "--train.keep_last", 1)
    err = litft_error(capsys, *args)
    kept = out / "checkpoints" / "step-1"
    assert "training diverged at step 2" in err and f"the last finite checkpoint is {kept}: resume from it" in err, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"] and not (out / "final").exists()
    assert nonfinite_values(out) == {}
    before = (kept / "model.safetensors").read_bytes()

    err = litft_error(capsys, *args, "--resume", "auto")  # it loads and trains on, diverging as before
    assert f"resuming from {kept} at step 1" in err and "training diverged at step 2" in err, err
    assert f"the last finite checkpoint is {kept}" in err
    assert (kept / "model.safetensors").read_bytes() == before and nonfinite_values(out) == {}


def test_nonfinite_gradient_norm_with_clipping_is_a_clear_stop(tmp_path, capsys):
    out = tmp_path / "x"
    err = litft_error(capsys, *issue_command(out, "--train.max_steps", 30, "--train.save_interval", 1))
    assert "training diverged at step 2: the gradient norm is nan" in err, err
    assert f"the last finite checkpoint is {out / 'checkpoints' / 'step-1'}" in err
    assert "error_if_nonfinite" not in err and len(err.strip().splitlines()[-1]) > 0
    assert nonfinite_values(out) == {}


def test_the_weight_writers_refuse_nonfinite_tensors(tmp_path):
    """Every writer goes through one check: full weights (shards), a method's weights, a PEFT export."""
    from litft.weights import atomic_directory, write_method_files, write_shards

    bad = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf"), float("nan")])}
    with pytest.raises(NonFiniteError, match=r"refusing to write tensor 'b': 2 of its 3 values are NaN or infinite"):
        with atomic_directory(tmp_path / "model") as tmp:
            write_shards(iter(bad.items()), tmp, max_shard_bytes=4)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "lora"
    with pytest.raises(NonFiniteError, match="lora.safetensors: refusing to write tensor 'b'"):
        write_method_files(out, bad, "lora.safetensors", "lora.yaml", None, "lora")
    assert list(out.iterdir()) == []
    bf16 = {"w": torch.full((2, 2), float("-inf"), dtype=torch.bfloat16)}
    with pytest.raises(NonFiniteError):
        write_method_files(out, bf16, "adapter.safetensors", "adapter.yaml", None, "adapter")
