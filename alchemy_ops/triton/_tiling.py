"""How the Triton kernels tile a row: block size, warps, 64-bit offsets and the grid limit.

One program per row walks the row in blocks of BLOCK elements. The rules, shared by every launcher:

- BLOCK: the row length rounded up to a power of 2, at most 16 KiB of the widest value the kernel
  keeps per element (4096 fp32 values, 2048 fp64 values or int64 keys). A block is spread over the
  threads' registers, so this bounds the registers per thread: fp64 at 4096 spilled on sm_80/sm_90.
- num_warps: 64 bytes of that value per thread, i.e. BLOCK * element_bytes / (32 threads * 64 B)
  warps, 1 to 8 (16 fp32 or 8 fp64 values per thread and block-wide tensor; a kernel holds a few
  such tensors at once, and 255 registers is the ceiling).
- WIDE: the class loop counts in int64, so class offsets (cols * class stride) are int64, when the
  largest one plus a block of overrun does not fit in int32. The offsets are then 8-byte values
  per element, and BLOCK and num_warps are chosen for 8 bytes (fp32 CE at 4096 reached 255
  registers with int64 strided offsets). Row offsets are always int64 (``row`` is cast first).
- Rows go on grid x, whose limit is 2^31 - 1 programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BLOCK_BYTES = 16384
_THREAD_BYTES = 64
_MAX_WARPS = 8
_MAX_GRID_X = 2**31 - 1


def block_size(length: int, element_bytes: int) -> int:
    """Power-of-2 block covering ``length`` elements, at most 16 KiB of ``element_bytes`` values."""
    return min(_BLOCK_BYTES // element_bytes, triton.next_power_of_2(max(length, 1)))


def num_warps(block: int, element_bytes: int) -> int:
    """Warps for a block of ``block`` values of ``element_bytes``: 64 bytes per thread, 1 to 8."""
    return max(1, min(_MAX_WARPS, block * element_bytes // (32 * _THREAD_BYTES)))


def needs_int64(largest_offset: int, block: int) -> bool:
    """True when ``largest_offset`` (e.g. (C - 1) * class stride) plus one block overruns int32."""
    return largest_offset + block >= 2**31


def tiling(length: int, element_bytes: int, largest_offset: int) -> dict:
    """BLOCK, WIDE and num_warps of a kernel walking rows of ``length`` values of ``element_bytes``
    whose largest element offset is ``largest_offset`` (e.g. (C - 1) * class stride)."""
    block = block_size(length, element_bytes)
    wide = needs_int64(largest_offset, block)
    if wide:  # int64 offsets take 8 bytes of registers per element
        element_bytes = max(element_bytes, 8)
        block = block_size(length, element_bytes)
    return dict(BLOCK=block, WIDE=wide, num_warps=num_warps(block, element_bytes))


def check_rows(rows: int, op: str) -> None:
    """ValueError when one program per row would exceed CUDA's grid x limit (2^31 - 1)."""
    if rows > _MAX_GRID_X:
        raise ValueError(
            f"alchemy_ops: {op} has {rows} rows, more than the 2^31 - 1 a Triton launch can take; "
            "split the batch into chunks"
        )


@triton.jit
def row_base(ptr, row, inner, outer_stride, inner_stride):
    """Start of row ``row`` (int64) of a tensor viewed as [outer, classes, inner]."""
    return ptr + (row // inner) * outer_stride + (row % inner) * inner_stride


@triton.jit
def class_loop_end(classes, WIDE: tl.constexpr):
    """The bound of a ``range(0, ..., BLOCK)`` walk over a row's classes. int64 when WIDE, so the
    loop counter cannot wrap past 2^31 and ``start + tl.arange(0, BLOCK)`` times a class stride
    is computed in int64; int32 otherwise (cheaper address math, and unit strides vectorize)."""
    end = classes
    if WIDE:
        end = classes.to(tl.int64)
    return end
