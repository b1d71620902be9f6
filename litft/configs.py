"""``litft configs ls`` / ``litft configs cp``: the fine-tuning recipes in ``config_hub/finetune/<model>/<method>.yaml``.

A recipe is a YAML file for ``litft finetune <method> --config FILE``; its name is ``<model>/<method>``
(e.g. ``llama-3.2-1b/lora``). The first comment line of a file is its description.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path
from typing import Optional

import litft


def hub_dir() -> Path:
    """The ``config_hub/finetune`` folder: next to the package in a source checkout, or inside it when installed."""
    package = Path(litft.__file__).resolve().parent
    for candidate in (package.parent / "config_hub" / "finetune", package / "config_hub" / "finetune"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"config_hub/finetune not found next to {package} (a source checkout) nor inside it "
                            "(an install): reinstall litft")


def recipes() -> dict[str, Path]:
    """Recipe name (``<model>/<method>``) → file, sorted by name."""
    root = hub_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def describe(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def method_of(name: str) -> str:
    """The ``litft finetune`` subcommand a recipe is for (QLoRA recipes run with ``finetune lora``; a suffix names
    the objective: ``lora-dpo`` runs with ``finetune lora``)."""
    method = name.rsplit("/", 1)[-1].split("-", 1)[0]
    return "lora" if method == "qlora" else method


def ls(model: Optional[str] = None) -> None:
    """List the fine-tuning recipes (``litft finetune <method> --config <file>``).

    Args:
        model: Only recipes whose name contains this text (e.g. "llama" or "lora").
    """
    found = {n: p for n, p in recipes().items() if model is None or model.lower() in n.lower()}
    if not found:
        raise ValueError(f"no recipe matches {model!r}; `litft configs ls` lists them all")
    width = max(len(n) for n in found) + 2
    root = hub_dir()
    print(f"recipes in {root} (run one: litft finetune <method> --config <file>; copy one: litft configs cp NAME "
          "my.yaml)\n")
    for name, path in found.items():
        print(f"{name:<{width}}{describe(path)}")


def cp(name: str, destination: Path, overwrite: bool = False) -> Path:
    """Copy a recipe to a file you can edit, then run it with ``litft finetune <method> --config <destination>``.

    Args:
        name: Recipe name as listed by ``litft configs ls``, e.g. "llama-3.2-1b/lora".
        destination: File (or existing directory) to copy it to.
        overwrite: Replace ``destination`` if it exists.
    """
    available = recipes()
    key = name.removesuffix(".yaml")
    if key not in available:
        close = difflib.get_close_matches(key, list(available), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"no recipe named {name!r}.{hint} `litft configs ls` lists them")
    destination = Path(destination)
    if destination.is_dir():
        destination = destination / f"{key.replace('/', '-')}.yaml"
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass --overwrite true to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp")
    shutil.copyfile(available[key], tmp)
    tmp.replace(destination)
    print(f"copied {key} to {destination}; run it with: litft finetune {method_of(key)} --config {destination}")
    return destination
