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
- Its state dicts are DTensors, so a step checkpoint is a torch.distributed.checkpoint directory (each rank writes
  its shards, in parallel) that loads on any world size, and ``get_model_state_dict(full_state_dict=True)``
  consolidates it into a plain checkpoint. Step checkpoints hold only the trainable parameters and the optimizer
  state (:func:`save_sharded`): a LoRA/adapter checkpoint does not copy the frozen base, which is read again from
  the base checkpoint on resume.

Sharding (``train.sharding``): ``full_shard`` (parameters, gradients and optimizer state sharded; parameters
re-sharded after forward), ``shard_grad_op`` (parameters kept gathered between forward and backward: less
communication, more memory), ``hybrid_shard`` (shard within a node, replicate across nodes: a 2-D mesh
nodes x devices) and ``no_shard`` (replicate everywhere, like DDP). Every transformer block is its own FSDP unit
(``fully_shard`` per ``Block``, then the root).

QLoRA across devices runs with DDP (each device holds the 4-bit base; only the LoRA gradients are all-reduced).
FSDP cannot shard bitsandbytes' packed 4-bit parameters, so QLoRA + FSDP is refused.

Timeouts (``train.timeout``): every process group (the world's and FSDP's sub-meshes) gets it as the time a
collective waits for the other ranks (:func:`launch`, :func:`set_collective_timeout`); start-up (joining the process
group) may take longer, at least 30 minutes, since ranks start at different times. A collective that times out or
loses its peer is reported by :func:`reports_distributed_failures` as what it means (a rank hangs or died, and
which option to change), and the processes Fabric started are stopped, so that no rank is left waiting forever.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar, Union

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


STARTUP_TIMEOUT = timedelta(minutes=30)


def startup_timeout(value: Union[float, str, None]) -> timedelta:
    """How long joining the process group may take: ``train.timeout``, but at least 30 minutes. Ranks start at
    different times (Fabric starts its child processes only once the first one has imported everything; nodes of
    a Slurm job start when they start), so a short collective timeout must not fail the start."""
    return max(timeout_of(value), STARTUP_TIMEOUT)


def set_collective_timeout(value: Union[float, str, None]) -> None:
    """Give every process group that exists (the world's, FSDP's device-mesh groups) ``train.timeout`` as the time a
    collective waits. Groups made with ``new_group`` get torch's default (30 min) instead of the world group's
    timeout, so this runs after they exist."""
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d as c10d

    if not tdist.is_available() or not tdist.is_initialized():
        return
    timeout = timeout_of(value)
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


# ------------------------------------------------------------------------------------------ failures of a rank

_RUN: dict[str, Any] = {}  # set by launch(): train.timeout, this process's rank, the children Fabric started
_GRACE_S = 5.0  # how long rank 0 lets its children end by themselves after a failure before it stops them


def launch(fabric: Any, timeout: Union[float, str, None]) -> None:
    """``fabric.launch()``, then ``train.timeout`` for the collectives of the process group it joined; remembers
    the processes Fabric started (rank 0 of a Fabric launch), so a failure can stop them."""
    fabric.launch()
    launcher = fabric.strategy.launcher
    children = list(getattr(launcher, "procs", None) or [])
    _RUN.update(timeout=timeout, rank=fabric.global_rank, world_size=fabric.world_size, children=children)
    set_collective_timeout(timeout)


def _messages(error: BaseException) -> str:
    seen, texts = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


# gloo: "Timed out waiting 5000ms for recv operation", "Application timeout caused pair closure"; NCCL: "Watchdog
# caught collective operation timeout", "... have failed or timed out"; the c10d store: "... timed out ..."
_TIMED_OUT = re.compile(r"timed out|timeout caused pair closure|Watchdog caught collective operation timeout",
                        re.IGNORECASE)
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|pair closure|"
                        r"remote worker crash|NCCL communicator was aborted", re.IGNORECASE)


def explain_failure(error: BaseException) -> Optional[str]:
    """What a failed collective means, naming the option to change; None for an error that is not one (or in a
    run of one process)."""
    if not _RUN or _RUN.get("world_size", 1) < 2 or not isinstance(error, RuntimeError):  # torch's DistError too
        return None
    text = _messages(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    rank, timeout = _RUN["rank"], _RUN["timeout"]
    if _TIMED_OUT.search(text):
        seconds = timeout_of(timeout).total_seconds()
        shown = f"{timeout:g}" if isinstance(timeout, (int, float)) else timeout
        return (f"rank {rank}: a collective operation (all-reduce, barrier or FSDP gather) waited "
                f"train.timeout={shown} ({seconds:g} s) for the other processes and got no answer: another rank "
                "hangs, or is far slower than this one (its own output above may say why). The run stops instead of "
                "waiting forever. If a step can legitimately take longer (a slow checkpoint save, a long "
                f"validation), raise --train.timeout. [{first}]")
    if _PEER_GONE.search(text):
        return (f"rank {rank}: another process of this run died during a collective operation (its connection "
                f"closed): its own error is in the output above. [{first}]")
    return None


def _stop_children() -> None:
    """Rank 0 of a Fabric launch, after a failure: its child processes (the other ranks) get ``_GRACE_S`` seconds
    to end by themselves (they fail too when their next collective loses rank 0), then are killed, so that a rank
    stuck outside a collective does not outlive the run."""
    deadline = time.monotonic() + _GRACE_S
    for local_rank, proc in enumerate(_RUN.get("children", []), start=1):  # Fabric starts local ranks 1, 2, ...
        if proc.poll() is not None:
            continue
        try:
            proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            print(f"rank 0: stopping rank {local_rank} (pid {proc.pid}): it had not ended {_GRACE_S:g} s after this "
                  "process failed", file=sys.stderr, flush=True)
            proc.kill()
            proc.wait()


F = TypeVar("F", bound=Callable[..., Any])


def reports_distributed_failures(fit: F) -> F:
    """Decorates the training loop: an error of a collective (a timeout, a rank that died) becomes a RuntimeError
    saying what happened and which option to change (:func:`explain_failure`), and the other ranks Fabric started
    are stopped (:func:`_stop_children`) instead of waiting forever."""

    @functools.wraps(fit)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _RUN.clear()
        try:
            return fit(*args, **kwargs)
        except BaseException as e:
            explained = explain_failure(e)
            _stop_children()
            if explained is not None:
                raise RuntimeError(explained) from e
            raise
        finally:
            _RUN.clear()

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the strategy


def is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def _parallelize(sharding: str, num_nodes: int, timeout: Union[float, str, None] = None) -> Any:
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
        set_collective_timeout(timeout)  # the mesh's groups were made with torch's default timeout
        return model

    return parallelize


def shard_frozen(model: torch.nn.Module, fabric: Any) -> torch.nn.Module:
    """Shard a frozen model (a distillation teacher, a DPO reference copy) over the FSDP run's data-parallel mesh:
    each ``Block`` as the trained model's are (gathered for its forward, resharded after); the embeddings, final
    norm and head stay whole on every process (the objective calls the head outside the model's forward)."""
    from torch.distributed.fsdp import fully_shard

    from litft.model import Block

    mesh = fabric.strategy.device_mesh["data_parallel"]
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return model


def build_strategy(strategy: str, devices: Union[int, str], num_nodes: int, sharding: str = "full_shard",
                   timeout: Union[float, str, None] = None) -> Any:
    """The Fabric strategy object (or "auto") for ``strategy``. Joining the process group may take
    :func:`startup_timeout`; :func:`launch` then sets ``timeout`` for the collectives."""
    pg_timeout = startup_timeout(timeout)
    n = devices if isinstance(devices, int) else len([p for p in str(devices).split(",") if p.strip()])
    world = n * num_nodes
    if strategy == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(parallelize_fn=_parallelize(sharding, num_nodes, timeout),
                                     data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True,
                                     timeout=pg_timeout)
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


def _unwrapped(model: Any, optimizer: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The module and optimizer under Fabric's wrappers (``_FabricModule.module``, ``_FabricOptimizer.optimizer``)."""
    return getattr(model, "module", model), getattr(optimizer, "optimizer", optimizer)


def _sharded_state(model: Any, optimizer: Any, include_frozen: bool = False,
                   ) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    module, opt = _unwrapped(model, optimizer)
    model_state, optim_state = get_state_dict(module, opt,
                                              options=StateDictOptions(ignore_frozen_params=not include_frozen))
    return module, opt, {"model": model_state, "optimizer": optim_state}


def save_sharded(path: Path, model: Any, optimizer: Any, include_frozen: bool = False) -> None:
    """Write an FSDP step checkpoint to the directory ``path`` (torch.distributed.checkpoint; a collective: every
    rank writes its own shards, in parallel). It holds the trainable parameters and the optimizer state only: the
    frozen base of LoRA/adapter is not copied into every checkpoint (it is in the base checkpoint already).
    ``include_frozen``: the frozen parameters too (a full fine-tune with ``freeze_layers``: its checkpoints hold the
    whole model)."""
    import torch.distributed.checkpoint as dcp

    _, _, state = _sharded_state(model, optimizer, include_frozen)
    dcp.save(state, checkpoint_id=Path(path))


def load_sharded(path: Path, model: Any, optimizer: Any) -> None:
    """Load a checkpoint written by :func:`save_sharded` into the set-up FSDP ``model`` and ``optimizer``, whatever
    the number of processes that wrote it (a collective). The frozen parameters keep the weights already loaded
    from the base checkpoint; a checkpoint that also holds them (written before litft saved trainable weights only)
    loads too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    module, opt, state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=Path(path))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


# save_sharded's keys: "model." (its state dict's entry) + "model." (CausalLMLoss.model, the GPT) + the GPT's own name
_SHARDED_MODEL_PREFIX = "model.model."


def sharded_model_shapes(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Names (the GPT's own, e.g. ``blocks.0.attn.q_proj.lora_A.weight``), shapes and dtypes of the model tensors in
    a checkpoint written by :func:`save_sharded`, read from its metadata (no tensor is loaded)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch.distributed.checkpoint directory (its .metadata file is "
                         f"missing or truncated): {e}") from e
    return {k[len(_SHARDED_MODEL_PREFIX):]: (v.size, v.properties.dtype)
            for k, v in metadata.state_dict_metadata.items()
            if k.startswith(_SHARDED_MODEL_PREFIX) and isinstance(v, TensorStorageMetadata)}


def read_sharded_model(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The model tensors ``names`` (as :func:`sharded_model_shapes` names them) of a checkpoint written by
    :func:`save_sharded`, gathered whole on the CPU in this one process (no process group, no GPU), whatever the
    number of processes that wrote it. The optimizer state is not read."""
    import torch.distributed.checkpoint as dcp

    names, shapes = list(names), sharded_model_shapes(path)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"{path}: no tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    state = {_SHARDED_MODEL_PREFIX + n: torch.empty(shapes[n][0], dtype=shapes[n][1]) for n in names}
    with warnings.catch_warnings():  # it warns that it loads in one process even when asked to (no_dist)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=Path(path), no_dist=True)
    return {k[len(_SHARDED_MODEL_PREFIX):]: v for k, v in state.items()}


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
