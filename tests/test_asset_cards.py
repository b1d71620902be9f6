"""Asset cards name local checkpoints; bad cards are clear errors naming the card file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from litft.asset_cards import find_card, load_cards, resolve_checkpoint


@pytest.fixture
def asset_dir(tmp_path, monkeypatch):
    d = tmp_path / "assets"
    d.mkdir()
    monkeypatch.setenv("LITFT_ASSET_DIR", str(d))
    return d


def test_card_resolves_checkpoint_and_tokenizer(asset_dir, tmp_path):
    ckpt = tmp_path / "models" / "tiny"
    ckpt.mkdir(parents=True)
    (tmp_path / "tok.json").write_text("{}")
    (asset_dir / "mine.yaml").write_text(
        f"name: tiny@user\ncheckpoint: {ckpt}\n---\nname: tok@user\ntokenizer: {tmp_path / 'tok.json'}\n")
    assert resolve_checkpoint("tiny@user") == ckpt
    assert resolve_checkpoint("tiny") == ckpt  # the @user suffix may be left out
    assert find_card("tok").tokenizer == tmp_path / "tok.json"
    assert resolve_checkpoint(str(ckpt)) == ckpt  # a path is taken as it is
    out = subprocess.run([sys.executable, "-m", "litft", "assets", "ls"], capture_output=True, text=True, check=True)
    assert "tiny@user" in out.stdout and str(ckpt) in out.stdout and "tok@user" in out.stdout


def test_missing_path_names_the_card(asset_dir, tmp_path):
    (asset_dir / "broken.yaml").write_text(f"name: gone@user\ncheckpoint: {tmp_path / 'nope'}\n")
    with pytest.raises(ValueError, match=r"broken\.yaml.*checkpoint path .*nope.*does not exist"):
        load_cards()
    out = subprocess.run([sys.executable, "-m", "litft", "assets", "ls"], capture_output=True, text=True)
    assert out.returncode == 1 and "broken.yaml" in out.stderr and "Traceback" not in out.stderr


def test_duplicate_name_names_both_cards(asset_dir, tmp_path):
    (asset_dir / "a.yaml").write_text(f"name: dup@user\ncheckpoint: {tmp_path}\n")
    (asset_dir / "b.yaml").write_text(f"name: dup@user\ncheckpoint: {tmp_path}\n")
    with pytest.raises(ValueError, match=r"b\.yaml.*'dup@user'.*a\.yaml"):
        load_cards()


def test_bad_card_shapes(asset_dir, tmp_path):
    (asset_dir / "c.yaml").write_text("checkpoint: /x\n")
    with pytest.raises(ValueError, match=r"c\.yaml \(card 1\): expected a mapping with a 'name'"):
        load_cards()
    (asset_dir / "c.yaml").write_text(f"name: x\ncheckpoint: {tmp_path}\nchekpoint: 1\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*unknown field\(s\) chekpoint"):
        load_cards()
    (asset_dir / "c.yaml").write_text("name: x\n")
    with pytest.raises(ValueError, match="needs a 'checkpoint' or a 'tokenizer'"):
        load_cards()
