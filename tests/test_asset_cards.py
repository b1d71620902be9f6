"""Asset cards name local checkpoints and tokenizers; every command that takes a checkpoint accepts a card's name
(the real CLI, in-process, on the tiny Llama of conftest.py); bad cards are clear errors naming the card file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from litft.asset_cards import (
    find_card,
    load_cards,
    resolve_checkpoint,
    resolve_tokenizer,
)
from tests.inprocess_cli import litft, litft_error

ROWS = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in ("cat", "dog", "the fence", "apples")]


@pytest.fixture
def asset_dir(tmp_path, monkeypatch):
    d = tmp_path / "assets"
    d.mkdir()
    monkeypatch.setenv("LITFT_ASSET_DIR", str(d))
    return d


def card(asset_dir: Path, file: str, **cards: Path) -> None:
    """Write ``file`` in the asset folder with one checkpoint card per keyword (name → checkpoint)."""
    docs = [f"name: {name.replace('_at_', '@')}\ncheckpoint: {path}\n" for name, path in cards.items()]
    (asset_dir / file).write_text("---\n".join(docs))


# ------------------------------------------------------------------------------------------ the cards


def test_card_resolves_checkpoint_and_tokenizer(asset_dir, tmp_path, tiny_llama_native):
    ckpt = tmp_path / "models" / "tiny"
    ckpt.mkdir(parents=True)
    (asset_dir / "mine.yaml").write_text(
        f"name: tiny@user\ncheckpoint: {ckpt}\ndescription: a test\n---\nname: tok@user\n"
        f"tokenizer: {tiny_llama_native}\n---\nname: rel@user\ncheckpoint: ../models/tiny\n")
    assert resolve_checkpoint("tiny@user") == ckpt
    assert resolve_checkpoint("tiny") == ckpt  # the @user suffix may be left out
    assert resolve_checkpoint("rel") == ckpt  # relative to the card file
    assert find_card("tok").tokenizer == tiny_llama_native
    assert resolve_checkpoint(str(ckpt)) == ckpt  # a path is taken as it is
    assert resolve_checkpoint("out/no/such/run") == Path("out/no/such/run")  # a path is never looked up
    assert resolve_checkpoint("nothing@user") == Path("nothing@user")  # the caller reports it missing
    assert resolve_tokenizer("tok") == tiny_llama_native and resolve_tokenizer("tiny@user") == ckpt
    out = subprocess.run([sys.executable, "-m", "litft", "assets", "ls"], capture_output=True, text=True, check=True)
    assert "tiny@user" in out.stdout and str(ckpt) in out.stdout and "tok@user" in out.stdout
    assert "a test" in out.stdout and str(asset_dir / "mine.yaml") in out.stdout


def test_tokenizer_card_is_a_tokenizer_not_a_checkpoint(asset_dir, tiny_llama_native, capsys, tmp_path):
    from litft import Tokenizer

    (asset_dir / "tok.yaml").write_text(f"name: tok@user\ntokenizer: {tiny_llama_native}\n")
    tokenizer = Tokenizer("tok@user")
    assert tokenizer.checkpoint_dir == tiny_llama_native
    assert tokenizer.encode("hello world") == Tokenizer(tiny_llama_native).encode("hello world")
    err = litft_error(capsys, "generate", "tok@user", "--prompt", "hi", "--max_new_tokens", 2)
    assert "tok.yaml" in err and "names a tokenizer only" in err and "'checkpoint:'" in err
    err = litft_error(capsys, "convert", "to_hf", "tok", tmp_path / "hf")
    assert "tok.yaml" in err and "names a tokenizer only" in err


def test_help_says_names_work(capsys):
    litft("--help")
    assert "asset card's name works too (litft assets ls)" in capsys.readouterr().out


def test_stale_card_beside_a_good_one(asset_dir, tmp_path, tiny_llama_native, capsys):
    """A card whose folder was deleted is a warning on `assets ls` (listed as missing) and an error naming its card
    file only when its name is asked for; the good card beside it (in the same file too) still resolves."""
    gone = tmp_path / "deleted-run" / "final"
    gone.mkdir(parents=True)
    (asset_dir / "runs.yaml").write_text(f"name: gone@user\ncheckpoint: {gone}\n---\nname: good@user\n"
                                         f"checkpoint: {tiny_llama_native}\n")
    (asset_dir / "tok.yaml").write_text(f"name: oldtok@user\ntokenizer: {gone}\n")
    gone.rmdir()
    assert resolve_checkpoint("good") == tiny_llama_native and resolve_tokenizer("good@user") == tiny_llama_native
    for resolve, name in ((resolve_checkpoint, "gone"), (resolve_tokenizer, "gone@user"),
                          (resolve_tokenizer, "oldtok")):
        with pytest.raises(ValueError, match=r"runs\.yaml.*checkpoint path .*final of 'gone@user' does not exist"
                           if "gone" in name else r"tok\.yaml.*tokenizer path .*final of 'oldtok@user' does not exist"):
            resolve(name)
    capsys.readouterr()
    litft("assets", "ls")
    out, err = capsys.readouterr()
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert lines == {"gone@user": "missing", "good@user": "checkpoint", "oldtok@user": "missing"}, out
    assert err.count("warning: ") == 2 and "runs.yaml (card 1): checkpoint path" in err and "tok.yaml" in err
    err = litft_error(capsys, "generate", "gone", "--prompt", "hi", "--max_new_tokens", 2)
    assert "runs.yaml (card 1): checkpoint path" in err and "'gone@user' does not exist" in err


def test_duplicate_name_names_both_cards(asset_dir, tmp_path):
    (asset_dir / "a.yaml").write_text(f"name: dup@user\ncheckpoint: {tmp_path}\n")
    (asset_dir / "b.yaml").write_text(f"name: dup@user\ncheckpoint: {tmp_path}\n")
    with pytest.raises(ValueError, match=r"b\.yaml.*'dup@user'.*a\.yaml"):
        load_cards()


def test_ambiguous_short_name_names_the_cards(asset_dir, tmp_path):
    (asset_dir / "a.yaml").write_text(f"name: m@alice\ncheckpoint: {tmp_path}\n---\nname: m@bob\ncheckpoint: {tmp_path}\n")
    with pytest.raises(ValueError, match=r"'m' is ambiguous: m@alice, m@bob \(cards in .*a\.yaml\)"):
        resolve_checkpoint("m")
    assert resolve_checkpoint("m@bob") == tmp_path


def test_bad_card_shapes(asset_dir, tmp_path):
    bad = {
        "checkpoint: /x\n": r"c\.yaml \(card 1\): expected a mapping with a 'name'",
        f"name: x\ncheckpoint: {tmp_path}\nchekpoint: 1\n": r"c\.yaml.*unknown field\(s\) chekpoint",
        "name: x\n": r"c\.yaml.*needs a 'checkpoint' or a 'tokenizer'",
        f"name: my model\ncheckpoint: {tmp_path}\n": r"c\.yaml.*name 'my model' is invalid",
        f"name: a/b\ncheckpoint: {tmp_path}\n": r"c\.yaml.*name 'a/b' is invalid",
        f"name: x\ncheckpoint: {tmp_path}\ntokenizer: {tmp_path}\n": r"c\.yaml.*both 'checkpoint' and 'tokenizer'",
        f"name: x\ntokenizer: {tmp_path}\n": r"c\.yaml.*tokenizer path .* holds no tokenizer\.json or tokenizer\.model",
        "name: [x\n": r"c\.yaml: not valid YAML",
    }
    (tmp_path / "weights.safetensors").write_bytes(b"")
    bad[f"name: x\ncheckpoint: {tmp_path / 'weights.safetensors'}\n"] = r"c\.yaml.*is a file: expected the folder"
    for text, message in bad.items():
        (asset_dir / "c.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_cards()
            resolve_tokenizer("x")  # (a card's folder is checked when the card is asked for)


# ------------------------------------------------------------------ every command accepts a card name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("card_data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _finetune_args(data: Path, out: Path) -> list[object]:
    return ["--out_dir", out, "--data.train_path", data, "--data.prompt_style", "plain", "--train.max_steps", 1,
            "--train.global_batch_size", 2, "--train.micro_batch_size", 2, "--eval.final_validation", "false",
            "--accelerator", "cpu"]


def test_finetune_commands_take_a_card_name(asset_dir, tiny_llama_native, data, tmp_path):
    card(asset_dir, "models.yaml", tiny_at_user=tiny_llama_native)
    for method in ("full", "lora", "adapter"):
        out = tmp_path / method
        litft("finetune", method, "tiny@user", *_finetune_args(data, out))
        assert (out / "final" / "model_config.yaml").is_file()
        run = yaml.safe_load((out / "run.yaml").read_text())
        assert run["checkpoint_dir"] == str(tiny_llama_native.resolve())  # run.yaml names the folder itself
        if method != "full":
            base = yaml.safe_load((out / "final" / "base.yaml").read_text())
            assert base["base_checkpoint"] == str(tiny_llama_native.resolve())
    # a LoRA run's final/ as the starting point, by name (its LoRA is merged, a new one trains on top)
    card(asset_dir, "runs.yaml", run_at_user=tmp_path / "lora" / "final")
    litft("finetune", "lora", "run", *_finetune_args(data, tmp_path / "lora2"))
    assert (tmp_path / "lora2" / "final" / "lora.safetensors").is_file()


def test_convert_generate_and_evaluate_take_a_card_name(asset_dir, tiny_llama_native, tiny_llama_hf, data, tmp_path,
                                                         capsys):
    from litft.checkpoint import load_checkpoint

    run = tmp_path / "run"
    litft("finetune", "lora", tiny_llama_native, *_finetune_args(data, run), "--lora.targets", "[q,v]")
    card(asset_dir, "models.yaml", tiny_at_user=tiny_llama_native, run_at_user=run / "final", hf_at_user=tiny_llama_hf)
    tokens = torch.randint(0, 400, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_checkpoint(run / "final").eval()(tokens)

    litft("convert", "to_hf", "run@user", tmp_path / "hf")
    litft("convert", "merge_lora", "run", "--out_dir", tmp_path / "merged")
    litft("convert", "to_peft", "run@user", tmp_path / "peft")
    litft("convert", "from_peft", tmp_path / "peft", "--base", "tiny@user", "--out_dir", tmp_path / "imported")
    litft("convert", "from_hf", "hf@user", "--out_dir", tmp_path / "from-hf")
    with torch.no_grad():
        for folder in ("merged", "imported"):
            torch.testing.assert_close(load_checkpoint(tmp_path / folder).eval()(tokens), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_checkpoint(tmp_path / "from-hf").eval()(tokens),
                                   load_checkpoint(tiny_llama_native).eval()(tokens), atol=0, rtol=0)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    capsys.readouterr()
    litft("generate", "run@user", "--prompt", "Repeat cat", "--max_new_tokens", 3, "--device", "cpu")
    assert capsys.readouterr().out.strip()
    (tmp_path / "held_out.txt").write_text("the cat sat on the mat. " * 4)
    litft("evaluate", "perplexity", "tiny", "--data", tmp_path / "held_out.txt", "--device", "cpu",
          "--out", tmp_path / "ppl.json")
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] > 1


def test_evaluate_tasks_takes_a_card_name(asset_dir, tiny_llama_native, tmp_path):
    pytest.importorskip("lm_eval")
    from tests.test_evaluate import write_tasks

    card(asset_dir, "models.yaml", tiny_at_user=tiny_llama_native)
    tasks = write_tasks(tmp_path / "tasks")
    litft("evaluate", "tiny@user", "--tasks", "tiny_mc", "--include_path", tasks, "--include_defaults", "false",
          "--limit", 2, "--bootstrap_iters", 0, "--device", "cpu", "--out", tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["results"]["tiny_mc"]["sample_len"] == 2
