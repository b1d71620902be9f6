"""``litft evaluate perplexity``: exp(mean token NLL) of a checkpoint over a text or JSONL file (no lm-eval needed).

Documents. A ``.txt`` file is one document (the whole text); a ``.jsonl``/``.json`` file holds one document per
row, in its ``--text_field``. Each document is encoded as the tokenizer does by default (a BOS first when the
tokenizer adds one) and every token after the first is scored once, documents never seeing each other.

Windows. A document longer than ``max_seq_length`` tokens is scored in strided windows of at most
``max_seq_length`` tokens: the first window scores its tokens 1..L-1; each next window ends ``stride`` tokens
further and scores only those ``stride`` new tokens, so every scored token sees at least
``max_seq_length - stride`` tokens of context (and all of them when the document fits in one window)::

    tokens     0 1 2 3 4 5 6 7 8 9        max_seq_length 6, stride 2
    window 1   0 1 2 3 4 5                scores 1..5
    window 2       2 3 4 5 6 7            scores 6 7
    window 3           4 5 6 7 8 9        scores 8 9

A smaller stride gives more context per token (a lower, more faithful perplexity) at more compute;
``stride = max_seq_length - 1`` gives nearly disjoint windows. Perplexity = exp(sum of NLL / scored tokens).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """The documents of a ``.txt`` (one) or ``.jsonl``/``.json`` file (one per row, in ``text_field``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    from litft.data.loader import read_records, read_text

    if path.suffix == ".txt":
        return [read_text(path)]
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a .txt, .jsonl or .json file")

    documents = []
    for r in read_records(path):
        if text_field not in r.data:
            raise ValueError(f"{r.source}: no {text_field!r} field (fields: {', '.join(r.data)}); "
                             f"choose the field with --text_field")
        if not isinstance(r.data[text_field], str):
            raise ValueError(f"{r.source}: field {text_field!r} must be a string, "
                             f"got {type(r.data[text_field]).__name__}")
        documents.append(r.data[text_field])
    return documents


def strided_windows(n: int, max_seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) windows over a document of ``n`` tokens: input tokens[start:end],
    scored targets first_target..end-1 (see the module docstring). Every token 1..n-1 is scored exactly once."""
    if n < 2:
        return []
    end = min(max_seq_length, n)
    windows = [(0, end, 1)]
    while end < n:
        new_end = min(end + stride, n)
        windows.append((max(0, new_end - max_seq_length), new_end, end))
        end = new_end
    return windows


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module, documents: Sequence[Sequence[int]], max_seq_length: int, stride: int, batch_size: int = 8,
) -> tuple[float, int, int]:
    """(sum of NLL over scored tokens, number of scored tokens, number of windows) for token-id documents.

    Windows are batched right-padded (padding is after every real token, so causal attention never sees it).
    """
    if not 1 <= stride < max_seq_length:
        raise ValueError(f"stride={stride} is invalid: expected 1 <= stride < max_seq_length ({max_seq_length})")
    jobs = [(doc, w) for doc in documents for w in strided_windows(len(doc), max_seq_length, stride)]
    jobs.sort(key=lambda j: j[1][1] - j[1][0], reverse=True)  # similar lengths together: less padding
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        width = max(end - start for _, (start, end, _) in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)  # -100: not scored
        for row, (doc, (start, end, first)) in enumerate(chunk):
            idx[row, :end - start] = torch.tensor(doc[start:end])
            # the logit at window position j predicts token start + j + 1
            targets[row, first - start - 1:end - start - 1] = torch.tensor(doc[first:end])
        logits = model(idx.to(device)).float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum",
                                                ignore_index=-100)
        total += nll.item()
        count += int((targets != -100).sum())
    return total, count, len(jobs)


def perplexity(
    checkpoint_dir: Path,
    *,
    data: Path,
    text_field: str = "text",
    max_seq_length: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    device: str = "auto",
    precision: Optional[str] = None,
    out: Optional[Path] = None,
) -> dict[str, Any]:
    """Perplexity (exp of the mean token negative log-likelihood) of a checkpoint on a text or JSONL file.

    Args:
        checkpoint_dir: A litft checkpoint, a Hugging Face model folder or a fine-tune run's ``final/``.
        data: A ``.txt`` file (one document) or a ``.jsonl``/``.json`` file (one document per row).
        text_field: Field of each JSONL row holding the document's text.
        max_seq_length: Tokens per window; default the model's context length (``block_size``, less the virtual
            tokens of a prompt-tuned model).
        stride: New tokens scored per window after the first (each sees >= max_seq_length - stride tokens of
            context); default max_seq_length // 2.
        batch_size: Windows per forward pass.
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``bf16-true``, ``16-true`` or ``32-true``; default bf16 on a GPU, fp32 on the CPU.
        out: Write the results to this JSON file.

    Returns:
        perplexity, nll (mean per token), tokens (scored), documents, windows, max_seq_length, stride.
    """
    from litft.evaluate import format_table, load_llm, write_json

    documents = read_documents(Path(data), text_field)
    llm = load_llm(checkpoint_dir, device=device, precision=precision)
    model, tokenizer = llm.model, llm.tokenizer
    context = model.config.block_size - model.num_virtual_tokens  # prompt tuning's virtual tokens come first
    max_seq_length = max_seq_length or context
    if not 2 <= max_seq_length <= context:
        raise ValueError(f"max_seq_length={max_seq_length} is invalid: expected 2..{context} (the model's context)")
    stride = stride or max(1, max_seq_length // 2)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    encoded = [tokenizer.encode(doc) for doc in documents]
    total, count, windows = token_nll(model.eval(), encoded, max_seq_length, stride, batch_size)
    if count == 0:
        raise ValueError(f"{data}: nothing to score (every document is shorter than 2 tokens)")
    nll = total / count
    results = {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "documents": len(documents),
               "windows": windows, "max_seq_length": max_seq_length, "stride": stride,
               "checkpoint_dir": str(checkpoint_dir), "data": str(data)}
    print(format_table([[Path(data).name, count, results["nll"], results["perplexity"]]],
                       ["data", "tokens", "nll", "perplexity"]))
    if out is not None:
        write_json(results, out)
        print(f"results written to {out}")
    return results
