"""The training objectives, one registry: ``--objective.name`` picks one, ``--objective.<option>`` sets its options.

:data:`OBJECTIVES` maps each name to its :class:`~litft.train.objectives.base.Objective` class, whose ``args_type``
dataclass holds its options. :class:`ObjectiveArgs` (the ``objective`` argument of every ``litft finetune``
command and ``objective:`` in run.yaml and recipes) is built from them: ``name`` plus every objective's options,
each left unset (None) meaning that objective's own default; :meth:`ObjectiveArgs.resolve` gives the chosen
objective's class and its options, refusing an option that belongs to another objective. On the command line
``--objective dpo`` is short for ``--objective.name dpo`` (:func:`objective_cli_argv`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from litft.train.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from litft.train.objectives.dpo import DPOObjective, IPOObjective
from litft.train.objectives.kd import KDObjective
from litft.train.objectives.orpo import ORPOObjective
from litft.train.objectives.simpo import SimPOObjective
from litft.train.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (SFTObjective, DPOObjective, IPOObjective,
                                                                    SimPOObjective, ORPOObjective, KDObjective)}


def _option_docs(cls: type) -> dict[str, str]:
    import docstring_parser

    return {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(cls.__doc__ or "").params
            if p.description}


def _resolve(self: Any) -> tuple[type[Objective], Any]:
    """The chosen objective's class and its options dataclass (unset options: its defaults)."""
    if self.name not in OBJECTIVES:
        raise ValueError(f"objective.name={self.name!r} is invalid: expected one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[self.name]
    own = {f.name for f in dataclasses.fields(cls.args_type)}
    given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "name" and getattr(self, f.name) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        raise ValueError(f"objective.{foreign[0]} is not an option of objective {self.name!r} (its options: "
                         f"{', '.join(sorted(own)) or 'none'})")
    return cls, cls.args_type(**given)


def _objective_args_type() -> type:
    """The ``objective`` argument's dataclass: ``name`` and the union of every objective's options."""
    fields: list[tuple[str, Any, Any]] = [("name", str, dataclasses.field(default="sft"))]
    docs = {"name": "The training objective: " + ", ".join(OBJECTIVES) + " (default sft: next-token cross-entropy)."}
    for cls in OBJECTIVES.values():
        hints = typing.get_type_hints(cls.args_type)
        option_docs = _option_docs(cls.args_type)
        for f in dataclasses.fields(cls.args_type):
            doc = f"{cls.name}: {option_docs.get(f.name, '')} (default {f.default!r})"
            if f.name in docs:
                docs[f.name] += f"; {doc}"
                continue
            fields.append((f.name, Optional[hints[f.name]], dataclasses.field(default=None)))
            docs[f.name] = doc
    doc = ("The training objective and its options (an option left unset takes the objective's default).\n\n"
           "Args:\n" + "\n".join(f"    {name}: {text}" for name, text in docs.items()) + "\n")
    return dataclasses.make_dataclass("ObjectiveArgs", fields, namespace={"__doc__": doc, "resolve": _resolve,
                                                                            "__module__": __name__})


ObjectiveArgs = _objective_args_type()


def objective_cli_argv(argv: list[str]) -> list[str]:
    """``--objective NAME`` (or ``--objective=NAME``) as ``--objective.name NAME``: the name is the one value of the
    ``objective`` group the command line gives alone (``--objective FILE.yaml`` stays the group's config file)."""

    def is_name(value: str) -> bool:
        return not value.startswith(("{", "-")) and not value.endswith((".yaml", ".yml", ".json"))

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--objective" and i + 1 < len(argv) and is_name(argv[i + 1]):
            out += ["--objective.name", argv[i + 1]]
            i += 2
            continue
        if arg.startswith("--objective=") and is_name(arg.partition("=")[2]):
            arg = "--objective.name=" + arg.partition("=")[2]
        out.append(arg)
        i += 1
    return out


__all__ = ["OBJECTIVES", "Objective", "ObjectiveArgs", "ObjectiveContext", "ObjectiveOutput", "SFTObjective",
           "objective_cli_argv"]
