"""The torch backend's lowerings, declared to the planner: what each runs, where it applies, what it costs.

Softmax stages: `torch.pieces/bmN` (bands through strided K/V windows in query blocks of N rows, plus
causal and residue-permuted bands and global rows/columns, merged by log-sum-exp: `pieces.py`),
`torch.blocksparse/BMxBN` (the gathered nonempty tiles of the closed-form layout through the flash kernel:
`blocksparse.py`), `torch.dense` (SDPA with the mask materialised once per shape), `torch.causal` (SDPA
`is_causal`), `torch.flex` (compiled FlexAttention, BlockMask from the layout; forward only on the CPU).
Linear stages: `torch.favor` (fused bidirectional FAVOR+), `torch.causal-linear` (chunked scan with a
hand-written backward), `torch.linear-quadratic` (the masked dense form: one chunk, small N),
`torch.linear-scan` (autograd through the chunked scan). Nested stages: `torch.luna-chunked` (masked matmuls
per chunk, carried states), `torch.luna-cumsum` (cumulative sums, `nested_scan.py`).

Every softmax lowering takes grouped-query k, v natively (the flash kernel and SDPA read kv head `h // G`;
Flex gets `enable_gqa`) and a query offset (masks evaluated at positions `q_offset + r`), except SDPA's
`is_causal`, which is top-left (no offset). The linear lowerings run both (`torch.causal-linear` and
`torch.linear-quadratic` repeat a group's k, v once); `torch.luna-chunked` runs neither and says so
(`torch.luna-cumsum` runs both).
"""
from __future__ import annotations

import torch

from ...ir import mask as M
from ...ir.program import Favor
from ...plan.calibrate import Probe, declare_probe
from ...plan.decompose import decompose, in_classes
from ...plan.lowering import Lowering, Problem, Work, declare
from . import work as W

QUADRATIC_MAX = 1024       # the quadratic form of causal linear attention: one chunk of at most this many rows
_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _flash_ok(p: Problem) -> str | None:
    if p.device.type != "cpu":
        return f"the fused flash kernel is torch's CPU kernel (device {p.device.type})"
    if p.head_dim != p.head_dim_v:
        return f"the flash kernel needs D_v == D (got {p.head_dim_v} and {p.head_dim})"
    if p.dtype not in _FLASH_DTYPES:
        return f"no flash kernel for {p.dtype}"
    return None


# ---------------------------------------------------------------------------------------------- pieces
def _has_window(mask: M.Mask) -> bool:
    d = decompose(mask)
    return d is not None and any(isinstance(in_classes(b), M.Band) and in_classes(b).hi is not None
                                 for b in d.bands)


def _pieces(bm: int, only_windows: bool) -> Lowering:
    def applies(p: Problem) -> str | None:
        if decompose(p.stage.mask) is None:
            return "the mask is not bands plus global rows/columns"
        if only_windows and not _has_window(p.stage.mask):
            return "no windowed band (the block size changes nothing)"
        return _flash_ok(p)

    def run(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
        from ..custom import register
        from .pieces import _pieces_op
        return _pieces_op(q, k, v, key_padding_mask, [], register("torch_pieces", stage.mask, bm), scale,
                          int(q_offset))[0]

    def bind(stage, q, k, v, scale, padded, q_offset):
        from ..custom import register
        from .pieces import _pieces_op
        key, offset = register("torch_pieces", stage.mask, bm), int(q_offset)    # the op's key, hashed once
        return lambda q, k, v, kpm: _pieces_op(q, k, v, kpm, [], key, scale, offset)[0]

    return Lowering(f"torch.pieces/bm{bm}", "torch", ("softmax",),
                    f"bands through strided K/V windows ({bm}-row query blocks, no gather), causal and "
                    f"residue-permuted bands, global rows/columns; pieces merged by log-sum-exp",
                    applies, lambda p: W.pieces_work(p, bm), run, bind=bind)


# ---------------------------------------------------------------------------------------- block-sparse
def _blocksparse(bm: int, bn: int) -> Lowering:
    def run(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
        from .softmax import softmax_attention
        return softmax_attention(q, k, v, stage.mask, scale=scale, key_padding_mask=key_padding_mask,
                                 runtime=runtime, block=(bm, bn), q_offset=q_offset)

    def work(p: Problem) -> Work:
        return W.blocksparse_work(p, bm, bn, fused=_flash_ok(p) is None)

    return Lowering(f"torch.blocksparse/{bm}x{bn}", "torch", ("softmax",),
                    f"gathered nonempty {bm}x{bn} tiles of the closed-form layout, one flash-kernel call per chunk "
                    f"(batched matmuls where it cannot run), split rows merged by log-sum-exp",
                    lambda p: None, work, run)


# ------------------------------------------------------------------------------------- dense and causal
def _dense_applies(p: Problem) -> str | None:
    from .dense import MAX_DENSE, every_row_has_a_key
    if p.n_q * p.n_k > MAX_DENSE:
        return f"a dense {p.n_q} x {p.n_k} mask is over {MAX_DENSE} elements"
    if p.device.type != "cpu" and (p.padded or M.runtime_inputs(p.stage.mask)
                                   or not every_row_has_a_key(p.stage.mask, p.n_q, p.n_k, p.q_offset)):
        return "rows with no key would give NaN in SDPA off the CPU"
    return None


def _dense_run(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
    from .dense import dense_attention
    return dense_attention(q, k, v, stage.mask, scale, key_padding_mask, runtime, q_offset)


def _dense_bind(stage, q, k, v, scale, padded, q_offset):
    """Without padding: SDPA with the cached mask looked up once (nothing else per call)."""
    from .dense import static_mask
    if padded:
        return None
    mask = None if stage.mask == M.FULL else static_mask(stage.mask, q.shape[2], k.shape[2], q.dtype, q.device,
                                                          q_offset)
    gqa = k.shape[1] != q.shape[1]
    return lambda q, k, v, kpm: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                 scale=scale, enable_gqa=gqa)


def _dense_work(p: Problem) -> Work:
    if p.device.type == "cpu":
        return W.dense_work(p)
    return Work.of({"sdpa.cuda": p.bh * p.n_q * p.n_k * (3 if p.grad else 1), "call": 2})


def _causal_applies(p: Problem) -> str | None:
    if p.stage.mask != M.CAUSAL:
        return "the mask is not exactly causal"
    if p.q_offset:
        return "is_causal is top-left (no query offset)"
    return "is_causal takes no key padding mask" if p.padded else None


def _causal_run(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
    from .dense import causal_attention
    return causal_attention(q, k, v, scale)


def _causal_bind(stage, q, k, v, scale, padded, q_offset):
    gqa = k.shape[1] != q.shape[1]
    return lambda q, k, v, kpm: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 scale=scale, enable_gqa=gqa)


def _causal_work(p: Problem) -> Work:
    if p.device.type == "cpu":
        return W.causal_work(p)
    return Work.of({"sdpa.cuda": p.bh * p.n_q * p.n_k * 0.5 * (3 if p.grad else 1), "call": 1})


# ------------------------------------------------------------------------------------------------- flex
def _flex_applies(p: Problem) -> str | None:
    from .flex import BLOCK, compiler_available
    if p.grad and p.device.type == "cpu":
        return "FlexAttention has no CPU backward"
    if p.padded or M.runtime_inputs(p.stage.mask):
        return "key padding and runtime ids would rebuild the BlockMask every call"
    if p.head_dim != p.head_dim_v:
        return "D_v != D"
    if p.n_q % BLOCK or p.n_k % BLOCK or not p.n_q or not p.n_k:
        return f"lengths not multiples of {BLOCK}"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if p.device.type == "cpu" and not compiler_available():
        return "torch.compile needs a C++ compiler on the CPU"
    return None


def _flex_run(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
    from .flex import flex_attention
    return flex_attention(q, k, v, stage.mask, scale, q_offset)


def _flex_ready(p: Problem) -> bool:
    from .flex import compiled_for, shape_key
    qs, ks = (p.batch, p.heads), (p.batch, p.h_kv)
    return compiled_for(shape_key(qs + (p.n_q, p.head_dim), ks + (p.n_k, p.head_dim),
                                  ks + (p.n_k, p.head_dim_v), p.dtype, p.device))


def _flex_work(p: Problem) -> Work:
    from .flex import BLOCK
    return W.flex_work(p, BLOCK, compiled=False)


# ------------------------------------------------------------------------------------- linear, nested
def _favor_applies(p: Problem) -> str | None:
    fm = p.stage.normaliser.feature_map
    if not isinstance(fm, Favor):
        return "not FAVOR+ features"
    return "causal" if p.stage.causal else None


def _linear_flops(p: Problem, m: int, chunk: int | None) -> dict:
    n_q, n_k, D, Dv = p.n_q, p.n_k, p.head_dim, p.head_dim_v
    feats = 2 * (n_q + n_k) * D * m
    if chunk is None:
        body = 2 * (n_q + n_k) * m * (Dv + 1)
    else:
        body = 2 * n_q * chunk * (m + Dv + 1) + 6 * n_q * m * (Dv + 1)
    return {"gemm": p.bh * (feats + body), "elem": p.bh * ((n_q + n_k) * m * 3 + (n_q * chunk * 3 if chunk else 0))}


def _linear_work(chunk_of, grad_factor: float, per_chunk_calls: int):
    def work(p: Problem) -> Work:
        fm = p.stage.normaliser.feature_map
        m = getattr(fm, "features", p.head_dim)
        chunk = chunk_of(p)
        counts = _linear_flops(p, m, chunk)
        scale = 1 + (grad_factor if p.grad else 0)
        counts = {k: v * scale for k, v in counts.items()}
        steps = (-(-p.n_q // chunk) if chunk else 1) * per_chunk_calls * scale
        counts["call"] = steps + 10
        return Work.of(counts)
    return work


def _run_favor(stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
    from .favor import favor_attention
    if projection.requires_grad:                       # a learned projection: autograd through the scan
        return _run_scan(stage, q, k, v, projection=projection, key_padding_mask=key_padding_mask)
    return favor_attention(q, k, v, projection, stage.normaliser.feature_map.eps, key_padding_mask)


def _run_scan(stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
    from .linear_scan import linear_attention
    return linear_attention(q, k, v, stage.normaliser.feature_map, projection, causal=stage.causal,
                            key_padding_mask=key_padding_mask, chunk=256, q_offset=q_offset)


def _run_causal_linear(quadratic: bool):
    """The causal linear scan with the chunk of `choose_chunk`, or (quadratic) one chunk over every row."""
    def run(stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
        from .causal_linear import causal_linear_attention
        chunk = max(int(q_offset) + q.shape[2], 1) if quadratic else None
        return causal_linear_attention(q, k, v, stage.normaliser.feature_map, projection, key_padding_mask,
                                       chunk=chunk, q_offset=q_offset)
    return run


def _causal_chunk(p: Problem) -> int:
    from .causal_linear import choose_chunk
    m = getattr(p.stage.normaliser.feature_map, "features", p.head_dim)
    return choose_chunk(p.q_offset + p.n_q, m, p.head_dim_v)


def _causal_only(p: Problem) -> str | None:
    return None if p.stage.causal else "not causal"


def _plain_heads(p: Problem) -> str | None:
    """Why a lowering without grouped kv heads or query offsets cannot run `p` (None: it can)."""
    if p.groups > 1:
        return "grouped kv heads (torch.linear-scan and torch.luna-cumsum read them without repeating)"
    return "a query offset (torch.linear-scan and torch.luna-cumsum take one)" if p.q_offset else None


def _quadratic_applies(p: Problem) -> str | None:
    return _causal_only(p) or (None if p.n_q <= QUADRATIC_MAX else f"N_q > {QUADRATIC_MAX}")


def _luna_work(p: Problem) -> Work:
    n, D, l = p.n_q, p.head_dim, max(p.packed, 1)        # outer products and prefix sums over [N, D, l] and
    counts = {"elem": p.bh * n * (D + p.head_dim_v) * l * 6, "call": 20 + 2 * p.bh * n / 64}   # N tiny matmuls
    return Work.of({k: v * (3 if p.grad and k != "call" else 1) for k, v in counts.items()})


def _run_luna(stage, q, k, v, *, p, c, key_padding_mask=None, q_offset=0):
    from .nested_scan import nested_attention
    return nested_attention(q, k, v, p, c, key_padding_mask=key_padding_mask, q_offset=q_offset)


LUNA_CHUNK = 64


def _luna_chunked_applies(p: Problem) -> str | None:
    if p.n_q != p.n_k:
        return "needs as many queries as keys"
    return _plain_heads(p)


def _luna_chunked_work(p: Problem) -> Work:
    n, D, l, c = p.n_q, p.head_dim, max(p.packed, 1), LUNA_CHUNK
    flops = 2 * n * (c * (D + 2 * l + p.head_dim_v) + 2 * l * (D + p.head_dim_v))
    counts = {"gemm": p.bh * flops, "elem": p.bh * n * (3 * c + 6 * l), "call": 25}
    return Work.of({k: v * (3 if p.grad else 1) for k, v in counts.items()})


def _run_luna_chunked(stage, q, k, v, *, p, c, key_padding_mask=None, q_offset=0):
    from .luna_chunked import luna_chunked_attention
    return luna_chunked_attention(q, k, v, p, c, key_padding_mask, chunk=LUNA_CHUNK)


# ------------------------------------------------------------------------------------------ declarations
def declare_all() -> None:
    for bm in (256, 64):
        declare(_pieces(bm, only_windows=bm != 256))
    for bm, bn in ((256, 64), (64, 64)):
        declare(_blocksparse(bm, bn))
    declare(Lowering("torch.dense", "torch", ("softmax",),
                     "SDPA over the whole score matrix with the mask materialised once per shape (cached)",
                     _dense_applies, _dense_work, _dense_run, any_length=False, bind=_dense_bind))
    declare(Lowering("torch.causal", "torch", ("softmax",), "SDPA is_causal (no mask at all)",
                     _causal_applies, _causal_work, _causal_run, bind=_causal_bind))
    declare(Lowering("torch.flex", "torch", ("softmax",),
                     "compiled FlexAttention, BlockMask from the closed-form layout (full and partial tiles apart)",
                     _flex_applies, _flex_work, _flex_run, ready=_flex_ready, any_length=False))
    declare(Lowering("torch.favor", "torch", ("linear",),
                     "bidirectional FAVOR+ with in-place features and a hand-written backward",
                     _favor_applies, _linear_work(lambda p: None, 1.5, 1), _run_favor))
    declare(Lowering("torch.causal-linear", "torch", ("linear",),
                     "causal linear attention by chunked prefix sums, vectorised over chunks, hand-written backward",
                     _causal_only, _linear_work(_causal_chunk, 2.0, 1), _run_causal_linear(False)))
    declare(Lowering("torch.linear-quadratic", "torch", ("linear",),
                     "causal linear attention in its masked quadratic form (one chunk), hand-written backward",
                     _quadratic_applies, _linear_work(lambda p: max(p.q_offset + p.n_q, 1), 2.0, 1), _run_causal_linear(True),
                     any_length=False))
    declare(Lowering("torch.linear-scan", "torch", ("linear",),
                     "linear attention by the reference's chunked prefix sums (or two products), autograd backward",
                     lambda p: None, _linear_work(lambda p: 256 if p.stage.causal else None, 4.0, 40), _run_scan))
    declare(Lowering("torch.luna-chunked", "torch", ("nested",),
                     f"causal Luna in {LUNA_CHUNK}-row chunks: masked matmuls inside, carried [D, l] and [l, D] states",
                     _luna_chunked_applies, _luna_chunked_work, _run_luna_chunked))
    declare(Lowering("torch.luna-cumsum", "torch", ("nested",), "causal Luna by cumulative sums (O(N l d))",
                     lambda p: None, _luna_work, _run_luna))


def _measure(device: torch.device) -> dict:
    from .probes import measure_cpu
    return measure_cpu(device)


declare_probe(Probe("torch-cpu", "cpu", ("call", "byte", "flash.*", "bmm", "gemm", "elem", "flex"), _measure))
