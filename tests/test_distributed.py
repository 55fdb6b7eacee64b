"""patterndsl.distributed without other processes: Region masks equal slices of the dense mask and their layouts
are exact, shardings cover the sequence, halo plans fetch what the rows read and no more, the sharding choice
follows the tile costs, the report's bytes, and every error message (on a one-rank gloo group)."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl import PatternError
from patterndsl.distributed import (ContextParallel, Region, Sharding, contiguous, halo_plan, launch, plan_sharding,
                                    zigzag)
from patterndsl.distributed.halo import global_rows, without_rows
from patterndsl.distributed.report import distributed_report
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.plan.layout import block_layout, tile_layout

from test_layout import _truth, rich_masks

BUILTIN = {"longformer": {"window": 16, "globals": {0, 5}}, "bigbird": {"block": 8},
           "sparse_transformer": {"stride": 16}, "prefix_lm": {"prefix": 20}, "dilated_window": {"window": 16}}


# ---------------------------------------------------------------------------------------------------- Region
@settings(max_examples=60, deadline=None)
@given(rich_masks(), st.integers(8, 60), st.data(), st.sampled_from([(4, 4), (8, 4), (4, 8), (16, 8)]))
def test_region_is_a_window_of_the_whole_problem(m, n, data, block):
    q0, k0 = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    rows, keys = data.draw(st.integers(1, n - q0)), data.draw(st.integers(1, n - k0))
    region = Region(m, q0, k0, n, n)
    want = dense_mask(m, n)[q0:q0 + rows, k0:k0 + keys]
    assert torch.equal(dense_mask(region, rows, keys), want)
    truth = _truth(want, *block)
    assert torch.equal(block_layout(region, rows, keys, *block), truth)         # small: settled, so exact
    assert torch.equal(tile_layout(region, rows, keys, *block).dense(), truth)


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 60), st.data(), st.sampled_from([(4, 4), (8, 4), (4, 8)]))
def test_region_places_runtime_ids(n, data, block):
    """Document ids: the local call's ids (its rows, its keys) give the window of the whole problem's mask."""
    ids = torch.tensor(sorted(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))))[None]
    m = M.Same("doc") & data.draw(st.sampled_from([M.sliding(3), M.CAUSAL, M.sliding(1) | M.cols({2})]))
    q0, k0 = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    rows, keys = data.draw(st.integers(1, n - q0)), data.draw(st.integers(1, n - k0))
    region, local = Region(m, q0, k0, n, n), {"doc": (ids[:, q0:q0 + rows], ids[:, k0:k0 + keys])}
    want = dense_mask(m, n, runtime={"doc": ids})[:, q0:q0 + rows, k0:k0 + keys]
    assert torch.equal(dense_mask(region, rows, keys, local), want)
    truth = _truth(want, *block)
    assert torch.equal(block_layout(region, rows, keys, *block, runtime=local), truth)
    assert torch.equal(tile_layout(region, rows, keys, *block, runtime=local).dense(), truth)


def test_region_keeps_a_band_sparse():
    band = M.sliding(64)
    local = tile_layout(Region(band, 4096, 4096 - 64, 1 << 14, 1 << 14), 1024, 1024 + 128, 64, 32)
    assert local.nnz == tile_layout(band, 1024, 1024 + 128, 64, 32, q_offset=64).nnz   # not every tile
    assert "q0 = 4096" in Region(band, 4096, 0, 8, 8).source()


# -------------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("make", [contiguous, zigzag])
@pytest.mark.parametrize("n,w", [(203, 4), (5, 4), (1, 3), (4096, 2)])
def test_shardings_cover_every_position_once(make, n, w):
    sh = make(n, w)
    pos = torch.cat([sh.positions(r) for r in range(w)])
    assert torch.equal(pos.sort().values, torch.arange(n))
    x = torch.randn(1, 1, n, 2)
    assert torch.equal(sh.unshard([sh.shard(x, r) for r in range(w)]), x)
    for p in (0, n // 2, n - 1):
        assert int(sh.positions(sh.owner(p))[sh.local_index(p)]) == p


def test_sharding_errors():
    with pytest.raises(PatternError, match=re.escape("must cover positions 0 .. 9 once: gap at position 4")):
        Sharding(10, (((0, 4),), ((5, 10),)))
    with pytest.raises(PatternError, match="overlap at position 3"):
        Sharding(10, (((0, 4),), ((3, 10),)))
    with pytest.raises(PatternError, match="it stops at 8"):
        Sharding(10, (((0, 4),), ((4, 8),)))
    with pytest.raises(PatternError, match=re.escape("rank 0's segments must be ascending")):
        Sharding(10, (((6, 10), (0, 3)), ((3, 6),)))
    with pytest.raises(PatternError, match="world_size must be an int >= 1, got 0"):
        contiguous(8, 0)
    with pytest.raises(PatternError, match=re.escape("sharding a sequence of 8, but the tensor has 7 along dim 2")):
        contiguous(8, 2).shard(torch.zeros(1, 1, 7, 2), 0)


# ------------------------------------------------------------------------------------------------ halo plans
def test_longformer_halo_is_the_window_edges_and_the_global_column():
    plan = halo_plan(M.sliding(256) | M.global_({0}), contiguous(1 << 16, 4))
    assert plan.rows == (0,) and plan.rest == M.sliding(256) | M.cols({0})
    assert plan.needs[1] == ((0, 0, 32), (0, 16384 - 256, 16384), (2, 32768, 32768 + 256))
    assert plan.keys_received(1) == 544 and plan.keys_sent(0) == 256 + 3 * 32


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("make", [contiguous, zigzag])
def test_halo_buffers_hold_every_key_a_row_reads(name, make):
    """Every allowed pair of a non-global row has its key in a filled piece of one of its segment's buffers."""
    n, w = 203, 4
    mask = pd.compile(name, **BUILTIN[name]).ir.stages[0].mask
    sh, dense = make(n, w), dense_mask(mask, n)
    plan = halo_plan(mask, sh)
    dense[list(plan.rows)] = False
    for r in range(w):
        for s, (a, e) in enumerate(sh.segments[r]):
            have = torch.zeros(n, dtype=torch.bool)
            for buf in (b for b in plan.buffers[r] if b.seg == s):
                for _, x, y in buf.pieces:
                    have[x:y] = True
            assert not (dense[a:e] & ~have).any(), f"rank {r} segment {s} misses keys"


def test_document_ids_shrink_the_halo():
    mask = M.Same("doc") & M.CAUSAL
    ids = (torch.arange(4096) // 700)[None]                     # documents of 700 tokens
    with_ids, without = halo_plan(mask, contiguous(4096, 4), runtime={"doc": ids}), halo_plan(mask, contiguous(4096, 4))
    assert [without.keys_received(r) for r in range(4)] == [0, 1024, 2048, 3072]
    for r in range(1, 4):                                       # the start of the document that straddles
        start = int(ids[0, 1024 * r]) * 700
        assert with_ids.keys_received(r) == 1024 * r - start // 32 * 32


def test_global_rows_come_from_rows_nodes_and_leave_the_rest_exact():
    m = (M.sliding(2) | M.global_({0, 7})) & ~M.rows({3})
    assert global_rows(m, 6) == (0, 3)
    rest, whole = dense_mask(without_rows(m), 12), dense_mask(m, 12)
    keep = [i for i in range(12) if i not in (0, 3, 7)]
    assert torch.equal(rest[keep], whole[keep])


# ------------------------------------------------------------------------------------- balance and report
def test_the_sharding_follows_the_tile_costs():
    assert plan_sharding(pd.compile("longformer", window=64), 4096, 4).kind == "contiguous"
    for causal in ("prefix_lm", "sparse_transformer"):
        assert plan_sharding(pd.compile(causal), 4096, 4).kind == "zigzag"
    given_ = zigzag(64, 2)
    assert plan_sharding(pd.compile("longformer"), 64, 2, given_) is given_


def test_longformer_sends_a_small_fraction_of_ring_attention():
    r = distributed_report(pd.compile("longformer", window=512), 1 << 16, 4, heads=4)
    assert max(r.fraction_of_ring()) < 0.02
    assert r.keys_in == (256, 544, 544, 288) and r.ring_forward[0] == 3 * 16384 * 4 * 128 * 4
    text = str(r)
    assert "contiguous sharding of 65536 tokens over 4 ranks" in text and "fwd/ring" in text


def test_explain_prints_the_distributed_report(capsys):
    from patterndsl.cli import main
    assert main(["explain", "longformer", "-n", "4096", "--world-size", "2"]) == 0
    assert "context parallel: longformer, contiguous sharding of 4096 tokens over 2 ranks" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ errors
def test_choice_errors():
    op = pd.compile("longformer")
    with pytest.raises(PatternError, match="unknown sharding 'ring'"):
        plan_sharding(op, 64, 2, "ring")
    with pytest.raises(PatternError, match="the sharding is for 64 tokens over 2 ranks, but the call has 65 tokens"):
        plan_sharding(op, 65, 2, contiguous(64, 2))


def test_without_a_process_group():
    with pytest.raises(PatternError, match="needs an initialised process group"):
        ContextParallel(pd.compile("longformer"), 64)


@pytest.fixture
def one_rank():
    import torch.distributed as dist
    from patterndsl.distributed.launch import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_equals_the_op_and_checks_shards(one_rank):
    op = pd.compile("longformer", window=8, globals={0, 3})
    cp = ContextParallel(op, 40)
    q, k, v = (torch.randn(1, 2, 40, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(cp(q, k, v), op(q, k, v), rtol=0, atol=1e-13)
    assert torch.equal(cp.gather(q), q) and cp.bytes_sent == {}
    with pytest.raises(PatternError, match="rank 0 holds 40 of the 40 positions, but q has 39 rows"):
        cp(q[:, :, 1:], k, v)
    with pytest.raises(PatternError, match=re.escape("key_padding_mask must be this rank's [B, 40] shard")):
        cp(q, k, v, key_padding_mask=torch.zeros(1, 39, dtype=torch.bool))
    with pytest.raises(PatternError, match=re.escape("stage x reads runtime ids (doc) over replicated queries")):
        ContextParallel(pd.compile("pattern t() { param p[4]\n x = attend softmax query p keys input over same(doc)"
                                   "\n return x }"), 40)
    docs = ContextParallel(pd.compile("pattern p() { attend softmax over same(doc) & causal }"), 40)
    ids = torch.arange(40).div(7, rounding_mode="floor")[None]
    torch.testing.assert_close(docs(q, k, v, doc=ids), docs.op(q, k, v, doc=ids), rtol=0, atol=1e-13)
    with pytest.raises(PatternError, match=re.escape("doc: pass this rank's ids [B, n] (one tensor, for queries")):
        docs(q, k, v, doc=(ids, ids))
    luna = ContextParallel(pd.compile("luna_causal", length=4), 40)
    with pytest.raises(PatternError, match=re.escape("c (pack keys) must be this rank's shard, like k: "
                                                     "torch.float64 [1, 2, 40, 4], got torch.float64 [1, 2, 39, 4]")):
        luna(q, k, v, p=torch.randn(4, 4, dtype=torch.float64), c=k[:, :, 1:])
    for norm, what in (("linear(elu1)", "causal linear"), ("nested(p)", "nested")):
        op = pd.compile(f"pattern t() {{ param p[4]\n x = attend {norm} query p keys input, causal = true\n"
                        " return x }")
        with pytest.raises(PatternError, match=re.escape(f"runs {what} stages over sharded queries and keys only; "
                                                         "stage x has replicated queries")):
            ContextParallel(op, 40)(q, k, v, p=torch.randn(4, 4, dtype=torch.float64),
                                    **({"c": k} if what == "nested" else {}))


def test_launch_reports_failing_hanging_and_dying_ranks():
    import dist_cases
    with pytest.raises(PatternError, match="rank 1 failed( \\(and rank 0\\))?:(.|\n)*rank 1 of 2 says no"):
        launch(dist_cases.fail_on_rank_one, 2, timeout=60)
    with pytest.raises(PatternError, match=re.escape("distributed run timed out after 2 s (0 of 2 ranks finished)")):
        launch(dist_cases.sleep, 2, 60, timeout=2)
    with pytest.raises(PatternError, match=re.escape("a distributed worker died: exit codes [0, 3]")):
        launch(dist_cases.exit_on_rank_one, 2, timeout=60)
