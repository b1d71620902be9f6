"""tutorials/export-to-vllm.md, run for real: its bash commands on the tiny model that ships with litft, then the
checks its non-bash blocks stand for (vLLM is not installable here: the folder must load in transformers with
the layout vLLM reads, and the PEFT adapter in peft)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tutorials import REPO, bash_commands, code_blocks, run_tutorial

TUTORIAL = REPO / "tutorials" / "export-to-vllm.md"
MODEL = "checkpoints/meta-llama/Llama-3.2-1B"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF folder, litft checkpoint) of a tiny random fp32 Llama with the fixture BPE tokenizer (chat template
    included) and a 256-token context, so that the default (alpaca) prompt of the tutorial's data fits."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("tutorial_model")
    make_hf_model("llama", root / "hf", overrides={"vocab_size": 400, "max_position_embeddings": 256})
    make_bpe_tokenizer(root / "hf")
    return root / "hf", convert_from_hf(root / "hf", root / "native")


def test_helper_reads_blocks_and_continuations():
    md = ("text\n\n```bash\n# a comment\nlitft a \\\n  --x 1\n\nlitft b\n```\n\n```text\nlitft download x\n```\n"
          "````bash\nlitft c\n````\n```python\nprint(1)\n```\n")
    assert [(c.text, c.line) for c in bash_commands(md)] == [("litft a --x 1", 5), ("litft b", 8), ("litft c", 15)]
    assert code_blocks(md, "python") == [(18, "print(1)")]
    with pytest.raises(ValueError, match="never closed"):
        code_blocks("```bash\nlitft a\n")


HARNESS_MD = """# A tutorial of the harness's conventions

```yaml title=conf/settings.yaml
greeting: hello from MODEL_PATH
```

```bash
# keeps running until Ctrl-C; ready when it prints: server ready
python -c "import signal, sys, time; print('server ready', flush=True); signal.signal(signal.SIGINT, lambda *a: sys.exit(0)); time.sleep(60)"
test -f conf/settings.yaml && \\
  grep -q "hello from /the/model" conf/settings.yaml
```

```python
import yaml
settings = yaml.safe_load(open("conf/settings.yaml"))
```

```python norun
raise SystemExit("never run")
```

```python
print(settings["greeting"])
```

```bash
echo done
```
"""


def test_harness_conventions(tmp_path):
    """Titled files written, a background command waited for and stopped with Ctrl-C, python blocks in one session
    (norun skipped), bash in order; a failing python block names its markdown line."""
    md = tmp_path / "t.md"
    md.write_text(HARNESS_MD)
    work = tmp_path / "work"
    work.mkdir()
    assert [c.ready for c in bash_commands(HARNESS_MD)] == ["server ready", None, None]
    ran = run_tutorial(md, cwd=work, substitutions={"MODEL_PATH": "/the/model"}, timeout=60)
    assert [r.kind for r in ran] == ["file", "background", "bash", "python", "python", "bash"]
    assert ran[4].stdout == "hello from /the/model\n" and ran[5].stdout == "done\n"
    assert "server ready" in ran[1].stdout  # its output, filled in once it stopped (exit status 0 on Ctrl-C)

    md.write_text(HARNESS_MD.replace('print(settings["greeting"])', 'print(settings["missing"])'))
    with pytest.raises(AssertionError, match=r"t\.md:24: python block failed(.|\n)*KeyError: 'missing'"):
        run_tutorial(md, cwd=work, substitutions={"MODEL_PATH": "/the/model"}, timeout=60)
    with pytest.raises(AssertionError, match=r"do not occur in the tutorial"):
        run_tutorial(md, cwd=work, substitutions={"nowhere": "x"})
    md.write_text("```yaml title=~/x.yaml\na: 1\n```\n```bash\ntrue\n```\n")
    with pytest.raises(AssertionError, match=r"reader's home: pass env=\{'HOME'"):
        run_tutorial(md, cwd=work)
    md.write_text("```bash\n# keeps running; ready when it prints: never\nfalse\n```\n")
    with pytest.raises(AssertionError, match=r"t\.md:3: background command: it exited with status 1"):
        run_tutorial(md, cwd=work, timeout=20)


def test_export_tutorial_runs(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from litft.checkpoint import load_checkpoint
    from litft.weights import load_model

    text = TUTORIAL.read_text()
    commands = " ".join(c.text for c in bash_commands(text))
    for needed in ("finetune lora", "convert to_hf", "convert to_peft", "convert from_peft", "convert merge_lora"):
        assert needed in commands
    for not_run in ("litft download", "vllm serve", "litft upload"):  # network / GPU: never in a bash block
        assert not_run in text and not_run not in commands
    assert any('LLM(model="out/llama-lora-hf")' in b for _, b in code_blocks(text, "python"))

    # the reader's data file, where the tutorial says it is; the model path is the only substitution
    (tmp_path / "data").mkdir()
    hf_base, native_base = tiny_model
    words = ["good morning", "thank you", "good night", "the cat", "a red ball", "the river", "my friend", "apples"]
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Shout: {w}", "output": w.upper()}) + "\n" for w in words))
    # one torch thread per command: tiny matrices on a shared CPU
    run_tutorial(TUTORIAL, cwd=tmp_path, substitutions={MODEL: str(native_base)}, env={"OMP_NUM_THREADS": "1"})

    out = tmp_path / "out"
    final = out / "llama-lora" / "final"
    assert (final / "lora.safetensors").is_file() and (final / "base.yaml").is_file()

    # to_hf: the layout vLLM reads, loaded by transformers, computing what litft computes
    hf = out / "llama-lora-hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "model.safetensors"):
        assert (hf / f).is_file(), f
    AutoConfig.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = tokenizer("Translate to French: good night", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = load_checkpoint(final).eval()
        unmerged = load_checkpoint(final, merge=False).eval()  # the LoRA layers as trained
        assert (unmerged(ids) - load_checkpoint(native_base)(ids)).abs().max() > 1e-3  # training changed the model
        torch.testing.assert_close(model(ids).logits, unmerged(ids), atol=1e-4, rtol=0)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)

    # merge_lora: a standalone native checkpoint with the same weights
    with torch.no_grad():
        torch.testing.assert_close(load_model(out / "llama-lora-merged").eval()(ids), merged(ids), atol=0, rtol=0)

    # to_peft: PEFT on the Hugging Face version of the base gives litft's logits (fp32)
    adapter = out / "llama-lora-peft"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Llama-3.2-1B"
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, unmerged(ids), atol=1e-4, rtol=0)

        # from_peft: the round trip is the run's own LoRA
        imported = load_checkpoint(out / "imported-lora", merge=False).eval()
        torch.testing.assert_close(imported(ids), unmerged(ids), atol=0, rtol=0)
