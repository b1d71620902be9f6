"""``convert to_gguf`` / ``from_gguf`` on tiny random models: the files transformers reads from them (``gguf_file=``)
compute litft's logits, tokenize as litft does, carry the chat template; ``from_gguf`` of them gives the model back;
bad input is refused clearly with nothing written. The real models are in tests/test_real_models.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello, world!", "The cat jumped over the fence.", "  two  spaces\nand a newline", "42 apples, 3.5 kg",
         "Ünïcödé café 日本", "<|begin_of_text|>special<|eot_id|>"]


def _hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    from litft.weights import load_model

    with torch.no_grad():
        return load_model(checkpoint).eval()(ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random litft checkpoints GGUF can describe: llama (tied, head_dim != n_embd/n_head), qwen2 (untied,
    q/k/v biases) and qwen3 (qk-norm) with the byte-level BPE fixture tokenizer, gemma3 (sliding/full pattern of 6, head_dim 256) with the
    sentencepiece one."""
    from litft.convert.hf import convert_from_hf
    from tests.fixtures_tokenizers import make_bpe_tokenizer, make_sentencepiece_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("gguf_tiny")
    made = {}
    for name, variant, overrides, tokenizer in (
        ("llama", "llama-tied", {}, make_bpe_tokenizer),
        ("qwen2", "qwen2", {}, make_bpe_tokenizer),
        ("qwen3", "qwen3", dict(head_dim=128), make_bpe_tokenizer),  # GGUF's qwen3 has no head size transformers reads
        ("gemma3", "gemma3", dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                                  rope_parameters=None), make_sentencepiece_tokenizer),
    ):
        make_hf_model(variant, root / f"{name}-hf", overrides={"vocab_size": 400, **overrides})
        tokenizer(root / f"{name}-hf")
        made[name] = convert_from_hf(root / f"{name}-hf", root / name)
    return made


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma3"])
def test_to_gguf_f32_loads_in_transformers_with_litft_logits(tiny: dict[str, Path], name: str,
                                                             tmp_path: Path) -> None:
    from litft.convert.gguf import convert_to_gguf

    out = convert_to_gguf(tiny[name], tmp_path / f"{name}.gguf", outtype="f32")
    hf, hf_tok = _hf_from_gguf(out)
    ids = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        assert (hf(ids).logits - _logits(tiny[name], ids)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_to_gguf_tokenizer_and_chat_template_read_back_by_transformers(tiny: dict[str, Path], name: str,
                                                                      tmp_path: Path) -> None:
    from litft.convert.gguf import convert_to_gguf
    from litft.tokenizer import Tokenizer

    out = convert_to_gguf(tiny[name], tmp_path / f"{name}.gguf", outtype="f16")
    reader = gguf.GGUFReader(out)
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    _, hf_tok = _hf_from_gguf(out)
    ours = Tokenizer(tiny[name])
    for text in TEXTS:
        assert hf_tok.encode(text) == ours.encode(text), text
        assert hf_tok.decode(ours.encode(text), skip_special_tokens=True) == \
            ours.decode(ours.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)


@pytest.mark.parametrize("outtype, tolerance", [("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)])
def test_to_gguf_outtypes(tiny: dict[str, Path], tmp_path: Path, outtype: str, tolerance: float) -> None:
    """Each outtype stores the matrices in its type (norms stay F32) and still computes the model."""
    from litft.convert.gguf import convert_to_gguf

    out = convert_to_gguf(tiny["llama"], tmp_path / "m.gguf", outtype=outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    hf, _ = _hf_from_gguf(out)
    ids = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - _logits(tiny["llama"], ids)).abs().max().item() <= tolerance


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma3"])
def test_from_gguf_gives_the_model_back(tiny: dict[str, Path], name: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """to_gguf (f32) then from_gguf: the same logits; the command says what it wrote."""
    from litft.convert.gguf import convert_from_gguf, convert_to_gguf

    out = convert_to_gguf(tiny[name], tmp_path / "m.gguf", outtype="f32")
    back = convert_from_gguf(out, tmp_path / "back")
    printed = capsys.readouterr().out
    assert f"wrote a litft checkpoint: {back}" in printed and "model.safetensors" in printed and "F32" in printed
    ids = torch.randint(0, 400, (1, 20))
    assert (_logits(back, ids) - _logits(tiny[name], ids)).abs().max().item() <= 1e-4


def test_from_gguf_refuses_a_truncated_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    from litft.convert.gguf import convert_from_gguf, convert_to_gguf

    out = convert_to_gguf(tiny["llama"], tmp_path / "m.gguf", outtype="f16")
    data = out.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file \(truncated or corrupt\?\)"):
        convert_from_gguf(cut, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        convert_from_gguf(tmp_path / "junk.gguf", tmp_path / "never")


def test_from_gguf_refuses_an_unsupported_architecture_by_name(tmp_path: Path) -> None:
    from litft.convert.gguf import convert_from_gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"mamba\.gguf: GGUF architecture 'mamba' is not supported; litft reads "
                                         r".*gemma3.*llama"):
        convert_from_gguf(path, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_from_gguf_refuses_a_tensor_type_gguf_cannot_dequantize(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A tensor stored in a type the gguf package has no dequantizer for is named, with its type."""
    from litft.convert.gguf import convert_from_gguf, convert_to_gguf

    out = convert_to_gguf(tiny["llama"], tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(out)
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1
                             else None)
    odd_type = gguf.GGMLQuantizationType.Q8_1  # blocks the reader can size but gguf has no dequantizer for
    for t in reader.tensors:
        if t.name == "blk.0.attn_v.weight":
            block, size = gguf.GGML_QUANT_SIZES[odd_type]
            rows, columns = t.data.shape
            writer.add_tensor(t.name, torch.zeros(rows, columns // block * size, dtype=torch.uint8).numpy(),
                              raw_dtype=odd_type)
        else:
            writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"odd\.gguf: tensor 'blk\.0\.attn_v\.weight' has type Q8_1, which the gguf "
                                         "package cannot dequantize"):
        convert_from_gguf(tmp_path / "odd.gguf", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_to_gguf_refuses_what_it_cannot_write(tiny: dict[str, Path], tiny_llama_native: Path, tmp_path: Path) -> None:
    """A prompt-tuning or adapter run (nothing to merge), a RoPE scaling GGUF has no key for, an unsupported family,
    an unknown outtype: refused by name, no file left behind."""
    import shutil

    import yaml

    from litft.convert.gguf import convert_to_gguf

    out = tmp_path / "never.gguf"
    for method in ("prompt", "adapter"):
        run = tmp_path / method
        run.mkdir()
        shutil.copy(tiny["llama"] / "model_config.yaml", run)
        for f in (f"{method}.safetensors", f"{method}.yaml"):
            (run / f).write_bytes(b"")
        (run / "base.yaml").write_text(yaml.safe_dump({"method": method, "base_checkpoint": str(tiny["llama"])}))
        with pytest.raises(ValueError, match=rf"convert to_gguf: .*{method}.* cannot be merged: it is a "
                                             rf"{'prompt-tuning' if method == 'prompt' else 'LLaMA-Adapter'} run"):
            convert_to_gguf(run, out)
    with pytest.raises(ValueError, match=r"GGUF's llama metadata cannot describe this model: rope_scaling="):
        convert_to_gguf(tiny_llama_native, out)  # llama3 RoPE scaling
    from tests.hf_models import make_hf_model
    from litft.convert.hf import convert_from_hf

    make_hf_model("phi3", tmp_path / "phi3-hf", overrides={"vocab_size": 400})
    with pytest.raises(ValueError, match=r"is a 'phi3' model; to_gguf writes gemma3_text, llama, qwen2, qwen3"):
        convert_to_gguf(convert_from_hf(tmp_path / "phi3-hf", tmp_path / "phi3"), out)
    with pytest.raises(ValueError, match=r"--outtype 'q4_k': expected one of f32, f16, bf16, q8_0"):
        convert_to_gguf(tiny["llama"], out, outtype="q4_k")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_convert_commands_print_what_they_wrote(tiny: dict[str, Path], tmp_path: Path) -> None:
    """from_hf / to_hf / to_gguf on the command line: the folder or file, its files, sizes and the weights' dtype."""
    import subprocess
    import sys

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "litft", "convert", *args], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    printed = run("to_hf", str(tiny["llama"]), str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert f"wrote a Hugging Face folder: {tmp_path / 'hf'}" in printed and "weights BF16" in printed
    assert "config.json" in printed and "model.safetensors" in printed
    printed = run("to_gguf", str(tiny["llama"]), str(tmp_path / "m.gguf"), "--outtype", "q8_0")
    assert f"wrote a GGUF file: {tmp_path / 'm.gguf'} (" in printed and "weights q8_0" in printed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
