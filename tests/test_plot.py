"""litft plot: a readable PNG from a run's logs/metrics.jsonl; missing or empty metrics → an error naming the file."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from litft.plot import plot, read_series  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _write_metrics(run: Path, lines: list) -> Path:
    (run / "logs").mkdir(parents=True, exist_ok=True)
    path = run / "logs" / "metrics.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def _records() -> list:
    # the fields litft/train/loop.py logs: train entries, validation entries, the final summary
    train = [{"step": s, "loss": 4.0 / s, "lr": 1e-3 * min(s, 10) / 10, "tokens_per_s": 1000.0 + s,
              "tokens": 64 * s, "epoch": s / 50, "peak_memory_rss_gb": 0.5, "grad_norm": 1.0} for s in range(1, 41)]
    val = [{"step": s, "val_loss": 3.0 / s, "val_ppl": 2.0} for s in (10, 20, 30, 40)]
    return train + val + [{"step": 40, "final_step": 40, "stop_reason": "max_steps", "final_val_loss": 0.1}]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, _records() + ['{"step": 41, "loss": 0.'])  # a killed run's last line, cut short
    series = read_series(run / "logs" / "metrics.jsonl")
    assert set(series) == {"loss", "val_loss", "lr", "tokens_per_s"}
    assert series["val_loss"][0] == [10, 20, 30, 40] and len(series["loss"][0]) == 40
    out = plot(run)
    assert out == run / "logs" / "loss.png"
    width, height = _png_size(out)
    assert 400 <= width <= 2000 and 400 <= height <= 2000
    assert out.stat().st_size > 10_000  # three panels with curves, not a blank image
    assert not list((run / "logs").glob("*.tmp*")) and not list((run / "logs").glob(".*"))


def test_plot_cli(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, _records())
    result = subprocess.run([sys.executable, "-m", "litft", "plot", str(run), "--out", str(tmp_path / "x.png")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _png_size(tmp_path / "x.png")


@pytest.mark.parametrize("content", [None, [], [{"step": 3, "final_step": 3}]], ids=["missing", "empty", "no-loss"])
def test_plot_bad_metrics(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        _write_metrics(run, content)
    with pytest.raises((FileNotFoundError, ValueError), match="metrics.jsonl"):
        plot(run)
    assert not (run / "logs" / "loss.png").exists()


def test_plot_bad_line_names_it(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, ["not json", {"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match=r"metrics.jsonl:1"):
        plot(run)


def test_missing_matplotlib_is_one_clear_line(tmp_path):
    """Without matplotlib (an import of it fails), `litft plot` says which extra to install, without a traceback."""
    run = tmp_path / "run"
    _write_metrics(run, _records())
    code = ("import sys; sys.modules['matplotlib'] = None  # what Python does for a package that is not installed\n"
            f"from litft.cli import main; main(['plot', {str(run)!r}])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install 'litft[plot]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (run / "logs" / "loss.png").exists()


def test_plot_leaves_pyplot_alone(tmp_path):
    """No pyplot and no backend switch: a notebook's backend and figure list stay as they were."""
    import matplotlib

    from litft.plot import make_figure

    run = tmp_path / "run"
    _write_metrics(run, _records())
    backend = matplotlib.get_backend()
    plot(run, out=tmp_path / "curves.svg")
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    figure = make_figure(read_series(run / "logs" / "metrics.jsonl"), title="run")
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "learning rate", "tokens/s"]
    assert [len(line.get_xdata()) for line in figure.axes[0].lines] == [40, 4]  # train and validation curves
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()
    with pytest.raises(ValueError, match=r"--out .*x\.jpeg: expected a \.png"):
        plot(run, out=tmp_path / "x.jpeg")
