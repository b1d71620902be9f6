"""litft.tokenizer against the oracle, transformers.AutoTokenizer on the same folder.

Three fixture checkpoints (tests/fixtures_tokenizers.py): ``bpe`` (Llama 3 style byte-level BPE, tokenizer.json),
``sp`` (Llama 2 style sentencepiece saved by transformers: tokenizer.model + tokenizer.json) and ``sponly``
(the same tokenizer.model with only tokenizer_config.json, so litft runs sentencepiece itself).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from litft.tokenizer import ChatTemplateError, Tokenizer
from tests.fixtures_tokenizers import (
    LLAMA3_CHAT_TEMPLATE, copy_checkpoint, make_bpe_tokenizer, make_sentencepiece_only_tokenizer,
    make_sentencepiece_tokenizer,
)

KINDS = ("bpe", "sp", "sponly")

TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "Hello world",
    " Hello world",
    "Hello  world ",
    "trailing spaces   ",
    "line one\nline two\n\n  indented line",
    "\ttab\tseparated\tvalues",
    "café crème brûlée, naïve",
    "日本語のテキスト",
    "emoji 🙂🙃 and 👍🏽!",
    "123456789 3.14159 -42 1e10",
    "Prices rose by 3.5% in March; (about $100).",
    "def add(a, b):\n    return a + b\n",
    "<s>[INST] hi [/INST] there</s>",
    "x <s> y</s>z",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<unk> and <pad> and <|not_a_token|>",
    "Mixed: é日🙂 <s> é日🙂",
    "The quick brown fox jumps over the lazy dog. " * 40,
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    "multi": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke about café 日本 🙂"},
    ],
    "system_multi": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": " a "},
        {"role": "assistant", "content": "b\n"},
        {"role": "user", "content": "c\n\nd"},
        {"role": "assistant", "content": "e"},
    ],
}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bpe": make_bpe_tokenizer(root / "bpe"),
        "sp": make_sentencepiece_tokenizer(root / "sp"),
        "sponly": make_sentencepiece_only_tokenizer(root / "sponly"),
    }


@pytest.fixture(scope="module")
def hf(dirs: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    return {kind: AutoTokenizer.from_pretrained(str(d)) for kind, d in dirs.items()}


@pytest.fixture(scope="module")
def toks(dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {kind: Tokenizer(d) for kind, d in dirs.items()}


def hf_chat_ids(hf_tok: Any, messages: list[dict], add_generation_prompt: bool, **kwargs: Any) -> list[int]:
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    # transformers 5 returns a BatchEncoding (return_dict=True by default); 4.x returned the list of ids
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def edited_copy(src: Path, dst: Path, config: dict | None = None, drop: tuple[str, ...] = (),
                files: dict[str, Any] | None = None) -> Path:
    """Copy a checkpoint, update keys of its tokenizer_config.json (None deletes), drop/write files."""
    copy_checkpoint(src, dst)
    if config:
        path = dst / "tokenizer_config.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        for key, value in config.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path.write_text(json.dumps(data))
    for name in drop:
        (dst / name).unlink(missing_ok=True)
    for name, content in (files or {}).items():
        (dst / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return dst


# ---------------------------------------------------------------------------------------------- fixtures themselves


def test_fixtures_are_deterministic_and_complete(tmp_path: Path, dirs: dict[str, Path]) -> None:
    again = {"bpe": make_bpe_tokenizer(tmp_path / "bpe"), "sp": make_sentencepiece_tokenizer(tmp_path / "sp")}
    for kind, d in again.items():
        names = sorted(f.name for f in d.iterdir())
        assert names == sorted(f.name for f in dirs[kind].iterdir())
        for name in names:
            assert (d / name).read_bytes() == (dirs[kind] / name).read_bytes(), (kind, name)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        f.name for f in dirs["bpe"].iterdir())
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(f.name for f in dirs["sp"].iterdir())
    assert sorted(f.name for f in dirs["sponly"].iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert (dirs["sponly"] / "tokenizer.model").read_bytes() == (dirs["sp"] / "tokenizer.model").read_bytes()


def test_fixture_generation_config_keeps_model_keys(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "max_length": 11}))
    make_bpe_tokenizer(tmp_path)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    assert config["max_length"] == 11 and config["eos_token_id"] == [1, 2] and config["bos_token_id"] == 0


# ---------------------------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_encode_decode_match_transformers(kind: str, index: int, toks: dict, hf: dict) -> None:
    text, tok, ref = TEXTS[index], toks[kind], hf[kind]
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"], repr(text)
    assert tok.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], repr(text)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), repr(text)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_arbitrary_ids_matches_transformers(kind: str, toks: dict, hf: dict) -> None:
    tok, ref = toks[kind], hf[kind]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 16))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_matches_encode(kind: str, toks: dict) -> None:
    tok = toks[kind]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, bos=False, eos=True) == [tok.encode(t, bos=False, eos=True) for t in TEXTS]
    assert tok.encode_batch([]) == []


def test_sentencepiece_only_dir_gives_the_same_ids_as_the_full_dir(toks: dict, hf: dict) -> None:
    full, only = toks["sp"], toks["sponly"]
    assert (full.backend, only.backend) == ("huggingface", "sentencepiece")
    assert "sentencepiece" in sys.modules  # sponly really ran sentencepiece
    rng = random.Random(1)
    alphabet = list("abcdefgh ABC.,!?\n\t0123éü日🙂-_[]<>/") + ["<s>", "</s>", "<unk>", " ", "  "]
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for text in texts:
        ids = full.encode(text)
        assert only.encode(text) == ids == hf["sp"](text)["input_ids"], repr(text)
        assert only.encode(text, bos=False, eos=True) == full.encode(text, bos=False, eos=True)
        assert only.decode(ids) == full.decode(ids) and only.decode(ids, True) == full.decode(ids, True)
    assert only.vocab_size == full.vocab_size == len(hf["sp"])
    assert (only.bos_id, only.eos_id, only.pad_id) == (full.bos_id, full.eos_id, full.pad_id) == (1, 2, None)


def test_bos_and_eos_flags(toks: dict, hf: dict) -> None:
    for kind in KINDS:
        tok = toks[kind]
        plain = tok.encode("Hello world", bos=False)
        assert tok.add_bos is True and tok.add_eos is False
        assert tok.encode("Hello world") == [tok.bos_id] + plain
        assert tok.encode("Hello world", bos=True) == [tok.bos_id] + plain  # not twice
        assert tok.encode("Hello world", eos=True) == [tok.bos_id] + plain + [tok.eos_id]
        assert tok.encode("Hello world", bos=False, eos=True) == plain + [tok.eos_id]
        assert tok.encode("") == [tok.bos_id] == hf[kind]("")["input_ids"]


def test_special_ids_stop_ids_and_vocab(toks: dict, hf: dict) -> None:
    bpe, ref = toks["bpe"], hf["bpe"]
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert bpe.stop_ids == [bpe.token_to_id("<|end_of_text|>"), bpe.token_to_id("<|eot_id|>")] == [1, 2]
    assert bpe.vocab_size == len(ref) == 400
    assert bpe.token_to_id("<|start_header_id|>") == ref.convert_tokens_to_ids("<|start_header_id|>")
    assert bpe.token_to_id("<|surely not a token|>") is None
    for kind in ("sp", "sponly"):
        tok = toks[kind]
        assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, [2])
        assert tok.token_to_id("<s>") == 1 and tok.token_to_id("<0x41>") == hf["sp"].convert_tokens_to_ids("<0x41>")
        assert tok.token_to_id("▁certainly-not-a-piece") is None
        assert tok.vocab_size == len(hf[kind])


def test_special_tokens_as_dicts_and_id_fallbacks(tmp_path: Path, dirs: dict) -> None:
    from transformers import AutoTokenizer

    # AddedToken dicts in tokenizer_config.json, and a pad token
    d = edited_copy(dirs["bpe"], tmp_path / "dicts", config={
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True, "__type": "AddedToken"},
        "pad_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
    })
    tok, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (0, 1, 2)
    # no token strings at all: ids come from generation_config.json, then config.json; eos may be an int
    d = edited_copy(dirs["bpe"], tmp_path / "ids", config={"bos_token": None, "eos_token": None},
                    files={"generation_config.json": {"eos_token_id": 2},
                           "config.json": {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3}})
    tok = Tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (0, 2, 3, [2])
    d = edited_copy(dirs["bpe"], tmp_path / "cfg", config={"eos_token": None}, drop=("generation_config.json",),
                    files={"config.json": {"eos_token_id": [1, 2]}})
    assert Tokenizer(d).stop_ids == [1, 2]
    # special_tokens_map.json (legacy) supplies tokens missing from tokenizer_config.json
    d = edited_copy(dirs["bpe"], tmp_path / "map", config={"eos_token": None},
                    files={"special_tokens_map.json": {"eos_token": "<|eot_id|>"}})
    tok, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    assert tok.eos_id == ref.eos_token_id == 2


def test_sentencepiece_defaults_follow_tokenizer_config_like_transformers(tmp_path: Path, dirs: dict) -> None:
    from transformers import AutoTokenizer

    texts = ["Hello world", "x <s> y</s>z", "a</s>b <s> c", " lead", ""]
    variants = {
        "no_bos": {"add_bos_token": False},
        "bos_and_eos": {"add_eos_token": True},
        "bos_unset": {"add_bos_token": None},  # transformers 5: missing means no BOS for LlamaTokenizer
        "legacy": {"legacy": True},  # a "▁" before every chunk of text, not only the first
    }
    for name, change in variants.items():
        d = edited_copy(dirs["sponly"], tmp_path / name, config=change)
        tok, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
        for text in texts:
            assert tok.encode(text, eos=None) == ref(text)["input_ids"], (name, text)
            assert tok.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], (name, text)
    assert Tokenizer(tmp_path / "no_bos").add_bos is False
    assert Tokenizer(tmp_path / "bos_unset").add_bos is False
    assert Tokenizer(tmp_path / "bos_and_eos").add_eos is True
    # add_bos_token in tokenizer_config.json is ignored when tokenizer.json exists (its post-processor decides)
    d = edited_copy(dirs["sp"], tmp_path / "json_wins", config={"add_bos_token": False})
    assert Tokenizer(d).encode("hi") == AutoTokenizer.from_pretrained(str(d))("hi")["input_ids"]
    assert Tokenizer(d).encode("hi")[0] == 1
    # a bare tokenizer.model (no tokenizer_config.json): sentencepiece's own convention, BOS from the model
    bare = copy_checkpoint(dirs["sponly"], tmp_path / "bare", only=("tokenizer.model",))
    tok = Tokenizer(bare)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.has_chat_template) == (1, 2, True, False)
    assert tok.encode("Hello world") == [1] + Tokenizer(dirs["sponly"]).encode("Hello world", bos=False)


# ---------------------------------------------------------------------------------------------- streaming


STREAM_TEXTS = ["Héllo wörld, 日本語 🙂🙃 naïve café!", "🙂", " é", "a\n\n b  c 👍🏽", "x<s>  y</s>z é日"]


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoder_concatenation_equals_decode(kind: str, toks: dict) -> None:
    tok = toks[kind]
    held_back = 0
    for text in STREAM_TEXTS:
        for ids in (tok.encode(text), tok.encode(text, bos=False)):
            for skip in (False, True):
                decoder = tok.incremental_decoder(skip_special_tokens=skip)
                full = tok.decode(ids, skip_special_tokens=skip)
                out = ""
                for token in ids:
                    piece = decoder.add(token)
                    held_back += piece == ""
                    out += piece
                    assert full.startswith(out)
                    assert "\ufffd" not in out  # never emits half a character
                assert out == full, (text, ids)  # everything was emitted without a flush
                assert decoder.flush() == ""
    assert held_back > 0  # multi-byte characters span several tokens in both tokenizers


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoder_on_random_valid_streams(kind: str, toks: dict) -> None:
    tok = toks[kind]
    rng = random.Random(2)
    alphabet = list("ab é日🙂\n") + [" the", "<s>", "</s>", "  "]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text, bos=rng.random() < 0.5)
        decoder = tok.incremental_decoder()
        out = "".join(decoder.add(i) for i in ids) + decoder.flush()
        assert out == tok.decode(ids), repr(text)


def test_incremental_decoder_flush_returns_dangling_bytes(toks: dict) -> None:
    tok = toks["sponly"]
    ids = tok.encode("ok 🙂", bos=False)[:-1]  # the emoji's last byte is missing
    decoder = tok.incremental_decoder()
    out = "".join(decoder.add(i) for i in ids)
    assert "\ufffd" not in out
    assert out + decoder.flush() == tok.decode(ids) and tok.decode(ids).endswith("\ufffd")


# ---------------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(kind: str, conversation: str, add_generation_prompt: bool,
                                            toks: dict, hf: dict) -> None:
    messages = CONVERSATIONS[conversation]
    tok, ref = toks[kind], hf[kind]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_chat_ids(ref, messages, add_generation_prompt)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's BOS text, and no second BOS
    assert tok.decode(ids) == text
    if kind == "bpe" and add_generation_prompt:
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_sources(toks: dict, dirs: dict) -> None:
    assert toks["bpe"].has_chat_template and toks["bpe"].chat_template == LLAMA3_CHAT_TEMPLATE
    assert (dirs["bpe"] / "chat_template.jinja").is_file()  # transformers 5 writes the template to its own file
    assert "chat_template" in json.loads((dirs["sponly"] / "tokenizer_config.json").read_text())
    assert toks["sponly"].chat_template == toks["sp"].chat_template


def test_chat_template_file_wins_over_config_and_named_templates(tmp_path: Path, dirs: dict) -> None:
    from transformers import AutoTokenizer

    messages = CONVERSATIONS["multi"]
    d = edited_copy(dirs["bpe"], tmp_path / "both", config={"chat_template": "CONFIG {{ messages | length }}"})
    tok, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)
    assert not tok.apply_chat_template(messages).startswith("CONFIG")
    # several named templates in the config; "tool_use" is picked when tools are given
    named = [{"name": "default", "template": "D{{ messages | length }}"},
             {"name": "tool_use", "template": "T{{ tools | tojson }}|{{ messages[0]['content'] }}"}]
    d = edited_copy(dirs["bpe"], tmp_path / "named", config={"chat_template": named}, drop=("chat_template.jinja",))
    tok, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    tools = [{"type": "function", "function": {"name": "f", "description": "ünïcode <b>", "parameters": {}}}]
    for kwargs in ({}, {"tools": tools}, {"chat_template": "tool_use"}):
        assert tok.apply_chat_template(messages, **kwargs) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert tok.apply_chat_template(messages, tools=tools).startswith('T[{"type": "function"')


KITCHEN_SINK = """{%- set ns = namespace(count=0, seen=[]) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'stop' %}{% break %}{% endif -%}
    {%- if message['role'] == 'skip' %}{% continue %}{% endif -%}
    {%- set ns.count = ns.count + 1 -%}
    <{{ message['role'] }}>{{ message['content'] | trim }}{% if message.reasoning_content is defined %} [thought: {{ message.reasoning_content }}]{% endif %}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor -%}
count={{ ns.count }} bos={{ bos_token }} unk={{ unk_token | default('none') }} extra={{ extra_var | default('unset') }}
tools={{ tools | tojson }} docs={{ documents is none }} d={{ dict(a=1, b='é<&>') | tojson(sort_keys=True) }}
year={{ strftime_now('%Y') | length }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.mark.parametrize("kind", ["bpe", "sponly"])
def test_chat_template_rendering_environment_matches_transformers(kind: str, toks: dict, hf: dict) -> None:
    """Sandbox options, custom tojson (no HTML escaping, non-ASCII kept), namespace, loop controls, the
    {% generation %} tag, strftime_now, dict(), special-token variables, tools/documents, extra kwargs,
    None-valued keys dropped and reasoning aliases."""
    messages = [
        {"role": "system", "content": "  sys  ", "name": None},
        {"role": "skip", "content": "ignored"},
        {"role": "user", "content": "Hi <b>&</b> é"},
        {"role": "assistant", "content": "Hello!", "thinking": "be polite"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never rendered"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter in München",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in ({}, {"tools": tools, "extra_var": "xyz"}):
        for add_generation_prompt in (True, False):
            mine = toks[kind].apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  chat_template=KITCHEN_SINK, **kwargs)
            ref = hf[kind].apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               chat_template=KITCHEN_SINK, **kwargs)
            assert mine == ref
    assert "München" in mine and "[thought: be polite]" in mine and "never rendered" not in mine


def test_raise_exception_in_template(toks: dict, hf: dict) -> None:
    import jinja2

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        hf["sp"].apply_chat_template(bad, tokenize=False)
    for kind in ("sp", "sponly"):
        with pytest.raises(ChatTemplateError, match="must alternate") as info:
            toks[kind].apply_chat_template(bad)
        assert isinstance(info.value, ValueError) and str(toks[kind].checkpoint_dir) in str(info.value)
    with pytest.raises(ValueError, match="empty conversation"):
        toks["bpe"].apply_chat_template([])


def test_no_chat_template_is_a_clear_error(tmp_path: Path, dirs: dict) -> None:
    d = edited_copy(dirs["bpe"], tmp_path / "base", config={"chat_template": None}, drop=("chat_template.jinja",))
    tok = Tokenizer(d)
    assert tok.has_chat_template is False and tok.chat_template is None
    with pytest.raises(ValueError, match=r"base.*has no chat template; pass a template or use a base-model prompt"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=str(d).replace("\\", "\\\\")):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    # an explicit template still works
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}") \
        == "hi"


# ---------------------------------------------------------------------------------------------- errors


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json and tokenizer.model") as info:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        Tokenizer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_corrupt_files_are_named(tmp_path: Path, dirs: dict) -> None:
    d = edited_copy(dirs["bpe"], tmp_path / "json", files={"tokenizer.json": '{"model": '})
    with pytest.raises(ValueError, match="tokenizer.json") as info:
        Tokenizer(d)
    assert str(d / "tokenizer.json") in str(info.value)
    d = edited_copy(dirs["bpe"], tmp_path / "json2", files={"tokenizer.json": '{"version": "1.0", "model": 5}'})
    with pytest.raises(ValueError, match=str(d / "tokenizer.json").replace("\\", "\\\\")):
        Tokenizer(d)
    d = edited_copy(dirs["bpe"], tmp_path / "config", files={"tokenizer_config.json": '{"bos_token": "<s>",'})
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON") as info:
        Tokenizer(d)
    assert str(d / "tokenizer_config.json") in str(info.value)
    d = edited_copy(dirs["bpe"], tmp_path / "config_list", files={"tokenizer_config.json": "[1, 2]"})
    with pytest.raises(ValueError, match="tokenizer_config.json must hold a JSON object"):
        Tokenizer(d)
    d = edited_copy(dirs["bpe"], tmp_path / "gen", files={"generation_config.json": "{oops"})
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer(d)
    d = copy_checkpoint(dirs["sponly"], tmp_path / "spm")
    (d / "tokenizer.model").write_bytes(b"\x00\x01 not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model") as info:
        Tokenizer(d)
    assert str(d / "tokenizer.model") in str(info.value)


def test_bos_request_without_bos_token(tmp_path: Path, dirs: dict) -> None:
    d = edited_copy(dirs["bpe"], tmp_path / "nobos", config={"bos_token": None}, drop=("generation_config.json",))
    tok = Tokenizer(d)
    assert tok.bos_id is None
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("hi", bos=True)


# ---------------------------------------------------------------------------------------------- imports


def test_import_is_light_and_sentencepiece_is_lazy(dirs: dict) -> None:
    code = (
        "import sys; import litft.tokenizer as t; "
        "heavy = [m for m in ('sentencepiece', 'transformers', 'torch', 'jinja2') if m in sys.modules]; "
        "assert not heavy, heavy; "
        f"tok = t.Tokenizer({str(dirs['bpe'])!r}); tok.apply_chat_template([{{'role': 'user', 'content': 'x'}}]); "
        "assert 'sentencepiece' not in sys.modules and 'transformers' not in sys.modules; "
        f"t.Tokenizer({str(dirs['sponly'])!r}); assert 'sentencepiece' in sys.modules"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60,
                   env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_copy_checkpoint_only(tmp_path: Path, dirs: dict) -> None:
    out = copy_checkpoint(dirs["sp"], tmp_path / "only", only=("tokenizer.model", "tokenizer_config.json"))
    assert sorted(f.name for f in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    shutil.rmtree(out)


@pytest.mark.parametrize("template, problem", [
    ("{% include 'header.jinja' %}{{ messages[0].content }}", "line 1: {% include %} is not supported"),
    ("{{ bos_token }}\n{% import 'macros.jinja' as m %}", "line 2: {% import %} is not supported"),
    ("{% from 'macros.jinja' import turn %}", "line 1: {% from ... import %} is not supported"),
    ("{% extends 'base.jinja' %}", "line 1: {% extends %} is not supported"),
    ("{% for m in messages %}\n{{ m.content }}\n{% endfor %\n", "line 3: "),
    ("{{ messages[0].content }}\n{{ 1 / (messages | length - 1) }}", "line 2: ZeroDivisionError"),
    ("{{ messages[0].content }}\n{{ messages[0].content.no_such_method() }}", "line 2: "),
])
def test_chat_template_errors_name_the_file_and_line(tmp_path: Path, dirs: dict, template: str,
                                                     problem: str) -> None:
    """A template that cannot work here (nothing to {% include %} from; transformers has no loader either) or that
    fails while rendering: a ChatTemplateError (a ValueError, one line through the CLI) naming the template's file
    and line, never jinja's TypeError "no loader for this environment specified" or a raw exception."""
    d = edited_copy(dirs["bpe"], tmp_path / "ckpt", drop=("chat_template.jinja",))
    (d / "chat_template.jinja").write_text(template)
    with pytest.raises(ChatTemplateError) as info:
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert message.startswith(f"chat template {d / 'chat_template.jinja'}, {problem}") and "\n" not in message, message
