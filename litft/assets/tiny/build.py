"""Rebuild the tiny demo assets that ship with litft (nothing is downloaded).

- ``base/``: a ~0.9M-parameter Llama-architecture model with a character-level tokenizer (HF
  ``tokenizer.json``), pre-trained for a few minutes on CPU on the docstrings of Python's standard
  library (a fifth of them in capitals, and some lines written twice, so that it knows capital
  letters and how to copy), so that it is a "base model": it writes English-looking text but knows
  no task.
- ``data/train.jsonl``, ``data/val.jsonl``: the demo task, "shout": a few lowercase words in,
  the same words in capitals out ({"input": "tiny model", "output": "TINY MODEL"}).

Usage (from the repository root): ``python litft/assets/tiny/build.py [--steps 1500]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def build_tokenizer(directory: Path) -> None:
    """A character-level BPE (no merges) over printable ASCII and newline, in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 256, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")


def model_config():
    from litft.config import Config

    return Config(name="tiny-llama", hf_model_type="llama", vocab_size=len(SPECIALS) + len(CHARS), block_size=256,
                  n_layer=4, n_embd=128, n_head=4, n_query_groups=4, intermediate_size=384, rope_theta=10000.0,
                  norm_eps=1e-5, tie_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def stdlib_docstrings() -> str:
    """Docstrings of the standard library's modules and their members, printable ASCII only."""
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
            "venv", "pydoc_data"}
    texts = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except Exception:
            continue
        for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module))]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and (obj is module or getattr(obj, "__module__", None) == name):
                texts.append(doc)
    text = "\n\n".join(dict.fromkeys(texts))
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


def pretraining_text(seed: int = 0) -> str:
    """The docstrings, a fifth of them (chosen at random) in capitals, and 15% of the lines written twice."""
    rng = random.Random(seed)
    docs = []
    for doc in stdlib_docstrings().split("\n\n"):
        lines = []
        for line in doc.split("\n"):
            lines.append(line)
            if line.strip() and rng.random() < 0.15:
                lines.append(line)
        doc = "\n".join(lines)
        docs.append(doc.upper() if rng.random() < 0.2 else doc)
    return "\n\n".join(docs)


def pretrain(directory: Path, steps: int, seed: int = 0) -> None:
    import torch
    import torch.nn.functional as F

    from litft.model import GPT
    from litft.weights import save_model

    torch.manual_seed(seed)
    text = pretraining_text(seed)
    stoi = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    config = model_config()
    model = GPT(config)
    model.reset_parameters()
    model.init_buffers()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    seq, batch = 128, 32
    print(f"corpus: {len(text):,} characters; model: {sum(p.numel() for p in model.parameters()):,} parameters")
    t0 = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        x = torch.cat([torch.full((batch, 1), config.bos_token_id), x[:, :-1]], dim=1)  # documents start with BOS
        y = torch.cat([x[:, 1:], y[:, -1:]], dim=1)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model = model.to(torch.bfloat16)  # halves the file; fine-tuning loads it in the precision it trains in
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    config.save(directory)


def build_task(directory: Path, n_train: int = 2000, n_val: int = 100, seed: int = 0) -> None:
    """Rows {"input": "a few words", "output": "A FEW WORDS"} from common lowercase words of the corpus."""
    rng = random.Random(seed)
    words = Counter(re.findall(r"\b[a-z]{3,8}\b", stdlib_docstrings()))
    vocab = sorted(w for w, n in words.most_common(1500))
    rng.shuffle(vocab)

    def rows(n: int, used: set[str]) -> list[dict[str, str]]:
        out = []
        while len(out) < n:
            phrase = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3)))
            if phrase in used:
                continue
            used.add(phrase)
            out.append({"input": phrase, "output": phrase.upper()})
        return out

    used: set[str] = set()
    val = rows(n_val, used)
    train = rows(n_train, used)
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", train), ("val.jsonl", val)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in part))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--skip-pretrain", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parents[2]))
    build_tokenizer(HERE / "base")
    build_task(HERE / "data")
    if not args.skip_pretrain:
        pretrain(HERE / "base", args.steps)


if __name__ == "__main__":
    main()
