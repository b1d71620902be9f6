"""litft: fine-tune, generate, evaluate, serve and export open LLMs with one PyTorch model zoo."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# imported on first use so that `litft --help` and light commands do not pay for torch
_EXPORTS = {
    "Config": "litft.config",
    "GPT": "litft.model",
    "Tokenizer": "litft.tokenizer",
    "LLM": "litft.api",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'litft' has no attribute {name!r}")


__all__ = list(_EXPORTS)
