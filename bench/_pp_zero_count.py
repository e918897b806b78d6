"""Counting for bench/pp_zero_bench.py: the bytes every collective and point-to-point call
moves, and the bytes of parameters and optimizer state a rank holds.

Communication is counted below every wrapper: a ``TorchDispatchMode`` sees each ``c10d::``
operator that ``torch.distributed`` dispatches (DeepSpeed's ``deepspeed.comm``, torch's
pipelining ``batch_isend_irecv``, megatron-core and the trainer's own calls all end there),
with the real tensors. Nothing is estimated: the bytes are those of the tensors passed. The
mode puts every torch operator of the step through Python, so it is switched on only for the
counted steps, which are not timed.

Memory is counted by tensor storage (each storage once, whatever views share it): the
module's parameters (under ZeRO-3 their partitions ``ds_tensor`` plus whatever is gathered at
that moment), the parameters the inner optimizer steps (ZeRO's fp32 partitions) and its state
(Adam's moments), and the gradients attached to either when the inner optimizer steps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

KINDS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "broadcast_": "broadcast", "send": "send", "recv_": "recv", "recv_any_source_": "recv",
    "alltoall_base_": "all_to_all", "alltoall_": "all_to_all", "reduce_": "reduce", "gather_": "gather",
    "scatter_": "scatter",
}
"""c10d operator -> the kind reported (the ``torch.distributed`` call it serves)."""


def tensor_bytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(x) if isinstance(t, torch.Tensor))


class CommCounter(TorchDispatchMode):
    """While entered: per (kind, process group), the number of calls and the bytes of the call's
    buffer, the larger of its output and input: the gathered tensor of an all-gather, the
    tensor before scattering of a reduce-scatter, the tensor of an all-reduce, a broadcast, a
    send or a receive (what nccl-tests call the size). Barriers are counted as calls only.

    ``watch(params)``: also sample, at every call, the bytes of those parameters' ``.data``
    (ZeRO-3 gathers a parameter into ``.data`` and empties it on release): the largest is the
    gathered working set of the counted steps."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.watched: list[torch.nn.Parameter] = []
        self.max_gathered = 0
        self.max_at = ""
        self.names: dict[str, str] = {}

    def name_groups(self, groups: dict[str, Any]) -> None:
        """Label calls on these process groups by name (``{"dp": ctx.dp_group, ...}``); calls
        on any other group are labelled by its size."""
        self.names = {g.group_name: name for name, g in groups.items() if g is not None}

    def watch(self, params: list[torch.nn.Parameter]) -> None:
        self.watched = params

    def sample(self, where: str = "after the step") -> None:
        if self.watched:
            now = sum(p.data.numel() * p.data.element_size() for p in self.watched)
            if now > self.max_gathered:
                self.max_gathered, self.max_at = now, f"call {sum(self.calls.values())}: {where}"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func.namespace == "c10d":
            name = func._schema.name.split("::", 1)[1]
            kind = KINDS.get(name, name)
            key = f"{kind} ({self._group(args)})"
            self.calls[key] += 1
            if name != "barrier":
                second = args[1] if len(args) > 1 else None
                self.bytes[key] += max(tensor_bytes(args[0]), tensor_bytes(second))
            self.sample(key)
        return func(*args, **(kwargs or {}))


    def _group(self, args: tuple[Any, ...]) -> str:
        boxed = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
        if boxed is None:
            return "?"
        pg = torch._C._distributed_c10d.ProcessGroup.unbox(boxed)
        return self.names.get(pg.group_name, f"a {pg.size()}-rank group")


class Storages:
    """Bytes by category, each tensor storage counted once (the first category that sees it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, t: Any, category: str) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        st = t.untyped_storage()
        if st.data_ptr() in self.seen or st.nbytes() == 0:
            return
        self.seen.add(st.data_ptr())
        self.bytes[category] += st.nbytes()


def held_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds now in: ``params`` (the module's parameters: whole under ZeRO-0/1/2,
    the rank's partition plus anything still gathered under ZeRO-3), ``master`` (the
    parameters the inner optimizer steps: ZeRO's fp32 partitions), ``optimizer_state`` (Adam's
    moments and step counters). Called after the step, when ZeRO-3 has released every
    gathered parameter."""
    s = Storages()
    for p in module.parameters():
        s.add(getattr(p, "ds_tensor", None), "params")
        s.add(p.data, "params")
    for group in optimizer.param_groups:
        for p in group["params"]:
            s.add(p.data, "master")
    for state in optimizer.state.values():
        for v in state.values():
            s.add(v, "optimizer_state")
    return dict(s.bytes)


def held_grads(module: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the gradients attached to the module's parameters and to the inner optimizer's
    (called as the inner optimizer steps: ZeRO's reduced gradient partitions are attached then;
    its reduction buckets are working set and not counted)."""
    s = Storages()
    for group in optimizer.param_groups:
        for p in group["params"]:
            s.add(p.grad, "grads")
    if module is not None:
        for p in module.parameters():
            s.add(p.grad, "grads")
    return s.bytes.get("grads", 0)
