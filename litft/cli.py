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

from litft.errors import LitftError

# command path → ("module:function", one-line summary shown by `litft --help`)
Table = dict[str, Union[tuple[str, str], "Table"]]
# In a sub-table, the "" key is its default leaf: it runs when the next argument is not one of the table's
# names, with all remaining arguments (so `litft evaluate ckpt --tasks x` and `litft evaluate perplexity ...`).
DEFAULT = ""
DEFAULT_LABEL = "(default)"
COMMANDS: Table = {
    "download": ("litft.download:download", "Download a model from the Hugging Face Hub and convert it."),
    "upload": ("litft.upload:upload", "Upload a folder (convert to_hf / to_peft output) to the Hugging Face Hub."),
    "plot": ("litft.plot:plot", "Plot a run's loss (train and val), learning rate and tokens/s to a PNG."),
    "assets": {
        "ls": ("litft.asset_cards:ls", "List the asset cards (local checkpoints and tokenizers by name)."),
    },
    "generate": ("litft.generate.cli:generate", "Generate text for a prompt or every row of a JSONL/.txt file."),
    "chat": ("litft.generate.cli:chat", "Chat with a model in the terminal (chat template, history, streaming)."),
    "serve": ("litft.serve.cli:serve", "Serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)."),
    "convert": {
        "from_hf": ("litft.convert.hf:convert_from_hf", "Hugging Face checkpoint folder → litft checkpoint."),
        "to_hf": ("litft.convert.hf:convert_to_hf", "litft checkpoint → Hugging Face folder (transformers, vLLM)."),
        "to_peft": ("litft.convert.peft:to_peft", "LoRA/DoRA or prompt-tuning run → PEFT adapter folder "
                                                  "(adapter_config.json)."),
        "from_peft": ("litft.convert.peft:from_peft", "PEFT LoRA/DoRA or prompt-tuning adapter + --base → litft "
                                                      "checkpoint."),
        "merge_lora": ("litft.convert.merge:merge_lora", "Merge a LoRA/DoRA/QLoRA run into plain native weights."),
        "consolidate": ("litft.convert.consolidate:consolidate", "FSDP step checkpoint (sharded/) → loadable "
                                                                 "checkpoint files (generate, to_hf, LLM.load)."),
        "from_gguf": ("litft.convert.gguf:convert_from_gguf", "GGUF file (llama.cpp, Ollama, LM Studio) → litft "
                                                              "checkpoint."),
        "to_gguf": ("litft.convert.gguf:convert_to_gguf", "litft checkpoint or LoRA run → GGUF file (llama.cpp, "
                                                          "Ollama; f32/f16/bf16/q8_0)."),
    },
    "evaluate": {
        # "" = the default leaf: `litft evaluate <checkpoint> --tasks ...` (first argument not a subcommand name)
        "": ("litft.evaluate.harness:evaluate", "Run lm-eval tasks on a checkpoint: <checkpoint> --tasks t1,t2 "
                                                "(bare --tasks lists them)."),
        "perplexity": ("litft.evaluate.perplexity:perplexity", "Perplexity of a checkpoint on a .txt/.jsonl file."),
        "accuracy": ("litft.evaluate.accuracy:accuracy", "Accuracy of a generations file against references."),
    },
    "finetune": {
        "full": ("litft.finetune.full:finetune_full", "Fine-tune all weights of a checkpoint."),
        "lora": ("litft.finetune.lora:finetune_lora", "Fine-tune LoRA/DoRA weights (QLoRA with --quantize bnb.nf4)."),
        "adapter": ("litft.finetune.adapter:finetune_adapter", "Fine-tune a LLaMA-Adapter on a frozen checkpoint."),
        "prompt": ("litft.finetune.prompt:finetune_prompt", "Prompt tuning: learn virtual tokens before every "
                                                            "sequence of a frozen checkpoint."),
    },
    "configs": {
        "ls": ("litft.configs:ls", "List the fine-tuning recipes in config_hub/finetune."),
        "cp": ("litft.configs:cp", "Copy a recipe to a YAML file you can edit."),
    },
}


def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _usage(path: list[str], table: Table) -> str:
    prog = " ".join(["litft", *path])
    lines = [f"usage: {prog} <command> [options]"]
    if DEFAULT in table:
        lines.append(f"       {prog} [arguments]      (no command name: runs {DEFAULT_LABEL})")
    lines += ["", "commands:"]
    width = max(len(k or DEFAULT_LABEL) for k in table) + 2
    for name, entry in table.items():
        if isinstance(entry, tuple):
            summary = entry[1]
        else:
            summary = "subcommands: " + ", ".join(k for k in entry if k != DEFAULT)
            if DEFAULT in entry:
                summary = f"{entry[DEFAULT][1]} Subcommands: " + ", ".join(k for k in entry if k != DEFAULT)
        lines.append(f"  {name or DEFAULT_LABEL:<{width}}{summary}")
    lines += ["", f"Run `{prog} <command> --help` for a command's options"
              + (f", `{prog} <arguments> --help` for {DEFAULT_LABEL}'s." if DEFAULT in table else ".")]
    if not path:
        lines.append("Wherever a command takes a checkpoint folder, an asset card's name works too (litft assets ls).")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    table: Table = COMMANDS
    path: list[str] = []
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(path, table))
            if not (argv and DEFAULT in table):
                return
            # `litft evaluate --help`: the default leaf's options too (its own --help, below the command table)
            print(f"\n{DEFAULT_LABEL}: litft {' '.join(path)} [arguments]\n")
            entry = table[DEFAULT]
            break
        if argv[0] not in table and DEFAULT in table:
            entry = table[DEFAULT]  # e.g. `litft evaluate <checkpoint> --tasks ...`: argv is all the leaf's
            break
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

    from litft.cli_parser import Parser

    function = _load(entry[0])
    # a leaf may accept shorthand its signature cannot express (`litft evaluate --tasks` with no value, a
    # positional that may be left out): its function then carries `cli_argv(argv) -> argv`, applied before parsing
    argv = getattr(function, "cli_argv", lambda args: args)(argv)
    try:
        CLI(function, args=argv, prog=" ".join(["litft", *path]), as_positional=True, parser_class=Parser)
    except (LitftError, ValueError, RuntimeError, OSError) as e:
        # the one error boundary: litft's errors on bad input carry the file/field and what was expected, an OS
        # error its file and cause; each is one line (LITFT_DEBUG=1 shows the traceback)
        if _debug():
            raise
        print(f"litft {' '.join(path)}: error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def error_line(error: BaseException) -> str:
    """One line for an error the CLI reports: its message, or for an OS error that litft did not word, the file
    and the OS's cause ("/out/final: No space left on device")."""
    if isinstance(error, OSError) and not isinstance(error, LitftError) and error.strerror:
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        return f"{' -> '.join(names)}: {error.strerror}" if names else error.strerror
    return str(error) or type(error).__name__


def _debug() -> bool:
    import os

    return os.environ.get("LITFT_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    main()
