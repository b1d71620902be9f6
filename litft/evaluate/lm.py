"""The lm-eval model class over a litft model, ``LitftLM`` (registered as lm-eval's ``litft`` model).

Imported by :mod:`litft.evaluate.harness` on first use only: it needs lm-eval (the evaluate extra).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

log = logging.getLogger("litft.evaluate")


@register_model("litft")
class LitftLM(TemplateLM):
    """lm-eval model class over a litft model: ``pretrained`` is loaded like :meth:`litft.LLM.load` does
    (litft checkpoint, HF folder, run ``final/``), or pass a loaded ``llm`` (a :class:`litft.LLM`).

    ``max_length`` (default: the model's context) and ``add_bos_token`` / ``prefix_token_id`` (default: the
    tokenizer's) mean what they mean for lm-eval's ``hf`` model.
    """

    backend = "causal"

    def __init__(
        self, pretrained: Optional[str] = None, llm: Any = None, batch_size: int | str = 8,
        max_length: Optional[int] = None, max_gen_toks: int = 256, device: Optional[str] = None,
        precision: Optional[str] = None, add_bos_token: Optional[bool] = None,
        prefix_token_id: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from litft.evaluate import load_llm

        unknown = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",)}
        if unknown:
            raise ValueError(f"unknown model argument(s) for the litft model: {', '.join(unknown)}")
        if (pretrained is None) == (llm is None):
            raise ValueError("give exactly one of pretrained=<checkpoint dir> or llm=<litft.LLM>")
        self.llm = llm if llm is not None else load_llm(pretrained, device=device or "auto", precision=precision)
        self.model = self.llm.model.eval()
        self.tokenizer = self.llm.tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else "<litft.LLM>"
        try:
            self._batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer "
                             f"(automatic batch sizes are not supported)") from None
        if self._batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
        context = self.model.config.block_size - self.model.num_virtual_tokens  # prompt tuning's come first
        self._max_length = int(max_length) if max_length else context
        if not 2 <= self._max_length <= context:
            raise ValueError(f"max_length={max_length} is invalid: expected 2..{context} (the model's context)")
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._device = self.model.embed.weight.device

    # ---------------------------------------------------------------- what lm-eval asks about the model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_name": self.pretrained,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.embed.weight.dtype)}

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        if not chat_template:
            return None
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------- tokenisation (as lm-eval's HFLM)

    def _bos_arg(self, add_special_tokens: Optional[bool]) -> Optional[bool]:
        """litft's ``bos=``: None = the tokenizer's default (HF's add_special_tokens unset), False = none,
        True = forced (``add_bos_token=True``, which HFLM passes to the tokenizer)."""
        return add_special_tokens if add_special_tokens is not None else self.add_bos_token

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs: Any) -> list[int]:
        bos = self._bos_arg(add_special_tokens)
        if add_special_tokens is None and string.startswith(self.tok_decode([self.prefix_token_id], False)):
            bos = False  # the string already starts with the BOS text
        ids = self.tokenizer.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- log-likelihoods

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> list[tuple[float, bool]]:
        """Score (key, context ids, continuation ids) requests: right-padded batches, longest first; the
        input is (context + continuation)[-(max_length + 1):][:-1] and the last len(continuation) logits
        score the continuation, exactly as lm-eval's ``hf`` model does."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        batch_size = override_bs or self.batch_size
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            inputs, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise ValueError(f"empty context or continuation in request {requests[i][0]!r}")
                if len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
                whole = ctx + cont
                if len(whole) > self.max_length + 1:
                    log.warning(f"context + continuation of {len(whole)} tokens exceeds max_length="
                                f"{self.max_length}: truncating {len(whole) - self.max_length - 1} tokens "
                                f"from the left")
                inputs.append(whole[-(self.max_length + 1):][:-1])
                conts.append(cont)
            width = max(len(x) for x in inputs)
            idx = torch.zeros(len(inputs), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                idx[row, :len(x)] = torch.tensor(x)
            hidden = self.model(idx.to(self._device), return_hidden=True)
            # only the continuation's positions go through the head (vocab-sized logits for few tokens)
            rows = torch.cat([torch.full((len(c),), r) for r, c in enumerate(conts)])
            cols = torch.cat([torch.arange(len(x) - len(c), len(x)) for x, c in zip(inputs, conts)])
            logprobs = F.log_softmax(self.model.head(hidden[rows.to(self._device), cols.to(self._device)])
                                     .float(), dim=-1)
            targets = torch.tensor([t for c in conts for t in c], device=self._device)
            token_lp = logprobs.gather(-1, targets[:, None]).squeeze(-1).cpu()
            greedy = (logprobs.argmax(-1) == targets).cpu()
            offset = 0
            for i, cont in zip(chunk, conts):
                n = len(cont)
                answer = (float(token_lp[offset:offset + n].sum()), bool(greedy[offset:offset + n].all()))
                offset += n
                results[i] = answer
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                pbar.update(1)
        pbar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-likelihoods of every token of each string, in disjoint windows of ``max_length``
        predictions after a prefix token (lm-eval's rolling windows, as its ``hf`` model uses them)."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, scores):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation

    def _sampling_params(self, kwargs: dict, until: list[str], max_gen_toks: int) -> Any:
        from litft.generate.sampling import SamplingParams

        kwargs = dict(kwargs)
        do_sample = kwargs.pop("do_sample", False)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        params = {"max_new_tokens": max_gen_toks, "stop": [s for s in until if s],
                  "temperature": temperature if do_sample else 0.0}
        for name in ("top_k", "top_p", "min_p", "repetition_penalty", "seed"):
            if name in kwargs:
                params[name] = kwargs.pop(name)
        if kwargs:
            log.warning(f"generation arguments not used by the litft model: {', '.join(kwargs)}")
        return SamplingParams(**params)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) on litft's engine: contexts encoded and left-truncated
        to max_length - max_gen_toks, text decoded without special tokens and cut at the first ``until``."""
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            room = self.max_length - max_gen_toks
            if room < 1:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for the context in "
                                 f"max_length={self.max_length}")
            params = self._sampling_params(kwargs, until, max_gen_toks)
            contexts = [requests[i].args[0] for i in indices]
            # as HFLM.tok_batch_encode: the first context decides whether a BOS is added
            bos_text = self.tok_decode([self.tokenizer.bos_id], False) if self.tokenizer.bos_id is not None \
                else None
            bos = False if bos_text and contexts[0].startswith(bos_text) else self._bos_arg(None)
            prompts = [self.tokenizer.encode(c, bos=bos)[-room:] for c in contexts]
            for i, context, request in zip(indices, contexts, self.llm.engine.generate(
                    prompts, params, max_batch_size=self.batch_size)):
                text = self.tok_decode(request.tokens, skip_special_tokens=True)
                results[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), results[i])
                pbar.update(1)
        pbar.close()
        return results  # type: ignore[return-value]
