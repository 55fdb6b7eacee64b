"""Triton block-sparse softmax attention (forward and backward) against the fp64 reference, in the interpreter
on small shapes (ragged N, dilation, many global tokens, empty rows, padding, fp16/bf16, head dims 16 and 64)
and on a GPU at real sizes (`-m gpu`)."""
import os

import pytest
import torch

pytest.importorskip("triton")

from patterndsl.errors import PatternError  # noqa: E402
from patterndsl.ir import mask as M  # noqa: E402
from patterndsl.ir import predicate as P  # noqa: E402
from patterndsl.ir.dense import dense_mask  # noqa: E402
from patterndsl.ir.program import ProgramIR, Softmax, Stage  # noqa: E402
from patterndsl.op import AttentionOp  # noqa: E402
from patterndsl.backends.reference.softmax import softmax_attention as reference  # noqa: E402
from patterndsl.backends.triton.softmax import softmax_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _inputs(B, H, NQ, NK, D, DV=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, NQ, D, generator=g), torch.randn(B, H, NK, D, generator=g)
    v = torch.randn(B, H, NK, DV or D, generator=g)
    do = torch.randn(B, H, NQ, DV or D, generator=g)
    return [x.double().to(DEV) for x in (q, k, v, do)]


def _run(fn, q, k, v, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(dtype))
    return [out.detach().double()] + [x.grad.double() for x in leaves]


def check(mask, q, k, v, do, dtype, kpm=None, runtime=None, fudge=4.0, **kw):
    """fast error <= fudge * (error of the reference run in `dtype`) + a floor, vs the fp64 golden, for out,
    dq, dk, dv. fp32/fp64 kernels are held to an absolute 2e-5 of the golden."""
    allowed = dense_mask(mask, q.shape[2], k.shape[2], runtime, device=q.device)
    scale = q.shape[-1] ** -0.5

    def ref(a, b, c):
        return reference(a, b, c, allowed, scale, kpm)[0]

    def fast(a, b, c):
        return softmax_attention(a, b, c, mask, key_padding_mask=kpm, runtime=runtime, **kw)

    gold = _run(ref, q, k, v, do, torch.float64)
    got = _run(fast, q, k, v, do, dtype)
    low = _run(ref, q, k, v, do, dtype) if dtype in (torch.float16, torch.bfloat16) else None
    for name, g, x, r in zip(("out", "dq", "dk", "dv"), gold, got, low or gold):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        err = (x - g).abs().max().item()
        bound = 2e-5 * max(1.0, g.abs().max().item()) if low is None else \
            fudge * (r - g).abs().max().item() + 1e-4
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


GLOBALS = frozenset(range(0, 64, 5))
CASES = {  # id names the shape: B-H-N-D (and what it covers)
    "B2-H2-N70-D16-longformer-split": (M.sliding(4) | M.global_({0, 33, 69}), 2, 2, 70, 16, dict(split=1)),
    "B1-H2-N50-D16-dilated": (M.sliding(3, 2), 1, 2, 50, 16, {}),
    "B1-H1-N64-D16-many-globals": (M.sliding(2) | M.global_(GLOBALS), 1, 1, 64, 16, dict(split=2)),
    "B1-H2-N45-D64-causal-band": (M.CAUSAL, 1, 2, 45, 64, dict(block=(16, 32), split=1)),
    "B1-H1-N37-D32-window": (M.window(6, 0) | M.cols({0}), 1, 1, 37, 32, dict(block=(16, 16))),
    "B1-H1-N33-D128-sliding": (M.sliding(5), 1, 1, 33, 128, dict(block=(16, 16))),
    "B1-H1-N48-D16-where": (M.Where(P.Cmp("==", P.Bin("%", P.Bin("-", P.J, P.I), P.Const(-3)), P.Const(-1))),
                            1, 1, 48, 16, {}),
    "B1-H1-N40-D16-random-blocks": (M.Random(2, 16, 3) | M.rows({5}) | (M.blocks(8) - M.CAUSAL), 1, 1, 40, 16,
                                    dict(block=(16, 16))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    mask, B, H, N, D, kw = CASES[case]
    check(mask, *_inputs(B, H, N, N, D), torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_reference_error(dtype):
    mask = M.sliding(5) | M.global_({3})
    check(mask, *_inputs(1, 2, 60, 60, 64, seed=1), dtype, block=(16, 16), split=2)


def test_empty_rows_and_padding_give_zeros_not_nan():
    mask = M.Band(10, 12, 1)                      # rows 0..9 see no key
    q, k, v, do = _inputs(2, 1, 40, 40, 16, seed=2)
    kpm = torch.rand(2, 40, generator=torch.Generator().manual_seed(3)) < 0.3
    kpm[1] = True                                 # batch 1: every key padded
    kpm = kpm.to(DEV)
    check(mask, q, k, v, do, torch.float32, kpm=kpm, block=(16, 16))
    out, lse = softmax_attention(q.float(), k.float(), v.float(), mask, key_padding_mask=kpm, return_lse=True)
    assert (out[1] == 0).all() and (out[0, :, :10] == 0).all()
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, :10]).all()


def test_padding_on_full_tiles_and_cross_lengths():
    """Luna-pack shapes: 8 queries over 70 keys, D_v != D, full mask, key padding in full tiles."""
    q, _, _, do = _inputs(2, 2, 8, 8, 16, DV=32, seed=4)
    _, k, v, _ = _inputs(2, 2, 70, 70, 16, DV=32, seed=5)
    kpm = torch.zeros(2, 70, dtype=torch.bool, device=DEV)
    kpm[0, 50:] = True
    check(M.FULL, q, k, v, do, torch.float32, kpm=kpm, block=(16, 16))


def test_same_ids_runtime():
    seg = torch.tensor([[0] * 20 + [1] * 25, [3] * 45]).to(DEV)
    check(M.Same("seg") & M.CAUSAL, *_inputs(2, 1, 45, 45, 16, seed=6), torch.float32, runtime={"seg": seg})


def test_lse_and_its_gradient():
    mask = M.sliding(3) | M.rows({0})
    q, k, v, _ = _inputs(1, 1, 40, 40, 16, seed=7)
    allowed = dense_mask(mask, 40, 40, device=q.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = reference(*leaves, allowed, 0.25)
    (out.sum() + lse.sum()).backward()
    fast = [x.float().requires_grad_() for x in (q, k, v)]
    o2, l2 = softmax_attention(*fast, mask, scale=0.25, return_lse=True, split=1, block=(16, 16))
    (o2.sum() + l2.sum()).backward()
    assert (l2.double() - lse).abs().max() < 1e-5
    for a, b in zip(fast, leaves):
        assert (a.grad.double() - b.grad).abs().max() < 1e-4


def test_torch_compile_fullgraph():
    mask = M.sliding(4) | M.global_({0})
    q, k, v, do = _inputs(1, 2, 40, 40, 16, seed=8)

    def f(a, b, c):
        return softmax_attention(a, b, c, mask, block=(16, 16))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _run(compiled, q, k, v, do, torch.float32)
    want = _run(f, q, k, v, do, torch.float32)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-6)


def test_backend_through_attention_op():
    ir = ProgramIR("p", (Stage("out", Softmax(scale=0.3), M.window(6, 1) | M.cols({2})),), ("out",))
    q, k, v, _ = _inputs(2, 2, 37, 37, 16, seed=9)
    q, k, v = q.float(), k.float(), v.float()
    kpm = torch.zeros(2, 37, dtype=torch.bool, device=DEV)
    kpm[1, -5:] = True
    want = AttentionOp(None, ir, backend="reference")(q, k, v, key_padding_mask=kpm)
    got = AttentionOp(None, ir, backend="triton")(q, k, v, key_padding_mask=kpm)
    assert (got - want).abs().max() < 1e-5


def _q(n=8, d=16):
    return torch.randn(1, 1, n, d, device=DEV)


def _q2():
    return torch.randn(1, 2, 8, 16, device=DEV)


INPUT_ERRORS = {  # id: (call, message)
    "dtype-mix": (lambda: softmax_attention(_q(), _q(), _q().half(), M.CAUSAL),
                  "float16, bfloat16 or float32 tensors of one dtype, got torch.float32, torch.float32, "
                  "torch.float16"),
    "float64": (lambda: softmax_attention(_q().double(), _q().double(), _q().double(), M.CAUSAL),
                "(?s)float64 inputs would come back at float32 accuracy.*backend='torch' or backend='reference'"),
    "gqa-3-over-2": (lambda: softmax_attention(torch.randn(1, 3, 8, 16, device=DEV), _q2(), _q2(), M.CAUSAL),
                     r"(?s)k \[1, 2, 8, 16\].*H_kv dividing H"),
    "head-dim-512": (lambda: softmax_attention(_q(4, 512), _q(4, 512), _q(4, 512), M.CAUSAL),
                     "head dims up to 256, got q 512"),
    "k-head-dim": (lambda: softmax_attention(_q(), _q(8, 8), _q(), M.CAUSAL),
                   r"q, k, v shapes do not fit: q \[1, 1, 8, 16\], k \[1, 1, 8, 8\]"),
    "q-3-dims": (lambda: softmax_attention(_q()[0], _q(), _q(), M.CAUSAL),
                 r"q must be a tensor \[B, H, N, D\], got 3 dims"),
    "padding-dtype": (lambda: softmax_attention(_q(), _q(), _q(), M.CAUSAL,
                                                key_padding_mask=torch.zeros(1, 8, dtype=torch.long)),
                      r"key_padding_mask must be a bool tensor \[B, N_k\], got torch.int64"),
    "block-16x24": (lambda: softmax_attention(_q(), _q(), _q(), M.CAUSAL, block=(16, 24)),
                    r"block must be \(BLOCK_M, BLOCK_N\), powers of two >= 16, got \(16, 24\)"),
    "split-0": (lambda: softmax_attention(_q(), _q(), _q(), M.CAUSAL, split=0),
                "split .most tiles per program. must be an int >= 1, got 0"),
    "ids-missing": (lambda: softmax_attention(_q(), _q(), _q(), M.Same("seg")),
                    "reads runtime ids 'seg', but none were given"),
    "ids-short": (lambda: softmax_attention(_q(), _q(), _q(), M.Same("seg"),
                                            runtime={"seg": torch.zeros(1, 7, dtype=torch.long)}),
                  r"seg \(query ids\) must be an integer tensor \[1, 8\], got torch.int64 \[1, 7\]"),
}


@pytest.mark.parametrize("case", list(INPUT_ERRORS))
def test_input_errors(case):
    call, message = INPUT_ERRORS[case]
    with pytest.raises(PatternError, match=message):
        call()


# ---------------------------------------------------------------------------------------------- GPU sizes
GPU_CASES = {
    "B2-H8-N4096-D64-longformer": (M.sliding(256) | M.global_({0, 1, 2, 100, 2000}), 2, 8, 4096, 64),
    "B1-H8-N4093-D128-causal": (M.CAUSAL, 1, 8, 4093, 128),
    "B2-H4-N2048-D64-dilated": (M.sliding(64, 4), 2, 4, 2048, 64),
    "B1-H4-N3000-D32-bigbird": (M.sliding(64) | M.global_(range(64)) | M.Random(3, 64, 1), 1, 4, 3000, 32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_real_sizes(case, dtype):
    mask, B, H, N, D = GPU_CASES[case]
    q, k, v, do = _inputs(B, H, N, N, D, seed=11)
    check(mask, q, k, v, do, dtype, fudge=5.0)


# --------------------------------------------------------------------------------------------- built-ins
def _builtin_names():
    try:
        import patterndsl as pd
        return pd.builtins()
    except Exception:  # the parser and library are not there yet
        return []


@pytest.mark.parametrize("name", _builtin_names() or [pytest.param("none", marks=pytest.mark.skip("no built-ins"))])
def test_builtin_matches_reference(name):
    """`pd.compile(name, backend="triton")` equals the reference backend, outputs and gradients (B1-N48-D16)."""
    import patterndsl as pd
    if any(st.score is not None for st in pd.compile(name, backend="reference").ir.stages):
        pytest.skip("score terms have no Triton kernel yet (test_scores_backends checks the refusal)")
    ops = {b: pd.compile(name, backend=b) for b in ("reference", "triton")}
    ir = ops["triton"].ir
    H = ir.num_heads or 2
    q, k, v, _ = (x.float() for x in _inputs(1, H, 48, 48, 16, seed=12))
    g = torch.Generator().manual_seed(13)
    extra = {}
    for n in ops["triton"].input_names():
        if n in dict(ir.params):
            extra[n] = torch.randn(dict(ir.params)[n], 16, generator=g).to(DEV)
        elif n == "c":
            extra[n] = torch.randn(1, H, 48, 16, generator=g).to(DEV)
        else:
            extra[n] = torch.randint(0, 3, (1, 48), generator=g).sort(-1).values.to(DEV)
    results = {}
    for backend, op in ops.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        outs = op(*leaves, **extra)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=DEV).view_as(o)).sum() for o in outs)
        results[backend] = list(outs) + list(torch.autograd.grad(loss, leaves))
    for a, b in zip(results["reference"], results["triton"]):
        assert (a - b).abs().max() < 1e-4


def test_custom_op_registration():
    """Schema, fake tensor, autograd registration and AOT dispatch of patterndsl::triton_softmax."""
    from patterndsl.backends.triton import softmax as S
    q, k, v, _ = (x.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # layers' strides
                  for x in _inputs(1, 2, 40, 40, 16, seed=14))
    kpm = torch.zeros(1, 40, dtype=torch.bool, device=DEV)
    kpm[0, -3:] = True
    from patterndsl.backends.custom import register
    key = register("triton_softmax", M.sliding(3) | M.global_({0}), 16, 16, 2, 4)
    torch.library.opcheck(S._softmax_op, (q, k, v, kpm, [], key, 0.25, [0]))
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = S._softmax_op(q, k, v, kpm, [], key, 0.25, [0])
    do = torch.randn_like(out.transpose(1, 2)).transpose(1, 2)
    torch.library.opcheck(S._softmax_bwd_op, (do, None, q, k, v, out, lse, kpm, [], key, 0.25, [0]))


def test_torch_compile_attention_op_in_module():
    ir = ProgramIR("p", (Stage("out", Softmax(), M.sliding(4) | M.global_({0})),), ("out",))
    op = AttentionOp(None, ir, backend="triton")
    q, k, v, do = _inputs(1, 2, 40, 40, 16, seed=15)
    op(q.float(), k.float(), v.float())                    # eager warm-up: backends resolved and cached

    class Layer(torch.nn.Module):
        def forward(self, a, b, c):
            return op(a, b, c)

    got = _run(torch.compile(Layer(), fullgraph=True, backend="aot_eager"), q, k, v, do, torch.float32)
    want = _run(Layer(), q, k, v, do, torch.float32)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-6)


def test_torch_compile_layers_fullgraph():
    """A model of `pd.nn.Attention` layers on the Triton backend compiles with fullgraph=True and matches eager
    (outputs and parameter gradients): block-sparse softmax, FAVOR+ and causal Luna custom ops."""
    pd = pytest.importorskip("patterndsl")
    if not hasattr(pd, "nn") or not hasattr(pd.nn, "Attention") or not _builtin_names():
        pytest.skip("pd.nn.Attention or the built-ins have not landed")
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([pd.nn.Attention("longformer", 32, 2, backend="triton", window=8, globals={0, 9}),
                                  pd.nn.Attention("performer", 32, 2, backend="triton", features=16, causal=True),
                                  pd.nn.Attention("luna_causal", 32, 2, backend="triton")]).to(DEV)

    def model(x):
        for layer in layers:
            y = layer(x)
            x = x + (y[0] if isinstance(y, tuple) else y)
        return x

    x = torch.randn(1, 24, 32, device=DEV)

    def run(fn):
        layers.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layers.named_parameters() if p.grad is not None}

    want, want_grads = run(model)
    got, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5)
