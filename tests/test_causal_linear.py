"""The vectorised causal linear attention (`backends/torch/causal_linear.py`) against the float64 reference,
outputs and dq, dk, dv: chunk boundaries (N a multiple of the chunk, one more, one less, one chunk, chunk 1),
grouped kv heads, query offsets, key padding (leading keys padded: rows that see nothing), both carries of the
chunk states (the product and the loop), a key max that rises far within the sequence, and no future leak."""
import pytest
import torch

from patterndsl.backends.reference.features import draw_projection
from patterndsl.backends.reference.linear import linear_attention as reference
from patterndsl.backends.torch import causal_linear as CL
from patterndsl.ir.program import Elu1, Favor, ReluFeatures

MAPS = {"favor": Favor(16), "relu": ReluFeatures(16), "elu1": Elu1()}


def _data(B, H, Hk, n_q, n_k, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, Hk, n_k, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, do


def _grads(fn, xs, do):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


def _check(fm_name, B, H, Hk, n_q, n_k, chunk, offset=0, pad=False, seed=0, scale=1.0):
    fm = MAPS[fm_name]
    q, k, v, do = _data(B, H, Hk, n_q, n_k, 8, seed)
    k = k * scale
    kpm = None
    if pad:
        kpm = torch.rand(B, n_k, generator=torch.Generator().manual_seed(seed)) < 0.3
        kpm[0, :5] = True                                   # rows 0..4 of batch 0 see no key
    w = draw_projection(fm, 8) if hasattr(fm, "features") else None
    G = H // Hk
    want = _grads(lambda a, b, c: reference(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1), fm, w,
                                            causal=True, key_padding_mask=kpm, q_offset=offset), (q, k, v), do)
    got = _grads(lambda a, b, c: CL.causal_linear_attention(a, b, c, fm, w, kpm, chunk=chunk, q_offset=offset),
                 (q, k, v), do)
    for what, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), f"{what}: NaN/inf"
        err = (x - y).abs().max().item()
        assert err <= 1e-10, f"{fm_name} {what}: max error {err:.3g} (chunk {chunk}, N {n_q}, offset {offset})"


@pytest.mark.parametrize("fm", sorted(MAPS))
@pytest.mark.parametrize("n,chunk", [(32, 8), (33, 8), (31, 8), (20, 20), (20, 64), (9, 1), (40, None)])
def test_chunk_boundaries_fp64(fm, n, chunk):
    _check(fm, 2, 2, 2, n, n, chunk, seed=n)


@pytest.mark.parametrize("fm", sorted(MAPS))
def test_grouped_heads_offsets_padding_fp64(fm):
    _check(fm, 2, 4, 2, 13, 30, 4, offset=17, pad=True, seed=1)      # rows at positions 17..29
    _check(fm, 2, 4, 1, 19, 19, 8, pad=True, seed=2)
    _check(fm, 1, 2, 2, 10, 6, 4, offset=3, seed=3)                  # fewer keys than positions: padded


@pytest.mark.parametrize("matrix_max", [1, 256], ids=["loop", "product"])
def test_both_carries_and_a_rising_key_max_fp64(monkeypatch, matrix_max):
    monkeypatch.setattr(CL, "_CARRY_MATRIX_MAX", matrix_max)
    for seed in range(2):
        _check("favor", 2, 2, 2, 45, 45, 4, pad=True, seed=seed)
        _check("relu", 1, 2, 2, 45, 45, 4, seed=seed)
    k_scale = torch.linspace(0.5, 12.0, 45, dtype=torch.float64)[None, None, :, None]   # r rises by tens
    _check("favor", 1, 2, 2, 45, 45, 4, seed=5, scale=k_scale)


def test_choose_chunk_rule():
    assert CL.choose_chunk(1, 256, 64) == 1 and CL.choose_chunk(64, 256, 64) == 64
    assert CL.choose_chunk(4096, 256, 64) == 64 and CL.choose_chunk(16384, 256, 64) == 128
    assert CL.choose_chunk(16384, 32, 32) == 64


@pytest.mark.parametrize("fm", ["favor", "relu"])
def test_no_future_leak(fm):
    """Changing key t (and its value) changes no row before t, through any chunk, and no gradient before t."""
    q, k, v, _ = _data(1, 2, 2, 37, 37, 8, 7)
    w = draw_projection(MAPS[fm], 8)
    for t in (5, 16, 30):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] += 50.0                                  # a key far above the running max
        v2[:, :, t] -= 3.0
        a, b = (CL.causal_linear_attention(q, kk, vv, MAPS[fm], w, chunk=8) for kk, vv in ((k, v), (k2, v2)))
        assert torch.equal(a[:, :, :t], b[:, :, :t]), f"row before {t} changed"
        assert not torch.allclose(a[:, :, t:], b[:, :, t:])


def test_learned_projection_gradient_fp64():
    """A projection that requires grad goes through the reference's features under autograd: its gradient too."""
    fm = MAPS["favor"]
    q, k, v, do = _data(1, 2, 2, 21, 21, 8, 11)
    w0 = draw_projection(fm, 8)
    grads = []
    for fn in (lambda a, b, c, w: reference(a, b, c, fm, w, causal=True),
               lambda a, b, c, w: CL.causal_linear_attention(a, b, c, fm, w, chunk=4)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w0)]
        fn(*leaves).backward(do)
        grads.append([x.grad for x in leaves])
    for what, a, b in zip(("dq", "dk", "dv", "dw"), *grads):
        assert (a - b).abs().max() <= 1e-10, what


def test_isolation_fast_path_and_exact_path():
    """op/causal.run_isolated: all finite -> the inputs reach `run` untouched; a NaN key -> zeroed there and the
    rows that see it NaN; finite keys whose sum overflows -> the exact path, which changes nothing."""
    from patterndsl.op.causal import run_isolated
    seen = []

    def run(q, k, v):
        seen.append(k)
        return q[..., :v.shape[-1]] * 0 + v.sum(2, keepdim=True).nan_to_num(0) * 0 + 1

    q, k, v, _ = _data(1, 2, 2, 6, 6, 4, 0)
    q, k, v = q.float(), k.float(), v.float()
    assert torch.equal(run_isolated(run, q, k, v, None, 0), torch.ones(1, 2, 6, 4)) and seen[-1] is k
    bad = k.clone()
    bad[0, 1, 3, 2] = float("nan")
    out = run_isolated(run, q, bad, v, None, 0)
    assert seen[-1] is not bad and seen[-1][0, 1, 3].eq(0).all() and torch.isfinite(seen[-1]).all()
    assert torch.isnan(out[0, 1, 3:]).all() and torch.isfinite(out[0, 1, :3]).all() and torch.isfinite(out[0, 0]).all()
    big = k.clone()
    big[0, 0, :2, 0] = 3e38                                 # finite, but the sum overflows
    out = run_isolated(run, q, big, v, None, 0)
    assert seen[-1] is not big and torch.equal(seen[-1], big) and torch.equal(out, torch.ones(1, 2, 6, 4))
