"""Block-sparse flash attention, forward: one program per work item (a query block, or a piece of a long one).

Each program walks its tiles with an online softmax in base 2 (`m`, `l`, `acc` in float32). K and V tiles are
loaded at the top of the loop body whatever the tile's class, so Triton pipelines them (cp.async, async wgmma);
only partial tiles then evaluate the generated `mask_tile`, which adds the call's query offset (AUX[0], written by
`build_aux`) to the row it is given: the kernels pass rows, plus (batch rows at different offsets) the row's
offset relative to AUX[0] from `QOFF`, never the offset itself. The
program writes `out = acc / l` and `lse = ln(sum exp(scores))` (-inf and zeros for a row with no allowed key); a
piece of a split block writes its own normalised output and lse to a partial slot, and `softmax_merge_kernel`
combines the pieces by log-sum-exp. K and V may have fewer heads than Q (GQA): head `h` reads kv head
`h // GROUP`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """`a @ b` accumulated in float32 (UPCAST: the interpreter's bf16 dot is broken, compute in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tile_code(TILES, t, m0, n0, BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_K,
               tile_full: tl.constexpr, ROWS: tl.constexpr):
    """(other block, is_full) of the t-th tile of a work item: arithmetic for bands (scheduled only at query offset
    0, so rows are positions), else from the list. A row item starts at row `m0`; a column item at key `n0`, its
    query blocks at `m0 + t * BM`."""
    if BAND:
        if ROWS:
            full = tile_full(m0, t * BLOCK_N, N_K, BLOCK_M, BLOCK_N)
        else:
            full = tile_full(m0 + t * BLOCK_M, n0, N_K, BLOCK_M, BLOCK_N)
        return t, full
    else:
        code = tl.load(TILES + t)
        return code >> 1, (code & 1) != 0


@triton.jit
def _load_rows(base, j, stride, offs, N, DIM: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
               TRANS: tl.constexpr):
    """Rows `j` (< N unless EVEN) of a `[N, DIM]` matrix, columns `offs`: `[len(j), BLOCK]`, or its transpose."""
    if TRANS:
        ptrs = base + j[None, :] * stride + offs[:, None]
        in_j = j[None, :] < N
        in_d = offs[:, None] < DIM
    else:
        ptrs = base + j[:, None] * stride + offs[None, :]
        in_j = j[:, None] < N
        in_d = offs[None, :] < DIM
    if EVEN:
        if BLOCK == DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=in_d, other=0.0)
    else:
        if BLOCK == DIM:
            x = tl.load(ptrs, mask=in_j, other=0.0)
        else:
            x = tl.load(ptrs, mask=in_j & in_d, other=0.0)
    return x


@triton.jit
def _allowed(s, i, j, b, N_QM, N_K, KPM, AUX, full, mask_tile: tl.constexpr, HAS_KPM: tl.constexpr,
             EVEN_K: tl.constexpr):
    """Scores `s` with disallowed pairs at -inf; `i` query rows in AUX's frame, `j` key indices (broadcast as
    `[BM, 1]` and `[1, BN]`, or transposed). Full tiles skip the mask; key padding applies everywhere."""
    if not full:
        ok = mask_tile(i, j, b, N_QM, N_K, AUX)
        if not EVEN_K:
            ok = ok & (j < N_K)
        s = tl.where(ok, s, float("-inf"))
    if HAS_KPM:
        pad = tl.load(KPM + b * N_K + j, mask=j < N_K, other=1)
        s = tl.where(pad == 0, s, float("-inf"))
    return s


@triton.jit
def softmax_fwd_kernel(Q, K, V, O, LSE, OP, LSEP, WORK, TILES, KPM, AUX, QOFF, sm_scale, N_Q, N_QM, N_K,
                       H, GROUP, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                       stride_vh, stride_vn, mask_tile: tl.constexpr, tile_full: tl.constexpr, BAND: tl.constexpr,
                       HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr, EVEN_K: tl.constexpr, D: tl.constexpr,
                       DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kvh = (bh % H) // GROUP
    qb = tl.load(WORK + w * 4)
    start = tl.load(WORK + w * 4 + 1)
    end = tl.load(WORK + w * 4 + 2)
    slot = tl.load(WORK + w * 4 + 3)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    i = rows[:, None]                                # rows in AUX's frame; mask_tile adds the offset AUX[0]
    if ROW_OFFSETS:
        i = i + tl.load(QOFF + b)                    # this batch row's offset past AUX[0]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + (bh % H).to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :], mask=(rows[:, None] < N_Q) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634                              # scores in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t in range(start, end):
        kb, full = _tile_code(TILES, t, qb * BLOCK_M, 0, BAND, BLOCK_M, BLOCK_N, N_K, tile_full, True)
        j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = _load_rows(k_base, j, stride_kn, offs_d, N_K, D, BLOCK_D, EVEN_K, True)
        v = _load_rows(v_base, j, stride_vn, offs_dv, N_K, DV, BLOCK_DV, EVEN_K, False)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        s = _allowed(s, i, j[None, :], b, N_QM, N_K, KPM, AUX, full, mask_tile, HAS_KPM, EVEN_K)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    bh64 = bh.to(tl.int64)
    if slot < 0:
        tl.store(O + bh64 * N_Q * DV + rows[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=(rows[:, None] < N_Q) & (offs_dv[None, :] < DV))
        tl.store(LSE + bh64 * N_Q + rows, lse, mask=rows < N_Q)
    else:
        part = (slot.to(tl.int64) * tl.num_programs(1) + bh) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(OP + part[:, None] * BLOCK_DV + offs_dv[None, :], out)
        tl.store(LSEP + part, lse)


@triton.jit
def softmax_merge_kernel(O, LSE, OP, LSEP, GROUPS, GROUP_BLOCK, WIDTH, N_Q, DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (g, bh): the pieces of split block `GROUP_BLOCK[g]` merged by log-sum-exp into O and LSE."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    rows = tl.load(GROUP_BLOCK + g).to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, WIDTH):
        slot = tl.load(GROUPS + g * WIDTH + s)
        if slot >= 0:
            part = (slot.to(tl.int64) * n_bh + bh) * BLOCK_M
            m = tl.maximum(m, tl.load(LSEP + part + offs))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(0, WIDTH):
        slot = tl.load(GROUPS + g * WIDTH + s)
        if slot >= 0:
            part = (slot.to(tl.int64) * n_bh + bh) * BLOCK_M
            wgt = tl.exp(tl.load(LSEP + part + offs) - m_safe)
            den += wgt
            acc += wgt[:, None] * tl.load(OP + (part + offs)[:, None] * BLOCK_DV + offs_dv[None, :])
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    lse = tl.where(den == 0.0, float("-inf"), m_safe + tl.log(tl.where(den == 0.0, 1.0, den)))
    bh64 = bh.to(tl.int64)
    tl.store(O + bh64 * N_Q * DV + rows[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < N_Q) & (offs_dv[None, :] < DV))
    tl.store(LSE + bh64 * N_Q + rows, lse, mask=rows < N_Q)


# ----------------------------------------------------------------------------------------------- launcher
def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def default_launch(q, offsets, opts, part: str | None = None):
    """`offsets` and `opts` of a launcher called without them: one offset for every row (AUX[0]'s), and
    `kernel_options` for q with the default warps (its `part` entry, or all of it)."""
    from .offsets import QueryOffsets
    from .softmax import default_blocks, kernel_options
    if opts is None:
        opts = kernel_options(q.dtype, q.device, default_blocks(q.shape[3], q.device)[2], q.shape[3])
        opts = opts[part] if part else opts
    return offsets or QueryOffsets((), str(q.device)), opts


def softmax_fwd(q, k, v, plan, mod, scale: float, key_padding_mask, aux, offsets=None, opts: dict | None = None):
    """Launch the forward. q `[B, H, N_q, D]`, k `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (unit stride in
    D); `plan` a `TilePlan`, `mod` the generated mask module, `offsets` the `QueryOffsets` relative to AUX[0],
    `opts` the launch options (`kernel_options`); both optional (`default_launch`). Returns (out `[B, H, N_q, D_v]`,
    lse `[B, H, N_q]` float32)."""
    offsets, opts = default_launch(q, offsets, opts, "fwd")
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    out = torch.empty(B, H, NQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    rows = plan.rows
    if B * H == 0 or NQ == 0:
        return out, lse
    BM, BN, BD, BDV = plan.block_m, plan.block_n, block_d(D), block_d(DV)
    op = torch.empty(max(rows.slots, 1), B * H, BM, BDV, dtype=torch.float32, device=q.device)
    lsep = torch.empty(max(rows.slots, 1), B * H, BM, dtype=torch.float32, device=q.device)
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else aux
    softmax_fwd_kernel[(rows.work.shape[0], B * H)](
        q, k, v, out, lse, op, lsep, rows.work, rows.tiles, kpm, aux, offsets.tensor(aux), scale, NQ,
        offsets.extent(NQ), NK, H, H // k.shape[1], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        mask_tile=mod.mask_tile, tile_full=mod.tile_full, BAND=plan.band, HAS_KPM=key_padding_mask is not None,
        ROW_OFFSETS=offsets.per_row, EVEN_K=NK % BN == 0, D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
        BLOCK_DV=BDV, **opts)
    if rows.slots:
        softmax_merge_kernel[(rows.group_block.shape[0], B * H)](
            out, lse, op, lsep, rows.groups, rows.group_block, rows.groups.shape[1], NQ, DV=DV, BLOCK_M=BM,
            BLOCK_DV=BDV, num_warps=4)
    return out, lse
