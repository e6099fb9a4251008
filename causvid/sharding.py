"""Trained models sharded across processes (torch FSDP2), for models too large to replicate.

Each transformer block, then the rest of the model, becomes one unit: its parameters,
gradients and optimiser state live 1/N on each of N processes, and a block's full weights
exist only while it runs. The training loop shards the models itself instead of through
accelerate's FSDP plugin, which accelerate turns on only for accelerator devices: this way the
one code path also runs as CPU processes (gloo) in the tests. Checkpoints hold full tensors,
so a sharded run resumes on any number of processes.

Every function here that gathers or scatters is collective: all processes call it, in the
same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from causvid.models.vin import ProcessBlock


# The units gathered one at a time: the blocks that hold nearly all the weights.
LAYERS = (WanTransformerBlock, ProcessBlock)
# Full tensors, on the CPU, on process 0 only (the others get empty dicts).
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(module: torch.nn.Module, mixed_precision: str = "no") -> None:
    """Shard `module` in place over all processes. Under bf16, weights are gathered and run in
    bf16 while gradients are reduced and kept in fp32."""
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in [m for m in module.modules() if isinstance(m, LAYERS)]:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors of a state whose values may be shards (e.g. an EMA of sharded weights)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in state.items()}


def shard_like(full: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors cut into this process's shards the way `module`'s own state is."""
    own = module.state_dict()
    return {
        k: distribute_tensor(v.to(own[k].device_mesh.device_type), own[k].device_mesh, own[k].placements)
        if isinstance(own[k], DTensor) else v.to(own[k].device)
        for k, v in full.items()
    }


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(module, options=FULL)


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {parameter name: {...}}, "param_groups": [...]}, full tensors on process 0."""
    return get_optimizer_state_dict(module, optimizer, options=FULL)


def load_full_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def grad_norm(norm: torch.Tensor) -> float:
    """A gradient norm from clip_grad_norm_, which over shards is itself a shard-aware DTensor."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def agreed_generator(rng: torch.Generator) -> torch.Generator:
    """A generator seeded alike on every process (from process 0's `rng`), for the random
    choices that decide which forward passes run: sharded models gather their weights in every
    forward, so all processes must run the same ones. One process: seeded from `rng`."""
    seed = [int(torch.randint(2**62, (1,), generator=rng))]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(seed, src=0)
    return torch.Generator().manual_seed(seed[0])
