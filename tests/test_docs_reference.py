"""A reference written from docs/language.md alone equals the reference backend (float64, random inputs).

Each function below implements one normaliser the way a user would after reading the docs, one row at a
time in plain loops; every step quotes the sentence of docs/language.md it relies on, and
`test_the_quoted_sentences_are_in_the_docs` keeps those quotes honest. Nothing here imports patterndsl's
math: only `pd.compile(...)` to get the op under test.
"""
import math
import re
from pathlib import Path

import pytest
import torch

import patterndsl as pd

DOCS = Path(__file__).parents[1] / "docs" / "language.md"
QUOTES = []   # every sentence quoted below, checked against the docs


def doc(sentence: str) -> None:
    """Record a sentence of docs/language.md this reference relies on."""
    QUOTES.append(sentence)


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ softmax
doc("`out_r = sum_{j in A(r)} exp(s_rj) v_j / sum_{j in A(r)} exp(s_rj)`, with `s_rj = scale * (q_r . k_j)`.")
doc("`scale` is the option `scale = NUMBER` (a finite number > 0), else `1 / sqrt(d)`.")
doc("A row with `A(r)` empty outputs zeros.")
doc("`A(r)` the keys row `r` may attend to: the keys `j` with `(r, j)` in the stage's mask, minus padded keys.")
doc("Query row `r` of a call with `q_offset = o` is at absolute position `o + r`; key `j` is at position `j`.")
doc("The default `o = 0` lines query 0 up with key 0")


def softmax_rows(q, k, v, allowed, scale=None):
    """One (batch, head): q [N_q, d], k [N_k, d], v [N_k, dv]; allowed(r, j) -> bool (mask and padding)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
    for r in range(q.shape[0]):
        keys = [j for j in range(k.shape[0]) if allowed(r, j)]
        if not keys:
            continue                                            # "A row with `A(r)` empty outputs zeros."
        s = torch.stack([scale * (q[r] @ k[j]) for j in keys])
        w = torch.exp(s - s.max())                              # the shift cancels in the ratio
        out[r] = sum(w[n] * v[j] for n, j in enumerate(keys)) / w.sum()
    return out


# Masks from the table of §3, written pair by pair.
doc("| `sliding(width, dilation = 1)` | `abs(i - j) <= width*dilation` and `(i - j) % dilation == 0` |")
doc("| `global(S)` | `i in S or j in S` |")
doc("| `causal` | `j <= i` |")
doc("| `rows(S)` / `cols(S)` | `i in S` / `j in S` |")
MASKS = {
    "sliding(2, 2) | global({0, 5})": lambda i, j: (abs(i - j) <= 4 and (i - j) % 2 == 0) or i in (0, 5) or j in (0, 5),
    "causal": lambda i, j: j <= i,
    "rows({1, 3})": lambda i, j: i in (1, 3),
    "where(abs(i // 3 - j // 3) <= 1 and (i + j) % 2 == 0)":
        lambda i, j: abs(i // 3 - j // 3) <= 1 and (i + j) % 2 == 0,
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("n_q,n_k,scale", [(9, 9, None), (6, 11, 0.3), (11, 6, None)],
                         ids=["square", "more-keys", "more-queries"])
def test_masked_softmax(mask, n_q, n_k, scale):
    gen = torch.Generator().manual_seed(n_q * 31 + n_k)
    B, H, d, dv = 2, 2, 5, 3
    q, k, v = rand(B, H, n_q, d, gen=gen), rand(B, H, n_k, d, gen=gen), rand(B, H, n_k, dv, gen=gen)
    pad = torch.rand(B, n_k, generator=gen) < 0.3
    pad[0, :] = True                                  # batch 0: every key padded, so every row is empty
    option = "" if scale is None else f", scale = {scale}"
    op = pd.compile(f"pattern p() {{ attend softmax over {mask}{option} }}", backend="reference")
    got = op(q, k, v, key_padding_mask=pad)
    for b in range(B):
        for h in range(H):
            want = softmax_rows(q[b, h], k[b, h], v[b, h],
                                lambda r, j: MASKS[mask](r, j) and not pad[b, j], scale)
            torch.testing.assert_close(got[b, h], want, rtol=1e-11, atol=1e-12)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


# ---------------------------------------------------------------------------------------- linear: FAVOR+
doc("x' = x * d^(-1/4)")
doc("u  = x' W^T")
doc("a  = u - |x'|^2 / 2")
doc("phi(x) = m^(-1/2) * (exp(a - c) + eps)")
doc("for a query `q_r`: `c = max_f u_f(q_r)`, the largest projection of that query;")
doc("for keys, bidirectional (`full`): one `c` for the whole (batch, head): `c = max_{j unpadded, f} u_f(k_j)`;")
doc("for keys, causal: row `r` uses the running max `c_r = max_{j <= r, j unpadded, f} u_f(k_j)`, so key `j`'s")
doc("features at row `r` are `m^(-1/2) (exp(a(k_j) - c_r) + eps)` for `j <= r`.")
doc("out_r = sum_{j in A(r)} (phi_Q(q_r) . phi_K(k_j)) v_j  /  sum_{j in A(r)} (phi_Q(q_r) . phi_K(k_j))")
doc("`A(r)` is every unpadded key (`full`), or the unpadded keys `j <= r` (`causal`).")
doc("A row whose `A(r)` is empty, or whose denominator is 0, outputs zeros.")
doc("`pd.compile(..., projection=W)` (a tensor, or a dict from stage name to tensor) gives it;")


def favor_parts(x, w):
    """(u, a) of §5.2 for the rows of x [N, d]."""
    xs = x * x.shape[-1] ** -0.25                                # x' = x * d^(-1/4)
    u = xs @ w.T                                                 # u = x' W^T
    return u, u - (xs * xs).sum(-1, keepdim=True) / 2            # a = u - |x'|^2 / 2


def favor_phi(a, c, eps, m):
    return m ** -0.5 * (torch.exp(a - c) + eps)                  # phi(x) = m^(-1/2) * (exp(a - c) + eps)


def linear_rows(q, k, v, keys_of, phi_q, phi_k):
    """§5.2's ratio, row by row: keys_of(r) is A(r); phi_k(j, r) the features of key j as row r sees them."""
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
    for r in range(q.shape[0]):
        keys = keys_of(r)
        if not keys:
            continue                                             # empty A(r): zeros
        weights = torch.stack([phi_q(r) @ phi_k(j, r) for j in keys])
        if weights.sum() == 0:
            continue
        out[r] = sum(wt * v[j] for wt, j in zip(weights, keys)) / weights.sum()
    return out


def favor_reference(q, k, v, w, eps, valid, causal):
    m = w.shape[0]
    uq, aq = favor_parts(q, w)
    uk, ak = favor_parts(k, w)
    cq = uq.max(-1, keepdim=True).values                         # c = max_f u_f(q_r)
    unpadded = [j for j in range(k.shape[0]) if valid[j]]
    if causal:
        def c_keys(r):                                           # c_r = max_{j <= r, j unpadded, f} u_f(k_j)
            return max(uk[j].max() for j in unpadded if j <= r)
        keys_of = lambda r: [j for j in unpadded if j <= r]      # noqa: E731
        phi_k = lambda j, r: favor_phi(ak[j], c_keys(r), eps, m)  # noqa: E731
    else:
        c_all = max(uk[j].max() for j in unpadded) if unpadded else 0.0   # c = max_{j unpadded, f} u_f(k_j)
        keys_of = lambda r: unpadded                             # noqa: E731
        phi_k = lambda j, r: favor_phi(ak[j], c_all, eps, m)     # noqa: E731
    return linear_rows(q, k, v, keys_of, lambda r: favor_phi(aq[r], cq[r], eps, m), phi_k)


def run_linear(program, q, k, v, pad, **compile_args):
    op = pd.compile(program, backend="reference", **compile_args)
    return op(q, k, v, key_padding_mask=pad)


def inputs(seed, n_q=10, n_k=10, d=4, dv=3, scale_keys=1.0):
    gen = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    q = rand(B, H, n_q, d, gen=gen)
    k = rand(B, H, n_k, d, gen=gen) * scale_keys
    v = rand(B, H, n_k, dv, gen=gen)
    pad = torch.rand(B, n_k, generator=gen) < 0.3
    pad[1, :3] = True                                            # the first rows of batch 1 have no key
    return gen, q, k, v, pad


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("eps,scale_keys", [(1e-4, 1.0), (0.5, 3.0)], ids=["eps-default", "eps-large-keys-large"])
def test_favor(causal, eps, scale_keys):
    gen, q, k, v, pad = inputs(7 + int(causal), scale_keys=scale_keys)
    m = 6
    w = rand(m, q.shape[-1], gen=gen)
    program = f"pattern p() {{ attend linear(favor({m}, eps = {eps})), causal = {str(causal).lower()} }}"
    got = run_linear(program, q, k, v, pad, projection=w)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            want = favor_reference(q[b, h], k[b, h], v[b, h], w, eps, ~pad[b], causal)
            torch.testing.assert_close(got[b, h], want, rtol=1e-10, atol=1e-12)


def test_favor_stabiliser_is_part_of_the_function():
    """With c = 0 instead of the documented maxima, the outputs differ: the docs must say which c."""
    gen, q, k, v, pad = inputs(3, scale_keys=2.0)
    w = rand(4, q.shape[-1], gen=gen)
    got = run_linear("pattern p() { attend linear(favor(4, eps = 0.5)) }", q, k, v, pad, projection=w)
    uq, aq = favor_parts(q[0, 0], w)
    uk, ak = favor_parts(k[0, 0], w)
    keys = [j for j in range(k.shape[2]) if not pad[0, j]]
    naive = linear_rows(q[0, 0], k[0, 0], v[0, 0], lambda r: keys, lambda r: favor_phi(aq[r], 0.0, 0.5, 4),
                        lambda j, r: favor_phi(ak[j], 0.0, 0.5, 4))
    assert (got[0, 0] - naive).abs().max() > 1e-3


# --------------------------------------------------------------------------------------- linear: relu, elu1
doc("**`relu(features, orthogonal = true, seed = 0, redraw = 0)`**: `phi(x) = relu(x' W^T) + 0.001` for queries")
doc("**`elu1`**: `phi(x) = elu(x) + 1` (Katharopoulos et al. 2020), elementwise on the raw `x` (`x + 1` where")
doc("`x > 0`, `exp(x)` elsewhere): `m = d` features, no projection, no scaling.")


def relu_phi(x, w):
    return torch.clamp((x * x.shape[-1] ** -0.25) @ w.T, min=0) + 0.001    # relu(x' W^T) + 0.001


def elu1_phi(x):
    return torch.where(x > 0, x + 1, torch.exp(x))                         # x + 1 where x > 0, exp(x) elsewhere


@pytest.mark.parametrize("kind", ["relu", "elu1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_relu_and_elu1(kind, causal):
    gen, q, k, v, pad = inputs(11 + int(causal))
    m = 5
    w = rand(m, q.shape[-1], gen=gen)
    fm = f"relu({m})" if kind == "relu" else "elu1"
    program = f"pattern p() {{ attend linear({fm}), causal = {str(causal).lower()} }}"
    got = run_linear(program, q, k, v, pad, **({"projection": w} if kind == "relu" else {}))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            phi = (lambda x: relu_phi(x, w)) if kind == "relu" else elu1_phi
            fq, fk = phi(q[b, h]), phi(k[b, h])
            unpadded = [j for j in range(k.shape[2]) if not pad[b, j]]
            keys_of = (lambda r: [j for j in unpadded if j <= r]) if causal else (lambda r: unpadded)
            want = linear_rows(q[b, h], k[b, h], v[b, h], keys_of, lambda r: fq[r], lambda j, r: fk[j])
            torch.testing.assert_close(got[b, h], want, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------------- Luna
doc("| a tensor param `p` | `p` (expanded to `[B, H, l, D]`) | `p` for both (no padding) |")
doc("| a named stage `s` | `s`'s output | `s`'s output for both (no padding); its head dim must be `D` |")
doc("`luna` is two stages: `packed = attend softmax query p keys input` (the `l` packed queries attend to the")
doc("packed context, used as keys and values); it returns `(out, packed)`.")
doc("| `key_padding_mask` | `[B, N_k]` bool | True = padding: that key is removed from every stage that reads "
    "keys from `input` |")


def test_luna():
    gen, q, k, v, pad = inputs(5, n_q=8, n_k=8, d=4, dv=4)
    L = 3
    p = rand(L, q.shape[-1], gen=gen)
    out, packed = pd.compile("luna", length=L, backend="reference")(q, k, v, key_padding_mask=pad, p=p)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            want_packed = softmax_rows(p, k[b, h], v[b, h], lambda r, j: not pad[b, j])      # query p keys input
            want_out = softmax_rows(q[b, h], want_packed, want_packed, lambda r, j: True)   # keys packed: no padding
            torch.testing.assert_close(packed[b, h], want_packed, rtol=1e-11, atol=1e-12)
            torch.testing.assert_close(out[b, h], want_out, rtol=1e-11, atol=1e-12)


doc("a_jl      = softplus_beta(d^(-1/2) c_j . p_l),   beta = ln 2,  softplus_beta(x) = log(1 + exp(beta x)) / beta")
doc("logits_tl = 1/n_t * sum_{j <= t, unpadded} (d^(-1/2) q_t . k_j) a_jl")
doc("A_t       = softmax over l of logits_t")
doc("out_t     = 1/n_t * sum_{j <= t, unpadded} (A_t . a_j) v_j")
doc("A padded key contributes nothing and is not counted; a row with `n_t = 0` outputs")


def softplus_beta(x, beta=math.log(2.0)):
    return torch.log1p(torch.exp(beta * x)) / beta


def test_causal_luna():
    gen, q, k, v, pad = inputs(9, n_q=9, n_k=9, d=4, dv=3)
    L = 3
    p = rand(L, q.shape[-1], gen=gen)
    c = rand(*k.shape, gen=gen)
    got = pd.compile("luna_causal", length=L, backend="reference")(q, k, v, key_padding_mask=pad, p=p, c=c)
    d = q.shape[-1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            a = softplus_beta(d ** -0.5 * c[b, h] @ p.T)                             # a_jl, [N, L]
            for t in range(q.shape[2]):
                keys = [j for j in range(t + 1) if not pad[b, j]]
                if not keys:
                    assert torch.equal(got[b, h, t], torch.zeros_like(got[b, h, t]))   # n_t = 0: zeros
                    continue
                n_t = len(keys)
                logits = sum(d ** -0.5 * (q[b, h, t] @ k[b, h, j]) * a[j] for j in keys) / n_t
                A = torch.softmax(logits, dim=0)
                want = sum((A @ a[j]) * v[b, h, j] for j in keys) / n_t
                torch.testing.assert_close(got[b, h, t], want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------- quotes
def test_the_quoted_sentences_are_in_the_docs():
    text = re.sub(r"\s+", " ", DOCS.read_text())
    missing = [q for q in QUOTES if re.sub(r"\s+", " ", q) not in text]
    assert not missing, missing
