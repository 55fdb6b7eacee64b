"""The language's built-in names: mask primitives, feature maps, normalisers and helpers, as plain data.

The checker uses this table for arity, keyword names and "did you mean" hints; `ir/lower.py` maps each
name to its IR constructor. Types: int, float (an int is accepted), bool, set, str, mask, featuremap,
normaliser; `pred` is a boolean expression over `i` and `j` (only inside `where`); `input` is the name of
a runtime tensor (only `same`); `tensor` is the name of a `param` (only `nested`); `table` the name of a
bias table `param t[heads, width]` (only `t5_bias`).

>>> SIGNATURES["sliding"].describe()
'sliding(width: int, dilation: int = 1) -> mask'
"""
from __future__ import annotations

from dataclasses import dataclass

_REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    default: object = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Signature:
    name: str
    args: tuple[Arg, ...]
    returns: str
    doc: str

    def describe(self) -> str:
        def one(a: Arg) -> str:
            if a.required:
                return f"{a.name}: {a.type}"
            d = str(a.default).lower() if isinstance(a.default, bool) else a.default
            return f"{a.name}: {a.type} = {d}"
        return f"{self.name}({', '.join(one(a) for a in self.args)}) -> {self.returns}"


def _sig(name: str, returns: str, doc: str, *args: Arg) -> Signature:
    return Signature(name, tuple(args), returns, doc)


SIGNATURES: dict[str, Signature] = {s.name: s for s in [
    # masks: which (i, j) pairs interact
    _sig("sliding", "mask", "abs(i - j) <= width*dilation and (i - j) % dilation == 0",
         Arg("width", "int"), Arg("dilation", "int", 1)),
    _sig("window", "mask", "-after*dilation <= i - j <= before*dilation and (i - j) % dilation == 0",
         Arg("before", "int"), Arg("after", "int"), Arg("dilation", "int", 1)),
    _sig("global", "mask", "i in S or j in S", Arg("tokens", "set")),
    _sig("rows", "mask", "i in S", Arg("tokens", "set")),
    _sig("cols", "mask", "j in S", Arg("tokens", "set")),
    _sig("blocks", "mask", "i // size == j // size", Arg("size", "int")),
    _sig("strided", "mask", "(i - j) % stride == 0", Arg("stride", "int")),
    _sig("random", "mask", "count random key blocks of `block` keys per query block, seeded",
         Arg("count", "int"), Arg("block", "int"), Arg("seed", "int", 0)),
    _sig("where", "mask", "any predicate over i and j", Arg("predicate", "pred")),
    _sig("same", "mask", "runtime ids equal: ids[i] == ids[j] (segments, documents)", Arg("ids", "input")),
    # sets
    _sig("range", "set", "{start, start + 1, ..., stop - 1}", Arg("start", "int"), Arg("stop", "int")),
    # integer helpers (also inside where)
    _sig("abs", "int", "absolute value", Arg("x", "int")),
    _sig("min", "int", "the smaller", Arg("a", "int"), Arg("b", "int")),
    _sig("max", "int", "the larger", Arg("a", "int"), Arg("b", "int")),
    # feature maps for linear attention
    _sig("favor", "featuremap", "FAVOR+ positive random features (Choromanski et al. 2021)",
         Arg("features", "int"), Arg("orthogonal", "bool", True), Arg("scaling", "int", 0),
         Arg("eps", "float", 1e-4), Arg("seed", "int", 0), Arg("redraw", "int", 0)),
    _sig("relu", "featuremap", "relu(x' W^T) + 1e-3 random features, x' = x d^-1/4",
         Arg("features", "int"), Arg("orthogonal", "bool", True), Arg("seed", "int", 0),
         Arg("redraw", "int", 0)),
    _sig("elu1", "featuremap", "elu(x) + 1 (Katharopoulos et al. 2020)"),
    # normalisers
    _sig("softmax", "normaliser", "exact softmax over the allowed keys"),
    _sig("linear", "normaliser", "phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)", Arg("phi", "featuremap")),
    _sig("nested", "normaliser", "causal Luna: attention through the packed queries of a param",
         Arg("packed", "tensor")),
    # score terms (only inside `, bias = ...`)
    _sig("alibi_slope", "float", "ALiBi's slope of head `head` among `heads` (Press et al. 2022)",
         Arg("head", "int"), Arg("heads", "int")),
    _sig("t5_bias", "float", "table[h, bucket(j - i)], T5's relative-position buckets (Raffel et al. 2020)",
         Arg("table", "table"), Arg("buckets", "int", 32), Arg("max_distance", "int", 128),
         Arg("bidirectional", "bool", True)),
]}

# Nullary names usable bare (`over full`, `attend softmax`, `linear(elu1)`), with the type they denote.
CONSTANTS: dict[str, str] = {
    "full": "mask", "causal": "mask", "empty": "mask",
    "softmax": "normaliser", "elu1": "featuremap",
}

# Options after an attend: `, causal = true`, `, scale = 0.125`.
OPTIONS: dict[str, str] = {"causal": "bool", "scale": "float", "bias": "float", "softcap": "float",
                           "far": "featuremap"}

# Names inside `, bias = ...`: query position, key position, head; and the functions only a bias may call.
SCORE_VARS = ("i", "j", "h")
SCORE_FUNCS = ("alibi_slope", "t5_bias")

# Names with a fixed meaning in sources: `query input`, `keys input`.
INPUT = "input"

# Index variables, meaningful only inside `where(...)`.
INDEX_VARS = ("i", "j")

KEYWORDS = ("pattern", "attend", "over", "query", "keys", "return", "param", "heads",
            "if", "then", "else", "and", "or", "not", "true", "false")
