"""Plans: asymptotic classes of the built-ins, pair counts vs the mask, caching that is never stale."""
import pytest
import torch

import patterndsl as pd
from patterndsl.plan.cost import N, pairs


@pytest.mark.parametrize("name,cls", [("longformer", "O(N)"), ("performer", "O(N)"), ("luna", "O(N)"),
                                      ("luna_causal", "O(N)"), ("sliding_window", "O(N)"),
                                      ("dilated_window", "O(N)"), ("prefix_lm", "O(N^2)")])
def test_asymptotic_class(name, cls):
    plan = pd.compile(name).explain(2048)
    assert {s.complexity for s in plan.stages} == {cls}


def test_full_attention_is_quadratic():
    plan = pd.compile("pattern f() { attend softmax }").explain(1024)
    assert plan.stages[0].complexity == "O(N^2)" and plan.stages[0].beats_dense_from is None


@pytest.mark.parametrize("name,params", [("longformer", dict(window=64, globals=set())),
                                         ("dilated_window", dict(window=32, dilation=3)),
                                         ("sliding_window", dict(window=50))])
def test_pair_count_is_exact_to_first_order(name, params):
    op = pd.compile(name, **params)
    st = op.ir.stages[0]
    predicted = pairs(st.mask)
    for n in (512, 1024):
        actual = int(op.mask(n).sum())
        # bands lose about w^2 pairs at the two ends of the sequence; the slope in N is exact
        assert abs(float(predicted.subs(N, n)) - actual) <= float(predicted.subs(N, 1)) ** 2
    slope = int(op.mask(1024).sum()) - int(op.mask(512).sum())
    assert slope == float(predicted.subs(N, 1024) - predicted.subs(N, 512))


def test_global_tokens_counted_per_row_and_column():
    op = pd.compile("longformer", window=0, globals={0, 1})
    assert float(pairs(op.ir.stages[0].mask).subs(N, 100)) == 100 + 4 * 100
    # rows 200 + cols 200 - their 4 shared pairs + the diagonal outside rows 0, 1 (98)
    assert int(op.mask(100).sum()) == 200 + 200 - 4 + 98


def test_plan_cache_is_keyed_on_the_pattern():
    a = pd.compile("longformer", window=64).explain(1024)
    b = pd.compile("longformer", window=64).explain(1024)
    c = pd.compile("longformer", window=128).explain(1024)
    assert a is b  # cached
    assert c is not a and c.stages[0].pairs != a.stages[0].pairs


def test_plan_report_reads_well():
    text = str(pd.compile("longformer", window=128).explain(4096, head_dim=32, dtype=torch.bfloat16))
    assert "plan for longformer at N = 4096, head_dim = 32, bfloat16 on cpu" in text
    assert "tiles 64x64:" in text and "partial (element mask)" in text
    assert "kernel  torch.pieces/bm" in text and "strided K/V windows" in text
    assert "pairs   = 131*N" in text and "class   O(N)" in text


@pytest.mark.parametrize("name,lowerings", [("luna", ["torch.dense", "torch.dense"]),
                                            ("performer", ["torch.favor"]),
                                            ("luna_causal", ["torch.luna-chunked"])])
def test_plan_names_the_lowering_per_stage(name, lowerings):
    plan = pd.compile(name, backend="torch").explain(4096)
    assert [s.lowering for s in plan.stages] == lowerings


def test_auto_picks_triton_on_cuda_and_torch_on_the_cpu():
    pytest.importorskip("triton")   # without it, auto picks torch on CUDA too
    from patterndsl.plan.select import select_backends
    ir = pd.compile("longformer_performer").ir
    assert set(select_backends(ir, "auto", torch.device("cuda")).values()) == {"triton"}
    assert set(select_backends(ir, "auto", torch.device("cpu")).values()) == {"torch"}
    plan = pd.compile("longformer_performer").explain(2048, device="cuda")     # default CUDA constants
    assert [s.lowering for s in plan.stages] == ["triton.softmax", "triton.linear"]
