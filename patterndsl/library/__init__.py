"""The built-in programs: one `.attn` file per pattern, named like the pattern."""
from __future__ import annotations

from pathlib import Path

from ..errors import PatternError, did_you_mean

LIBRARY_DIR = Path(__file__).parent


def builtin_names() -> list[str]:
    return sorted(p.stem for p in LIBRARY_DIR.glob("*.attn"))


def builtin_path(name: str) -> Path:
    path = LIBRARY_DIR / f"{name}.attn"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise PatternError(f"no built-in program '{name}'",
                           hint=did_you_mean(str(name), builtin_names()) or f"built-ins: {', '.join(builtin_names())}")
    return path
