"""The jsonargparse parser every ``litft`` leaf command is parsed with (``litft.cli`` passes it as ``parser_class``).

It is jsonargparse's own parser with three of its reports made readable, in this one place:
a YAML syntax error in a ``--config`` file names that file (not ``"<unicode string>"``) and the line; a group of
options given a scalar in a config file (``train: 5``) is refused naming the group instead of failing later in
instantiation with a ``TypeError``; and a ``null`` given to an option that does not take one is reported as such,
not as a missing argument (a required one) nor let through until the command fails on it. Every parse error then
ends in one line (``error: ...``) after the usage.
"""

from __future__ import annotations

import contextvars
import re
from typing import Any, NoReturn, Optional, get_args

import yaml
from jsonargparse import ArgumentParser, Namespace, get_loader, set_loader

PARSER_MODE = "litft_yaml"
# the --config file being read, as the user gave it (jsonargparse hands its loader the text and the base name only)
_config_file: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("litft_config_file", default=None)
# the dotted keys a --config file sets to null (a required argument left out and one given null look alike after
# parsing: both are None)
_config_nulls: contextvars.ContextVar[Optional[set[str]]] = contextvars.ContextVar("litft_config_nulls", default=None)


def _null_keys(value: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, item in value.items():
        if item is None:
            keys.add(f"{prefix}{key}")
        elif isinstance(item, dict):
            keys |= _null_keys(item, f"{prefix}{key}.")
    return keys


def _load_yaml(text: str) -> Any:
    """jsonargparse's YAML loader, whose syntax errors name the config file and the line instead of the string."""
    try:
        value = get_loader("yaml")(text)
        nulls = _config_nulls.get()
        if nulls is not None and isinstance(value, dict):
            nulls |= _null_keys(value)
        return value
    except yaml.MarkedYAMLError as e:
        source = _config_file.get() or "the value"
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        context = f" ({e.context}" + (f" at line {e.context_mark.line + 1}" if e.context_mark else "") + ")" \
            if e.context else ""
        raise yaml.YAMLError(f"{where}: {e.problem or 'invalid YAML'}{context}") from None


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


def _one_line(message: str) -> str:
    """A jsonargparse error message (often indented over several lines, with ``<class 'int'>``) on one line."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)


def _type_name(hint: Any) -> str:
    """``typing.Union[int, pathlib.Path]`` → ``Union[int, Path]``; ``<class 'float'>`` → ``float``."""
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return re.sub(r"\b(?:[a-z_][\w]*\.)+(?=[A-Za-z_])", "", text)


class Parser(ArgumentParser):
    """``jsonargparse.ArgumentParser`` in litft's parser mode, with the checks and messages described above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_mode", PARSER_MODE)
        super().__init__(*args, **kwargs)
        self._config_nulls: set[str] = set()

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Namespace:
        nulls: set[str] = set()
        file_token, nulls_token = _config_file.set(str(path)), _config_nulls.set(nulls)
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            _config_file.reset(file_token)
            _config_nulls.reset(nulls_token)
            self._config_nulls |= nulls

    def validate(self, namespace: Namespace, *args: Any, **kwargs: Any) -> None:
        branch = args[2] if len(args) > 2 else kwargs.get("branch")  # (validate(namespace, skip_unset, ..., branch))
        if branch is None:  # the whole config (not a subcommand's branch)
            self._check_groups_are_mappings(namespace)
            self._check_nulls(namespace)
        super().validate(namespace, *args, **kwargs)

    def _option_names(self) -> list[str]:
        return [a.dest for a in self._actions if a.option_strings and a.dest not in ("help", "config", "print_config")]

    def _check_groups_are_mappings(self, namespace: Namespace) -> None:
        """``train: 5`` in a config file: jsonargparse skips group keys in validation and fails in instantiation."""
        names = self._option_names()
        for key, value in namespace.items():
            members = [n for n in names if n.startswith(key + ".")]
            if key in (self.groups or {}) and members and not isinstance(value, (Namespace, dict)):
                example = members[0][len(key) + 1:]
                raise TypeError(f'Parser key "{key}": expected a mapping of its options (--{members[0]}, ...), '
                                f"e.g. `{key}: {{{example}: ...}}` in a config file; got {value!r} "
                                f"({type(value).__name__})")

    def _check_nulls(self, namespace: Namespace) -> None:
        """``lr: null`` (or a required argument given null) is a wrong value, not a missing one: jsonargparse skips
        None in validation (so the command fails later) or, for a required argument, says it is missing."""
        actions = {a.dest: a for a in self._actions}
        for key, value in namespace.items():
            action = actions.get(key)
            hint = getattr(action, "_typehint", None)
            if value is not None or hint is None:
                continue
            if not (key in self._config_nulls if action.required else action.default is not None):
                continue  # a required argument not given at all: jsonargparse's "required" message
            if hint in (Any, object, type(None)) or type(None) in get_args(hint) or None in get_args(hint):
                continue
            raise TypeError(f'Parser key "{key}": null is not allowed here (expected {_type_name(hint)})')

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        super().error(_one_line(message), ex)
