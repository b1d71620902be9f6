"""The `litft` command line as users run it: a subprocess per call (`python -m litft`, or the installed console
script), real files in, real files out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

HEAVY = ("torch", "transformers", "lightning", "jsonargparse", "safetensors", "numpy", "yaml")


def litft(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litft", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})}, cwd=cwd)


def test_console_script_help_lists_commands_and_imports_nothing_heavy():
    script = Path(sys.executable).parent / "litft"  # the installed console script is a Python file
    target = [str(script)] if script.is_file() else ["-m", "litft"]
    r = subprocess.run([sys.executable, "-X", "importtime", *target, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for command in ("download", "convert", "subcommands: from_hf, to_hf"):
        assert command in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported, "no -X importtime output"
    assert not imported & set(HEAVY), f"`litft --help` imported {sorted(imported & set(HEAVY))}"


def test_help_at_each_level():
    r = litft("convert", "--help")
    assert r.returncode == 0
    assert "usage: litft convert <command>" in r.stdout
    assert "from_hf" in r.stdout and "to_hf" in r.stdout and "Hugging Face" in r.stdout
    r = litft("convert", "from_hf", "--help")
    assert r.returncode == 0
    assert "usage: litft convert from_hf" in r.stdout and "hf_dir" in r.stdout
    assert "--out_dir" in r.stdout and "where to write the native checkpoint" in r.stdout  # from the docstring
    assert "--print_config" in r.stdout and "--config" in r.stdout
    r = litft("convert", "to_hf", "-h")
    assert r.returncode == 0 and "--max_shard_size" in r.stdout and "AutoModelForCausalLM" in r.stdout


def test_unknown_command_suggests_close_ones():
    r = litft("convrt", "from_hf")
    assert r.returncode == 2 and "litft: unknown command 'convrt'. Did you mean: convert?" in r.stderr
    r = litft("convert", "from_fh", "x")
    assert r.returncode == 2 and "unknown command 'convert from_fh'. Did you mean: from_hf" in r.stderr
    assert "Traceback" not in r.stderr


def test_convert_both_ways(tiny_llama_hf, tmp_path):
    r = litft("convert", "from_hf", tiny_llama_hf, "--out_dir", tmp_path / "native")
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "model_config.yaml", "tokenizer.json"} <= {p.name for p in (tmp_path / "native").iterdir()}
    r = litft("convert", "to_hf", tmp_path / "native", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    a, b = load_file(tiny_llama_hf / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_print_config_prints_yaml_and_runs_nothing(tiny_llama_hf, tmp_path):
    r = litft("convert", "from_hf", tiny_llama_hf, "--out_dir", tmp_path / "native", "--dtype", "bfloat16",
              "--print_config")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed == {"hf_dir": str(tiny_llama_hf), "out_dir": str(tmp_path / "native"), "dtype": "bfloat16",
                       "max_shard_size": "5GB", "overwrite": False, "hf_id": ""}
    assert not (tmp_path / "native").exists()


def test_config_file_is_honoured_and_flags_override_it(tiny_llama_hf, tmp_path):
    config = tmp_path / "convert.yaml"
    config.write_text(yaml.safe_dump({"hf_dir": str(tiny_llama_hf), "out_dir": str(tmp_path / "native"),
                                      "dtype": "bfloat16", "hf_id": "me/tiny"}))
    r = litft("convert", "from_hf", "--config", config, "--dtype", "float16")  # later flags win
    assert r.returncode == 0, r.stderr
    assert load_file(tmp_path / "native" / "model.safetensors")["embed.weight"].dtype == torch.float16
    assert yaml.safe_load((tmp_path / "native" / "model_config.yaml").read_text())["hf_id"] == "me/tiny"
    # --print_config output is itself a valid --config
    r = litft("convert", "from_hf", "--config", config, "--out_dir", tmp_path / "again", "--print_config")
    (tmp_path / "printed.yaml").write_text(r.stdout)
    r = litft("convert", "from_hf", "--config", tmp_path / "printed.yaml")
    assert r.returncode == 0, r.stderr
    assert load_file(tmp_path / "again" / "model.safetensors")["embed.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("args, message", [
    (["convert", "from_hf", "{empty}"], "is not a Hugging Face checkpoint: no config.json"),
    (["convert", "from_hf", "{missing}"], "no such directory"),
    (["convert", "from_hf", "{hf}", "--out_dir", "{out}", "--dtype", "fp12"], "unknown dtype 'fp12'"),
    (["convert", "to_hf", "{hf}", "{out}"], "run `litft convert from_hf"),
])
def test_bad_input_is_one_clear_line_without_traceback(tiny_llama_hf, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "hf": tiny_llama_hf, "out": tmp_path / "out"}
    argv = [a.format(**paths) for a in args]
    r = litft(*argv)
    command = " ".join(args[:2])
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"litft {command}: error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    if args[2] == "{empty}":
        r = litft(*argv, env={"LITFT_DEBUG": "1"})  # the traceback, for bug reports
        assert r.returncode == 1 and "Traceback" in r.stderr


def test_unknown_option_is_a_usage_error(tiny_llama_hf, tmp_path):
    r = litft("convert", "from_hf", tiny_llama_hf, "--out_dri", tmp_path / "x")
    assert r.returncode == 2 and "usage: litft convert from_hf" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text, message", [
    ("train: 5\n", 'Parser key "train": expected a mapping of its options (--train.'),
    ("data: [a, b]\n", 'Parser key "data": expected a mapping of its options (--data.'),
    ("train:\n  lr: abc\n", 'Parser key "train.lr": Expected a float. Got value: abc'),
    ("train:\n  lr: null\n", 'Parser key "train.lr": null is not allowed here (expected float)'),
    ("checkpoint_dir: null\n", 'Parser key "checkpoint_dir": null is not allowed here (expected Path)'),
    ("train:\n  lr: [1\n", "{config}, line 3, column 1: did not find expected ',' or ']'"),
])
def test_bad_config_file_ends_in_one_line_naming_the_field(tiny_llama_native, tmp_path, capsys, text, message):
    """A wrong type, a null or a YAML syntax error in --config: a usage error whose last line names the key (or
    the file and line), never a traceback from instantiating the groups nor jsonargparse's "<unicode string>"."""
    from tests.inprocess_cli import litft as litft_inprocess

    config = tmp_path / "run.yaml"
    config.write_text(text)
    args = ["--config", config, "--out_dir", tmp_path / "out"]
    if not text.startswith("checkpoint_dir"):
        args.insert(0, tiny_llama_native)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        litft_inprocess("finetune", "full", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last_line = err.rstrip().splitlines()[-1]
    assert last_line.startswith("error: ") and message.format(config=config) in last_line, err
    assert "<unicode string>" not in err and not (tmp_path / "out").exists()


def test_a_required_argument_left_out_is_still_reported_as_required(tiny_llama_native, tmp_path, capsys):
    from tests.inprocess_cli import litft as litft_inprocess

    with pytest.raises(SystemExit) as e:
        litft_inprocess("convert", "to_hf", tiny_llama_native)
    assert e.value.code == 2
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == "error: the following arguments are required: out_dir"


@pytest.mark.parametrize("stop, message", [
    ('["\\n"', "--stop '[\"\\\\n\"' looks like a JSON list but does not parse (Expecting ',' delimiter at column 6)"),
    ("[1, 2]", "--stop '[1, 2]' must be a list of strings"),
])
def test_malformed_stop_list_is_refused_not_used_as_a_literal(tiny_llama_native, capsys, stop, message):
    from tests.inprocess_cli import litft_error

    err = litft_error(capsys, "generate", tiny_llama_native, "--prompt", "hi", "--max_new_tokens", 2, "--stop", stop)
    assert err.startswith("litft generate: error: ") and message in err and err.count("\n") == 1, err


def test_help_of_a_table_with_a_default_leaf_shows_its_options():
    """`litft evaluate --help` lists the subcommands and the default leaf's options (they were only found with
    `litft evaluate X --help`)."""
    r = litft("evaluate", "--help")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "accuracy" in r.stdout  # the subcommands
    for option in ("--tasks", "--include_path", "--num_fewshot", "--apply_chat_template"):
        assert option in r.stdout, option
