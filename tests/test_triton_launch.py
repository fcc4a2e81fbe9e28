"""The Triton launchers' tiling rules (alchemy_ops/triton/_tiling.py) and the paths that only huge
tensors take on a GPU, forced here on small ones under the interpreter: int64 class offsets (WIDE)
must give exactly the int32 path's results, and the top-k rank loop must handle k over one tile."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, assert_close

import alchemy_ops as ao

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not available here")

if "triton" in BACKENDS:
    from alchemy_ops.triton import _tiling

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize(
    ("length", "element_bytes", "block", "warps"),
    [
        (1, 4, 1, 1),
        (3, 4, 4, 1),
        (1000, 4, 1024, 2),
        (50257, 4, 4096, 8),
        (128256, 4, 4096, 8),
        (1000, 8, 1024, 4),
        (128256, 8, 2048, 8),
    ],
)
def test_block_and_warps_rule(length, element_bytes, block, warps):
    assert _tiling.block_size(length, element_bytes) == block
    assert _tiling.num_warps(block, element_bytes) == warps


def test_int64_offsets_from_the_first_overflowing_span():
    assert not _tiling.needs_int64(2**31 - 4097, 4096)
    assert _tiling.needs_int64(2**31 - 4096, 4096)
    # [128256, T].t(): the class stride is T, so T >= 16744 needs int64 offsets.
    assert not _tiling.needs_int64(128255 * 16000, 4096)
    assert _tiling.needs_int64(128255 * 16744, 4096)


def test_int64_offsets_take_8_byte_blocks():
    # Llama 3's vocabulary read at a class stride of 20000: int64 offsets, blocks for 8-byte values.
    assert _tiling.tiling(128256, 4, 128255 * 20000) == dict(BLOCK=2048, WIDE=True, num_warps=8)
    assert _tiling.tiling(128256, 4, 128255) == dict(BLOCK=4096, WIDE=False, num_warps=8)
    assert _tiling.tiling(128256, 8, 128255) == dict(BLOCK=2048, WIDE=False, num_warps=8)


def test_too_many_rows_for_the_grid_raise():
    _tiling.check_rows(2**31 - 1, "softmax")
    with pytest.raises(ValueError, match="split the batch"):
        _tiling.check_rows(2**31, "softmax")


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of 16 values whatever their size: the rows below span several blocks, and the int64
    # path (whose blocks are otherwise sized for 8-byte values) walks the same blocks.
    def block_size(length: int, element_bytes: int) -> int:
        return min(16, 1 << max(length - 1, 0).bit_length())

    monkeypatch.setattr(_tiling, "block_size", block_size)


def _assert_int64_offsets_match(monkeypatch, run):
    """run() with the launcher's own offsets, then with int64 offsets forced: bitwise equal.
    Returns the first results for further checks."""
    with ao.backend("triton"):
        narrow = run()
        monkeypatch.setattr(_tiling, "needs_int64", lambda span, block: True)
        wide = run()
    for a, b in zip(narrow, wide, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return narrow


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_int64_offsets_match(monkeypatch, dtype, log):
    # dim 1 of [3, 37, 5]: a class stride of 5, rows longer than one block with a small BLOCK.
    x = (torch.randn(3, 37, 5, dtype=torch.float64) * 3).to(dtype).requires_grad_()

    def run():
        y = (ao.log_softmax if log else ao.softmax)(x, dim=1, temperature=0.7)
        (dx,) = torch.autograd.grad(y, x, torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(dtype))
        return y, dx

    narrow = _assert_int64_offsets_match(monkeypatch, run)
    expected = torch.log_softmax(x.double() / 0.7, 1) if log else torch.softmax(x.double() / 0.7, 1)
    assert_close(narrow[0], expected, dtype)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("soft", "smoothing", "softcap"), [(False, 0.0, 0.0), (False, 0.1, 5.0), (True, 0.1, 0.0)])
def test_cross_entropy_int64_offsets_match(monkeypatch, dtype, soft, smoothing, softcap):
    x = (torch.randn(4, 45, 3, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    if soft:
        target = torch.softmax(torch.randn(4, 45, 3, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, 45, (4, 3))
        target[0, 0] = -100
    weight = torch.rand(45, dtype=dtype) + 0.5

    def run():
        loss = ao.cross_entropy(x, target, weight, reduction="none", label_smoothing=smoothing, softcap=softcap or None)
        (dx,) = torch.autograd.grad(loss.sum(), x)
        return loss, dx

    _assert_int64_offsets_match(monkeypatch, run)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_shard_int64_offsets_match(monkeypatch, dtype):
    ops = torch.ops.alchemy_ops
    x = (torch.randn(5, 70, dtype=torch.float64) * 3).to(dtype)
    target = torch.tensor([0, 90, 69, -100, 7])
    weight = torch.rand(70, dtype=dtype) + 0.5
    lse = torch.logsumexp(x.double(), 1)
    coeffs = torch.rand(5, 3, dtype=torch.float64)

    def run():
        stats = ops.triton_cross_entropy_shard_stats(x, target, weight, 3, -100, 5.0, True)
        dx = ops.triton_cross_entropy_shard_backward(x, target, weight, lse, coeffs, 3, -100, 5.0)
        return stats, dx

    _assert_int64_offsets_match(monkeypatch, run)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_int64_loop_matches(monkeypatch, dtype, hard):
    x = torch.randn(3, 50, 4, dtype=torch.float64).to(dtype)

    def run():
        return (ao.gumbel_softmax(x, tau=0.5, hard=hard, dim=1, generator=torch.Generator().manual_seed(7)),)

    _assert_int64_offsets_match(monkeypatch, run)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_int64_offsets_match(monkeypatch, dtype, renormalize):
    x = (torch.randn(3, 40, dtype=torch.float64) * 2).to(dtype).requires_grad_()

    def run():
        w, i = ao.topk_softmax(x, 7, renormalize=renormalize)
        (dx,) = torch.autograd.grad(w, x, torch.linspace(-1, 1, w.numel()).reshape(w.shape))
        return w, i, dx

    _assert_int64_offsets_match(monkeypatch, run)


@pytest.mark.parametrize("k", [64, 65, 150])
def test_topk_rank_over_several_tiles(k):
    # The rank kernel walks the k selected in tiles of 64 inside one program per row.
    x = torch.randn(3, 300, dtype=torch.float64)
    with ao.backend("triton"):
        w, i = ao.topk_softmax(x, k, renormalize=False)
    expected_w, expected_i = torch.softmax(x, -1).topk(k, -1, sorted=True)
    torch.testing.assert_close(i, expected_i)
    assert_close(w, expected_w, torch.float64)
