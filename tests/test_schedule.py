"""The schedule helper shared by the torch and Triton backends: work items cover every tile range exactly once,
no item walks more than `split` tiles, groups list the slots of each cut block, and the log-sum-exp merge of
pieces equals the softmax over the whole row."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from patterndsl.ir import mask as M
from patterndsl.plan.layout import PARTIAL, tile_layout
from patterndsl.plan.schedule import default_split, merge_by_lse, tile_classes, work_items


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=20), st.one_of(st.none(), st.integers(1, 9)),
       st.booleans())
def test_work_items_cover_each_range_once(lengths, split, empty_items):
    lengths = torch.tensor(lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    items = work_items(starts, starts + lengths, split, empty_items)
    cap = default_split(lengths) if split is None else split
    assert ((items.end - items.start) <= cap).all()
    assert (items.end - items.start).tolist() == sorted((items.end - items.start).tolist(), reverse=True)
    for b, n in enumerate(lengths.tolist()):
        mine = items.block == b
        walked = sorted(x for s, e in zip(items.start[mine].tolist(), items.end[mine].tolist()) for x in range(s, e))
        assert walked == list(range(int(starts[b]), int(starts[b]) + n))
        assert int(mine.sum()) == max(-(-n // cap), 1 if empty_items else 0)
    cut = items.slot >= 0
    assert sorted(items.slot[cut].tolist()) == list(range(items.slots))
    for g, block in enumerate(items.group_blocks.tolist()):
        slots = [s for s in items.groups[g].tolist() if s >= 0]
        assert sorted(slots) == sorted(items.slot[items.block == block].tolist())
    assert set(items.group_blocks.tolist()) == set(items.block[cut].tolist())


def test_default_split_is_twice_the_mean_busy_row():
    assert default_split(torch.tensor([0, 10, 11, 0])) == 22
    assert default_split(torch.tensor([0, 1, 2])) == 8
    assert default_split(torch.tensor([0, 0])) == 8


@pytest.mark.parametrize("n_k", [64, 61], ids=["even", "ragged"])
def test_tile_classes_make_the_ragged_key_tile_partial(n_k):
    layout = tile_layout(M.FULL, 32, n_k, 16, 16)
    cls = tile_classes(layout)
    last = layout.col_idx == 3
    assert (cls[last] == PARTIAL).all() == (n_k % 16 != 0)
    assert torch.equal(cls[~last], layout.cls[~last])


def test_merge_by_lse_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 10, generator=g, dtype=torch.float64)        # 3 rows, 10 keys
    s[2] = float("-inf")                                             # a row with no allowed key
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)
    parts_out, parts_lse = [], []
    for keys in (slice(0, 4), slice(4, 7), slice(7, 10)):
        lse = torch.logsumexp(s[:, keys], -1)
        p = torch.exp(s[:, keys] - lse.masked_fill(lse == float("-inf"), 0)[:, None])
        parts_out.append(p @ v[keys])
        parts_lse.append(lse)
    out, lse = merge_by_lse(torch.stack(parts_out, 1), torch.stack(parts_lse, 1), dim=1)
    want = torch.softmax(s[:2], -1) @ v
    assert_close("out", out[:2], want, atol=1e-14)
    assert_close("lse", lse, torch.logsumexp(s, -1), atol=1e-14)
    assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64))
