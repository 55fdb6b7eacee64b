"""Code generation: the Triton source of a program's masks, written to a cache file and imported.

For each softmax stage we emit two `@triton.jit` functions that the block-sparse kernels
(`softmax_fwd.py`, `softmax_bwd.py`) take as constexpr arguments, so Triton inlines them:

- `mask_tile(i, j, b, N_Q, N_K, AUX)`: the mask predicate of a *partial* tile, the mask's one pointwise
  definition (`Mask.at`) written as text by `predicates.TritonOps` (floor `//` and `%` as in the IR); `i`
  (the call's query rows) and `j` (keys) are broadcasting index tensors. The int32 buffer `AUX` holds the
  call's query offset (entry 0: row i is at position `i + AUX[0]`) and the data of index sets, `random`
  draws and `same` ids (then one header entry per data leaf, see `Emission` and `tiles.build_aux`). The
  kernels pass their row index as is; the offset never needs to reach them.
- `tile_full(m0, n0, N_K, BLOCK_M, BLOCK_N)`: for bands (and `full`), whether the tile starting at query
  `m0`, key `n0` is entirely allowed, by interval arithmetic on `i - j`; full tiles run with no mask at all.
  It is used only in band mode, which the schedule chooses only for a query offset of 0 (`m0` is a row).

The generated statements hold only numbers and operators derived from the checked IR; names (pattern,
stages, `same` inputs) appear only in comments and docstrings, reduced to safe characters.

>>> from patterndsl.ir.mask import sliding
>>> print("\\n".join(mask_source(sliding(2)).splitlines()[4:7]))
    qo = tl.load(AUX)
    ia = i + qo
    return (((ia - j) >= (-2)) & ((ia - j) <= 2))
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass

from ...errors import PatternError
from ...ir import mask as M
from ...ir.program import Linear, Nested, ProgramIR, Softmax
from .predicates import I, J, Lookup, Member, TritonOps, _c
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "SPLIT", "num_warps", "num_stages")


# ---------------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class Emission:
    """The body of one mask's `mask_tile` (statements, then the returned expression) and the data leaves it
    reads from AUX, in header order (`build_aux` writes them in this order)."""
    lines: tuple[str, ...]
    expr: str
    leaves: tuple


_DEFS = (("qo", "qo = tl.load(AUX)", ("qo", "ia", "i64")),        # the call's query offset: AUX[0]
         ("ia", "ia = i + qo", ("ia", "i64")),                       # the absolute query position
         ("i64", "i64 = ia.to(tl.int64)", ("i64",)),
         ("j64", "j64 = j.to(tl.int64)", ("j64",)),
         ("zero32", "zero32 = (i - i) + (j - j)", ("zero32", "zero64")),
         ("zero64", "zero64 = zero32.to(tl.int64)", ("zero64",)))


@functools.lru_cache(maxsize=512)
def emission(mask: M.Mask) -> Emission:
    """The mask's pointwise definition (`Mask.at`) as Triton text, by `TritonOps`."""
    ops = TritonOps()
    code = mask.at(I, J, ops)
    if code.const is not None:
        expr = "((i >= 0) & (j >= 0))" if code.const else "((i < 0) & (j < 0))"
    else:
        expr = code.text
    text = "\n".join(ops.lines + [expr])
    used = set(re.findall(r"\b(qo|ia|i64|j64|zero32|zero64)\b", text))
    defs = [line for _, line, needed_by in _DEFS if used & set(needed_by)]
    return Emission(tuple(defs + ops.lines), expr, tuple(ops.leaves))


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
    em = emission(mask)
    leaves = ", ".join(_leaf_text(x) for x in em.leaves) or "none"
    return "\n".join([
        "",
        "@triton.jit",
        f"def mask_tile{suffix}(i, j, b, N_Q, N_K, AUX):",
        f'    """Partial tiles of {_doc(M.to_source(mask))}; AUX leaves: {_doc(leaves)}."""',
        *("    " + line for line in em.lines),
        f"    return {em.expr}",
        "",
        "",
        "@triton.jit",
        f"def tile_full{suffix}(m0, n0, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        f"    return {_tile_full_body(mask)}",
    ])


def _leaf_text(leaf) -> str:
    if isinstance(leaf, Member):
        return M.to_source(M.Rows(leaf.idx) if leaf.side == "q" else M.Cols(leaf.idx))
    return M.to_source(leaf.node) if isinstance(leaf, Lookup) else f"same({leaf.name})"


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
    mode = "band (arithmetic loop bounds)" if is_band(st.mask) else "tile list from the sparse tile layout"
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
    return load_generated("patterndsl_mask", src)


def load_generated(prefix: str, src: str):
    """Generated source `src` as an imported module named by its hash (written to the cache dir once, atomically;
    Triton's JIT needs a real file to read the source from)."""
    name = f"{prefix}_{hashlib.sha256(src.encode()).hexdigest()[:20]}"
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
