"""How a run spreads over devices and nodes: the Fabric strategy (single device, DDP, FSDP), the launcher that
started the processes (Fabric itself, torchrun, or Slurm's srun), and the checks that refuse impossible set-ups
before any process starts (so nothing hangs waiting for a rank that never comes).

FSDP is FSDP2 (``torch.distributed.fsdp.fully_shard``) through Fabric's ``ModelParallelStrategy``, not FSDP1
(``FSDPStrategy``), because:

- Fabric 2.6 refuses ``FSDPStrategy`` on anything but CUDA ("FSDP is only available on GPU"), so FSDP1 could not
  be tested here on CPU with gloo; ``ModelParallelStrategy`` builds its device mesh on the root device's type and
  trains, saves and reshards on CPU/gloo (checked: 2 processes save, 1 process loads, same losses).
- FSDP2 shards per parameter (DTensor): frozen and trainable parameters may share a module, so LoRA needs no
  ``use_orig_params`` workaround; frozen weights are sharded like the rest and get no gradients or optimizer
  state (the optimizer only sees trainable parameters).
- Its state dicts are DTensors, so ``fabric.save`` writes a torch.distributed.checkpoint directory (each rank its
  shards, in parallel) that loads on any world size, and ``get_model_state_dict(full_state_dict=True)``
  consolidates it into a plain checkpoint.

Sharding (``train.sharding``): ``full_shard`` (parameters, gradients and optimizer state sharded; parameters
re-sharded after forward), ``shard_grad_op`` (parameters kept gathered between forward and backward: less
communication, more memory), ``hybrid_shard`` (shard within a node, replicate across nodes: a 2-D mesh
nodes x devices) and ``no_shard`` (replicate everywhere, like DDP). Every transformer block is its own FSDP unit
(``fully_shard`` per ``Block``, then the root).

QLoRA across devices runs with DDP (each device holds the 4-bit base; only the LoRA gradients are all-reduced).
FSDP cannot shard bitsandbytes' packed 4-bit parameters, so QLoRA + FSDP is refused.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any, Optional, Union

import torch

SHARDINGS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")


# ------------------------------------------------------------------------------------------ the launcher


def launcher() -> str:
    """What started this process: "torchrun" (TORCHELASTIC_RUN_ID / LOCAL_WORLD_SIZE set), "slurm" (inside an srun
    step: SLURM_STEP_NUM_TASKS set), else "fabric" (Fabric launches the processes itself).

    A plain ``litft finetune`` inside an sbatch/salloc allocation but not under srun is "fabric": the Slurm
    variables of the allocation are not mistaken for an srun step (which would wait forever for missing ranks).
    """
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return "slurm"
    return "fabric"


def _slurm_tasks_per_node() -> int:
    """Tasks per node of the srun step; SLURM_(STEP_)TASKS_PER_NODE looks like "2" or "2(x3)" (uneven: "2,1")."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", spec)}
    if len(counts) != 1:
        raise ValueError(f"srun started an uneven number of tasks per node (SLURM_TASKS_PER_NODE={spec!r}): use "
                         "`srun --ntasks-per-node N` (or sbatch --ntasks-per-node) so every node runs N processes")
    return counts.pop()


def _slurm_nodes() -> int:
    return int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES")
               or os.environ.get("SLURM_JOB_NUM_NODES") or 1)


def cpu_process_limit() -> int:
    """The most processes ``--devices N`` may start on CPU: one per core (``os.sched_getaffinity``, else
    ``os.cpu_count()``). More would only oversubscribe the cores (slower, never faster), and a typo like
    ``--devices 64`` on a laptop would fork 64 copies of the model."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _uses_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def _count(devices: Union[int, str], available: int) -> int:
    """Processes per node that ``devices`` asks for (-1/"auto" = all available; "0,1" = the listed ids)."""
    if devices in (-1, "auto", "-1"):
        return available
    if isinstance(devices, str):
        ids = [p for p in devices.split(",") if p.strip()]
        if len(ids) == 1 and not devices.strip().endswith(","):
            return int(ids[0])
        return len(ids)
    return int(devices)


def resolve_devices(devices: Union[int, str], num_nodes: int, accelerator: str) -> Union[int, str]:
    """Check ``devices`` and ``num_nodes`` against the machine and the launcher; returns the ``devices`` to give
    Fabric (a count; GPU id lists are kept). Raises ValueError with the fix, before any process starts."""
    kind = launcher()
    cpu = _uses_cpu(accelerator)
    available = cpu_process_limit() if cpu else torch.cuda.device_count()
    if kind == "torchrun":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        world = int(os.environ.get("WORLD_SIZE", str(local)))
        if devices not in (-1, "auto", "-1") and _count(devices, available) != local:
            raise ValueError(f"torchrun started {local} processes per node (--nproc-per-node) but devices={devices!r}: "
                             f"pass --devices {local} (or auto)")
        if local * num_nodes != world:
            raise ValueError(f"torchrun started {world} processes in all, {local} per node, but num_nodes={num_nodes}: "
                             f"pass --num_nodes {world // max(local, 1)}")
        return local
    if kind == "slurm":
        nodes, per_node = _slurm_nodes(), _slurm_tasks_per_node()
        if num_nodes != nodes:
            raise ValueError(f"num_nodes={num_nodes} does not match the Slurm allocation: srun runs on {nodes} node(s) "
                             f"(SLURM_NNODES={nodes}); pass --num_nodes {nodes}")
        if devices not in (-1, "auto", "-1") and _count(devices, available) != per_node:
            raise ValueError(f"devices={devices!r} does not match the Slurm allocation: srun started {per_node} task(s) "
                             f"per node; pass --devices {per_node} (or auto), one task per device")
        if not cpu and per_node > available:
            raise ValueError(f"srun started {per_node} tasks per node but the node has {available} CUDA GPU(s)")
        # Fabric's SLURMEnvironment wants --ntasks-per-node; `srun -n N` on one node sets only SLURM_TASKS_PER_NODE
        os.environ.setdefault("SLURM_NTASKS_PER_NODE", str(per_node))
        return per_node
    # Fabric starts the processes: num_nodes > 1 needs a launcher on every node
    if num_nodes > 1 and not any(k in os.environ for k in ("MASTER_ADDR", "NODE_RANK")):
        raise ValueError(f"num_nodes={num_nodes} but this process was not started by srun or torchrun, and "
                         "MASTER_ADDR/NODE_RANK are not set: start one process per node with srun (see "
                         "extensions/slurm/sbatch_multinode.sh) or torchrun --nnodes")
    if isinstance(devices, str) and "," in devices:
        if cpu:
            raise ValueError(f"devices={devices!r}: device ids are for GPUs; on CPU pass a process count (--devices 2)")
        wanted = max(int(p) for p in devices.split(",") if p.strip()) + 1
        if wanted > available:
            raise ValueError(f"devices={devices!r} names GPU {wanted - 1} but this machine has {available} CUDA GPU(s)")
        return devices
    n = _count(devices, available)
    if n > available:
        what = (f"{available} CPU core(s) (on CPU each process needs a core: at most os.sched_getaffinity "
                "cores)" if cpu else f"{available} CUDA GPU(s)")
        raise ValueError(f"devices={devices!r} is more than this machine has: {what}; pass --devices {available} or "
                         "fewer")
    if n < 1:
        raise ValueError(f"devices={devices!r}: no {'CPU' if cpu else 'CUDA'} devices available")
    return n


def check_strategy(strategy: str, sharding: str, num_nodes: int, method: str, quantized: bool = False) -> None:
    """Refuse combinations that cannot work: an unknown sharding, hybrid sharding on one node, QLoRA + FSDP."""
    if sharding not in SHARDINGS:
        raise ValueError(f"train.sharding={sharding!r} is invalid: expected one of {', '.join(SHARDINGS)}")
    if strategy != "fsdp":
        return
    if quantized:
        raise ValueError(f"strategy='fsdp' cannot shard a bitsandbytes-quantized base ({method} with --quantize): FSDP "
                         "cannot split the packed 4-bit weights. Use --strategy ddp (each device holds the 4-bit "
                         "base, only the LoRA gradients are exchanged) or drop --quantize")
    if sharding == "hybrid_shard" and num_nodes < 2:
        raise ValueError("train.sharding='hybrid_shard' shards within a node and replicates across nodes: it needs "
                         "num_nodes >= 2 (on one node use full_shard)")


def timeout_of(value: Union[float, str, None]) -> timedelta:
    """The collective timeout (``train.timeout``) as a timedelta; default 30 minutes."""
    from litft.train.args import parse_duration

    seconds = parse_duration(value) if value is not None else 1800.0
    return timedelta(seconds=seconds)


# ------------------------------------------------------------------------------------------ the strategy


def is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def _parallelize(sharding: str, num_nodes: int, cpu_offload: bool = False) -> Any:
    def parallelize(model: torch.nn.Module, device_mesh: Any) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from litft.model import Block

        mesh = device_mesh["data_parallel"]
        world = mesh.size()
        if sharding in ("hybrid_shard", "no_shard"):
            shape = (num_nodes, world // num_nodes) if sharding == "hybrid_shard" else (world, 1)
            mesh = init_device_mesh(device_mesh.device_type, shape, mesh_dim_names=("replicate", "shard"))
        reshard = sharding != "shard_grad_op"
        units = [m for m in model.modules() if isinstance(m, Block)]
        if not units:
            raise ValueError("strategy='fsdp': the model has no transformer Block to wrap")
        for block in units:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model

    return parallelize


def build_strategy(strategy: str, devices: Union[int, str], num_nodes: int, sharding: str = "full_shard",
                   timeout: Union[float, str, None] = None) -> Any:
    """The Fabric strategy object (or "auto") for ``strategy``; every distributed one gets ``timeout``."""
    pg_timeout = timeout_of(timeout)
    n = devices if isinstance(devices, int) else len([p for p in str(devices).split(",") if p.strip()])
    world = n * num_nodes
    if strategy == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(parallelize_fn=_parallelize(sharding, num_nodes), data_parallel_size=world,
                                     tensor_parallel_size=1, save_distributed_checkpoint=True, timeout=pg_timeout)
    if strategy == "ddp" or (strategy == "auto" and world > 1):
        from lightning.fabric.strategies import DDPStrategy

        return DDPStrategy(timeout=pg_timeout)
    return "auto"


def cluster_environment() -> Any:
    """The Fabric cluster environment matching :func:`launcher`, passed explicitly so that Slurm variables of an
    allocation never make Fabric wait for srun tasks that do not exist."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    kind = launcher()
    if kind == "slurm":
        return SLURMEnvironment(auto_requeue=False)
    if kind == "torchrun":
        return TorchElasticEnvironment()
    return LightningEnvironment()


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes-quantized parameters (QLoRA)."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded, on CPU) state dict of an FSDP model: a collective every rank must call; rank 0
    gets the tensors, the other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(config: Any, prepare: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A non-distributed model with the weights of ``state`` (from :func:`full_state_dict`), built like the trained
    one (``prepare`` adds the method's modules), so the method's own save code writes ``final/``."""
    from litft.model import GPT

    with torch.device("meta"):
        model = GPT(config)
        prepare(model)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if any(k == n for n, _ in model.named_parameters())]
    if missing:
        raise RuntimeError(f"consolidating the FSDP checkpoint: parameters missing from the state dict: {missing[:5]}")
    model.init_buffers(torch.device("cpu"))
    return model


def test_hook(rank: int, step: int) -> None:
    """Tests of the collective timeout: ``LITFT_TEST_DIE=rank:step`` makes that rank exit at that step."""
    spec = os.environ.get("LITFT_TEST_DIE", "")
    if spec:
        die_rank, _, die_step = spec.partition(":")
        if int(die_rank) == rank and int(die_step) == step:
            print(f"rank {rank}: exiting at step {step} (LITFT_TEST_DIE)", flush=True)
            os._exit(3)
