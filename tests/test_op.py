"""`AttentionOp` input validation: every error message of op.py (tensors, params, projection, mask, backend)."""
import re

import pytest
import torch

from patterndsl import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.program import INPUT, Elu1, Favor, Linear, Nested, ProgramIR, Softmax, Stage
from patterndsl.op import AttentionOp


def _op(*stages, outputs=None, params=(), by_heads=False, **kw):
    ir = ProgramIR("prog", tuple(stages), outputs or (stages[-1].name,), params, by_heads)
    return AttentionOp(None, ir, backend="reference", **kw)


SLIDING = _op(Stage("out", Softmax(), M.sliding(2)))
LUNA = _op(Stage("packed", Softmax(), query="p", keys=INPUT), Stage("out", Softmax(), keys="packed"),
           outputs=("out", "packed"), params=(("p", 3),))
CAUSAL_LUNA = _op(Stage("out", Nested("p"), M.CAUSAL), params=(("p", 3),))
SAME = _op(Stage("out", Softmax(), M.Same("seg")))
HYBRID = _op(Stage("a", Softmax(), M.sliding(1), heads=(0, 2)), Stage("b", Linear(Elu1()), heads=(2, 4)),
             outputs=("a", "b"), by_heads=True)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q = _t(2, 2, 6, 4)


def _raises(msg: str, fn, *args, **kw):
    with pytest.raises(PatternError, match=re.escape(msg)):
        fn(*args, **kw)


# ------------------------------------------------------------------------------------------ q, k, v
def test_tensor_kinds():
    _raises("q must be a torch.Tensor [B, H, N, D], got list", SLIDING, [1.0], Q, Q)
    _raises("v must be a torch.Tensor [B, H, N, D], got NoneType", SLIDING, Q, Q, None)
    _raises("k must have 4 dims [B, H, N, D], got 3 dims [2, 6, 4]", SLIDING, Q, _t(2, 6, 4), Q)
    _raises("q must be floating point, got torch.int64", SLIDING, torch.ones(2, 2, 6, 4, dtype=torch.long), Q, Q)
    _raises("q, k, v must share a dtype, got torch.float32, torch.float64, torch.float32",
            SLIDING, Q, Q.double(), Q)
    _raises("q, k, v must be on one device, got cpu, meta, cpu", SLIDING, Q, _t(2, 2, 6, 4, device="meta"), Q)


def test_shapes():
    _raises("q, k, v must share the batch: q [2, 2, 6, 4], k [1, 2, 6, 4], v [2, 2, 6, 4]",
            SLIDING, Q, _t(1, 2, 6, 4), Q)
    _raises("k must have q's head dim 4: expected [2, H_kv, N_k, 4], got [2, 2, 6, 5]", SLIDING, Q, _t(2, 2, 6, 5), Q)
    _raises("v must have k's heads and length: expected [2, 2, 6, D_v], got [2, 2, 5, 4]", SLIDING, Q, Q,
            _t(2, 2, 5, 4))
    _raises("v must have k's heads and length: expected [2, 2, 6, D_v], got [2, 1, 6, 4]", SLIDING, Q, Q,
            _t(2, 1, 6, 4))
    q = _t(1, 3, 5, 4)
    _raises("pattern prog splits 4 heads, but q has 3 heads [1, 3, 5, 4]", HYBRID, q, q, q)
    q = _t(1, 4, 5, 4)
    assert HYBRID(q, q, q).shape == (1, 4, 5, 4)


def test_key_padding_mask():
    _raises("key_padding_mask must be a bool tensor [B, N_k], got torch.int64", SLIDING, Q, Q, Q,
            key_padding_mask=torch.zeros(2, 6, dtype=torch.long))
    _raises("key_padding_mask must be a bool tensor [B, N_k], got list", SLIDING, Q, Q, Q, key_padding_mask=[0])
    _raises("key_padding_mask must be [2, 6] (batch, keys), got [2, 5]", SLIDING, Q, Q, Q,
            key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_inputs_named_and_missing():
    _raises("unexpected input 'p' for pattern prog", SLIDING, Q, Q, Q, p=_t(3, 4))
    with pytest.raises(PatternError, match="it takes only q, k, v"):
        SLIDING(Q, Q, Q, p=_t(3, 4))
    with pytest.raises(PatternError, match="it takes: p"):
        LUNA(Q, Q, Q, seg=_t(3, 4))
    with pytest.raises(PatternError, match=re.escape("pattern prog needs the input 'p'")) as e:
        LUNA(Q, Q, Q)
    assert "pass p=<tensor [3, D]> (learned packed queries)" in str(e.value)
    with pytest.raises(PatternError, match="needs the input 'c'") as e:
        CAUSAL_LUNA(Q, Q, Q, p=_t(3, 4))
    assert "pass c=<tensor [B, H_kv, N, D]>: the pack keys pc(x) of causal Luna, shaped like k" in str(e.value)
    with pytest.raises(PatternError, match="needs the input 'seg'") as e:
        SAME(Q, Q, Q)
    assert "pass seg=<LongTensor [B, N]> of ids for same(seg)" in str(e.value)


def test_learned_param():
    _raises("p must be a tensor [3, 4], got list", LUNA, Q, Q, Q, p=[1.0])
    _raises("p must match q's dtype and device (torch.float32, cpu), got torch.float64, cpu",
            LUNA, Q, Q, Q, p=_t(3, 4).double())
    _raises("p must be [3, 4], [2, 3, 4] or [2, 2, 3, 4], got [3, 5]", LUNA, Q, Q, Q, p=_t(3, 5))
    _raises("p must be [3, 4], [2, 3, 4] or [2, 2, 3, 4], got [5, 3, 4]", LUNA, Q, Q, Q, p=_t(5, 3, 4))
    _raises("p must be [3, 4], [2, 3, 4] or [2, 2, 3, 4], got [1, 2, 3, 4]", LUNA, Q, Q, Q, p=_t(1, 2, 3, 4))
    for shape in ((3, 4), (2, 3, 4), (2, 2, 3, 4)):
        out, packed = LUNA(Q, Q, Q, p=_t(*shape))
        assert out.shape == (2, 2, 6, 4) and packed.shape == (2, 2, 3, 4)


def test_causal_luna_pack_keys():
    _raises("c (pack keys) must be like k: torch.float32 [2, 2, 6, 4], got torch.float32 [2, 2, 5, 4]",
            CAUSAL_LUNA, Q, Q, Q, p=_t(3, 4), c=_t(2, 2, 5, 4))
    _raises("c (pack keys) must be like k: torch.float32 [2, 2, 6, 4], got list list", CAUSAL_LUNA, Q, Q, Q,
            p=_t(3, 4), c=[1])
    assert CAUSAL_LUNA(Q, Q, Q, p=_t(3, 4), c=Q).shape == (2, 2, 6, 4)


def test_projection():
    bad = _op(Stage("out", Linear(Favor(8))), projection=torch.randn(8, 5))
    _raises("projection for stage out must be a tensor [8, 4] (features, head_dim), got [8, 5]", bad, Q, Q, Q)
    _raises("projection for stage out must be a float tensor [8, head_dim] (features, head_dim), got str",
            _op, Stage("out", Linear(Favor(8))), projection={"out": "nope"})
    w = torch.randn(8, 4, dtype=torch.float64)
    given = _op(Stage("out", Linear(Favor(8))), projection=w)
    assert torch.equal(given.projection(given.ir.stages[0], 4, "cpu", torch.float64), w)
    assert given.projection(_op(Stage("o", Linear(Elu1()))).ir.stages[0], 4, "cpu", torch.float32) is None


def test_mask_and_backend():
    _raises("n_q must be an int >= 0, got -1", SLIDING.mask, -1)
    _raises("n_k must be an int >= 0, got 2.5", SLIDING.mask, 3, 2.5)
    _raises("n_q must be an int >= 0, got True", SLIDING.mask, True)
    with pytest.raises(PatternError, match="no stage 'outt' in prog") as e:
        SLIDING.mask(4, stage="outt")
    assert "stages: out" in str(e.value)
    assert SLIDING.mask(5).sum().item() == 19
    with pytest.raises(PatternError, match="unknown backend 'refrence'") as e:
        AttentionOp(None, SLIDING.ir, backend="refrence")
    assert "did you mean 'reference'?" in str(e.value)
    with pytest.raises(PatternError, match="unknown backend 'xyz'") as e:
        AttentionOp(None, SLIDING.ir, backend="xyz")
    assert "one of: auto, reference, torch, triton" in str(e.value)


def test_head_dim_runtime_ids_backend_mask_size_and_projection_errors():
    _raises("head dims must be >= 1: q [2, 2, 6, 0], v [2, 2, 6, 0]", SLIDING, _t(2, 2, 6, 0), _t(2, 2, 6, 0),
            _t(2, 2, 6, 0))
    _raises("seg (query ids) must be an integer tensor [2, 6], got torch.int64 [2, 5]", SAME, Q, Q, Q,
            seg=torch.zeros(2, 5, dtype=torch.long))
    _raises("seg (key ids) must be an integer tensor [2, 6], got torch.float32 [2, 6]", SAME, Q, Q, Q,
            seg=(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6)))
    ir = SLIDING.ir
    _raises("backend must be a name (auto, reference, torch, triton), got None", AttentionOp, None, ir, None)
    _raises("op.mask builds a dense [n_q, n_k] bool tensor: at most 4294967296 pairs, got 1000000 x 1000000",
            SLIDING.mask, 10 ** 6)
    favor = ProgramIR("f", (Stage("out", Linear(Favor(4))),), ("out",))
    _raises("projection for stage out must be a float tensor [4, head_dim] (features, head_dim), got str",
            AttentionOp, None, favor, projection="x")
    _raises("projection for stage out must be a float tensor [4, head_dim] (features, head_dim), got [3, 4]",
            AttentionOp, None, favor, projection=torch.randn(3, 4))
    _raises("projection for 'outt': no random-feature stage of that name in f", AttentionOp, None, favor,
            projection={"outt": torch.randn(4, 4)})
    _raises("projection= was given, but pattern prog has no random-feature stage", AttentionOp, None, ir,
            projection=torch.randn(4, 4))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("nq,nk", [(0, 0), (3, 0), (0, 3)], ids=["NQ0-NK0", "NQ3-NK0", "NQ0-NK3"])
def test_linear_stages_with_no_query_or_no_key(causal, nq, nk):
    for backend in ("reference", "torch"):
        op = AttentionOp(None, ProgramIR("f", (Stage("out", Linear(Favor(4)), M.CAUSAL if causal else M.FULL),),
                                         ("out",)), backend=backend)
        q, k, v = _t(1, 2, nq, 4).requires_grad_(), _t(1, 2, nk, 4).requires_grad_(), _t(1, 2, nk, 4).requires_grad_()
        out = op(q, k, v)
        assert out.shape == (1, 2, nq, 4) and not out.abs().sum()
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
