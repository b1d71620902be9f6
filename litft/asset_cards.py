"""Asset cards: YAML files that give a short name to a local checkpoint or tokenizer.

A card file (any ``*.yaml``/``*.yml`` in ``$LITFT_ASSET_DIR`` — several folders separated by ``:`` — or else in
``~/.config/litft/assets/``) holds one or more YAML documents, each naming a checkpoint *or* a tokenizer::

    name: llama3_2_1b@user
    checkpoint: /models/Llama-3.2-1B        # a litft checkpoint, a Hugging Face folder or a run's final/
    description: Llama 3.2 1B base
    ---
    name: llama3-tokenizer@user
    tokenizer: /models/Llama-3.2-1B          # a folder holding tokenizer.json or tokenizer.model

Every command that takes a checkpoint accepts a checkpoint card's name in place of the path (``litft generate
llama3_2_1b@user``, ``litft finetune lora llama3_2_1b@user``, ``litft convert to_hf ...``, ``LLM.load(...)``);
:class:`litft.Tokenizer` accepts a tokenizer card's name (or a checkpoint card's: its tokenizer). The ``@user``
suffix may be left out when the name is unambiguous. A relative path in a card is relative to the card file.
``litft assets ls`` lists the cards; one whose folder is gone is listed as missing, and only using its name is
an error.

:func:`resolve_checkpoint` and :func:`resolve_tokenizer` are the one place names become paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import yaml

CARD_FIELDS = ("name", "checkpoint", "tokenizer", "description")
ASSET_DIR_ENV = "LITFT_ASSET_DIR"
DEFAULT_ASSET_DIR = "~/.config/litft/assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# a name is one word: no path separator or whitespace, so that a path is never mistaken for a name
_NAME = re.compile(r"^[^/\\\s]+$")


@dataclass(frozen=True)
class AssetCard:
    name: str
    source: Path  # the card file
    checkpoint: Optional[Path] = None
    tokenizer: Optional[Path] = None
    description: str = ""
    # why the card cannot be used now (its folder was deleted, moved or emptied): `assets ls` lists it as missing
    # and warns; only asking for this card by name is an error
    problem: Optional[str] = None


def asset_dirs() -> list[Path]:
    """The folders cards are read from: ``$LITFT_ASSET_DIR`` (``:``-separated) when set and not empty, else
    ``~/.config/litft/assets``."""
    env = os.environ.get(ASSET_DIR_ENV)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path(DEFAULT_ASSET_DIR).expanduser()]


def load_cards(dirs: Optional[list[Path]] = None) -> dict[str, AssetCard]:
    """All cards by name. A malformed card file or a name used twice is an error naming the card file; a card
    whose folder is missing (or holds no tokenizer) is kept with its ``problem``, so that the other cards work."""
    cards: dict[str, AssetCard] = {}
    for directory in dirs if dirs is not None else asset_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.y*ml")):
            if path.suffix not in (".yaml", ".yml"):
                continue
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
        name = doc["name"]
        if not _NAME.match(name):
            raise ValueError(f"{where}: name {name!r} is invalid: expected one word without '/' or spaces "
                             "(e.g. llama3_2_1b@user)")
        unknown = sorted(set(doc) - set(CARD_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(CARD_FIELDS)}")
        if not doc.get("checkpoint") and not doc.get("tokenizer"):
            raise ValueError(f"{where}: card {name!r} needs a 'checkpoint' or a 'tokenizer' path")
        if doc.get("checkpoint") and doc.get("tokenizer"):
            raise ValueError(f"{where}: card {name!r} has both 'checkpoint' and 'tokenizer': a checkpoint carries "
                             "its own tokenizer; give the tokenizer its own card (separated by ---)")
        key = "checkpoint" if doc.get("checkpoint") else "tokenizer"
        target = Path(str(doc[key])).expanduser()
        if not target.is_absolute():
            target = (path.parent / target).resolve()
        cards.append(AssetCard(name=name, source=path, description=str(doc.get("description", "")),
                               problem=_path_problem(where, name, key, target), **{key: target}))
    return cards


def _path_problem(where: str, name: str, key: str, target: Path) -> Optional[str]:
    """Why the card's folder cannot be used (None when it can)."""
    if not target.exists():
        return f"{where}: {key} path {target} of {name!r} does not exist"
    if not target.is_dir():
        return f"{where}: {key} path {target} of {name!r} is a file: expected the folder holding the {key}"
    if key == "tokenizer" and not any((target / f).is_file() for f in TOKENIZER_FILES):
        return f"{where}: tokenizer path {target} of {name!r} holds no {' or '.join(TOKENIZER_FILES)}"
    return None


def find_card(name: str, cards: Optional[dict[str, AssetCard]] = None) -> Optional[AssetCard]:
    """The card called ``name`` (or ``name@<anything>`` when only one such card exists); None when there is none."""
    cards = load_cards() if cards is None else cards
    if name in cards:
        return cards[name]
    if "@" not in name:
        matches = [c for n, c in cards.items() if n.split("@", 1)[0] == name]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ValueError(f"asset name {name!r} is ambiguous: {', '.join(sorted(c.name for c in matches))} "
                             f"(cards in {', '.join(sorted({str(c.source) for c in matches}))})")
    return None


def _card_for(name_or_path: Union[str, Path]) -> tuple[Path, Optional[AssetCard]]:
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    if path.exists() or not _NAME.match(text) or text.startswith((".", "~")):
        return path, None  # a path (existing or not) is taken as it is
    return path, find_card(text)


def resolve_checkpoint(name_or_path: Union[str, Path]) -> Path:
    """A checkpoint path as given, or the ``checkpoint`` of the asset card with that name.

    A path that does not exist and names no card comes back unchanged: the caller reports it in its own words.
    A tokenizer card is refused with a message naming its file.
    """
    path, card = _card_for(name_or_path)
    if card is None:
        return path
    if card.problem:
        raise ValueError(card.problem)
    if card.checkpoint is None:
        raise ValueError(f"{card.source}: asset {card.name!r} names a tokenizer only, not a checkpoint: give this "
                         "command a card with a 'checkpoint:' path (litft assets ls lists them)")
    return card.checkpoint


def resolve_tokenizer(name_or_path: Union[str, Path]) -> Path:
    """A tokenizer folder as given, or the folder named by an asset card (a tokenizer card's ``tokenizer``, a
    checkpoint card's ``checkpoint``)."""
    path, card = _card_for(name_or_path)
    if card is None:
        return path
    if card.problem:
        raise ValueError(card.problem)
    return card.tokenizer if card.tokenizer is not None else card.checkpoint  # type: ignore[return-value]


def ls() -> None:
    """List the asset cards in $LITFT_ASSET_DIR (or ~/.config/litft/assets/); a card whose folder is gone is
    listed as missing, with a warning."""
    import sys

    cards = load_cards()
    if not cards:
        print(f"no asset cards in {', '.join(map(str, asset_dirs()))} (a card is a YAML file with 'name:' and "
              "'checkpoint:'; see litft/asset_cards.py)")
        return
    width = max(len(n) for n in cards) + 2
    print(f"{'name':<{width}}{'kind':<12}path   (card file)")
    for name, card in sorted(cards.items()):
        target = card.checkpoint or card.tokenizer
        kind = "missing" if card.problem else "checkpoint" if card.checkpoint else "tokenizer"
        description = f"   {card.description}" if card.description else ""
        print(f"{name:<{width}}{kind:<12}{target}   ({card.source}){description}")
    for card in sorted((c for c in cards.values() if c.problem), key=lambda c: c.name):
        print(f"warning: {card.problem}", file=sys.stderr)
