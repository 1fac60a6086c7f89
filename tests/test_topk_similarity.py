"""fastap.topk_similarity: exact top-k of queries @ database.T without the (B, N) score matrix.

The oracle is the dense product followed by a *stable* sort (torch.topk itself does not promise
which of several equal scores it returns); ties are built deliberately from integer-valued
embeddings, whose products are exact in every dtype, and duplicate database rows.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

import fastap
import fastap.reference as R
from fastap.ops import topk_similarity_update

CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and fastap.WITH_CUDA),
                       reason="needs a CUDA device and fastap built with CUDA"),
])
DEVICES = ["cpu", CUDA]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(queries, database, k, largest=True):
    """The dense oracle, on the CPU: ties go to the lower index (stable sort)."""
    return R.topk_similarity(queries.cpu(), database.cpu(), k, largest)


def integer_data(batch, size, dim, *, low=-2, high=3, duplicates=True, dtype=torch.float32):
    """Small-integer embeddings (exact products, many equal scores) with duplicate rows."""
    q = torch.randint(low, high, (batch, dim)).to(dtype)
    x = torch.randint(low, high, (size, dim)).to(dtype)
    if duplicates and size >= 4:
        src = torch.randint(0, size, (size // 4,))
        dst = torch.randint(0, size, (size // 4,))
        x[dst] = x[src]
    return q, x


def assert_exact(result, expected):
    values, indices = result
    ref_values, ref_indices = expected
    assert values.dtype == ref_values.dtype and indices.dtype == torch.int64
    assert values.shape == ref_values.shape and indices.shape == ref_indices.shape
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Exactness and tie-breaking
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("batch,size,dim,k", [
    (1, 1, 1, 1),
    (5, 50, 8, 3),
    (3, 1000, 4, 1000),      # k = N, a handful of distinct scores
    (64, 3000, 16, 100),
    (700, 2500, 8, 17),      # several query chunks per thread
    (2, 20000, 3, 50),       # small batch: the database is split across threads
])
def test_matches_stable_sort_with_ties(device, batch, size, dim, k, largest):
    q, x = integer_data(batch, size, dim)
    result = fastap.topk_similarity(q.to(device), x.to(device), k, largest)
    assert result[0].device.type == device
    assert_exact(result, reference(q, x, k, largest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_k_in_query_groups(device, dtype):
    """k = 3000: the CPU kernel's running top-k (2k entries per row) then exceeds its memory
    budget for 700 queries, which are taken in groups, each streaming the database again."""
    q, x = integer_data(700, 3500, 4, dtype=dtype)
    for largest in (True, False):
        assert_exact(fastap.topk_similarity(q.to(device), x.to(device), 3000, largest),
                     reference(q, x, 3000, largest))


def test_all_scores_equal_keeps_lowest_indices(device):
    q = torch.ones(4, 3)
    x = torch.ones(500, 3)
    values, indices = fastap.topk_similarity(q.to(device), x.to(device), 10)
    assert torch.equal(indices.cpu(), torch.arange(10).expand(4, 10))
    assert torch.equal(values.cpu(), torch.full((4, 10), 3.0))


def test_duplicate_rows_rank_by_index(device):
    x = torch.randn(100, 8)
    x[70] = x[3]
    x[90] = x[3]
    q = x[3:4] * 2
    _, indices = fastap.topk_similarity(q.to(device), x.to(device), 3)
    assert indices.cpu().tolist() == [[3, 70, 90]]


@pytest.mark.parametrize("largest", [True, False])
def test_k_equal_one(device, largest):
    q, x = integer_data(40, 999, 6)
    assert_exact(fastap.topk_similarity(q.to(device), x.to(device), 1, largest),
                 reference(q, x, 1, largest))


@pytest.mark.parametrize("largest", [True, False])
def test_random_floats_agree_with_dense_topk(device, largest):
    """Random data: no exact ties, so torch.topk is the oracle; values to product rounding."""
    q, x = torch.randn(300, 64), torch.randn(5000, 64)
    values, indices = fastap.topk_similarity(q.to(device), x.to(device), 25, largest)
    scores = q @ x.T
    ref_values, ref_indices = torch.topk(scores, 25, largest=largest)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=1e-5, atol=1e-4)
    # The returned indices carry the returned scores and are distinct.
    torch.testing.assert_close(scores.gather(1, indices.cpu()), values.cpu(), rtol=1e-5,
                               atol=1e-4)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()
    # Indices agree except where two scores lie within rounding of each other.
    gaps = ref_values.diff(dim=1).abs()
    clear = torch.cat([gaps[:, :1], torch.minimum(gaps[:, 1:], gaps[:, :-1]), gaps[:, -1:]], 1)
    clear = clear > 1e-4
    assert torch.equal(indices.cpu()[clear], ref_indices[clear])


@pytest.mark.parametrize("largest", [True, False])
def test_nan_ranks_like_torch_sort(device, largest):
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, -1.0], [0.0, math.inf],
                      [math.nan, 5.0], [-1.0, 1.0]])
    for k in (1, 3, 6):
        assert_exact(fastap.topk_similarity(q.to(device), x.to(device), k, largest),
                     reference(q, x, k, largest))


def test_random_small_cases_with_special_values(device):
    """Many random small shapes; integer data with ±inf and NaN entries, so every score is
    exact (or exactly ±inf/NaN) whatever the summation order."""
    gen = torch.Generator().manual_seed(1)
    special = torch.tensor([math.inf, -math.inf, math.nan])
    for _ in range(150):
        batch, size, dim = (int(torch.randint(1, n, (1,), generator=gen)) for n in (20, 300, 5))
        k = int(torch.randint(1, size + 1, (1,), generator=gen))
        largest = bool(torch.randint(0, 2, (1,), generator=gen))
        q = torch.randint(-2, 3, (batch, dim), generator=gen).float()
        x = torch.randint(-2, 3, (size, dim), generator=gen).float()
        mask = torch.rand(size, dim, generator=gen) < 0.02
        x[mask] = special[torch.randint(0, 3, (int(mask.sum()),), generator=gen)]
        assert_exact(fastap.topk_similarity(q.to(device), x.to(device), k, largest),
                     reference(q, x, k, largest))


def test_independent_of_thread_count():
    q, x = integer_data(300, 4000, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastap.topk_similarity(q, x, 40)
    finally:
        torch.set_num_threads(threads)
    assert_exact(fastap.topk_similarity(q, x, 40), single)


def test_empty_batch_and_empty_dimension(device):
    values, indices = fastap.topk_similarity(torch.empty(0, 4, device=device),
                                             torch.randn(10, 4, device=device), 3)
    assert values.shape == indices.shape == (0, 3)
    # D = 0: every score is 0, so the order is the database order.
    values, indices = fastap.topk_similarity(torch.empty(2, 0, device=device),
                                             torch.empty(10, 0, device=device), 4)
    assert torch.equal(indices.cpu(), torch.arange(4).expand(2, 4))
    assert torch.equal(values.cpu(), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# Dtypes and layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_rank_in_the_accumulation_dtype(device, dtype):
    q, x = integer_data(33, 2000, 12, dtype=dtype)
    values, indices = fastap.topk_similarity(q.to(device), x.to(device), 30)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_exact((values, indices), reference(q, x, 30))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_matches_float32_product_of_rounded_values(device, dtype):
    q = torch.randn(50, 64).to(dtype)
    x = torch.randn(3000, 64).to(dtype)
    values, indices = fastap.topk_similarity(q.to(device), x.to(device), 20)
    scores = q.float() @ x.float().T  # the float32 product of the same rounded values
    ref_values, _ = torch.topk(scores, 20)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores.gather(1, indices.cpu()), values.cpu(), rtol=1e-5,
                               atol=1e-4)


def test_mixed_dtypes_promote(device):
    q, x = integer_data(10, 300, 4)
    for qd, xd, acc in [(torch.float16, torch.float32, torch.float32),
                        (torch.float32, torch.float64, torch.float64),
                        (torch.bfloat16, torch.float16, torch.float32)]:
        values, indices = fastap.topk_similarity(q.to(device, qd), x.to(device, xd), 7)
        assert values.dtype == acc
        assert_exact((values, indices), reference(q.to(qd), x.to(xd), 7))


def test_non_contiguous_inputs(device):
    q, x = integer_data(20, 1500, 6)
    qt = q.T.contiguous().to(device).T                  # column-major queries
    wide = torch.zeros(3000, 12, device=device)
    wide[::2, ::2] = x.to(device)
    xs = wide[::2, ::2]                                 # strided rows and columns
    xt = x.T.contiguous().to(device).T                  # column-major database
    expected = reference(q, x, 25)
    for qq in (q.to(device), qt):
        for xx in (xs, xt):
            assert not xx.is_contiguous()
            assert_exact(fastap.topk_similarity(qq, xx, 25), expected)
    half = x.to(torch.float16).to(device)
    assert_exact(fastap.topk_similarity(q.to(device), half.T.contiguous().T, 25), expected)
    row = x[:1].to(device).expand(40, 6)                # stride-0 rows: 40 equal items
    assert_exact(fastap.topk_similarity(q.to(device), row, 5), reference(q, x[:1].expand(40, 6), 5))


# ---------------------------------------------------------------------------------------------
# NumPy and memory-mapped databases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("block_rows", [None, 37, 1])
def test_memmap_database(tmp_path, device, np_dtype, block_rows):
    q, x = integer_data(9, 300, 5)
    path = tmp_path / "db.f"
    disk = np.memmap(path, dtype=np_dtype, mode="w+", shape=tuple(x.shape))
    disk[:] = x.numpy()
    disk.flush()
    del disk
    database = np.memmap(path, dtype=np_dtype, mode="r", shape=tuple(x.shape))
    for largest in (True, False):
        result = fastap.topk_similarity(q.to(device), database, 20, largest,
                                        block_rows=block_rows)
        assert result[0].device.type == device
        assert_exact(result, reference(q, torch.from_numpy(np.asarray(database)), 20, largest))
    # The mapping is intact after its pages were released.
    assert np.array_equal(np.asarray(database), x.numpy().astype(np_dtype))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memmap_pages_are_released_after_each_block(tmp_path):
    """A sweep over a memmap leaves at most about one block resident, not the whole file."""
    rows, dim = 16384, 1024  # 64 MiB
    path = tmp_path / "big.f32"
    disk = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, dim))
    for start in range(0, rows, 2048):
        disk[start:start + 2048] = np.random.default_rng(start).standard_normal(
            (2048, dim), dtype=np.float32)
    disk.flush()
    del disk
    database = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))
    q = torch.randn(8, dim)

    def resident_mib():
        # File-backed resident pages only: the memmap's, not the heap's (an allocator such as
        # AddressSanitizer's keeps freed blocks resident in quarantine).
        with open("/proc/self/status") as f:
            line = next(row for row in f if row.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    # The same search on a small array first, so that the code it runs is paged in already.
    fastap.topk_similarity(q, np.asarray(database[:2048]).copy(), 5, block_rows=1024)
    before = resident_mib()
    values, indices = fastap.topk_similarity(q, database, 5, block_rows=1024)  # 4 MiB blocks
    assert resident_mib() - before < 16
    expected = reference(q, torch.from_numpy(np.array(database)), 5)
    torch.testing.assert_close(values, expected[0], rtol=1e-5, atol=1e-4)


def test_memmap_with_header_offset_and_fortran_order(tmp_path):
    q, x = integer_data(4, 200, 7)
    path = tmp_path / "db.bin"
    disk = np.memmap(path, dtype=np.float32, mode="w+", shape=(200, 7), offset=100, order="F")
    disk[:] = x.numpy()
    disk.flush()
    database = np.memmap(path, dtype=np.float32, mode="r", shape=(200, 7), offset=100, order="F")
    assert_exact(fastap.topk_similarity(q, database, 11, block_rows=64), reference(q, x, 11))


def test_numpy_arrays_of_any_layout():
    q, x = integer_data(6, 400, 5)
    xn = x.numpy()
    expected = reference(q, x, 13)
    for arr in (xn, np.asfortranarray(xn), xn[::-1][::-1], xn.astype(">f4")):
        assert_exact(fastap.topk_similarity(q, arr, 13, block_rows=50), expected)
    assert_exact(fastap.topk_similarity(q.numpy(), xn, 13), expected)
    rev = xn[::-1]
    assert_exact(fastap.topk_similarity(q, rev, 13, block_rows=50),
                 reference(q, torch.from_numpy(rev.copy()), 13))


def test_update_streams_blocks_like_the_full_op(device):
    q, x = integer_data(30, 1000, 6)
    q, x = q.to(device), x.to(device)
    values = torch.full((30, 50), -math.inf, device=device)
    indices = torch.full((30, 50), -1, dtype=torch.int64, device=device)
    for start, stop in [(0, 10), (10, 10), (10, 400), (400, 401), (401, 1000)]:
        topk_similarity_update(q, x[start:stop], start, values, indices)
    assert_exact((values, indices), reference(q, x, 50))
    # Partially filled state: empty slots stay last with index -1.
    values = torch.full((30, 50), -math.inf, device=device)
    indices = torch.full((30, 50), -1, dtype=torch.int64, device=device)
    topk_similarity_update(q, x[:20], 0, values, indices)
    assert (indices[:, 20:] == -1).all()
    assert_exact((values[:, :20], indices[:, :20]), reference(q[:, :], x[:20], 20))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, x = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="k = 11 exceeds the number of database items N = 10"):
        fastap.topk_similarity(q, x, 11)
    with pytest.raises(ValueError, match="k must be positive"):
        fastap.topk_similarity(q, x, 0)
    with pytest.raises(ValueError, match="k must be positive"):
        fastap.topk_similarity(q, x, -3)
    with pytest.raises(ValueError, match="same embedding dimension"):
        fastap.topk_similarity(q, torch.randn(10, 5), 2)
    with pytest.raises(ValueError, match="database is empty"):
        fastap.topk_similarity(q, torch.randn(0, 4), 1)
    with pytest.raises(ValueError, match="queries must be a 2-D"):
        fastap.topk_similarity(q[0], x, 2)
    with pytest.raises(ValueError, match="database must be a 2-D"):
        fastap.topk_similarity(q, x[0], 2)
    with pytest.raises(TypeError, match="database must be float16"):
        fastap.topk_similarity(q, x.long(), 2)
    with pytest.raises(TypeError, match="queries must be float16"):
        fastap.topk_similarity(q.int(), x, 2)


def test_bad_numpy_inputs_raise_clear_errors():
    q, x = torch.randn(3, 4), np.random.rand(10, 4).astype(np.float32)
    with pytest.raises(ValueError, match="k = 11 exceeds"):
        fastap.topk_similarity(q, x, 11)
    with pytest.raises(ValueError, match="k must be positive"):
        fastap.topk_similarity(q, x, 0)
    with pytest.raises(ValueError, match="same embedding dimension"):
        fastap.topk_similarity(q, x[:, :3], 2)
    with pytest.raises(ValueError, match="database is empty"):
        fastap.topk_similarity(q, x[:0], 1)
    with pytest.raises(TypeError, match="float16, float32 or float64 array"):
        fastap.topk_similarity(q, x.astype(np.int32), 2)
    with pytest.raises(TypeError, match="queries must be float16"):
        fastap.topk_similarity(q.int(), x, 2)
    with pytest.raises(ValueError, match="block_rows must be positive"):
        fastap.topk_similarity(q, x, 2, block_rows=0)


def test_device_mismatch_raises():
    q = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="database is on meta but queries is on cpu"):
        fastap.topk_similarity(q, torch.randn(10, 4, device="meta"), 2)
    if torch.cuda.is_available() and fastap.WITH_CUDA:
        with pytest.raises(RuntimeError, match="database is on cuda"):
            fastap.topk_similarity(q, torch.randn(10, 4, device="cuda"), 2)


def test_update_state_checks():
    q, x = torch.randn(3, 4), torch.randn(10, 4)
    values, indices = torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="values must be a \\(B, k\\) tensor with B = 3"):
        topk_similarity_update(q, x, 0, values[:2], indices[:2])
    with pytest.raises(TypeError, match="values must be Double"):
        topk_similarity_update(q.double(), x, 0, values, indices)
    with pytest.raises(TypeError, match="indices must be int64"):
        topk_similarity_update(q, x, 0, values, indices.int())
    with pytest.raises(ValueError, match="must be contiguous"):
        topk_similarity_update(q, x, 0, torch.zeros(5, 3).T, torch.zeros(5, 3).long().T)
    with pytest.raises(ValueError, match="index_offset must be >= 0"):
        topk_similarity_update(q, x, -1, values, indices)


def test_not_differentiable():
    q = torch.randn(3, 4, requires_grad=True)
    values, _ = fastap.topk_similarity(q, torch.randn(10, 4), 2)
    assert not values.requires_grad
    values, _ = fastap.topk_similarity(q, np.random.rand(10, 4).astype(np.float32), 2)
    assert not values.requires_grad


# ---------------------------------------------------------------------------------------------
# Operator registration
# ---------------------------------------------------------------------------------------------

def test_opcheck(device):
    q, x = integer_data(6, 120, 5)
    q, x = q.to(device), x.to(device)
    for largest in (True, False):
        torch.library.opcheck(torch.ops.fastap.topk_similarity.default, (q, x, 9, largest))
        torch.library.opcheck(torch.ops.fastap.topk_similarity.default, (q.half(), x, 9, largest))
        values = torch.full((6, 9), -math.inf, device=device)
        indices = torch.full((6, 9), -1, dtype=torch.int64, device=device)
        torch.library.opcheck(torch.ops.fastap.topk_similarity_update.default,
                              (q, x[:50], 0, values, indices, largest))


def test_compiles_with_fake_tensors():
    q, x = integer_data(5, 100, 3)

    @torch.compile(fullgraph=True, backend="eager")
    def search(q, x):
        return torch.ops.fastap.topk_similarity(q, x, 4)

    assert_exact(search(q, x), reference(q, x, 4))
