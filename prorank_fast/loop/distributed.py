"""Processes, devices, seeds and FSDP2 sharding.

One process on CPU (`prorank-fast train`) or many under `torchrun --nproc_per_node N`
(gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")  # train.device: auto = cuda when available


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # setup_distributed created the process group, so close() destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def close(self) -> None:
        """Destroy the process group this process created, after a run that succeeded: left to
        interpreter exit, gloo's worker threads can abort a finished rank (SIGABRT, "terminate called
        without an active exception"). Not on failure: destroying while other ranks sit in a
        collective can hang, and torchrun stops them anyway."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device_pref: str) -> Dist:
    """Init the process group when launched by torchrun (WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, device, owns_group)


def set_seed(seed: int) -> None:
    # numpy's global RNG is not used: data code takes seeded numpy Generators
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shard(wrapper: torch.nn.Module, d: Dist, *, compile_layers: bool) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root (the wrapper, so the LM head and the
    embeddings are gathered in its forward). bf16 parameters / fp32 reduction on GPU."""
    layers = wrapper.lm.model.layers
    if compile_layers:
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer)
    if not d.distributed:
        return wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if d.device.type == "cuda":
        # labels / teacher scores stay fp32: inputs are not cast, activations follow the bf16 params
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(wrapper, **kwargs)
    return wrapper
