"""The compiled CPU read-out (`mirror_core._readout`, csrc/) against the official formulation.

Inputs are multiples of 1/8 with few digits, so every logit is exact in fp32 whatever
the summation order: the comparison is exact about which slots are kept, and many
logits tie (ties with the k-th value are kept, as the official masked softmax does).
"""
import logging

import pytest
import torch

from mirror_core import readout
from mirror_core.config import ENTROPY_EPS
from mirror_core.readout import readout_cpu, readout_native, sparse_readout

ext = readout.native_readout_module()


def test_extension_is_built():
    # The suite requires it: a CI machine that could not compile it must fail, not skip.
    assert ext is not None, "mirror_core._readout was not built: pip install -e . needs a C++ compiler"
    assert ext.isa() in ext.supported_isas()


def official_readout(q, k, v, top_k):
    """Masked dense softmax over the slots at or above each row's k-th logit, in fp64."""
    logits = torch.bmm(q.double(), k.double().transpose(1, 2))
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    weights = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    entropy = -(weights * torch.log(weights + ENTROPY_EPS)).sum(-1)
    return torch.bmm(weights, v.double()), weights.amax(-1), entropy


def eighths(gen, *shape, span=4):
    return torch.randint(-span * 8, span * 8 + 1, shape, generator=gen).float() / 8


# (heads, rows, slots, head_dim, top_k): ragged rows and slots for the tiles and vector
# tails, k = K (everything kept), k = 1, and k > K / 2 (no pruning bound).
SHAPES = [(2, 37, 300, 7, 16), (3, 70, 4096, 48, 128), (1, 5, 50, 3, 50), (2, 9, 64, 4, 1), (1, 33, 129, 5, 100)]


@pytest.mark.parametrize("isa", ext.supported_isas() if ext else [])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_readout_matches_official_form(isa, shape):
    heads, rows, slots, hd, top_k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = eighths(gen, heads, rows, hd, span=2), eighths(gen, heads, slots, hd), eighths(gen, heads, slots, hd)
    before = ext.isa()
    ext.use_isa(isa)
    try:
        got = readout_native(q, k, v, top_k)
    finally:
        ext.use_isa(before)
    for name, a, b in zip(("mixed", "max_w", "entropy"), got, official_readout(q, k, v, top_k)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5, msg=f"{name} on {isa}")


def test_ties_at_the_kth_value_are_all_kept():
    # One head, one query; logits 5 (x2), 3 (x4), 1 (x10): the 3rd value is 3, so 6 slots are kept.
    q = torch.ones(1, 1, 1)
    k = torch.tensor([5.0] * 2 + [3.0] * 4 + [1.0] * 10).view(1, 16, 1)
    v = torch.arange(16.0).view(1, 16, 1)
    mixed, max_w, entropy = readout_native(q, k, v, 3)
    w = torch.softmax(torch.tensor([5.0] * 2 + [3.0] * 4, dtype=torch.float64), 0)
    assert mixed.item() == pytest.approx(float((w * torch.arange(6.0, dtype=torch.float64)).sum()), rel=1e-6)
    assert max_w.item() == pytest.approx(float(w.max()), rel=1e-6)


def test_nan_rows_give_nan_and_leave_the_others_alone():
    gen = torch.Generator().manual_seed(0)
    q, k, v = eighths(gen, 2, 10, 6), eighths(gen, 2, 256, 6), eighths(gen, 2, 256, 6)
    q[1, 4, 2] = float("nan")
    got = readout_native(q, k, v, 32)
    want = official_readout(q, k, v, 32)
    assert torch.isnan(got[0][1, 4]).all() and torch.isnan(got[1][1, 4]) and torch.isnan(got[2][1, 4])
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 4] = False
    for a, b in zip(got, want):
        torch.testing.assert_close(a[keep].double(), b[keep], atol=2e-5, rtol=2e-5)


def test_thread_count_does_not_change_results(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 301, 16, generator=gen), torch.randn(4, 512, 16, generator=gen), torch.randn(4, 512, 16, generator=gen)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = readout_native(q, k, v, 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    three = readout_native(q, k, v, 64)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_bad_buffers_are_refused_with_their_name():
    import numpy as np

    f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="keys_t"):
        ext.topk_readout(f(1, 4, 2), f(1, 2, 7), f(1, 8, 2), f(1, 4, 2), f(1, 4), f(1, 4), 1, 4, 8, 2, 3, 1e-9, 1)
    with pytest.raises(ValueError, match="top_k"):
        ext.topk_readout(f(1, 4, 2), f(1, 2, 8), f(1, 8, 2), f(1, 4, 2), f(1, 4), f(1, 4), 1, 4, 8, 2, 9, 1e-9, 1)
    with pytest.raises(TypeError, match="read-write"):  # a read-only output
        out = f(1, 4, 2)
        out.flags.writeable = False
        ext.topk_readout(f(1, 4, 2), f(1, 2, 8), f(1, 8, 2), out, f(1, 4), f(1, 4), 1, 4, 8, 2, 3, 1e-9, 1)


def test_without_the_extension_the_torch_path_runs_and_says_so(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 20, 8, generator=gen), torch.randn(2, 100, 8, generator=gen), torch.randn(2, 100, 8, generator=gen)
    monkeypatch.setattr(readout, "native_readout_module", lambda: None)
    readout._warn_no_extension.cache_clear()
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    readout.log.addHandler(handler)
    try:
        with torch.no_grad():
            got = sparse_readout(q, k, v, 10)
    finally:
        readout.log.removeHandler(handler)
    assert any("not built" in m for m in seen)
    for a, b in zip(got, readout_cpu(q, k, v, 10)):
        assert torch.equal(a, b)
