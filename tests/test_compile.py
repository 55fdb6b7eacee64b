"""torch.compile: a model of `pd.nn.Attention` layers compiles with `fullgraph=True` on the CPU and gives the
oracle model's result (tests/oracles.py through the same weights: outputs and parameter gradients)."""
import pytest
import torch
from torch import nn

import oracles as O
import patterndsl as pd


def _ready() -> bool:
    try:
        from patterndsl.grammar import parse_module  # noqa: F401
    except ImportError:
        return False
    return hasattr(pd.nn, "Attention")


pytestmark = pytest.mark.skipif(not _ready(), reason="the parser or pd.nn.Attention has not landed")

LAYERS = [  # (program, params): exact softmax with global tokens, a causal window, FAVOR+ linear attention
    ("longformer", {"window": 8, "globals": {0, 9}}),
    ("sliding_window", {"window": 3}),
    ("performer", {"features": 16, "causal": True}),
]


class Model(nn.Module):
    def __init__(self, layers, dim: int = 32, heads: int = 4):
        super().__init__()
        self.attn = nn.ModuleList(pd.nn.Attention(prog, dim, heads, **params) for prog, params in layers)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in layers)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        for attn, norm in zip(self.attn, self.norms):
            y = attn(norm(x))
            x = x + (y[0] if isinstance(y, tuple) else y)
        return self.out(x)


def _oracle_attention(attn, x):
    """One `pd.nn.Attention` layer in plain torch: projections, the oracle attention, heads merged, out_proj."""
    B, n, E = x.shape
    H = attn.num_heads
    q, k, v = (p(x).view(B, n, H, E // H).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    stage = attn.op.ir.stages[0]
    allowed = attn.op.mask(n, n)
    if attn.op.name == "performer":
        w = attn.op.projection(stage, E // H, x.device, x.dtype)
        y = O.linear_attention(q, k, v, allowed, "favor", w)
    else:
        y = O.softmax_attention(q, k, v, allowed, (E // H) ** -0.5)
    return attn.out_proj(y.transpose(1, 2).reshape(B, n, E))


class Oracle(nn.Module):
    """`Model`'s forward with every attention layer replaced by its oracle (the same parameters)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        for attn, norm in zip(m.attn, m.norms):
            x = x + _oracle_attention(attn, norm(x))
        return m.out(x)


def _run(model, x, params):
    params.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape", [(2, 24, 32)], ids=lambda s: "B{}-N{}-E{}".format(*s))
def test_fullgraph_compile_equals_the_oracle(shape):
    torch.manual_seed(0)
    model = Model(LAYERS)
    x = torch.randn(*shape)
    want, want_grads = _run(Oracle(model), x, model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, grads = _run(compiled, x, model)  # the same parameters, reached through the compiled wrapper
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fullgraph_compile_inductor_forward():
    torch.manual_seed(1)
    model = Model(LAYERS[:1]).eval()
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        want = Oracle(model)(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
