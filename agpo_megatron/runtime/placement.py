"""Disaggregated placement: one torchrun/srun world split into a trainer world and a rollout world.

    world ranks [0, T)      trainer ranks: Megatron TP/PP/DP, exactly as a colocated world of T ranks
    world ranks [T, T + R)  rollout ranks: vLLM engines only (R = rollout.num_ranks)
    link                    world rank 0 (the trainer leader) + the R rollout ranks, for requests,
                            completions and the weight sync

Why separate default worlds. Megatron's `initialize_model_parallel` and vLLM's external launcher
both build their groups over the *default* process group. So each side gets a default group of
its own (the trainer ranks' world is what a colocated run of T ranks would see: same ranks, same
groups, hence the same numbers), created from the launcher's store under its own prefix, and RANK /
WORLD_SIZE are rewritten to the side's values for any library that reads them (LOCAL_RANK, which
picks the GPU, keeps the node's). The link is a standalone process group over the same store
(`ProcessGroupGloo` / `ProcessGroupNCCL` built directly: torch.distributed's functional API only
knows groups of the default world, so `Link` calls the group's own methods). Its backend follows
the default group's: gloo on CPU, NCCL on GPU; `parallel.comm_device` says where its tensors live.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
from typing import Literal

import torch
import torch.distributed as dist

from agpo_megatron.runtime import cpu_platform
from agpo_megatron.runtime.parallel import comm_device

Role = Literal["trainer", "rollout"]


class LinkError(RuntimeError):
    """A link operation failed: a rollout or trainer rank died, or did not answer in time."""


class Link:
    """The trainer leader (link rank 0) and the rollout ranks (link ranks 1..R): broadcasts only.

    Every member calls every operation, in the same order (a collective over the link).
    """

    def __init__(self, pg: dist.ProcessGroup, world_ranks: list[int], timeout_s: float):
        self.pg, self.world_ranks, self.timeout_s = pg, world_ranks, timeout_s
        self.rank, self.size = pg.rank(), pg.size()
        self.device = comm_device(pg)

    def set_timeout(self, timeout_s: float) -> None:
        """Bound every later operation by `timeout_s` (the step timeout once start-up is over)."""
        if timeout_s > 0:
            self.timeout_s = timeout_s
            # The link is a backend itself (ProcessGroupGloo / ProcessGroupNCCL), not a wrapper around one.
            self.pg._set_default_timeout(datetime.timedelta(seconds=timeout_s))  # type: ignore[attr-defined]

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` from link rank `src` to every member, in place (it must live on `self.device`)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        try:
            self.pg.broadcast([tensor], opts).wait()
        except RuntimeError as e:  # gloo/NCCL: a peer closed the connection, or the timeout passed
            peers = [w for i, w in enumerate(self.world_ranks) if i != self.rank]
            side = "rollout" if self.rank == 0 else "trainer"
            raise LinkError(
                f"the link to world rank(s) {peers} failed: a dead {side} rank, or a hung one (silent for over "
                f"{self.timeout_s:g} s): {' '.join(str(e).split())[:200]}"
            ) from None
        return tensor

    def broadcast_object(self, obj: object, src: int) -> object:
        """A picklable object from link rank `src` (others pass anything, e.g. None)."""
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(size, src)
        n = int(size)
        buf = data.to(self.device) if self.rank == src else torch.empty(n, dtype=torch.uint8, device=self.device)
        self.broadcast(buf, src)
        return obj if self.rank == src else pickle.loads(buf.cpu().numpy().tobytes())


@dataclasses.dataclass(frozen=True)
class Placement:
    """This rank's side of a disaggregated world."""

    role: Role
    """'trainer' (Megatron) or 'rollout' (vLLM only)."""
    world_rank: int
    """Rank in the whole job (RANK as the launcher gave it)."""
    world_size: int
    """Ranks in the whole job."""
    trainer_ranks: int
    """T: world ranks [0, T) train."""
    link: Link | None
    """The trainer leader's and the rollout ranks' link; None on the other trainer ranks."""

    @property
    def rollout_ranks(self) -> int:
        return self.world_size - self.trainer_ranks

    @property
    def side_rank(self) -> int:
        """Rank inside this side's own (default) world."""
        return self.world_rank - (self.trainer_ranks if self.role == "rollout" else 0)


def side_of(world_rank: int, world_size: int, rollout_ranks: int) -> tuple[Role, int, int]:
    """(role, rank in its side's world, that world's size): the last `rollout_ranks` ranks roll out."""
    if not 1 <= rollout_ranks < world_size:
        raise ValueError(f"rollout ranks ({rollout_ranks}) must be in [1, world size {world_size})")
    trainers = world_size - rollout_ranks
    if world_rank < trainers:
        return "trainer", world_rank, trainers
    return "rollout", world_rank - trainers, rollout_ranks


def split_world(rollout_ranks: int, *, timeout_s: float = 3600.0) -> Placement:
    """Create this rank's side world as the default process group, and the link (collective over the job).

    Call before anything else initialises torch.distributed (`parallel.init_distributed` then finds the
    side's world and leaves it be).
    """
    if dist.is_initialized():
        raise RuntimeError("split_world must run before torch.distributed is initialised")
    _rendezvous_env()
    store, world_rank, world_size = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    role, side_rank, side_size = side_of(world_rank, world_size, rollout_ranks)
    gpu = cpu_platform.cuda_present()
    if gpu:
        from agpo_megatron.runtime.parallel import bind_local_device

        bind_local_device()
    else:
        cpu_platform.activate()
    backend = "nccl" if gpu else "gloo"
    td = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"agpo/{role}", store), rank=side_rank, world_size=side_size, timeout=td
    )
    os.environ.update(RANK=str(side_rank), WORLD_SIZE=str(side_size))  # vLLM and Megatron read these
    os.environ["AGPO_WORLD_RANK"], os.environ["AGPO_WORLD_SIZE"] = str(world_rank), str(world_size)
    trainers = world_size - rollout_ranks
    members = [0, *range(trainers, world_size)]
    link = None
    if world_rank in members:
        link_store = dist.PrefixStore("agpo/link", store)
        rank = members.index(world_rank)
        if gpu:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            pg: dist.ProcessGroup = dist.ProcessGroupNCCL(link_store, rank, len(members), opts)
        else:
            pg = dist.ProcessGroupGloo(link_store, rank, len(members), td)
        link = Link(pg, members, timeout_s)
    return Placement(role, world_rank, world_size, trainers, link)


def _rendezvous_env() -> None:
    """RANK/WORLD_SIZE/MASTER_* for `env://` (srun's SLURM_* mapped as for a colocated run)."""
    from agpo_megatron.runtime.parallel import _env_from_slurm

    _env_from_slurm()
    if "RANK" not in os.environ:
        raise RuntimeError("rollout.placement=disaggregated needs a launcher (torchrun or srun): no RANK is set")
