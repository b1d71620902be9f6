"""``litft evaluate``: litft's lm-eval model class against lm-eval's own ``hf`` backend on the same weights.

Oracle: ``lm_eval.simple_evaluate(model="hf", pretrained=<HF folder>)`` on a tiny random Llama with a real
tokenizer (BOS added by its post-processor), and ``LitftLM`` on the litft checkpoint converted from it.
Local tasks (YAML + JSONL written here, run offline): multiple choice (acc, acc_norm, one few-shot example,
a context longer than the model's 64 tokens so left truncation is exercised), generation (generate_until,
exact_match) and a rolling-loglikelihood perplexity task (documents longer than 64 tokens). Direct calls on
Instances add an empty context, a BOS-prefixed context and trailing-space contexts.

Tolerances: accuracy-type metrics equal within 1e-4; every per-request loglikelihood within
1e-4 + 1e-5·|ll| (float32 sums over up to ~100 tokens); is-greedy flags and generated texts identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.test_perplexity import CORPUS, make_tiny_llama  # noqa: E402


def write_tasks(directory: Path) -> Path:
    """Three local lm-eval tasks (YAML + JSONL) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    long_question = " ".join(CORPUS[2:5])  # > 64 tokens with the few-shot example: left-truncated
    mc = [("What is the capital of France?", ["Paris", "Berlin", "a dog"], 0),
          ("What is two plus two?", ["four", "five and six", "0"], 0),
          ("Which animal is quick?", ["the fox", "the lazy dog", "a time"], 0),
          ("Once upon a", [" time", "model", "letter"], 1),
          (long_question, ["A", "B", "C D"], 2)]
    rows = [{"question": q, "choices": c, "label": label} for q, c, label in mc]
    gen = [("What is two plus two?", "four"), ("The capital of France?", "Paris"), ("Count: 1 2 3", "4"),
           ("Say a letter", "A"), ("Once upon a", "time")]
    ppl = [" ".join(CORPUS), "Paris is the capital.", " ".join(reversed(CORPUS)) * 2]
    files = {"mc.jsonl": rows, "gen.jsonl": [{"question": q, "answer": a} for q, a in gen],
             "ppl.jsonl": [{"text": t} for t in ppl]}
    for name, data in files.items():
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    data = ("dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {file}\n"
            "test_split: test\n")
    cache = directory / "hf_datasets_cache"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data.format(cache=cache, file=directory / "mc.jsonl") +
        "output_type: multiple_choice\nnum_fewshot: 1\nfewshot_split: test\nfewshot_config:\n  sampler: first_n\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data.format(cache=cache, file=directory / "gen.jsonl") +
        'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + data.format(cache=cache, file=directory / "ppl.jsonl") +
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    make_tiny_llama(root / "hf", root / "native")
    return {"hf": root / "hf", "native": root / "native", "tasks": write_tasks(root / "tasks")}


TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 + 1e-5 * abs(b)


def assert_same_results(expected: dict, got: dict, tasks: list[str]) -> list[str]:
    """lm-eval results (``log_samples=True``) of the hf backend and of litft agree: metrics, every prompt and
    every response. Returns the texts generated for tiny_gen (some must be non-empty: no vacuous comparison)."""
    texts: list[str] = []
    for task in tasks:
        for key, value in expected["results"][task].items():
            if isinstance(value, float):
                assert got["results"][task][key] == pytest.approx(value, abs=1e-4, rel=1e-5), (task, key)
        want, have = expected["samples"][task], got["samples"][task]
        assert len(want) == len(have) > 0
        for a, b in zip(want, have):
            assert a["arguments"] == b["arguments"]  # same prompts (few-shot, templates)
            for ra, rb in zip(a["resps"], b["resps"]):
                ra, rb = ra[0], rb[0]
                if task == "tiny_mc":  # (loglikelihood, is_greedy)
                    assert close(rb[0], ra[0]) and rb[1] == ra[1], (ra, rb)
                elif task == "tiny_ppl":  # rolling loglikelihood
                    assert close(rb, ra), (ra, rb)
                else:  # generated text
                    assert rb == ra
        if task == "tiny_gen":
            texts = [r[0] for sample in have for r in sample["resps"]]
            assert any(t.strip() for t in texts), texts  # not only a comparison of empty strings
    if "tiny_mc" in tasks:
        assert expected["results"]["tiny_mc"]["acc,none"] == got["results"]["tiny_mc"]["acc,none"]
    return texts


def test_litft_model_matches_hf_backend(tiny: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from litft.evaluate.harness import LitftLM

    manager = TaskManager(include_path=str(tiny["tasks"]), include_defaults=False)
    common = dict(tasks=TASKS, task_manager=manager, bootstrap_iters=0, log_samples=True)
    expected = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny['hf']},dtype=float32",
                                       device="cpu", batch_size=2, **common)
    # a different batch size: results must not depend on batching/padding
    model = LitftLM(pretrained=str(tiny["native"]), batch_size=3, device="cpu")
    got = lm_eval.simple_evaluate(model=model, **common)

    texts = assert_same_results(expected, got, TASKS)
    assert len(texts) == 5 and all(t.strip() for t in texts), texts  # every generation compared is real text
    # the tasks really exercised what they should: a left-truncated context, more than one rolling window
    assert any("truncating" in r.message for r in caplog.records if r.name == "litft.evaluate")
    assert len(model.tok_encode(" ".join(CORPUS))) > 64


@pytest.fixture(scope="module")
def lora_run(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-step ``litft finetune lora`` run on the tiny Llama (its final/: LoRA weights + base.yaml) and the run
    merged and exported by ``litft convert to_hf``."""
    import torch

    from litft.cli import main
    from litft.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("lora_run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in
                            [("What is two plus two?", "four"), ("The capital of France?", "Paris"),
                             ("Count: 1 2 3", "4"), ("Once upon a", "time")]))
    main(["finetune", "lora", str(tiny["native"]), "--out_dir", str(root / "run"), "--data.train_path", str(data),
          "--data.prompt_style", "plain", "--train.max_steps", "3", "--train.global_batch_size", "4",
          "--train.micro_batch_size", "4", "--train.lr", "0.02", "--train.lr_schedule", "constant",
          "--eval.final_validation", "false", "--lora.r", "4", "--lora.targets", "[q,k,v,o,gate,up,down]"])
    final = root / "run" / "final"
    assert (final / "lora.safetensors").is_file() and not (final / "model.safetensors").exists()
    main(["convert", "to_hf", str(final), str(root / "hf")])
    x = torch.tensor([[0, 5, 9, 30]])
    with torch.no_grad():
        assert (load_checkpoint(final)(x) - load_checkpoint(tiny["native"])(x)).abs().max() > 1e-2  # it trained
    return {"final": final, "hf": root / "hf"}


def test_lora_run_from_the_cli_matches_hf_backend_on_its_export(tiny: dict[str, Path], lora_run: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """``litft evaluate <run>/final --num_fewshot 2 --seed 7`` (the LoRA run as it is, no merge step) gives lm-eval's
    ``hf`` backend results on the run's to_hf export with the same few-shot count and seed; another seed draws
    other few-shot examples."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from litft.cli import main

    tasks = ["tiny_mc", "tiny_gen"]  # tiny_gen samples its few-shot examples at random (tiny_mc takes the first n)

    def cli(seed: int) -> dict:
        out = tmp_path / f"seed{seed}.json"
        main(["evaluate", str(lora_run["final"]), "--tasks", ",".join(tasks), "--include_path", str(tiny["tasks"]),
              "--include_defaults", "false", "--num_fewshot", "2", "--seed", str(seed), "--batch_size", "3",
              "--bootstrap_iters", "0", "--log_samples", "true", "--device", "cpu", "--out", str(out)])
        return json.loads(out.read_text())

    got = cli(7)
    expected = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={lora_run['hf']},dtype=float32", device="cpu", batch_size=2,
        tasks=tasks, task_manager=TaskManager(include_path=str(tiny["tasks"]), include_defaults=False),
        num_fewshot=2, bootstrap_iters=0, log_samples=True, random_seed=7, numpy_random_seed=7, torch_random_seed=7,
        fewshot_random_seed=7)
    expected = json.loads(json.dumps(expected, default=handle_non_serializable))  # as the results file holds it
    assert got["n-shot"] == expected["n-shot"] == {"tiny_mc": 2, "tiny_gen": 2}
    assert_same_results(expected, got, tasks)
    prompts = [sample["arguments"] for sample in got["samples"]["tiny_gen"]]
    assert all(p[0][0].count("Q:") == 3 for p in prompts)  # two few-shot examples before each question
    assert [sample["arguments"] for sample in cli(8)["samples"]["tiny_gen"]] != prompts


@pytest.mark.parametrize("tokenizer", ["bpe", "sentencepiece"])
def test_loglikelihood_requests_directly(tiny: dict[str, Path], tmp_path: Path, tokenizer: str) -> None:
    """Both backends on hand-made Instances: empty context (prefix token), trailing-space contexts, a
    context starting with the BOS text, multi-token continuations, an input longer than the context."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from litft.evaluate.harness import LitftLM

    if tokenizer == "bpe":
        hf_dir, native_dir = tiny["hf"], tiny["native"]
    else:
        hf_dir, native_dir = tmp_path / "hf", tmp_path / "native"
        make_tiny_llama(hf_dir, native_dir, tokenizer)
    hf = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4)
    lt = LitftLM(pretrained=str(native_dir), batch_size=2, device="cpu")
    bos_text = hf.tokenizer.bos_token
    pairs = [("", "The quick brown fox"), ("Paris is the ", "capital"), (bos_text + "Question:", " What is two"),
             ("A B C", " D"), (" ".join(CORPUS), " Once upon a time"), ("12", "345 and 6,789.")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    texts = [CORPUS[0], " ".join(CORPUS) * 2]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    for (want_ll, want_greedy), (ll, greedy) in zip(hf.loglikelihood(requests), lt.loglikelihood(requests)):
        assert close(ll, want_ll) and greedy == want_greedy
    for want, got in zip(hf.loglikelihood_rolling(rolling), lt.loglikelihood_rolling(rolling)):
        assert close(got, want)
    from lm_eval.api.registry import get_model

    assert get_model("litft") is LitftLM  # `simple_evaluate(model="litft", model_args="pretrained=...")` works
    for text in ("Paris", bos_text + "Paris", " leading space"):
        assert lt.tok_encode(text) == hf.tok_encode(text)  # BOS added once, never twice
    assert len(lt.tok_encode(texts[1])) > 2 * 64  # several rolling windows


def test_list_and_unknown_tasks(tiny: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from litft.cli import main
    from litft.evaluate.harness import evaluate

    with pytest.raises(SystemExit) as exit_info:  # the sub-table: its subcommands, then its default leaf's --help
        main(["evaluate", "--help"])
    usage = capsys.readouterr().out
    assert exit_info.value.code == 0 and "(default)" in usage and "perplexity" in usage and "accuracy" in usage
    assert "--include_path" in usage
    include = ["--include_path", str(tiny["tasks"]), "--include_defaults", "false"]
    main(["evaluate", "--tasks", *include])  # a bare --tasks lists the tasks, no checkpoint needed
    listed = capsys.readouterr().out.splitlines()
    assert {"tiny_mc", "tiny_gen", "tiny_ppl"} <= set(listed)
    with pytest.raises(ValueError, match=r"unknown task 'tiny_mcq'\. Close names: tiny_mc"):
        evaluate(tiny["native"], tasks="tiny_gen,tiny_mcq", include_path=str(tiny["tasks"]), include_defaults=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tiny["native"]), "--tasks", "tiny_pp", *include])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "unknown task 'tiny_pp'" in err and "tiny_ppl" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="--include_path .*nowhere"):
        evaluate(tiny["native"], tasks="tiny_mc", include_path=str(tiny["tasks"] / "nowhere"))


def test_evaluate_command_writes_results(tiny: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "litft", "evaluate", str(tiny["native"]), "--tasks", "tiny_mc,tiny_gen",
                          "--include_path", str(tiny["tasks"]), "--include_defaults", "false", "--limit", "3",
                          "--batch_size", "4", "--bootstrap_iters", "0", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"tiny_mc", "tiny_gen"}
    assert results["results"]["tiny_mc"]["sample_len"] == 3
    assert "acc_norm" in run.stdout and "exact_match" in run.stdout  # the table


def test_a_chat_run_is_evaluated_with_its_chat_template_by_default(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The run's rendering is evaluate's default: lm-eval prompts go through the chat template for a run trained on
    chat messages (its final/prompt_format.yaml says so), as they are for other checkpoints."""
    import shutil

    from litft.data.formats import PromptFormat
    from litft.evaluate.harness import evaluate
    from litft.tokenizer import Tokenizer

    chat_run = shutil.copytree(tiny["native"], tmp_path / "final")
    PromptFormat(format="chat").save(chat_run)  # what a run on chat rows writes into its final/
    contexts = {}
    for name, checkpoint in (("plain", tiny["native"]), ("chat", chat_run)):
        results = evaluate(checkpoint, tasks="tiny_gen", include_path=str(tiny["tasks"]), include_defaults=False,
                           limit=1, bootstrap_iters=0, log_samples=True, device="cpu")
        contexts[name] = results["samples"]["tiny_gen"][0]["arguments"][0][0]
    assert contexts["plain"] == "Q: What is two plus two?\nA:"
    assert contexts["chat"] == Tokenizer(chat_run).apply_chat_template(
        [{"role": "user", "content": contexts["plain"]}], add_generation_prompt=True)
