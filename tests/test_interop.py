"""Fine-tuned models out to transformers / vLLM / PEFT and PEFT adapters in (issue 5), against the real tools.

Every run here is a real ``litft finetune lora`` (the CLI, in-process) on the tiny fp32 Llama of conftest.py;
its ``final/`` is exported and loaded by transformers and peft, which must compute what litft computes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from litft.checkpoint import load_checkpoint
from tests.inprocess_cli import litft, litft_error

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 LoRA / DoRA: merged export vs litft's unmerged LoRA layers
# QLoRA: the export holds dequant(nf4(W)) + s·BA in fp32, and bitsandbytes' nf4 matmul dequantizes the same blocks
# before its fp32 matmul, so only the summation order differs (measured ~3e-6 on CPU). On a GPU with bf16 compute
# the quantized forward itself rounds to bf16: expect ~1e-2 there.
QLORA_TOL = 1e-3
REPO = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in
        ("cat", "dog", "the fence", "a red ball", "apples", "the river", "my friend", "the code")]


def no_leftovers(path: Path) -> None:
    """``path`` was not created and no temp dir is left beside it."""
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


@pytest.fixture(scope="module")
def runs(tiny_llama_native: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """method -> out_dir of a 3-step ``litft finetune lora`` run (LoRA, DoRA, QLoRA nf4) on the tiny Llama."""
    root = tmp_path_factory.mktemp("interop_runs")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["--data.train_path", data, "--data.prompt_style", "plain", "--train.max_steps", 3,
              "--train.global_batch_size", 4, "--train.micro_batch_size", 4, "--train.lr", 0.02,
              "--train.lr_schedule", "constant", "--eval.final_validation", "false", "--lora.r", 4,
              "--lora.alpha", 8, "--lora.dropout", 0.0]
    extra = {"lora": ["--lora.targets", "[q,k,v,o,gate,up,down]"],
             "dora": ["--lora.targets", "[q,v,down]", "--lora.use_dora", "true", "--lora.use_rslora", "true"],
             "qlora": ["--lora.targets", "[q,v]", "--quantize", "bnb.nf4"]}
    out = {}
    for method, args in extra.items():
        out[method] = root / method
        litft("finetune", "lora", tiny_llama_native, "--out_dir", out[method], *common, *args)
        assert (out[method] / "final" / "lora.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))


def trained_model(final: Path, quantize: str | None = None) -> torch.nn.Module:
    """The run's model as trained, built by hand: its base checkpoint with the (unmerged) LoRA layers; for QLoRA
    the base quantized first, exactly as ``finetune lora --quantize`` prepares it (``quantize=None`` on a QLoRA
    run: the unquantized base plus the LoRA, i.e. *not* the trained model)."""
    from litft.peft import load_lora, quantize_model
    from litft.weights import load_model

    model = load_model(yaml.safe_load((final / "base.yaml").read_text())["base_checkpoint"])
    if quantize is not None:
        quantize_model(model, quantize)
    load_lora(model, final)
    return model.eval()


def litft_logits(final: Path, tokens: torch.Tensor, quantize: str | None = None) -> torch.Tensor:
    """Logits of :func:`trained_model`."""
    with torch.no_grad():
        return trained_model(final, quantize)(tokens)


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits


# ---------------------------------------------------------------------------------------------- to_hf


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_to_hf_of_a_run_loads_in_transformers_with_the_same_logits(method, runs, tokens, tiny_llama_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    final = runs[method] / "final"
    quantize = "bnb.nf4" if method == "qlora" else None
    expected = litft_logits(final, tokens, quantize)
    base = hf_logits(AutoModelForCausalLM.from_pretrained(tiny_llama_hf), tokens)
    assert (expected - base).abs().max() > 1e-2, "the run should have changed the model"

    litft("convert", "to_hf", runs[method], tmp_path / "hf")  # the run dir: its final/ is used
    got = hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), tokens)
    tol = QLORA_TOL if quantize else TOL
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    if quantize:  # the export is the model that was trained: merged into the *dequantized* base, not the original
        unquantized = litft_logits(final, tokens)
        assert (got - unquantized).abs().max() > 10 * tol


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate``, one prompt at a time, never stopping early."""
    model.generation_config.eos_token_id = None
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


PROMPTS = ["Repeat the cat", "Repeat a red ball, and then the fence", "dog"]
GREEDY_TOKENS = 12


def test_llm_load_of_a_qlora_run_is_the_trained_model(runs, tokens, tmp_path):
    """LLM.load (thus generate, chat, serve, evaluate) of a QLoRA run's final/ gives the model that was trained:
    LoRA merged into the quantized-then-dequantized base, equal to the to_hf export in transformers; with
    ``quantize="bnb.nf4"`` (the run's own mode), exactly the trained layers, unmerged over the nf4 base."""
    from transformers import AutoModelForCausalLM

    from litft import LLM
    from litft.generate import SamplingParams
    from litft.peft.lora import LoRALinear
    from litft.peft.quantize import is_quantized

    final = runs["qlora"] / "final"
    assert yaml.safe_load((final / "base.yaml").read_text())["quantize"] == "bnb.nf4"  # the checkpoint says so
    trained = litft_logits(final, tokens, "bnb.nf4")
    llm = LLM.load(final, device="cpu")
    assert not any(is_quantized(m) or isinstance(m, LoRALinear) for m in llm.model.modules())  # plain, merged
    with torch.no_grad():
        got = llm.model(tokens)
    litft("convert", "to_hf", final, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(got, hf_logits(hf, tokens), atol=QLORA_TOL, rtol=0)
    torch.testing.assert_close(got, trained, atol=QLORA_TOL, rtol=0)
    assert (got - litft_logits(final, tokens)).abs().max() > 10 * QLORA_TOL  # not the unquantized base + LoRA

    prompts = [llm.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, stop_token_ids=[])
    assert [r.tokens for r in llm.engine.generate(prompts, params)] == hf_greedy(hf, prompts, GREEDY_TOKENS)

    quantized = LLM.load(final, device="cpu", quantize="bnb.nf4")
    assert is_quantized(quantized.model.blocks[0].attn.q_proj.base_layer)
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(tokens), trained, atol=1e-5, rtol=0)


def test_llm_load_of_a_lora_run_generates_what_transformers_does_on_the_export(runs, tmp_path):
    """LLM.load(final/) of a LoRA run, greedy and batched: the tokens of transformers' greedy generate on the
    to_hf export, and of the unmerged LoRA model (the LoRA layers as trained) through the engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from litft import LLM
    from litft.generate import Engine, SamplingParams
    from litft.peft.lora import LoRALinear

    final = runs["lora"] / "final"
    llm = LLM.load(final, device="cpu")
    litft("convert", "to_hf", final, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompts = [llm.encode(p) for p in PROMPTS]
    assert prompts == [tokenizer(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, stop_token_ids=[])
    ours = [r.tokens for r in llm.engine.generate(prompts, params)]
    assert ours == hf_greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), prompts, GREEDY_TOKENS)
    base = LLM.load(yaml.safe_load((final / "base.yaml").read_text())["base_checkpoint"], device="cpu")
    assert [r.tokens for r in base.engine.generate(prompts, params)] != ours  # the run changed what is generated

    unmerged = load_checkpoint(final, merge=False).eval()
    assert sum(isinstance(m, LoRALinear) for m in unmerged.modules()) == 3 * 7
    assert [r.tokens for r in Engine(unmerged, llm.tokenizer).generate(prompts, params)] == ours
    assert llm.generate(PROMPTS[0], max_new_tokens=GREEDY_TOKENS) == \
        llm.tokenizer.decode(llm.engine.generate([prompts[0]], SamplingParams(max_new_tokens=GREEDY_TOKENS))[0].tokens)


def test_to_hf_layout_is_what_transformers_writes(runs, tiny_llama_hf, tmp_path):
    """config.json (architectures, torch_dtype), generation_config.json, tokenizer with its chat template, and
    safetensors names exactly as ``save_pretrained`` writes them, single-file and sharded with an index."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    litft("convert", "to_hf", runs["lora"] / "final", tmp_path / "one")
    litft("convert", "to_hf", runs["lora"] / "final", tmp_path / "sharded", "--max_shard_size", "100KB")
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "one"))
    reference.save_pretrained(tmp_path / "ref_one")
    reference.save_pretrained(tmp_path / "ref_sharded", max_shard_size="100KB")

    for name in ("one", "sharded"):
        out = tmp_path / name
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
            json.loads((tiny_llama_hf / "generation_config.json").read_text())["eos_token_id"]
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (out / f).is_file(), f
        tok = AutoTokenizer.from_pretrained(out)
        assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True).endswith("<|start_header_id|>assistant"
                                                                            "<|end_header_id|>\n\n")
        # the same settings as the original Hugging Face model's config (what vLLM reads through AutoConfig)
        ours, original = AutoConfig.from_pretrained(out).to_dict(), AutoConfig.from_pretrained(tiny_llama_hf).to_dict()
        ignore = {"_name_or_path", "transformers_version", "initializer_range"}
        assert {k: v for k, v in original.items() if k not in ignore} == \
            {k: ours.get(k) for k in original if k not in ignore}
        assert all(v is None for k, v in ours.items() if k not in original)  # e.g. sliding_window: null

    def keys(directory: Path) -> set[str]:
        names = set()
        for f in directory.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                names |= set(h.keys())
        return names

    assert keys(tmp_path / "one") == keys(tmp_path / "ref_one")
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    ref_index = json.loads((tmp_path / "ref_sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref_index["weight_map"]) == keys(tmp_path / "sharded")
    assert len(set(index["weight_map"].values())) > 1
    assert all(v.startswith("model-") and v.endswith(".safetensors") for v in index["weight_map"].values())
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(hf_logits(sharded, x), hf_logits(one, x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_to_peft_loads_in_peft_with_the_same_logits(method, runs, tokens, tiny_llama_hf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    litft("convert", "to_peft", runs[method] / "final", out, "--base_model_name_or_path", "my-org/tiny-llama")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "my-org/tiny-llama"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_dora"] is (method == "dora") and config["use_rslora"] is (method == "dora")
    targets = ["q", "v", "down"] if method == "dora" else ["q", "k", "v", "o", "gate", "up", "down"]
    assert sorted(config["target_modules"]) == sorted(f"{t}_proj" for t in targets)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_hf), out)
    torch.testing.assert_close(hf_logits(model, tokens), litft_logits(runs[method] / "final", tokens),
                               atol=TOL, rtol=0)


def lora_run_to_peft(tmp_path: Path, variant: str, targets: str) -> dict[str, Path]:
    """A 2-step LoRA run (``targets``) on the tiny ``variant`` from the CLI, exported with ``convert to_peft`` to
    ``tmp_path / "adapter"``; returns the tiny checkpoint's {"hf", "native"} folders (the run is ``tmp_path / "run"``)."""
    from tests.test_generate import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "model", variant)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    litft("finetune", "lora", model["native"], "--out_dir", tmp_path / "run", "--data.train_path", data,
          "--data.prompt_style", "plain", "--train.max_steps", 2, "--train.global_batch_size", 4,
          "--train.micro_batch_size", 4, "--train.lr", 0.02, "--train.lr_schedule", "constant",
          "--eval.final_validation", "false", "--lora.r", 4, "--lora.alpha", 8, "--lora.dropout", 0.0,
          "--lora.targets", targets)
    litft("convert", "to_peft", tmp_path / "run", tmp_path / "adapter")
    return model


def assert_peft_export_computes_what_litft_computes(tmp_path: Path, variant: str, targets: str,
                                                    tokens: torch.Tensor) -> dict:
    """:func:`lora_run_to_peft`, then: the run changed the logits, and PeftModel over the original HF model computes
    litft's logits of the run's final checkpoint on ``tokens``. Returns the adapter's adapter_config.json."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_run_to_peft(tmp_path, variant, targets)
    hf = AutoModelForCausalLM.from_pretrained(model["hf"])
    base = hf_logits(hf, tokens)
    expected = litft_logits(tmp_path / "run" / "final", tokens)
    assert (expected - base).abs().max() > 1e-2, "the run should have changed the model"
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    torch.testing.assert_close(hf_logits(peft_model, tokens), expected, atol=TOL, rtol=0)
    return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("variant", ["gemma", "mistral", "qwen3", "olmo3", "smollm3", "gemma4"])
def test_to_peft_of_other_families_loads_in_peft_with_the_same_logits(variant, tokens, tmp_path):
    """A LoRA run on a tiny Gemma (tied embeddings, GeGLU, (1 + w) norms), Mistral (sliding window), Qwen3
    (q/k norms), OLMo 3 (post-only norms, whole-projection q/k norms, sliding layers), SmolLM3 (NoPE layers) and
    Gemma 4 (per-layer inputs, KV-shared layers without k/v projections) exported to_peft: PeftModel over the
    original HF model computes what litft computes."""
    assert_peft_export_computes_what_litft_computes(tmp_path, variant, "[q,k,v,o,gate,up,down]", tokens)


def make_peft_adapter(hf_dir: Path, out: Path, use_dora: bool) -> torch.nn.Module:
    """An adapter made by PEFT itself, with random nonzero weights (B is zero at init), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                        use_dora=use_dora, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_from_peft_gives_peft_logits_and_generates(use_dora, tiny_llama_hf, tiny_llama_native, tokens, tmp_path):
    from litft import LLM
    from litft.tokenizer import Tokenizer

    peft_model = make_peft_adapter(tiny_llama_hf, tmp_path / "peft", use_dora)
    litft("convert", "from_peft", tmp_path / "peft", "--base", tiny_llama_native, "--out_dir", tmp_path / "imported")
    imported = tmp_path / "imported"
    for f in ("lora.safetensors", "lora.yaml", "base.yaml", "model_config.yaml", "tokenizer.json"):
        assert (imported / f).is_file(), f
    expected = hf_logits(peft_model, tokens)
    torch.testing.assert_close(litft_logits(imported, tokens), expected, atol=1e-5, rtol=0)
    merged = load_checkpoint(imported).eval()  # the merged form used by generate / evaluate
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), expected, atol=TOL, rtol=0)

    # generation: litft's engine on the imported adapter gives PEFT's greedy continuation
    llm = LLM(merged, Tokenizer(imported), imported)
    prompt = "The cat likes"
    ids = llm.encode(prompt)
    with torch.no_grad():
        x = torch.tensor([ids])
        hf_ids = peft_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                                     pad_token_id=0)[0, len(ids):].tolist()
    assert llm.generate(prompt, max_new_tokens=8) == llm.tokenizer.decode(hf_ids)
    # and the round trip back to PEFT is the same adapter
    litft("convert", "to_peft", imported, tmp_path / "again")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "again" / "adapter_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            torch.testing.assert_close(b.get_tensor(k), a.get_tensor(k), atol=0, rtol=0)


def test_imported_adapter_is_the_starting_point_of_further_fine_tuning(tiny_llama_hf, tiny_llama_native, tokens,
                                                                       tmp_path):
    peft_model = make_peft_adapter(tiny_llama_hf, tmp_path / "peft", use_dora=False)
    litft("convert", "from_peft", tmp_path / "peft", "--base", tiny_llama_native, "--out_dir", tmp_path / "imported")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    litft("finetune", "lora", tmp_path / "imported", "--out_dir", tmp_path / "run", "--data.train_path", data,
          "--data.prompt_style", "plain", "--train.max_steps", 1, "--train.global_batch_size", 4,
          "--train.micro_batch_size", 4, "--train.lr", 1e-6, "--eval.final_validation", "false")
    final = tmp_path / "run" / "final"
    assert yaml.safe_load((final / "base.yaml").read_text())["base_checkpoint"] == str((tmp_path / "imported").resolve())
    expected = hf_logits(peft_model, tokens)
    got = load_checkpoint(final).eval()(tokens).detach()
    base = load_checkpoint(tiny_llama_native).eval()(tokens).detach()
    assert (got - expected).abs().max() < 1e-3 < (got - base).abs().max()  # one tiny step from the imported model
    litft("convert", "to_hf", final, tmp_path / "hf")  # and the chain exports: base + imported + new LoRA, merged
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), tokens), got,
                               atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- merge_lora


def test_merge_lora_in_place_and_to_out_dir(runs, tokens, tmp_path):
    from litft.weights import load_model

    run = tmp_path / "run"
    shutil.copytree(runs["qlora"], run)
    expected = litft_logits(run / "final", tokens, "bnb.nf4")
    litft("convert", "merge_lora", run, "--out_dir", tmp_path / "merged")
    assert not (tmp_path / "merged" / "base.yaml").exists()
    # the merged model is prompted as the run was (final/prompt_format.yaml goes with it)
    assert (tmp_path / "merged" / "prompt_format.yaml").read_text() == \
        (run / "final" / "prompt_format.yaml").read_text()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged").eval()(tokens), expected, atol=QLORA_TOL, rtol=0)
    litft("convert", "merge_lora", run)  # in place: final/ gains model.safetensors and loads as a full model
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "lora.safetensors").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_model(run / "final").eval()(tokens), expected, atol=QLORA_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def adapter_run(tiny_llama_native: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapter_run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    litft("finetune", "adapter", tiny_llama_native, "--out_dir", root / "run", "--data.train_path", data,
          "--data.prompt_style", "plain", "--train.max_steps", 1, "--train.global_batch_size", 4,
          "--train.micro_batch_size", 4, "--eval.final_validation", "false", "--adapter.start_layer", 1)
    assert (root / "run" / "final" / "adapter.safetensors").is_file()
    return root / "run" / "final"


@pytest.mark.parametrize("command", ["to_peft", "to_hf", "merge_lora"])
def test_adapter_run_is_refused_with_the_reason_and_what_to_do(command, adapter_run, capsys, tmp_path):
    out = tmp_path / "out"
    args = [adapter_run, out] if command != "merge_lora" else [adapter_run, "--out_dir", out]
    err = litft_error(capsys, "convert", command, *args)
    assert "LLaMA-Adapter" in err and "cannot be merged" in err and "PEFT has no exact equivalent" in err
    assert "litft finetune lora" in err and "litft generate" in err
    no_leftovers(out)
    assert not (adapter_run / "model.safetensors").exists()


def test_from_peft_with_the_wrong_base_names_the_shape_mismatch(tiny_llama_hf, tmp_path, capsys):
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import copy_checkpoint
    from tests.hf_models import make_hf_model

    make_peft_adapter(tiny_llama_hf, tmp_path / "peft", use_dora=False)
    other_hf = tmp_path / "other_hf"
    make_hf_model("llama", other_hf, overrides={"vocab_size": 400, "hidden_size": 32, "num_attention_heads": 2,
                                                "num_key_value_heads": 1})
    copy_checkpoint(tiny_llama_hf, other_hf, only=("tokenizer.json", "tokenizer_config.json"))
    other = convert_from_hf(other_hf, tmp_path / "other")
    err = litft_error(capsys, "convert", "from_peft", tmp_path / "peft", "--base", other, "--out_dir", tmp_path / "o")
    assert "shape mismatch" in err and "blocks.0.attn.q_proj.lora_A.weight has shape [4, 64]" in err
    assert "expects [4, 32]" in err and "adapter_model.safetensors" in err
    no_leftovers(tmp_path / "o")


def test_missing_files_are_named(runs, tiny_llama_native, tmp_path, capsys):
    # a run without lora.safetensors
    final = tmp_path / "final"
    shutil.copytree(runs["lora"] / "final", final)
    (final / "lora.safetensors").unlink()
    for command in ("to_peft", "to_hf"):
        err = litft_error(capsys, "convert", command, final, tmp_path / "out")
        assert f"{final / 'lora.safetensors'}: not found" in err
        no_leftovers(tmp_path / "out")
    # LoRA weights without base.yaml
    shutil.copytree(runs["lora"] / "final", tmp_path / "no_base")
    (tmp_path / "no_base" / "base.yaml").unlink()
    err = litft_error(capsys, "convert", "to_hf", tmp_path / "no_base", tmp_path / "out")
    assert "lora.safetensors is there but base.yaml, naming the base checkpoint, is missing" in err
    no_leftovers(tmp_path / "out")
    # base.yaml naming a base that is gone
    shutil.copytree(runs["lora"] / "final", tmp_path / "moved")
    (tmp_path / "moved" / "base.yaml").write_text("method: lora\nbase_checkpoint: /nonexistent/base\n")
    err = litft_error(capsys, "convert", "to_hf", tmp_path / "moved", tmp_path / "out")
    assert "base checkpoint '/nonexistent/base' does not exist" in err
    no_leftovers(tmp_path / "out")
    # not a checkpoint, not a PEFT adapter, no --base
    (tmp_path / "empty").mkdir()
    err = litft_error(capsys, "convert", "to_hf", tmp_path / "empty", tmp_path / "out")
    assert "is not a litft checkpoint: no model_config.yaml" in err
    err = litft_error(capsys, "convert", "from_peft", tmp_path / "empty", "--base", tiny_llama_native)
    assert "is not a PEFT adapter: no adapter_config.json" in err
    (tmp_path / "empty" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    err = litft_error(capsys, "convert", "from_peft", tmp_path / "empty", "--base", tiny_llama_native)
    assert "no adapter weights (adapter_model.safetensors or adapter_model.bin)" in err
    err = litft_error(capsys, "convert", "from_peft", tmp_path / "empty")
    assert "--base is required" in err
    no_leftovers(tmp_path / "empty-litft")
    # a full-weights checkpoint asked for a PEFT adapter
    err = litft_error(capsys, "convert", "to_peft", tiny_llama_native, tmp_path / "out")
    assert "holds full weights" in err and "convert to_hf" in err


def test_existing_out_dir_needs_overwrite(runs, tiny_llama_hf, tiny_llama_native, tmp_path, capsys):
    make_peft_adapter(tiny_llama_hf, tmp_path / "peft", use_dora=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    final = runs["lora"] / "final"
    calls = [("to_hf", final, out), ("to_peft", final, out), ("from_peft", tmp_path / "peft", "--base",
                                                              tiny_llama_native, "--out_dir", out),
             ("merge_lora", final, "--out_dir", out)]
    for command, *args in calls:
        err = litft_error(capsys, "convert", command, *args)
        assert f"{out} exists and is not empty; pass --overwrite true" in err
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    litft("convert", "to_peft", final, out, "--overwrite", "true")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------------------------------- upload


def test_upload_checks_arguments_before_any_network_call(tmp_path, capsys):
    err = litft_error(capsys, "upload", tmp_path / "missing", "me/model")
    assert "no such directory to upload" in err
    (tmp_path / "empty").mkdir()
    assert "nothing to upload" in litft_error(capsys, "upload", tmp_path / "empty", "me/model")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    for bad in ("model", "me/my model", "a/b/c"):
        assert f"repo_id {bad!r}" in litft_error(capsys, "upload", tmp_path / "adapter", bad)


def test_upload_without_network_fails_with_one_clear_line(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "litft", "upload", str(folder), "me/model", "--private", "true"]
    offline = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=60)
    assert offline.returncode == 1 and "HF_HUB_OFFLINE=1" in offline.stderr and "Traceback" not in offline.stderr
    unroutable = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_fake"}
    result = subprocess.run(cmd + ["--access_token", "hf_fake"], env=unroutable, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "litft", "upload", "--help"], env=env, capture_output=True,
                               text=True, timeout=60).stdout
    assert "--private" in help_text and "--access_token" in help_text and "repo_id" in help_text
