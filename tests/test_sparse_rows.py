"""Sparse served tables (issue 18, item 6): CSR, COO or a bitmap, the smallest, counted exactly."""

import pytest
import torch

from embcompress.sparse_rows import FORMATS, SparseRows, format_bytes, smallest_format


def _pruned(rows, width, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g) * (torch.rand(rows, width, generator=g) < keep)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,width,keep", [(1000, 16, 0.05), (1000, 16, 0.4), (300, 7, 0.9), (40_000, 16, 0.01),
                                             (20, 300, 0.2), (10, 4, 0.0)])
def test_lookup_is_the_dense_table_and_bytes_are_exact(fmt, rows, width, keep):
    w = _pruned(rows, width, keep)
    s = SparseRows(w, fmt)
    idx = torch.randint(0, rows, (33, 2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(s.lookup(idx), w[idx])
    assert torch.equal(s.dense(), w)
    assert s.stored_bytes() == format_bytes(fmt, rows, width, int((w != 0).sum()))


def test_bytes_by_hand():
    # 1000 rows x 16, 400 kept: columns uint8, rows int16 (1000 <= 32768), pointers int32 [1001]
    assert format_bytes("csr", 1000, 16, 400) == 1001 * 4 + 400 * (1 + 4)
    assert format_bytes("coo", 1000, 16, 400) == 400 * (2 + 1 + 4)
    assert format_bytes("bitmap", 1000, 16, 400) == 1001 * 4 + 1000 * 2 + 400 * 4
    # 300 columns need int16 columns; 40,000 rows int32 row indices
    assert format_bytes("csr", 10, 300, 50) == 11 * 4 + 50 * (2 + 4)
    assert format_bytes("coo", 40_000, 16, 50) == 50 * (4 + 1 + 4)


def test_the_smallest_format_is_chosen():
    for keep in (0.01, 0.1, 0.2, 0.5, 1.0):
        w = _pruned(5000, 16, keep)
        nnz = int((w != 0).sum())
        best = min(FORMATS, key=lambda f: format_bytes(f, 5000, 16, nnz))
        assert SparseRows(w).format == smallest_format(5000, 16, nnz)[0] == best
    assert smallest_format(5000, 16, 100)[0] == "coo"        # most rows keep nothing
    assert smallest_format(50_000, 16, 60_000)[0] == "csr"   # about a number a row, int32 row indices
    assert smallest_format(5000, 16, 40_000)[0] == "bitmap"  # 8 a row: a bit each beats a byte each


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="rows, width"):
        SparseRows(torch.zeros(3))
    with pytest.raises(ValueError, match="format"):
        SparseRows(torch.zeros(3, 2), "dense")
