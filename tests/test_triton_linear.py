"""Triton linear attention (FAVOR+, relu, elu+1; fused feature maps, forward and backward) against the fp64
reference: bidirectional and causal, key padding, ragged N, several feature blocks, N_q != N_k, fp16/bf16,
and causal rows that never see the future. GPU sizes under `-m gpu`."""
import os

import pytest
import torch

pytest.importorskip("triton")

from patterndsl.errors import PatternError  # noqa: E402
from patterndsl.ir import mask as M  # noqa: E402
from patterndsl.ir.program import Elu1, Favor, Linear, ProgramIR, ReluFeatures, Stage  # noqa: E402
from patterndsl.op import AttentionOp  # noqa: E402
from patterndsl.backends.reference.features import draw_projection  # noqa: E402
from patterndsl.backends.reference.linear import linear_attention as reference  # noqa: E402
from patterndsl.backends.triton.favor import linear_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _inputs(B, H, NQ, NK, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, do = torch.randn(B, H, NQ, D, generator=g), torch.randn(B, H, NQ, D, generator=g)
    k, v = torch.randn(B, H, NK, D, generator=g), torch.randn(B, H, NK, D, generator=g)
    return [x.double().to(DEV) for x in (q, k, v, do)]


def _run(fn, q, k, v, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(dtype))
    return [out.detach().double()] + [x.grad.double() for x in leaves]


def check(fm, causal, q, k, v, do, dtype, kpm=None, m=None, fudge=4.0):
    """out, dq, dk, dv vs the fp64 golden: fp32 within 2e-5 (relative to the golden's size); fp16/bf16 within
    `fudge` times the error of the reference run in that dtype (plus a floor)."""
    w = None if isinstance(fm, Elu1) else draw_projection(fm, q.shape[-1]).to(DEV)

    def ref(a, b, c):
        return reference(a, b, c, fm, None if w is None else w.to(a.dtype), causal, kpm)

    def fast(a, b, c):
        return linear_attention(a, b, c, fm, None if w is None else w.to(a.dtype), causal, kpm)

    gold = _run(ref, q, k, v, do, torch.float64)
    got = _run(fast, q, k, v, do, dtype)
    low = _run(ref, q, k, v, do, dtype) if dtype in (torch.float16, torch.bfloat16) else None
    for name, g, x, r in zip(("out", "dq", "dk", "dv"), gold, got, low or gold):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        err = (x - g).abs().max().item()
        bound = 2e-5 * max(1.0, g.abs().max().item()) if low is None else \
            fudge * (r - g).abs().max().item() + 1e-4
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


CASES = {  # B-H-Nq-Nk-D, feature map, causal, key padding
    "B2-H1-N45-D16-favor40-causal-pad": (Favor(40), True, True, (2, 1, 45, 45, 16)),
    "B1-H2-N70-D64-favor70-bidir": (Favor(70), False, False, (1, 2, 70, 70, 64)),
    "B2-H1-N37-D16-favor24-bidir-pad": (Favor(24, orthogonal=False, scaling=1), False, True, (2, 1, 37, 37, 16)),
    "B1-H1-Nq20-Nk45-D16-favor-bidir": (Favor(16), False, False, (1, 1, 20, 45, 16)),
    "B1-H1-Nq45-Nk20-D16-favor-causal": (Favor(16), True, True, (1, 1, 45, 20, 16)),
    "B1-H2-N40-D16-relu-causal-pad": (ReluFeatures(24), True, True, (1, 2, 40, 40, 16)),
    "B2-H1-N33-D32-elu1-bidir-pad": (Elu1(), False, True, (2, 1, 33, 33, 32)),
    "B1-H1-N50-D16-elu1-causal": (Elu1(), True, False, (1, 1, 50, 50, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    fm, causal, padded, shape = CASES[case]
    q, k, v, do = _inputs(*shape, seed=len(case))
    kpm = None
    if padded:
        kpm = torch.rand(shape[0], shape[3], generator=torch.Generator().manual_seed(1)) < 0.3
        kpm[-1, :7] = True                                  # causal rows 0..6 of the last batch see no key
        kpm = kpm.to(DEV)
    check(fm, causal, q, k, v, do, torch.float32, kpm=kpm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_reference_error(dtype):
    check(Favor(32), True, *_inputs(1, 2, 40, 40, 64, seed=3), dtype)


def test_causal_rows_never_see_the_future():
    fm = Favor(24)
    w = draw_projection(fm, 16).float().to(DEV)
    q, k, v, _ = (x.float() for x in _inputs(1, 1, 40, 40, 16, seed=4))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] *= 5.0                                   # huge future keys would move a global max
    v2[:, :, 25:] += 3.0
    a = linear_attention(q, k, v, fm, w, causal=True)
    b = linear_attention(q, k2, v2, fm, w, causal=True)
    assert torch.equal(a[:, :, :25], b[:, :, :25])
    kk = k.clone().requires_grad_()
    linear_attention(q, kk, v, fm, w, causal=True)[:, :, 10].sum().backward()
    assert (kk.grad[:, :, 11:] == 0).all()


def test_through_attention_op():
    ir = ProgramIR("performer", (Stage("out", Linear(Favor(32, seed=3)), M.CAUSAL),), ("out",))
    q, k, v, _ = (x.float() for x in _inputs(2, 2, 37, 37, 16, seed=5))
    want = AttentionOp(None, ir, backend="reference")(q, k, v)
    got = AttentionOp(None, ir, backend="triton")(q, k, v)
    assert (got - want).abs().max() < 1e-5


def test_torch_compile_fullgraph():
    fm = Favor(16)
    w = draw_projection(fm, 16).float().to(DEV)
    q, k, v, do = _inputs(1, 1, 24, 24, 16, seed=6)

    def f(a, b, c):
        return linear_attention(a, b, c, fm, w, causal=True)

    got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), q, k, v, do, torch.float32)
    want = _run(f, q, k, v, do, torch.float32)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-6)


def test_input_errors():
    q = torch.randn(1, 1, 8, 16, device=DEV)
    w = torch.randn(4, 16, device=DEV)
    with pytest.raises(PatternError, match=r"projection must be a tensor \[m, 16\] \(features, head_dim\), got "
                                           r"\[4, 8\]"):
        linear_attention(q, q, q, Favor(4), w[:, :8])
    with pytest.raises(PatternError, match="float16, bfloat16 or float32 tensors of one dtype, got torch.float32, "
                                           "torch.float32, torch.float16"):
        linear_attention(q, q, q.half(), Favor(4), w)
    with pytest.raises(PatternError, match="linear attention on the Triton kernels computes in float32 at most"):
        linear_attention(q.double(), q.double(), q.double(), Favor(4), w.double())
    with pytest.raises(PatternError, match="segment must be a multiple of 16 tokens, got 24"):
        linear_attention(q, q, q, Favor(4), w, segment=24)
    with pytest.raises(PatternError, match=r"q_offset must be an int or an integer tensor \[1\], got torch.float32"):
        linear_attention(q, q, q, Favor(4), w, causal=True, q_offset=torch.zeros(1))
    with pytest.raises(PatternError, match="q_offset must be >= 0 and < 2\\*\\*31, got -3"):
        linear_attention(q, q, q, Favor(4), w, causal=True, q_offset=-3)
    with pytest.raises(PatternError, match=r"k like q \[B, H, N_k, D\] and v \[B, H, N_k, D_v\]"):
        linear_attention(q, q[..., :8], q, Favor(4), w)
    with pytest.raises(PatternError, match="no Triton kernel for the feature map str"):
        linear_attention(q, q, q, "favor", w)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_real_sizes(causal, dtype):
    check(Favor(256), causal, *_inputs(2, 8, 4096, 4096, 64, seed=7), dtype, fudge=5.0)


def test_custom_op_registration():
    """Schema, fake tensor, autograd registration and AOT dispatch of patterndsl::triton_linear."""
    from patterndsl.backends.triton import favor as F
    q, k, v, _ = (x.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # layers' strides
                  for x in _inputs(1, 2, 40, 40, 16, seed=8))
    kpm = torch.zeros(1, 40, dtype=torch.bool, device=DEV)
    kpm[0, -3:] = True
    w = torch.randn(16, 16, device=DEV)
    torch.library.opcheck(F._linear_op, (q, k, v, w, kpm, F.FAVOR, True, 1e-4, [0], 0))
    q, k, v = (x.detach() for x in (q, k, v))
    out, den = F._linear_op(q, k, v, w, kpm, F.FAVOR, True, 1e-4, [0], 0)
    do = torch.randn_like(out.transpose(1, 2)).transpose(1, 2)
    torch.library.opcheck(F._linear_bwd_op, (do, q, k, v, w, kpm, out, den, F.FAVOR, True, 1e-4, [0], 0))
