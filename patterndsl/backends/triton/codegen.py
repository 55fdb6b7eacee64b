"""Code generation: the Triton source of a program's masks, written to a cache file and imported.

For each softmax stage we emit two `@triton.jit` functions that the block-sparse kernels
(`softmax_fwd.py`, `softmax_bwd.py`) take as constexpr arguments, so Triton inlines them:

- `mask_tile(i, j, b, N_Q, N_K, AUX)`: the mask predicate of a *partial* tile, from the IR by
  `patterndsl.ir.predicate.evaluate` with a Triton-text `ops` object (floor `//` and `%` as in the IR);
  `i` and `j` are broadcasting index tensors. Index sets (`rows`, `cols`), `random` draws and `same` ids are
  read from the int32 buffer `AUX` (header: one offset per data leaf, see `data_leaves`).
- `tile_full(m0, n0, N_K, BLOCK_M, BLOCK_N)`: for bands (and `full`), whether the tile starting at query
  `m0`, key `n0` is entirely allowed, by interval arithmetic on `i - j`; full tiles run with no mask at all.

The generated statements hold only numbers and operators derived from the checked IR; names (pattern,
stages, `same` inputs) appear only in comments and docstrings, reduced to safe characters.

>>> from patterndsl.ir.mask import sliding
>>> print(mask_source(sliding(2)).splitlines()[-1])
    return ((m0 - n0 - (BLOCK_N - 1)) >= (-2)) & ((m0 + (BLOCK_M - 1) - n0) <= 2) & ((n0 + BLOCK_N) <= N_K)
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile

from ...errors import PatternError
from ...ir import mask as M
from ...ir.predicate import evaluate
from ...ir.program import Linear, Nested, ProgramIR, Softmax
from .predicates import TRITON_OPS, Code, _c

_I32 = (1 << 31) - 1
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "SPLIT", "num_warps", "num_stages")


# ------------------------------------------------------------------------------------------ leaves
def data_leaves(mask: M.Mask) -> tuple[M.Mask, ...]:
    """The mask nodes that read the AUX buffer, in a fixed order: Rows, Cols, Random, Same.

    AUX layout (int32): entry `k` of the header is the offset of leaf `k`'s data (`same` leaves take two
    entries: query ids, key ids). Rows/Cols: a 0/1 flag per query/key index; Random: the drawn key blocks
    `[ceil(N_Q / block), count]` (-1 pads); Same: ids `[B, N_Q]` then `[B, N_K]`, renumbered densely.
    """
    seen: list = []
    for node in M.walk(mask):
        if isinstance(node, (M.Rows, M.Cols, M.Random, M.Same)) and node not in seen:
            seen.append(node)
    return tuple(seen)


def header_slots(leaves) -> list[int]:
    """The first AUX header entry of each leaf."""
    out, k = [], 0
    for leaf in leaves:
        out.append(k)
        k += 2 if isinstance(leaf, M.Same) else 1
    return out


class _MaskEmitter:
    def __init__(self, mask: M.Mask):
        self.leaves = data_leaves(mask)
        self.slots = header_slots(self.leaves)
        self.lines: list[str] = []
        self.needs: set[str] = set()
        self.expr = self.emit(mask)

    def leaf(self, node) -> int:
        return self.slots[self.leaves.index(node)]

    def emit(self, m: M.Mask) -> str:
        if isinstance(m, M.Full):
            return "((i >= 0) & (j >= 0))"
        if isinstance(m, M.Empty):
            return "((i < 0) & (j < 0))"
        if isinstance(m, M.Band):
            self.needs.add("d")
            conds = []
            if m.lo is not None and m.lo > -_I32:
                conds.append(f"(d >= {_c(m.lo).text})")
            if m.hi is not None and m.hi < _I32:
                conds.append(f"(d <= {_c(m.hi).text})")
            if m.step > 1:  # truncated % is zero exactly when the floored one is
                conds.append(f"((d % {min(m.step, _I32)}) == 0)")
            return "(" + " & ".join(conds) + ")" if conds else "((i >= 0) & (j >= 0))"
        if isinstance(m, (M.Rows, M.Cols)):
            k = self.leaf(m)
            x, n = ("i", "N_Q") if isinstance(m, M.Rows) else ("j", "N_K")
            self.lines.append(f"f{k} = tl.load(AUX + tl.load(AUX + {k}) + {x}, mask={x} < {n}, other=0) != 0")
            return f"f{k}"
        if isinstance(m, M.Blocks):
            s = min(m.size, 1 << 30)
            return f"((i // {s}) == (j // {s}))"
        if isinstance(m, M.Random):
            k = self.leaf(m)
            self.lines += [f"o{k} = tl.load(AUX + {k})",
                           f"r{k} = (i < 0) & (j < 0)",
                           f"for c in tl.static_range({m.count}):",
                           f"    pick = tl.load(AUX + o{k} + (i // {m.block}) * {m.count} + c, mask=i < N_Q, other=-1)",
                           f"    r{k} = r{k} | (pick == (j // {m.block}))"]
            return f"r{k}"
        if isinstance(m, M.Same):
            k = self.leaf(m)
            self.lines += [f"qid{k} = tl.load(AUX + tl.load(AUX + {k}) + b * N_Q + i, mask=i < N_Q, other=-1)",
                           f"kid{k} = tl.load(AUX + tl.load(AUX + {k + 1}) + b * N_K + j, mask=j < N_K, other=-2)"]
            return f"(qid{k} == kid{k})"
        if isinstance(m, M.Where):
            self.needs.add("64")
            code = evaluate(m.pred, Code("i64", nonneg=True), Code("j64", nonneg=True), TRITON_OPS)
            if code.const is not None:
                return self.emit(M.FULL if code.const else M.EMPTY)
            return code.text
        if isinstance(m, (M.Union, M.Inter)):
            sep = " | " if isinstance(m, M.Union) else " & "
            return "(" + sep.join(self.emit(p) for p in m.parts) + ")"
        if isinstance(m, M.Not):
            return f"(~{self.emit(m.part)})"
        raise TypeError(f"not a mask: {m!r}")


def _tile_full_body(mask: M.Mask) -> str:
    conds = ["((n0 + BLOCK_N) <= N_K)"]
    if isinstance(mask, M.Band) and mask.step == 1:
        if mask.hi is not None:
            conds.insert(0, f"((m0 + (BLOCK_M - 1) - n0) <= {_c(mask.hi).text})")
        if mask.lo is not None:
            conds.insert(0, f"((m0 - n0 - (BLOCK_N - 1)) >= {_c(mask.lo).text})")
    elif not isinstance(mask, M.Full):
        conds = ["(m0 < 0)"]  # list-mode masks: tile classes come from the layout, never from here
    return " & ".join(conds)


def is_band(mask: M.Mask) -> bool:
    """Whether tiles of this mask are enumerated by arithmetic loop bounds (contiguous bands and `full`)."""
    return isinstance(mask, M.Full) or (isinstance(mask, M.Band) and mask.step == 1)


_HELPERS = '''

@triton.jit
def _floordiv(a, b):
    nz = b != 0
    bs = tl.where(nz, b, 1)
    q = a // bs
    r = a - q * bs
    return tl.where(nz, tl.where((r != 0) & ((r < 0) != (bs < 0)), q - 1, q), 0)


@triton.jit
def _floormod(a, b):
    nz = b != 0
    bs = tl.where(nz, b, 1)
    r = a % bs
    return tl.where(nz, tl.where((r != 0) & ((r < 0) != (bs < 0)), r + bs, r), 0)
'''


def mask_source(mask: M.Mask, suffix: str = "") -> str:
    """The `mask_tile{suffix}` and `tile_full{suffix}` functions of one mask (Triton source text)."""
    em = _MaskEmitter(mask)
    body = []
    if "d" in em.needs:
        body.append("d = i - j")
    if "64" in em.needs:
        body += ["i64 = i.to(tl.int64)", "j64 = j.to(tl.int64)"]
        if "zero64" in em.expr:
            body.append("zero64 = (i64 - i64) + (j64 - j64)")
    body += em.lines
    body.append(f"return {em.expr}")
    leaves = ", ".join(M.to_source(x) for x in em.leaves) or "none"
    return "\n".join([
        "",
        "@triton.jit",
        f"def mask_tile{suffix}(i, j, b, N_Q, N_K, AUX):",
        f'    """Partial tiles of {_doc(M.to_source(mask))}; AUX leaves: {_doc(leaves)}."""',
        *("    " + line for line in body),
        "",
        "",
        "@triton.jit",
        f"def tile_full{suffix}(m0, n0, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        f"    return {_tile_full_body(mask)}",
    ])


_DOC_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ (){}[]|&~,.=<>!+-*/%:")


def _doc(text: str, limit: int = 160) -> str:
    """Text for a comment or docstring: only name, number and operator characters survive."""
    text = "".join(c if c in _DOC_CHARS else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------- programs
def _check_constexprs(constexprs: dict) -> None:
    for name, value in constexprs.items():
        if name not in CONSTEXPRS:
            raise PatternError(f"unknown constexpr '{name}' for the Triton kernels",
                               hint=f"one of: {', '.join(CONSTEXPRS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PatternError(f"constexpr {name} must be an int >= 1, got {value!r}")
        if name.startswith("BLOCK") and (value < 16 or value & (value - 1)):
            raise PatternError(f"constexpr {name} must be a power of two >= 16, got {value}")


def _header(title: str, constexprs: dict) -> list[str]:
    ce = ", ".join(f"{k}={v}" for k, v in sorted(constexprs.items())) or "defaults"
    return [f'"""Generated by patterndsl for {_doc(title, 100)}: Triton mask functions. Do not edit.',
            "",
            "The block-sparse kernels in patterndsl/backends/triton/softmax_{fwd,bwd}.py take `mask_tile` and",
            "`tile_full` as constexpr arguments: partial tiles evaluate `mask_tile`, full tiles skip it.",
            f"constexprs: {ce}",
            '"""',
            "import triton",
            "import triton.language as tl",
            "",
            f"CONSTEXPRS = {dict(sorted(constexprs.items()))!r}"]


def _stage_note(st) -> str:
    name = _doc(st.name, 60)
    heads = f" heads[{st.heads[0]}:{st.heads[1]}]" if st.heads else ""
    norm = st.normaliser
    if isinstance(norm, Linear):
        return (f"# stage {name}{heads}: linear attention ({type(norm.feature_map).__name__}), "
                f"{'causal chunked scan' if st.causal else 'non-causal'}: kernels in favor.py (no mask)")
    if isinstance(norm, Nested):
        return f"# stage {name}{heads}: causal Luna through {_doc(norm.packed, 60)}: luna.py (no mask)"
    mode = "band (arithmetic loop bounds)" if is_band(st.mask) else "tile list from the block layout"
    return f"# stage {name}{heads}: softmax over {_doc(M.to_source(st.mask), 120)}; tiles: {mode}"


@functools.lru_cache(maxsize=256)
def _emit_cached(ir: ProgramIR, constexprs: tuple) -> str:
    ce = dict(constexprs)
    lines = _header(f"program {ir.name}", ce)
    lines.append(_HELPERS)
    for k, st in enumerate(ir.stages):
        lines += ["", "", _stage_note(st)]
        if isinstance(st.normaliser, Softmax):
            lines.append(mask_source(st.mask, f"_{k}"))
    return "\n".join(lines) + "\n"


def emit_program(ir: ProgramIR, **constexprs) -> str:
    """The Triton source for every stage of `ir` (functions suffixed `_<stage index>`).

    `constexprs` (BLOCK_M, BLOCK_N, SPLIT, num_warps, num_stages) are checked and recorded in the header.
    """
    _check_constexprs(constexprs)
    return _emit_cached(ir, tuple(sorted(constexprs.items())))


# ----------------------------------------------------------------------------------------- loading
def cache_dir() -> str:
    """Where generated modules are written (`$PATTERNDSL_CACHE`, or a per-user temp folder)."""
    base = os.environ.get("PATTERNDSL_CACHE") or os.path.join(tempfile.gettempdir(),
                                                               f"patterndsl-{os.getuid()}")
    path = os.path.join(base, "triton")
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=512)
def mask_module(mask: M.Mask):
    """The imported module holding `mask_tile` and `tile_full` for `mask` (generated once per mask)."""
    src = "\n".join(_header(M.to_source(mask), {})) + "\n" + _HELPERS + mask_source(mask) + "\n"
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    name = f"patterndsl_mask_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(cache_dir(), name + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(src)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
