"""``litft evaluate accuracy``: score a generations file against a references file (no lm-eval needed).

Each generation is matched to its reference by id (``--generation_id_field`` / ``--id_field``; a file without
ids is numbered by line, as ``litft generate`` numbers its rows), an answer is extracted from both, and the
fraction of equal answers is reported (torchmetrics ``MeanMetric``), with a results JSON and a short table.

Extraction (``--extract``):

- ``gsm8k``: the number after ``#### `` (as in GSM8K references and the fairseq2 recipe), else the last number
  in the text; commas are dropped (``1,234``), negatives and decimals are kept, and numbers compare by value
  (``72.0`` == ``72``). A generation without any number is counted wrong.
- ``exact``: the whole text with whitespace normalised (stripped, runs collapsed to one space).
- ``regex``: the first match of ``--regex`` (its first matching group, if any) in the generation; the reference
  is reduced by the same pattern when it matches, else used whole; whitespace normalised.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Optional

GSM8K_ANSWER = re.compile(r"####\s*(-?[0-9.,]*[0-9])")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def parse_number(text: str) -> Optional[Decimal]:
    """``"1,234.50"`` → Decimal("1234.50"); None when it is not a number."""
    try:
        value = Decimal(text.replace(",", "").replace("$", "").strip().rstrip("."))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_gsm8k(text: str) -> Optional[Decimal]:
    """The number after ``####``, else the last number in ``text``; None when there is none."""
    match = GSM8K_ANSWER.search(text)
    if match:
        value = parse_number(match.group(1))
        if value is not None:
            return value
    numbers = NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def extract_regex(text: str, pattern: re.Pattern) -> Optional[str]:
    match = pattern.search(text)
    if match is None:
        return None
    groups = [g for g in match.groups() if g is not None]  # the first group that took part in the match
    return normalize_whitespace(groups[0] if groups else match.group(0))


def _extractor(extract: str, regex: Optional[str]):
    """(prediction extractor, reference extractor) for an extraction mode."""
    if extract == "gsm8k":
        return extract_gsm8k, extract_gsm8k
    if extract == "exact":
        return normalize_whitespace, normalize_whitespace
    if extract == "regex":
        if not regex:
            raise ValueError("--extract regex needs --regex PATTERN (e.g. --regex 'answer is (\\w+)')")
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ValueError(f"--regex {regex!r} is not a valid regular expression: {e}") from None
        return (lambda t: extract_regex(t, pattern),
                lambda t: extract_regex(t, pattern) or normalize_whitespace(t))
    raise ValueError(f"--extract {extract!r}: expected gsm8k, exact or regex")


def _load(path: Path, field: str, id_field: str, what: str) -> list[tuple[str, str, str]]:
    """[(id, text, source)] of a JSONL file (id = line order when it has no ids); ``field`` must be a string."""
    from litft.data.loader import read_records

    records = read_records(Path(path))
    has_ids = [id_field in r.data for r in records]
    if any(has_ids) and not all(has_ids):
        missing = records[has_ids.index(False)].source
        raise ValueError(f"{missing}: no {id_field!r} field while other rows of {path} have one "
                         f"(give every row an id, or none to match by line order)")
    rows, seen = [], {}
    for index, r in enumerate(records):
        if field not in r.data:
            raise ValueError(f"{r.source}: no {field!r} field (fields: {', '.join(r.data)}); "
                             f"choose the field with --{what}_field")
        value = r.data[field]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"{r.source}: field {field!r} must be a string, got {type(value).__name__}")
        key = str(r.data[id_field]) if has_ids[0] else str(index)
        if key in seen:
            raise ValueError(f"{r.source}: duplicate {id_field} {key!r} (first at {seen[key]})")
        seen[key] = r.source
        rows.append((key, value, r.source))
    return rows


def score(
    generations: list[tuple[str, str, str]], references: list[tuple[str, str, str]],
    extract: Literal["gsm8k", "exact", "regex"] = "gsm8k", regex: Optional[str] = None,
) -> dict[str, Any]:
    """Accuracy of ``[(id, generation, source)]`` against ``[(id, reference, source)]`` (same ids)."""
    from torchmetrics.aggregation import MeanMetric

    predict, reference_answer = _extractor(extract, regex)
    by_id = {key: (text, source) for key, text, source in references}
    metric = MeanMetric()
    examples, no_answer = [], 0
    for key, generation, _ in generations:
        ref_text, ref_source = by_id[key]
        target = reference_answer(ref_text)
        if target is None or target == "":
            raise ValueError(f"{ref_source}: no answer found in the reference ({extract} extraction): {ref_text!r}")
        prediction = predict(generation)
        if prediction is None:
            no_answer += 1
        correct = prediction is not None and prediction == target
        metric.update(float(correct))
        examples.append({"id": key, "prediction": None if prediction is None else str(prediction),
                         "reference": str(target), "correct": correct})
    n = len(examples)
    return {"accuracy": float(metric.compute()) if n else 0.0, "correct": sum(e["correct"] for e in examples),
            "total": n, "no_answer": no_answer, "extract": extract, "examples": examples}


def accuracy(
    *,
    generations: Path,
    references: Optional[Path] = None,
    extract: Literal["gsm8k", "exact", "regex"] = "gsm8k",
    regex: Optional[str] = None,
    id_field: str = "id",
    generation_id_field: str = "id",
    generation_field: str = "generation",
    answer_field: str = "answer",
    out: Optional[Path] = None,
) -> dict[str, Any]:
    """Accuracy of generated answers against references (gsm8k ``#### n``, exact match or regex extraction).

    Args:
        generations: JSONL written by ``litft generate --input ... --output ...`` (one object per line).
        references: JSONL with the expected answers (e.g. the test split the prompts came from). Default: the
            ``reference`` field of the generations themselves (``litft generate --input`` writes it for rows in a
            training format, from their response).
        extract: How answers are compared: ``gsm8k`` (number after ``####``, else the last number; by value),
            ``exact`` (whole text, whitespace normalised) or ``regex`` (first match of ``--regex``).
        regex: Pattern for ``--extract regex``; its first matching group (else the whole match) is the answer.
        id_field: The references' id field (as given to ``litft generate --id_field``); references without ids
            are numbered 0, 1, ... by line, as ``litft generate`` numbers them.
        generation_id_field: The generations' id field (``litft generate`` writes ``id``); generations without
            ids are numbered by line.
        generation_field: Field of the generations file holding the generated text.
        answer_field: Field of the references file holding the expected answer.
        out: Write the results (summary and per-example predictions) to this JSON file.

    Returns:
        The results: accuracy, correct, total, no_answer, extract and the per-example list.
    """
    from litft.evaluate import format_table, write_json

    _extractor(extract, regex)  # validate the mode before reading files
    gens = _load(Path(generations), generation_field, generation_id_field, "generation")
    if references is None:
        references, answer_field, id_field = Path(generations), "reference", generation_id_field
    refs = _load(Path(references), answer_field, id_field, "answer")
    if len(gens) != len(refs):
        raise ValueError(f"{generations} has {len(gens)} rows but {references} has {len(refs)}: "
                         f"every reference needs exactly one generation")
    ref_ids = {key for key, _, _ in refs}
    unknown = [(key, source) for key, _, source in gens if key not in ref_ids]
    if unknown:
        missing = sorted(ref_ids - {key for key, _, _ in gens})
        raise ValueError(f"{unknown[0][1]}: {generation_id_field} {unknown[0][0]!r} is not in {references}; "
                         f"{len(unknown)} generation id(s) have no reference and references "
                         f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''} have no generation")
    results = score(gens, refs, extract, regex)
    results.update(generations=str(generations), references=str(references))
    print(format_table([[results["extract"], results["total"], results["correct"], results["no_answer"],
                         results["accuracy"]]], ["extract", "total", "correct", "no_answer", "accuracy"]))
    if out is not None:
        write_json(results, out)
        print(f"results written to {out}")
    return results
