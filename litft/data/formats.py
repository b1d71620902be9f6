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
from typing import TYPE_CHECKING, Any, Optional

from litft.data.loader import Record

if TYPE_CHECKING:
    from litft.data import DataArgs

FORMATS = ("auto", "alpaca", "instruction", "input_output", "text", "template", "chat")
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


def render_segments(fmt: str, data: "DataArgs", record: Record) -> Segments:
    """Row → prompt/response segments for every format except ``chat`` (see :func:`chat_segments`)."""
    if fmt in ("alpaca", "instruction"):
        if fmt == "instruction" and "src" in record.data and data.instruction_field not in record.data:
            return [(_field(record, "src"), False), (_field(record, "tgt"), True)]
        style = "alpaca" if fmt == "alpaca" else data.prompt_style
        prompt = format_prompt(
            _field(record, data.instruction_field), _field(record, data.input_field, required=False), style
        )
        return [(prompt, False), (_field(record, data.output_field), True)]
    if fmt == "input_output":
        return [(_field(record, data.input_field), False), (_field(record, data.output_field), True)]
    if fmt == "text":
        return _split_at_response_template(_field(record, data.text_field), data.response_template, record)
    if fmt == "template":
        return _render_template(data, record)
    raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


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


def _render_template(data: "DataArgs", record: Record) -> Segments:
    template = data.template
    assert template is not None

    def fill(part: str) -> str:
        return PLACEHOLDER.sub(lambda m: _field(record, m.group(1), what=" used by the template"), part)

    if data.response_template is not None:  # fms-hf-tuning style: render the whole row, then split at the marker
        return _split_at_response_template(fill(template), data.response_template, record)
    match = next((m for m in PLACEHOLDER.finditer(template) if m.group(1) == data.output_field), None)
    if match is None:
        raise ValueError(
            f"data.template has no {{{{{data.output_field}}}}} placeholder and data.response_template is not set: "
            f"cannot tell where the response starts"
        )
    return [(fill(template[: match.start()]), False),
            (_field(record, data.output_field, what=" used by the template"), True),
            (fill(template[match.end():]), True)]


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


def encode_segments_batch(tokenizer: Any, rows: list[Segments], bos: Optional[bool] = None
                          ) -> list[tuple[list[int], list[bool]]]:
    """:func:`encode_segments` for many rows, with one (parallel) ``encode_batch`` call when the tokenizer has it."""
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
