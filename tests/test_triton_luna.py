"""Triton Luna: causal Luna's scan kernels (forward; gradients of q, k, v, p, c) against the fp64 reference, and
bidirectional Luna's pack/unpack softmax stages through the op. GPU sizes under `-m gpu`."""
import os

import pytest
import torch

pytest.importorskip("triton")

from patterndsl.errors import PatternError  # noqa: E402
from patterndsl.ir import mask as M  # noqa: E402
from patterndsl.ir.program import Nested, ProgramIR, Softmax, Stage  # noqa: E402
from patterndsl.op import AttentionOp  # noqa: E402
from patterndsl.backends.reference.nested import nested_attention as reference  # noqa: E402
from patterndsl.backends.triton.luna import nested_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
NAMES = ("out", "dq", "dk", "dv", "dp", "dc")


def _inputs(B, H, N, D, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, c, do = (torch.randn(B, H, N, D, generator=g) for _ in range(5))
    p = torch.randn(B, H, L, D, generator=g)
    return [x.double().to(DEV) for x in (q, k, v, p, c)], do.double().to(DEV)


def _run(fn, xs, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
    out = fn(*leaves)
    out.backward(do.to(dtype))
    return [out.detach().double()] + [x.grad.double() for x in leaves]


def check(xs, do, dtype, kpm=None, fudge=4.0):
    gold = _run(lambda *a: reference(*a, key_padding_mask=kpm), xs, do, torch.float64)
    got = _run(lambda *a: nested_attention(*a, key_padding_mask=kpm), xs, do, dtype)
    low = _run(lambda *a: reference(*a, key_padding_mask=kpm), xs, do, dtype) if dtype != torch.float32 else None
    for name, g, x, r in zip(NAMES, gold, got, low or gold):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        err = (x - g).abs().max().item()
        bound = 2e-5 * max(1.0, g.abs().max().item()) if low is None else \
            fudge * (r - g).abs().max().item() + 1e-4
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("shape", [(2, 1, 45, 16, 16), (1, 2, 70, 64, 5)],
                         ids=["B2-H1-N45-D16-l16", "B1-H2-N70-D64-l5"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_causal_luna_matches_reference(shape, padded):
    xs, do = _inputs(*shape, seed=shape[2])
    kpm = None
    if padded:
        kpm = torch.rand(shape[0], shape[2], generator=torch.Generator().manual_seed(2)) < 0.3
        kpm[-1, :6] = True                          # the first rows of the last batch see no key
        kpm = kpm.to(DEV)
    check(xs, do, torch.float32, kpm=kpm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_reference_error(dtype):
    xs, do = _inputs(1, 2, 40, 32, 16, seed=3)
    check(xs, do, dtype)


def test_no_future_leakage():
    xs, _ = _inputs(1, 1, 40, 16, 8, seed=4)
    q, k, v, p, c = (x.float() for x in xs)
    a = nested_attention(q, k, v, p, c)
    k2, v2, c2 = k.clone(), v.clone(), c.clone()
    for t in (k2, v2, c2):
        t[:, :, 30:] += 4.0
    b = nested_attention(q, k2, v2, p, c2)
    assert torch.equal(a[:, :, :30], b[:, :, :30])


def test_causal_luna_through_op():
    ir = ProgramIR("luna_causal", (Stage("out", Nested("p"), M.CAUSAL),), ("out",), params=(("p", 8),))
    xs, _ = _inputs(2, 2, 37, 16, 8, seed=5)
    q, k, v, _, c = (x.float() for x in xs)
    p = torch.randn(2, 8, 16, device=DEV)                     # per-head packed queries [H, l, D]
    want = AttentionOp(None, ir, backend="reference")(q, k, v, p=p, c=c)
    got = AttentionOp(None, ir, backend="triton")(q, k, v, p=p, c=c)
    assert (got - want).abs().max() < 1e-5


def test_pack_unpack_through_op():
    """Bidirectional Luna: pack (8 packed queries over 45 padded keys) and unpack are softmax stages."""
    ir = ProgramIR("luna", (Stage("packed", Softmax(), M.FULL, query="p"),
                            Stage("out", Softmax(), M.FULL, keys="packed")), ("out", "packed"), params=(("p", 8),))
    xs, _ = _inputs(2, 2, 45, 16, 8, seed=6)
    q, k, v, _, _ = (x.float().requires_grad_() for x in xs)
    p = torch.randn(8, 16, device=DEV, requires_grad=True)
    kpm = torch.zeros(2, 45, dtype=torch.bool, device=DEV)
    kpm[1, 30:] = True
    outs = {}
    for backend in ("reference", "triton"):
        out, packed = AttentionOp(None, ir, backend=backend)(q, k, v, key_padding_mask=kpm, p=p)
        grads = torch.autograd.grad((out.sum() + packed.square().sum()), (q, k, v, p))
        outs[backend] = (out, packed) + grads
    for name, a, b in zip(("out", "packed", "dq", "dk", "dv", "dp"), outs["reference"], outs["triton"]):
        assert (a - b).abs().max() < 1e-4, name


def test_input_errors():
    xs, _ = _inputs(1, 1, 8, 16, 4)
    q, k, v, p, c = (x.float() for x in xs)
    with pytest.raises(PatternError, match=r"float16, bfloat16 or float32 tensors of one dtype, got torch.float32, "
                                           r"torch.float32, torch.float32, torch.float16, torch.float32"):
        nested_attention(q, k, v, p.half(), c)
    with pytest.raises(PatternError, match="causal Luna on the Triton kernels computes in float32 at most"):
        nested_attention(*(x.double() for x in (q, k, v, p, c)))
    with pytest.raises(PatternError, match=r"p \[B, H, l, D\]: got q \[1, 1, 8, 16\], k \[1, 1, 8, 16\], "
                                           r"v \[1, 1, 8, 16\], p \[4, 16\]"):
        nested_attention(q, k, v, p[0, 0], c)
    with pytest.raises(PatternError, match="up to 128 packed queries, got 200"):
        nested_attention(q, k, v, torch.randn(1, 1, 200, 16, device=DEV), c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_real_sizes(dtype):
    xs, do = _inputs(2, 8, 4096, 64, 16, seed=7)
    check(xs, do, dtype, fudge=5.0)


def test_custom_op_registration():
    """Schema, fake tensor, autograd registration and AOT dispatch of patterndsl::triton_luna."""
    from patterndsl.backends.triton import luna as L
    xs, _ = _inputs(1, 2, 40, 16, 8, seed=8)
    q, k, v, p, c = (x.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in xs)
    kpm = torch.zeros(1, 40, dtype=torch.bool, device=DEV)
    kpm[0, -3:] = True
    torch.library.opcheck(L._luna_op, (q, k, v, p, c, kpm))
    q, k, v, p, c = (x.detach() for x in (q, k, v, p, c))
    do = torch.randn_like(q.transpose(1, 2)).transpose(1, 2)
    torch.library.opcheck(L._luna_bwd_op, (do, q, k, v, p, c, kpm))
