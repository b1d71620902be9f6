"""The Python API: ``from litft import LLM``.

    llm = LLM.load("checkpoints/my-model")                # native or Hugging Face checkpoint folder
    llm.generate("The capital of France is", max_new_tokens=20)
    llm.generate(["prompt one", "prompt two"])           # batched, prompts of any lengths
    for piece in llm.generate("Tell me a story", stream=True): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])
    llm.generate("2 + 2 =", logprobs=5)                  # a Generation: token ids, logprobs, top-5 alternatives
    llm.benchmark(); llm.save("out/my-model")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from litft.generate.engine import Engine, Request, TokenLogprob
from litft.generate.sampling import SamplingParams

# Lightning-style precision names (and plain dtype names) → the dtype weights and compute use
PRECISIONS = {
    "32-true": torch.float32, "32": torch.float32, "float32": torch.float32, "fp32": torch.float32,
    "bf16-true": torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "16-true": torch.float16, "16": torch.float16, "float16": torch.float16, "fp16": torch.float16,
}

Message = dict[str, str]


@dataclass
class Generation:
    """What :meth:`LLM.generate` and :meth:`LLM.chat` return with ``logprobs``: the text, the generated token ids
    (a final stop token excluded), one :class:`~litft.generate.engine.TokenLogprob` per token (its
    log-probability under the model, i.e. the log-softmax of the model's logits before temperature, filters and
    penalties, and the ``logprobs`` most likely alternatives) and why generation ended (``"stop"``/``"length"``)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str

    @classmethod
    def of(cls, request: Request) -> "Generation":
        return cls(request.text, list(request.tokens), list(request.token_logprobs), request.finish_reason or "")


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``"auto"`` = the GPU when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available; use device='cpu'")
    return dev


def resolve_precision(precision: Optional[str], device: torch.device) -> torch.dtype:
    """The dtype for ``precision`` (None = bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU)."""
    if precision is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    key = str(precision).lower()
    if key.endswith("-mixed"):
        raise ValueError(f"precision={precision!r}: mixed precision is for training; for inference use "
                         f"{key.replace('-mixed', '-true')!r}")
    if key not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: expected one of 32-true, bf16-true, 16-true")
    return PRECISIONS[key]


def load_checkpoint_model(
    path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
) -> torch.nn.Module:
    """A :class:`~litft.model.GPT` from a checkpoint folder, ready for inference.

    Accepts a native checkpoint (``model_config.yaml`` + safetensors, or a fine-tune run's ``final/``, loaded by
    :func:`litft.checkpoint.load_checkpoint` as the model that was trained: LoRA merged into its base, a
    QLoRA run's into its quantized-then-dequantized base, adapter weights applied), and a Hugging Face folder
    (``config.json`` + safetensors/.bin, converted in memory: nothing is written to it). Never touches the
    network. ``quantize`` (e.g. ``"bnb.nf4"``) replaces the linear layers but the head by quantized ones; a
    run's LoRA layers then stay unmerged over the quantized base.
    """
    from litft.config import MODEL_CONFIG_FILE

    path = Path(path)
    device = torch.device(device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if quantize:
        try:
            from litft.peft.quantize import QUANTIZE_MODES
        except ImportError as e:
            raise ValueError(f"quantize={quantize!r} needs litft.peft.quantize, which cannot be imported ({e})") from e
        if quantize not in QUANTIZE_MODES:  # before loading any weights
            raise ValueError(f"quantize={quantize!r} is invalid: expected one of {', '.join(QUANTIZE_MODES)}")
    if (path / MODEL_CONFIG_FILE).is_file():
        # full weights, or LoRA/adapter weights over the base named in base.yaml (a fine-tune run's final/)
        from litft.checkpoint import load_checkpoint

        model = load_checkpoint(path, device, dtype, quantize=quantize)
    elif (path / "config.json").is_file():
        model = _load_hf(path, device, dtype)
        if quantize:
            _quantize(model, quantize)
    else:
        raise FileNotFoundError(f"{path} is not a checkpoint: it has neither {MODEL_CONFIG_FILE} (litft) nor "
                                f"config.json (Hugging Face)")
    return model.eval()


def _load_hf(hf_dir: Path, device: torch.device, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    from litft.convert.hf import hf_config_to_config, hf_tensors_to_native
    from litft.model import GPT

    config = hf_config_to_config(hf_dir)
    state = {name: t.to(device) for name, t in hf_tensors_to_native(hf_dir, config, dtype)}
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers(device)
    return model


def _quantize(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantize the linear layers in place on their device (litft.peft.quantize; the head stays in full precision)."""
    try:
        from litft.peft.quantize import quantize_model
    except ImportError as e:
        raise ValueError(f"quantize={mode!r} needs litft.peft.quantize, which cannot be imported here ({e})") from e
    quantize_model(model, mode)
    return model


def _load_tokenizer(path: Path) -> Any:
    from litft.tokenizer import Tokenizer

    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if not has_files:
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer "
                                f"files of the base model into it")
    return Tokenizer(path)


class LLM:
    """A model + tokenizer + generation engine. Build it with :meth:`LLM.load`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, checkpoint_dir: Optional[Path] = None,
                 compile: bool = False, max_seq_length: Optional[int] = None, quantize: Optional[str] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.quantize = quantize
        self.engine = Engine(model, tokenizer, max_seq_length=max_seq_length, compile=compile)
        from litft.data.formats import PromptFormat

        # how the run that wrote this checkpoint rendered its rows (None for a checkpoint that is not a run's)
        self.prompt_format: Optional[PromptFormat] = PromptFormat.load(self.checkpoint_dir)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @classmethod
    def load(
        cls, name_or_dir: Union[str, Path], device: Union[str, torch.device] = "auto", precision: Optional[str] = None,
        quantize: Optional[str] = None, compile: bool = False, max_seq_length: Optional[int] = None,
    ) -> "LLM":
        """Load a local checkpoint folder: native, Hugging Face (converted in memory) or a fine-tune run's
        ``final/``. Never downloads: for a hub name, run ``litft download <name>`` first.

        Args:
            name_or_dir: the checkpoint folder, or the name of an asset card (``litft assets ls``).
            device: ``"auto"`` (GPU if there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
            precision: ``"bf16-true"``, ``"16-true"`` or ``"32-true"``; default bf16 on GPU, fp32 on CPU.
            quantize: e.g. ``"bnb.nf4"`` or ``"bnb.int8"`` (bitsandbytes) for quantized inference; a LoRA run's
                layers then stay unmerged over the quantized base. Without it, a QLoRA run's ``final/`` loads as
                the model it trained: its LoRA merged into the base quantized as in training, then dequantized.
            compile: compile the decode step (CUDA graphs on GPU).
            max_seq_length: longest prompt + generation; default the model's context.
        """
        from litft.asset_cards import resolve_checkpoint

        path = resolve_checkpoint(name_or_dir)  # a folder, or the name of an asset card
        if not path.exists():
            looks_like_path = str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).count("/") > 1
            hint = "" if looks_like_path else (f"; to use a model from the Hugging Face Hub, run "
                                               f"`litft download {name_or_dir}` first and load the folder it writes")
            raise FileNotFoundError(f"{name_or_dir}: no such checkpoint folder{hint}")
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        tokenizer = _load_tokenizer(path)  # before the weights: fail fast
        model = load_checkpoint_model(path, dev, dtype, quantize)
        return cls(model, tokenizer, path, compile=compile, max_seq_length=max_seq_length, quantize=quantize)

    # ------------------------------------------------------------------ generation

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt (the checkpoint's default special tokens added). Tokenizing through
        ``encode_batch`` lets other threads run meanwhile (the ``tokenizers`` backend releases the GIL there):
        the server tokenizes in worker threads while its event loop keeps answering."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty")
        return self.tokenizer.encode_batch([prompt])[0]

    def format_prompt(self, prompt: str) -> str:
        """``prompt`` rendered as the run that wrote this checkpoint rendered its rows' prompts (``prompt_format``:
        an Alpaca run's prompt around an instruction, a template run's template, ...), for :meth:`generate`, which
        takes text as it is; unchanged for a checkpoint that is not a run's output. A chat run was trained on chat
        messages: use :meth:`chat`."""
        if self.prompt_format is None:
            return prompt
        rendered = self.prompt_format.text_prompt(prompt)
        if rendered is None:
            raise ValueError(f"{self.checkpoint_dir} was trained on chat messages: use llm.chat([{{'role': 'user', "
                             "'content': ...}]) (its chat template), not a formatted prompt")
        return rendered

    def encode_chat(self, messages: Sequence[Message], chat_template: Optional[bool] = None) -> list[int]:
        """Ids of a conversation for the model to answer: with the chat template or, for a run trained on
        prompt/response rows (``prompt_format``, not chat; ``chat_template=None``), its one user message rendered
        as the run rendered prompts (such a model knows no system messages or history: those are refused).
        ``chat_template=True`` always uses the chat template."""
        from litft.generate.chat import check_messages

        check_messages(messages)
        if chat_template is None and self.prompt_format is not None and self.prompt_format.format != "chat":
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise ValueError(f"this model was trained on {self.prompt_format.format!r} rows (prompt and "
                                 "response), not on conversations: give it one user message")
            return self.encode(self.format_prompt(messages[0]["content"]))
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        return self.tokenizer.encode_batch([text], bos=False, eos=False)[0]  # encode_batch releases the GIL

    def generate(
        self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 256, temperature: float = 0.0,
        top_k: Optional[int] = None, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
        stop: Union[str, Sequence[str], None] = None, seed: Optional[int] = None, stream: bool = False,
        truncate: bool = False, max_batch_size: int = 64, logprobs: Optional[int] = None,
    ) -> Union[str, list[str], Iterator[str], Generation, list[Generation]]:
        """Complete a prompt (→ str), a list of prompts (→ list[str], generated as one batch) or stream one
        prompt's text piece by piece (``stream=True`` → iterator of str).

        ``temperature=0`` is greedy; ``stop`` strings end the text right before them; ``truncate`` drops the
        oldest prompt tokens when prompt + ``max_new_tokens`` exceeds the context (otherwise that is an error).
        ``logprobs=k`` (an integer >= 0) returns :class:`Generation` s instead of strings: the token ids, each
        token's log-probability and its ``k`` most likely alternatives.
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or ())
        if isinstance(prompt, str):
            return self._complete(self.encode(prompt), params, stream, truncate, logprobs)
        prompts = list(prompt)
        if stream:
            raise ValueError("stream=True streams one prompt: pass a string, not a list")
        if not prompts:
            raise ValueError("the list of prompts is empty")
        requests = [self.engine.new_request(self.encode(p), params, truncate, logprobs) for p in prompts]
        done = self.engine.run(requests, max_batch_size)
        return [r.text for r in done] if logprobs is None else [Generation.of(r) for r in done]

    def chat(
        self, messages: Sequence[Message], max_new_tokens: int = 256, temperature: float = 0.0,
        top_k: Optional[int] = None, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
        stop: Union[str, Sequence[str], None] = None, seed: Optional[int] = None, stream: bool = False,
        logprobs: Optional[int] = None,
    ) -> Union[str, Iterator[str], Generation]:
        """The assistant's reply to ``messages`` (``[{"role": "user", "content": ...}, ...]``), formatted with
        the checkpoint's chat template (a run trained on prompt/response rows: see :meth:`encode_chat`; a
        :class:`Generation` with ``logprobs``, as in :meth:`generate`)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or ())
        return self._complete(self.encode_chat(messages), params, stream, False, logprobs)

    def _complete(self, ids: list[int], params: SamplingParams, stream: bool, truncate: bool,
                  logprobs: Optional[int]) -> Union[str, Iterator[str], Generation]:
        if stream and logprobs is not None:
            raise ValueError("logprobs cannot be streamed: pass stream=False to get a Generation with logprobs")
        request = self.engine.new_request(ids, params, truncate, logprobs)
        if stream:
            return self.engine.stream(request)
        done = self.engine.run([request])[0]
        return done.text if logprobs is None else Generation.of(done)

    # ------------------------------------------------------------------ benchmark and save

    def benchmark(self, num_iterations: int = 3, prompt_length: int = 128, max_new_tokens: int = 256,
                  batch_size: int = 1, warmup: int = 1) -> dict[str, Any]:
        """Greedy decoding speed on random prompts (stop tokens ignored, so every row makes exactly
        ``max_new_tokens``). Times are means over ``num_iterations`` runs after ``warmup`` runs.

        Returns tokens_per_sec (generated tokens / wall time including prefill), decode_tokens_per_sec
        (after the first token), time_to_first_token (s), total_time (s), peak_memory_bytes (GPU: peak
        allocated; CPU: peak resident set of the process) and the settings.
        """
        for name, value in (("num_iterations", num_iterations), ("prompt_length", prompt_length),
                            ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} is invalid: expected an integer >= 1")
        engine = self.engine
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, self.config.vocab_size, (batch_size, prompt_length), generator=g).tolist()
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=[])
        cuda = engine.device.type == "cuda"

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(engine.device)

        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)
        ttfts, totals = [], []
        for i in range(warmup + num_iterations):
            requests = [engine.new_request(p, params) for p in prompts]
            engine.reserve(batch_size, prompt_length + max_new_tokens)
            sync()
            t0 = time.perf_counter()
            engine.add(requests)
            engine.sync()
            ttft = time.perf_counter() - t0
            for _ in range(max_new_tokens - 1):
                engine.step()
            engine.sync()
            sync()
            total = time.perf_counter() - t0
            for r in requests:
                engine.remove(r)
            if i >= warmup:
                ttfts.append(ttft)
                totals.append(total)
        ttft, total = sum(ttfts) / len(ttfts), sum(totals) / len(totals)
        if cuda:
            peak = torch.cuda.max_memory_allocated(engine.device)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        generated = batch_size * max_new_tokens
        return {
            "tokens_per_sec": generated / total,
            "decode_tokens_per_sec": batch_size * (max_new_tokens - 1) / max(total - ttft, 1e-9),
            "time_to_first_token": ttft,
            "total_time": total,
            "peak_memory_bytes": int(peak),
            "batch_size": batch_size, "prompt_length": prompt_length, "max_new_tokens": max_new_tokens,
            "num_iterations": num_iterations, "device": str(engine.device),
            "dtype": str(self.model.embed.weight.dtype).removeprefix("torch."), "compiled": engine.compiled,
        }

    def save(self, out_dir: Union[str, Path], overwrite: bool = False) -> Path:
        """Write a native checkpoint (weights, ``model_config.yaml``, tokenizer files) to ``out_dir``."""
        from litft.convert.hf import write_generation_config
        from litft.weights import atomic_directory, copy_tokenizer_files, save_model

        if self.quantize:
            raise ValueError(f"this model was loaded with quantize={self.quantize!r}; quantized weights cannot be "
                             f"saved as a checkpoint: load it without quantize to save it")
        if self.checkpoint_dir is None:
            raise ValueError("this LLM was not loaded from a folder, so there are no tokenizer files to save")
        with atomic_directory(Path(out_dir), overwrite) as tmp:
            save_model(self.model, tmp)
            self.config.save(tmp)
            copy_tokenizer_files(self.checkpoint_dir, tmp)
            if self.prompt_format is not None:
                self.prompt_format.save(tmp)
            if not (tmp / "generation_config.json").is_file():
                write_generation_config(self.config, tmp)
        return Path(out_dir)

    def __repr__(self) -> str:
        return f"LLM({self.config.name or self.checkpoint_dir}, device={self.device})"


__all__ = ["LLM", "Generation", "TokenLogprob", "load_checkpoint_model", "resolve_device", "resolve_precision",
           "Request"]
