"""Recipes in config_hub/finetune: every file parses with the real CLI; `litft configs ls|cp`."""

from __future__ import annotations

import pytest
import yaml

from litft.cli import main
from litft.configs import hub_dir, method_of, recipes

RECIPES = recipes()
REQUIRED = {  # the models and methods issue 3 asks for
    "llama-3.2-1b": {"full", "lora", "qlora", "adapter"}, "llama-3.2-3b": {"lora", "qlora"},
    "llama-3.1-8b": {"lora", "qlora"}, "mistral-7b": {"lora", "qlora"}, "gemma-2-2b": {"full", "lora", "qlora"},
    "gemma-3-1b": {"full", "lora", "qlora"}, "qwen2.5-1.5b": {"full", "lora", "qlora"},
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
    for section in ("train", "data", "eval"):
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
