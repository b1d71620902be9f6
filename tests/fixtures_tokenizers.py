"""Tiny, deterministic, offline tokenizer checkpoints for tests.

``make_bpe_tokenizer(dir)`` builds a Llama-3-style byte-level BPE checkpoint (``tokenizer.json``),
``make_sentencepiece_tokenizer(dir)`` a Llama-2/Mistral-style sentencepiece checkpoint (``tokenizer.model`` plus the
HF files transformers writes for it) and ``make_sentencepiece_only_tokenizer(dir)`` the same model with only
``tokenizer.model`` + ``tokenizer_config.json``. Each takes a second or less and never touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BOS_BPE, EOS_BPE, EOT, START_HEADER, END_HEADER = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
)
BPE_SPECIAL_TOKENS = [BOS_BPE, EOS_BPE, EOT, START_HEADER, END_HEADER]

# Llama 3 style: optional system message, header tokens, <|eot_id|> after every turn, BOS text written by the template.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Llama 2 / Mistral style: [INST] ... [/INST], system prompt folded into the first user turn, strict alternation.
LLAMA2_CHAT_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system_message = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system_message = false %}
    {% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}
    {% elif message['role'] == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token -}}
    {% endif %}
{% endfor %}"""

_SUBJECTS = ["The cat", "A small dog", "My friend Anna", "The old teacher", "Every student", "Our team",
             "The weather", "This machine", "Her brother", "The river"]
_VERBS = ["runs", "jumped over", "likes", "will visit", "doesn't see", "found", "is building", "painted",
          "has 3 copies of", "can't find"]
_OBJECTS = ["the fence.", "a red ball!", "the big city?", "42 apples.", "the library, again.", "two new houses;",
            "the code: it works.", "($100) in cash.", "the 7th floor...", "\"the answer\" - maybe."]
_EXTRA = [
    "Hello, world! How are you today?",
    "I'm fine, thanks. And you?",
    "The year 2024 had 366 days; 2023 had 365.",
    "Call me at 555-0199 or e-mail me@example.com.",
    "Prices rose by 3.5% in March, and 12% in April.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * 2)",
    "She said: \"Don't worry, be happy.\"",
    "Item #1: apples; item #2: pears; item #3: plums.",
    "1 + 1 = 2, 2 * 3 = 6, 10 / 4 = 2.5",
    "Once upon a time, there was a little tokenizer.",
    "Question: what is the capital of France? Answer: Paris.",
    "The café serves crème brûlée and naïve jokes.",
    "User: please summarize the text below.\nAssistant: Sure, here it is.",
    "Temperatures ranged from -5 to 30 degrees.",
    "Wait... what? No way!!!",
    "[INST] Tell me a joke. [/INST] Why did the chicken cross the road?",
    "Tabs\tand  double  spaces   appear here.",
]


def corpus() -> list[str]:
    """A deterministic list of ~400 short English lines (letters, digits, punctuation, code, a few accents)."""
    lines = [f"{s} {v} {o}" for s in _SUBJECTS for v in _VERBS for o in _OBJECTS[:3]]
    lines += [f"{s} {v} {o}" for i, s in enumerate(_SUBJECTS) for j, v in enumerate(_VERBS)
              for k, o in enumerate(_OBJECTS) if (i + 2 * j + 3 * k) % 7 == 0]
    lines += [f"Line {n}: {n} plus {n + 1} is {2 * n + 1}." for n in range(0, 120, 3)]
    lines += _EXTRA * 3
    return lines


def make_bpe_tokenizer(directory: str | Path) -> Path:
    """Train a byte-level BPE (vocab 400) and save it the way a Llama 3 checkpoint looks on the Hub.

    Writes ``tokenizer.json`` (TemplateProcessing post-processor that prepends ``<|begin_of_text|>``),
    ``tokenizer_config.json`` (bos/eos, Llama 3 chat template), ``chat_template.jinja`` if transformers writes one,
    and ``generation_config.json`` with ``eos_token_id = [<|end_of_text|>, <|eot_id|>]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS_BPE)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_BPE}:0 $A:0", pair=f"{BOS_BPE}:0 $A:0 {BOS_BPE}:1 $B:1",
            special_tokens=[(BOS_BPE, bos_id)],
        ),
    ])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_BPE, eos_token=EOS_BPE, clean_up_tokenization_spaces=True,
        model_max_length=8192,
    )
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    hf.save_pretrained(directory)
    ids = {t: tok.token_to_id(t) for t in BPE_SPECIAL_TOKENS}
    _update_generation_config(directory, bos_token_id=ids[BOS_BPE], eos_token_id=[ids[EOS_BPE], ids[EOT]])
    return directory


def _train_sentencepiece(model_file: Path) -> Path:
    import io

    import sentencepiece as spm

    proto = io.BytesIO()  # in memory: a model_prefix would be recorded in the proto and differ between directories
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=proto, model_type="bpe", vocab_size=400,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
        minloglevel=2,
    )
    model_file.write_bytes(proto.getvalue())
    return model_file


def make_sentencepiece_tokenizer(directory: str | Path) -> Path:
    """Train a sentencepiece BPE (vocab 400, byte fallback, ``<unk>``=0 ``<s>``=1 ``</s>``=2) as a Llama 2 checkpoint.

    Writes ``tokenizer.model`` and what ``transformers.LlamaTokenizer.save_pretrained`` writes for it:
    ``tokenizer.json`` converted from the model (its post-processor prepends ``<s>``; transformers 5 drops
    ``add_bos_token`` from the saved ``tokenizer_config.json``), ``chat_template.jinja`` with a Llama 2 ``[INST]``
    template that calls ``raise_exception`` unless roles alternate, plus ``generation_config.json``.
    """
    from transformers import LlamaTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "chat_template.jinja"):  # transformers would load these instead of the model
        (directory / stale).unlink(missing_ok=True)
    model_file = _train_sentencepiece(directory / "tokenizer.model")
    _write_json(directory / "tokenizer_config.json", _sp_config())
    hf = LlamaTokenizer.from_pretrained(str(directory))
    hf.chat_template = LLAMA2_CHAT_TEMPLATE
    hf.save_pretrained(directory)
    assert model_file.is_file()
    _update_generation_config(directory, bos_token_id=1, eos_token_id=2)
    return directory


def make_sentencepiece_only_tokenizer(directory: str | Path) -> Path:
    """The sentencepiece checkpoint reduced to ``tokenizer.model`` + ``tokenizer_config.json`` (no tokenizer.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _train_sentencepiece(directory / "tokenizer.model")
    config = _sp_config()
    config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    _write_json(directory / "tokenizer_config.json", config)
    return directory


def _sp_config() -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096,
    }


def _update_generation_config(directory: Path, **ids: object) -> None:
    """Set the token ids in ``generation_config.json``, keeping what a model saved there before."""
    path = directory / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.update(ids)
    _write_json(path, config)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_checkpoint(src: Path, dst: Path, only: tuple[str, ...] | None = None) -> Path:
    """Copy a tokenizer checkpoint (optionally only some of its files) to ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (only is None or f.name in only):
            shutil.copy2(f, dst / f.name)
    return dst
