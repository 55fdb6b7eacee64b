"""Smoke tests of the reference backend against itself: `torch.autograd.gradcheck` in float64 for every
built-in (and variants: its analytic gradients equal its own finite differences), and float32 / bfloat16
outputs and gradients against its own float64 run. They check self-consistency and precision, not that the
reference computes the documented function: that evidence is tests/test_oracle_op.py (independent oracles)."""
import pytest
import torch

import patterndsl as pd
from patterndsl.ir import mask as M
from patterndsl.ir.program import Elu1, Linear, ProgramIR, Softmax, Stage
from patterndsl.op import NESTED_KEYS, AttentionOp


# every built-in with its defaults, plus variants that reach other code paths at small sizes
VARIANTS = {
    "performer-causal": ("performer", dict(causal=True, features=8)),
    "performer-relu-causal-iid": ("performer", dict(kernel="relu", causal=True, features=8, orthogonal=False)),
    "longformer-causal-dilated": ("longformer", dict(window=4, dilation=2, causal=True, globals={0, 5})),
    "sparse_transformer-fixed": ("sparse_transformer", dict(stride=4, variant="fixed", summary=1)),
    "bigbird-blocks2": ("bigbird", dict(block=2, window=3, globals=1, random_blocks=1)),
    "longformer_performer-H2": ("longformer_performer", dict(num_heads=2, local_heads=1, window=4, features=8)),
    "sliding_window-3": ("sliding_window", dict(window=3)),
}
# what no built-in exercises: runtime ids, elu1
EXTRA = {
    "segments": ProgramIR("segments", (Stage("out", Softmax(), M.Same("seg") & M.CAUSAL),), ("out",)),
    "elu1": ProgramIR("elu1", (Stage("out", Linear(Elu1())),), ("out",)),
}


def _ops():
    ops = {f"builtin-{n}": (lambda n=n: pd.compile(n, backend="reference")) for n in pd.builtins()}
    ops.update({k: (lambda n=n, kw=kw: pd.compile(n, backend="reference", **kw)) for k, (n, kw) in VARIANTS.items()})
    ops.update({f"ir-{k}": (lambda ir=ir: AttentionOp(None, ir, backend="reference")) for k, ir in EXTRA.items()})
    return ops


OPS = _ops()


def _inputs(op, dtype, B=1, N=8, D=4, seed=0):
    """q, k, v, the keyword tensors (params, pack keys) and runtime ids the op needs, on fresh random data."""
    g = torch.Generator().manual_seed(seed)
    H = op.ir.num_heads or 2
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    tensors = {"q": rnd(B, H, N, D), "k": rnd(B, H, N, D), "v": rnd(B, H, N, D)}
    runtime = {}
    for name in op.input_names():
        if name in dict(op.ir.params):
            tensors[name] = rnd(dict(op.ir.params)[name], D)
        elif name == NESTED_KEYS:
            tensors[name] = rnd(B, H, N, D)
        else:
            runtime[name] = torch.randint(0, 2, (B, N), generator=g)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[:, -1] = True
    return tensors, runtime, kpm


def _call(op, names, runtime, kpm):
    def f(*ts):
        kw = dict(zip(names, ts))
        return op(kw.pop("q"), kw.pop("k"), kw.pop("v"), key_padding_mask=kpm, **kw, **runtime)
    return f


@pytest.mark.parametrize("make", list(OPS.values()), ids=list(OPS))
def test_smoke_gradcheck_fp64_B1_N8_D4(make):
    op = make()
    tensors, runtime, kpm = _inputs(op, torch.float64)
    args = tuple(t.requires_grad_() for t in tensors.values())
    assert torch.autograd.gradcheck(_call(op, list(tensors), runtime, kpm), args)


def _outputs_and_grads(op, tensors, runtime, kpm):
    args = tuple(t.detach().requires_grad_() for t in tensors.values())
    out = _call(op, list(tensors), runtime, kpm)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    seed = torch.Generator().manual_seed(99)
    loss = sum((o.double() * torch.randn(o.shape, generator=seed, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {n: a.grad.double() for n, a in zip(tensors, args)}


# bf16: 6e-2 because op.projection hands random features a bf16-rounded W (relu_causal's dk error is 4.5e-2;
# 2e-3 with W kept in float32); everything else is within 7e-3.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make", list(OPS.values()), ids=list(OPS))
def test_smoke_low_precision_against_own_fp64_B2_N16_D8(make, dtype, tol):
    op = make()
    tensors, runtime, kpm = _inputs(op, dtype, B=2, N=16, D=8, seed=1)
    gold_out, gold_grad = _outputs_and_grads(op, {k: t.double() for k, t in tensors.items()}, runtime, kpm)
    out, grad = _outputs_and_grads(op, tensors, runtime, kpm)
    assert all(o.dtype == dtype for o in out)
    for i, (a, b) in enumerate(zip(out, gold_out)):
        assert (a.double() - b).abs().max() <= tol * (1 + b.abs().max()), f"output {i}"
    for name in tensors:
        a, b = grad[name], gold_grad[name]
        assert torch.isfinite(a).all(), f"d{name}"
        assert (a - b).abs().max() <= tol * (1 + b.abs().max()), f"d{name}"
