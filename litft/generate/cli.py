"""``litft generate`` and ``litft chat``: thin entry points whose signatures are the command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

from litft.generate.sampling import SamplingParams


def generate(
    checkpoint: Path,
    prompt: Optional[str] = None,
    input: Optional[Path] = None,
    output: Optional[Path] = None,
    prompt_field: str = "prompt",
    id_field: str = "id",
    batch_size: int = 16,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: Union[list[str], str, None] = None,
    seed: Optional[int] = None,
    chat_template: Optional[bool] = None,
    truncate: bool = False,
    max_seq_length: Optional[int] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
) -> None:
    """Generate text for one prompt (streamed to stdout) or for every row of a JSONL or plain-text file.

    Args:
        checkpoint: checkpoint folder (litft, Hugging Face, or a fine-tune run's final/).
        prompt: the prompt; its completion is streamed to stdout.
        input: file of prompts, instead of --prompt: JSONL (or a JSON list), one object per row; or a ``.txt`` file,
            one prompt per line (blank lines are skipped; a row's id is its line number, from 1). A JSONL row
            without ``prompt_field`` is a row in a training format (alpaca, instruction, src/tgt, input/output,
            text, template or chat messages): rendered exactly as the run that wrote the checkpoint rendered its
            rows (its ``final/prompt_format.yaml``; else the format the row's keys show), its response (a chat
            row's last assistant turn) becoming the reference.
        output: with --input: JSONL file to append {"id", "prompt", "generation", "reference" (when the row has
            one), "finish_reason", ...} rows to (``litft evaluate accuracy --generations FILE`` scores them against
            their references); rows whose id is already there are skipped, so an interrupted run resumes where it
            stopped.
        prompt_field: field of each JSONL row holding the prompt (a string, or a list of chat messages).
        id_field: field of each JSONL row holding its id; rows without one are numbered from 0 in file order.
        batch_size: how many rows decode together (finished rows are replaced at once by waiting ones).
        max_new_tokens: the most tokens to generate per prompt.
        temperature: 0 = greedy decoding; higher = more random.
        top_k: sample only from the k most likely tokens.
        top_p: sample only from the most likely tokens that together have probability top_p.
        min_p: drop tokens less likely than min_p times the most likely one.
        repetition_penalty: > 1 discourages repeating tokens of the prompt and the output.
        stop: a string or a JSON list of strings that end the generation (the text is cut right before), e.g.
            --stop Question: or --stop '["\\n\\n", "Question:"]'.
        seed: random seed for reproducible sampling.
        chat_template: true: a string prompt is a user message in the checkpoint's chat template; false: it is
            given as it is. Default: rendered as the run rendered its rows (a fine-tune's final/ records how:
            an Alpaca run's prompt around the instruction, a chat run's chat template, ...), else the chat
            template when the checkpoint has one.
        truncate: drop the oldest prompt tokens when prompt + max_new_tokens exceeds the context (default: error).
        max_seq_length: longest prompt + generation; default the model's context.
        quantize: quantized inference, e.g. bnb.nf4 or bnb.int8.
        precision: bf16-true, 16-true or 32-true; default bf16 on GPU, 32-true on CPU.
        device: auto, cpu, cuda or cuda:N.
        compile: compile the decode step with torch.compile (CUDA graphs on GPU).
    """
    from litft.api import LLM

    if (prompt is None) == (input is None):
        raise ValueError("give exactly one of --prompt \"...\" or --input file.jsonl (or prompts.txt)")
    if input is not None and output is None:
        raise ValueError("--input needs --output (the JSONL file generations are written to)")
    if output is not None and input is None:
        raise ValueError("--output is for --input mode; with --prompt the text goes to stdout")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=_stop_list(stop))
    rows = None
    if input is not None:  # read (and check) the rows before loading the model
        from litft.asset_cards import resolve_checkpoint
        from litft.data.formats import PromptFormat

        rows = _read_input(Path(input), prompt_field, id_field, PromptFormat.load(resolve_checkpoint(checkpoint)))
    llm = LLM.load(checkpoint, device=device, precision=precision, quantize=quantize, compile=compile,
                   max_seq_length=max_seq_length)
    rendering = _rendering(llm, chat_template, checkpoint)
    if prompt is not None:
        ids, _ = _encode(llm, prompt, rendering, "--prompt")
        request = llm.engine.new_request(ids, params, truncate)
        t0 = time.perf_counter()
        for piece in llm.engine.stream(request):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        elapsed = time.perf_counter() - t0
        print(f"{request.num_generated} tokens in {elapsed:.2f} s ({request.num_generated / elapsed:.1f} tokens/s), "
              f"finish reason: {request.finish_reason}", file=sys.stderr)
        return
    _generate_file(llm, rows, Path(output), params, rendering, truncate, batch_size)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(tokenizer.has_chat_template)


def _encode(llm: Any, prompt: Any, rendering: str, source: str) -> tuple[list[int], str]:
    """(ids, the text the model is given) of a prompt: chat messages with the chat template, a row already rendered
    as it is, a string as ``rendering`` says ("run": the run's prompt format, "chat": a user message in the chat
    template, "raw": as it is)."""
    if isinstance(prompt, list):  # chat messages: the chat template, or a prompt/response run's own rendering
        if rendering == "run":
            try:
                return llm.encode_chat(prompt), llm.format_prompt(prompt[0]["content"])
            except (ValueError, LookupError, TypeError) as e:
                raise ValueError(f"{source}: {e}") from None
        if not _has_chat_template(llm.tokenizer):
            raise ValueError(f"{source}: the prompt is a list of chat messages but the checkpoint has no chat template")
        try:
            ids = llm.encode_chat(prompt, chat_template=True)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return ids, llm.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(f"{source}: the prompt must be a string or a list of chat messages, got "
                         f"{type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{source}: the prompt is empty")
    if rendering == "chat" and not isinstance(prompt, _Rendered):
        return _encode(llm, [{"role": "user", "content": prompt}], rendering, source)
    if rendering == "run" and not isinstance(prompt, _Rendered):
        prompt = llm.format_prompt(prompt)
    return llm.encode(prompt), str(prompt)


def _rendering(llm: Any, chat_template: Optional[bool], checkpoint: Path) -> str:
    """How string prompts are given to the model: --chat_template true/false, else as the run rendered its rows
    (final/prompt_format.yaml), else the chat template when the checkpoint has one."""
    if chat_template:
        if not _has_chat_template(llm.tokenizer):
            raise ValueError(f"--chat_template true but {checkpoint} has no chat template")
        return "chat"
    if chat_template is False:
        return "raw"
    if llm.prompt_format is not None:
        return "chat" if llm.prompt_format.format == "chat" else "run"
    return "chat" if _has_chat_template(llm.tokenizer) else "raw"


def _stop_list(stop: Union[list[str], str, None]) -> Union[list[str], str]:
    """--stop as given: a string, or a list (jsonargparse parsed a JSON list). A string starting with ``[`` is a JSON
    list that did not parse as one (``'["\\n"'``): refused, never used as a literal stop string."""
    if not isinstance(stop, str) or not stop.lstrip().startswith("["):
        return stop or []
    example = "e.g. --stop '[\"\\n\\n\", \"Question:\"]'"
    try:
        value = json.loads(stop)
    except json.JSONDecodeError as e:
        raise ValueError(f"--stop {stop!r} looks like a JSON list but does not parse ({e.msg} at column {e.colno}): "
                         f"give a JSON list of strings ({example}) or one stop string") from None
    raise ValueError(f"--stop {stop!r} must be a list of strings, got {value!r} ({example})")


class _Rendered(str):
    """A prompt already rendered as training rendered its row: encoded as it is."""


def _row_prompt(record: Any, prompt_format: Any) -> tuple[Any, Optional[str]]:
    """(prompt, reference) of a row in a training format, rendered with ``prompt_format``, its response as the
    reference; chat rows give the messages up to the last assistant turn (that turn is the reference)."""
    from litft.data.formats import chat_messages

    if prompt_format.format == "chat":
        messages = chat_messages(prompt_format, record)  # type: ignore[arg-type]
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            return messages[:-1], messages[-1]["content"]
        return messages, None
    text, reference = prompt_format.row_prompt(record)
    return _Rendered(text), reference


def _read_input(path: Path, prompt_field: str, id_field: str, prompt_format: Any = None
                ) -> list[tuple[Any, Any, str, Optional[str]]]:
    """[(id, prompt, source, reference)] of the input file, with clear errors for missing fields and duplicate ids.
    A row without ``prompt_field`` is a row in a training format (see :func:`_row_prompt`)."""
    from litft.data.loader import read_records

    if path.suffix.lower() == ".txt":
        return _read_text_prompts(path)
    records = read_records(path)
    # rows with prompt_field (judged by the first row, as training judges the format) or rows in a training format,
    # rendered as the run did (or, for a checkpoint that is not a run's, as the first row's keys show)
    training_rows = prompt_field not in records[0].data
    if training_rows and prompt_format is None:
        from litft.data.formats import PromptFormat, detect_format

        try:
            prompt_format = PromptFormat(format=detect_format(PromptFormat(format="auto"), records[0]))  # type: ignore
        except ValueError as e:
            raise ValueError(f"{e}; or give each row a {prompt_field!r} field (--prompt_field)") from None
    rows, seen = [], {}
    for index, r in enumerate(records):
        if not training_rows and prompt_field not in r.data:
            raise ValueError(f"{r.source}: no {prompt_field!r} field (fields: {', '.join(r.data)}); choose the "
                             f"prompt's field with --prompt_field")
        prompt, reference = _row_prompt(r, prompt_format) if training_rows else (r.data[prompt_field], None)
        key = r.data.get(id_field, index)
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"{r.source}: {id_field} must be a string or an integer, got {key!r}")
        if str(key) in seen:
            raise ValueError(f"{r.source}: duplicate {id_field} {key!r} (first at {seen[str(key)]})")
        seen[str(key)] = r.source
        rows.append((key, prompt, r.source, reference))
    return rows


def _read_text_prompts(path: Path) -> list[tuple[int, str, str, None]]:
    """[(line number, prompt, source, None)] of a plain-text file with one prompt per line; blank lines are skipped
    (so the ids, the line numbers, stay those of the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist" if not path.exists()
                                else f"--input {str(path)!r} is not a file")
    from litft.data.loader import read_text

    text = read_text(path)
    lines = (line.removesuffix("\r") for line in text.split("\n"))  # \n ends a line (not splitlines' \f, \x1c...)
    rows = [(n, line, f"{path}:{n}", None) for n, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts (expected one prompt per line)")
    return rows


def _done_ids(output: Path) -> set[str]:
    """Ids already in ``output``; a last line cut off by an interruption is removed from the file."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # partial last line: drop it so appending starts on a fresh line
        with open(output, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add(str(row["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{output}:{number}: not a generation row (expected a JSON object with an 'id'); "
                             f"is --output the right file?") from None
    return done


def _generate_file(llm: Any, rows: list[tuple[Any, Any, str, Optional[str]]], output: Path, params: SamplingParams,
                   rendering: str, truncate: bool, batch_size: int) -> None:
    from tqdm import tqdm

    done = _done_ids(output)
    known = {str(key) for key, _, _, _ in rows}
    stray = sorted(done - known)
    if stray:
        raise ValueError(f"{output} holds id(s) {', '.join(stray[:5])} that are not in the input: it belongs to "
                         f"another input file (choose another --output)")
    todo = [row for row in rows if str(row[0]) not in done]
    if done:
        print(f"resuming: {len(done)} of {len(rows)} rows are already in {output}", file=sys.stderr)
    if not todo:
        print(f"nothing to do: all {len(rows)} rows are in {output}", file=sys.stderr)
        return
    requests, prompts = [], []
    for key, prompt, source, _ in todo:
        ids, text = _encode(llm, prompt, rendering, source)
        prompts.append(text)
        try:
            requests.append(llm.engine.new_request(ids, params, truncate))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    finished: dict[int, Any] = {}
    next_to_write = 0
    with open(output, "a", encoding="utf-8") as f, tqdm(total=len(rows), initial=len(done), unit="row",
                                                        desc="generate", file=sys.stderr) as bar:
        def on_finish(index: int, request: Any) -> None:
            nonlocal next_to_write
            finished[index] = request
            bar.update(1)
            while next_to_write in finished:  # write in input order, each line flushed as soon as it can be
                r = finished.pop(next_to_write)
                key, _, _, reference = todo[next_to_write]
                row = {"id": key, "prompt": prompts[next_to_write], "generation": r.text}
                if reference is not None:
                    row["reference"] = reference
                row.update(finish_reason=r.finish_reason, prompt_tokens=len(r.prompt_ids),
                           generated_tokens=r.num_generated)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                next_to_write += 1

        llm.engine.run(requests, max_batch_size=batch_size, on_finish=on_finish)
    print(f"wrote {len(todo)} generations to {output}", file=sys.stderr)


def chat(
    checkpoint: Path,
    system: Optional[str] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: Optional[int] = None,
    top_p: float = 0.9,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    max_seq_length: Optional[int] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
) -> None:
    """Chat with a model in the terminal, using its chat template; the reply is streamed. A fine-tune run trained on
    prompt/response rows (alpaca, instruction, template, ...) answers each message alone, rendered as its training
    prompts were (``final/prompt_format.yaml``), without history.

    Type a message and press Enter; end a line with a backslash (\\) to continue the message on the next line.
    Ctrl-C stops a reply (it is left out of the history); /reset clears the history; /exit, Ctrl-D or Ctrl-C at
    the prompt leaves. When the conversation outgrows the context, the oldest exchanges are dropped.

    Args:
        checkpoint: checkpoint folder (litft, Hugging Face, or a fine-tune run's final/) with a chat template.
        system: system message that starts the conversation.
        max_new_tokens: the most tokens per reply.
        temperature: 0 = greedy decoding; higher = more random.
        top_k: sample only from the k most likely tokens.
        top_p: sample only from the most likely tokens that together have probability top_p.
        min_p: drop tokens less likely than min_p times the most likely one.
        repetition_penalty: > 1 discourages repeating tokens.
        seed: random seed for reproducible sampling.
        max_seq_length: longest conversation + reply; default the model's context.
        quantize: quantized inference, e.g. bnb.nf4 or bnb.int8.
        precision: bf16-true, 16-true or 32-true; default bf16 on GPU, 32-true on CPU.
        device: auto, cpu, cuda or cuda:N.
        compile: compile the decode step with torch.compile (CUDA graphs on GPU).
    """
    from litft.api import LLM
    from litft.generate.chat import ChatSession, chat_loop

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    llm = LLM.load(checkpoint, device=device, precision=precision, quantize=quantize, compile=compile,
                   max_seq_length=max_seq_length)
    session = ChatSession(llm, params, system)
    if not session.single_turn and not _has_chat_template(llm.tokenizer):
        raise ValueError(f"{checkpoint} has no chat template (chat_template in tokenizer_config.json or "
                         f"chat_template.jinja); use `litft generate {checkpoint} --prompt ...` instead")
    chat_loop(session)
