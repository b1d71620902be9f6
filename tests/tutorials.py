"""Run the shell commands of a tutorial: every ```bash block of a markdown file, command by command.

Conventions for tutorials (``tutorials/*.md``):

- A ```bash block holds commands a reader types; each one is run by the tests, in order, from one working
  directory (relative paths such as ``out/...`` resolve there; ``cd`` and ``export`` are refused, since every
  command runs in its own subprocess). A trailing ``\\`` continues a command on the next line; ``#`` lines
  and blank lines are skipped.
- Commands that cannot run on a test machine (network: ``litft download``, ``litft upload``; a GPU or vLLM:
  ``vllm serve``) go in other blocks (```text, ```python, ...), which are never run: the test checks what
  they would use instead (e.g. that the exported folder loads in transformers).
- The test substitutes only paths: the model a reader downloads (``checkpoints/meta-llama/Llama-3.2-1B``) by a
  tiny local model, a data file by a small one. Every substitution must occur in the tutorial (a renamed path
  fails loudly instead of silently running something else).

Usage::

    from tests.tutorials import run_tutorial
    run_tutorial("tutorials/export-to-vllm.md", cwd=tmp_path,
                 substitutions={"checkpoints/meta-llama/Llama-3.2-1B": str(tiny_model)})
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


@dataclass
class Command:
    text: str  # as written in the tutorial (continuations joined)
    line: int  # 1-based line of the markdown file where it starts


def code_blocks(markdown: str, language: str = "bash") -> list[tuple[int, str]]:
    """(first content line, content) of every fenced block whose info string starts with ``language``."""
    blocks = []
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
        if info and info[0] == language:
            blocks.append((start + 1, "\n".join(lines[start:j])))
        i = j + 1
    return blocks


def bash_commands(markdown: str) -> list[Command]:
    """The commands of the ```bash blocks, in order (``\\`` continuations joined, comments and blanks dropped)."""
    commands = []
    for first_line, block in code_blocks(markdown, "bash"):
        pending, start = "", first_line
        for offset, raw in enumerate(block.splitlines()):
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if not pending:
                start = first_line + offset
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            commands.append(Command(pending + line, start))
            pending = ""
        if pending:
            raise ValueError(f"line {start}: the command ends with a line continuation")
    return commands


@dataclass
class Ran:
    command: str  # after substitution
    line: int
    stdout: str
    stderr: str


def run_tutorial(
    path: str | Path, cwd: str | Path, substitutions: Optional[Mapping[str, str]] = None,
    env: Optional[Mapping[str, str]] = None, timeout: float = 300, only: Optional[Sequence[int]] = None,
) -> list[Ran]:
    """Run every ```bash command of the tutorial at ``path`` in ``cwd`` (in order, each in a bash subprocess),
    after replacing each key of ``substitutions`` by its value. Fails at the first command that exits non-zero,
    naming its line and showing its output. ``only``: indices of the commands to run (default all).

    The environment is the test's (offline) plus ``env``; ``litft`` resolves to this checkout.
    """
    path = Path(path)
    text = path.read_text()
    substitutions = dict(substitutions or {})
    unused = [k for k in substitutions if k not in text]
    if unused:
        raise AssertionError(f"{path}: substitution(s) {unused} do not occur in the tutorial (was it edited?)")
    commands = bash_commands(text)
    if not commands:
        raise AssertionError(f"{path}: no ```bash commands found")
    run_env = {**os.environ, **(env or {})}
    # `litft` and `python` are this interpreter's, and the checkout is importable even without an install
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", "")])
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), run_env.get("PYTHONPATH", "")) if p)
    ran = []
    for index, command in enumerate(commands):
        if only is not None and index not in only:
            continue
        text_cmd = command.text
        for old in sorted(substitutions, key=len, reverse=True):  # longest first: a key may contain another
            text_cmd = text_cmd.replace(old, substitutions[old])
        first = shlex.split(text_cmd)[0] if text_cmd.strip() else ""
        if first in ("cd", "export", "source", "."):
            raise AssertionError(f"{path}:{command.line}: {first!r} would not persist between commands; write "
                                 "paths relative to one working directory instead")
        result = subprocess.run(["bash", "-c", text_cmd], cwd=cwd, env=run_env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(
                f"{path}:{command.line}: command failed with exit code {result.returncode}\n$ {text_cmd}\n"
                f"--- stdout (end) ---\n{result.stdout[-3000:]}\n--- stderr (end) ---\n{result.stderr[-3000:]}")
        ran.append(Ran(text_cmd, command.line, result.stdout, result.stderr))
    return ran
