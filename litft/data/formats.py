"""Dataset formats: each row becomes text *segments*, each marked trained (response) or not (prompt).

A row is rendered to ``[(text, trained), ...]``; :func:`encode_segments` tokenizes the joined text
once and finds each segment's first token by encoding the text up to the segment boundary and
taking the longest common prefix with the full encoding. The ids are therefore exactly the
tokenization of the whole rendered string, and a token that straddles a boundary (BPE merging the
end of the prompt with the start of the response) belongs to the later segment.

Formats (``DataArgs.format``):

- ``alpaca``: ``instruction`` / ``input`` (optional) / ``output`` rows with the Alpaca prompt.
- ``instruction``: the same rows with ``prompt_style`` ("alpaca" or "plain"); fairseq2 rows with
  ``src`` / ``tgt`` are used verbatim (``src`` is the prompt, ``tgt`` the response).
- ``input_output``: ``input`` is the prompt as is, ``output`` the response.
- ``text``: one ``text`` field; with ``response_template`` everything up to and including the
  template's first occurrence is the prompt; without it every token is trained.
- ``template``: a formatter template with ``{{field}}`` placeholders; the ``{{output}}`` placeholder
  (``output_field``) starts the response, or ``response_template`` marks it in the rendered text.
- ``chat``: ``messages`` = ``[{"role", "content"}, ...]`` rendered with the checkpoint's chat
  template; only assistant turns (content and end-of-turn marker) are trained.

``auto`` picks from ``DataArgs.template`` / ``response_template`` when set, else from the first
row's keys.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from litft.data.loader import Record

if TYPE_CHECKING:
    from litft.data import DataArgs

FORMATS = ("auto", "alpaca", "instruction", "input_output", "text", "template", "chat")
# the message roles of a conversation, in training data as in `litft chat`, LLM.chat and the server's
# /v1/chat/completions (which also takes OpenAI's "developer" as "system")
CHAT_ROLES = ("system", "user", "assistant", "tool")
PROMPT_STYLES = ("alpaca", "plain")

Segments = list[tuple[str, bool]]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# {{field}}: letters, digits, spaces and . _ - (as fms-hf-tuning documents); spaces around the name are ignored
PLACEHOLDER = re.compile(r"\{\{\s*([\w.\- ]+?)\s*\}\}")


def format_prompt(instruction: str, input: str = "", style: str = "alpaca") -> str:
    """The prompt an instruction row is trained with (and that generation should use)."""
    if style == "alpaca":
        if input:
            return ALPACA_PROMPT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if style == "plain":
        return f"{instruction}\n\n{input}\n" if input else f"{instruction}\n"
    raise ValueError(f"unknown prompt_style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")


def detect_format(data: "DataArgs", record: Record) -> str:
    """Resolve ``format="auto"`` from the data arguments and the first row's keys."""
    if data.template is not None:
        return "template"
    if data.response_template is not None:
        return "text"
    keys = record.data.keys()
    if data.messages_field in keys:
        return "chat"
    if "src" in keys and "tgt" in keys:
        return "instruction"
    if data.instruction_field in keys:
        return "instruction"
    if data.input_field in keys and data.output_field in keys:
        return "input_output"
    if data.text_field in keys:
        return "text"
    raise ValueError(
        f"{record.source}: cannot tell the dataset format from the row's keys {sorted(keys)}; expected "
        f"{data.messages_field!r} (chat), {data.instruction_field!r}+{data.output_field!r} (instruction/alpaca), "
        f"'src'+'tgt' (fairseq2 instruction), {data.input_field!r}+{data.output_field!r} (input_output) or "
        f"{data.text_field!r} (text), or set data.format / data.template"
    )


def _field(record: Record, name: str, required: bool = True, what: str = "") -> str:
    value = record.data.get(name)
    if value is None:
        if not required:
            return ""
        keys = ", ".join(sorted(map(str, record.data))) or "none"
        raise ValueError(f"{record.source}: row has no field {name!r}{what} (its fields: {keys})")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{record.source}: field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def _output_placeholder(data: "DataArgs") -> "re.Match[str]":
    template = data.template
    assert template is not None
    match = next((m for m in PLACEHOLDER.finditer(template) if m.group(1) == data.output_field), None)
    if match is None:
        raise ValueError(
            f"data.template has no {{{{{data.output_field}}}}} placeholder and data.response_template is not set: "
            f"cannot tell where the response starts"
        )
    return match


def _fill(template: str, record: Record, blank: tuple[str, ...] = ()) -> str:
    """``template`` with its {{field}} placeholders filled from the row (fields in ``blank`` may be missing: "")."""
    return PLACEHOLDER.sub(lambda m: _field(record, m.group(1), required=m.group(1) not in blank,
                                            what=" used by the template"), template)


def _is_src_tgt(fmt: str, data: "DataArgs", record: Record) -> bool:
    return fmt == "instruction" and "src" in record.data and data.instruction_field not in record.data


def _prompt_text(fmt: str, data: "DataArgs", record: Record) -> str:
    """The prompt of an alpaca, instruction, input_output or template (``{{output}}``) row: the text before its
    response, as training renders it and as inference must give it to the model."""
    if fmt in ("alpaca", "instruction"):
        if _is_src_tgt(fmt, data, record):
            return _field(record, "src")
        style = "alpaca" if fmt == "alpaca" else data.prompt_style
        return format_prompt(_field(record, data.instruction_field), _field(record, data.input_field, required=False),
                             style)
    if fmt == "input_output":
        return _field(record, data.input_field)
    if fmt == "template":
        return _fill(data.template[: _output_placeholder(data).start()], record)  # type: ignore[index]
    raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def render_segments(fmt: str, data: "DataArgs", record: Record) -> Segments:
    """Row → prompt/response segments for every format except ``chat`` (see :func:`chat_segments`)."""
    if fmt == "text":
        return _split_at_response_template(_field(record, data.text_field), data.response_template, record)
    if fmt == "template" and data.response_template is not None:
        # fms-hf-tuning style: render the whole row, then split at the marker
        return _split_at_response_template(_fill(data.template, record), data.response_template,  # type: ignore
                                           record)
    prompt = _prompt_text(fmt, data, record)
    if fmt == "template":
        after = _fill(data.template[_output_placeholder(data).end():], record)  # type: ignore[index]
        return [(prompt, False), (_field(record, data.output_field, what=" used by the template"), True),
                (after, True)]
    response = _field(record, "tgt") if _is_src_tgt(fmt, data, record) else _field(record, data.output_field)
    return [(prompt, False), (response, True)]


def _split_at_response_template(text: str, response_template: Optional[str], record: Record) -> Segments:
    if response_template is None:
        return [("", False), (text, True)]
    index = text.find(response_template)
    if index < 0:
        raise ValueError(
            f"{record.source}: the response template {response_template!r} does not occur in the row's text"
        )
    end = index + len(response_template)
    return [(text[:end], False), (text[end:], True)]


# ---------------------------------------------------------------------------------------------- inference

PROMPT_FORMAT_FILE = "prompt_format.yaml"


@dataclass
class PromptFormat:
    """How a run rendered its rows, written to its ``final/`` (:data:`PROMPT_FORMAT_FILE`) so that generation gives
    the model its prompts exactly as training did. ``format`` is the resolved data format (never "auto"); the other
    fields are the run's ``data.*`` settings of the same names ("chat": the checkpoint's own chat template)."""

    format: str
    prompt_style: str = "alpaca"
    template: Optional[str] = None
    response_template: Optional[str] = None
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"

    @classmethod
    def of(cls, fmt: str, data: Any) -> "PromptFormat":
        """The rendering of a run with data arguments ``data`` whose rows resolved to format ``fmt``."""
        return cls(format=fmt, **{f.name: getattr(data, f.name) for f in fields(cls) if f.name != "format"})

    def save(self, directory: Path) -> None:
        (Path(directory) / PROMPT_FORMAT_FILE).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, directory: Optional[Path]) -> Optional["PromptFormat"]:
        """The rendering recorded in a checkpoint folder; None when it has none (not a run's output)."""
        path = None if directory is None else Path(directory) / PROMPT_FORMAT_FILE
        if path is None or not path.is_file():
            return None
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or data.get("format") not in FORMATS[1:] or set(data) - known:
            raise ValueError(f"{path}: expected the mapping a run writes: format (one of {', '.join(FORMATS[1:])}) "
                             f"and {', '.join(sorted(known - {'format'}))}")
        return cls(**data)

    def text_prompt(self, text: str) -> Optional[str]:
        """A plain prompt rendered as the run rendered its rows' prompts: the instruction of an alpaca/instruction
        run, the input of an input_output run, the one field of a template's prompt part; None for a chat run
        (the caller applies the chat template)."""
        if self.format == "chat":
            return None
        if self.format in ("alpaca", "instruction"):
            return format_prompt(text, "", "alpaca" if self.format == "alpaca" else self.prompt_style)
        if self.format == "input_output":
            return text
        if self.format == "text":
            return text if self.response_template is None or self.response_template in text \
                else text + self.response_template
        assert self.template is not None
        prompt_part = self.template if self.response_template is not None \
            else self.template[: _output_placeholder(self).start()]  # type: ignore[arg-type]
        names = {m.group(1) for m in PLACEHOLDER.finditer(prompt_part)} - {self.output_field}
        if len(names) != 1:
            raise ValueError(f"the run's template {self.template!r} takes the fields {', '.join(sorted(names))}: a "
                             "plain prompt fills only one; give rows with those fields (generate --input)")
        return self.row_prompt(Record({names.pop(): text}, "the prompt"))[0]

    def row_prompt(self, record: Record) -> tuple[str, Optional[str]]:
        """(prompt, reference) of a training-format row (not chat): the prompt exactly as training rendered it and
        the row's response when it has one (None otherwise)."""
        fmt = self.format
        if fmt == "text":
            text = _field(record, self.text_field)
            if self.response_template is None:
                return text, None
            prompt, response = _split_at_response_template(text, self.response_template, record)
            return prompt[0], response[0] or None
        if fmt == "template" and self.response_template is not None:
            text = _fill(self.template, record, blank=(self.output_field,))  # type: ignore[arg-type]
            prompt, _ = _split_at_response_template(text, self.response_template, record)
            return prompt[0], _field(record, self.output_field, required=False) or None
        reference_field = "tgt" if _is_src_tgt(fmt, self, record) else self.output_field  # type: ignore[arg-type]
        return (_prompt_text(fmt, self, record),  # type: ignore[arg-type]
                _field(record, reference_field, required=False) or None)


# ---------------------------------------------------------------------------------------------- chat


def chat_messages(data: "DataArgs", record: Record) -> list[dict[str, Any]]:
    messages = record.data.get(data.messages_field)
    if messages is None:
        raise ValueError(f"{record.source}: row has no field {data.messages_field!r} (chat format)")
    return check_messages(messages, data.messages_field, record)


def check_messages(messages: Any, field: str, record: Record) -> list[dict[str, Any]]:
    """``messages`` (the row's field ``field``) as a non-empty list of {role, content} objects, or a ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{record.source}: {field!r} must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{record.source}: message {i} must be an object with 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"{record.source}: message {i} has role {message['role']!r}: expected one of "
                             f"{', '.join(CHAT_ROLES)} (the roles chat, generate and serve accept)")
    return messages


def chat_segments(tokenizer: Any, messages: list[dict[str, Any]], record: Record) -> Segments:
    """Render a conversation with the chat template; assistant turns are the trained segments.

    An assistant turn ``i`` starts where ``messages[:i]`` rendered with the generation prompt ends
    (exactly what the model sees at inference) and ends where ``messages[:i+1]`` rendered without
    it ends (so the end-of-turn marker is trained). Both must be prefixes of the full rendering.
    """

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt)
        except Exception as e:  # template errors (raise_exception, bad roles) name the row
            raise ValueError(f"{record.source}: the chat template failed on this conversation: {e}") from None

    full = render(messages, False)
    cuts: list[tuple[int, bool]] = []  # (end offset of a segment, that segment is trained)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = render(messages[:i], True)
        end_text = render(messages[: i + 1], False)
        for prefix in (start_text, end_text):
            if not full.startswith(prefix):
                raise ValueError(
                    f"{record.source}: the chat template does not render this conversation incrementally (the text "
                    f"up to assistant turn {i} is not a prefix of the whole conversation), so the assistant spans "
                    f"cannot be located"
                )
        if len(start_text) < (cuts[-1][0] if cuts else 0) or len(end_text) < len(start_text):
            raise ValueError(f"{record.source}: the chat template renders assistant turn {i} out of order")
        cuts.append((len(start_text), False))
        cuts.append((len(end_text), True))
    segments: Segments = []
    position = 0
    for offset, trained in cuts:
        segments.append((full[position:offset], trained))
        position = offset
    segments.append((full[position:], False))
    return segments


# ---------------------------------------------------------------------------------------------- tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_segments(tokenizer: Any, segments: Segments, bos: Optional[bool] = None) -> tuple[list[int], list[bool]]:
    """Token ids of the joined segments and, per token, whether it belongs to a trained segment."""
    return encode_segments_batch(tokenizer, [segments], bos)[0]


# a row longer than this many characters per token of ``max_tokens`` is tokenized from a prefix of its text
_CHARS_PER_TOKEN = 8


def _cut(segments: Segments, chars: int) -> Segments:
    """The segments of the first ``chars`` characters of the row."""
    out: Segments = []
    for text, trained in segments:
        if chars <= 0:
            break
        out.append((text[:chars], trained))
        chars -= len(text)
    return out


def _encode_long(tokenizer: Any, segments: Segments, bos: Optional[bool], max_tokens: int
                 ) -> tuple[list[int], list[bool]]:
    """The first ``max_tokens`` ids and flags of a very long row, tokenizing only a prefix of its text.

    Cutting the text can change the tokens near the cut, never the ones far before it: the text is cut at ``c`` and
    at ``2c`` characters, and the first ``max_tokens`` tokens are taken once both cuts agree on them (``c`` doubles
    until they do; at the latest the second cut is the whole row). Inner segment boundaries before the cut are the
    same texts as without it, so the flags agree too.
    """
    total = sum(len(text) for text, _ in segments)
    chars = max_tokens * _CHARS_PER_TOKEN
    while True:
        (short_ids, short_flags), (long_ids, long_flags) = encode_segments_batch(
            tokenizer, [_cut(segments, chars), _cut(segments, 2 * chars)], bos)
        if 2 * chars >= total or (len(short_ids) >= max_tokens and short_ids[:max_tokens] == long_ids[:max_tokens]
                                  and short_flags[:max_tokens] == long_flags[:max_tokens]):
            return long_ids[:max_tokens], long_flags[:max_tokens]
        chars *= 2


def encode_segments_batch(tokenizer: Any, rows: list[Segments], bos: Optional[bool] = None,
                          max_tokens: Optional[int] = None) -> list[tuple[list[int], list[bool]]]:
    """:func:`encode_segments` for many rows, with one (parallel) ``encode_batch`` call when the tokenizer has it.

    With ``max_tokens`` (the caller keeps no more), a row of more than ``2 * _CHARS_PER_TOKEN * max_tokens``
    characters is tokenized from a prefix of its text (see :func:`_encode_long`), so one huge row costs what
    ``max_tokens`` allows; it gives exactly ``max_tokens`` ids, the first ``max_tokens`` of the whole row's ids.
    Shorter rows are tokenized whole.
    """
    if max_tokens is not None:
        limit = 2 * _CHARS_PER_TOKEN * max_tokens
        long = {i for i, segments in enumerate(rows) if sum(len(text) for text, _ in segments) > limit}
        if long:
            short = iter(encode_segments_batch(tokenizer, [r for i, r in enumerate(rows) if i not in long], bos))
            return [_encode_long(tokenizer, r, bos, max_tokens) if i in long else next(short)
                    for i, r in enumerate(rows)]
    fulls = ["".join(text for text, _ in segments) for segments in rows]
    prefixes: list[str] = []  # the text up to every inner segment boundary
    for segments, full in zip(rows, fulls):
        offset = 0
        for text, _ in segments[:-1]:
            offset += len(text)
            if text:
                prefixes.append(full[:offset])
    texts = fulls + prefixes
    if hasattr(tokenizer, "encode_batch"):
        encoded = [list(ids) for ids in tokenizer.encode_batch(texts, bos=bos, eos=False)]
    else:
        encoded = [list(tokenizer.encode(text, bos=bos, eos=False)) for text in texts]
    prefix_ids = iter(encoded[len(fulls):])
    out = []
    for segments, ids in zip(rows, encoded[: len(fulls)]):
        trained = [False] * len(ids)
        start = 0
        for index, (text, is_trained) in enumerate(segments):
            if index == len(segments) - 1:
                end = len(ids)
            elif not text:
                end = start
            else:
                end = max(start, _common_prefix(ids, next(prefix_ids)))
            if is_trained:
                trained[start:end] = [True] * (end - start)
            start = end
        out.append((ids, trained))
    return out
