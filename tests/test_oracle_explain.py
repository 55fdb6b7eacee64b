"""`explain`'s formulas against counted work at small N, for every built-in and the options that change its
cost: pairs counted from the dense mask (`op.mask`, tested against brute force elsewhere), tiles counted from
it at the plan's block size, and FLOPs counted by torch's FLOP counter on plain-torch implementations of the
algorithms explain describes (linear attention as two products or prefix sums, causal Luna by cumulative
sums) and on the torch backend's own run where it calls plain matmuls.

What the cost model claims (plan/cost.py): pair counts are upper bounds, exact for causal and full (N(N+1)/2
and N^2), exact to first order in N for bands, index sets and their intersections with causal (edge
effects and a union's overlaps dropped); a softmax stage does 4 d FLOPs per pair; linear attention 8 N m d
(the features of q and k, phi(K)^T V, phi(Q) (...)); a packed stage l N pairs."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import oracles as O
import patterndsl as pd
from patterndsl.cli import main as cli_main
from patterndsl.plan.cost import N

D = 16

# (built-in, options, exact): what the closed form claims for this mask: "exact" (equal to the count),
# "first" (exact to first order: the same growth in N), or None (an upper bound only)
SOFTMAX = {
    "longformer-w8": ("longformer", dict(window=8), "first"),
    "longformer-w8-d2-g0,5": ("longformer", dict(window=8, dilation=2, globals={0, 5}), "first"),
    "longformer-w8-causal": ("longformer", dict(window=8, causal=True, globals={0, 5}), "first"),
    "bigbird-b4": ("bigbird", dict(block=4, window=3, globals=1, random_blocks=2), None),
    "causal": ("causal", {}, "exact"),
    "full": ("full", {}, "exact"),
    "dilated_window-w8-d3": ("dilated_window", dict(window=8, dilation=3), "first"),
    "dilated_window-w8-d2-causal": ("dilated_window", dict(window=8, dilation=2, causal=True), "first"),
    "prefix_lm-8": ("prefix_lm", dict(prefix=8), None),
    "sliding_window-8": ("sliding_window", dict(window=8), "first"),
    "sparse_transformer-strided-8": ("sparse_transformer", dict(stride=8), None),
    "sparse_transformer-fixed-8": ("sparse_transformer", dict(stride=8, variant="fixed", summary=2), None),
    "longformer_performer-local": ("longformer_performer", dict(num_heads=2, local_heads=1, window=8,
                                                                features=8), "first"),
}
SIZES = (256, 512)


def _plan(name, params, n, backend="torch"):
    return pd.compile(name, backend=backend, **params).explain(seq_len=n, head_dim=D)


def _at(expr, n) -> float:
    return float(expr.subs(N, n))


def _softmax_stage(plan):
    return next(s for s in plan.stages if s.kind == "softmax")


@pytest.mark.parametrize("name,params,exact", list(SOFTMAX.values()), ids=list(SOFTMAX))
def test_softmax_pairs_and_flops_bound_the_counted_pairs(name, params, exact):
    """pairs(N) >= the counted pairs, FLOPs = 4 d per pair; where the form claims it, pairs(N) is the count
    ("exact") or grows from N to 2N as the count does ("first": first-order exact)."""
    op = pd.compile(name, backend="torch", **params)
    counted, claimed, flops = [], [], []
    for n in SIZES:
        st = _softmax_stage(op.explain(seq_len=n, head_dim=D))
        counted.append(int(op.mask(n, n, stage=st.name).sum()))
        claimed.append(_at(st.pairs, n))
        flops.append(_at(st.flops, n))
    for n, c, p, f in zip(SIZES, counted, claimed, flops):
        assert p >= c, f"N = {n}: explain claims {p:g} pairs, {c} are allowed"
        assert p == c or exact != "exact", f"N = {n}: explain claims {p:g} pairs, {c} are allowed"
        assert f == pytest.approx(4 * D * p), f"N = {n}: FLOPs {f:g} != 4 d * pairs {4 * D * p:g}"
    if exact:
        grown, counted_growth = claimed[1] - claimed[0], counted[1] - counted[0]
        assert grown == counted_growth, \
            f"pairs grow by {grown:g} from N = {SIZES[0]} to {SIZES[1]}, the counted pairs by {counted_growth}"


# masks whose intersections have a closed form: "exact" at every N in SIZES_SMALL, or "first" (an upper bound
# that grows as the count does: within a constant of it); the old bound (the sparser part) was off by O(N)
INTERSECTIONS = {
    "causal & rows({3, 7})": "exact",                       # row i sees i + 1 keys
    "causal & cols({3, 7})": "exact",                       # column j is seen by N - j queries
    "causal & rows(range(0, 8))": "exact",
    "rows({1, 2}) & cols({3, 4, 5})": "exact",
    "causal & strided(4)": "exact",                         # N^2/8 + N/2 at multiples of 4
    "sliding(3) & rows({0, 2, 9})": "exact",
    "window(0, 4) & cols({2, 30})": "exact",               # a band above the diagonal with columns
    "causal & sliding(4)": "first",
    "causal & global({0, 5})": "first",                    # rows and columns overlap at (0, 0), (5, 0), (5, 5)
    "causal & (sliding(4) | global({0, 5}))": "first",     # longformer, causal = true
    "causal & (sliding(4) | cols(range(0, 3)) | rows({40}))": "first",
    "window(2, 6, 2) & (global({1}) | sliding(1))": "first",
}
SIZES_SMALL = (64, 128)


@pytest.mark.parametrize("mask,claim", list(INTERSECTIONS.items()), ids=list(INTERSECTIONS))
def test_intersection_pairs_are_counted(mask, claim):
    """An intersection's pairs(N) against the pairs of its dense mask: never below, equal where exact, and
    growing as the count does where exact to first order."""
    op = pd.compile(f"pattern p() {{ attend softmax over {mask} }}", backend="torch")
    counted, claimed = [], []
    for n in SIZES_SMALL:
        counted.append(int(op.mask(n, n).sum()))
        claimed.append(_at(_softmax_stage(op.explain(seq_len=n, head_dim=D)).pairs, n))
        assert claimed[-1] >= counted[-1], f"N = {n}: {claimed[-1]:g} pairs claimed, {counted[-1]} allowed"
        assert claimed[-1] == counted[-1] or claim != "exact", f"N = {n}: {claimed[-1]:g} claimed, {counted[-1]}"
    assert claimed[1] - claimed[0] == counted[1] - counted[0], (claimed, counted)


@pytest.mark.parametrize("name,params,exact", list(SOFTMAX.values()), ids=list(SOFTMAX))
def test_tiles_are_counted_exactly(name, params, exact):
    """The plan's (nonzero, partial, total) tiles are those of the dense mask cut into the plan's blocks."""
    op = pd.compile(name, backend="torch", **params)
    n = 200                                    # not a multiple of the blocks: ragged edge tiles
    st = _softmax_stage(op.explain(seq_len=n, head_dim=D))
    bm, bn = st.block
    m = op.mask(n, n, stage=st.name)
    rows, cols = -(-n // bm), -(-n // bn)
    padded = torch.zeros(rows * bm, cols * bn, dtype=torch.long)
    padded[:n, :n] = m.long()
    valid = torch.zeros_like(padded)
    valid[:n, :n] = 1
    per_tile = padded.reshape(rows, bm, cols, bn).sum((1, 3))
    size = valid.reshape(rows, bm, cols, bn).sum((1, 3))
    nonzero = int((per_tile > 0).sum())
    full = int((per_tile == size).sum())
    assert st.tiles == (nonzero, nonzero - full, rows * cols)


# --------------------------------------------------------------------------------------------- linear
def _count(fn, *args) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops()


def _product_form(q, k, v, phi, w):
    """Bidirectional linear attention as explain describes it: phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)."""
    fq, fk = phi(q, w), phi(k, w)
    return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2))


def _prefix_form(q, k, v, phi, w):
    """Causal linear attention by prefix sums of the outer products phi(k_j) v_j^T."""
    fq, fk = phi(q, w), phi(k, w)
    states = (fk[..., :, None] @ v[..., None, :]).cumsum(2)                  # [B, H, N, m, d]
    num = torch.einsum("bhnm,bhnmd->bhnd", fq, states)
    return num / (fq * fk.cumsum(2)).sum(-1, keepdim=True)


def _favor(x, w):
    a, u = O.favor_parts(x, w)
    return torch.exp(a - u.amax(-1, keepdim=True))


LINEAR = {
    "performer-favor-m32": ("performer", dict(features=32), _favor, 32),
    "performer-favor-m8-causal": ("performer", dict(features=8, causal=True), _favor, 8),
    "performer-relu-m32": ("performer", dict(features=32, kernel="relu"), O.relu_features, 32),
    "performer-relu-m16-causal": ("performer", dict(features=16, kernel="relu", causal=True),
                                  O.relu_features, 16),
    "longformer_performer-m24": ("longformer_performer", dict(num_heads=2, local_heads=1, window=8, features=24),
                                 _favor, 24),
}


@pytest.mark.parametrize("name,params,phi,m", list(LINEAR.values()), ids=list(LINEAR))
def test_linear_flops_and_pairs_match_the_counted_work(name, params, phi, m):
    """FLOPs grow with N as the counted FLOPs of the product (or prefix-sum) form do, within 5% (the counted
    work adds the denominators); pairs are N^2 (or N(N+1)/2 causal), exactly."""
    causal = params.get("causal", False)
    form = _prefix_form if causal else _product_form
    w = torch.randn(m, D, dtype=torch.float64)
    counted, claimed = [], []
    for n in (64, 128):
        q, k, v = (torch.randn(1, 1, n, D, dtype=torch.float64) for _ in range(3))
        counted.append(_count(form, q, k, v, phi, w))
        st = next(s for s in _plan(name, params, n).stages if s.kind == "linear")
        claimed.append(_at(st.flops, n))
        allowed = n * (n + 1) // 2 if causal else n * n
        assert _at(st.pairs, n) == allowed, f"N = {n}: {_at(st.pairs, n):g} pairs, {allowed} allowed"
    grown, counted_growth = claimed[1] - claimed[0], counted[1] - counted[0]
    assert abs(grown - counted_growth) <= 0.05 * counted_growth, \
        f"FLOPs grow by {grown:g} from N = 64 to 128; the counted work by {counted_growth}"


@pytest.mark.parametrize("kernel,m", [("relu", 32), ("elu1", D)], ids=["relu-m32", "elu1"])
def test_linear_flops_match_the_torch_backend_run(kernel, m):
    """The torch backend's bidirectional linear attention is two products: its counted FLOPs grow as
    explain's (within 5%)."""
    if kernel == "elu1":
        op = pd.compile("pattern e() { attend linear(elu1) }", backend="torch")
    else:
        op = pd.compile("performer", backend="torch", kernel="relu", features=m)
    counted, claimed = [], []
    for n in (64, 128):
        q, k, v = (torch.randn(1, 1, n, D) for _ in range(3))
        counted.append(_count(op, q, k, v))
        claimed.append(_at(op.explain(seq_len=n, head_dim=D).stages[0].flops, n))
    grown, counted_growth = claimed[1] - claimed[0], counted[1] - counted[0]
    assert counted_growth > 0 and abs(grown - counted_growth) <= 0.05 * counted_growth, (grown, counted_growth)


# ----------------------------------------------------------------------------------------------- Luna
@pytest.mark.parametrize("length", [4, 16, 64])
def test_luna_pack_and_unpack_pairs_are_counted(length):
    """Each of Luna's stages allows l * N pairs (the dense masks of the packed rows against the input)."""
    op = pd.compile("luna", backend="torch", length=length)
    for n in SIZES:
        plan = op.explain(seq_len=n, head_dim=D)
        counted = {"packed": int(op.mask(length, n, stage="packed").sum()),
                   "out": int(op.mask(n, length, stage="out").sum())}
        for st in plan.stages:
            assert _at(st.pairs, n) == counted[st.name], f"stage {st.name} at N = {n}"
            assert _at(st.flops, n) == pytest.approx(4 * D * counted[st.name])


def _luna_cumulative(q, k, v, p, c):
    """Causal Luna by cumulative sums (docs/language.md §5.3, no padding): the O(N l d) algorithm."""
    d = q.shape[-1]
    a = torch.nn.functional.softplus(d ** -0.5 * (c @ p.transpose(-1, -2)), beta=0.6931471805599453)
    n = torch.arange(1, q.shape[2] + 1, dtype=q.dtype)[:, None]
    ka = (k[..., :, None] @ a[..., None, :]).cumsum(2)                       # sum_j k_j a_j^T
    logits = torch.einsum("bhnd,bhndl->bhnl", d ** -0.5 * q, ka) / n
    attn = torch.softmax(logits, -1)
    av = (a[..., :, None] @ v[..., None, :]).cumsum(2)                       # sum_j a_j v_j^T
    return torch.einsum("bhnl,bhnld->bhnd", attn, av) / n


@pytest.mark.parametrize("length", [4, 16, 256])
def test_luna_causal_reports_its_packed_length(length):
    """`luna_causal` with length l: l * N pairs (each token against each packed query), and FLOPs within a
    factor 1.5 of the counted cumulative-sum algorithm, growing with l as it does."""
    op = pd.compile("luna_causal", backend="torch", length=length)
    counted = []
    for n in (64, 128):
        st = op.explain(seq_len=n, head_dim=D).stages[0]
        q, k, v, c = (torch.randn(1, 1, n, D, dtype=torch.float64) for _ in range(4))
        p = torch.randn(length, D, dtype=torch.float64)
        assert _at(st.pairs, n) == n * length, f"N = {n}: {st.pairs} pairs, {n * length} counted"
        counted.append(_count(_luna_cumulative, q, k, v, p, c))
        claimed = _at(st.flops, n)
        assert counted[-1] / 1.5 <= claimed <= 1.5 * counted[-1], f"N = {n}: FLOPs {claimed:g}, counted {counted[-1]}"


def test_explain_prints_luna_causal_length(capsys):
    """The CLI's report (in-process) shows the packed length it was given."""
    assert cli_main(["explain", "luna_causal", "-n", "1024", "--set", "length=256", "--head-dim", "16"]) == 0
    out = capsys.readouterr().out
    pairs = re.search(r"pairs\s+=\s+(\S+)\s+=\s+(\S+) at N = 1024", out)
    assert pairs and pairs.group(1) == "256*N", out
    assert float(pairs.group(2)) == pytest.approx(256 * 1024, rel=1e-3), out   # printed to 4 digits
