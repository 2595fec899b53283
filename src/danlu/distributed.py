"""Several processes, one model: data parallelism on ``torch.distributed`` (DDP, FSDP2; ZeRO in zero.py).

danlu does not start processes itself beyond handing ``--nproc N`` to torchrun: any launcher
that sets the standard variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) works — ``torchrun``, ``accelerate launch``, a cluster's own wrapper. Each process
owns one GPU (NCCL) or, without GPUs, one CPU process (gloo), and takes its slice of every
global micro-batch.

What the training loop needs from here, and nothing more:

- :func:`init` joins the process group and says who we are (:class:`World`);
- :func:`main_first` lets rank 0 do a job first (tokenize into the cache) while the others wait
  on a CPU-side barrier whose timeout is long enough for any tokenization;
- :func:`wrap` puts the model under DDP or FSDP2, :func:`unwrap` gets the plain model back;
- :func:`all_sum` adds a number over all processes;
- :func:`trainable_state` gathers what trains onto rank 0 for checkpoints and the final save,
  :func:`load_trainable` puts it back on every rank;
- :func:`launch` re-runs a ``danlu`` command under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from danlu import model as mdl
from danlu.errors import UserError
from danlu.fast.loss import Objective

# Rank 0 may tokenize a large dataset while the others wait: give that one barrier a day.
WAIT_TIMEOUT = timedelta(hours=24)


@dataclass
class World:
    """This process's place among the training processes (a single process is a world of one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp | zero2 | zero3
    wait_group: Any = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def zero(self) -> bool:
        """DeepSpeed's engine owns backward and step (see :mod:`danlu.zero`)."""
        return self.strategy in ("zero2", "zero3")


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process, even as the only one."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str, strategy: str) -> World:
    """Join the process group torchrun (or accelerate) set up; a world of one when not launched."""
    if not launched():
        if strategy in ("fsdp", "zero2", "zero3"):
            raise UserError(
                f"train.strategy={strategy} needs several processes; start with --nproc N (or torchrun)"
            )
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {rank} wants GPU {local_rank} but this machine has {torch.cuda.device_count()}; "
                "lower --nproc"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    # a CPU-side group for waiting: NCCL collectives would time out (and use GPU memory) while idle
    wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    chosen = strategy if strategy in ("fsdp", "zero2", "zero3") else "ddp"
    return World(rank, size, local_rank, chosen, wait_group)


def close(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier(group=world.wait_group)


@contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenizing into the cache); the others run it after.

    If rank 0 fails inside, the others are released and stop too instead of waiting forever.
    """
    if not world.active:
        yield
        return
    ok = torch.ones(1)
    if world.main:
        try:
            yield
        except BaseException:
            ok.zero_()
            dist.broadcast(ok, 0, group=world.wait_group)
            raise
        dist.broadcast(ok, 0, group=world.wait_group)
    else:
        dist.broadcast(ok, 0, group=world.wait_group)
        if not ok.item():
            raise SystemExit(2)  # rank 0 printed why
        yield


def all_sum(value: float, world: World, device: str) -> float:
    """``value`` summed over all processes."""
    if not world.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def wrap(model: Any, world: World, device: str, dtype: torch.dtype, cpu_offload: bool = False) -> Any:
    """The model under DDP (every rank holds it whole) or FSDP2 (each decoder layer sharded).

    FSDP2 takes the model from the CPU and moves each rank's shards to its device (or keeps
    them in CPU memory with ``cpu_offload``); weights are gathered in ``dtype`` for compute and
    gradients reduced in fp32.
    """
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if world.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options: dict[str, Any] = {
            "mesh": init_device_mesh(device, (world.size,)),
            "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
        }
        if cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        layers = mdl.decoder_layers(model)
        if layers is None:
            raise UserError(
                f"train.strategy=fsdp: found no decoder layers in {type(model).__name__}; use train.strategy=ddp"
            )
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        return model
    return model


@contextmanager
def gradient_sync(model: Any, world: World, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for all but the last micro-batch of an accumulated step."""
    if world.strategy == "ddp" and not sync:
        with model.no_sync():
            yield
        return
    if world.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield


def full_state(model: Any, world: World) -> dict[str, torch.Tensor] | None:
    """For FSDP2 and ZeRO the whole model's state gathered on rank 0's CPU (a collective); else
    None, meaning: the model's own ``state_dict`` is complete."""
    if world.zero:
        from danlu import zero

        # an adapter saves only its own weights: no need to gather the frozen base
        return zero.gather(model, world.main, trainable_only=hasattr(unwrap(model), "peft_config"))
    if world.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (an LM head sharing the embedding) come back as separate copies: keep one name,
    # as the model's own state_dict would, so save_pretrained writes them as tied
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def unwrap(model: Any) -> Any:
    """The model without DDP's or DeepSpeed's wrapper and the fast path's loss module around it
    (FSDP2 shards in place: nothing to take off)."""
    wrapped = hasattr(model, "require_backward_grad_sync") or type(model).__name__ == "DeepSpeedEngine"
    inner = model.module if hasattr(model, "module") and wrapped else model
    return inner.model if isinstance(inner, Objective) else inner


def trainable_state(model: Any, world: World) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable parameters on CPU; every rank must call it, rank 0 gets them all."""
    if world.zero:
        from danlu import zero

        return zero.gather(model, world.main, trainable_only=True)
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    state = {}
    for name, p in named:
        value = p.detach()
        if hasattr(value, "full_tensor"):  # an FSDP2 shard: gather it (a collective)
            value = value.full_tensor()
        state[name] = value.cpu()
    return state


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy full trainable tensors into the model, sharding them again where FSDP2 split them."""
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
                p.to_local().copy_(value.to_local())
            else:
                p.copy_(value.to(p.device, p.dtype))


def optimizer_state(optimizer: Any, model: Any, world: World) -> dict[str, Any]:
    """Optimizer state to save: as is for one process or DDP (every rank holds the same),
    gathered in full for FSDP2."""
    if world.strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(optimizer: Any, model: Any, world: World, state: dict[str, Any]) -> None:
    if world.strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``danlu ARGV`` in ``nproc`` processes on this machine through torchrun."""
    if launched():
        raise UserError(
            "--nproc given inside a launched process; drop --nproc when using torchrun/accelerate"
        )
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPUs")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "danlu",
        *argv,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads_per_process(nproc))),
    }
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        user_error = _relay(proc.stderr)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # torchrun stops the workers on the same Ctrl-C
        raise
    return 2 if user_error else code


def _relay(stream: Any) -> bool:
    """Copy the workers' stderr through as it comes (progress bars too: lines may end at \\r).
    After the first ``danlu: error:`` line the rest is dropped: the other ranks' copies of it and
    torchrun's report of the failed child. Returns whether such a line came."""
    import io

    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    for line in text:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.startswith("danlu: error:"):
            for _ in text:  # drain, so torchrun never blocks on a full pipe
                pass
            return True
    return False


def _threads_per_process(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)
