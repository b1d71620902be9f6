"""The model zoo: one module per family, each with its named configs and its HF weight-name table.

Look-up works by short name (``Llama-3.2-1B``) or HF repo id (``meta-llama/Llama-3.2-1B``), case-insensitive.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any

from litft.config import Config
from litft.zoo import (deepseek, gemma, gemma4, gpt_oss, llama, llama4, mistral, olmo, phi, qwen, qwen3_moe, qwen35,
                       smollm3)
from litft.zoo.base import Family, WeightRule

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for module in (llama, mistral, gemma, qwen, qwen3_moe, phi, olmo, smollm3, gpt_oss, llama4, deepseek, gemma4, qwen35)
    for f in module.FAMILIES
}


def family_for(model_type: str) -> Family:
    """The family whose HF ``model_type`` (as in config.json) is given."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; litft supports: {', '.join(sorted(FAMILIES))}"
        ) from None


def all_configs() -> list[Config]:
    return [c for f in FAMILIES.values() for c in f.configs]


def _index() -> dict[str, Config]:
    index: dict[str, Config] = {}
    for c in all_configs():
        index[c.name.lower()] = c
        if c.hf_id:
            index[c.hf_id.lower()] = c
    return index


def get_config(name: str, **overrides: Any) -> Config:
    """A copy of the named config (short name or HF repo id), with field overrides."""
    index = _index()
    config = index.get(name.lower()) or index.get(name.lower().split("/")[-1])
    if config is None:
        names = sorted({c.name for c in all_configs()})
        close = difflib.get_close_matches(name, names + [c.hf_id for c in all_configs() if c.hf_id], n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " Run `litft download` to see all names."
        raise ValueError(f"unknown model name {name!r}.{hint}")
    return replace(config, **overrides) if overrides else replace(config)


__all__ = ["FAMILIES", "Family", "WeightRule", "family_for", "get_config", "all_configs"]
