"""FlexAttention export: `to_flex` masks equal `op.mask`, and `flex_attention` with the BlockMask equals the
reference backend (fp64, eager on the CPU)."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

import patterndsl as pd
from patterndsl.export import flex_block_mask, to_flex
from patterndsl.ir import mask as M
from patterndsl.ir import predicate as P
from patterndsl.ir.program import Linear, Favor, ProgramIR, Softmax, Stage
from patterndsl.op import AttentionOp

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BUILTINS = ["longformer", "performer", "luna", "luna_causal", "bigbird", "sparse_transformer", "sliding_window",
            "dilated_window", "prefix_lm", "longformer_performer", "causal", "full", "window_favor"]


def _have_parser() -> bool:
    try:
        from patterndsl.grammar import parse_module  # noqa: F401
        from patterndsl.library import builtin_names  # noqa: F401
    except ImportError:
        return False
    return True


def _op(mask, scale=None):
    ir = ProgramIR("p", (Stage("out", Softmax(scale), mask),), ("out",))
    return AttentionOp(None, ir, backend="reference")


def _heads_op(*parts):
    """A per-head program from (mask, n_heads, normaliser) triples."""
    stages, a = [], 0
    for k, (mask, n, norm) in enumerate(parts):
        stages.append(Stage(f"s{k}", norm, mask, heads=(a, a + n)))
        a += n
    ir = ProgramIR("hybrid", tuple(stages), tuple(s.name for s in stages), by_heads=True)
    return AttentionOp(None, ir, backend="reference")


def _pred(text_op, a, b):
    return P.Cmp(text_op, a, b)


DIFF = P.Bin("-", P.I, P.J)
MASKS = {
    "full": M.FULL,
    "empty": M.EMPTY,
    "causal": M.CAUSAL,
    "sliding3": M.sliding(3),
    "dilated2x2": M.sliding(2, 2),
    "window2-0": M.window(2, 0),
    "strided3-causal": M.strided(3) & M.CAUSAL,
    "global": M.global_({0, 5}) | M.sliding(1),
    "rows": M.rows({1, 2}),
    "cols-big-set": M.cols(set(range(0, 40, 3))) | M.blocks(4),
    "blocks4": M.blocks(4),
    "numbers-as-conditions": M.Where(P.Logic("or", P.Logic("and", P.Bin("%", P.I, P.Const(3)),
                                                           P.Logic("not", P.Bin("%", P.J, P.Const(2)))),
                                             P.Bin("-", P.I, P.Bin("+", P.J, P.Const(9))))),
    "random": M.Random(2, 4, 7) | M.window(1, 0),
    "where-mod": M.Where(_pred("==", P.Bin("%", DIFF, P.Const(3)), P.Const(0))),
    "where-div0": M.Where(_pred("==", P.Bin("//", P.I, P.Bin("-", P.J, P.Const(5))), P.Const(0))),
    "where-minmax": M.Where(P.Logic("and", _pred("<=", P.Call("max", (P.I, P.Const(4))), P.Call("abs", (DIFF,))),
                                    P.Logic("not", _pred(">", P.Call("min", (P.J, P.Const(9))), P.Const(6))))),
    "where-const": M.Where(P.Logic("or", _pred("<", P.Const(1), P.Const(2)), _pred("==", P.I, P.J))),
    "not-inter": ~M.sliding(1) & M.CAUSAL & ~M.cols({3}),
    "prefix-lm": M.CAUSAL | (M.cols(set(range(6))) & M.rows(set(range(6)))),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("n_q,n_k", [(23, 23), (37, 29)], ids=lambda n: f"N{n}")
def test_mask_mod_equals_mask(name, n_q, n_k):
    op = _op(MASKS[name])
    got = create_mask(to_flex(op, n_q=n_q, n_k=n_k), None, None, n_q, n_k)
    assert torch.equal(got[0, 0], op.mask(n_q, n_k))


def test_mask_mod_without_lengths_when_not_random():
    op = _op(MASKS["global"])
    got = create_mask(to_flex(op), None, None, 19, 19)
    assert torch.equal(got[0, 0], op.mask(19))


def test_mask_mod_per_head_selects_each_heads_mask():
    op = _heads_op((M.sliding(1), 2, Softmax()), (M.CAUSAL, 1, Softmax()), (M.global_({0}), 1, Softmax()))
    got = create_mask(to_flex(op), None, 4, 17, 17)[0]
    assert torch.equal(got, op.mask(17))


def test_mask_mod_of_a_named_stage():
    op = _heads_op((M.sliding(1), 2, Softmax()), (M.CAUSAL, 2, Linear(Favor(8))))
    got = create_mask(to_flex(op, "s1"), None, None, 9, 9)[0, 0]
    assert torch.equal(got, op.mask(9, stage="s1"))


def test_mask_mod_same_runtime_ids():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3]])
    op = _op(M.Same("segments") & M.CAUSAL)
    got = create_mask(to_flex(op, runtime={"segments": ids}), 2, None, 10, 10)[:, 0]
    assert torch.equal(got, op.mask(10, runtime={"segments": ids}))


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", ["causal", "sliding3", "global", "random", "where-mod", "not-inter",
                                  "cols-big-set", "empty"])
@pytest.mark.parametrize("shape", [(2, 3, 40, 40, 8), (1, 2, 50, 33, 16)],
                         ids=lambda s: "B{}-H{}-Nq{}-Nk{}-D{}".format(*s))
def test_flex_attention_equals_reference(name, shape):
    B, H, n_q, n_k, D = shape
    op = _op(MASKS[name], scale=0.3 if name == "global" else None)
    q, k, v = _rand(B, H, n_q, D), _rand(B, H, n_k, D), _rand(B, H, n_k, D)
    bm = flex_block_mask(op, None, None, n_q, n_k, BLOCK_SIZE=16)
    scale = op.ir.stages[0].normaliser.scale
    got = flex_attention(q, k, v, block_mask=bm, scale=scale)
    torch.testing.assert_close(got, op(q, k, v), rtol=1e-10, atol=1e-10)


def test_flex_attention_per_head_and_same():
    B, H, N, D = 2, 4, 24, 8
    ids = torch.randint(0, 3, (B, N)).sort(dim=1).values
    parts = ((M.Same("doc") & M.sliding(4), 2, Softmax()), (M.CAUSAL | M.cols({0}), 2, Softmax()))
    stages = tuple(Stage(f"s{k}", n, m, heads=(2 * k, 2 * k + c)) for k, (m, c, n) in enumerate(parts))
    op = AttentionOp(None, ProgramIR("h", stages, ("s0", "s1"), by_heads=True), backend="reference")
    q, k, v = _rand(B, H, N, D), _rand(B, H, N, D), _rand(B, H, N, D)
    bm = flex_block_mask(op, B, None, N, BLOCK_SIZE=8, runtime={"doc": ids})
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm), op(q, k, v, doc=ids),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [64, 100], ids=lambda n: f"N{n}")
def test_block_mask_tiles_cover_exactly_the_nonzero_tiles(n):
    op = _op(MASKS["global"] | M.Random(1, 16, 3))
    bm = flex_block_mask(op, None, None, n, BLOCK_SIZE=16)
    dense = op.mask(n)
    nb = -(-n // 16)
    padded = torch.zeros(nb * 16, nb * 16, dtype=torch.bool)
    padded[:n, :n] = dense
    tiles = padded.view(nb, 16, nb, 16).any(dim=(1, 3))
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles)


# ---------------------------------------------------------------------------------------- built-ins
def _builtin_params(name):
    small = {"longformer": {"window": 8}, "sliding_window": {"window": 4}, "dilated_window": {}}
    return small.get(name, {})


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_mask_mod_equals_mask(name):
    if not _have_parser():
        pytest.skip("the parser and built-in library have not landed")
    op = pd.compile(name, backend="reference", **_builtin_params(name))
    n = 70
    H = op.ir.num_heads
    got = create_mask(to_flex(op, n_q=n, n_k=n), None, H, n, n)[0]
    want = op.mask(n)
    assert torch.equal(got if want.dim() == 3 else got[0], want)


def test_builtins_are_all_tested():
    if not _have_parser():
        pytest.skip("the parser and built-in library have not landed")
    assert sorted(pd.builtins()) == sorted(BUILTINS)


def test_op_to_flex_method():
    op = _op(M.sliding(2))
    assert torch.equal(create_mask(op.to_flex(), None, None, 9, 9)[0, 0], op.mask(9))
    big = pd.compile("bigbird", block=4, backend="reference")          # random blocks: lengths needed
    assert torch.equal(create_mask(big.to_flex(n_q=40, n_k=40), None, None, 40, 40)[0, 0], big.mask(40))
    seg = _op(M.Same("doc") & M.CAUSAL)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    got = create_mask(seg.to_flex(runtime={"doc": ids}), 1, None, 6, 6)[0, 0]
    assert torch.equal(got, seg.mask(6, runtime={"doc": ids})[0])


# ------------------------------------------------------------------------------------------- errors
def test_random_needs_lengths():
    with pytest.raises(pd.PatternError, match=r"random\(2, 4, 7\) draws its blocks for given sequence lengths"):
        to_flex(_op(M.Random(2, 4, 7)))


def test_same_needs_runtime_ids():
    with pytest.raises(pd.PatternError, match=r"reads runtime ids 'doc', so its mask_mod needs them") as e:
        to_flex(_op(M.Same("doc")))
    assert "runtime={'doc'" in str(e.value)


def test_same_ids_must_be_2d():
    with pytest.raises(pd.PatternError, match=r"query ids for same\(doc\) must be a tensor \[B, N\], got \[5\]"):
        to_flex(_op(M.Same("doc")), runtime={"doc": torch.zeros(5, dtype=torch.long)})


def test_runtime_must_be_a_dict():
    with pytest.raises(pd.PatternError, match="runtime must be a dict of id tensors, got list"):
        to_flex(_op(M.Same("doc")), runtime=[1])


def test_bad_lengths():
    with pytest.raises(pd.PatternError, match=r"n_q must be an int >= 0, got -1"):
        to_flex(_op(M.CAUSAL), n_q=-1)
    with pytest.raises(pd.PatternError, match=r"B must be an int >= 1 or None, got 0"):
        flex_block_mask(_op(M.CAUSAL), 0, None, 8)


def test_block_mask_runtime_ids_need_batch():
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(pd.PatternError, match=r"reads runtime ids \(doc\) per batch element, so B cannot be None"):
        flex_block_mask(_op(M.Same("doc")), None, None, 8, runtime={"doc": ids})


def test_block_mask_per_head_program_checks_heads():
    op = _heads_op((M.sliding(1), 2, Softmax()), (M.CAUSAL, 1, Softmax()))
    with pytest.raises(pd.PatternError, match="pattern hybrid splits 3 heads, got H=4"):
        flex_block_mask(op, None, 4, 8)


def test_huge_index_set_is_refused():
    with pytest.raises(pd.PatternError, match=r"index set up to 1099511627 is too large to export"):
        to_flex(_op(M.cols(set(range(9)) | {1099511627})))
    # with lengths, indices beyond them are dropped and the export works
    op = _op(M.cols(set(range(9)) | {1099511627}))
    assert torch.equal(create_mask(to_flex(op, n_q=12), None, None, 12, 12)[0, 0], op.mask(12))


def test_unknown_stage():
    with pytest.raises(pd.PatternError, match="no stage 'nope' in p"):
        to_flex(_op(M.CAUSAL), "nope")


def test_doctests():
    if not _have_parser():
        pytest.skip("the doctests compile built-ins")
    import doctest
    import patterndsl.export.flex
    res = doctest.testmod(patterndsl.export.flex)
    assert res.failed == 0 and res.attempted > 0
