"""Evaluation: EleutherAI's lm-eval harness on the native model, plus built-in perplexity and accuracy.

- :mod:`litft.evaluate.harness`: ``litft evaluate <checkpoint> --tasks t1,t2``: an lm-eval model class
  (registered as ``litft``) whose loglikelihoods and generations come from litft's own model and engine.
- :mod:`litft.evaluate.perplexity`: ``litft evaluate perplexity``: exp(mean token NLL) over a text/JSONL file.
- :mod:`litft.evaluate.accuracy`: ``litft evaluate accuracy``: answer extraction (gsm8k ``#### n``, exact match,
  regex) over a generations file against a references file.

Only the harness imports ``lm_eval`` (the ``evaluate`` extra); nothing here imports it at module level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename), creating parent directories."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def format_table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain fixed-width table (floats with 4 decimals)."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def load_llm(checkpoint_dir: str | Path, device: str = "auto", precision: str | None = None) -> Any:
    """The :class:`litft.LLM` (model + tokenizer + engine) to evaluate, loaded by :meth:`litft.LLM.load`: a litft
    checkpoint, a Hugging Face folder or a fine-tune run's ``final/``; never the network."""
    from litft.api import LLM

    return LLM.load(checkpoint_dir, device=device, precision=precision)
