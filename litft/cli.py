"""The ``litft`` command table: a nested subcommand → the function that implements it.

Only the module of the command being run is imported, so ``litft convert to_hf`` never pays for
Lightning and ``litft --help`` pays for nothing. Each leaf is parsed by jsonargparse from the
function's signature and docstring, which gives ``--config file.yaml``, dotted overrides,
``--print_config`` and ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Union

# command path → ("module:function", one-line summary shown by `litft --help`)
Table = dict[str, Union[tuple[str, str], "Table"]]
COMMANDS: Table = {
    "download": ("litft.download:download", "Download a model from the Hugging Face Hub and convert it."),
    "convert": {
        "from_hf": ("litft.convert.hf:convert_from_hf", "Hugging Face checkpoint folder → litft checkpoint."),
        "to_hf": ("litft.convert.hf:convert_to_hf", "litft checkpoint → Hugging Face folder (transformers, vLLM)."),
    },
}


def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _usage(path: list[str], table: Table) -> str:
    prog = " ".join(["litft", *path])
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    width = max(len(k) for k in table) + 2
    for name, entry in table.items():
        summary = entry[1] if isinstance(entry, tuple) else "subcommands: " + ", ".join(entry)
        lines.append(f"  {name:<{width}}{summary}")
    lines += ["", f"Run `{prog} <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    table: Table = COMMANDS
    path: list[str] = []
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(path, table))
            return
        name = argv.pop(0)
        if name not in table:
            import difflib

            close = difflib.get_close_matches(name, list(table), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            print(f"litft: unknown command {' '.join([*path, name])!r}.{hint}\n\n{_usage(path, table)}", file=sys.stderr)
            raise SystemExit(2)
        path.append(name)
        entry = table[name]
        if isinstance(entry, tuple):
            break
        table = entry
    from jsonargparse import CLI

    function = _load(entry[0])
    try:
        CLI(function, args=argv, prog=" ".join(["litft", *path]), as_positional=True)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        # errors litft raises on bad input carry the file/field and what was expected: show them plainly
        if _debug():  # LITFT_DEBUG=1 shows the traceback
            raise
        print(f"litft {' '.join(path)}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _debug() -> bool:
    import os

    return os.environ.get("LITFT_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    main()
