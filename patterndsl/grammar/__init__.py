"""The front end: the `.attn` grammar, the parser to a checked AST, and the printer back to text."""
from .checks import check_module
from .parser import parse_module
from .printer import print_expr, print_module

__all__ = ["check_module", "parse_module", "print_expr", "print_module"]
