"""Outputs that cannot be written: a full disk, a read-only file system, a file where a folder must be. Each is one
line naming the path and the cause, nothing is half-written, and an earlier checkpoint stays intact and resumable
(issue 19, items 3 and 6). Disk-full and read-only cases run on a real tmpfs (root mounts one; skipped elsewhere)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import litft
from tests.inprocess_cli import litft as run_litft
from tests.inprocess_cli import litft_error

TINY = Path(litft.__file__).parent / "assets" / "tiny"


def finetune(out: Path, *extra: object) -> list[object]:
    """A short full fine-tune of the tiny demo model (each checkpoint ~10 MB: weights + AdamW state)."""
    return ["finetune", "full", TINY / "base", "--data.train_path", TINY / "data" / "train.jsonl",
            "--data.format", "template", "--data.template", "{{input}} -> {{output}}", "--train.micro_batch_size", 4,
            "--train.global_batch_size", 4, "--train.lr", 1e-3, "--out_dir", out, "--accelerator", "cpu", *extra]


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_disk_full_during_training_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "15m") as disk:
        out = disk / "run"
        args = finetune(out, "--train.max_steps", 6, "--train.save_interval", 1)
        err = litft_error(capsys, *args)
        step1 = out / "checkpoints" / "step-1"
        assert last_line(err) == (
            f"litft finetune full: error: cannot write {out / 'checkpoints' / 'step-2'}: No space left on device; the "
            f"previous checkpoint, {step1}, is intact: free space and resume with --resume auto"), err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # no temp dir left behind
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)  # space again
        run_litft(*args, "--resume", "auto", "--train.keep_last", 1)
        err = capsys.readouterr().err
        assert f"resuming from {step1} at step 1" in err and (out / "final" / "model.safetensors").is_file()


def test_disk_full_during_an_export_leaves_nothing(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        err = litft_error(capsys, "convert", "to_hf", TINY / "base", disk / "hf")
        assert last_line(err) == f"litft convert to_hf: error: cannot write {disk / 'hf'}: No space left on device"
        assert list(disk.iterdir()) == []


def test_read_only_outputs(tmp_path, capsys, tiny_llama_hf):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        err = litft_error(capsys, *finetune(ro / "run", "--train.max_steps", 2))
        assert last_line(err) == (f"litft finetune full: error: cannot write out_dir {ro / 'run'}: {ro} is not "
                                  "writable (Read-only file system)")
        for command, source in (("to_hf", TINY / "base"), ("from_hf", tiny_llama_hf)):
            err = litft_error(capsys, "convert", command, source, *(["--out_dir"] if command == "from_hf" else []),
                              ro / "out")
            assert last_line(err) == (f"litft convert {command}: error: cannot write {ro / 'out'}: {ro} is not "
                                      "writable (Read-only file system)")


def test_a_file_where_the_output_folder_must_be(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = litft_error(capsys, *finetune(tmp_path / "afile" / "sub", "--train.max_steps", 2))
    assert last_line(err) == (f"litft finetune full: error: cannot write out_dir {tmp_path / 'afile' / 'sub'}: "
                              f"{tmp_path / 'afile'} is a file, not a directory (Not a directory)")
    err = litft_error(capsys, "convert", "to_hf", TINY / "base", tmp_path / "afile" / "sub")
    assert last_line(err) == (f"litft convert to_hf: error: cannot write {tmp_path / 'afile' / 'sub'}: "
                              f"{tmp_path / 'afile'} is a file, not a directory (Not a directory)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_os_error_litft_did_not_word_is_one_line_with_its_file(tmp_path, capsys):
    """The CLI boundary: an OSError raised by Python itself is its file and the OS's cause, not a traceback."""
    (tmp_path / "afile").write_text("")
    err = litft_error(capsys, "configs", "cp", "gemma-2-2b/full", tmp_path / "afile" / "recipe.yaml")
    assert last_line(err) == f"litft configs cp: error: {tmp_path / 'afile'}: File exists", err


WRITE_EVERYTHING = """
import os, sys
os.umask(int(sys.argv[1], 8))
from litft.cli import main
tiny, out = sys.argv[2], sys.argv[3]
for method in ("lora", "full"):
    main(["finetune", method, tiny + "/base", "--data.train_path", tiny + "/data/train.jsonl", "--data.format",
          "template", "--data.template", "{{input}} -> {{output}}", "--train.max_steps", "2", "--train.save_interval",
          "1", "--train.micro_batch_size", "4", "--train.global_batch_size", "4", "--eval.final_validation", "false",
          "--out_dir", out + "/" + method, "--accelerator", "cpu"])
main(["convert", "to_hf", out + "/full/final", out + "/hf"])
main(["convert", "from_hf", out + "/hf", "--out_dir", out + "/native"])
main(["convert", "to_peft", out + "/lora/final", out + "/peft"])
main(["convert", "merge_lora", out + "/lora/final", "--out_dir", out + "/merged"])
"""


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Runs (checkpoints/, final/, run.yaml, logs/) and exports (to_hf, from_hf, to_peft, merge_lora) get the
    modes a plain mkdir/open gives under the user's umask, though each is written to a temp name and renamed."""
    import os
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(TINY.parents[2])}  # this tree's litft
    r = subprocess.run([sys.executable, "-c", WRITE_EVERYTHING, f"{umask:o}", str(TINY), str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    written = [p for p in out.rglob("*")]
    assert {"model.safetensors", "lora.safetensors", "state.pt", "run.yaml", "metrics.jsonl", "config.json",
            "adapter_model.safetensors", "model_config.yaml", "tokenizer.json"} <= {p.name for p in written}
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in written
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert wrong == {}, f"umask {umask:o}: {wrong}"
