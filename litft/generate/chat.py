"""Conversations: message validation, a session that keeps history, and the interactive loop of ``litft chat``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, TextIO

from litft.data.formats import CHAT_ROLES as ROLES
from litft.generate.sampling import SamplingParams

if TYPE_CHECKING:
    from litft.api import LLM

HELP = ("Type a message and press Enter. End a line with \\ to continue on the next line. "
        "Ctrl-C stops a reply; /reset clears the history, /exit, Ctrl-D or Ctrl-C at the prompt leaves.")


def check_messages(messages: Sequence[Any]) -> None:
    """Raise ValueError unless ``messages`` is a non-empty list of {"role": ..., "content": str} dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError('messages must be a non-empty list like [{"role": "user", "content": "Hi"}]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'messages[{i}] must be a dict with "role" and "content", got {m!r}')
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: role {m['role']!r} is invalid: expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]: content must be a string, got {type(m['content']).__name__}")


class ChatSession:
    """A conversation with history. When it outgrows the context, the oldest turns are dropped (the system
    message stays). A fine-tune run trained on single prompt/response rows (alpaca, instruction, template, ...:
    its ``final/prompt_format.yaml``) answers each message alone, rendered as training rendered a prompt."""

    def __init__(self, llm: "LLM", params: SamplingParams, system: Optional[str] = None) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.single_turn = llm.prompt_format is not None and llm.prompt_format.format != "chat"
        if self.single_turn and system:
            raise ValueError(f"a system message is for chat models; {llm.checkpoint_dir} was trained on "
                             f"{llm.prompt_format.format!r} rows, which have none")  # type: ignore[union-attr]
        self.messages: list[dict[str, str]] = []
        self.dropped = 0  # messages dropped so far to fit the context
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text``; the exchange joins the history once the reply is complete."""
        if not text.strip():
            raise ValueError("the message is empty")
        messages = self.messages + [{"role": "user", "content": text}]
        if self.single_turn:  # each message alone, as the run's rows rendered their prompts
            messages = []
            ids = self.llm.encode_chat([{"role": "user", "content": text}])
            limit = self.llm.engine.max_seq_length - self.params.max_new_tokens
            if len(ids) > limit:
                raise ValueError(f"the message is {len(ids)} tokens in the run's prompt format, more than the "
                                 f"{limit} the context leaves after max_new_tokens={self.params.max_new_tokens}")
        else:
            ids = self._fit(messages)
        request = self.llm.engine.new_request(ids, self.params)
        reply = []
        for piece in self.llm.engine.stream(request):
            reply.append(piece)
            yield piece
        if not self.single_turn:
            self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]

    def _fit(self, messages: list[dict[str, str]]) -> list[int]:
        limit = self.llm.engine.max_seq_length - self.params.max_new_tokens
        first = 1 if messages and messages[0]["role"] == "system" else 0
        while True:
            ids = self.llm.encode_chat(messages)
            if len(ids) <= limit:
                return ids
            if len(messages) - first <= 1:
                raise ValueError(f"the message is {len(ids)} tokens with the chat template, more than the "
                                 f"{limit} the context leaves after max_new_tokens={self.params.max_new_tokens}")
            # drop the oldest exchange (user + assistant) after the system message
            drop = 2 if len(messages) - first > 2 else 1
            del messages[first:first + drop]
            self.dropped += drop


def read_message(stdin: TextIO, stdout: TextIO, prompt: str = ">> ", more: str = ".. ") -> Optional[str]:
    """One message from ``stdin``; lines ending with a backslash continue on the next line. None at EOF."""
    stdout.write(prompt)
    stdout.flush()
    lines: list[str] = []
    while True:
        line = stdin.readline()
        if not line:  # Ctrl-D / end of input
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            stdout.write(more)
            stdout.flush()
            continue
        lines.append(line)
        return "\n".join(lines)


def chat_loop(session: ChatSession, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
              stderr: Optional[TextIO] = None) -> None:
    """The interactive loop: read a message, stream the reply, until /exit, end of input or Ctrl-C at the prompt
    (default streams: the process's stdin, stdout and stderr). Ctrl-C during a reply stops it and returns to the
    prompt; the interrupted exchange is left out of the history."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    stderr.write(HELP + "\n")
    while True:
        try:
            text = read_message(stdin, stdout)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
            text = None
        if text is None:
            stdout.write("\n")
            stdout.flush()
            return
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            stderr.write("(history cleared)\n")
            continue
        if not command:
            continue
        dropped = session.dropped
        try:
            for piece in session.send(text):
                stdout.write(piece)
                stdout.flush()
        except ValueError as e:
            stderr.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C during the reply: stop it, back to the prompt
            session.llm.engine.reset()  # the interrupt may have hit inside a decode step
            stdout.write("\n")
            stdout.flush()
            stderr.write("(interrupted)\n")
            continue
        stdout.write("\n")
        stdout.flush()
        if session.dropped > dropped:
            stderr.write(f"(the conversation outgrew the context: dropped the {session.dropped - dropped} oldest "
                         f"message(s))\n")
