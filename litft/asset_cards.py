"""Asset cards: YAML files that give a short name to a local checkpoint or tokenizer.

A card file (any ``*.yaml`` in ``$LITFT_ASSET_DIR`` — several folders separated by ``:`` — or else in
``~/.config/litft/assets/``) holds one or more YAML documents::

    name: llama3_2_1b@user
    checkpoint: /models/Llama-3.2-1B
    ---
    name: llama3@user
    tokenizer: /models/Llama-3.2-1B/tokenizer.json

Every command that takes a checkpoint accepts such a name (``litft generate llama3_2_1b@user``); the
``@user`` suffix may be left out when the name is unambiguous. ``litft assets ls`` lists the cards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

CARD_FIELDS = ("name", "checkpoint", "tokenizer", "description")


@dataclass(frozen=True)
class AssetCard:
    name: str
    source: Path  # the card file
    checkpoint: Optional[Path] = None
    tokenizer: Optional[Path] = None
    description: str = ""


def asset_dirs() -> list[Path]:
    env = os.environ.get("LITFT_ASSET_DIR")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path("~/.config/litft/assets").expanduser()]


def load_cards(dirs: Optional[list[Path]] = None) -> dict[str, AssetCard]:
    """All cards by name; a card with a missing path or a name used twice is an error naming the card file."""
    cards: dict[str, AssetCard] = {}
    for directory in dirs if dirs is not None else asset_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.y*ml")):
            for card in _read_card_file(path):
                if card.name in cards:
                    raise ValueError(f"{path}: asset name {card.name!r} is already defined in {cards[card.name].source}")
                cards[card.name] = card
    return cards


def _read_card_file(path: Path) -> list[AssetCard]:
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    cards = []
    for n, doc in enumerate(documents, 1):
        where = f"{path} (card {n})"
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
            raise ValueError(f"{where}: expected a mapping with a 'name' string")
        unknown = sorted(set(doc) - set(CARD_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(CARD_FIELDS)}")
        if not doc.get("checkpoint") and not doc.get("tokenizer"):
            raise ValueError(f"{where}: card {doc['name']!r} needs a 'checkpoint' or a 'tokenizer' path")
        paths = {}
        for key in ("checkpoint", "tokenizer"):
            if doc.get(key):
                p = Path(str(doc[key])).expanduser()
                if not p.is_absolute():
                    p = (path.parent / p).resolve()
                if not p.exists():
                    raise ValueError(f"{where}: {key} path {p} of {doc['name']!r} does not exist")
                paths[key] = p
        cards.append(AssetCard(name=doc["name"], source=path, description=str(doc.get("description", "")), **paths))
    return cards


def find_card(name: str, cards: Optional[dict[str, AssetCard]] = None) -> Optional[AssetCard]:
    """The card called ``name`` (or ``name@<anything>`` when only one such card exists)."""
    cards = load_cards() if cards is None else cards
    if name in cards:
        return cards[name]
    if "@" not in name:
        matches = [c for n, c in cards.items() if n.split("@", 1)[0] == name]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ValueError(f"asset name {name!r} is ambiguous: {', '.join(sorted(c.name for c in matches))}")
    return None


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint path as given, or the ``checkpoint`` of the asset card with that name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    card = find_card(str(name_or_path))
    if card is None:
        return path  # the caller reports the missing path in its own words
    if card.checkpoint is None:
        raise ValueError(f"{card.source}: asset {card.name!r} names a tokenizer only, not a checkpoint")
    return card.checkpoint


def ls() -> None:
    """List the asset cards in $LITFT_ASSET_DIR (or ~/.config/litft/assets/)."""
    cards = load_cards()
    if not cards:
        print(f"no asset cards in {', '.join(map(str, asset_dirs()))}")
        return
    width = max(len(n) for n in cards) + 2
    for name, card in sorted(cards.items()):
        target = card.checkpoint or card.tokenizer
        kind = "checkpoint" if card.checkpoint else "tokenizer"
        print(f"{name:<{width}}{kind:<12}{target}   ({card.source})")
