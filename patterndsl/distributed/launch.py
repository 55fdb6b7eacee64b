"""Run a function on W local processes joined in a gloo group over loopback (tests, benchmarks, examples).

`launch(fn, world_size, *args)` starts W processes, each of which joins a `torch.distributed` gloo group
on 127.0.0.1 at a free port, calls `fn(rank, world_size, *args)`, and leaves the group; it returns the W
results in rank order. Processes are always ended: a worker that raises makes `launch` raise with its
traceback, and one still running after `timeout` seconds is killed. `fn` must be importable by name (a
module-level function), as the processes start fresh ("forkserver": the server imports torch and
patterndsl once, each worker forks from it).
"""
from __future__ import annotations

import datetime
import queue
import socket
import time
import traceback

from ..errors import PatternError

GRACE = 5.0   # seconds to wait for the other ranks' errors after the first


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, threads, timeout):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _collect(results, procs, world_size: int, timeout: float) -> dict:
    """Every rank's result; on a failure, the failures that arrive within `GRACE` seconds, the first
    rank's in full (the others often only say that a peer went away)."""
    got, failed, deadline = {}, {}, time.monotonic() + timeout
    while len(got) + len(failed) < world_size:
        try:
            rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() > deadline:
                break
            if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                raise PatternError(f"a distributed worker died: exit codes {[p.exitcode for p in procs]}") from None
            continue
        (got if ok else failed)[rank] = value
        if failed:
            deadline = min(deadline, time.monotonic() + GRACE)
    if failed:
        first = min(failed, key=lambda r: (_peer_gone(failed[r]), r))
        others = [str(r) for r in sorted(failed) if r != first]
        also = f" (and rank{'s' if len(others) > 1 else ''} {', '.join(others)})" if others else ""
        raise PatternError(f"rank {first} failed{also}:\n{failed[first]}")
    if len(got) < world_size:
        raise PatternError(f"distributed run timed out after {timeout:g} s ({len(got)} of {world_size} ranks "
                           f"finished)")
    return got


def _peer_gone(trace: str) -> bool:
    return "Connection closed by peer" in trace or "Connection reset" in trace


def launch(fn, world_size: int, *args, timeout: float = 120.0, threads: int = 1, start_method: str = "forkserver"):
    """`[fn(rank, world_size, *args) for rank in range(world_size)]`, each in its own process of a gloo group."""
    import multiprocessing as mp
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "patterndsl.distributed"])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, threads, timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done = False
    try:
        got = _collect(results, procs, world_size, timeout)
        done = True
    finally:
        for p in procs:                # after a failure the others may wait on it forever: end them now
            p.join(timeout=10 if done else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(world_size)]
