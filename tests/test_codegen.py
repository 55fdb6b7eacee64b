"""Code generation for the Triton backend: generated mask predicates equal the IR's dense masks (Python floor
semantics included), band tile classes equal the dense ones, and `emit_program` text is checked and cached."""
import ast
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from patterndsl.errors import PatternError  # noqa: E402
from patterndsl.ir import mask as M  # noqa: E402
from patterndsl.ir import predicate as P  # noqa: E402
from patterndsl.ir.dense import dense_mask  # noqa: E402
from patterndsl.ir.program import Favor, Linear, ProgramIR, Softmax, Stage  # noqa: E402
from patterndsl.backends.triton import BACKEND  # noqa: E402
from patterndsl.backends.triton.codegen import emit_program, mask_module  # noqa: E402
from patterndsl.backends.triton.tiles import build_aux, make_tile_plan  # noqa: E402
from patterndsl.plan.layout import tile_layout  # noqa: E402
from patterndsl.plan.schedule import tile_classes  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _grid_kernel(OUT, AUX, N_Q, N_K, b, mask_tile: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    i = tl.arange(0, BM)[:, None]
    j = tl.arange(0, BN)[None, :]
    ok = mask_tile(i, j, b, N_Q, N_K, AUX) & (i < N_Q) & (j < N_K)
    tl.store(OUT + i * BN + j, ok.to(tl.int32))


def _generated(mask, n_q, n_k, runtime=None, batch=0, q_offset=0):
    ids = next(iter(runtime.values())) if runtime else None
    n_batch = (ids[0] if isinstance(ids, tuple) else ids).shape[0] if runtime else 1
    aux = build_aux(mask, n_q, n_k, n_batch, runtime, DEV, q_offset=q_offset)
    out = torch.zeros(64, 64, dtype=torch.int32, device=DEV)
    _grid_kernel[(1,)](out, aux, n_q, n_k, batch, mask_tile=mask_module(mask).mask_tile, BM=64, BN=64)
    return out[:n_q, :n_k].bool().cpu()


I, J, C = P.I, P.J, P.Const
PREDICATES = {
    "mod-neg-divisor": P.Cmp("==", P.Bin("%", P.Bin("-", I, J), C(-3)), C(-1)),
    "floordiv-neg": P.Cmp("==", P.Bin("//", P.Bin("-", J, I), C(4)), C(-2)),
    "mod-by-index": P.Cmp("==", P.Bin("%", I, P.Bin("-", J, C(5))), C(0)),
    "div-by-index": P.Cmp("<", P.Bin("//", P.Bin("-", I, C(7)), P.Bin("-", J, C(3))), C(0)),
    "min-max-abs": P.Logic("or", P.Cmp(">", P.Bin("*", P.Call("min", (P.Bin("-", I, J), C(2))), C(3)), C(-4)),
                           P.Cmp("==", P.Call("max", (C(30), P.Call("abs", (P.Bin("-", J, C(40)),)))), C(31))),
    "not-and-const": P.Logic("and", P.Logic("not", P.Cmp(">", P.Call("abs", (P.Bin("-", I, J),)), C(3))),
                             P.Logic("or", C(True), P.Cmp("==", I, C(0)))),
    "const-over-index": P.Cmp(">=", P.Bin("%", C(-17), P.Bin("+", J, C(1))), P.Bin("//", I, C(-5))),
    "numbers-as-conditions": P.Logic("or", P.Logic("and", P.Bin("%", I, C(3)), P.Logic("not", P.Bin("%", J, C(2)))),
                                     P.Bin("-", I, P.Bin("+", J, C(9)))),
}


@pytest.mark.parametrize("name", list(PREDICATES))
def test_where_floor_semantics(name):
    mask = M.Where(PREDICATES[name])
    assert torch.equal(_generated(mask, 45, 50), dense_mask(mask, 45, 50))


_BIG = st.sampled_from([-5, -3, -1, 0, 1, 2, 7, 1 << 31, -(1 << 31) - 1, 3 << 33])


@st.composite
def _terms(draw, depth=3):
    """Integer terms over i and j with constants near and beyond int32 (int32 / int64 text, folding)."""
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from([P.I, P.J, P.Const(draw(_BIG))]))
    kind = draw(st.sampled_from(["+", "-", "*", "//", "%", "abs", "min", "max"]))
    a = draw(_terms(depth=depth - 1))
    if kind == "abs":
        return P.Call("abs", (a,))
    b = draw(_terms(depth=depth - 1))
    return P.Call(kind, (a, b)) if kind in ("min", "max") else P.Bin(kind, a, b)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), _terms(), _terms())
def test_generated_predicates_equal_the_dense_mask(op, a, b):
    mask = M.Where(P.Cmp(op, a, b))
    assume(not list(mask.problems()))  # the language's domain: no intermediate reaches 2^63 (docs/language.md §7)
    assert torch.equal(_generated(mask, 37, 29), dense_mask(mask, 37, 29))


def test_predicates_beyond_64_bits_are_refused_by_the_verifier():
    from patterndsl.ir.verify import IRError, verify_mask
    big = P.Bin("*", P.Bin("*", I, C(3 << 33)), C(3 << 33))
    with pytest.raises(IRError, match="64-bit"):
        verify_mask(M.Where(P.Cmp("<", J, big)))
    verify_mask(M.Where(P.Cmp("<", J, P.Bin("*", I, C(1 << 31)))))  # 2^62: inside


MASKS = {
    "band-dilated": M.sliding(3, 2),
    "window-asym": M.window(5, 2),
    "strided": M.strided(4),
    "longformer": M.sliding(4) | M.global_({0, 33, 49}),
    "blocks-not": M.blocks(8) - M.CAUSAL,
    "random-cols": M.Random(2, 16, 7) | M.cols({3}),
    "inter-rows": M.inter(M.rows({1, 2, 40}), M.sliding(20)),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_match_dense(name):
    mask = MASKS[name]
    assert torch.equal(_generated(mask, 50, 47), dense_mask(mask, 50, 47))


def test_same_reads_runtime_ids_per_batch():
    mask = M.Same("seg") & M.CAUSAL
    seg = torch.tensor([[0] * 10 + [1] * 20 + [7] * 10, [5] * 40])
    runtime = {"seg": seg}
    for b in range(2):
        want = dense_mask(mask, 40, 40, runtime)[b]
        assert torch.equal(_generated(mask, 40, 40, runtime, batch=b), want)


@triton.jit
def _full_kernel(OUT, N_K, tile_full: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    qb = tl.program_id(0)
    kb = tl.program_id(1)
    tl.store(OUT + qb * tl.num_programs(1) + kb, tile_full(qb * BM, kb * BN, N_K, BM, BN).to(tl.int32))


def _dense_classes(mask, n_q, n_k, bm, bn):
    """Tile classes by brute force (0 empty, 1 partial, 2 full over the in-bounds part)."""
    allowed = dense_mask(mask, n_q, n_k)
    cls = torch.zeros(-(-n_q // bm), -(-n_k // bn), dtype=torch.int8)
    for a in range(cls.shape[0]):
        for c in range(cls.shape[1]):
            t = allowed[a * bm:(a + 1) * bm, c * bn:(c + 1) * bn]
            cls[a, c] = 2 if t.all() else int(t.any())
    return cls


@pytest.mark.parametrize("mask", [M.CAUSAL, M.sliding(5), M.window(40, -3), M.FULL], ids=str)
def test_band_tile_classes_match_dense(mask):
    n_q, n_k, bm, bn = 70, 53, 16, 16
    plan = make_tile_plan(mask, n_q, n_k, bm, bn, split=1000)
    dense = _dense_classes(mask, n_q, n_k, bm, bn)
    dense[:, -1] = dense[:, -1].clamp(max=1)          # the ragged key edge is always bound-checked
    layout = tile_layout(mask, n_q, n_k, bm, bn)
    kernel = torch.zeros_like(dense)
    kernel[layout.row_ids(), layout.col_idx] = tile_classes(layout)
    assert torch.equal(dense, kernel)
    walked = torch.zeros_like(dense, dtype=torch.bool)
    for qb, start, end, _ in plan.rows.work.tolist():
        walked[qb, start:end] = True
    assert torch.equal(walked, dense > 0)             # arithmetic loop bounds = the nonempty tiles
    full = torch.zeros(dense.shape, dtype=torch.int32, device=DEV)
    _full_kernel[dense.shape](full, n_k, tile_full=mask_module(mask).tile_full, BM=bm, BN=bn)
    full = full.cpu().bool() & walked
    assert torch.equal(full[:-1], dense[:-1] == 2)     # interval arithmetic = dense classes
    assert not (full[-1] & (dense[-1] != 2)).any()     # ragged last query block: never falsely full


def test_emit_program_text_and_cache():
    ir = ProgramIR("demo", (Stage("a", Softmax(), M.sliding(2) | M.global_({0})),
                            Stage("b", Linear(Favor(16)), M.CAUSAL, query="a")), ("b",))
    src = emit_program(ir, BLOCK_M=64, BLOCK_N=32)
    compile(src, "<emitted>", "exec")
    assert "def mask_tile_0(i, j, b, N_Q, N_K, AUX)" in src and "def tile_full_0" in src
    assert "linear attention (Favor), causal chunked scan" in src
    assert "CONSTEXPRS = {'BLOCK_M': 64, 'BLOCK_N': 32}" in src
    assert emit_program(ir, BLOCK_N=32, BLOCK_M=64) is src


def test_emit_sanitises_names():
    ir = ProgramIR("x\n'''import os", (Stage("s\"\"\"", Softmax(), M.Same("a\nb")),), ("s\"\"\"",))
    src = emit_program(ir)
    tree = ast.parse(src)   # user text stays inside the docstring and comments: no statement of its own
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds == {"Expr", "Import", "Assign", "FunctionDef"}
    assert [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names] == \
        ["triton", "triton.language"]


@pytest.mark.parametrize("constexprs,message", [
    (dict(BLOCK_K=64), "unknown constexpr 'BLOCK_K'"),
    (dict(BLOCK_M=48), "BLOCK_M must be a power of two >= 16, got 48"),
    (dict(num_warps=0), "num_warps must be an int >= 1, got 0"),
], ids=["unknown-name", "block-48", "warps-0"])
def test_emit_rejects_bad_constexprs(constexprs, message):
    ir = ProgramIR("p", (Stage("s", Softmax(), M.CAUSAL),), ("s",))
    with pytest.raises(PatternError, match=message):
        emit_program(ir, **constexprs)


def test_supports_needs_cuda_or_interpreter(monkeypatch):
    st = Stage("s", Softmax(), M.CAUSAL)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA devices (or on the CPU with TRITON_INTERPRET=1)" in BACKEND.supports(st, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKEND.supports(st, "cpu") is None
    assert "do not run on meta devices" in BACKEND.supports(st, "meta")
