"""`nn.Module` layers built from patterndsl programs (projections included)."""
