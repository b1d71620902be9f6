"""Hugging Face checkpoints ↔ native litft checkpoints, streamed shard by shard.

Both directions read the family's one weight-name table (``litft.zoo``); sizes always come from the
checkpoint's own ``config.json`` / ``model_config.yaml``, never from a model name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from litft.config import MODEL_CONFIG_FILE, Config
from litft.model import keeps_float32
from litft.weights import (
    SafetensorsReader,
    atomic_directory,
    check_tensor_names,
    copy_tokenizer_files,
    expected_shapes,
    parse_dtype,
    parse_size,
    print_written,
    weight_files,
    write_shards,
)
from litft.zoo import family_for


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The text model's section of an HF ``config.json`` (multimodal wrappers keep it in ``text_config``)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    if not path.is_file():
        hint = " It is a litft checkpoint already." if (Path(hf_dir) / MODEL_CONFIG_FILE).is_file() else ""
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face checkpoint: no config.json.{hint}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise ValueError(f"{path}: expected a JSON object with a 'model_type' field")
    if isinstance(hf.get("text_config"), dict):
        text = dict(hf["text_config"])
        text.setdefault("model_type", f"{hf['model_type']}_text")
        # the wrapper's token ids hold for the text model, and so does its quantization (which the family refuses
        # or imports, never drops)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "quantization_config"):
            if key not in text and key in hf:
                text[key] = hf[key]
        # transformers ties the wrapper's head to the embedding by the wrapper's own tie_word_embeddings
        if "tie_word_embeddings" in hf:
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        hf = text
    return hf


def hf_config_to_config(hf_dir: Path, name: str = "", hf_id: str = "") -> Config:
    hf = read_hf_config(hf_dir)
    family = family_for(hf["model_type"])
    return family.config_from_hf(hf, name=name or Path(hf_dir).name, hf_id=hf_id)


class _HFSource:
    """Tensors of an HF checkpoint (safetensors, or legacy .bin loaded with weights_only=True).

    An MXFP4 checkpoint (``quantization_config.quant_method`` "mxfp4", gpt-oss) stores some tensors as a pair
    ``<name>_blocks`` (packed 4-bit values) + ``<name>_scales`` (one power-of-two exponent per 32 values): the pair
    reads as ``<name>``, dequantized by transformers' ``convert_moe_packed_tensors`` to the dtype of the checkpoint's
    other floating-point tensors (bfloat16 in the released ones: exact)."""

    def __init__(self, hf_dir: Path) -> None:
        quant = read_hf_config(hf_dir).get("quantization_config")
        self.mxfp4 = isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"
        files = weight_files(hf_dir)
        self.reader: Optional[SafetensorsReader] = SafetensorsReader(files) if files else None
        self.bins: list[Path] = []
        if self.reader is None:
            self.bins = sorted(Path(hf_dir).glob("pytorch_model*.bin"))
            if not self.bins:
                raise FileNotFoundError(f"{hf_dir}: no weights (*.safetensors or pytorch_model*.bin) found")

    def shards(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(file, lazy tensor getter per name) for each shard."""
        if self.reader is not None:
            for f in self.reader.files:
                getters = {k: (lambda k=k: self.reader.get(k)) for k in self.reader.keys_in(f)}
                if self.mxfp4:
                    getters = self._dequantized(f, getters)
                yield f, getters
        for f in self.bins:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield f, {k: (lambda v=v: v) for k, v in state.items()}


    def _plain_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor that is not MXFP4 (bfloat16 if none is), read
        from the headers."""
        floats = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for key in self.reader.keys():
            if not key.endswith(("_blocks", "_scales")) and self.reader.dtype_name(key) in floats:
                return floats[self.reader.dtype_name(key)]
        return torch.bfloat16

    def _dequantized(self, f: Path, getters: dict[str, Any]) -> dict[str, Any]:
        """``getters`` with every ``_blocks``/``_scales`` pair (scales in any shard) replaced by its dequantized
        tensor; a lone half of a pair is an error."""
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        out = {}
        for key, get in getters.items():
            if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" in self.reader.location:
                continue  # read with its blocks
            if not key.endswith("_blocks"):
                out[key] = get
                continue
            name = key.removesuffix("_blocks")
            if name + "_scales" not in self.reader.location:
                raise ValueError(f"{f}: MXFP4 tensor {key!r} has no {name + '_scales'!r} in the checkpoint")
            out[name] = lambda name=name: convert_moe_packed_tensors(
                self.reader.get(name + "_blocks"), self.reader.get(name + "_scales"), dtype=self._plain_dtype())
        for key in getters:
            if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" not in self.reader.location:
                raise ValueError(f"{f}: MXFP4 tensor {key!r} has no {key.removesuffix('_scales') + '_blocks'!r} "
                                 "in the checkpoint")
        return out


def hf_tensors_to_native(
    hf_dir: Path, config: Config, dtype: Optional[torch.dtype] = None,
    shards: Optional[Iterable[tuple[Path, dict[str, Callable[[], torch.Tensor]]]]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs of an HF checkpoint, shard by shard, shapes checked against ``config``.

    ``shards`` gives the HF-named tensors from elsewhere (a GGUF file: ``litft.convert.gguf``) as (file, lazy getter
    per HF name) pairs; by default they are read from the safetensors/.bin files of ``hf_dir``."""
    family = family_for(config.hf_model_type)
    expected = expected_shapes(config)
    seen: set[str] = set()
    for path, getters in (_HFSource(hf_dir).shards() if shards is None else shards):
        for hf_key, get in getters.items():
            if family.is_ignored_hf(hf_key, config):
                continue
            match = family.hf_to_native(hf_key)
            if match is None:
                raise ValueError(f"{path}: tensor {hf_key!r} is not part of a {family.architecture} "
                                 f"(model_type {family.model_type!r}) checkpoint")
            rule, natives = match
            if natives == ("lm_head.weight",) and config.tie_embeddings:
                continue  # a tied head is the embedding; some checkpoints store a copy
            tensor = get()
            natives = rule.part_names(natives, config)
            if rule.unstack is not None and (tensor.dim() < 2 or tensor.shape[0] != config.n_expert):
                raise ValueError(f"{path}: tensor {hf_key!r} of shape {list(tensor.shape)} should stack "
                                 f"{config.n_expert} experts along dim 0 as config.json implies")
            parts = rule.to_native(tensor, config)
            if len(parts) != len(natives) or (rule.split and sum(rule.split(config)) != tensor.shape[0]):
                raise ValueError(f"{path}: tensor {hf_key!r} of shape {list(tensor.shape)} cannot be split into "
                                 f"{rule.split(config)} as config.json implies")
            for name, part in zip(natives, parts):
                if name not in expected:
                    raise ValueError(f"{path}: tensor {hf_key!r} maps to {name!r}, which config.json does not "
                                     f"describe (n_layer={config.n_layer}, n_expert={config.n_expert})")
                if part.shape != expected[name]:
                    raise ValueError(f"{path}: tensor {hf_key!r} has shape {list(part.shape)}, config.json implies "
                                     f"{list(expected[name])}")
                if dtype is not None and part.is_floating_point() and not keeps_float32(name):
                    part = part.to(dtype)
                seen.add(name)
                yield name, part.contiguous()
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ValueError(f"{hf_dir}: checkpoint lacks tensor(s) for {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def convert_from_hf(
    hf_dir: Path,
    out_dir: Optional[Path] = None,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    hf_id: str = "",
) -> Path:
    """Convert a Hugging Face checkpoint folder into a native litft checkpoint.

    Args:
        hf_dir: folder with ``config.json``, ``*.safetensors`` (or ``pytorch_model*.bin``) and tokenizer files
            (or the name of an asset card naming one).
        out_dir: where to write the native checkpoint; default ``<hf_dir>-litft``.
        dtype: cast floating-point weights to this dtype (float32, bfloat16, float16); default keeps them.
        max_shard_size: largest safetensors shard to write, e.g. ``5GB``.
        overwrite: replace ``out_dir`` if it exists and is not empty.
        hf_id: HF repo id recorded in ``model_config.yaml``.
    """
    from litft.asset_cards import resolve_checkpoint

    hf_dir = resolve_checkpoint(hf_dir)  # a folder, or the name of an asset card
    config = hf_config_to_config(hf_dir, hf_id=hf_id)
    out_dir = Path(out_dir) if out_dir is not None else hf_dir.parent / f"{hf_dir.name}-litft"
    with atomic_directory(out_dir, overwrite) as tmp:
        write_shards(hf_tensors_to_native(hf_dir, config, parse_dtype(dtype)), tmp, parse_size(max_shard_size))
        config.save(tmp)
        copy_tokenizer_files(hf_dir, tmp)
        if not (tmp / "generation_config.json").is_file():
            write_generation_config(config, tmp)
    print_written(out_dir, "wrote a litft checkpoint")
    return out_dir


def native_tensors_to_hf(
    checkpoint_dir: Path, config: Config, dtype: Optional[torch.dtype] = None,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of a native checkpoint (or of an in-memory ``state``), fused tensors joined."""
    family = family_for(config.hf_model_type)
    if state is None:
        reader = SafetensorsReader(weight_files(checkpoint_dir))
        if not reader.keys():
            raise FileNotFoundError(f"{checkpoint_dir}: no weights found")
        check_tensor_names(reader, expected_shapes(config), str(checkpoint_dir))  # never export a broken folder
        names, get = reader.keys(), reader.get
    else:
        names, get = list(state), state.__getitem__
    plan: dict[str, list[Optional[str]]] = {}
    rules = {}
    for name in names:
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        match = family.native_to_hf(name)
        if match is None:
            raise ValueError(f"{checkpoint_dir}: tensor {name!r} has no {family.architecture} name")
        rule, part, hf_key = match
        plan.setdefault(hf_key, [None] * len(rule.part_names(rule.natives, config)))[part] = name
        rules[hf_key] = rule
    for hf_key, parts in plan.items():
        if None in parts:
            raise ValueError(f"{checkpoint_dir}: {hf_key!r} needs {rules[hf_key].natives} but some are missing")
        tensor = rules[hf_key].to_hf([get(p) for p in parts], config)
        if dtype is not None and tensor.is_floating_point() and not any(keeps_float32(p) for p in parts):
            tensor = tensor.to(dtype)
        yield hf_key, tensor


def weights_dtype(checkpoint_dir: Path) -> Optional[torch.dtype]:
    files = weight_files(checkpoint_dir)
    if not files:
        return None
    reader = SafetensorsReader(files[:1])
    for k in reader.keys():
        t = reader.get(k)
        if t.is_floating_point():
            return t.dtype
    return None


def convert_to_hf(
    checkpoint_dir: Path,
    out_dir: Path,
    dtype: Optional[str] = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a native checkpoint as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` and
    vLLM load directly: ``config.json``, ``generation_config.json``, tokenizer files and safetensors shards
    (with ``model.safetensors.index.json`` when there is more than one).

    A LoRA/DoRA run is merged into its base first (a QLoRA base is dequantized: see ``litft.convert.merge``);
    a LLaMA-Adapter run cannot be merged and is refused.

    Args:
        checkpoint_dir: a native litft checkpoint (``model_config.yaml`` + safetensors), a LoRA/DoRA/QLoRA run's
            ``final/`` (``lora.safetensors`` + ``base.yaml``), or a run's out_dir (its ``final/`` is used).
        out_dir: the folder to create.
        dtype: cast floating-point weights to this dtype; default keeps the checkpoint's.
        max_shard_size: largest shard, e.g. ``5GB`` (transformers' default).
        overwrite: replace ``out_dir`` if it exists and is not empty.
    """
    from litft.checkpoint import resolve_checkpoint
    from litft.convert.merge import load_merged

    checkpoint_dir = resolve_checkpoint(Path(checkpoint_dir))
    config = Config.from_checkpoint(checkpoint_dir)
    torch_dtype = parse_dtype(dtype)
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        model = load_merged(checkpoint_dir, torch_dtype, purpose="convert to_hf")
        if model is None:  # full weights: streamed from disk shard by shard
            tensors = native_tensors_to_hf(checkpoint_dir, config, torch_dtype)
            weights_in = weights_dtype(checkpoint_dir)
        else:  # LoRA merged in memory
            config = model.config
            state = {k: v.detach() for k, v in model.state_dict().items()}
            tensors = native_tensors_to_hf(checkpoint_dir, config, torch_dtype, state=state)
            weights_in = next((v.dtype for v in state.values() if v.is_floating_point()), None)
        write_shards(tensors, tmp, parse_size(max_shard_size))
        family = family_for(config.hf_model_type)
        hf = family.config_to_hf(config, torch_dtype or weights_in)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        copy_tokenizer_files(checkpoint_dir, tmp)
        if not (tmp / "generation_config.json").is_file():
            write_generation_config(config, tmp)
    print_written(Path(out_dir), "wrote a Hugging Face folder")
    return Path(out_dir)


def write_generation_config(config: Config, directory: Path) -> None:
    gen = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
                             ("pad_token_id", config.pad_token_id)) if v is not None}
    (Path(directory) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
