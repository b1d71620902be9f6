"""Prompt tuning (``litft finetune prompt``) against the real PEFT ``PromptTuningConfig`` (task CAUSAL_LM).

Oracle: PEFT's prompt tuning over the transformers model litft's checkpoint was converted from (tiny fp32 models of
tests/hf_models.py; the Llama of conftest.py with the fixture BPE tokenizer). The same seed gives PEFT's RANDOM
init, the same text its TEXT init; logits and the prompt's gradient agree within 1e-5 (Llama; Mistral's sliding
window and Gemma-2's softcapping and scaled embeddings too). A real CLI run (packing, a step checkpoint, resume)
then goes through every consumer: the generation engine (batched prompts of different lengths, streaming) against
``PeftModel.generate``, lm-eval log-likelihoods, ``convert to_peft`` / ``from_peft``, and the refusals of ``to_hf``
and ``merge_lora``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from litft.convert.hf import convert_from_hf
from litft.peft.prompt import PROMPT_TENSOR, PromptTuningArgs, apply_prompt_tuning, init_token_ids, load_prompt
from litft.tokenizer import Tokenizer
from litft.checkpoint import load_checkpoint
from litft.train.metrics import read_metrics
from litft.weights import load_model
from tests.hf_models import make_hf_model
from tests.inprocess_cli import litft, litft_error

peft = pytest.importorskip("peft")

TOL = 1e-5
TEXT = "Shout the answer in capital letters:"
IDX = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))  # ids valid in every tiny vocab
TEMPLATE = "Shout: {{input}}\nAnswer: {{output}}"


def peft_prompt_model(hf_dir: Path, n: int, init: str = "RANDOM", seed: int = 0) -> torch.nn.Module:
    """PEFT's prompt tuning over the transformers model in ``hf_dir`` (RANDOM drawn after ``manual_seed(seed)``)."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    text = dict(prompt_tuning_init_text=TEXT, tokenizer_name_or_path=str(hf_dir)) if init == "TEXT" else {}
    torch.manual_seed(seed)
    return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                   prompt_tuning_init=init, **text))


def litft_prompt_model(native: Path, n: int, init: str = "random", seed: int = 0) -> torch.nn.Module:
    model = load_model(native)
    torch.manual_seed(seed)
    args = PromptTuningArgs(num_virtual_tokens=n, init=init, init_text=TEXT if init == "text" else None)
    return apply_prompt_tuning(model, args, Tokenizer(native) if init == "text" else None)


def peft_embeddings(peft_model: torch.nn.Module) -> torch.Tensor:
    return peft_model.prompt_encoder["default"].embedding.weight


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """variant -> (HF dir, native dir) of a tiny random model."""
    cache = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in cache:
            root = tmp_path_factory.mktemp(variant)
            make_hf_model(variant, root / "hf")
            cache[variant] = (root / "hf", convert_from_hf(root / "hf", root / "native"))
        return cache[variant]

    return get


# ------------------------------------------------------------------------------------------ the model against PEFT


@pytest.mark.parametrize("init,n", [("random", 4), ("text", 3), ("text", 40)])  # text cut / repeated to n tokens
def test_init_equals_peft(init, n, tiny_llama_hf, tiny_llama_native):
    ours = litft_prompt_model(tiny_llama_native, n, init, seed=3).virtual_prompt.embeddings
    theirs = peft_embeddings(peft_prompt_model(tiny_llama_hf, n, init.upper(), seed=3))
    assert torch.equal(ours.detach(), theirs.detach())
    assert [n for n, p in litft_prompt_model(tiny_llama_native, n).named_parameters() if p.requires_grad] == \
        ["virtual_prompt.embeddings"]
    if init == "text":
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(tiny_llama_hf)(TEXT)["input_ids"]  # BOS included, as PEFT uses it
        assert init_token_ids(Tokenizer(tiny_llama_native), PromptTuningArgs(n, "text", TEXT)) == (ids * n)[:n]


# GQA; window 4 < 3 + 9; softcap; chunks; Gemma 4's bigger global heads with values from the keys
@pytest.mark.parametrize("variant", ["llama", "mistral", "gemma2", "llama4", "gemma4-keqv"])
def test_logits_and_gradients_equal_peft(variant, family):
    hf_dir, native = family(variant)
    n = 3
    ours, theirs = litft_prompt_model(native, n, seed=1), peft_prompt_model(hf_dir, n, seed=1)
    out, want = ours(IDX), theirs(input_ids=IDX).logits
    assert want.shape[1] == n + IDX.shape[1]
    assert (out - want[:, n:]).abs().max() <= TOL
    out.pow(2).mean().backward()
    want[:, n:].pow(2).mean().backward()
    grad, want_grad = ours.virtual_prompt.embeddings.grad, peft_embeddings(theirs).grad
    assert grad.abs().max() > 1e-4 and (grad - want_grad).abs().max() <= TOL * want_grad.abs().max()
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


@pytest.mark.parametrize("variant", ["llama", "mistral", "llama4"])
def test_cached_decoding_packing_and_batched_generation_equal_the_full_forward(variant, family):
    from litft.generate.engine import Engine
    from litft.generate.sampling import SamplingParams

    model = litft_prompt_model(family(variant)[1], 3, seed=2).eval()
    with torch.no_grad():
        full = model(IDX)
        cache = model.make_cache(rows=2, length=16)
        pieces = [model(IDX[:, :4], input_pos=torch.arange(4), cache=cache)]  # prefill a chunk, then one at a time
        pieces += [model(IDX[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache) for t in range(4, IDX.shape[1])]
        assert (torch.cat(pieces, dim=1) - full).abs().max() <= TOL
        # packing: each packed sample sees the virtual tokens before it, as if alone
        a, b = IDX[0, :4], IDX[1, :5]
        packed = model(torch.cat([a, b])[None], positions=torch.cat([torch.arange(4), torch.arange(5)])[None],
                       segment_ids=torch.tensor([[1] * 4 + [2] * 5]))
        assert (packed[:, :4] - model(a[None])).abs().max() <= TOL
        assert (packed[:, 4:] - model(b[None])).abs().max() <= TOL

        def greedy(ids: list[int], steps: int) -> list[int]:
            out = []
            for _ in range(steps):
                out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
            return out

    prompts = [IDX[0, :2].tolist(), IDX[1].tolist(), IDX[0, 3:8].tolist()]  # different lengths: left padding
    results = Engine(model).generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[]))
    assert [r.tokens for r in results] == [greedy(p, 6) for p in prompts]
    assert model.virtual_prompt.cached_kv is not None  # inference reuses the virtual tokens' keys and values


# ------------------------------------------------------------------------------------------ a real run


def cli_args(native: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "prompt", native, "--out_dir", out, "--data.train_path", data / "train.jsonl",
            "--data.val_path", data / "val.jsonl", "--data.format", "template", "--data.template", TEMPLATE,
            "--data.packing", "true", "--prompt.num_virtual_tokens", "4", "--prompt.init", "text",
            "--prompt.init_text", TEXT, "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
            "--train.max_steps", "6", "--train.lr", "0.1", "--train.warmup_steps", "0", "--train.save_interval", "3",
            "--eval.final_validation", "false", "--accelerator", "cpu", "--precision", "32-true", *extra]


@pytest.fixture(scope="module")
def run(tiny_llama_native, tmp_path_factory) -> dict[str, Path]:
    """`litft finetune prompt` (text init, packing) on the tiny random Llama: 6 steps over the same 8 samples (a
    prompt on a random model learns little else), step checkpoints at 3 and 6."""
    from litft import __file__ as litft_init

    root = tmp_path_factory.mktemp("prompt_run")
    rows = (Path(litft_init).parent / "assets" / "tiny" / "data" / "train.jsonl").read_text().splitlines()
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("\n".join(rows[:8]) + "\n")  # few rows: the loss falls fast
    (root / "data" / "val.jsonl").write_text("\n".join(rows[48:56]) + "\n")
    litft(*cli_args(tiny_llama_native, root / "data", root / "out"))
    return {"root": root, "data": root / "data", "out": root / "out", "final": root / "out" / "final"}


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_cli_run_learns_saves_and_resumes(run, tiny_llama_native):
    curve = losses(run["out"])
    assert sorted(curve) == [1, 2, 3, 4, 5, 6] and curve[6] < curve[1] - 0.3, curve
    final = run["final"]
    assert {p.name for p in final.iterdir()} >= {"prompt.safetensors", "prompt.yaml", "base.yaml",
                                                 "model_config.yaml", "tokenizer.json"}
    assert not (final / "model.safetensors").exists()
    assert yaml.safe_load((final / "base.yaml").read_text())["method"] == "prompt"
    assert yaml.safe_load((final / "prompt.yaml").read_text()) == {"num_virtual_tokens": 4, "init": "text",
                                                                   "init_text": TEXT}
    run_yaml = yaml.safe_load((run["out"] / "run.yaml").read_text())
    block_size = load_model(tiny_llama_native).config.block_size  # the context less the virtual tokens
    assert run_yaml["prompt"]["num_virtual_tokens"] == 4 and run_yaml["train"]["max_seq_length"] == block_size - 4
    # the trained prompt moved away from the embeddings of the init text
    model = load_checkpoint(final)
    start = litft_prompt_model(tiny_llama_native, 4, "text").virtual_prompt.embeddings
    assert (model.virtual_prompt.embeddings - start).abs().max() > 1e-2
    # --resume auto from step 3 trains steps 4..6 exactly as the uninterrupted run
    again = run["root"] / "again"
    shutil.copytree(run["out"], again, ignore=shutil.ignore_patterns("final", "step-6"))
    litft(*cli_args(tiny_llama_native, run["data"], again, "--resume", "auto"))
    resumed = losses(again)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(curve[step], rel=1e-5)
    import safetensors.torch as st

    assert torch.equal(st.load_file(again / "final" / "prompt.safetensors")[PROMPT_TENSOR],
                       st.load_file(final / "prompt.safetensors")[PROMPT_TENSOR])


def test_final_generates_like_peft_generate(run, tiny_llama_hf, tmp_path):
    """to_peft of final/ → PeftModel.from_pretrained on the HF base: the same logits and greedy tokens as
    LLM.load(final/) (batched, prompts of different lengths: each row as PEFT generates it alone), and streaming
    gives the same text."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from litft import LLM

    adapter = tmp_path / "adapter"
    litft("convert", "to_peft", run["out"], adapter)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_hf), adapter).eval()
    llm = LLM.load(run["final"], device="cpu")
    with torch.no_grad():
        assert (llm.model(IDX) - peft_model(input_ids=IDX).logits[:, 4:]).abs().max() <= TOL
    texts = ["Shout: cat\nAnswer:", "Shout: a much longer line of words\nAnswer:", "Shout:"]
    ids = [llm.tokenizer.encode(t) for t in texts]
    ours = [r.tokens for r in llm.engine.generate(ids, llm_params(8))]
    for prompt, got in zip(ids, ours):
        # use_cache=False: with transformers 5 the KV cache reaches PEFT's prepare_inputs_for_generation as `cache`,
        # not `past_key_values`, so PEFT 0.21 puts the virtual tokens in again at every cached decode step (its
        # tokens then differ from its own forward); without the cache every step is PEFT's forward
        out = peft_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                  dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  use_cache=False)
        assert got == out[0, len(prompt):].tolist()
    streamed = "".join(llm.generate(texts[1], max_new_tokens=8, temperature=0.0, stream=True))
    assert streamed == llm.generate(texts[1], max_new_tokens=8, temperature=0.0)


def llm_params(n: int):
    from litft.generate.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[])


def test_to_peft_from_peft_round_trips(run, tiny_llama_hf, tiny_llama_native, tmp_path):
    import json

    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    litft("convert", "to_peft", run["final"], adapter, "--base_model_name_or_path", tiny_llama_hf)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["prompt_tuning_init"] == "TEXT" and config["tokenizer_name_or_path"] == str(tiny_llama_hf)
    trained = load_file(run["final"] / "prompt.safetensors")[PROMPT_TENSOR]
    assert torch.equal(load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"], trained)
    back = tmp_path / "back"
    litft("convert", "from_peft", adapter, "--base", tiny_llama_native, "--out_dir", back)
    assert torch.equal(load_file(back / "prompt.safetensors")[PROMPT_TENSOR], trained)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(back)(IDX), load_checkpoint(run["final"])(IDX))
    # an adapter PEFT made itself (RANDOM init) gives PEFT's logits in litft
    peft_model = peft_prompt_model(tiny_llama_hf, 5, seed=9).eval()
    peft_model.save_pretrained(tmp_path / "made_by_peft")
    litft("convert", "from_peft", tmp_path / "made_by_peft", "--base", tiny_llama_native, "--out_dir",
          tmp_path / "imported")
    with torch.no_grad():
        want = peft_model(input_ids=IDX).logits[:, 5:]
        assert (load_checkpoint(tmp_path / "imported")(IDX) - want).abs().max() <= TOL


def test_evaluate_loglikelihoods_equal_peft(run, tiny_llama_hf, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from litft.evaluate.harness import LitftLM

    adapter = tmp_path / "adapter"
    litft("convert", "to_peft", run["final"], adapter)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_hf), adapter).eval()
    lm = LitftLM(pretrained=str(run["final"]), batch_size=2, device="cpu")
    pairs = [("Shout: cat\nAnswer:", " CAT"), ("Shout: two words here\nAnswer:", " TWO WORDS"), ("Shout:", " x")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, _) in zip(pairs, got):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
        with torch.no_grad():
            logprobs = peft_model(input_ids=torch.tensor([whole])).logits[0, 4:].log_softmax(-1)
        want = sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        assert ll == pytest.approx(want, abs=1e-4)


def test_to_hf_and_merge_lora_refuse_with_what_to_do(run, tmp_path, capsys):
    for command in (["convert", "to_hf", run["final"], tmp_path / "hf"], ["convert", "merge_lora", run["final"]]):
        err = litft_error(capsys, *command)
        assert "prompt-tuning run" in err and "cannot be merged" in err and "litft convert to_peft" in err, err
        assert "LLM.load" in err
    assert not (tmp_path / "hf").exists() and not (run["final"] / "model.safetensors").exists()


def test_bad_settings_are_refused(run, tiny_llama_native, tmp_path, capsys):
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        PromptTuningArgs(num_virtual_tokens=0)
    with pytest.raises(ValueError, match=r"init='text' needs prompt init_text.*--prompt.init random"):
        PromptTuningArgs(init="text")
    with pytest.raises(ValueError, match="init must be one of text, random"):
        PromptTuningArgs(init="TEXT")  # type: ignore[arg-type]
    err = litft_error(capsys, *cli_args(tiny_llama_native, run["data"], tmp_path / "o",
                                        "--prompt.num_virtual_tokens", "0"))
    assert "num_virtual_tokens must be an integer >= 1" in err
    err = litft_error(capsys, *cli_args(tiny_llama_native, run["data"], tmp_path / "o", "--train.max_seq_length",
                                        "62"))
    assert "max_seq_length=62" in err and "block_size=64" in err and "less the 4 virtual tokens" in err
    assert not (tmp_path / "o").exists()
    model = load_checkpoint(run["final"])
    with pytest.raises(ValueError, match="already has a virtual prompt"):
        apply_prompt_tuning(model, PromptTuningArgs())
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "prompt.yaml").write_text("num_virtual_tokens: 4\ninit: random\nlength: 2\n")
    shutil.copy(run["final"] / "prompt.safetensors", tmp_path / "p")
    with pytest.raises(ValueError, match=r"prompt\.yaml: unknown field\(s\) length"):
        load_prompt(load_model(tiny_llama_native), tmp_path / "p")
    (tmp_path / "p" / "prompt.yaml").write_text("num_virtual_tokens: 5\ninit: random\n")
    with pytest.raises(ValueError, match=r"has shape \[4, 64\], the model expects \[5, 64\]"):
        load_prompt(load_model(tiny_llama_native), tmp_path / "p")
