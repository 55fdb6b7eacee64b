"""Calibration: the cost model's constants measured on this machine by short microbenchmarks, cached on disk.

Backends declare `Probe`s (a function that times a few small kernel calls and returns constants); the first
plan on a device runs them once (a few seconds) and writes the result to
`$PATTERNDSL_CACHE` (default `~/.cache/patterndsl/`) as `calibration-<device>-<versions>-<threads>.json`,
keyed by device, torch and patterndsl versions and thread count, so no later process times anything.
`patterndsl calibrate` measures again. `PATTERNDSL_CALIBRATE=0` uses the built-in defaults without timing
(the test suite does this); `use_constants(...)` injects constants (tests check choices against them).

>>> with use_constants({"flash.64": 1.0}):
...     constants(torch.device("cpu"))["flash.64"]
1.0
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .model import Constants, defaults


@dataclass(frozen=True)
class Probe:
    """A microbenchmark of one backend on one device type: `measure(device) -> {term: seconds per unit}`."""
    name: str
    device_type: str
    terms: tuple[str, ...]
    measure: Callable[[torch.device], dict]


_PROBES: dict[str, Probe] = {}
_MEMORY: dict[str, Constants] = {}
_INJECTED: list[Constants] = []
_GENERATION = [0]          # bumped whenever constants change, so cached choices are never stale


def generation() -> int:
    """A counter that changes whenever the constants in use may have changed."""
    return _GENERATION[0]


def declare_probe(probe: Probe) -> Probe:
    _PROBES[probe.name] = probe
    return probe


def probes(device_type: str) -> list[Probe]:
    return [p for p in _PROBES.values() if p.device_type == device_type]


def device_key(device: torch.device) -> str:
    """What a calibration is valid for: device, library versions and threads."""
    from .. import __version__
    name = device.type
    if device.type == "cuda":
        name += "-" + torch.cuda.get_device_name(device).replace(" ", "_")
    return f"{name}-torch{torch.__version__}-patterndsl{__version__}-threads{torch.get_num_threads()}"


def cache_dir() -> Path:
    return Path(os.environ.get("PATTERNDSL_CACHE") or Path.home() / ".cache" / "patterndsl")


def cache_path(device: torch.device) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in device_key(device))
    return cache_dir() / f"calibration-{safe}.json"


def calibrate(device: torch.device | str = "cpu", save: bool = True) -> Constants:
    """Run every probe declared for the device now and return (and cache) the constants."""
    device = torch.device(device)
    measured: dict[str, float] = {}
    names = []
    for probe in probes(device.type):
        measured.update(probe.measure(device))
        names.append(probe.name)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    source = f"calibrated {stamp} ({', '.join(names) or 'no probes: defaults'}) for {device_key(device)}"
    result = Constants.of(measured, source, device.type)
    _MEMORY[device_key(device)] = result
    _GENERATION[0] += 1
    if save and names:
        try:
            path = cache_path(device)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"source": source, "constants": measured}, indent=1, sort_keys=True))
        except OSError:
            pass                                   # a read-only home: keep the constants in memory
    return result


def constants(device: torch.device | str = "cpu") -> Constants:
    """The constants for `device`: injected, else this process's, else the disk cache, else measured now
    (or the defaults when `PATTERNDSL_CALIBRATE=0` or the device has no probes)."""
    device = torch.device(device)
    if _INJECTED:
        return _INJECTED[-1]
    key = device_key(device) if device.type != "cuda" or torch.cuda.is_available() else device.type
    if key in _MEMORY:
        return _MEMORY[key]
    loaded = _load(device) if key != device.type else None
    if loaded is None:
        off = os.environ.get("PATTERNDSL_CALIBRATE", "1").lower() in ("0", "off", "no", "false")
        if off or not probes(device.type) or key == device.type:
            loaded = defaults(device.type)
        else:
            return calibrate(device)
    _MEMORY[key] = loaded
    return loaded


def _load(device: torch.device) -> Constants | None:
    try:
        data = json.loads(cache_path(device).read_text())
        return Constants.of({k: float(v) for k, v in data["constants"].items()}, str(data["source"]), device.type)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def use_constants(values: dict, device_type: str = "cpu"):
    """Plan with these constants (the rest from the defaults) inside the block: for tests and what-ifs."""
    _INJECTED.append(Constants.of(values, "given", device_type))
    _GENERATION[0] += 1
    try:
        yield _INJECTED[-1]
    finally:
        _INJECTED.pop()
        _GENERATION[0] += 1
