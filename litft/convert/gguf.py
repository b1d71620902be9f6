"""GGUF files (llama.cpp, Ollama, LM Studio) ↔ native litft checkpoints: ``litft convert from_gguf`` and ``to_gguf``.

The format is read and written with llama.cpp's own ``gguf`` package (GGUFReader, dequantize, GGUFWriter, quants,
the tensor-name map); what its metadata means comes from transformers' GGUF support, so that a file converts to what
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` loads: the config keys, the tokenizer (with the chat
template of ``tokenizer.chat_template``), the GGUF → HF tensor names and llama.cpp's conventions that it undoes (the
row order of llama's q/k projections, Gemma's RMSNorm weights stored as 1 + w). The HF-named tensors then take the
HF → native path of ``convert from_hf`` (the family's one weight table), one tensor at a time.

``to_gguf`` goes the other way: native → HF names (the path of ``convert to_hf``, a LoRA/DoRA/QLoRA run merged as
there), HF → llama.cpp names with gguf's TensorNameMap, llama.cpp's conventions applied, and the metadata checked by
reading it back through transformers' GGUF config reader before any tensor is written: a model the metadata cannot
describe (a RoPE scaling, a layer pattern, an attention scale GGUF has no key for) is refused, not exported wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from litft.config import Config
from litft.weights import atomic_directory, parse_dtype, parse_size, print_written, write_shards

GGUF_INSTALL = "pip install 'litft[gguf]'"
# GGUF architecture (general.architecture) → the zoo's HF model_type, where they differ
_MODEL_TYPE_OF_ARCH = {"gemma3": "gemma3_text"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise RuntimeError(f"GGUF files need llama.cpp's gguf package, which is not installed: {GGUF_INSTALL}") from None
    return gguf


def _read_field(reader: Any, key: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import read_field

    value = read_field(reader, key)
    return value[0] if len(value) == 1 else (value or None)


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped), or a clear error for a missing, foreign or truncated file."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... for bad magic, truncation, corruption
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e
    return reader


def supported_architectures() -> list[str]:
    """The GGUF architectures ``from_gguf`` reads: those transformers' GGUF loader knows that are zoo families."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from litft.zoo import FAMILIES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if _MODEL_TYPE_OF_ARCH.get(a, a) in FAMILIES)


def gguf_config(path: Path, reader: Any) -> tuple[Config, dict[str, Any]]:
    """The litft config of a GGUF file, and the HF config dict transformers reads from its metadata."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from litft.zoo import family_for

    architecture = _read_field(reader, "general.architecture")
    if architecture not in supported_architectures():
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; litft reads "
                         f"{', '.join(supported_architectures())}")
    hf = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    model_type = hf.pop("model_type")
    # the config class fills what GGUF leaves out (Gemma 3's layer pattern, RoPE per layer type) as from_pretrained
    hf_full = AutoConfig.for_model(model_type, **hf).to_diff_dict()
    for key in ("_model_name_or_path", "transformers_version"):  # where it came from, not the model
        hf_full.pop(key, None)
    hf_full["model_type"] = model_type
    return family_for(model_type).config_from_hf(hf_full, name=Path(path).stem), hf_full


def _hf_tensor_getters(path: Path, reader: Any, hf_config: dict[str, Any]) -> dict[str, Callable[[], torch.Tensor]]:
    """HF name → lazy getter of the dequantized tensor, as transformers' GGUF loader names and fixes it up."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    gguf = _gguf()
    architecture = _read_field(reader, "general.architecture")
    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config)
    name_map = get_gguf_hf_weights_map(hf_model, processor)

    def get(tensor: Any) -> torch.Tensor:
        try:
            weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
                             f"package cannot dequantize ({e})") from None
        weights = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                    parsed_parameters={}).weights
        return torch.from_numpy(np.array(weights))

    # tensors transformers has no name for (llama.cpp's rope_freqs, precomputed from the config) are skipped as there
    return {name_map[t.name]: (lambda t=t: get(t)) for t in reader.tensors if t.name in name_map}


def _default_dtype(reader: Any) -> torch.dtype:
    """float16/bfloat16 when every matrix of the file is stored so, else float32 (a dequantized or F32 file)."""
    gguf = _gguf()
    types = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    if types == {gguf.GGMLQuantizationType.F16}:
        return torch.float16
    if types == {gguf.GGMLQuantizationType.BF16}:
        return torch.bfloat16
    return torch.float32


def _save_tokenizer(path: Path, directory: Path, hf_config: dict[str, Any]) -> None:
    """tokenizer.json + tokenizer_config.json (bos/eos/unk/pad, add_bos_token, the chat template) as transformers
    builds them from the file's tokenizer.ggml.* and tokenizer.chat_template metadata."""
    from transformers import AutoConfig, AutoTokenizer

    try:  # the config read already (else transformers parses the whole metadata again to choose the class)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  config=AutoConfig.for_model(**hf_config))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot build a tokenizer from its tokenizer.ggml.* metadata: {e}") from e
    tokenizer.save_pretrained(str(directory))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):  # where transformers loaded it from, not the model
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def convert_from_gguf(
    gguf_file: Path,
    out_dir: Optional[Path] = None,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF file (llama.cpp, Ollama, LM Studio) into a native litft checkpoint.

    Every tensor type the ``gguf`` package dequantizes is read (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants,
    ...); config, tokenizer and chat template come from the file's metadata, as transformers reads them. Tensors
    are dequantized one at a time and written shard by shard (the file itself is memory-mapped). Architectures:
    those transformers' GGUF loader reads that are litft families (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3).

    Args:
        gguf_file: the ``.gguf`` file (one file; split ``-00001-of-0000N.gguf`` files are not read).
        out_dir: where to write the checkpoint; default ``<file without .gguf>-litft`` beside it.
        dtype: dtype of the written weights (float32, bfloat16, float16); default float32 for a quantized file
            (its dequantized values exactly), else the file's own float type.
        max_shard_size: largest safetensors shard to write, e.g. ``5GB``.
        overwrite: replace ``out_dir`` if it exists and is not empty.
    """
    from litft.convert.hf import hf_tensors_to_native, write_generation_config

    path = Path(gguf_file)
    reader = open_gguf(path)
    config, hf_config = gguf_config(path, reader)
    torch_dtype = parse_dtype(dtype) or _default_dtype(reader)
    out_dir = Path(out_dir) if out_dir is not None else path.parent / f"{path.stem}-litft"
    with atomic_directory(out_dir, overwrite) as tmp:
        shards = [(path, _hf_tensor_getters(path, reader, hf_config))]
        write_shards(hf_tensors_to_native(path, config, torch_dtype, shards=shards), tmp, parse_size(max_shard_size))
        config.save(tmp)
        _save_tokenizer(path, tmp, hf_config)
        write_generation_config(config, tmp)
    print_written(out_dir, "wrote a litft checkpoint")
    return out_dir


# ----------------------------------------------------------------------------------------------------- to_gguf


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp stores a zoo family."""

    name: str  # general.architecture
    permute_qk: bool = False  # q/k rows in llama.cpp's rotary layout (pairs (i, i + d/2) → (2i, 2i + 1))
    norm_plus_one: bool = False  # RMSNorm weights stored as 1 + w (Gemma computes x * (1 + w))
    sliding_window: bool = False  # attention.sliding_window written


# the zoo families to_gguf writes (HF model_type → how); each is checked against transformers' GGUF reader by tests
TO_GGUF_ARCHS = {
    "llama": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "gemma3_text": GGUFArch("gemma3", norm_plus_one=True, sliding_window=True),
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary row order (two halves per head) → llama.cpp's (interleaved pairs); transformers' GGUF loader
    undoes exactly this."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _write_model_metadata(writer: Any, config: Config, arch: GGUFArch, vocab_size: int) -> None:
    writer.add_name(config.name or "model")
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups or config.n_head)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(vocab_size)
    head_size = config.head_size or config.n_embd // config.n_head
    writer.add_rope_dimension_count(int(head_size * config.partial_rotary_factor))
    writer.add_key_length(head_size)  # llama.cpp's head size (else n_embd / n_head)
    writer.add_value_length(head_size)
    if arch.sliding_window and config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if config.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(float(config.rope_local_theta))


def _check_metadata_expresses(config: Config, arch: GGUFArch, vocab_size: int, out: Path) -> None:
    """Write the model metadata alone to a scratch file, read it back as transformers reads a GGUF, and refuse a
    model that it does not describe exactly (before any tensor is written)."""
    gguf = _gguf()
    scratch = out.parent / f".{out.name}.meta-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(scratch), arch.name)
        _write_model_metadata(writer, config, arch, vocab_size)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        read, _ = gguf_config(scratch, open_gguf(scratch))
    finally:
        scratch.unlink(missing_ok=True)
    ignore = {"name", "hf_id", "extra", "tie_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
    wrong = [f"{f.name}={getattr(config, f.name)!r} (read back: {getattr(read, f.name)!r})"
             for f in dataclasses.fields(Config) if f.name not in ignore
             and not _same_in_float32(getattr(config, f.name), getattr(read, f.name))]
    if wrong:
        raise ValueError(f"to_gguf: GGUF's {arch.name} metadata cannot describe this model: {'; '.join(wrong)}; "
                         "llama.cpp and transformers would run another model, so nothing was written")


def _same_in_float32(a: Any, b: Any) -> bool:
    """Equal, floats compared as the float32 GGUF stores them."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.float32(a) == np.float32(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_in_float32(a[k], b[k]) for k in a)
    return a == b


_PRE_NAMES_LLAMA_CPP_KNOWS = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


def _pre_tokenizer_name(tokenizer_json: dict[str, Any], source: Path) -> str:
    """tokenizer.ggml.pre for a byte-level BPE: the name llama.cpp (and transformers' reader) give its split regex."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    patterns = re.findall(r'"Regex": ("(?:[^"\\]|\\.)*")', text)
    if not patterns:
        if '"use_regex": true' in text:
            return "gpt-2"  # ByteLevel's own GPT-2 split
        raise ValueError(f"{source}: its pre_tokenizer splits text in a way GGUF has no name for: {text[:200]}")
    pattern = json.loads(patterns[0])
    names = [n for n, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == pattern]
    if not names:
        raise ValueError(f"{source}: its pre_tokenizer regex {pattern!r} is not one llama.cpp knows by name "
                         f"(tokenizer.ggml.pre)")
    return next((n for n in _PRE_NAMES_LLAMA_CPP_KNOWS if n in names), names[0])


def _write_tokenizer_metadata(writer: Any, checkpoint_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.* (model, pre, tokens, token types, merges, scores, special ids) and tokenizer.chat_template
    from the checkpoint's tokenizer.json and tokenizer_config.json."""
    from litft.tokenizer import Tokenizer

    gguf = _gguf()
    source = checkpoint_dir / "tokenizer.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: not found; to_gguf writes the tokenizer from a tokenizer.json (BPE)")
    tokenizer_json = json.loads(source.read_text())
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: a {model.get('type')!r} tokenizer; to_gguf writes BPE tokenizers (byte-level "
                         "like Llama 3 / SmolLM2 / Qwen, or sentencepiece-style with byte fallback like Gemma)")
    ids = dict(model["vocab"])
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    ids.update({a["content"]: i for i, a in added.items()})
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"{source}: token id {max(ids.values())} is outside the model's {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = gguf.TokenType.NORMAL
    tok = Tokenizer(checkpoint_dir)
    byte_level = '"ByteLevel"' in json.dumps([tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("decoder")])
    for i, token in enumerate(tokens):
        if i in added:
            types[i] = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif i == tok.unk_id:
            types[i] = gguf.TokenType.UNKNOWN
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = gguf.TokenType.BYTE
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json, source))
    elif model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # sentencepiece BPE merges the best-scoring pair first: a token's score is minus the rank of its merge
        rank = {m.replace(" ", "", 1): -float(r) for r, m in reversed(list(enumerate(merges)))}
        writer.add_token_scores([rank.get(t, -float(len(merges) + i)) for i, t in enumerate(tokens)])
        writer.add_add_space_prefix(False)
    else:
        raise ValueError(f"{source}: a BPE tokenizer that is neither byte-level nor byte-fallback (sentencepiece); "
                         "GGUF has no tokenizer model for it")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if merges:
        writer.add_token_merges(merges)
    for add, value in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                       (writer.add_unk_token_id, tok.unk_id), (writer.add_pad_token_id, tok.pad_id)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(tok.add_bos))
    writer.add_add_eos_token(bool(tok.add_eos))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _gguf_tensors(
    hf_tensors: Iterator[tuple[str, torch.Tensor]], config: Config, arch: GGUFArch, outtype: str, source: Path,
) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, data, GGML type) for each HF tensor, llama.cpp's conventions applied."""
    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name.upper()), config.n_layer)
    types = gguf.GGMLQuantizationType
    for hf_name, tensor in hf_tensors:
        base, _, suffix = hf_name.rpartition(".")
        name = name_map.get_name(base)
        if name is None:
            raise ValueError(f"{source}: tensor {hf_name!r} has no llama.cpp name in the {arch.name} architecture")
        name = f"{name}.{suffix}"
        data = tensor.detach().to(torch.float32)
        if not torch.isfinite(data).all():
            raise ValueError(f"{source}: tensor {hf_name!r} holds non-finite values (NaN/inf); nothing was written")
        if arch.permute_qk and base.endswith(("q_proj", "k_proj")):
            data = _permute_qk(data, config.n_head if base.endswith("q_proj") else config.n_query_groups or config.n_head)
        if arch.norm_plus_one and "norm.weight" in name:
            data = data + 1
        array = data.numpy()
        if array.ndim == 1 or outtype == "f32":
            yield name, array, types.F32
        elif outtype == "f16":
            yield name, array.astype(np.float16), types.F16
        else:
            qtype = types.BF16 if outtype == "bf16" else types.Q8_0
            try:
                yield name, gguf.quants.quantize(array, qtype), qtype
            except gguf.quants.QuantError:  # rows not a multiple of the block size: llama.cpp keeps them as F16
                yield name, array.astype(np.float16), types.F16


def convert_to_gguf(
    checkpoint_dir: Path,
    out_file: Path,
    outtype: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Write a litft checkpoint as one GGUF file for llama.cpp, Ollama, LM Studio (and transformers' ``gguf_file=``).

    Tensors get llama.cpp's names and conventions, the metadata its keys (``general.architecture``,
    ``<arch>.context_length`` ... ``tokenizer.ggml.*``, ``tokenizer.chat_template``). A LoRA/DoRA/QLoRA run is merged
    into its base first, as ``convert to_hf`` merges it; an adapter or prompt-tuning run has nothing to merge and is
    refused. Architectures: llama (Llama, SmolLM2), qwen2, qwen3, gemma3. The file appears only when complete.

    Args:
        checkpoint_dir: a native checkpoint, a LoRA/DoRA/QLoRA run's ``final/``, or a run's out_dir.
        out_file: the ``.gguf`` file to write.
        outtype: f32, f16, bf16 or q8_0 (norms and biases stay f32; q8_0 keeps a matrix whose rows are not a
            multiple of 32 in f16, as llama.cpp does).
        overwrite: replace ``out_file`` if it exists.
    """
    from litft.convert.hf import native_tensors_to_hf
    from litft.convert.merge import load_merged, resolve_checkpoint

    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"to_gguf: --outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    checkpoint_dir = resolve_checkpoint(Path(checkpoint_dir))
    config = Config.from_checkpoint(checkpoint_dir)
    arch = TO_GGUF_ARCHS.get(config.hf_model_type)
    if arch is None:
        raise ValueError(f"to_gguf: {checkpoint_dir} is a {config.hf_model_type!r} model; to_gguf writes "
                         f"{', '.join(sorted(TO_GGUF_ARCHS))}")
    out = Path(out_file)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite true to replace it")
    model = load_merged(checkpoint_dir, torch.float32, purpose="convert to_gguf")
    state = None
    if model is not None:
        config = model.config
        state = {k: v.detach() for k, v in model.state_dict().items()}
    vocab_size = config.vocab_size
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_metadata_expresses(config, arch, vocab_size, out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(tmp), arch.name, use_temp_file=True)
        _write_model_metadata(writer, config, arch, vocab_size)
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        writer.add_file_type(file_types[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer_metadata(writer, checkpoint_dir, vocab_size)
        hf_tensors = native_tensors_to_hf(checkpoint_dir, config, state=state)
        for name, data, qtype in _gguf_tensors(hf_tensors, config, arch, outtype, checkpoint_dir):
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print_written(out, "wrote a GGUF file", dtype=outtype)
    return out
