"""Run a tutorial as a reader would: its ```bash commands, its ```python blocks and the files it asks to save, in
the order the markdown gives them, from one working directory.

Conventions for tutorials (``tutorials/*.md``):

- A ```bash block holds commands a reader types; each one is run, in order, in its own ``bash -c`` from one working
  directory (relative paths such as ``out/...`` resolve there; ``cd`` and ``export`` are refused, since nothing
  persists between commands; ``VAR=value command`` works). A trailing ``\\`` continues a command on the next line;
  ``#`` lines and blank lines are skipped. Every command must exit with status 0.
- A command that keeps running (a server) is preceded, in its block, by the comment line
  ``# keeps running ... ready when it prints: TEXT``. It is started in the background; the next step waits until
  its output (stdout or stderr) contains TEXT. It must still be running when the tutorial ends; it is then
  stopped with Ctrl-C (SIGINT to its process group), as the reader would, and must exit with status 0.
- A ```python block is executed, in order with the bash commands, in one Python session per tutorial (a name
  defined in one block is there in the next, as in a notebook or a REPL), in the same working directory and
  environment. ``python norun`` marks a block that cannot run on a test machine (a GPU, vLLM, the network): it
  is shown to the reader, never run, and the test checks what it stands for instead.
- A block whose info string has ``title=PATH`` (e.g. ```yaml title=tasks/capitals.yaml) is a file the reader saves:
  it is written to PATH (relative to the working directory; ``~/`` = the ``HOME`` given in ``env``, which is then
  required) when the tutorial reaches it, and never run.
- Blocks of any other language (```text, ```json, ...) are never run. Commands that cannot run on a test machine
  (network: ``litft download``, ``litft upload``; a GPU or vLLM: ``vllm serve``) go there.
- The test substitutes only paths (and a server's port): the model a reader downloads
  (``checkpoints/meta-llama/Llama-3.2-1B``) by a tiny local model, a data file by a small one, ``8000`` by a free
  port. Substitutions apply to commands, python blocks and titled files alike, and each must occur in the
  tutorial (a renamed path fails loudly instead of silently running something else).

Usage::

    from tests.tutorials import run_tutorial
    ran = run_tutorial("tutorials/export-to-vllm.md", cwd=tmp_path,
                       substitutions={"checkpoints/meta-llama/Llama-3.2-1B": str(tiny_model)})
    ran[0].stdout   # what each step printed (python blocks: stdout and stderr together)
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_BACKGROUND = re.compile(r"^#\s*keeps running\b.*?\bready when it prints:\s*(?P<ready>.+?)\s*$")
NORUN = "norun"


@dataclass
class Block:
    line: int  # 1-based line of the markdown file of the block's first content line
    info: list[str]  # the info string's words: language first (``["yaml", "title=x.yaml"]``)
    text: str

    @property
    def language(self) -> str:
        return self.info[0] if self.info else ""

    @property
    def title(self) -> Optional[str]:
        return next((w[len("title="):] for w in self.info if w.startswith("title=")), None)


@dataclass
class Command:
    text: str  # as written in the tutorial (continuations joined)
    line: int  # 1-based line of the markdown file where it starts
    ready: Optional[str] = None  # a background command: the text its output shows once it is ready


@dataclass
class Ran:
    command: str  # after substitution (python: the block's code; a file: its path)
    line: int
    stdout: str
    stderr: str
    kind: str = "bash"  # "bash", "background" (stdout: all it printed until stopped), "python" or "file"


def blocks(markdown: str) -> list[Block]:
    """Every fenced code block, in order."""
    found = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m["fence"], m["info"].strip().split()
        start = i + 1
        j = start
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: code block is never closed")
        found.append(Block(start + 1, info, "\n".join(lines[start:j])))
        i = j + 1
    return found


def code_blocks(markdown: str, language: str = "bash") -> list[tuple[int, str]]:
    """(first content line, content) of every fenced block whose info string starts with ``language``."""
    return [(b.line, b.text) for b in blocks(markdown) if b.language == language]


def _block_commands(block: Block) -> list[Command]:
    commands = []
    pending, start, ready = "", block.line, None
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            m = _BACKGROUND.match(line)
            if m:
                ready = m["ready"]
            continue
        if not pending:
            start = block.line + offset
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append(Command(pending + line, start, ready))
        pending, ready = "", None
    if pending:
        raise ValueError(f"line {start}: the command ends with a line continuation")
    if ready is not None:
        raise ValueError(f"line {block.line}: a 'keeps running' comment is not followed by a command")
    return commands


def bash_commands(markdown: str) -> list[Command]:
    """The commands of the ```bash blocks (titled ones excepted), in order (``\\`` continuations joined, comments
    and blanks dropped; a command after a ``# keeps running ... ready when it prints: TEXT`` line has ``ready``)."""
    return [c for b in blocks(markdown) if b.language == "bash" and b.title is None for c in _block_commands(b)]


def _substitute(text: str, substitutions: Mapping[str, str]) -> str:
    for old in sorted(substitutions, key=len, reverse=True):  # longest first: a key may contain another
        text = text.replace(old, substitutions[old])
    return text


# A Python session: reads {"code", "name", "first_line", "log"} lines on stdin, runs each code in one namespace with
# fd 1 and 2 sent to "log" (so subprocesses and C code are captured too), answers {"ok"} on its own copy of stdout.
_SESSION = r"""
import json, os, sys, traceback
answer = os.fdopen(os.dup(1), "w")
namespace = {"__name__": "__main__"}
for message in sys.stdin:
    message = json.loads(message)
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(message["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1); os.dup2(log, 2); os.close(log)
    ok = True
    try:
        code = "\n" * (message["first_line"] - 1) + message["code"]  # tracebacks give the markdown's lines
        exec(compile(code, message["name"], "exec"), namespace)
    except BaseException:
        ok = False
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
    answer.write(json.dumps({"ok": ok}) + "\n"); answer.flush()
"""


class _PythonSession:
    def __init__(self, cwd: Path, env: Mapping[str, str], scratch: Path) -> None:
        self.scratch = scratch
        self.process = subprocess.Popen([sys.executable, "-u", "-c", _SESSION], cwd=cwd, env=dict(env), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def run(self, code: str, name: str, first_line: int, timeout: float) -> tuple[bool, str]:
        log = self.scratch / f"python-{first_line}.log"
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"code": code, "name": name, "first_line": first_line,
                                             "log": str(log)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        output = log.read_text(errors="replace") if log.exists() else ""
        if not ready:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return False, output + f"\n[timed out after {timeout:.0f} s]"
        if not line:
            return False, output + f"\n[the Python session ended with status {self.process.wait()}]"
        return bool(json.loads(line)["ok"]), output

    def close(self) -> None:
        """End of input: the session exits (killed if it does not within 10 s)."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class _Background:
    def __init__(self, command: str, line: int, cwd: Path, env: Mapping[str, str], scratch: Path) -> None:
        self.command, self.line = command, line
        self.ran: Optional[Ran] = None
        self.log = scratch / f"background-{line}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=dict(env), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, text: str, timeout: float) -> Optional[str]:
        """None once ``text`` is in the output; else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return None
            if self.process.poll() is not None:
                return f"it exited with status {self.process.returncode} before printing {text!r}"
            time.sleep(0.2)
        return f"it did not print {text!r} within {timeout:.0f} s"

    def stop(self, grace: float = 30) -> Optional[int]:
        """Ctrl-C to its process group; its exit status (None: it had to be killed)."""
        if self.process.poll() is not None:
            return self.process.returncode
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return None


def _fail(path: Path, line: int, what: str, shown: str, stdout: str = "", stderr: str = "") -> AssertionError:
    return AssertionError(f"{path}:{line}: {what}\n{shown}\n--- stdout (end) ---\n{stdout[-3000:]}\n"
                          f"--- stderr (end) ---\n{stderr[-3000:]}")


def run_tutorial(
    path: str | Path, cwd: str | Path, substitutions: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None, timeout: float = 300, only: Optional[Sequence[int]] = None,
) -> list[Ran]:
    """Run the tutorial at ``path`` in ``cwd`` (see the module docstring): bash commands, background commands,
    python blocks and titled files, in order, after replacing each key of ``substitutions`` by its value. Fails
    at the first step that fails, naming its line and showing its output; background commands are stopped at the
    end whatever happens. ``timeout``: seconds per step.

    ``only``: indices into :func:`bash_commands` of the commands to run; then nothing else is run or written
    (for a tutorial whose other commands need hardware the test machine lacks).

    The environment is the test's (offline) plus ``env``; ``litft`` and ``python`` are this interpreter's, and the
    checkout is importable even without an install.
    """
    path, cwd = Path(path), Path(cwd)
    text = path.read_text()
    substitutions = dict(substitutions or {})
    unused = [k for k in substitutions if k not in text]
    if unused:
        raise AssertionError(f"{path}: substitution(s) {unused} do not occur in the tutorial (was it edited?)")
    if not bash_commands(text):
        raise AssertionError(f"{path}: no ```bash commands found")
    run_env = {**os.environ, **(env or {})}
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", "")])
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), run_env.get("PYTHONPATH", "")) if p)

    ran: list[Ran] = []
    background: list[_Background] = []
    session: Optional[_PythonSession] = None
    index = -1
    with tempfile.TemporaryDirectory(prefix="tutorial-") as scratch_dir:
        scratch = Path(scratch_dir)
        try:
            for block in blocks(text):
                if block.title is not None:
                    if only is not None:
                        continue
                    title = _substitute(block.title, substitutions)
                    if title.startswith("~/"):
                        if not env or "HOME" not in env:
                            raise AssertionError(f"{path}:{block.line}: {title} is in the reader's home: pass "
                                                 "env={'HOME': <a temporary folder>}")
                        target = Path(env["HOME"]) / title[2:]
                    else:
                        target = cwd / title
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(_substitute(block.text, substitutions) + "\n")
                    ran.append(Ran(str(target), block.line, "", "", "file"))
                elif block.language == "python" and NORUN not in block.info:
                    if only is not None:
                        continue
                    if session is None:
                        session = _PythonSession(cwd, run_env, scratch)
                    code = _substitute(block.text, substitutions)
                    ok, output = session.run(code, str(path), block.line, timeout)
                    if not ok:
                        raise _fail(path, block.line, "python block failed", code, output)
                    ran.append(Ran(code, block.line, output, "", "python"))
                elif block.language == "bash":
                    for command in _block_commands(block):
                        index += 1
                        if only is not None and index not in only:
                            continue
                        ran.append(_run_command(path, command, cwd, run_env, substitutions, timeout, background,
                                                scratch))
        finally:
            if session is not None:
                session.close()
            stopped = [(b, b.stop()) for b in background]
        for b, status in stopped:
            if status != 0:
                raise _fail(path, b.line, f"the background command did not stop cleanly on Ctrl-C (exit status "
                                          f"{status}; None: killed after 30 s)", f"$ {b.command}", b.output())
            if b.ran is not None:
                b.ran.stdout = b.output()
    return ran


def _run_command(path: Path, command: Command, cwd: Path, env: Mapping[str, str], substitutions: Mapping[str, str],
                 timeout: float, background: list[_Background], scratch: Path) -> Ran:
    text_cmd = _substitute(command.text, substitutions)
    first = shlex.split(text_cmd)[0] if text_cmd.strip() else ""
    if first in ("cd", "export", "source", "."):
        raise AssertionError(f"{path}:{command.line}: {first!r} would not persist between commands; write "
                             "paths relative to one working directory instead")
    if command.ready is not None:
        job = _Background(text_cmd, command.line, cwd, env, scratch)
        background.append(job)
        problem = job.wait_ready(_substitute(command.ready, substitutions), timeout)
        if problem:
            raise _fail(path, command.line, f"background command: {problem}", f"$ {text_cmd}", job.output())
        job.ran = Ran(text_cmd, command.line, "", "", "background")  # its output is filled in when it stops
        return job.ran
    for job in background:
        if job.process.poll() is not None:
            raise _fail(path, job.line, f"the background command exited (status {job.process.returncode}) "
                                        "before the tutorial ended", f"$ {job.command}", job.output())
    try:
        result = subprocess.run(["bash", "-c", text_cmd], cwd=cwd, env=dict(env), capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as e:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        raise _fail(path, command.line, f"command timed out after {timeout:.0f} s", f"$ {text_cmd}",
                    decode(e.stdout), decode(e.stderr)) from None
    if result.returncode != 0:
        raise _fail(path, command.line, f"command failed with exit code {result.returncode}", f"$ {text_cmd}",
                    result.stdout, result.stderr)
    return Ran(text_cmd, command.line, result.stdout, result.stderr)
