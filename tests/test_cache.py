"""The generation cache (litft/cache.py): chunked prefill and decode through the cache give transformers' logits on
full and sliding-window layers (window shorter than the sequence), rows keep their state through copy, move, shift
and reset, the memory estimate is what is allocated, and the engine only goes through the cache's interface."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from litft.cache import ChunkedKVCache, KVCache, ModelCache, SharedKVCache, SlidingKVCache
from litft.convert.hf import convert_from_hf
from litft.weights import load_model
from tests.hf_models import make_hf_model

TOL = 1e-4
ENGINE = Path(__file__).resolve().parents[1] / "litft" / "generate" / "engine.py"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Gemma 3: sliding (window 4), full and sliding layers; transformers' model and litft's."""
    d = tmp_path_factory.mktemp("gemma3")
    hf = make_hf_model("gemma3", d / "hf")
    return hf, load_model(convert_from_hf(d / "hf", d / "native")).eval()


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Llama 4: chunked (chunks of 4), full NoPE and chunked layers; transformers' model and litft's."""
    d = tmp_path_factory.mktemp("llama4")
    hf = make_hf_model("llama4", d / "hf")
    return hf, load_model(convert_from_hf(d / "hf", d / "native")).eval()


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Gemma 4: sliding (window 4) and full layers with bigger heads, the last sliding and full layers
    KV-shared with layers 3 and 2; transformers' model and litft's."""
    d = tmp_path_factory.mktemp("gemma4")
    hf = make_hf_model("gemma4", d / "hf")
    return hf, load_model(convert_from_hf(d / "hf", d / "native")).eval()


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Qwen3.5: three Gated DeltaNet linear layers (a convolution window and a recurrent state each) before a
    full-attention layer; transformers' model and litft's."""
    d = tmp_path_factory.mktemp("qwen3_5")
    hf = make_hf_model("qwen3_5", d / "hf")
    return hf, load_model(convert_from_hf(d / "hf", d / "native")).eval()


def _ids(n: int, rows: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def test_the_model_makes_one_cache_per_layer_of_its_kind(gemma3) -> None:
    _, model = gemma3
    cache = model.make_cache(rows=2, length=20)
    assert model.config.layer_types == ["sliding", "full", "sliding"]
    assert [type(layer) for layer in cache.layers] == [SlidingKVCache, KVCache, SlidingKVCache]
    # sliding layers keep their window of 4 slots (a ring), full layers every slot
    assert [layer.k.shape[2] for layer in cache.layers] == [4, 20, 4]
    allocated = sum(buf.numel() * buf.element_size() for buf in cache.buffers())
    assert model.cache_bytes_per_row(20) * 2 == allocated


def test_chunked_layers_hold_one_chunk(llama4) -> None:
    _, model = llama4
    cache = model.make_cache(rows=2, length=20)
    assert model.config.layer_types == ["chunked", "full", "chunked"]
    assert [type(layer) for layer in cache.layers] == [ChunkedKVCache, KVCache, ChunkedKVCache]
    assert [layer.k.shape[2] for layer in cache.layers] == [4, 20, 4]
    allocated = sum(buf.numel() * buf.element_size() for buf in cache.buffers())
    assert model.cache_bytes_per_row(20) * 2 == allocated


def test_input_pos_without_a_cache_is_a_clear_error(gemma3) -> None:
    _, model = gemma3
    with pytest.raises(ValueError, match=r"input_pos and cache go together: pass both \(cache=model.make_cache"):
        model(_ids(3), input_pos=torch.arange(3))
    with pytest.raises(ValueError, match="input_pos and cache go together"):
        model(_ids(3), cache=model.make_cache(1, 8))


def test_the_memory_budget_counts_what_is_allocated(gemma3) -> None:
    """The engine sizes ``--kv_cache_memory`` with the caches' own sizes: sliding layers cost their window only."""
    from litft.generate.engine import Engine

    _, model = gemma3
    engine = Engine(model, max_seq_length=20)
    row = engine.kv_cache_bytes_per_row
    per_slot = 2 * model.config.n_query_groups * model.config.head_size * 4  # one layer's k and v, float32
    assert row == per_slot * (20 + 4 + 4)  # the full layer holds 20 slots, each sliding layer 4
    assert engine.kv_cache_rows(3 * row + row // 2, max_rows=8) == 3
    engine.allocate(3, 20)
    assert sum(buf.numel() * buf.element_size() for buf in engine.cache.buffers()) == 3 * row
    # the longest row a budget holds: 10 slots cost per_slot * (10 + 4 + 4)
    assert engine.kv_cache_longest_row(per_slot * 18) == 10 and engine.kv_cache_longest_row(per_slot * 18 - 1) == 9
    assert engine.kv_cache_longest_row(per_slot * 2) == 0


def test_kv_shared_layers_hold_nothing_and_read_their_source(gemma4) -> None:
    """Gemma 4's KV-shared layers get a view of their source layer's cache: no buffers, no bytes in the estimate,
    the source's key slots; the full layers' cache has their own key/value heads and head size."""
    _, model = gemma4
    cache = model.make_cache(rows=2, length=20)
    assert model.config.layer_types == ["sliding", "sliding", "full", "sliding", "sliding", "full"]
    assert [type(layer) for layer in cache.layers] == [SlidingKVCache] * 2 + [KVCache, SlidingKVCache,
                                                                              SharedKVCache, SharedKVCache]
    assert cache.layers[4].source is cache.layers[3] and cache.layers[5].source is cache.layers[2]
    assert not list(cache.layers[4].buffers()) and not list(cache.layers[5].buffers())
    assert cache.layers[2].k.shape[-1] == 16 and cache.layers[0].k.shape[-1] == 8
    slots = torch.tensor([6])
    assert torch.equal(cache.layers[4].key_slots(slots), cache.layers[3].key_slots(slots))
    allocated = sum(buf.numel() * buf.element_size() for buf in cache.buffers())
    assert model.cache_bytes_per_row(20) * 2 == allocated


@pytest.mark.parametrize("variant", ["gemma3", "llama4", "gemma4", "qwen3_5"])
@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_prefill_and_decode_through_the_cache_equal_transformers(variant: str, chunk: int, request) -> None:
    """A 9-token prompt prefilled ``chunk`` tokens at a time (chunks shorter and longer than the window or
    attention chunk of 4), then 5 decode steps (the ring wraps around several times): every position's logits equal
    transformers' full forward."""
    hf, model = request.getfixturevalue(variant)
    idx = _ids(14, rows=2)
    with torch.no_grad():
        theirs = hf(idx).logits
        cache = model.make_cache(rows=2, length=16)
        pieces = [model(idx[:, a:min(a + chunk, 9)], input_pos=torch.arange(a, min(a + chunk, 9)), cache=cache)
                  for a in range(0, 9, chunk)]
        pieces += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache) for t in range(9, 14)]
    assert (torch.cat(pieces, dim=1) - theirs).abs().max().item() <= TOL


def _decode_logits(model, cache: ModelCache, token: int, slot: int, start: int) -> torch.Tensor:
    """Logits of ``token`` decoded into row 0 at ``slot``, the row's sequence starting at slot ``start``."""
    segments = torch.zeros(1, cache.length, dtype=torch.long)
    segments[0, start:slot + 1] = 1
    return model(torch.tensor([[token]]), input_pos=torch.tensor([slot]), positions=torch.tensor([[slot - start]]),
                 segment_ids=segments, cache=cache)[0, -1]


@pytest.mark.parametrize("variant", ["gemma3", "llama4", "gemma4", "qwen3_5"])
def test_rows_copied_in_moved_and_shifted_keep_their_sequence(variant: str, request) -> None:
    """A prompt prefilled into a cache of its own, copied into row 2 at slot 3, moved to row 0 and shifted back to
    slot 0 (every row's slots shift), then decoded: the logits are transformers' for the whole sequence (Llama 4's
    chunks and query temperature follow the row's positions, not its slots; Qwen3.5's linear layers carry their state
    along with the row, whatever its slots). Reset empties only its rows."""
    hf, model = request.getfixturevalue(variant)
    idx = _ids(10)
    with torch.no_grad():
        theirs = hf(idx).logits[0, -1]
        prompt = model.make_cache(rows=1, length=9)
        model(idx[:, :9], input_pos=torch.arange(9), cache=prompt)
        main = model.make_cache(rows=3, length=16)
        other = model.make_cache(rows=1, length=16)
        model(_ids(16, seed=4), input_pos=torch.arange(16), cache=other)
        main.copy_rows_from(other, torch.tensor([1]), 0)  # row 1: another sequence, which must stay as it is
        main.copy_rows_from(prompt, torch.tensor([2]), 3)
        main.move_rows(torch.tensor([2]), torch.tensor([0]))
        # on a copy: a linear layer's state would take the same token twice
        assert (_decode_logits(model, copy.deepcopy(main), idx[0, 9].item(), 12, 3) - theirs).abs().max() <= TOL
        main.shift_slots(3, 12, -3)
        assert (_decode_logits(model, main, idx[0, 9].item(), 9, 0) - theirs).abs().max() <= TOL
    row_1 = [buf[1].clone() for buf in main.buffers()]
    main.reset_rows(torch.tensor([0, 2]))
    assert all(not buf[[0, 2]].any() and torch.equal(buf[1], kept) for buf, kept in zip(main.buffers(), row_1))
    assert any(kept.any() for kept in row_1)



# ---------------------------------------------------------------------- the engine only goes through the interface

CACHE_OPERATIONS = {"copy_rows_from", "move_rows", "reset_rows", "shift_slots", "dtype"}


def _chain(node: ast.AST) -> list[str]:
    """The names of an attribute chain, root first (``self.model.x[i]`` → self, model, x)."""
    names = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return names[::-1]


def test_the_engine_never_assigns_model_attributes_nor_touches_cache_tensors() -> None:
    tree = ast.parse(ENGINE.read_text())
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, (ast.Attribute, ast.Subscript)):
                    chain = _chain(part)
                    where = f"engine.py:{node.lineno}: {ast.unparse(target)}"
                    # only the engine's own attributes (self.x, self.x[i]) and requests' (r.x) are assigned
                    assert len(chain) <= 2 and not {"model", "block", "cache"} & set(chain[:1]), where
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"setattr", "delattr"}, f"engine.py:{node.lineno}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"blocks", "layers", "kv_cache", "attn"}, f"engine.py:{node.lineno}: {node.attr}"
            if isinstance(node.value, ast.Attribute) and node.value.attr == "cache":
                assert node.attr in CACHE_OPERATIONS, f"engine.py:{node.lineno}: cache.{node.attr}"
