"""Every tutorial in tutorials/ (except those with their own test) run for real on a tiny model through
tests/tutorials.py: its ```bash commands (a server in the background), its ```python blocks in one Python session
(the Python API tutorial's and the openai client's against the started server included), and the files it asks
the reader to save (```yaml title=...). Only model and data paths (and the server's port) are substituted. Also:
every relative link of the tutorials and the README points to a file that exists."""

from __future__ import annotations

import ast
import json
import re
import socket
from pathlib import Path

import pytest

from tests.tutorials import REPO, Ran, bash_commands, blocks, run_tutorial

TUTORIALS = REPO / "tutorials"
OWN_TEST = {"export-to-vllm.md": "tests/test_tutorial_export.py", "multi-node.md": "tests/test_multinode_tutorial.py",
            "real-model.md": "tests/test_real_models.py"}
MODEL = "checkpoints/meta-llama/Llama-3.2-1B"
HF_MODEL = "models/Llama-3.2-1B-hf"  # python-api.md: a folder in Hugging Face layout
ABS_MODEL = "/home/me/checkpoints/meta-llama/Llama-3.2-1B"  # what a reader writes in an asset card


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"hf", "native"}: a tiny random fp32 Llama (context 2048) with the fixture BPE tokenizer (chat template
    included), as a Hugging Face folder and as a litft checkpoint."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("tutorial_model")
    make_hf_model("llama", root / "hf", overrides={"vocab_size": 400, "max_position_embeddings": 2048})
    make_bpe_tokenizer(root / "hf")
    return {"hf": root / "hf", "native": convert_from_hf(root / "hf", root / "native")}


def _run(name: str, tmp_path: Path, tiny_model: dict[str, Path],
         substitutions: dict[str, str] | None = None) -> list[Ran]:
    """Run tutorials/<name> in ``tmp_path``, with its own HOME (asset cards, caches) and no outer asset folder."""
    path = TUTORIALS / name
    home = tmp_path / "home"
    home.mkdir()
    subs = {MODEL: str(tiny_model["native"]), **(substitutions or {})}
    if ABS_MODEL in path.read_text():
        subs[ABS_MODEL] = str(tiny_model["native"])
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(home),
           "HF_HOME": str(home / ".cache" / "huggingface"), "LITFT_ASSET_DIR": ""}
    return run_tutorial(path, cwd=tmp_path, substitutions=subs, env=env, timeout=240)


def _output(ran: list[Ran], command_part: str) -> str:
    [step] = [r for r in ran if command_part in r.command]
    return step.stdout + step.stderr


def _python_outputs(ran: list[Ran]) -> list[str]:
    return [r.stdout for r in ran if r.kind == "python"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TESTED = {"end-to-end.md", "first-finetune.md", "python-api.md", "evaluation.md", "serving.md", "qlora.md"}


def test_every_tutorial_is_tested_and_listed():
    present = {p.name for p in TUTORIALS.glob("*.md")} - {"README.md"}
    assert present - set(OWN_TEST) == TESTED, "a new tutorial needs a test here"
    assert all((REPO / test).is_file() for test in OWN_TEST.values())
    index = (TUTORIALS / "README.md").read_text()
    for name in present:
        assert f"]({name})" in index, f"tutorials/README.md does not link {name}"


def test_relative_links_point_to_files():
    """Every relative link (``[text](path)`` / ``[text](path#anchor)``) of README.md and tutorials/*.md exists."""
    broken = []
    for md in [REPO / "README.md", *sorted(TUTORIALS.glob("*.md"))]:
        text = md.read_text()
        in_code = {i for b in blocks(text) for i in range(b.line - 1, b.line + len(b.text.splitlines()))}
        for n, line in enumerate(text.splitlines(), 1):
            if n in in_code:
                continue
            for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # a URL or an anchor of the same page
                if not (md.parent / target.split("#", 1)[0]).exists():
                    broken.append(f"{md.relative_to(REPO)}:{n}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _gsm8k(cwd: Path) -> None:
    rows = [(f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             f"Tom has {a}+{b} = {a + b} apples.\n#### {a + b}") for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)]]
    (cwd / "data" / "gsm8k").mkdir(parents=True)
    for split, part in (("train", rows), ("test", rows[:3])):
        (cwd / "data" / "gsm8k" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in part))


def test_end_to_end(tiny_model, tmp_path):
    text = (TUTORIALS / "end-to-end.md").read_text()
    commands = " ".join(c.text for c in bash_commands(text))
    for needed in ("assets ls", "configs cp", "finetune lora", "llama3_2_1b@user", "generate", "evaluate accuracy",
                   "convert to_hf", "plot"):
        assert needed in commands, needed
    assert "litft download" in text and "litft download" not in commands
    _gsm8k(tmp_path)
    ran = _run("end-to-end.md", tmp_path, tiny_model)
    assert "llama3_2_1b@user" in _output(ran, "assets ls") and str(tiny_model["native"]) in _output(ran, "assets ls")
    out = tmp_path / "out"
    assert (out / "gsm8k-lora" / "final" / "lora.safetensors").is_file()
    assert (out / "gsm8k-lora" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    generations = [json.loads(l) for l in (out / "gsm8k-lora" / "test-generations.jsonl").read_text().splitlines()]
    assert [g["id"] for g in generations] == [0, 1, 2] and all(isinstance(g["generation"], str) for g in generations)
    accuracy = json.loads((out / "gsm8k-lora" / "accuracy.json").read_text())
    assert isinstance(accuracy["accuracy"], float) and 0.0 <= accuracy["accuracy"] <= 1.0
    assert accuracy["total"] == 3 and len(accuracy["examples"]) == 3 and accuracy["extract"] == "gsm8k"
    assert [e["reference"] for e in accuracy["examples"]] == ["3", "7", "6"]
    assert len((out / "base-test-generations.jsonl").read_text().splitlines()) == 3  # the base, by card name
    # the run started from the card's checkpoint, and records the folder itself
    base = (out / "gsm8k-lora" / "final" / "base.yaml").read_text()
    assert str(tiny_model["native"].resolve()) in base
    # the transformers block ran on the export and printed a decoded text
    assert [o for o in _python_outputs(ran) if o.strip()]


def test_first_finetune(tiny_model, tmp_path):
    commands = " ".join(c.text for c in bash_commands((TUTORIALS / "first-finetune.md").read_text()))
    assert "configs cp" in commands and "finetune full" in commands
    words = ["good morning", "thank you", "good night", "the cat", "a red ball", "the river", "my friend", "apples"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Shout: {w}", "output": w.upper()}) + "\n" for w in words))
    _run("first-finetune.md", tmp_path, tiny_model)
    final = tmp_path / "out" / "my-first-full" / "final"
    assert any(final.glob("*.safetensors"))
    assert (tmp_path / "out" / "my-first-full" / "logs" / "loss.png").is_file()


def test_python_api(tiny_model, tmp_path):
    text = (TUTORIALS / "python-api.md").read_text()
    code = "\n".join(b.text for b in blocks(text) if b.language == "python")
    for needed in ("from litft import LLM", "LLM.load(", ".generate(", "stream=True", "logprobs=", ".chat(",
                   ".benchmark(", ".save(", HF_MODEL, "out/shout-lora/final"):
        assert needed in code, needed
    ran = _run("python-api.md", tmp_path, tiny_model, {HF_MODEL: str(tiny_model["hf"])})
    outputs = _python_outputs(ran)
    assert len(outputs) == sum(1 for b in blocks(text) if b.language == "python")  # every block ran
    assert "LLM(" in outputs[0]
    assert outputs[2].count("->") == 3  # a batch of three prompts, three answers
    assert outputs[4].strip() and all("[(" in line for line in outputs[4].strip().splitlines())  # logprobs
    assert "tokens/s" in outputs[6] and "peak memory" in outputs[6]
    assert outputs[8].strip() == "True"  # the Hugging Face folder generates what the native checkpoint does
    assert {"model.safetensors", "model_config.yaml", "tokenizer.json"} <= {p.name for p in (tmp_path / "out" /
                                                                                              "my-model").iterdir()}
    assert (tmp_path / "out" / "shout-lora" / "final" / "lora.safetensors").is_file()


def test_evaluation(tiny_model, tmp_path):
    text = (TUTORIALS / "evaluation.md").read_text()
    commands = " ".join(c.text for c in bash_commands(text))
    for needed in ("evaluate perplexity", "evaluate accuracy", "--tasks capitals", "--include_path tasks"):
        assert needed in commands, needed
    assert "--tasks hellaswag" in text and "hellaswag" not in commands  # the Hub's data: shown, not run
    ran = _run("evaluation.md", tmp_path, tiny_model)
    out = tmp_path / "out" / "eval"
    perplexity = json.loads((out / "perplexity.json").read_text())
    assert perplexity["perplexity"] > 1 and perplexity["tokens"] > 50
    accuracy = json.loads((out / "capitals-accuracy.json").read_text())
    assert accuracy["total"] == 4 and accuracy["extract"] == "exact" and 0.0 <= accuracy["accuracy"] <= 1.0
    assert [e["reference"] for e in accuracy["examples"]] == ["Paris", "Rome", "Madrid", "Berlin"]
    results = json.loads((out / "capitals-lm-eval.json").read_text())["results"]["capitals"]
    assert 0.0 <= results["acc,none"] <= 1.0 and 0.0 <= results["acc_norm,none"] <= 1.0
    assert "acc_norm" in _output(ran, "--tasks capitals")  # lm-eval's table


def test_serving(tiny_model, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    text = (TUTORIALS / "serving.md").read_text()
    [serve] = [c for c in bash_commands(text) if "litft serve" in c.text]
    assert serve.ready is not None  # started in the background, as the reader starts it in its own terminal
    port = _free_port()
    ran = _run("serving.md", tmp_path, tiny_model,
               {"--port 8000": f"--port {port}", "127.0.0.1:8000": f"127.0.0.1:{port}"})
    outputs = _python_outputs(ran)
    assert len(outputs) == 5
    assert outputs[0].splitlines()[0] == "['llama-3.2-1b']"
    assert 1 <= int(re.search(r"completion_tokens=(\d+)", outputs[0])[1]) <= 20  # max_tokens=20
    assert outputs[3].count("->") == 8
    metrics = ast.literal_eval(outputs[3].strip().splitlines()[-1])  # the server's /metrics
    assert metrics["requests_completed"] == 11 and metrics["requests_failed"] == 0  # 1 + 2 chat + 8 at once
    assert outputs[4].strip() and all("[(" in line for line in outputs[4].strip().splitlines())  # logprobs
    [server] = [r for r in ran if r.kind == "background"]  # stopped with Ctrl-C (exit status 0) by the harness
    assert server.stdout.count('"POST /v1/completions HTTP/1.1" 200') == 9


def test_qlora(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    commands = " ".join(c.text for c in bash_commands((TUTORIALS / "qlora.md").read_text()))
    assert "--quantize bnb.nf4" in commands and "convert to_hf" in commands
    ran = _run("qlora.md", tmp_path, tiny_model)
    final = tmp_path / "out" / "qlora" / "final"
    assert "quantize: bnb.nf4" in (final / "base.yaml").read_text()
    assert not (final / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "qlora-hf" / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]
    assert "Translate to French: good night" in _python_outputs(ran)[0]  # transformers decoded prompt + answer


def test_readme_quick_start(tmp_path, monkeypatch):
    """The README's quick start after its set-up commands (which CI runs as .ci/run and test_finetune's
    test_readme_main_job_learns checks): generate and plot on the main job's out_dir, here a 5-step run of the
    same recipe."""
    from litft.cli import main

    readme = (REPO / "README.md").read_text()
    commands = bash_commands(readme)
    setup = [i for i, c in enumerate(commands) if c.text.startswith("python3 -m venv")]
    assert len(setup) == 2 and "litft finetune lora --config config_hub/finetune/tiny/lora.yaml" in \
        commands[setup[0]].text and commands[setup[1]].text.endswith("python -m pytest -q")
    quick = [i for i in range(len(commands)) if i not in setup]
    assert [commands[i].text.split()[:2] for i in quick] == [["litft", "generate"], ["litft", "plot"]]
    out = tmp_path / "out" / "finetune" / "tiny" / "lora"  # where the recipe writes, relative to the clone
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository root
    main(["finetune", "lora", "--config", "config_hub/finetune/tiny/lora.yaml", "--out_dir", str(out),
          "--train.max_steps", "5", "--train.save_interval", "null", "--eval.interval", "null",
          "--eval.generate_samples", "0", "--eval.final_validation", "false"])
    ran = run_tutorial(REPO / "README.md", cwd=tmp_path, only=quick, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert ran[0].stdout.strip()  # the answer (5 steps: not yet a good one)
    assert (out / "logs" / "loss.png").read_bytes()[:4] == b"\x89PNG"
