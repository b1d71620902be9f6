"""``litft plot <run_dir>``: a PNG of a run's loss (train and validation), learning rate and tokens/s, read
from ``run_dir/logs/metrics.jsonl`` (written by ``litft finetune``), for those who would rather look than read
TensorBoard. In a notebook: ``make_figure(read_series(Path(run_dir) / "logs" / "metrics.jsonl"))``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


def read_series(metrics_file: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{"loss": (steps, values), "val_loss": ..., "lr": ..., "tokens_per_s": ...}`` from a metrics.jsonl file
    (series with no finite value are left out). Errors name the file and the line."""
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: no metrics file (expected logs/metrics.jsonl of a "
                                "`litft finetune` run's out_dir)")
    series: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in ("loss", "val_loss", "lr",
                                                                              "tokens_per_s")}
    lines = metrics_file.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves its last line cut short; anything else is not a metrics file
            if n == len(lines):
                continue
            raise ValueError(f"{metrics_file}:{n}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{metrics_file}:{n}: expected a JSON object with an integer 'step'")
        for key, (steps, values) in series.items():
            v = record.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(record["step"])
                values.append(float(v))
    series = {k: v for k, v in series.items() if v[0]}
    if "loss" not in series and "val_loss" not in series:
        raise ValueError(f"{metrics_file}: no 'loss' or 'val_loss' entries (is the run's first log_interval "
                         "reached yet?)")
    return series


def plot(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Plot a fine-tune run's loss (train and validation), learning rate and tokens/s to a PNG.

    Args:
        run_dir: the run's ``out_dir`` (holding ``logs/metrics.jsonl``).
        out: the image to write (``.png``; ``.svg`` and ``.pdf`` also work); default ``<run_dir>/logs/loss.png``.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "logs" / "loss.png"
    image_format = out.suffix.lstrip(".").lower()
    if image_format not in ("png", "svg", "pdf"):
        raise ValueError(f"--out {out}: expected a .png, .svg or .pdf file name")
    series = read_series(run_dir / "logs" / "metrics.jsonl")
    figure = make_figure(series, title=str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        figure.savefig(tmp, dpi=100, format=image_format)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")
    return out


def make_figure(series: dict[str, tuple[list[int], list[float]]], title: str = "") -> Any:
    """A :class:`matplotlib.figure.Figure` with three panels (loss, learning rate, tokens/s) from
    :func:`read_series`. Built without pyplot, so it neither changes a notebook's backend nor stays in its
    figure list: display it in Jupyter by making it the cell's value."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError(f"litft plot needs matplotlib (the plot extra): pip install 'litft[plot]' ({e})") from None

    panels = [("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s")]
    figure = Figure(figsize=(8, 9))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True)
    for ax, (key, label) in zip(axes, panels):
        if key == "loss":
            for name, legend, style in (("loss", "train", "-"), ("val_loss", "validation", "o-")):
                if name in series:
                    ax.plot(*series[name], style, label=legend, markersize=4)
            ax.legend()
        elif key in series:
            ax.plot(*series[key], "-")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if title:
        axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    return figure
