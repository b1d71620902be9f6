"""DDP and FSDP on CPU with gloo, against one process with the same global batch: every FSDP sharding, each with
another method (LoRA full_shard; full fine-tune shard_grad_op with activation checkpointing, its final/ exported and
checked in transformers; adapter no_shard; prompt tuning full_shard; LoRA hybrid_shard on two torchrun "nodes" of
this machine), QLoRA with DDP; FSDP step checkpoints that hold only the trainable weights and resume on another
world size; bad launch settings refused before any process waits; a dead or a stuck rank ends the run with a message
instead of a hang.

The 1-process references run in this process (`litft.cli.main`, the same parser and code as the CLI); the
2-process runs are real launches: torchrun (its workers start in parallel, which halves the start-up time), and
Fabric's own launcher for the dead and stuck ranks (where rank 0 must stop the process it started). Fabric's
`--devices 2 --strategy ddp` (LoRA), torchrun and `srun -n 2` are also run, with the losses compared, by
tests/test_multinode_tutorial.py (the tutorial's commands).

Tolerance: losses per step agree to rel 1e-5 (fp32, dropout 0, the same samples per optimizer step; measured
differences are below 1e-7: the summation order of the all-reduce). QLoRA too: every rank quantizes the same
weights to the same nf4 codes, so only the LoRA gradients' summation order differs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litft.train.metrics import read_metrics
from tests.test_finetune import TEMPLATE, TINY, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    make_checkpoint(d / "base")
    rows = (TINY / "data" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
    (d / "val.jsonl").write_text("\n".join(rows[64:72]) + "\n")
    return d


def args(work: Path, out: str, *extra: str, method: str = "lora") -> list[str]:
    dropout = ["--lora.dropout", "0"] if method == "lora" else []
    return ["finetune", method, str(work / "base"), "--out_dir", str(work / out),
            "--data.train_path", str(work / "train.jsonl"), "--data.val_path", str(work / "val.jsonl"),
            "--data.format", "template", "--data.template", TEMPLATE, "--train.global_batch_size", "8",
            "--train.micro_batch_size", "2", "--train.max_steps", "4", "--train.lr", "1e-2", "--accelerator", "cpu",
            "--precision", "32-true", *dropout, *extra]


def clean_env(extra: dict | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    for k in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC", "LOCAL_WORLD_SIZE"))]:
        env.pop(k)
    return env


def run(cmd: list[str], env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def litft(work: Path, out: str, *extra: str, method: str = "lora", env: dict | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    faults = any(k.startswith("LITFT_FAULT_") for k in env or {})  # injected by tests/fault_launcher.py
    command = [sys.executable, str(REPO / "tests" / "fault_launcher.py")] if faults else [sys.executable, "-m", "litft"]
    r = run([*command, *args(work, out, *extra, method=method)], env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun`, from this interpreter


def torchrun2(work: Path, out: str, *extra: str, method: str = "lora") -> subprocess.CompletedProcess:
    """A 2-process run started by torchrun (both ranks import in parallel: about half the start-up time of Fabric's
    own launcher, which starts the second process only once the first has imported everything)."""
    r = run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "litft",
             *args(work, out, "--devices", "2", *extra, method=method)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def in_process(work: Path, out: str, *extra: str, method: str = "lora") -> dict[int, float]:
    """A 1-process run in this process (no interpreter start, no second Lightning import): the reference."""
    from litft.cli import main

    main(args(work, out, *extra, method=method))
    return losses(work / out)


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def assert_close(got: dict[int, float], want: dict[int, float], steps: list[int], rtol: float = RTOL) -> None:
    assert set(steps) <= set(got), (got, want)
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=rtol), (s, got, want)


@pytest.fixture(scope="module")
def ref(work: Path) -> dict[int, float]:
    """The 1-process LoRA run every LoRA run is compared with (its step-2 checkpoint: with the consolidated one of
    the FSDP run)."""
    got = in_process(work, "ref", "--train.save_interval", "2")
    assert sorted(got) == STEPS
    return got


@pytest.fixture(scope="module")
def fsdp2(work: Path) -> Path:
    """2-process FSDP (full_shard) LoRA run (torchrun) that saves a sharded checkpoint at step 2."""
    torchrun2(work, "fsdp2", "--strategy", "fsdp", "--train.save_interval", "2")
    return work / "fsdp2"


# ------------------------------------------------------------------------------------------ same losses
# Each FSDP sharding runs once, with a different method (method x sharding on the diagonal keeps the 2-process runs
# few): LoRA x full_shard, full x shard_grad_op (+ activation checkpointing), adapter x no_shard, LoRA x hybrid_shard.


def sharded_model_keys(step_dir: Path) -> list[str]:
    """The model entries of an FSDP step checkpoint (torch.distributed.checkpoint metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    assert (step_dir / "sharded" / ".metadata").is_file() and (step_dir / "state.pt").is_file()
    keys = FileSystemReader(str(step_dir / "sharded")).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer.state.") for k in keys)  # the optimizer state is in the shards too
    return [k for k in keys if k.startswith("model.")]


def test_lora_fsdp_full_shard_matches_one_process(fsdp2: Path, ref, work: Path) -> None:
    """LoRA, full_shard: the 1-process losses; final/ is a plain LoRA checkpoint (only the LoRA weights, equal to
    the reference's), loadable without Fabric; the step checkpoint holds the LoRA weights, not the frozen base."""
    from safetensors.torch import load_file

    from litft.checkpoint import load_checkpoint

    assert_close(losses(fsdp2), ref, STEPS)
    final = fsdp2 / "final"
    assert (final / "lora.safetensors").is_file() and not (final / "model.safetensors").exists()
    ref_lora, got_lora = load_file(work / "ref" / "final" / "lora.safetensors"), load_file(final / "lora.safetensors")
    assert ref_lora.keys() == got_lora.keys()
    for k in ref_lora:
        assert (ref_lora[k] - got_lora[k]).abs().max() < 1e-4, k
    load_checkpoint(final)
    step2 = fsdp2 / "checkpoints" / "step-2"
    keys = sharded_model_keys(step2)
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    assert not (step2 / "lora.safetensors").exists() and not (step2 / "model.safetensors").exists()


@pytest.fixture(scope="module")
def full_runs(work: Path) -> tuple[Path, Path]:
    """`finetune full --freeze_layers 1` in 1 process and with FSDP shard_grad_op + activation checkpointing on 2
    (torchrun), both saving a step checkpoint at step 2."""
    in_process(work, "full1", "--train.save_interval", "2", "--freeze_layers", "1", method="full")
    torchrun2(work, "full2", "--strategy", "fsdp", "--train.sharding", "shard_grad_op", "--freeze_layers", "1",
              "--train.activation_checkpointing", "true", "--train.save_interval", "2", method="full")
    return work / "full1", work / "full2"


def test_full_fsdp_shard_grad_op_with_activation_checkpointing(full_runs, work: Path, tmp_path: Path) -> None:
    """`finetune full`, shard_grad_op, every block recomputed in backward: the 1-process losses; final/ (consolidated
    from the shards) exports to a Hugging Face folder whose transformers logits equal litft's."""
    import torch
    from transformers import AutoModelForCausalLM

    from litft.convert.hf import convert_to_hf
    from litft.checkpoint import load_checkpoint

    assert_close(losses(work / "full2"), losses(work / "full1"), STEPS)
    final = work / "full2" / "final"
    assert (final / "model.safetensors").is_file() and not (final / "base.yaml").exists()
    hf = convert_to_hf(final, tmp_path / "hf")
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_checkpoint(final).eval()(tokens)
        theirs = AutoModelForCausalLM.from_pretrained(hf).eval()(tokens).logits
        single = load_checkpoint(work / "full1" / "final").eval()(tokens)
        base = load_checkpoint(work / "base").eval()(tokens)
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - single).abs().max() < 1e-3  # the same training on 1 and 2 processes: the same weights
    assert (ours - base).abs().max() > 1e-2  # and they did train
    from safetensors.torch import load_file

    trained, initial = load_file(final / "model.safetensors"), load_file(work / "base" / "model.safetensors")
    assert all(trained[k].equal(v) for k, v in initial.items() if k.startswith("blocks.0."))  # --freeze_layers 1
    assert not trained["blocks.1.attn.q_proj.weight"].equal(initial["blocks.1.attn.q_proj.weight"])


def test_adapter_fsdp_no_shard_matches_one_process(work: Path, tmp_path: Path) -> None:
    """LLaMA-Adapter, no_shard: the 1-process losses; the step checkpoint holds the adapter's prompts and gates (and
    their optimizer state), not the frozen base; final/ holds only the adapter weights; the step checkpoint,
    consolidated, holds the 1-process run's step-2 adapter weights."""
    from litft.convert.consolidate import consolidate

    want = in_process(work, "adapter1", "--adapter.start_layer", "0", "--train.save_interval", "2", method="adapter")
    torchrun2(work, "adapter2", "--adapter.start_layer", "0", "--strategy", "fsdp", "--train.sharding", "no_shard",
              "--train.save_interval", "2", method="adapter")
    assert_close(losses(work / "adapter2"), want, STEPS)
    keys = sharded_model_keys(work / "adapter2" / "checkpoints" / "step-2")
    assert keys and all(k.endswith((".prompt", ".gate")) for k in keys), keys
    final = work / "adapter2" / "final"
    assert (final / "adapter.safetensors").is_file() and not (final / "model.safetensors").exists()
    one = work / "adapter1" / "checkpoints" / "step-2"
    out = consolidate(work / "adapter2" / "checkpoints" / "step-2", tmp_path / "step-2")
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in one.iterdir() if f.name != "state.pt")
    same_tensors(out / "adapter.safetensors", one / "adapter.safetensors")
    same_logits(out, one)


def test_prompt_tuning_fsdp_matches_one_process(work: Path, tmp_path: Path) -> None:
    """Prompt tuning (text init, packing), full_shard: the virtual tokens run through every sharded block before the
    sequence does, so each block is called twice per forward; the 1-process losses all the same (lr 0.1: the prompt
    moves), and the step checkpoint, consolidated, holds the 1-process run's step-2 prompt. (DDP was checked the same
    way by hand: same losses and final prompt.)"""
    from litft.convert.consolidate import consolidate

    extra = ["--prompt.num_virtual_tokens", "3", "--prompt.init", "text", "--prompt.init_text", "Shout:",
             "--data.packing", "true", "--train.lr", "0.1", "--train.warmup_steps", "0", "--train.save_interval", "2"]
    want = in_process(work, "prompt1", *extra, method="prompt")
    torchrun2(work, "prompt2", *extra, "--strategy", "fsdp", method="prompt")
    assert_close(losses(work / "prompt2"), want, STEPS)
    same_tensors(work / "prompt2" / "final" / "prompt.safetensors", work / "prompt1" / "final" / "prompt.safetensors",
                 atol=1e-6)
    out = consolidate(work / "prompt2" / "checkpoints" / "step-2", tmp_path / "step-2")
    same_tensors(out / "prompt.safetensors", work / "prompt1" / "checkpoints" / "step-2" / "prompt.safetensors",
                 atol=1e-6)
    same_logits(out, work / "prompt1" / "checkpoints" / "step-2")


@pytest.mark.slow
def test_moe_lora_fsdp_matches_one_process(work: Path, tmp_path: Path) -> None:
    """Qwen3-MoE (4 experts, top-2, a dense layer after the MoE one), LoRA on attention, the dense MLP and every
    expert, full_shard on 2 processes: the 1-process losses (each rank routes its own tokens; the experts a rank's
    tokens miss get no gradient there, and the sharded gradients still agree)."""
    from litft.zoo import family_for

    moe = tmp_path / "moe"
    make_checkpoint(moe / "base", hf_model_type="qwen3_moe", **family_for("qwen3_moe").traits, n_expert=4,
                    n_expert_per_token=2, moe_intermediate_size=24, moe_dense_layers=[1])
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copy(work / name, moe / name)
    targets = ["--lora.targets", "[all-linear]"]
    want = in_process(moe, "moe1", *targets)
    torchrun2(moe, "moe2", *targets, "--strategy", "fsdp")
    assert_close(losses(moe / "moe2"), want, STEPS)
    same_tensors(moe / "moe2" / "final" / "lora.safetensors", moe / "moe1" / "final" / "lora.safetensors", atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lora_hybrid_shard_on_two_torchrun_nodes(ref, work: Path) -> None:
    """`torchrun --nnodes 2` twice on this machine (node ranks 0 and 1, rendezvous on 127.0.0.1) with
    --num_nodes 2: hybrid_shard's 2-D mesh (replicate across the 2 nodes x shard over 1 device each) trains."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "litft",
               *args(work, "hybrid", "--devices", "1", "--num_nodes", "2", "--strategy", "fsdp",
                     "--train.sharding", "hybrid_shard")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "MEMBER: 2/2" in outputs[1]  # the second "node" joined as global rank 1
    assert_close(losses(work / "hybrid"), ref, STEPS)


def test_qlora_with_ddp_matches_one_process(work: Path) -> None:
    pytest.importorskip("bitsandbytes")
    want = in_process(work, "qlora1", "--quantize", "bnb.nf4")
    torchrun2(work, "qlora2", "--quantize", "bnb.nf4", "--strategy", "ddp")
    assert_close(losses(work / "qlora2"), want, STEPS)
    assert (work / "qlora2" / "final" / "lora.safetensors").is_file()


def test_a_controller_stops_both_ranks_at_the_same_step(ref, work: Path) -> None:
    """A `train.controllers` rule reads the all-reduced loss and gradient norm, so both ranks stop at the step the
    1-process run shows it first holds (ranks that disagreed would hang in the next all-reduce, not finish)."""
    k = next(s for s in STEPS[1:] if ref[s] < min(ref[j] for j in STEPS if j < s))  # a new lowest loss
    low = min(ref[j] for j in STEPS if j < k)
    assert low - ref[k] > 1e-4 * low, ref  # a margin far above the 1e-7 by which the 2-process losses differ
    rule = f"loss < {(ref[k] + low) / 2!r} and grad_norm > 0"
    torchrun2(work, "ctl2", "--strategy", "ddp", "--train.controllers", f'[{{"rule": "{rule}"}}]')
    summary = list(read_metrics(work / "ctl2"))[-1]
    assert summary["final_step"] == k and summary["stop_reason"].startswith("train.controllers[0]")
    assert_close(losses(work / "ctl2"), ref, list(range(1, k + 1)))


# ------------------------------------------------------------------------------------------ resume


def test_sharded_checkpoint_resumes_on_another_world_size(fsdp2: Path, ref, work: Path) -> None:
    # written by 2 processes, resumed by 1 (which saves at step 3) ...
    shutil.copytree(fsdp2, work / "to1")
    shutil.rmtree(work / "to1" / "final")
    litft(work, "to1", "--strategy", "fsdp", "--train.save_interval", "3",
          "--resume", str(work / "to1" / "checkpoints" / "step-2"))
    assert_close(losses(work / "to1"), ref, [3, 4])
    # ... and its step 3, written by 1 process, resumed by 2
    shutil.copytree(work / "to1", work / "to2")
    shutil.rmtree(work / "to2" / "final")
    torchrun2(work, "to2", "--strategy", "fsdp", "--resume", str(work / "to2" / "checkpoints" / "step-3"))
    assert_close(losses(work / "to2"), ref, [4])


# ------------------------------------------------------------------------------------------ consolidation


def same_tensors(got: Path, want: Path, atol: float = 1e-4) -> None:
    from safetensors.torch import load_file

    a, b = load_file(got), load_file(want)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] - b[k]).abs().max() < atol, k


def same_logits(got: Path, want: Path) -> None:
    import torch

    from litft.checkpoint import load_checkpoint

    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_checkpoint(got).eval()(tokens) - load_checkpoint(want).eval()(tokens)).abs().max() < 1e-4


def test_consolidate_lora_fsdp_step_checkpoint(fsdp2: Path, ref, work: Path, tmp_path: Path, capsys) -> None:
    """The LoRA step checkpoint written by 2 FSDP processes: refused by what loads a checkpoint, with the command to
    run; `litft convert consolidate` (in place) writes the files the 1-process run's step-2 checkpoint holds, with
    the same weights; it then generates (CLI and LLM.load), a second consolidation needs --overwrite, and it still
    resumes."""
    from litft import LLM
    from litft.cli import main
    from litft.checkpoint import load_checkpoint

    shutil.copytree(fsdp2, tmp_path / "run", ignore=shutil.ignore_patterns("final", "logs"))
    step = tmp_path / "run" / "checkpoints" / "step-2"
    want = work / "ref" / "checkpoints" / "step-2"
    hint = f"Run `litft convert consolidate {step}`"
    with pytest.raises(FileNotFoundError, match=re.escape(hint)):
        load_checkpoint(step)
    with pytest.raises(FileNotFoundError, match=re.escape(hint)):
        LLM.load(step, device="cpu")
    for command in (["generate", str(step), "--prompt", "hi"], ["convert", "to_hf", str(step), str(tmp_path / "hf")]):
        with pytest.raises(SystemExit):
            main(command)
        assert hint in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

    main(["convert", "consolidate", str(step)])
    assert {f.name for f in step.iterdir()} == {f.name for f in want.iterdir()} | {"sharded"}
    same_tensors(step / "lora.safetensors", want / "lora.safetensors")
    for name in ("lora.yaml", "base.yaml", "model_config.yaml", "tokenizer.json"):
        assert (step / name).read_text() == (want / name).read_text(), name
    assert (step / "sharded" / ".metadata").is_file() and (step / "state.pt").is_file()  # it still resumes
    same_logits(step, want)
    capsys.readouterr()
    main(["generate", str(step), "--prompt", "Shout: hi\nAnswer:", "--max_new_tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out
    text = LLM.load(step, device="cpu").generate("Shout: hi\nAnswer:", max_new_tokens=6)
    assert text and text in printed

    with pytest.raises(SystemExit):
        main(["convert", "consolidate", str(step)])
    assert f"{step} already holds weights (lora.safetensors): it was consolidated before" in capsys.readouterr().err
    main(["convert", "consolidate", str(step), "--overwrite", "true"])
    same_tensors(step / "lora.safetensors", want / "lora.safetensors")
    # the shards stayed as they were: the consolidated checkpoint resumes (1 process) with the reference's losses
    litft(work, str(tmp_path / "run"), "--strategy", "fsdp", "--resume", str(step))
    assert_close(losses(tmp_path / "run"), ref, [3, 4])


def test_consolidate_full_fsdp_step_checkpoint(full_runs, tmp_path: Path) -> None:
    """The full fine-tune's step checkpoint written by 2 FSDP processes (shard_grad_op), consolidated into a
    standalone --out_dir: model.safetensors equal to the 1-process run's step 2, loadable and exportable."""
    from litft import LLM
    from litft.convert.consolidate import consolidate
    from litft.convert.hf import convert_to_hf

    one, two = (d / "checkpoints" / "step-2" for d in full_runs)
    out = consolidate(two, tmp_path / "step-2")
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in one.iterdir() if f.name != "state.pt")
    same_tensors(out / "model.safetensors", one / "model.safetensors")
    assert not (two / "model.safetensors").exists()  # the step checkpoint itself is untouched
    same_logits(out, one)
    assert LLM.load(out, device="cpu").generate("Shout: hi", max_new_tokens=4)
    assert (convert_to_hf(out, tmp_path / "hf") / "config.json").is_file()
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite true"):
        consolidate(two, tmp_path / "step-2")


def test_consolidate_refuses_what_is_not_an_fsdp_step_checkpoint(ref, work: Path, tmp_path: Path) -> None:
    from litft.convert.consolidate import consolidate

    with pytest.raises(ValueError, match=r"base is not an FSDP step checkpoint \(no sharded/ directory\): it holds "
                                         r"its weights already \(model.safetensors\) and loads as it is"):
        consolidate(work / "base", tmp_path / "a")
    with pytest.raises(ValueError, match=r"step-2 is not an FSDP step checkpoint \(no sharded/ directory\): it "
                                         r"holds its weights already \(lora.safetensors\)"):
        consolidate(work / "ref" / "checkpoints" / "step-2", tmp_path / "b")
    with pytest.raises(ValueError, match=r"ref is a run directory, not a step checkpoint: pass one of its "
                                         r"checkpoints/step-N directories \(its step checkpoints: .*step-2"):
        consolidate(work / "ref", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not an FSDP step checkpoint \(no sharded/.metadata and no "
                                         r"state.pt\)"):
        consolidate(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        consolidate(tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ------------------------------------------------------------------------------------------ dead and stuck ranks


def test_dead_rank_ends_the_run(work: Path) -> None:
    t0 = time.monotonic()
    r = litft(work, "dead", "--devices", "2", "--train.timeout", "20", env={"LITFT_FAULT_DIE": "1:2"}, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 1: exiting at step 2" in out
    assert "another process of this run died" in out, out[-3000:]
    assert time.monotonic() - t0 < 100
    assert not (work / "dead" / "final").exists()


def test_stuck_rank_times_out(work: Path) -> None:
    """Rank 1 sleeps at step 2, outside any collective: rank 0 waits train.timeout in its all-reduce, then stops
    with a message naming the option, and stops rank 1 (Fabric started it) instead of leaving it behind."""
    timeout = 8
    t0 = time.monotonic()
    r = litft(work, "stuck", "--devices", "2", "--train.timeout", str(timeout), env={"LITFT_FAULT_HANG": "1:2"},
              check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "rank 1: hanging at step 2" in out
    assert ("litft finetune lora: error: rank 0: a collective operation (all-reduce, barrier or FSDP gather) "
            f"waited train.timeout={timeout} ({timeout} s) for the other processes and got no answer") in out, \
        out[-3000:]
    assert "raise --train.timeout" in out
    assert "rank 0: stopping rank 1" in out
    # subprocess.run returned, so rank 1 (which shared the output pipes) is gone too; the run took about start-up
    # + timeout + the 5 s grace, not the hour rank 1 sleeps
    assert time.monotonic() - t0 < 150
    assert not (work / "stuck" / "final").exists()


# ------------------------------------------------------------------------------------------ bad input


def test_torchrun_devices_must_match_nproc(work: Path) -> None:
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "litft",
           *args(work, "bad_torchrun", "--devices", "1")]
    r = run(cmd, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert out.count("error: torchrun started 2 processes per node (--nproc-per-node) but devices=1: pass --devices "
                     "2 (or auto)") == 2, out[-3000:]  # every rank refuses, before any collective
    assert not (work / "bad_torchrun").exists()


def _finetune(work: Path, out: str, **kw):
    from litft.data import DataArgs
    from litft.finetune.lora import finetune_lora
    from litft.peft import LoRAArgs
    from litft.train.args import TrainArgs

    data = DataArgs(train_path=work / "train.jsonl", val_path=work / "val.jsonl", format="template",
                    template=TEMPLATE)
    train = kw.pop("train", TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1))
    return finetune_lora(work / "base", out_dir=work / out, data=data, train=train, lora=LoRAArgs(dropout=0.0),
                         accelerator="cpu", precision="32-true", **kw)


def test_too_many_devices(work: Path) -> None:
    from litft.train.strategy import cpu_process_limit

    with pytest.raises(ValueError, match=r"devices=.* is more than this machine has: \d+ CPU core"):
        _finetune(work, "bad1", devices=cpu_process_limit() + 1)
    assert not (work / "bad1").exists()


def test_num_nodes_inconsistent_with_slurm(work: Path, monkeypatch) -> None:
    for k, v in {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
                 "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NAME": "litft"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="num_nodes=2 does not match the Slurm allocation.*--num_nodes 1"):
        _finetune(work, "bad2", devices=2, num_nodes=2)
    with pytest.raises(ValueError, match="devices=1 does not match the Slurm allocation.*--devices 2"):
        _finetune(work, "bad2", devices=1)
    assert not (work / "bad2").exists()


def test_multinode_without_launcher(work: Path, monkeypatch) -> None:
    for k in ("MASTER_ADDR", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="num_nodes=2 but this process was not started by srun or torchrun"):
        _finetune(work, "bad3", num_nodes=2)


def test_strategy_the_method_cannot_use(work: Path) -> None:
    from litft.train.args import TrainArgs

    with pytest.raises(ValueError, match="hybrid_shard.*needs num_nodes >= 2"):
        _finetune(work, "bad4", strategy="fsdp",
                  train=TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1, sharding="hybrid_shard"))
    with pytest.raises(ValueError, match="train.timeout='soon' is invalid"):
        _finetune(work, "bad4", train=TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1, timeout="soon"))
    assert not (work / "bad4").exists()


def test_qlora_fsdp_refused_before_any_process_starts(work: Path) -> None:
    """QLoRA is known to the method before anything loads: the refusal comes from the launching process, before
    Fabric starts the others (nothing can hang) and before the model is read."""
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="strategy='fsdp' cannot shard a bitsandbytes-quantized base.*--strategy ddp"):
        _finetune(work, "bad5", devices=2, strategy="fsdp", quantize="bnb.nf4")
    assert not (work / "bad5").exists()
