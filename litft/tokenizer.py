"""Tokenizer: HF ``tokenizer.json`` or sentencepiece ``tokenizer.model``, with ids and chat templates as in transformers.

``Tokenizer(checkpoint_dir)`` reads the files a Hub checkpoint ships with and behaves like
``transformers.AutoTokenizer.from_pretrained(checkpoint_dir)`` (transformers 5.x) without importing transformers:

* ``tokenizer.json`` (preferred) is run by the ``tokenizers`` library. As in transformers, its post-processor alone
  decides whether a BOS is prepended by default (``add_bos_token`` in ``tokenizer_config.json`` is ignored then).
* ``tokenizer.model`` alone is run by ``sentencepiece`` the way transformers' ``LlamaTokenizer`` converts it:
  ``add_bos_token``/``add_eos_token`` from ``tokenizer_config.json`` (missing means False there, as in transformers;
  without any ``tokenizer_config.json`` the model's own BOS piece is prepended, as the reference Llama code does),
  special/added tokens matched in the text, and a ``▁`` prefix only on the first chunk of text unless ``legacy``.
* Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json``; ids missing there from
  ``generation_config.json`` and ``config.json``. ``stop_ids`` is EOS plus every ``eos_token_id`` of the generation
  config (Llama 3: ``<|end_of_text|>`` and ``<|eot_id|>``).
* Chat templates (``chat_template.jinja``, ``additional_chat_templates/*.jinja`` or ``tokenizer_config.json``) are
  rendered with the same Jinja sandbox, options and helpers as transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = ["Tokenizer", "IncrementalDecoder", "ChatTemplateError", "render_chat_template"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"

# the named special tokens transformers knows (their strings are passed to chat templates)
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPACE_MARK = "\u2581"  # sentencepiece's "▁"


class ChatTemplateError(ValueError):
    """The chat template rejected a conversation (``raise_exception`` in the template) or failed to render."""


# ---------------------------------------------------------------------------------------------- small helpers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_json_dict(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _token_content(value: Any) -> Optional[str]:
    """A special token given as a string, an AddedToken dict (``{"content": ...}``) or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and English contractions)."""
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
        .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re")
    )


# ---------------------------------------------------------------------------------------------- chat templates


@lru_cache(maxsize=32)
def _compile_template(template: str) -> Any:
    """Compile ``template`` in the sandbox transformers uses (same options, filters and globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for masks in transformers; we render it as is
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters; transformers' does not and exposes json.dumps options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` without exposing the dict type to the sandbox
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore attributes so templates cannot reach CPython internals
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    ast = env.parse(template)
    for node in ast.find_all((jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport,
                              jinja2.nodes.Extends)):
        tag = {"Include": "include", "Import": "import", "FromImport": "from ... import", "Extends": "extends"}
        raise jinja2.exceptions.TemplateSyntaxError(
            f"{{% {tag[type(node).__name__]} %}} is not supported: a chat template must be self-contained "
            "(transformers renders it with no template loader)", node.lineno)
    return env.from_string(ast)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types (as transformers does before rendering)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_line(error: BaseException) -> Optional[int]:
    """The template line an error happened on: a syntax error's own, else the last template frame's."""
    line = getattr(error, "lineno", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         tools: Optional[Sequence[Mapping[str, Any]]] = None,
                         documents: Optional[Sequence[Mapping[str, Any]]] = None, source: str = "chat template",
                         **variables: Any) -> str:
    """Render one conversation with a Jinja chat template exactly like ``transformers`` ``apply_chat_template``.

    Keys whose value is None are dropped from messages, reasoning given as ``thinking``/``reasoning`` is also
    exposed as ``reasoning_content`` (and vice versa), ``tools``/``documents`` are always defined (None when not
    given) and ``variables`` (special token strings, template kwargs) are visible to the template.
    Raises :class:`ChatTemplateError` naming ``source`` (the template's file) and the line when the template calls
    ``raise_exception``, does not compile (``{% include %}``/``{% import %}``/``{% extends %}`` included: there is
    nothing to load them from) or fails while rendering.
    """
    import jinja2

    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation; give at least one message")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"chat message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TypeError("tools must be JSON schemas (dicts); convert functions with "
                                "transformers.utils.get_json_schema first")
    try:
        return _compile_template(template).render(
            messages=chat, tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **_plain(variables),
        )
    except (jinja2.exceptions.TemplateError, ArithmeticError, AttributeError, LookupError, TypeError,
            ValueError) as e:
        # the template's own failures (raise_exception, syntax, undefined or wrong-typed values in its expressions)
        line = _template_line(e)
        where = f"{source}, line {line}" if line is not None else source
        problem = (e.message or type(e).__name__) if isinstance(e, jinja2.exceptions.TemplateError) \
            else f"{type(e).__name__}: {e}"
        raise ChatTemplateError(f"chat template {where}: {problem}") from e


# ---------------------------------------------------------------------------------------------- streaming


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation is ``decode(all ids)``.

    Each :meth:`add` decodes a short window of recent ids with and without the new one and returns the new text.
    Text is held back while it ends in an incomplete character (a partial UTF-8 sequence from byte-level or
    byte-fallback tokens decodes to ``"\\ufffd"``), and the window always starts a few tokens back at a point where
    earlier text was complete, so sentencepiece's leading-space stripping only ever affects the (cancelled)
    context. Call :meth:`flush` at the end to get text still held back (only ever needed when the ids end in an
    invalid byte sequence). The equality with ``decode`` is exact whenever the ids decode to valid UTF-8; for
    invalid byte-fallback runs ``decode`` replaces already-complete characters of the run too, which a stream
    that has emitted them cannot take back.
    """

    _CONTEXT = 4  # tokens of already-emitted context kept in the decode window

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._boundaries: list[int] = [0]  # token offsets where the emitted text ended (complete characters)
        self._emitted_at: int = 0  # token offset up to which text has been emitted

    def _window_start(self) -> int:
        start = 0
        for b in reversed(self._boundaries):
            if self._emitted_at - b >= self._CONTEXT:
                start = b
                break
        return start

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly ``""``)."""
        self.ids.append(int(token_id))
        start = self._window_start()
        text = self._decode(self.ids[start:])
        if text.endswith("\ufffd"):
            return ""
        return self._emit(start, text)

    def flush(self) -> str:
        """Return whatever is still held back (call once the stream has ended)."""
        if self._emitted_at == len(self.ids):
            return ""
        start = self._window_start()
        return self._emit(start, self._decode(self.ids[start:]))

    def _emit(self, start: int, text: str) -> str:
        prefix = self._decode(self.ids[start:self._emitted_at]) if start < self._emitted_at else ""
        if not text.startswith(prefix):
            # a decoder that rewrites earlier text (rare): emit what is new by position
            prefix = prefix[: len(text)]
        piece = text[len(prefix):]
        self._emitted_at = len(self.ids)
        self._boundaries.append(self._emitted_at)
        if len(self._boundaries) > 64:
            del self._boundaries[: len(self._boundaries) - 32]
        return piece


# ---------------------------------------------------------------------------------------------- sentencepiece backend


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, raw bytes of the whole field, payload) for each field of a protobuf message."""
    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        payload_start = i
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _read_varint(buf, i)
            payload_start = i
            i += length
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield field, wire, buf[start:i], buf[payload_start:i]


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _spm_add_dummy_prefix(proto: bytes) -> bool:
    """``normalizer_spec.add_dummy_prefix`` of a serialized sentencepiece ModelProto (default True)."""
    for field, wire, _, payload in _proto_fields(proto):
        if field == 3 and wire == 2:  # ModelProto.normalizer_spec
            for f, w, _, p in _proto_fields(payload):
                if f == 3 and w == 0:  # NormalizerSpec.add_dummy_prefix
                    return bool(_read_varint(p, 0)[0])
    return True


def _spm_without_dummy_prefix(proto: bytes) -> bytes:
    """The same ModelProto with ``normalizer_spec.add_dummy_prefix = false`` (no protobuf package needed)."""
    out = bytearray()
    for field, wire, raw, payload in _proto_fields(proto):
        if field == 3 and wire == 2:
            inner = b"".join(r for f, _, r, _ in _proto_fields(payload) if f != 3) + bytes([0x18, 0x00])
            out += _varint((3 << 3) | 2) + _varint(len(inner)) + inner
        else:
            out += raw
    return bytes(out)


class _SentencePieceBackend:
    """``tokenizer.model`` run with sentencepiece, shaped like transformers' conversion of it (LlamaTokenizer)."""

    def __init__(self, path: Path, add_prefix_space: Optional[bool], legacy: bool) -> None:
        import sentencepiece as spm  # only checkpoints without tokenizer.json pay for this import

        proto = path.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
            dummy_prefix = _spm_add_dummy_prefix(proto)
            # the same model that never prepends "▁" (for text that follows a special token, or starts with a space)
            self.sp_plain = spm.SentencePieceProcessor(model_proto=_spm_without_dummy_prefix(proto)) \
                if dummy_prefix else self.sp
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from None
        if add_prefix_space is None:
            add_prefix_space = dummy_prefix
        # transformers' Metaspace: "▁" before the first chunk of text only ("first"), every chunk (legacy), or never
        self.prepend = ("always" if legacy else "first") if add_prefix_space else "never"
        self.strip_leading_space = bool(add_prefix_space)  # the Strip(left=1) decoder that undoes it
        self.size = self.sp.get_piece_size()
        self.set_added({})

    def set_added(self, added: dict[str, tuple[int, bool, bool, bool]]) -> None:
        """Tokens matched in the text before sentencepiece sees it: content -> (id, special, lstrip, rstrip)."""
        self.added = dict(added)
        self.id_to_added = {i: content for content, (i, *_rest) in self.added.items()}
        self.special_ids = {i for i, *_rest in (v for v in self.added.values() if v[1])}
        self.special_ids |= {i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        alternatives = sorted(self.added, key=len, reverse=True)  # longest match first
        self.split_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def piece_id(self, piece: str) -> Optional[int]:
        if piece in self.added:
            return self.added[piece][0]
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            return None
        return i

    def vocab_size(self) -> int:
        return max([self.size] + [i + 1 for i in self.id_to_added])

    def _encode_chunk(self, text: str, prepend: bool) -> list[int]:
        if not text:
            return []
        # Metaspace prepends "▁" only when the chunk does not already start with one
        if prepend and not text.startswith(" "):
            return self.sp.encode(text)
        return self.sp_plain.encode(text)

    def encode(self, text: str) -> list[int]:
        first = self.prepend != "never"
        if self.split_re is None:
            return self._encode_chunk(text, first)
        ids: list[int] = []
        pos, strip_next = 0, False
        for m in self.split_re.finditer(text):
            token_id, _, lstrip, rstrip = self.added[m.group()]
            ids.extend(self._chunk(text, pos, m.start(), strip_next, lstrip))
            ids.append(token_id)
            pos, strip_next = m.end(), rstrip
        ids.extend(self._chunk(text, pos, len(text), strip_next, False))
        return ids

    def _chunk(self, text: str, start: int, end: int, lstrip: bool, rstrip: bool) -> list[int]:
        chunk = text[start:end]
        if lstrip:  # the previous added token swallows the whitespace after it
            stripped = chunk.lstrip()
            start += len(chunk) - len(stripped)
            chunk = stripped
        if rstrip:  # the next added token swallows the whitespace before it
            chunk = chunk.rstrip()
        prepend = self.prepend == "always" or (self.prepend == "first" and start == 0)
        return self._encode_chunk(chunk, prepend)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # transformers' decoder chain for these models: Replace("▁", " "), ByteFallback, Fuse, Strip(" ", left=1)
        out: list[str] = []
        pending = bytearray()

        def flush_bytes() -> None:
            if pending:
                try:
                    out.append(bytes(pending).decode("utf-8"))
                except UnicodeDecodeError:  # ByteFallback: one replacement character per byte token
                    out.append("\ufffd" * len(pending))
                pending.clear()

        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            if i in self.id_to_added:
                token = self.id_to_added[i]
            elif 0 <= i < self.size:
                token = self.sp.id_to_piece(i)
            else:
                continue  # unknown ids are dropped, as the tokenizers library does
            m = _BYTE_PIECE.match(token)
            if m:
                pending.append(int(m.group(1), 16))
                continue
            flush_bytes()
            out.append(token.replace(_SPACE_MARK, " "))
        flush_bytes()
        text = "".join(out)
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text


# ---------------------------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """The tokenizer of a checkpoint directory (see the module docstring for what it reads and matches), or of an
    asset card's name (:mod:`litft.asset_cards`).

    Attributes:
        checkpoint_dir: the directory.
        backend: ``"huggingface"`` (tokenizer.json) or ``"sentencepiece"`` (tokenizer.model).
        bos_id, eos_id, pad_id: special token ids (None when the checkpoint has none).
        stop_ids: every id that ends a generation (EOS first, then the generation config's ``eos_token_id`` list).
        vocab_size: number of ids, added tokens included (``len(AutoTokenizer)``).
        add_bos, add_eos: whether :meth:`encode` adds BOS / EOS by default.
        chat_template: the default chat template (None when the checkpoint has none); ``chat_templates`` all of them.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():  # the name of an asset card (litft assets ls)?
            from litft.asset_cards import resolve_tokenizer

            self.checkpoint_dir = resolve_tokenizer(checkpoint_dir)
        d = self.checkpoint_dir
        json_path, model_path = d / TOKENIZER_JSON, d / TOKENIZER_MODEL
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(d)!r} does not exist "
                                    f"(looked for {TOKENIZER_JSON} or {TOKENIZER_MODEL} in it)")
        if not json_path.is_file() and not model_path.is_file():
            raise FileNotFoundError(f"no tokenizer in {str(d)!r}: looked for {TOKENIZER_JSON} and {TOKENIZER_MODEL}")

        config = _read_json_dict(d / TOKENIZER_CONFIG)
        has_config = (d / TOKENIZER_CONFIG).is_file()
        special_map = _read_json_dict(d / SPECIAL_TOKENS_MAP)
        generation_config = _read_json_dict(d / GENERATION_CONFIG)
        model_config = _read_json_dict(d / MODEL_CONFIG)
        self._config = config

        # named special tokens as transformers reads them: tokenizer_config.json, overridden by the legacy
        # special_tokens_map.json unless the config has an added_tokens_decoder (then that file is ignored)
        sources = [config] if "added_tokens_decoder" in config else [config, special_map]
        tokens: dict[str, str] = {}
        explicit_none: set[str] = set()
        for source in sources:
            for key, value in source.items():
                if not key.endswith("_token") or key.startswith("add_"):
                    continue
                if (content := _token_content(value)) is not None:
                    tokens[key] = content
                    explicit_none.discard(key)
                elif value is None:
                    tokens.pop(key, None)
                    explicit_none.add(key)
        extra: list[str] = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for source in sources:
                value = source.get(key)
                values = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else []
                for v in values:
                    if (content := _token_content(v)) is not None and content not in extra:
                        extra.append(content)
        self.special_tokens: dict[str, str] = tokens

        # added tokens declared in the config (id -> AddedToken dict)
        added_decl: dict[str, tuple[int, bool, bool, bool]] = {}
        added_decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(added_decoder, Mapping):
            raise ValueError(f"{d / TOKENIZER_CONFIG}: 'added_tokens_decoder' must be an object")
        for key, value in added_decoder.items():
            content = _token_content(value)
            try:
                index = int(key)
            except ValueError:
                raise ValueError(f"{d / TOKENIZER_CONFIG}: added token id {key!r} is not an integer") from None
            if content is None:
                continue
            flags = value if isinstance(value, Mapping) else {}
            added_decl[content] = (index, bool(flags.get("special", True)), bool(flags.get("lstrip", False)),
                                   bool(flags.get("rstrip", False)))
        named_special = [t for t in tokens.values()] + extra

        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        if json_path.is_file():
            self.backend = "huggingface"
            self._init_hf(json_path, added_decl, named_special)
        else:
            self.backend = "sentencepiece"
            self._init_sp(model_path, config, has_config, added_decl, named_special)

        # ids: the token strings first, then the generation config and config.json
        if self.backend == "sentencepiece":
            # LlamaTokenizer's defaults (<s>, </s>, <unk>) are the model's own pieces
            for name in ("bos", "eos", "unk"):
                key = f"{name}_token"
                if key not in tokens and key not in explicit_none and (i := getattr(self._sp.sp, f"{name}_id")()) >= 0:
                    tokens[key] = self._sp.sp.id_to_piece(i)

        def special_id(name: str) -> Optional[int]:
            content = tokens.get(f"{name}_token")
            if content is not None and (i := self.token_to_id(content)) is not None:
                return i
            for source in (generation_config, model_config):  # fallbacks for checkpoints without token strings
                ids = _as_id_list(source.get(f"{name}_token_id"))
                if ids:
                    return ids[0]
            return None

        self.bos_id: Optional[int] = special_id("bos")
        self.eos_id: Optional[int] = special_id("eos")
        self.pad_id: Optional[int] = special_id("pad")
        self.unk_id: Optional[int] = special_id("unk")
        stops: list[int] = [] if self.eos_id is None else [self.eos_id]
        extra_stops = _as_id_list(generation_config.get("eos_token_id")) or _as_id_list(
            model_config.get("eos_token_id"))
        for i in extra_stops:
            if i not in stops:
                stops.append(i)
        self.stop_ids: list[int] = stops

        if self.backend == "huggingface":
            self.add_bos, self.add_eos = self._hf_defaults()
        else:
            # transformers' LlamaTokenizer: add_bos_token from the config, False when absent; no config at all:
            # sentencepiece's own convention (prepend the model's BOS piece)
            self.add_bos = bool(config.get("add_bos_token", False)) if has_config else self.bos_id is not None
            self.add_eos = bool(config.get("add_eos_token", False))
            self._head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
            self._tail = [self.eos_id] if self.add_eos and self.eos_id is not None else []

        self._template_files: dict[str, str] = {}  # template name → the file it came from, for error messages
        self.chat_templates: dict[str, str] = self._load_chat_templates(config)
        self.chat_template: Optional[str] = self.chat_templates.get("default")
        # strings the chat template sees as variables (transformers passes special_tokens_map)
        self._template_tokens = {k: v for k, v in tokens.items()}

    # ------------------------------------------------------------------ loading

    def _init_hf(self, path: Path, added_decl: dict[str, tuple[int, bool, bool, bool]],
                 named_special: list[str]) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"could not load {path}: {e}") from None
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = False
        vocab = tok.get_vocab(with_added_tokens=True)
        # transformers adds declared tokens the tokenizer.json lacks (by id order), then named special tokens
        for content, (_, special, lstrip, rstrip) in sorted(added_decl.items(), key=lambda kv: kv[1][0]):
            if content not in vocab:
                tok.add_tokens([AddedToken(content, special=special, lstrip=lstrip, rstrip=rstrip, normalized=False)])
                vocab = tok.get_vocab(with_added_tokens=True)
        missing = [t for t in named_special if t not in vocab]
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        self._tok = tok
        self._model_type = type(tok.model).__name__  # "BPE", "Unigram", "WordPiece", ...
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    def _init_sp(self, path: Path, config: dict[str, Any], has_config: bool,
                 added_decl: dict[str, tuple[int, bool, bool, bool]], named_special: list[str]) -> None:
        # transformers' LlamaTokenizer defaults to legacy=False; without any config keep sentencepiece's own behaviour
        legacy = config.get("legacy", not has_config)
        backend = _SentencePieceBackend(path, config.get("add_prefix_space"), bool(legacy))
        added = dict(added_decl)
        next_id = max([backend.size] + [i + 1 for i, *_rest in added.values()])
        # named special tokens are matched in the text; ones the model lacks get new ids, as transformers adds them
        for content in named_special:
            if content not in added:
                i = backend.piece_id(content)
                if i is None:
                    i, next_id = next_id, next_id + 1
                added[content] = (i, True, False, False)
        # sentencepiece's control and unknown pieces (<s>, </s>, <unk>) are special tokens too
        for i in range(backend.size):
            if backend.sp.is_control(i) or backend.sp.is_unknown(i):
                added.setdefault(backend.sp.id_to_piece(i), (i, True, False, False))
        backend.set_added(added)
        self._sp = backend
        self.vocab_size = backend.vocab_size()

    def _hf_defaults(self) -> tuple[bool, bool]:
        """What the tokenizer.json post-processor adds around a text: sets ``_head``/``_tail`` ids."""
        probe = "Hello world"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        head: Optional[list[int]] = None
        for start in range(len(full) - len(plain) + 1 if plain else 0):
            if full[start:start + len(plain)] == plain:
                head, tail = full[:start], full[start + len(plain):]
                break
        if head is None:  # a post-processor that rewrites the text ids: fall back to the full encode
            self._head, self._tail, self._full_default = [], [], True
            return False, False
        self._head, self._tail, self._full_default = head, tail, False
        return (bool(head) and head[0] == self.bos_id, bool(tail) and tail[-1] == self.eos_id)

    def _load_chat_templates(self, config: dict[str, Any]) -> dict[str, str]:
        """transformers' priority: chat_template.jinja + additional_chat_templates/*.jinja, else the config."""
        d = self.checkpoint_dir
        templates: dict[str, str] = {}
        if (d / CHAT_TEMPLATE_FILE).is_file():
            templates["default"] = (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
            self._template_files["default"] = str(d / CHAT_TEMPLATE_FILE)
        if (d / CHAT_TEMPLATE_DIR).is_dir():
            for f in sorted((d / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
                self._template_files[f.name.removesuffix(".jinja")] = str(f)
        if templates:
            return templates
        value = config.get("chat_template")
        if isinstance(value, str):
            templates = {"default": value}
        elif isinstance(value, list):
            try:
                templates = {t["name"]: t["template"] for t in value}
            except (TypeError, KeyError):
                raise ValueError(f"{d / TOKENIZER_CONFIG}: 'chat_template' must be a string or a list of "
                                 "{name, template} objects") from None
        elif isinstance(value, Mapping):
            templates = {str(k): str(v) for k, v in value.items()}
        elif value is not None:
            raise ValueError(f"{d / TOKENIZER_CONFIG}: 'chat_template' must be a string")
        for name in templates:
            self._template_files[name] = f"{d / TOKENIZER_CONFIG} (chat_template {name!r})"
        return templates

    # ------------------------------------------------------------------ encode / decode

    @property
    def has_chat_template(self) -> bool:
        """Whether the checkpoint ships a chat template."""
        return bool(self.chat_templates)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string (vocabulary piece or added/special token), None if unknown."""
        if self.backend == "huggingface":
            return self._tok.token_to_id(token)
        return self._sp.piece_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The token string of an id, None if out of range."""
        if self.backend == "huggingface":
            return self._tok.id_to_token(int(token_id))
        if token_id in self._sp.id_to_added:
            return self._sp.id_to_added[token_id]
        return self._sp.sp.id_to_piece(int(token_id)) if 0 <= token_id < self._sp.size else None

    def _encode_plain(self, text: str) -> list[int]:
        if self.backend == "huggingface":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def _wrap(self, ids: list[int], bos: Optional[bool], eos: Optional[bool]) -> list[int]:
        if bos is None:
            head = self._head
        elif bos:
            if self.bos_id is None:
                raise ValueError(f"bos=True but the tokenizer in {self.checkpoint_dir} has no BOS token")
            head = [self.bos_id]
        else:
            head = []
        if eos is None:
            tail = self._tail
        elif eos:
            if self.eos_id is None:
                raise ValueError(f"eos=True but the tokenizer in {self.checkpoint_dir} has no EOS token")
            tail = [self.eos_id]
        else:
            tail = []
        return [*head, *ids, *tail]

    def encode(self, text: str, bos: Optional[bool] = None, eos: Optional[bool] = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the text; special token strings in it (``<|eot_id|>``, ``</s>``) become their ids.
            bos: prepend BOS (True), don't (False), or do what the checkpoint does by default (None, like
                ``AutoTokenizer(text)``).
            eos: append EOS (True), don't (False), or the checkpoint's default (None).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if bos is None and getattr(self, "_full_default", False):  # post-processor we could not take apart
            return self._tok.encode(text, add_special_tokens=True).ids
        return self._wrap(self._encode_plain(text), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: Optional[bool] = None,
                     eos: Optional[bool] = False) -> list[list[int]]:
        """:meth:`encode` for many texts (parallel in the ``tokenizers`` backend)."""
        texts = list(texts)
        if self.backend == "huggingface":
            plain = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        else:
            plain = [self._sp.encode(t) for t in texts]
        return [self._wrap(ids, bos, eos) for ids in plain]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (as ``AutoTokenizer.decode``); ``skip_special_tokens`` drops BOS/EOS/etc."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]  # type: ignore[union-attr]
        if self.backend == "sentencepiece":
            return self._sp.decode(ids, skip_special_tokens)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers cleans up spaces before punctuation when asked to, except for BPE models
        if self._clean_up and self._model_type != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming detokenizer: ``.add(id)`` returns newly completed text (see :class:`IncrementalDecoder`)."""
        return IncrementalDecoder(lambda ids: self.decode(ids, skip_special_tokens=skip_special_tokens))

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Optional[Sequence[Mapping[str, Any]]] = None,
                            chat_template: Optional[str] = None, **kwargs: Any) -> str:
        """Render a conversation with the checkpoint's chat template, as transformers' ``apply_chat_template``.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: end with the header that starts an assistant turn.
            tools: JSON schemas of tools, for templates that support them.
            chat_template: a template string or the name of one of the checkpoint's templates, instead of the
                default one.
            kwargs: extra template variables (they override the special token strings).
        """
        template = self._resolve_template(chat_template, tools)
        variables = {**self._template_tokens, **kwargs}
        documents = variables.pop("documents", None)
        name = next((n for n, t in self.chat_templates.items() if t == template), None)
        source = self._template_files[name] if name is not None else "the chat template given"
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    documents=documents, source=source, **variables)

    def _resolve_template(self, chat_template: Optional[str], tools: Any) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if not self.chat_templates:
            raise ValueError(
                f"the tokenizer in {self.checkpoint_dir} has no chat template; pass a template or use a base-model "
                "prompt style"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ValueError(
            f"the tokenizer in {self.checkpoint_dir} has several chat templates and none is named 'default'; pass "
            f"chat_template= one of {sorted(self.chat_templates)}"
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Optional[Sequence[Mapping[str, Any]]] = None, **kwargs: Any) -> list[int]:
        """Ids of the rendered conversation. Like transformers' ``apply_chat_template(tokenize=True)`` no special
        tokens are added: the template writes BOS (as text) itself when the model wants one."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self._encode_plain(text)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, stop_ids={self.stop_ids})")
