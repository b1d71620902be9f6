"""Training controllers: rules over the training metrics that stop the run or save a checkpoint when they hold.

fms-hf-tuning calls these trainer controller rules; examples (``train.controllers`` in YAML)::

    controllers:
      - rule: loss > prev_loss        # the loss went up three steps in a row: stop
        patience: 3
      - rule: val_loss < 1.2          # good enough: stop at the first validation that reaches it
        when: eval
      - rule: grad_norm > 50          # a spike: keep a checkpoint to look at
        action: save

A rule is an arithmetic comparison over the names in :data:`METRICS` (and ``prev_<name>``, the value at the rule's
previous check). It is parsed once, when the run starts, into a small expression tree: no ``eval``, no calls, no
attributes. Every value a rule can read is the same on every process (the losses and the gradient norm are reduced
across processes), so all processes take the same decision and none waits for the others at a collective.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

# name -> what it holds; "step" names are set after every optimizer step, "eval" names after every validation
METRICS: dict[str, str] = {
    "step": "optimizer steps done",
    "epoch": "passes over the training data done (fractional)",
    "lr": "the learning rate of the step",
    "loss": "the step's training loss (when: epoch = the mean step loss of the epoch)",
    "grad_norm": "the gradient norm before clipping (needs train.max_norm)",
    "tokens": "tokens trained on so far",
    "val_loss": "the latest validation loss",
    "val_ppl": "the latest validation perplexity",
}
WHEN = ("step", "eval", "epoch")
ACTIONS = ("stop", "save")
_EVAL_NAMES = ("val_loss", "val_ppl")

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


@dataclass
class Controller:
    """One rule and what to do when it holds.

    Args:
        rule: A comparison over the training metrics, e.g. ``"loss < 0.05"``, ``"val_loss > prev_val_loss"``,
            ``"grad_norm > 50 and step > 100"``. Names: step, epoch, lr, loss, grad_norm (needs train.max_norm),
            tokens, val_loss, val_ppl, and ``prev_<name>`` = its value at this rule's previous check. Operators:
            ``< <= > >= == !=``, ``+ - * / %``, ``and or not``, parentheses. A rule that reads a value not known
            yet (``val_loss`` before the first validation, ``prev_loss`` at the first check) or divides by zero
            does not hold.
        when: When the rule is checked: "step" (after every optimizer step), "eval" (after every validation:
            needs eval.interval) or "epoch" (at the end of each pass over the data; ``loss`` is then the mean step
            loss of the epoch).
        patience: How many checks in a row the rule must hold before the action is taken.
        action: "stop": end the run as if it had reached max_steps (validation, final/ and the summary follow;
            the summary's stop_reason names the rule). "save": write a resumable checkpoint
            (``checkpoints/step-N``) now, then start counting again.
    """

    rule: str
    when: Literal["step", "eval", "epoch"] = "step"
    patience: int = 1
    action: Literal["stop", "save"] = "stop"


def parse_rule(rule: str, where: str) -> tuple[ast.expr, set[str]]:
    """The rule's expression tree and the names it reads; ValueError naming ``where`` when it is not a rule."""
    expected = ("expected a comparison over the training metrics, e.g. 'loss < 0.05' or 'val_loss > prev_val_loss'; "
                f"names: {', '.join(METRICS)} and prev_<name>; operators: < <= > >= == != + - * / % and or not")
    if not isinstance(rule, str) or not rule.strip():
        raise ValueError(f"{where}={rule!r} is empty: {expected}")
    try:
        tree = ast.parse(rule.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"{where}={rule!r} is not a valid rule ({e.msg}): {expected}") from None
    names: set[str] = set()

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                check(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            check(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            check(node.left)
            for value in node.comparators:
                check(value)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            pass
        elif isinstance(node, ast.Name):
            base = node.id[len("prev_"):] if node.id.startswith("prev_") else node.id
            if base not in METRICS:
                raise ValueError(f"{where}={rule!r} reads {node.id!r}, which is not a training metric: expected "
                                 f"one of {', '.join(METRICS)} (or prev_<name>)")
            names.add(node.id)
        else:
            text = ast.get_source_segment(rule.strip(), node) or type(node).__name__
            raise ValueError(f"{where}={rule!r}: {text!r} is not allowed in a rule: {expected}")

    check(tree)
    if not isinstance(tree, (ast.Compare, ast.BoolOp)) and not (isinstance(tree, ast.UnaryOp)
                                                                 and isinstance(tree.op, ast.Not)):
        raise ValueError(f"{where}={rule!r} is a value, not a condition: {expected}")
    return tree, names


def _evaluate(node: ast.expr, values: dict[str, float]) -> Any:
    if isinstance(node, ast.BoolOp):
        results = (_evaluate(v, values) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, values)
        return not value if isinstance(node.op, ast.Not) else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Constant):
        return node.value
    return values[node.id]  # type: ignore[attr-defined]


def validate_controllers(controllers: list[Any]) -> list[Controller]:
    """The controllers (dicts from Python accepted) checked; ValueError naming ``train.controllers[i].<field>`` for the
    first field that is not valid."""
    fields = ("rule", "when", "patience", "action")
    checked = []
    for i, c in enumerate(controllers):
        where = f"train.controllers[{i}]"
        if isinstance(c, dict):
            unknown = sorted(set(c) - set(fields))
            if unknown or "rule" not in c:
                what = f"has unknown field(s) {', '.join(unknown)}" if unknown else "has no rule"
                raise ValueError(f"{where} {what}: expected {{rule, when, patience, action}} (rule required)")
            c = Controller(**c)
        elif not isinstance(c, Controller):
            raise ValueError(f"{where}={c!r} is invalid: expected a mapping {{rule, when, patience, action}}")
        checked.append(c)
        parse_rule(c.rule, f"{where}.rule")
        if c.when not in WHEN:
            raise ValueError(f"{where}.when={c.when!r} is invalid: expected one of {', '.join(WHEN)}")
        if c.action not in ACTIONS:
            raise ValueError(f"{where}.action={c.action!r} is invalid: expected one of {', '.join(ACTIONS)}")
        if isinstance(c.patience, bool) or not isinstance(c.patience, int) or c.patience < 1:
            raise ValueError(f"{where}.patience={c.patience!r} is invalid: expected an integer >= 1")
    return checked


def check_controllers_fit(controllers: list[Controller], max_norm: Optional[float], eval_interval: Optional[int],
                          has_val_data: bool) -> None:
    """Raise ValueError for a rule that could never be checked or never read its values in this run."""
    for i, c in enumerate(controllers):
        where = f"train.controllers[{i}]"
        _, names = parse_rule(c.rule, f"{where}.rule")
        bases = {n[len("prev_"):] if n.startswith("prev_") else n for n in names}
        if "grad_norm" in bases and max_norm is None:
            raise ValueError(f"{where}.rule={c.rule!r} reads grad_norm, which is only measured with clipping: set "
                             "train.max_norm (e.g. 1.0)")
        if c.when == "eval" or bases & set(_EVAL_NAMES):
            what = "is checked after each validation" if c.when == "eval" else "reads the validation loss"
            if not has_val_data:
                raise ValueError(f"{where} {what}, but the run has no validation data: set data.val_path or "
                                 "data.val_split_fraction")
            if not eval_interval:
                raise ValueError(f"{where} {what}, but validation only runs at the end: set eval.interval N "
                                 "(validate every N steps)")


class Controllers:
    """The rules of a run, their patience counts and the values they last saw (saved with each checkpoint)."""

    def __init__(self, controllers: list[Controller]) -> None:
        self.controllers = list(controllers)
        self.trees = [parse_rule(c.rule, f"train.controllers[{i}].rule") for i, c in enumerate(self.controllers)]
        self.counts = [0] * len(self.controllers)
        self.last: list[dict[str, float]] = [{} for _ in self.controllers]  # values at each rule's previous check
        self.values: dict[str, float] = {}
        self.epoch_loss = [0.0, 0]

    def __bool__(self) -> bool:
        return bool(self.controllers)

    def on_step(self, values: dict[str, Optional[float]]) -> list[tuple[int, str]]:
        """After an optimizer step: record ``values`` (step, epoch, lr, loss, grad_norm, tokens); check the "step"
        rules. Returns the (index, action) of the rules that fire."""
        self._update(values)
        if values.get("loss") is not None:
            self.epoch_loss = [self.epoch_loss[0] + float(values["loss"]), self.epoch_loss[1] + 1]
        return self._check("step", self.values)

    def on_eval(self, val_loss: Optional[float]) -> list[tuple[int, str]]:
        """After a validation: record its loss; check the "eval" rules."""
        if val_loss is None:
            return []
        self._update({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
        return self._check("eval", self.values)

    def on_epoch_end(self) -> list[tuple[int, str]]:
        """At the end of a pass over the data: check the "epoch" rules, ``loss`` being the epoch's mean step loss."""
        total, n = self.epoch_loss
        self.epoch_loss = [0.0, 0]
        values = dict(self.values)
        if n:
            values["loss"] = total / n
        return self._check("epoch", values)

    def describe(self, index: int) -> str:
        c = self.controllers[index]
        held = "held" if c.patience == 1 else f"held for {c.patience} {c.when} checks in a row"
        return f"train.controllers[{index}] ({c.rule!r}) {held}"

    def _update(self, values: dict[str, Optional[float]]) -> None:
        for name, value in values.items():
            if value is not None:
                self.values[name] = float(value)

    def _check(self, when: str, values: dict[str, float]) -> list[tuple[int, str]]:
        fired = []
        for i, (c, (tree, names)) in enumerate(zip(self.controllers, self.trees)):
            if c.when != when:
                continue
            scope = {**values, **{f"prev_{k}": v for k, v in self.last[i].items()}}
            try:
                holds = all(n in scope for n in names) and bool(_evaluate(tree, scope))
            except ArithmeticError:  # a division by zero (or an overflow) in the rule: it does not hold
                holds = False
            self.last[i] = dict(values)
            self.counts[i] = self.counts[i] + 1 if holds else 0
            if self.counts[i] >= c.patience:
                fired.append((i, c.action))
                self.counts[i] = 0
        return fired

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, dicts and numbers (loads with ``torch.load(weights_only=True)``)."""
        return {"rules": [[c.rule, c.when, c.patience, c.action] for c in self.controllers],
                "counts": list(self.counts),
                "last": [dict(d) for d in self.last], "values": dict(self.values), "epoch_loss": list(self.epoch_loss)}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> bool:
        """Continue the counts of a checkpoint written with the same rules; returns False (and starts afresh) when the
        checkpoint has none or other rules."""
        rules = [[c.rule, c.when, c.patience, c.action] for c in self.controllers]
        if not state or [list(r) for r in state.get("rules", [])] != rules:
            return False
        self.counts = [int(n) for n in state["counts"]]
        self.last = [{k: float(v) for k, v in d.items()} for d in state["last"]]
        self.values = {k: float(v) for k, v in state["values"].items()}
        self.epoch_loss = [float(state["epoch_loss"][0]), int(state["epoch_loss"][1])]
        return True
