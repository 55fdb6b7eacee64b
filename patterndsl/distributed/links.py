"""One autograd node per distributed stage: local math by autograd, collectives between, in a fixed order.

A stage's forward is local torch code that calls `links.reduce(x, "sum" | "max")` and `links.gather(x)`
where it needs other ranks' values. Each call runs the collective on a detached copy and returns a fresh
leaf, so the local graph stops at it. The backward (`run` wraps the stage in one `autograd.Function`) takes
the gradient of the stage's output with respect to the inputs and the leaves, then walks the links in
reverse: each leaf's gradient goes through the collective's adjoint (an all-reduce: the sum over ranks of
what each rank's output needed from the leaf; for a max, delivered to the rank(s) holding it; for a gather,
this rank's slice) and on into the local value that fed it. Every rank issues the same collectives in the
same order, forward and backward, whatever its data.
"""
from __future__ import annotations

import torch

from .comm import Comm


class Links:
    """The collectives of one stage's forward, recorded for its backward."""

    def __init__(self, comm: Comm, on: bool):
        self.comm, self.on, self.items = comm, on, []

    def reduce(self, local: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (or max) of `local` over ranks."""
        return self._link(op, local, self.comm.all_reduce(local, op))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's `local`, stacked `[W, ...]`."""
        return self._link("gather", local, self.comm.all_gather(local))

    def _link(self, kind: str, local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        leaf = total.requires_grad_(self.on and total.is_floating_point())
        if leaf.requires_grad:               # on every rank alike: the backward's collectives must match
            self.items.append((kind, local, leaf))
        return leaf

    def adjoint(self, kind: str, local: torch.Tensor, leaf: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of `local` from every rank's gradient of the collective's result."""
        total = self.comm.all_reduce(grad)
        if kind == "sum":
            return total
        if kind == "gather":
            return total[self.comm.rank]
        holds = (local.detach() == leaf.detach()) & torch.isfinite(leaf.detach())
        count = self.comm.all_reduce(holds.to(grad.dtype)).clamp(min=1)
        return torch.where(holds, total / count, torch.zeros_like(total))


def grads(outputs, inputs, grad_outputs) -> list[torch.Tensor]:
    """Gradients of the outputs that have a graph, zeros where an input is not reached."""
    pairs = [(o, d) for o, d in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True,
                              retain_graph=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, got)]


class _Stage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, comm, *inputs):
        comm.phase = "forward"
        links = Links(comm, True)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) if x is not None else None for x in inputs]
            out = fn(links, *leaves)
        ctx.state = (links, leaves, out)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        links, leaves, out = ctx.state
        links.comm.phase = "backward"
        ins = [x for x in leaves if x is not None and x.requires_grad]
        wrt = ins + [leaf for _, _, leaf in links.items]
        acc = dict(zip(map(id, wrt), grads([out], wrt, [dout])))
        for n in range(len(links.items) - 1, -1, -1):
            kind, local, leaf = links.items[n]
            dlocal = links.adjoint(kind, local, leaf, acc[id(leaf)])
            earlier = ins + [lf for _, _, lf in links.items[:n]]
            for x, d in zip(earlier, grads([local], earlier, [dlocal])):
                acc[id(x)] = acc[id(x)] + d
        ctx.state = None
        return (None, None, *(acc[id(x)] if x is not None and x.requires_grad else None for x in leaves))


def run(fn, comm: Comm, *inputs) -> torch.Tensor:
    """`fn(links, *inputs)` as one differentiable stage (inputs: tensors or None; one output tensor)."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _Stage.apply(fn, comm, *inputs)
    comm.phase = "forward"
    with torch.no_grad():
        return fn(Links(comm, False), *inputs)
