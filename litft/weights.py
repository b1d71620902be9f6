"""Reading and writing weights and the files beside them: safetensors shards, atomic files and checkpoint
directories, a method's weights + settings files (``lora.safetensors`` + ``lora.yaml``, ...), and building a
:class:`~litft.model.GPT` on the meta device then loading its weights memory-mapped (never twice in RAM).

What a checkpoint *is* (full weights or a method's weights on a base) is :mod:`litft.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from litft.config import Config
from litft.errors import NonFiniteError, WriteError, check_writable, writing

if TYPE_CHECKING:
    from litft.model import GPT

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights, from its index when it has one."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map'): {e}") from e
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    return sorted(directory.glob("*.safetensors"))


class SafetensorsReader:
    """Lazy, memory-mapped access to the tensors of several safetensors files by name."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.files = files
        self._handles = {}
        self.location: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
                raise ValueError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from e
            self._handles[f] = handle
            for k in keys:
                self.location[k] = f

    def keys(self) -> list[str]:
        return list(self.location)

    def keys_in(self, f: Path) -> list[str]:
        return [k for k, loc in self.location.items() if loc == f]

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.location[key]].get_slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        s = self._handles[self.location[key]].get_slice(key)
        n = 1
        for d in s.get_shape():
            n *= d
        return n * _DTYPE_SIZES.get(s.get_dtype(), 4)

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype of a tensor ("BF16", "F32", "U8", ...), read from the header alone."""
        return self._handles[self.location[key]].get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.location[key]].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{self.location[key]}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from e


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def umask() -> int:
    """The process's file-mode creation mask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (made by ``mkdtemp``/``mkstemp``, which make it private) the mode a plain ``mkdir``/``open``
    gives: 0755 / 0644 under umask 022."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity (non-float tensors always do). A min/max reduction: no copy
    and no temporary the size of the tensor, even for a non-contiguous view."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    t = tensor.detach()
    lo, hi = torch.aminmax(t if t.element_size() > 1 else t.to(torch.float16))  # NaN propagates; float8: via fp16
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(name: str, tensor: torch.Tensor, path: Path) -> None:
    """Refuse a tensor holding a NaN or an infinity."""
    if not is_finite(tensor):
        bad = int((~torch.isfinite(tensor.detach())).sum())
        raise NonFiniteError(f"{path}: refusing to write tensor {name!r}: {bad:,} of its {tensor.numel():,} values "
                             "are NaN or infinite")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None,
                     final_path: Optional[Path] = None) -> None:
    """The one writer of safetensors files: refuses non-finite tensors (:func:`check_finite`) and reports a failed
    write (disk full, read-only) as one error naming the file (``final_path`` when ``path`` is a temp name for it).
    The file gets the mode the umask gives."""
    from safetensors.torch import save_file

    path = Path(path)
    for name, tensor in tensors.items():
        check_finite(name, tensor, final_path or path)
    with writing(final_path or path):
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        follow_umask(path)  # safetensors creates its files 0600


def write_shards(
    tensors: Iterator[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int, total: Optional[int] = None,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write (name, tensor) pairs to ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_bytes``,
    plus an index, or to a single ``model.safetensors`` when everything fits in one shard.

    Only one shard is held in memory at a time. A non-finite tensor is refused (:func:`save_safetensors`).
    """
    metadata = metadata or {"format": "pt"}
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total_size = 0

    def flush() -> None:
        nonlocal current, size
        if not current:
            return
        path = directory / f"shard-{len(shards):05d}.tmp"
        save_safetensors(current, path, metadata)
        shards.append((path, list(current)))
        current, size = {}, 0

    for name, tensor in tensors:
        n = tensor.numel() * tensor.element_size()
        if current and size + n > max_shard_bytes:
            flush()
        current[name] = tensor
        size += n
        total_size += n
    flush()
    if len(shards) == 1:
        shards[0][0].rename(directory / SINGLE_FILE)
        return
    weight_map = {}
    for k, (path, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(directory / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count (``--max_shard_size``) → bytes; anything else is a
    ValueError naming the option and the accepted forms."""
    import re

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(size))
    if not isinstance(size, bool) and match and match.group(2).upper() in units:
        number = int(float(match.group(1)) * units[match.group(2).upper()])
        if number > 0:
            return number
    raise ValueError(f"--max_shard_size {size!r} is invalid: expected a positive size, a number of bytes or a "
                     "number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
                     "e.g. 5GB, 500MB, 2GiB")


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir``; on success it replaces ``out_dir``, on failure it is removed.

    The directory gets the mode the umask gives (not ``mkdtemp``'s 0700); a failed write (disk full, read-only file
    system, a file where a folder must be) is one :class:`~litft.errors.WriteError` naming ``out_dir``, and leaves
    what ``out_dir`` held before intact."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite true to replace it")
    check_writable(out_dir, "", beside=True)
    with writing(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        follow_umask(tmp)
    try:
        with writing(out_dir, any_os_error=False):
            yield tmp
    except WriteError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.path.is_relative_to(tmp):  # a file of the temp dir: name what is being written instead
            raise WriteError(out_dir, e.cause) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with writing(out_dir):
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)  # the umask's mode, not the source's
            copied.append(name)
    return copied


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Names and shapes of every tensor a checkpoint of ``config`` must hold (a tied head is not stored)."""
    from litft.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def load_model(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: Optional[str | torch.dtype] = None,
) -> "GPT":
    """Build the model on the meta device and assign the checkpoint's (memory-mapped) tensors to it."""
    from litft.model import GPT

    checkpoint_dir = Path(checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    dtype = parse_dtype(dtype)
    files = weight_files(checkpoint_dir)
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no weights ({SINGLE_FILE} or {INDEX_FILE}) found")
    reader = SafetensorsReader(files)
    expected = expected_shapes(config)
    check_tensor_names(reader, expected, str(checkpoint_dir))
    state = {}
    from litft.model import keeps_float32

    for key in expected:
        t = reader.get(key)
        if dtype is not None and t.is_floating_point() and not keeps_float32(key):
            t = t.to(dtype)
        state[key] = t.to(device)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers(torch.device(device))
    return model


def check_tensor_names(reader: SafetensorsReader, expected: dict[str, torch.Size], source: str) -> None:
    """Clear errors for missing, unexpected or wrongly shaped tensors."""
    have = set(reader.keys())
    missing = [k for k in expected if k not in have]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    unexpected = sorted(have - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}" +
                         (" ..." if len(unexpected) > 5 else "") + " for this model_config.yaml")
    for k, shape in expected.items():
        got = reader.shape(k)
        if list(shape) != got:
            raise ValueError(f"{reader.location[k]}: tensor {k!r} has shape {got}, model_config.yaml implies "
                             f"{list(shape)}")


def save_model(model: torch.nn.Module, checkpoint_dir: Path, max_shard_size: int | str = "5GB") -> None:
    """Write a model's weights (not its config) as safetensors shards into an existing directory."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    write_shards(iter(state.items()), Path(checkpoint_dir), parse_size(max_shard_size))


def _human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _safetensors_dtypes(files: list[Path]) -> str:
    """The dtypes of the tensors in ``files`` (from their headers, no data read), e.g. ``F32`` or ``BF16, F32``."""
    from safetensors import safe_open

    found: dict[str, int] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                found[dtype] = found.get(dtype, 0) + 1
    return ", ".join(sorted(found, key=lambda d: -found[d]))


def print_written(path: Path, what: str, dtype: Optional[str] = None) -> None:
    """Tell the user what a command wrote: ``path`` (a folder: each entry in it, a sub-folder as one line; or one
    file) with sizes, and the weights' dtype (read from the safetensors headers unless given, e.g. GGUF's outtype)."""
    path = Path(path)

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    entries = sorted(path.iterdir()) if path.is_dir() else [path]
    if dtype is None:
        tensors = [f for f in entries if f.suffix == ".safetensors"]
        dtype = _safetensors_dtypes(tensors) if tensors else None
    print(f"{what}: {path} ({_human_size(sum(size(p) for p in entries))}" + (f", weights {dtype}" if dtype else "")
          + ")", flush=True)
    if path.is_dir():
        names = [p.name + ("/" if p.is_dir() else "") for p in entries]
        width = max(map(len, names), default=0)
        for name, entry in zip(names, entries):
            print(f"  {name:<{width}}  {_human_size(size(entry)):>9}", flush=True)


# ------------------------------------------------------------------------ a method's files (LoRA, adapter, prompt)


def load_state_strict(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], what: str,
                      source: str = "state dict") -> None:
    """Copy ``state`` into ``params`` after checking that names and shapes match exactly (clear error if not)."""
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    wrong = [f"{k} has shape {list(state[k].shape)}, the model expects {list(params[k].shape)}"
             for k in params if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:4])}"
                        + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:4])}"
                        + (" ..." if len(unexpected) > 4 else ""))
    if wrong:
        problems.append("shape mismatch (was it trained on another base model?): " + "; ".join(wrong[:4])
                        + (" ..." if len(wrong) > 4 else ""))
    if problems:
        raise ValueError(f"{source}: does not match the model's {what} tensors: " + " | ".join(problems))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors file written to a temp name beside ``path`` then renamed (non-finite tensors refused:
    :func:`save_safetensors`)."""
    with _atomic_file(path) as tmp:
        save_safetensors({k: v.detach().cpu() for k, v in tensors.items()}, tmp, metadata, final_path=path)


def write_text_atomic(path: Path, text: str) -> None:
    """A text file written to a temp name beside ``path`` then renamed."""
    with _atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` (the umask's mode) that replaces ``path`` when the block succeeds; a failed
    write is one error naming ``path``."""
    with writing(path, any_os_error=False):
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            follow_umask(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def read_args_yaml(path: Path, cls: type) -> Any:
    """A dataclass from a YAML file, with errors naming the file and the unknown/invalid field."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    return args_from_mapping(data, cls, str(path))


def args_from_mapping(data: Any, cls: type, source: str) -> Any:
    """A dataclass from YAML data (a mapping of its fields), with errors naming ``source`` and the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of {cls.__name__} fields")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def write_args_yaml(path: Path, args: Any) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(asdict(args), sort_keys=False))


def write_method_files(out_dir: Path, state: dict[str, torch.Tensor], weights_name: str, args_name: str, args: Any,
                       method: str) -> Path:
    """Write a method's trainable tensors (``weights_name``, safetensors) and its args (``args_name``, YAML) into
    ``out_dir``: the files of a LoRA, adapter or prompt-tuning checkpoint."""
    save_file_atomic(state, out_dir / weights_name, metadata={"format": "pt", "litft": method})
    write_args_yaml(out_dir / args_name, args)
    return out_dir


def read_method_weights(directory: Path, weights_name: str, args_name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, tensors) of the weights file a method's args file ``args_name`` goes with, with a clear error when it
    is missing or unreadable."""
    from safetensors.torch import load_file

    weights = directory / weights_name
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found (expected next to {directory / args_name})")
    try:
        return weights, load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{weights}: not a readable safetensors file: {e}") from e
