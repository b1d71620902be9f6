"""``litft evaluate <checkpoint> --tasks t1,t2``: EleutherAI's lm-eval harness on litft's own model.

:class:`LitftLM` is an lm-eval model class (registered as ``litft``) backed by a :class:`litft.LLM`: the
log-likelihoods come from the native forward pass and ``generate_until`` runs on litft's generation engine,
so a checkpoint, a Hugging Face folder or a fine-tune run's ``final/`` is evaluated as it is, without
converting or merging. Tokenisation of context/continuation pairs, the BOS/prefix-token handling, truncation
and rolling windows follow lm-eval's own ``hf`` backend, so both give the same scores on the same weights.

Python::

    from litft.evaluate.harness import LitftLM          # importing LitftLM registers the "litft" model
    import lm_eval
    lm_eval.simple_evaluate(model=LitftLM(pretrained="checkpoints/my-model"), tasks=["hellaswag"])
    lm_eval.simple_evaluate(model="litft", model_args="pretrained=out/lora/final", tasks=["arc_easy"])

lm-eval is the ``evaluate`` extra (``pip install 'litft[evaluate]'``); it is imported only here and only when
a harness command runs.
"""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path
from typing import Any, Optional

TASK_LIST_WORDS = ("", "list")  # `--tasks` with no value (or lm-eval's `--tasks list`) lists the tasks


def _import_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"litft evaluate needs lm-eval (the evaluate extra): pip install 'litft[evaluate]' "
                           f"({e})") from None


def __getattr__(name: str) -> Any:
    # LitftLM subclasses lm-eval's TemplateLM, so it is built (and registered) on first access: importing this
    # module stays cheap and works without lm-eval
    if name == "LitftLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lm_class() -> type:
    _import_lm_eval()
    from litft.evaluate.lm import LitftLM  # registers lm-eval's "litft" model on first import

    return LitftLM


# ---------------------------------------------------------------------- tasks


def task_manager(include_path: Optional[str] = None, include_defaults: bool = True) -> Any:
    """An lm-eval TaskManager over the built-in tasks and local task folders/YAMLs (comma-separated paths)."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [p for p in (include_path or "").split(",") if p]
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"--include_path {p}: no such file or directory")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def resolve_tasks(names: str, manager: Any) -> list[str]:
    """Task names (globs expanded, YAML paths kept) from a comma-separated ``--tasks``; an unknown name raises
    ValueError listing the closest known names."""
    known = manager.all_tasks
    resolved = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            resolved.append(name)
            continue
        matches = fnmatch.filter(known, name) if any(c in name for c in "*?[") else []
        if matches:
            resolved.extend(matches)
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        close += [t for t in known if name in t and t not in close][: 5 - len(close)]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Run `litft evaluate --tasks` to list the tasks "
                         f"(add --include_path DIR for local task YAMLs).")
    if not resolved:
        raise ValueError("no task given: pass --tasks t1,t2 (or a bare --tasks to list them)")
    return list(dict.fromkeys(resolved))


def list_tasks(manager: Any) -> str:
    """Groups, tasks and tags known to ``manager``, one name per line under a heading."""
    lines = []
    for title, names in (("groups", manager.all_groups), ("tasks", manager.all_subtasks), ("tags", manager.all_tags)):
        lines.append(f"# {title} ({len(names)})")
        lines += list(names)
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command


def evaluate(
    checkpoint_dir: Optional[Path] = None,
    *,
    tasks: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
    limit: Optional[float] = None,
    seed: int = 1234,
    out: Optional[Path] = None,
    include_path: Optional[str] = None,
    include_defaults: bool = True,
    max_length: Optional[int] = None,
    max_gen_toks: int = 256,
    apply_chat_template: Optional[bool] = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
    device: str = "auto",
    precision: Optional[str] = None,
) -> Optional[dict[str, Any]]:
    """Evaluate a checkpoint on lm-eval tasks with litft's own model: ``litft evaluate <checkpoint> --tasks t1,t2``
    (a bare ``--tasks`` lists the tasks). LoRA runs are evaluated as they are, without merging.

    Local tasks: ``--include_path DIR`` with task YAMLs whose data are local files (``dataset_path: json`` +
    ``dataset_kwargs: {data_files: ...}``) run offline.

    Args:
        checkpoint_dir: A litft checkpoint, a Hugging Face model folder, a fine-tune run's ``final/`` or an
            asset card's name (may be given as the first argument).
        tasks: Comma-separated task/group names, globs (``"arc_*"``) or task YAML paths; no value lists tasks.
        num_fewshot: Few-shot examples per prompt (default: each task's own).
        batch_size: Requests per forward pass / rows generating together.
        limit: At most this many examples per task (a fraction < 1 = that share of each task).
        seed: Seed for few-shot sampling, Python, NumPy and torch.
        out: Write the results JSON here (lm-eval's results, configs and versions).
        include_path: Comma-separated folders (or YAML files) with extra task definitions.
        include_defaults: Also index lm-eval's built-in tasks (false: only --include_path ones; faster start).
        max_length: Longest context in tokens (default: the model's ``block_size``, less the virtual tokens of a
            prompt-tuned model).
        max_gen_toks: Default most new tokens for generation tasks that do not set their own.
        apply_chat_template: Format prompts with the tokenizer's chat template (instruction-tuned models).
            Default: as the run that wrote the checkpoint rendered its rows (``final/prompt_format.yaml``): true
            for a run trained on chat messages, false for other runs and for checkpoints that are not a run's.
        log_samples: Also write every request and response into the results JSON.
        bootstrap_iters: Bootstrap resamples for the stderr of non-mean metrics (0 = skip them).
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``bf16-true``, ``16-true`` or ``32-true``; default bf16 on a GPU, fp32 on the CPU.

    Returns:
        lm-eval's results dict (None when listing tasks).
    """
    if checkpoint_dir is not None:
        from litft.asset_cards import resolve_checkpoint

        checkpoint_dir = resolve_checkpoint(checkpoint_dir)  # a folder, or the name of an asset card
    if checkpoint_dir is not None and not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint directory (a litft checkpoint, a Hugging Face "
                                f"model folder or a run's final/; hub names are not fetched: `litft download` first)")
    manager = task_manager(include_path, include_defaults)
    if tasks is None or tasks.strip() in TASK_LIST_WORDS:
        if tasks is None and checkpoint_dir is not None:
            raise ValueError("no task given: pass --tasks t1,t2 (a bare --tasks lists them)")
        print(list_tasks(manager))
        return None
    names = resolve_tasks(tasks, manager)
    if checkpoint_dir is None:
        raise ValueError("no checkpoint given: litft evaluate <checkpoint> --tasks " + ",".join(names))
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from litft.evaluate import write_json

    if limit is not None and limit >= 1:
        limit = int(limit)
    if apply_chat_template is None:
        from litft.data.formats import PromptFormat

        run_format = PromptFormat.load(Path(checkpoint_dir))
        apply_chat_template = run_format is not None and run_format.format == "chat"
    model = _lm_class()(pretrained=str(checkpoint_dir), batch_size=batch_size, max_length=max_length,
                        max_gen_toks=max_gen_toks, device=device, precision=precision)
    results = lm_eval.simple_evaluate(
        model=model, tasks=names, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
        task_manager=manager, log_samples=log_samples, apply_chat_template=apply_chat_template,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters,
    )
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if out is not None:
        import json

        write_json(json.loads(json.dumps(results, default=handle_non_serializable)), out)
        print(f"results written to {out}")
    return results


def _cli_argv(argv: list[str]) -> list[str]:
    """`litft evaluate CKPT ...` → `--checkpoint_dir CKPT ...`; a bare `--tasks` (last, or followed by another
    option) → `--tasks=` (list the tasks)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv[0:1] = ["--checkpoint_dir", argv[0]]
    for i, arg in enumerate(argv):
        if arg == "--tasks" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv[i] = "--tasks="
    return argv


evaluate.cli_argv = _cli_argv  # type: ignore[attr-defined]  (see litft.cli.main)
