"""Recipes in config_hub/finetune: every file parses with the real CLI; `litft configs ls|cp`."""

from __future__ import annotations

import pytest
import yaml

from litft.cli import main
from litft.configs import hub_dir, method_of, recipes

RECIPES = recipes()
REQUIRED = {  # the models and methods issue 3 asks for
    "llama-3.2-1b": {"full", "lora", "qlora", "adapter", "prompt"}, "llama-3.2-3b": {"lora", "qlora"},
    "llama-3.1-8b": {"lora", "qlora"}, "mistral-7b": {"lora", "qlora"}, "gemma-2-2b": {"full", "lora", "qlora"},
    "gemma-3-1b": {"full", "lora", "qlora"}, "qwen2.5-1.5b": {"full", "lora", "qlora"},
    "qwen3-30b-a3b": {"lora"}, "smollm3-3b": {"lora"}, "gpt-oss-20b": {"lora"}, "gemma-4-e4b": {"lora"},  # issue 18
    "qwen3.5-9b": {"lora"},
}


def test_required_recipes_exist():
    for model, methods in REQUIRED.items():
        for method in methods:
            assert f"{model}/{method}" in RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_with_the_cli(name, capsys):
    """`litft finetune <method> --config <recipe> --print_config` parses every key with the real parser."""
    path = RECIPES[name]
    with pytest.raises(SystemExit) as e:
        main(["finetune", method_of(name), "--config", str(path), "--print_config"])
    assert e.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(path.read_text())
    assert printed["checkpoint_dir"] == source["checkpoint_dir"]
    if name != "tiny/lora":
        assert source["checkpoint_dir"].startswith("checkpoints/")
    for section in ("train", "data", "eval", "objective"):
        for key, value in (source.get(section) or {}).items():
            assert printed[section][key] == value, (section, key)
    if name.endswith("qlora"):
        assert printed["quantize"].startswith("bnb.")


def test_unknown_key_in_a_config_names_it_and_the_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPES["llama-3.2-1b/lora"].read_text().replace("  lr: 0.0002", "  learning_rate: 0.0002"))
    with pytest.raises(SystemExit) as e:
        main(["finetune", "lora", "--config", str(bad), "--print_config"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "lr" in err and "min_lr" in err


def test_unknown_cli_option_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "full", "ckpt", "--train.learning_rate", "1", "--print_config"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--train.learning_rate" in err and "--train.lr" in err


def test_configs_ls_and_cp(tmp_path, capsys):
    main(["configs", "ls"])
    out = capsys.readouterr().out
    for name in RECIPES:
        assert name in out
    dst = tmp_path / "mine.yaml"
    main(["configs", "cp", "llama-3.2-1b/lora", str(dst)])
    assert dst.read_text() == (hub_dir() / "llama-3.2-1b" / "lora.yaml").read_text()
    assert "litft finetune lora --config" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # exists: refused without --overwrite
        main(["configs", "cp", "llama-3.2-1b/lora", str(dst)])
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["configs", "cp", "llama-3.2-1b/lorra", str(tmp_path / "x.yaml")])
    assert "llama-3.2-1b/lora" in capsys.readouterr().err  # did you mean
    assert not (tmp_path / "x.yaml").exists()


# ------------------------------------------------------------------ recipes fit the model they name


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fits_the_model_it_is_for(name):
    """checkpoint_dir is the model the recipe's folder names (by the zoo), and max_seq_length fits its context."""
    from pathlib import Path

    from litft.config import Config
    from litft.zoo import get_config

    source = yaml.safe_load(RECIPES[name].read_text())
    folder = name.split("/")[0]
    checkpoint = source["checkpoint_dir"]
    if checkpoint.startswith("checkpoints/"):  # where `litft download <repo_id>` puts it
        repo_id = checkpoint.removeprefix("checkpoints/")
        config = get_config(repo_id)
        assert config.hf_id == repo_id, name
        model = config.name.lower()
        assert model == folder or model.startswith(f"{folder}-"), f"{name}: checkpoint_dir names {config.name}"
    else:  # a checkpoint that ships with litft, relative to the repository root
        config = Config.from_checkpoint(Path(__file__).parent.parent / checkpoint)
    max_seq_length = (source.get("train") or {}).get("max_seq_length")
    assert max_seq_length is None or max_seq_length <= config.block_size, (name, max_seq_length, config.block_size)


# ------------------------------------------------------------------ the recipes ship in the wheel


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_configs_ls_works_from_it(tmp_path):
    """A wheel built from the source tree holds every recipe (and every litft package), and `litft configs ls|cp`
    work from a plain (non-editable) install of it."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).parent.parent
    src = tmp_path / "src"  # a copy, so that the build writes nothing into the working tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    for name in ("litft", "config_hub"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w",
                        str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [wheel] = list((tmp_path / "dist").glob("litft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"litft/config_hub/finetune/{n}.yaml" for n in RECIPES}
    assert want <= names, sorted(want - names)
    packages = {p.parent.relative_to(root).as_posix() for p in (root / "litft").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "a litft package is missing from pyproject's packages"
    assert "litft/assets/tiny/base/model.safetensors" in names

    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-m", "litft", "configs", "ls"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert f"recipes in {tmp_path / 'site' / 'litft' / 'config_hub' / 'finetune'}" in r.stdout
    assert all(n in r.stdout for n in RECIPES)
    r = subprocess.run([sys.executable, "-m", "litft", "configs", "cp", "tiny/lora", "mine.yaml"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mine.yaml").read_text() == RECIPES["tiny/lora"].read_text()
