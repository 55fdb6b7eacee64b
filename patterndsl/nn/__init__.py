"""`nn.Module` layers built from patterndsl programs (projections included).

`Attention` runs any program; `LunaLayer` is a Luna encoder layer (fairseq-apollo's structure);
`LongformerAttention` is Longformer self-attention with separate global projections.
"""
from .attention import Attention
from .longformer import LongformerAttention
from .luna import LunaLayer

__all__ = ["Attention", "LongformerAttention", "LunaLayer"]
