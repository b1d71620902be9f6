"""The tools around a fine-tuning run that llama-recipes and fms-hf-tuning users expect: the PyTorch profiler
(``--train.profile``), freezing the first transformer blocks (``finetune full --freeze_layers N``), experiment
tracking with W&B (``--train.trackers [wandb]``, run offline and read back from W&B's own run file) and the loss plot
written at the end of every run. Each runs a real fine-tune of a tiny 2-layer model on the CPU."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from litft.train.metrics import read_metrics
from tests.inprocess_cli import litft, litft_error
from tests.test_finetune import TEMPLATE, TINY, make_checkpoint


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run_tools")
    make_checkpoint(d / "base")
    rows = (TINY / "data" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(rows[:32]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[32:36]) + "\n")
    return d


def finetune(work: Path, out: Path, *extra: object, method: str = "full") -> list[str]:
    """The argv of a 4-step run (global batch 4 of micro-batches of 2)."""
    return ["finetune", method, work / "base", "--out_dir", out, "--data.train_path", work / "train.jsonl",
            "--data.val_path", work / "val.jsonl", "--data.format", "template", "--data.template", TEMPLATE,
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "4",
            "--train.lr", "1e-2", "--accelerator", "cpu", "--precision", "32-true", *extra]


# ------------------------------------------------------------------------------------------ profiler


def test_profile_writes_a_trace_of_the_window(work, tmp_path, capsys):
    """wait 1 + warmup 1 + active 2 of 4 steps: one Chrome-trace JSON with the operators of steps 2 and 3 (0-based
    ProfilerStep#2, #3) only; a window longer than the run is refused before anything is written."""
    out = tmp_path / "out"
    litft(*finetune(work, out, "--train.profile", "true", "--train.profile_wait", "1", "--train.profile_warmup", "1",
                    "--train.profile_active", "2"))
    assert "profiler trace(s)" in capsys.readouterr().err
    [trace] = (out / "logs" / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"aten::mm", "aten::scaled_dot_product_attention", "Optimizer.step#AdamW.step"} <= names
    assert sorted(n for n in names if str(n).startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("args", {}).get("Input Dims") for e in events if e.get("name") == "aten::mm")  # record_shapes
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]  # the run itself is unchanged

    err = litft_error(capsys, *finetune(work, tmp_path / "long", "--train.profile", "true"))
    assert ("train.profile: the profiling window needs 6 optimizer steps (profile_wait 1 + profile_warmup 2 + "
            "profile_active 3) but the run trains 4 (train.max_steps=4)") in err
    assert not (tmp_path / "long").exists()
    err = litft_error(capsys, *finetune(work, tmp_path / "epochs", "--train.max_steps", "null", "--train.epochs", "1",
                                        "--train.profile", "true", "--train.profile_active", "10"))
    assert "needs 13 optimizer steps" in err and "the run trains 8 (8 steps for train.epochs=1)" in err  # 32 / 4
    assert not (tmp_path / "epochs").exists()
    err = litft_error(capsys, *finetune(work, tmp_path / "zero", "--train.profile", "true",
                                        "--train.profile_active", "0"))
    assert "train.profile_active=0 is invalid: expected an integer >= 1" in err


# ------------------------------------------------------------------------------------------ freeze_layers + plot


def test_freeze_layers_keeps_the_first_blocks_and_the_run_plots_its_losses(work, tmp_path, capsys):
    """`finetune full --freeze_layers 1` (llama-recipes' num_freeze_layers): block 0 bit-identical to the base in
    final/ and in the step checkpoint, block 1, the embeddings and the head trained; final/ holds the whole model.
    With matplotlib installed the run leaves logs/loss.png."""
    out = tmp_path / "out"
    litft(*finetune(work, out, "--freeze_layers", "1", "--train.save_interval", "2"))
    err = capsys.readouterr().err
    base = load_file(work / "base" / "model.safetensors")
    for weights in (out / "final" / "model.safetensors", out / "checkpoints" / "step-2" / "model.safetensors"):
        trained = load_file(weights)
        assert set(trained) == set(base)  # the whole model
        for name, tensor in base.items():
            if name.startswith("blocks.0."):
                assert trained[name].equal(tensor), name
            else:  # block 1, its norms, the final norm, the embeddings and the head
                assert not trained[name].equal(tensor), name
    n_block = sum(t.numel() for n, t in base.items() if n.startswith("blocks.0."))
    total = sum(t.numel() for t in base.values())
    assert f"full: {total - n_block:,} of {total:,} parameters train" in err
    assert yaml.safe_load((out / "run.yaml").read_text())["freeze_layers"] == 1
    if _has_matplotlib():
        png = out / "logs" / "loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the resumed run freezes the same block
    litft(*finetune(work, out, "--freeze_layers", "1", "--resume", out / "checkpoints" / "step-2"))
    assert load_file(out / "final" / "model.safetensors")["blocks.0.attn.q_proj.weight"].equal(
        base["blocks.0.attn.q_proj.weight"])

    err = litft_error(capsys, *finetune(work, tmp_path / "all", "--freeze_layers", "2"))
    assert ("freeze_layers=2 is invalid: the model has 2 transformer blocks (n_layer in its model_config.yaml), so "
            "at least one must train: expected 0 <= freeze_layers <= 1") in err
    assert not (tmp_path / "all").exists()
    err = litft_error(capsys, *finetune(work, tmp_path / "neg", "--freeze_layers", "-1"))
    assert "freeze_layers=-1 is invalid: expected an integer >= 0" in err


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# ------------------------------------------------------------------------------------------ W&B


def wandb_records(run_file: Path, timeout: float = 30.0) -> list:
    """The records of a finished W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf ``Record``
    messages, in 32 KiB blocks of chunks with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle,
    4 last)), parsed with W&B's own protobuf classes. W&B's service process writes the file: ``run.finish()`` can
    return before it has (measured with wandb 0.31 under load: the file still 7 bytes, complete a moment later), so
    this waits for the run's ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_wandb_file(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_wandb_file(run_file: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    if len(data) < 7:  # not even the header written yet
        return []
    assert data[:4] == b":W&B", f"{run_file}: not a W&B run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_tracker_offline(work, tmp_path, monkeypatch, capsys):
    """`--train.trackers [wandb]` with WANDB_MODE=offline: W&B's offline run holds every training loss of
    metrics.jsonl at its step (the last one equal to metrics.jsonl's final loss) and the run's settings as config;
    metrics.jsonl and TensorBoard are still written."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "out"
    args = finetune(work, out, "--train.trackers", "[wandb]", "--train.wandb_project", "litft-test",
                    "--train.wandb_run_name", "tiny-full", "--train.save_interval", "2")
    litft(*args)
    [run_dir] = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    run_id = (out / "logs" / "wandb_run_id").read_text().strip()
    records = wandb_records(run_dir / f"run-{run_id}.wandb")
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                   for item in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert {s: h["loss"] for s, h in history.items() if "loss" in h} == losses
    final = read_metrics(out)[-1]
    assert history[final["step"]]["loss"] == losses[4] and history[final["step"]]["stop_reason"] == "max_steps"
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "litft-test" and run.display_name == "tiny-full" and run.run_id == run_id
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["lr"] == 0.01 and config["precision"] == "32-true"
    assert list((out / "logs").glob("events.out.tfevents.*"))
    # resumed from step 2: the same W&B run goes on, from step 3
    litft(*args, "--resume", out / "checkpoints" / "step-2")
    [resumed] = set((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")) - {run_dir}
    records = wandb_records(resumed / f"run-{run_id}.wandb")
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and (out / "logs" / "wandb_run_id").read_text().strip() == run_id
    steps = {json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
             for i in r.history.item if (i.nested_key[0] if i.nested_key else i.key) == "_step"}
    assert min(steps) == 3 and max(steps) == 4


def test_wandb_missing_is_a_clear_error(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does when the extra is not installed
    err = litft_error(capsys, *finetune(work, tmp_path / "out", "--train.trackers", "[wandb]"))
    assert "train.trackers=[wandb] needs the wandb package: pip install 'litft[wandb]'" in err
    assert not (tmp_path / "out").exists()
    err = litft_error(capsys, *finetune(work, tmp_path / "out", "--train.wandb_project", ""))
    assert "train.wandb_project is empty" in err
