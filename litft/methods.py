"""The fine-tuning methods, one registry entry each: the one place that knows what a method is.

An entry (:class:`MethodKind`) says which modules change and which parameters train (``build(...).prepare``),
which files a checkpoint of it holds, how those load onto a base model, whether and how they merge into plain
weights, how they export (a PEFT adapter type, or why not), and how its trainable parts are switched off
(``reference_off``: the reference model of preference objectives, without a second copy in memory).
:class:`Method` is one configured method, what the training loop uses.

Everything else (training, :mod:`litft.checkpoint`, conversion) asks :func:`get` for the entry named in
``base.yaml`` / ``state.pt`` and uses its fields; nothing outside this module compares method names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch.nn as nn

from litft.peft.adapter import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterArgs
from litft.peft.lora import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, LoRAArgs
from litft.peft.prompt import PROMPT_CONFIG_FILE, PROMPT_WEIGHTS_FILE, PromptTuningArgs


@dataclass
class Method:
    """One configured fine-tuning method, as the training loop uses it.

    Args:
        kind: Its registry entry (name, files, loading, merging, export, reference).
        prepare: Modify the loaded model in place (quantize, inject modules) and set ``requires_grad``.
        save: Write the weights a checkpoint of this method holds into a directory.
        load: Load them back (into a model already ``prepare``-d).
        finalize: Optional extra step for ``final/`` (e.g. writing merged weights), called after ``save``.
        quantized: ``prepare`` quantizes the base (QLoRA): known before any process starts, so that a strategy
            that cannot shard it (FSDP) is refused at once.
        virtual_tokens: Positions of the model's context the method puts before every sequence (prompt tuning's
            virtual tokens): the longest sample is the context less these.
    """

    kind: "MethodKind"
    prepare: Callable[[nn.Module], None]
    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], None]
    finalize: Optional[Callable[[nn.Module, Path], None]] = None
    quantized: bool = False
    virtual_tokens: int = 0

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def full(self) -> bool:
        return self.kind.full


@dataclass(frozen=True)
class MethodKind:
    """A registry entry.

    Args:
        name: The ``litft finetune <name>`` command, recorded in ``base.yaml`` and ``state.pt``.
        full: All weights train: checkpoints hold the whole model (``model.safetensors``); else only the trainable
            weights (``weights_file`` + ``args_file``) plus ``base.yaml`` naming the checkpoint they apply to.
        article: How messages name one of its runs ("a LoRA").
        args_type: Its settings dataclass (the ``--<name>.*`` options, ``<name>:`` in run.yaml, ``args_file``).
        weights_file: The safetensors file of its trainable weights (None: full weights).
        args_file: The YAML file of its settings beside them.
        build: The :class:`Method` from its settings (what ``litft convert consolidate`` rebuilds from run.yaml).
        load_weights: Apply its files in a checkpoint directory to a model holding the base weights.
        merge: Fold its weights into plain model weights (returns the plain model); None: they cannot be.
        merge_refusal: Why it cannot be merged, and what to do instead (when ``merge`` is None).
        peft_type: The PEFT adapter type it exports to and imports from (``convert to_peft/from_peft``), or None.
        peft_refusal: Why it has no PEFT form, and what to do instead (when ``peft_type`` is None).
        reference_off: A context manager under which a prepared model computes what its base computes (its
            trainable parts switched off): the reference of DPO/IPO. None: the method changes every weight, so
            the reference is a frozen copy of the base.
    """

    name: str
    full: bool
    article: str
    args_type: Optional[type]
    weights_file: Optional[str]
    args_file: Optional[str]
    build: Callable[..., Method]
    load_weights: Callable[[nn.Module, Path], Any]
    merge: Optional[Callable[[nn.Module], nn.Module]]
    merge_refusal: str
    peft_type: Optional[str]
    peft_refusal: str
    reference_off: Optional[Callable[[nn.Module], ContextManager[None]]]


# ---------------------------------------------------------------------------------------------- full


def full_method(freeze_layers: int = 0) -> Method:
    """Every weight trains but those of the first ``freeze_layers`` blocks; checkpoints hold the whole model."""
    from litft.weights import load_model, save_model

    def prepare(model: nn.Module) -> None:
        model.requires_grad_(True)
        freeze_blocks(model, freeze_layers)

    def load(model: nn.Module, directory: Path) -> None:
        state = load_model(directory, device="cpu").state_dict()
        model.load_state_dict(state, strict=False)

    return Method(kind=METHODS["full"], prepare=prepare, save=save_model, load=load)


def freeze_blocks(model: nn.Module, n: int) -> None:
    """Stop the first ``n`` transformer blocks of ``model`` from training (``requires_grad=False``); a clear error
    when ``n`` leaves no block to train."""
    n_layer = len(model.blocks)
    if n >= n_layer and n > 0:
        raise ValueError(f"freeze_layers={n} is invalid: the model has {n_layer} transformer blocks (n_layer in its "
                         f"model_config.yaml), so at least one must train: expected 0 <= freeze_layers <= "
                         f"{n_layer - 1}")
    for block in model.blocks[:n]:
        block.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- LoRA


def lora_method(lora: LoRAArgs, quantize: Optional[str] = None, merge: bool = False) -> Method:
    """LoRA (DoRA, rsLoRA) layers on the (QLoRA: quantized) base; checkpoints hold lora.safetensors + lora.yaml.
    ``merge``: ``final/`` also gets the merged model.safetensors."""
    from litft.peft import apply_lora, load_lora, merge_lora, save_lora

    def prepare(model: nn.Module) -> None:
        if quantize is not None:
            from litft.peft import quantize_model

            quantize_model(model, quantize)
        apply_lora(model, lora)

    def finalize(model: nn.Module, directory: Path) -> None:
        if merge:
            from litft.weights import save_model

            if quantize is not None:  # into the dequantized base the LoRA weights were trained against, on the CPU,
                from litft.checkpoint import load_checkpoint  # as `litft convert merge_lora` does

                merged = load_checkpoint(directory, device="cpu").eval()
            else:
                merged = merge_lora(model) or model
            save_model(merged, directory)
            merged.config.save(directory)  # merging a LoRA on a tied lm_head unties it

    return Method(kind=METHODS["lora"], prepare=prepare, save=lambda model, d: save_lora(model, lora, d),
                  load=load_lora, finalize=finalize, quantized=quantize is not None)


@contextlib.contextmanager
def _lora_off(model: nn.Module) -> Iterator[None]:
    from litft.peft.lora import lora_modules

    layers = list(lora_modules(model).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def _merge_lora(model: nn.Module) -> nn.Module:
    from litft.peft import merge_lora

    return merge_lora(model) or model  # dequantizes a QLoRA base first


def _load_lora(model: nn.Module, directory: Path) -> Any:
    from litft.peft import load_lora

    return load_lora(model, directory)


# ---------------------------------------------------------------------------------------------- adapter


def adapter_method(adapter: AdapterArgs) -> Method:
    """LLaMA-Adapter prompts and gates on the frozen base; checkpoints hold adapter.safetensors + adapter.yaml."""
    from litft.peft import apply_adapter, load_adapter, save_adapter

    return Method(kind=METHODS["adapter"], prepare=lambda model: apply_adapter(model, adapter),
                  save=lambda model, d: save_adapter(model, adapter, d), load=load_adapter)


@contextlib.contextmanager
def _adapter_off(model: nn.Module) -> Iterator[None]:
    """The adapted attention layers without their adapter (the attention adds its term only when it has one)."""
    from litft.peft.adapter import adapter_modules

    owners = [model.get_submodule(name.rsplit(".", 1)[0]) for name in adapter_modules(model)]
    removed = [(attn, attn.adapter) for attn in owners]
    for attn, _ in removed:
        attn.adapter = None
    try:
        yield
    finally:
        for attn, module in removed:
            attn.adapter = module


def _load_adapter(model: nn.Module, directory: Path) -> Any:
    from litft.peft import load_adapter

    return load_adapter(model, directory)


# ---------------------------------------------------------------------------------------------- prompt tuning


def prompt_method(prompt: PromptTuningArgs, tokenizer_dir: Optional[Path] = None) -> Method:
    """A virtual prompt on the frozen base, initialised from the text embedded with the tokenizer of
    ``tokenizer_dir`` (init text; on the meta device, as ``convert consolidate`` builds it, nothing is
    initialised); checkpoints hold prompt.safetensors + prompt.yaml."""
    from litft.peft.prompt import apply_prompt_tuning, load_prompt, save_prompt

    def prepare(model: Any) -> None:
        tokenizer = None
        if prompt.init == "text" and tokenizer_dir is not None and model.embed.weight.device.type != "meta":
            from litft.tokenizer import Tokenizer

            tokenizer = Tokenizer(tokenizer_dir)
        apply_prompt_tuning(model, prompt, tokenizer)

    return Method(kind=METHODS["prompt"], prepare=prepare, save=lambda model, d: save_prompt(model, prompt, d),
                  load=load_prompt, virtual_tokens=prompt.num_virtual_tokens)


@contextlib.contextmanager
def _prompt_off(model: nn.Module) -> Iterator[None]:
    """The model without its virtual prompt (no virtual tokens before the sequence)."""
    prompt = model.virtual_prompt
    model.virtual_prompt = None
    try:
        yield
    finally:
        model.virtual_prompt = prompt


def _load_prompt(model: nn.Module, directory: Path) -> Any:
    from litft.peft.prompt import load_prompt

    return load_prompt(model, directory)


def _load_full(model: nn.Module, directory: Path) -> Any:
    raise ValueError(f"{directory}: a full fine-tuning checkpoint holds the whole model, not weights to apply to a base")


# ---------------------------------------------------------------------------------------------- the registry


ADAPTER_REFUSAL = (
    "it is a LLaMA-Adapter run (adapter.safetensors): its learned prompts are extra attention inside every adapted "
    "layer, not an update of existing weights, so they cannot be merged into the model, and PEFT has no exact "
    "equivalent (its adaption-prompt method learns one gate per layer where litft learns one per head). Use the "
    "run with litft itself (litft generate / chat / serve / evaluate, LLM.load), or fine-tune with "
    "`litft finetune lora` to get weights you can merge (convert to_hf, merge_lora) or share as a PEFT adapter "
    "(convert to_peft)"
)

PROMPT_REFUSAL = (
    "it is a prompt-tuning run (prompt.safetensors): its learned virtual tokens are extra inputs in front of every "
    "sequence, not an update of existing weights, so they cannot be merged into the model's weights (a Hugging Face "
    "model folder has no place for them). Export it as a PEFT prompt-tuning adapter with `litft convert to_peft "
    "<run> <adapter dir>` (load it with peft.PeftModel.from_pretrained on the base model, e.g. the output of `litft "
    "convert to_hf <base checkpoint>`), or use the run with litft itself (litft generate / chat / serve / evaluate, "
    "LLM.load)"
)

FULL_PEFT_REFUSAL = ("it holds full weights (model.safetensors), not LoRA weights; a PEFT adapter can only be made "
                     "from a `litft finetune lora` or `litft finetune prompt` run")

METHODS: dict[str, MethodKind] = {
    kind.name: kind for kind in (
        MethodKind(name="full", full=True, article="a full fine-tuning", args_type=None, weights_file=None,
                   args_file=None, build=lambda args=None: full_method(), load_weights=_load_full, merge=None,
                   merge_refusal="", peft_type=None, peft_refusal=FULL_PEFT_REFUSAL, reference_off=None),
        MethodKind(name="lora", full=False, article="a LoRA", args_type=LoRAArgs, weights_file=LORA_WEIGHTS_FILE,
                   args_file=LORA_CONFIG_FILE, build=lora_method, load_weights=_load_lora, merge=_merge_lora,
                   merge_refusal="", peft_type="LORA", peft_refusal="", reference_off=_lora_off),
        MethodKind(name="adapter", full=False, article="a LLaMA-Adapter", args_type=AdapterArgs,
                   weights_file=ADAPTER_WEIGHTS_FILE, args_file=ADAPTER_CONFIG_FILE, build=adapter_method,
                   load_weights=_load_adapter, merge=None, merge_refusal=ADAPTER_REFUSAL, peft_type=None,
                   peft_refusal=ADAPTER_REFUSAL, reference_off=_adapter_off),
        MethodKind(name="prompt", full=False, article="a prompt-tuning", args_type=PromptTuningArgs,
                   weights_file=PROMPT_WEIGHTS_FILE, args_file=PROMPT_CONFIG_FILE, build=prompt_method,
                   load_weights=_load_prompt, merge=None, merge_refusal=PROMPT_REFUSAL, peft_type="PROMPT_TUNING",
                   peft_refusal="", reference_off=_prompt_off),
    )
}


def get(name: Any, source: str = "") -> MethodKind:
    """The registry entry named ``name`` (read from ``source``, a file named in the error when it is unknown)."""
    if name not in METHODS:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}unknown method {name!r} (expected {', '.join(METHODS)})")
    return METHODS[name]

