"""The structure the code keeps (issue 16): short functions, method names compared only in the method registry, no
import cycle between ``convert/`` and ``finetune/``, inference that never imports training, no test hooks in
production code; and the registry's ``reference_off`` against the base model it must reproduce."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from litft.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "litft"
MAX_FUNCTION_LINES = 150
REGISTRY = PACKAGE / "methods.py"
INFERENCE = ("litft.generate", "litft.serve", "litft.evaluate", "litft.api")
TRAINING = ("litft.train", "litft.finetune")


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "config_hub" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every litft module ``path`` imports, at the top or inside a function (``from litft.x import y`` gives
    litft.x and, when it is a module, litft.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("litft")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("litft"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_function_is_longer_than_150_lines() -> None:
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 150 lines: " + ", ".join(long)


def _method_constants(node: ast.AST) -> set[str]:
    """The method names among the string constants of ``node`` (a constant, or a tuple/list/set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in METHODS}


def test_no_method_name_is_compared_outside_the_registry() -> None:
    """``x == "lora"``, ``base["method"] in ("adapter", "prompt")`` and the like only in litft/methods.py. "full" is
    also an attention kind and an activation-checkpointing mode: it counts where the other side names a method."""
    found = []
    for path in sources():
        if path == REGISTRY:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Compare):
                continue
            names = set().union(*(_method_constants(n) for n in [node.left, *node.comparators]))
            about_methods = "method" in (ast.get_source_segment(text, node) or "")
            if names - {"full"} or (names and about_methods):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.get_source_segment(text, node)}")
    assert not found, "method names compared outside litft/methods.py: " + "; ".join(found)


def test_convert_and_finetune_do_not_import_each_other() -> None:
    cycle = []
    for package, other in (("convert", "litft.finetune"), ("finetune", "litft.convert")):
        for path in sorted((PACKAGE / package).glob("*.py")):
            cycle += [f"{path.relative_to(ROOT)} imports {m}" for m in imported_modules(path) if m.startswith(other)]
    assert not cycle, "; ".join(cycle)


def test_inference_never_imports_training() -> None:
    """Following every import (top-level and inside functions) from generate/, serve/, evaluate/ and api.py through
    litft's own modules never reaches litft.train or litft.finetune."""
    modules = {module_name(p): p for p in sources()}
    start = [m for m in modules if m.startswith(INFERENCE)]
    assert len(start) > 5
    seen, todo, parent = set(start), list(start), {}
    while todo:
        name = todo.pop()
        for imported in imported_modules(modules[name]):
            if imported in modules and imported not in seen:
                seen.add(imported)
                parent[imported] = name
                todo.append(imported)
    reached = sorted(m for m in seen if m.startswith(TRAINING))

    def chain(m: str) -> str:
        return m if m not in parent else f"{chain(parent[m])} -> {m}"

    assert not reached, "inference imports training: " + "; ".join(chain(m) for m in reached)


def test_inference_imports_no_training_module_at_run_time(tmp_path: Path) -> None:
    """The same, as Python sees it: loading a checkpoint with ``LLM`` and importing the servers leaves no
    litft.train / litft.finetune module in ``sys.modules``."""
    import subprocess
    import sys

    code = ("import sys; from litft import LLM; import litft.generate.cli, litft.serve.app, litft.evaluate.harness; "
            f"LLM.load({str(PACKAGE / 'assets' / 'tiny' / 'base')!r}, device='cpu'); "
            "print(sorted(m for m in sys.modules if m.startswith(('litft.train', 'litft.finetune'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_no_test_hooks_in_production_code() -> None:
    hooks = []
    for path in sources():
        text = path.read_text()
        hooks += [f"{path.relative_to(ROOT)}: {word}" for word in ("LITFT_TEST", "LITFT_FAULT", "test_hook",
                                                                    "_test_delay") if word in text]
    assert not hooks, "; ".join(hooks)


# ------------------------------------------------------------------------------------------ reference_off


def _trained(name: str, model: torch.nn.Module) -> None:
    """Apply the method with non-trivial weights, so that it changes the model's output."""
    from litft.peft import AdapterArgs, LoRAArgs, PromptTuningArgs, apply_adapter, apply_lora, apply_prompt_tuning

    if name == "lora":
        apply_lora(model, LoRAArgs(r=2, alpha=4, targets=["all-linear"], use_dora=True))
    elif name == "adapter":
        apply_adapter(model, AdapterArgs(prompt_length=3, start_layer=0))
    else:
        apply_prompt_tuning(model, PromptTuningArgs(num_virtual_tokens=3, init="random"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("name", [n for n, kind in METHODS.items() if kind.reference_off is not None])
def test_reference_off_computes_the_base_model(name: str) -> None:
    """Under its entry's ``reference_off`` a prepared model gives the logits of the base model it was prepared
    from (loaded again, untouched); outside it, its own."""
    from litft.checkpoint import load_checkpoint

    tiny = PACKAGE / "assets" / "tiny" / "base"
    base = load_checkpoint(tiny).eval()
    model = load_checkpoint(tiny)
    _trained(name, model)
    model.eval()  # the layers the method added too (LoRA dropout)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        expected = base(ids)
        changed = model(ids)
        with METHODS[name].reference_off(model):
            reference = model(ids)
        after = model(ids)
    assert not torch.allclose(changed, expected, atol=1e-3)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, changed, atol=0, rtol=0)
