"""Score terms evaluated with torch: the bias at broadcast index tensors, on dense score matrices or gathered
tiles (reference and torch backends).

`i` `[n, 1]` or `[n, K]` absolute query positions, `j` `[1, n_k]` or `[n, K]` key positions, `h` `[H, 1, 1]`
absolute head indices; values broadcast to `[H, n, K]`. Integer arithmetic stays int64 (positions are exact);
a float operand turns it into `dtype`. Learned tables are read by `table`: with `deterministic`, through a
gather whose backward sums each bucket by a one-hot product (no atomics, the same bits on every run).
"""
from __future__ import annotations

import torch


class TorchScoreOps:
    def __init__(self, i, j, h, tables: dict | None = None, dtype=torch.float64, deterministic: bool = False):
        self.vars = {"i": i, "j": j, "h": h}
        self.tables, self.dtype, self.deterministic = tables or {}, dtype, deterministic

    def var(self, name):
        return self.vars[name]

    def const(self, v):
        return v

    def _float(self, x):
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            return x.to(self.dtype)
        return x

    def _is_float(self, x) -> bool:
        return isinstance(x, float) or (isinstance(x, torch.Tensor) and x.is_floating_point())

    def bin(self, op, a, b):
        if op == "/" or self._is_float(a) or self._is_float(b):
            a, b = self._float(a), self._float(b)
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        b = torch.as_tensor(b, dtype=self.dtype)
        zero = b == 0
        return torch.where(zero, torch.zeros_like(b), a / torch.where(zero, torch.ones_like(b), b))

    def call(self, func, args):
        if func == "abs":
            return torch.as_tensor(args[0]).abs()
        if any(self._is_float(a) for a in args):
            args = [torch.as_tensor(self._float(a), dtype=self.dtype) for a in args]
        a, b = (torch.as_tensor(x) for x in args)
        return torch.minimum(a, b) if func == "min" else torch.maximum(a, b)

    def cmp(self, op, a, b):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return {">": torch.gt, ">=": torch.ge}[op](a, b)

    def scaled_flag(self, cond, k: int):
        return cond.long() * k

    def tanh(self, x):
        return torch.tanh(x)

    def per_head(self, values: tuple[float, ...]):
        h = self.vars["h"]
        t = torch.tensor(values + (0.0,), dtype=self.dtype, device=h.device)
        return t[h.clamp(0, len(values))]

    def table(self, name: str, buckets: int, bucket):
        t = self.tables[name]
        h = self.vars["h"].clamp(0, t.shape[0] - 1)
        if self.deterministic:
            return BucketGather.apply(t, h, torch.as_tensor(bucket, device=t.device))
        return t[h, bucket]

    def add_bias(self, s, bias):
        bias = self._float(bias)
        return s + (bias.to(s.dtype) if isinstance(bias, torch.Tensor) else bias)


class BucketGather(torch.autograd.Function):
    """`table[h, bucket]` (`h` `[H, 1, 1]`, `bucket` `[n, K]`) with a deterministic backward: the gradient of
    each table entry is a one-hot product over the pairs, summed in a fixed order."""

    @staticmethod
    def forward(ctx, table, h, bucket):
        ctx.save_for_backward(h, bucket)
        ctx.shape = table.shape
        return table[h, bucket]

    @staticmethod
    def backward(ctx, grad):
        h, bucket = ctx.saved_tensors
        H, nb = ctx.shape
        g = grad.reshape(-1, *grad.shape[-3:]).sum(0) if grad.dim() > 3 else grad   # [H_stage, n, K]
        g = g.expand(h.shape[0], *g.shape[-2:]) if g.shape[0] != h.shape[0] else g
        onehot = torch.nn.functional.one_hot(bucket.expand(g.shape[-2:]).reshape(-1), nb).to(g.dtype)
        per_head = g.reshape(g.shape[0], -1) @ onehot                                # [H_stage, nb]
        out = torch.zeros(H, nb, dtype=g.dtype, device=g.device)
        out[h.reshape(-1)] = per_head          # each stage head appears once: a plain write, no accumulation
        return out, None, None
