"""patterndsl.distributed on 2 and 4 gloo processes over loopback: for every built-in, the sharded op's output
rows and every gradient equal the single-process op's (float64, fresh random inputs, odd lengths not divisible
by the world size, key padding), and each rank sends exactly the bytes the report predicts.

Each world size starts its processes once (`launch`) and runs all its cases there (`dist_cases.py`); the
tests read the results. NCCL on GPUs runs the same code, which is not tested here.
"""
from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl.distributed import launch
from patterndsl.distributed.report import distributed_report

import dist_cases

TOL = {"float64": 1e-12, "float32": 1e-5}
P = {"longformer": {"window": 16, "globals": {0, 5}}, "bigbird": {"block": 8},
     "sparse_transformer": {"stride": 16}, "dilated_window": {"window": 16, "dilation": 3},
     "sliding_window": {"window": 32}, "prefix_lm": {"prefix": 20}, "performer": {"features": 16},
     "longformer_performer": {"num_heads": 2, "local_heads": 1, "window": 16, "features": 16},
     "luna": {"length": 4}, "luna_causal": {"length": 4}}


def case(pattern, n, sharding="auto", padding=False, dtype="float64", label=None, heads=None, **params):
    """heads: (H, H_kv) for grouped-query attention (default 2 heads for q, k and v)."""
    tag = "-".join(f"{k}={v}" for k, v in params.items() if k not in P.get(pattern, {}))
    cid = f"{label or pattern}{'-' + tag if tag else ''}-N{n}-{sharding}{'-pad' if padding else ''}"
    cid += ("" if dtype == "float64" else f"-{dtype}") + (f"-gqa{heads[0]}x{heads[1]}" if heads else "")
    shape = dict(H=heads[0], H_kv=heads[1]) if heads else {}
    return dict(id=cid, pattern=pattern, params={**P.get(pattern, {}), **params}, n=n, sharding=sharding,
                padding=padding, dtype=dtype, **shape)


LINEAR_PACK = """pattern linear_pack(length: int = 4) {
    param p[length]
    packed = attend linear(elu1) query p keys input
    out = attend linear(favor(8)) query input keys packed
    return out, packed
}"""     # linear stages with replicated queries (p) and with replicated keys (packed)


DOCS = str(Path(__file__).resolve().parents[1] / "examples" / "document_mask.attn")   # same(segments) & window

FOUR = [case("longformer", 203, padding=True), case("longformer", 203, "zigzag", globals={0, 150}),
        case("bigbird", 203, padding=True), case("bigbird", 203, "contiguous"),
        case("sparse_transformer", 203), case("sparse_transformer", 203, padding=True, variant="fixed"),
        case("dilated_window", 203, "contiguous"), case("sliding_window", 203, padding=True),
        case("prefix_lm", 203, "contiguous"), case("performer", 203, padding=True),
        case("performer", 203, "contiguous", padding=True, causal=True),
        case("performer", 203, causal=True, kernel="relu"),
        case("longformer_performer", 203, padding=True), case("luna", 203, padding=True),
        case("luna_causal", 203, padding=True),
        case("longformer", 3, "zigzag", padding=True, window=4, globals={0}),        # ranks with no rows
        case("performer", 3, "zigzag", padding=True, causal=True), case("luna_causal", 3, "contiguous"),
        case("longformer", 203, dtype="float32"), case(LINEAR_PACK, 203, padding=True, label="linear_pack"),
        case(DOCS, 203, padding=True, label="document_mask", window=40),
        case(DOCS, 203, "zigzag", label="document_mask", window=400, causal=False)]
GQA = [case("longformer", 203, padding=True, heads=(4, 2)), case("bigbird", 203, "zigzag", heads=(4, 1)),
       case("prefix_lm", 203, padding=True, heads=(4, 2)), case("performer", 203, padding=True, heads=(4, 2)),
       case("performer", 203, padding=True, causal=True, heads=(6, 2)),
       case("luna", 203, padding=True, heads=(4, 2)), case("luna_causal", 203, "zigzag", padding=True, heads=(4, 2)),
       case("longformer_performer", 203, padding=True, heads=(4, 2), num_heads=4, local_heads=2),   # whole groups
       case("longformer_performer", 203, heads=(4, 2), num_heads=4, local_heads=1),   # a group split: repeated
       case(DOCS, 203, padding=True, label="document_mask", window=40, heads=(4, 2))]
FOUR += [dict(c, reference=True) for c in GQA]   # grouped-query attention vs the reference backend in one process
TWO = [case("longformer", 131, "contiguous", padding=True), case("prefix_lm", 131, "zigzag"),
       case("performer", 131, "zigzag", causal=True), case("luna", 131), case("luna_causal", 131, "zigzag")]


def _run(cases, world):
    return launch(dist_cases.run_cases, world, cases, timeout=240)


@pytest.fixture(scope="module")
def results():
    return {4: _run(FOUR, 4), 2: _run(TWO, 2)}


def _check(results, world, c):
    per_rank = [r[c["id"]] for r in results[world]]
    for name in per_rank[0]:
        if not name.startswith("_"):
            worst = max(r[name] for r in per_rank)
            assert worst <= TOL[c["dtype"]], f"{c['id']} on {world} ranks: {name} differs by {worst:.3g}"
    op = pd.compile(c["pattern"], **c["params"])
    sharding = per_rank[0]["_sharding"]
    ids = {nm: x for nm, x in dist_cases.inputs(op, c)[4].items() if not x.is_floating_point()}
    rep = distributed_report(op, c["n"], world, sharding=sharding, batch=2, heads=c.get("H", 2), head_dim=8,
                             dtype=getattr(torch, c["dtype"]), padding=c["padding"], runtime=ids,
                             kv_heads=c.get("H_kv"))
    for r, got in enumerate(per_rank):
        assert got["_bytes"].get("forward", 0) == rep.forward[r], f"{c['id']}: rank {r} forward bytes"
        assert got["_bytes"].get("backward", 0) == rep.backward[r], f"{c['id']}: rank {r} backward bytes"


@pytest.mark.parametrize("c", FOUR, ids=[c["id"] for c in FOUR])
def test_four_ranks_equal_one_process(results, c):
    _check(results, 4, c)


@pytest.mark.parametrize("c", TWO, ids=[c["id"] for c in TWO])
def test_two_ranks_equal_one_process(results, c):
    _check(results, 2, c)


SWEEP = [case(name, n, sh, padding=pad) for name in P for n in (257, 600) for sh in ("contiguous", "zigzag")
         for pad in (False, True)]
SWEEP += [case(DOCS, n, sh, padding=True, label="document_mask", window=100) for n in (257, 600)
          for sh in ("contiguous", "zigzag")]


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 4])
def test_sweep(world):
    res = {world: _run(SWEEP, world)}
    for c in SWEEP:
        _check(res, world, c)


def test_the_example_runs_and_checks_itself(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    import context_parallel
    assert context_parallel.main(["-n", "1024", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "contiguous sharding of 1024 tokens over 2 ranks" in out and "rank 1: 512 rows" in out
