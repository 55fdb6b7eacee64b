"""Block-sparse flash attention, forward: one program per work item (a query block, or a piece of a long one).

Each program walks its tiles with an online softmax in base 2 (`m`, `l`, `acc` in float32). Full tiles run
with no mask (only key padding, when given); partial tiles evaluate the generated `mask_tile` and bound-check
keys. The program writes `out = acc / l` and `lse = ln(sum exp(scores))` (-inf and zeros for a row with no
allowed key); a piece of a split block writes its own normalised output and lse to a partial slot, and
`merge_rows` combines the pieces by log-sum-exp.
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
def _tile_code(TILES, t, qb, BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_K,
               tile_full: tl.constexpr, ROWS: tl.constexpr):
    """(other block, is_full) of the t-th tile of a work item: arithmetic for bands, else from the list."""
    if BAND:
        if ROWS:
            full = tile_full(qb * BLOCK_M, t * BLOCK_N, N_K, BLOCK_M, BLOCK_N)
        else:
            full = tile_full(t * BLOCK_M, qb * BLOCK_N, N_K, BLOCK_M, BLOCK_N)
        return t, full
    else:
        code = tl.load(TILES + t)
        return code >> 1, (code & 1) != 0


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, offs_m, n0, b, N_Q, N_K, qk_scale, KPM, AUX,
              stride_kn, stride_vn, mask_tile: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :]
    if MASKED:
        kt = tl.load(k_ptrs, mask=(offs_d[:, None] < D) & (offs_n[None, :] < N_K), other=0.0)
        v = tl.load(v_ptrs, mask=(offs_n[:, None] < N_K) & (offs_dv[None, :] < DV), other=0.0)
    else:
        if BLOCK_D == D:
            kt = tl.load(k_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
        if BLOCK_DV == DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
    s = _dot(q, kt, PREC, UPCAST) * qk_scale
    if MASKED:
        ok = mask_tile(offs_m[:, None], offs_n[None, :], b, N_Q, N_K, AUX) & (offs_n[None, :] < N_K)
        if HAS_KPM:
            pad = tl.load(KPM + b * N_K + offs_n, mask=offs_n < N_K, other=1)
            ok = ok & (pad == 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
    elif HAS_KPM:
        pad = tl.load(KPM + b * N_K + offs_n)
        s = tl.where((pad == 0)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def softmax_fwd_kernel(Q, K, V, O, LSE, OP, LSEP, WORK, TILES, KPM, AUX, sm_scale, N_Q, N_K, H,
                       stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_on,
                       mask_tile: tl.constexpr, tile_full: tl.constexpr, BAND: tl.constexpr,
                       HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    b = bh // H
    qb = tl.load(WORK + w * 4)
    start = tl.load(WORK + w * 4 + 1)
    end = tl.load(WORK + w * 4 + 2)
    slot = tl.load(WORK + w * 4 + 3)
    bh64 = bh.to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + bh64 * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < D), other=0.0)
    k_base = K + bh64 * stride_kh
    v_base = V + bh64 * stride_vh
    qk_scale = sm_scale * 1.4426950408889634                              # scores in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t in range(start, end):
        kb, full = _tile_code(TILES, t, qb, BAND, BLOCK_M, BLOCK_N, N_K, tile_full, True)
        if full:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, offs_m, kb * BLOCK_N, b, N_Q, N_K,
                                      qk_scale, KPM, AUX, stride_kn, stride_vn, mask_tile, False, HAS_KPM,
                                      D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, PREC, UPCAST)
        else:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, offs_m, kb * BLOCK_N, b, N_Q, N_K,
                                      qk_scale, KPM, AUX, stride_kn, stride_vn, mask_tile, True, HAS_KPM,
                                      D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, PREC, UPCAST)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    if slot < 0:
        tl.store(O + bh64 * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < DV))
        tl.store(LSE + bh64 * N_Q + offs_m, lse, mask=offs_m < N_Q)
    else:
        part = (slot.to(tl.int64) * n_bh + bh) * BLOCK_M
        rows = part + tl.arange(0, BLOCK_M)
        tl.store(OP + rows[:, None] * BLOCK_DV + offs_dv[None, :], out)
        tl.store(LSEP + rows, lse)


# ----------------------------------------------------------------------------------------------- launcher
def kernel_options(dtype: torch.dtype, device: torch.device) -> dict:
    """Dot precision: exact fp32 products for fp32 inputs; upcast bf16 under the interpreter."""
    return {"PREC": "ieee" if dtype == torch.float32 else None,
            "UPCAST": device.type == "cpu" and dtype == torch.bfloat16}


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def softmax_fwd(q, k, v, plan, mod, scale: float, key_padding_mask, aux, num_warps: int = 4):
    """Launch the forward. q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]` (contiguous);
    `plan` a `TilePlan`, `mod` the generated mask module. Returns (out `[B, H, N_q, D_v]`, lse `[B, H, N_q]`)."""
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
    grid = (rows.work.shape[0], B * H)
    softmax_fwd_kernel[grid](
        q, k, v, out, lse, op, lsep, rows.work, rows.tiles, kpm, aux, scale, NQ, NK, H,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), out.stride(1), out.stride(2),
        mask_tile=mod.mask_tile, tile_full=mod.tile_full, BAND=plan.band, HAS_KPM=key_padding_mask is not None,
        D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_DV=BDV, num_warps=num_warps,
        **kernel_options(q.dtype, q.device))
    if rows.slots:
        merge_rows(out, lse, op, lsep, rows, BM)
    return out, lse


def merge_rows(out, lse, op, lsep, rows, block_m: int) -> None:
    """Combine the pieces of split query blocks by log-sum-exp, writing into `out` and `lse` in place."""
    B, H, NQ, DV = out.shape
    g = rows.groups
    used = (g >= 0)[:, :, None, None]
    lp = torch.where(used, lsep[g.clamp(min=0)], float("-inf"))          # [G, S, BH, BM]
    tot = torch.logsumexp(lp, dim=1)                                      # [G, BH, BM]
    wgt = torch.exp(lp - torch.where(torch.isfinite(tot), tot, 0.0)[:, None])
    parts = torch.where(used[..., None], op[g.clamp(min=0)], 0.0)         # [G, S, BH, BM, BDV]
    merged = (wgt[..., None] * parts).sum(1)                              # [G, BH, BM, BDV]
    idx = rows.group_block[:, None] * block_m + torch.arange(block_m, device=out.device)
    valid = idx < NQ
    sel = idx[valid]
    out.view(B * H, NQ, DV)[:, sel] = merged.permute(1, 0, 2, 3)[:, valid][..., :DV].to(out.dtype)
    lse.view(B * H, NQ)[:, sel] = tot.permute(1, 0, 2)[:, valid]
