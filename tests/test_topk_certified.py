"""Certified float32 search: every coarse pass (float32, bfloat16, int8) returns exactly the ranking
of float64 scores rounded to float32, ties to the lower index, on data built to defeat the bound.

The oracle is independent of the kernels: the (B, N) product in float64 (each float32 product is
exact there; only the summation order differs from fastap's, far below a float32 rounding step),
rounded to float32 and ranked by a stable sort.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastap
import fastap._device as _device
import fastap.search as search
from fastap import PreparedDatabase
from fastap.ops import prepare_lowp, topk_similarity_lowp_update

Tensor = torch.Tensor


def oracle(q: Tensor, x: Tensor, k: int, largest: bool = True):
    scores = (q.double() @ x.double().T).float()
    order = torch.sort(scores, dim=1, descending=largest, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def assert_same(result, expected):
    values, indices = result
    ref_values, ref_indices = expected
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)


# The torch-operation path (fastap/certified.py) is the one CUDA runs; here it also runs on the
# CPU, so the CPU suite checks its logic, and on a GPU where there is one.
TORCH_PATH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def search_both(q, x, k, largest=True, **kwargs):
    """Every pass: the C++ kernel's float32, bfloat16 and int8 coarse passes and, for a tensor
    database, the passes of the torch-operation path (in three database blocks, so that the
    running state is merged). They must agree bit for bit before one is checked."""
    fp32 = fastap.topk_similarity(q, x, k, largest, precision="fp32", **kwargs)
    for lowp in ("bf16", "int8"):
        assert_same(fastap.topk_similarity(q, x, k, largest, precision=lowp, **kwargs), fp32)
    if isinstance(x, Tensor) and not kwargs:
        for device in TORCH_PATH_DEVICES:
            for coarse in ("fp32", "tf32", "bf16"):
                got = search._search_certified_torch(q.to(device), x.to(device), k, largest,
                                                     coarse, block_rows=max(1, -(-len(x) // 3)))
                assert_same(tuple(t.cpu() for t in got), fp32)
    return fp32


def crowded(num_queries, num_db, dim, *, spread=1e-4, seed=0):
    """Every database row scores within `spread` of the same value for every query: thousands
    of items inside the bfloat16 error (about 4e-3 here; int8's is wider), so the bound alone
    settles nothing."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=g), dim=1)
    centre = q.mean(0)
    x = centre + spread * torch.randn(num_db, dim, generator=g)
    return q, x


@pytest.mark.parametrize("largest", [True, False])
def test_random_data_equals_float64_ranking(largest):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(70, 100, generator=g)   # D not a multiple of 16 or 32
    x = torch.randn(3000, 100, generator=g)
    assert_same(search_both(q, x, 50, largest), oracle(q, x, 50, largest))


@pytest.mark.parametrize("largest", [True, False])
def test_thousands_of_items_within_bfloat16_error(largest):
    q, x = crowded(40, 4000, 77)
    values, indices = search_both(q, x, 100, largest)
    assert_same((values, indices), oracle(q, x, 100, largest))
    # the crowd is real: the whole database lies within the bfloat16 bound of the k-th score
    scores = q @ x.T
    assert (scores.max(1).values - scores.min(1).values).max() < 4e-3


def test_crowd_with_non_normalised_rows_and_large_norms():
    q, x = crowded(30, 3000, 48, spread=1e-5)
    g = torch.Generator().manual_seed(2)
    scale = 10.0 ** torch.empty(3000, 1).uniform_(-3, 3, generator=g)
    x = x * scale
    q = q * 1e12
    assert_same(search_both(q, x, 64), oracle(q, x, 64))


def test_zero_vectors_duplicates_and_k_equal_n():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 40, generator=g)
    x[10:20] = 0.0                       # zero rows
    x[50:80] = x[5]                      # duplicates of row 5
    q = torch.randn(5, 40, generator=g)
    q[2] = 0.0                           # a zero query: every score is 0, ties by index
    for k in (1, 37, 300):
        assert_same(search_both(q, x, k), oracle(q, x, k))
        assert_same(search_both(q, x, k, largest=False), oracle(q, x, k, largest=False))
    assert_same(search_both(q[:1], x, 300), oracle(q[:1], x, 300))   # B = 1, k = N


def test_subnormal_and_tiny_entries():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 33, generator=g) * 1e-20        # products near the float32 floor
    x[:100] *= 1e-19                                     # entries below 2^-126: subnormal
    x[100:120, :5] = 1e-41
    q = torch.randn(8, 33, generator=g)
    q[0] *= 1e-25
    assert (x.abs() < torch.finfo(torch.float32).tiny).any()
    assert_same(search_both(q, x, 60), oracle(q, x, 60))


def test_nan_and_inf_rank_as_in_the_float32_path():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 24, generator=g)
    x[7, 3] = math.nan
    x[11, 0] = math.inf
    x[12] = 1e30                                         # overflows float32 in the product
    q = torch.randn(4, 24, generator=g)
    q[3, 1] = -math.inf
    for largest in (True, False):
        assert_same(search_both(q, x, 20, largest), oracle(q, x, 20, largest))


def test_numpy_blocks_memmap_and_prepared_database(tmp_path):
    q, x = crowded(20, 2500, 64, spread=3e-4, seed=6)
    expected = oracle(q, x, 40)
    path = tmp_path / "db.npy"
    np.save(path, x.numpy())
    mm = np.load(path, mmap_mode="r")
    assert_same(search_both(q, mm, 40, block_rows=700), expected)
    for precision in ("bf16", "int8"):
        other = {"bf16": "int8", "int8": "bf16"}[precision]
        prepared = PreparedDatabase.prepare(x, precision=precision)
        assert prepared.precision == precision
        assert_same(fastap.topk_similarity(q, prepared, 40, precision=precision), expected)
        assert_same(fastap.topk_similarity(q, PreparedDatabase.prepare(
            x.numpy(), precision=precision, block_rows=333), 40, precision=precision,
            block_rows=512), expected)
        prepared = PreparedDatabase.open(path, precision=precision, block_rows=900)
        assert isinstance(prepared.lowp, np.memmap) and prepared.precision == precision
        for asked in (precision, "fp32", other):   # its copy, or its float32 rows
            assert_same(fastap.topk_similarity(q, prepared, 40, block_rows=600,
                                               precision=asked), expected)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_prepared_copy_on_disk_is_reused_and_remade_when_stale(tmp_path, precision):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 16, generator=g)
    path = tmp_path / "descriptors.npy"
    np.save(path, x.numpy())

    def search(q, k):
        prepared = PreparedDatabase.open(path, precision=precision)
        return fastap.topk_similarity(q, prepared, k, precision=precision)

    PreparedDatabase.open(path, precision=precision)
    lowp_path, norms_path, meta_path = (tmp_path / f"descriptors.{precision}.npy",
                                        tmp_path / f"descriptors.{precision}norms.npy",
                                        tmp_path / f"descriptors.{precision}.json")
    made = lowp_path.stat().st_mtime_ns
    PreparedDatabase.open(path, precision=precision)
    assert lowp_path.stat().st_mtime_ns == made             # reused, not converted again
    # the descriptors change: the copy is remade from the new rows
    x2 = torch.randn(400, 16, generator=g)
    np.save(path, x2.numpy())
    q = torch.randn(3, 16, generator=g)
    assert_same(search(q, 9), oracle(q, x2, 9))
    # a damaged copy is remade, never used
    with open(lowp_path, "r+b") as f:
        f.truncate(100)
    assert_same(search(q, 9), oracle(q, x2, 9))
    assert json.loads(meta_path.read_text())["shape"] == [400, 16]
    assert norms_path.exists()


def test_prepare_lowp_is_round_to_nearest_even_with_upper_bound_norms():
    x = torch.tensor([[1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -3.0, 1e-40],
                      [0.0, 2.0 ** -126, 65504.0, -1.0 - 2 ** -9]])
    lowp, norms = prepare_lowp(x)
    # ties go to the even neighbour; the subnormal 1e-40 is flushed to zero
    expected = torch.tensor([[1.0, 1.0 + 4 * 2 ** -8, -3.0, 0.0],
                             [0.0, 2.0 ** -126, 65536.0, -1.0]])
    torch.testing.assert_close(lowp.float(), expected, rtol=0, atol=0)
    x64, lowp64 = x.double(), lowp.double()
    assert (norms[:, 0].double() >= lowp64.norm(dim=1)).all()
    assert (norms[:, 1].double() >= (x64 - lowp64).norm(dim=1)).all()
    assert (norms.double() <= torch.stack([lowp64.norm(dim=1), (x64 - lowp64).norm(dim=1)],
                                          1) * (1 + 1e-5) + 1e-30).all()


def test_prepare_lowp_int8_rounds_to_the_nearest_step_of_the_row_scale():
    x = torch.tensor([[1.0, -0.5, 0.25, 127.0, 0.0],
                      [3.0, 1.5, -1.49, 0.0, 1e-3],
                      [0.0, 0.0, 0.0, 0.0, 0.0],
                      [1e-35, -3e-36, 0.0, 0.0, 2e-40],     # tiny: quantised in float64
                      [1.0, math.nan, 0.0, 0.0, 0.0],
                      [1.0, math.inf, 0.0, 0.0, 0.0]])
    lowp, norms = prepare_lowp(x, torch.int8)
    assert lowp.dtype == torch.int8 and norms.shape == (6, 3)
    # oracle: s = max|x|/127, X = round-half-even(x·(127/max|x|)) computed in float32
    amax = x[:3].abs().amax(1, keepdim=True)
    scale = (amax / 127).clamp(min=0)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    expected = torch.round(x[:3] * inv).clamp(-127, 127)
    torch.testing.assert_close(lowp[:3].float(), expected, rtol=0, atol=0)
    torch.testing.assert_close(norms[:3, 2:], scale, rtol=0, atol=0)
    assert lowp[0].tolist() == [1, 0, 0, 127, 0]   # 0.5 and 0.25 steps of 1: ties to even
    # the norms bound ‖x̂‖ and ‖x − x̂‖ of x̂ = s·X from above, and closely
    x64 = x[:4].double()
    hat = norms[:4, 2:].double() * lowp[:4].double()
    true = torch.stack([hat.norm(dim=1), (x64 - hat).norm(dim=1)], 1)
    assert (norms[:4, :2].double() >= true).all()
    assert (norms[:4, :2].double() <= true * (1 + 1e-5) + 1e-30).all()
    assert lowp[3, 0] == 127 and norms[3, 2] > 0               # the tiny row is not zeroed
    assert norms[4:].isnan().all() and (lowp[4:] == 0).all()   # NaN/Inf: always re-scored


def test_int8_bound_holds_where_rounding_errors_all_point_one_way():
    """int8 rows whose rounding errors all have one sign, so that the coarse pass ranks five
    rows above five others whose exact values are higher. Without the query's error term (first
    case) or the database's (second), the search returns the wrong five."""
    d = 64
    off = torch.full((1, d), 0.49)               # 0.49 steps off: rounds to 0, error +0.49
    off[0, 0] = 127.0
    group_a = torch.full((5, d), -127.0)
    group_a[:, 0] = 127.0
    group_b = torch.full((5, d), 127.0)
    group_b[:, 0] = 126.0
    group_a[torch.arange(5), 1 + torch.arange(5)] = -126.0   # no ties within a group
    group_b[torch.arange(5), 1 + torch.arange(5)] = 126.0
    rows = torch.cat([group_a, group_b])
    # query side: the query carries the error; group A scores 16129 coarse, 12208.5 exact,
    # group B 16002 coarse, 19922.5 exact
    assert_same(search_both(off, rows, 5), oracle(off, rows, 5))
    assert set(oracle(off, rows, 5)[1][0].tolist()) == set(range(5, 10))
    # database side: an int8-exact query; rows 0-4 round up by 0.49 steps (coarse 16002,
    # exact 12081), rows 5-9 down (coarse 15876, exact 19796)
    query = torch.full((1, d), 127.0)
    query[0, 0] = 126.0
    rounds_up = torch.full((5, d), -0.49)
    rounds_up[:, 0] = 127.0
    rounds_down = torch.full((5, d), 0.49)
    rounds_down[:, 0] = 126.0
    rounds_up[torch.arange(5), 1 + torch.arange(5)] = -0.48
    rounds_down[torch.arange(5), 1 + torch.arange(5)] = 0.48
    db = torch.cat([rounds_up, rounds_down])
    assert_same(search_both(query, db, 5), oracle(query, db, 5))
    assert set(oracle(query, db, 5)[1][0].tolist()) == set(range(5, 10))


@pytest.mark.parametrize("precision, bound", [("bf16", 200), ("int8", 400)])
def test_rescored_counts_are_small_on_ordinary_data(precision, bound):
    g = torch.Generator().manual_seed(8)
    q = torch.nn.functional.normalize(torch.randn(50, 128, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(20000, 128, generator=g), dim=1)
    lowp, norms = prepare_lowp(x, search._LOWP_DTYPES[precision])
    values = torch.full((50, 10), -math.inf)
    indices = torch.full((50, 10), -1)
    rescored = topk_similarity_lowp_update(q, x, lowp, norms, 0, values, indices)
    assert_same((values, indices), oracle(q, x, 10))
    assert (rescored >= 10).all() and rescored.float().mean() < bound   # of 20,000


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 6), n=st.integers(1, 120), d=st.integers(1, 40),
       data=st.data(), largest=st.booleans(), kind=st.sampled_from(["normal", "ints", "crowd"]))
def test_property_both_paths_equal_the_float64_ranking(b, n, d, data, largest, kind):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "ints":      # exact scores, many ties
        q = torch.randint(-2, 3, (b, d), generator=g).float()
        x = torch.randint(-2, 3, (n, d), generator=g).float()
    elif kind == "crowd":
        q = torch.randn(b, d, generator=g)
        x = q.mean(0) + 1e-4 * torch.randn(n, d, generator=g)
    else:
        q = torch.randn(b, d, generator=g) * 10.0 ** data.draw(st.integers(-8, 8))
        x = torch.randn(n, d, generator=g) * 10.0 ** data.draw(st.integers(-8, 8))
    assert_same(search_both(q, x, k, largest), oracle(q, x, k, largest))


# ---------------------------------------------------------------------------------------------
# which coarse pass runs


def test_auto_uses_int8_then_bf16_only_with_their_units(monkeypatch):
    calls = []
    real = search.topk_similarity_lowp_update

    def spy(*args):
        # the pass: the prepared copy's dtype, else the lowp_dtype argument (default bfloat16)
        lowp_block, lowp_dtype = args[2], (args[8:] or [torch.bfloat16])[0]
        calls.append(lowp_dtype if lowp_block is None else lowp_block.dtype)
        return real(*args)

    monkeypatch.setattr(search, "topk_similarity_lowp_update", spy)
    q, x = torch.randn(64, 8), torch.randn(100, 8)
    monkeypatch.setattr(_device, "cpu_int8_units", lambda: None)
    monkeypatch.setattr(_device, "cpu_bf16_units", lambda: None)
    assert search.search_precision("auto")[0] == "fp32"
    fastap.topk_similarity(q, x, 5)
    fastap.topk_similarity(q, x.numpy(), 5, block_rows=30)
    assert not calls
    monkeypatch.setattr(_device, "cpu_bf16_units", lambda: "AVX512-BF16")
    assert search.search_precision("auto") == ("bf16", "this CPU has AVX512-BF16 units")
    fastap.topk_similarity(q, x, 5)
    assert len(calls) == 1
    fastap.topk_similarity(q[:1], x, 5)
    assert len(calls) == 2
    fastap.topk_similarity(q, x.numpy(), 5, block_rows=30)   # one call per block
    assert len(calls) == 6
    fastap.topk_similarity(q[:3], PreparedDatabase.prepare(x), 5)
    assert len(calls) == 7
    fastap.topk_similarity(q, x, 5, precision="fp32")
    fastap.topk_similarity(q.double(), x, 5)                  # float64: the float64 path
    assert len(calls) == 7 and set(calls) == {torch.bfloat16}
    monkeypatch.setattr(_device, "cpu_int8_units", lambda: "AVX512-VNNI")
    assert search.search_precision("auto") == ("int8", "this CPU has AVX512-VNNI units")
    fastap.topk_similarity(q, x, 5)
    fastap.topk_similarity(q, x.numpy(), 5, block_rows=50)
    assert calls[7:] == [torch.int8] * 3
    prepared = PreparedDatabase.prepare(x)                    # auto: for this CPU's pass
    assert prepared.precision == "int8"
    fastap.topk_similarity(q, prepared, 5)
    assert len(calls) == 11


def test_low_precision_passes_refused_where_they_cannot_run():
    with pytest.raises(ValueError, match="float64"):
        fastap.topk_similarity(torch.randn(2, 4).double(), torch.randn(5, 4), 2, precision="bf16")
    with pytest.raises(ValueError, match="float64"):
        fastap.topk_similarity(torch.randn(2, 4).double(), torch.randn(5, 4), 2, precision="int8")
    with pytest.raises(ValueError, match="CPU only"):
        search.search_precision("int8", device="cuda")
    with pytest.raises(ValueError, match="D <= 131072"):
        fastap.topk_similarity(torch.randn(1, 2 ** 17 + 1), torch.randn(2, 2 ** 17 + 1), 1,
                               precision="int8")
    with pytest.raises(ValueError, match="precision must be 'auto', 'bf16' or 'int8'"):
        PreparedDatabase.prepare(torch.randn(5, 4), precision="fp32")
    with pytest.raises(TypeError, match="int8 or bfloat16"):
        PreparedDatabase(torch.randn(5, 4), torch.zeros(5, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"norms \(5, 3\)"):
        PreparedDatabase(torch.randn(5, 4), torch.zeros(5, 4, dtype=torch.int8),
                         torch.zeros(5, 2))
    with pytest.raises(ValueError, match="float64"):
        search.search_precision("bf16", device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="precision must be one of"):
        fastap.topk_similarity(torch.randn(2, 4), torch.randn(5, 4), 2, precision="fp16")
    with pytest.raises(ValueError, match="float16"):
        fastap.topk_similarity(torch.randn(2, 4), np.zeros((5, 4), np.float16), 2,
                               precision="bf16")


@pytest.mark.parametrize("bad_k", [2.7, "3", None, True])
def test_k_must_be_an_integer(bad_k):
    with pytest.raises(TypeError, match="k must be an integer"):
        fastap.topk_similarity(torch.randn(2, 4), torch.randn(5, 4), bad_k)


def test_block_rows_must_be_a_positive_integer():
    with pytest.raises(TypeError, match="block_rows must be an integer"):
        fastap.topk_similarity(torch.randn(2, 4), np.ones((5, 4), np.float32), 2, block_rows=2.5)
    with pytest.raises(ValueError, match="block_rows must be positive"):
        fastap.topk_similarity(torch.randn(2, 4), np.ones((5, 4), np.float32), 2, block_rows=0)


@pytest.mark.parametrize("block_rows", [1, 3, None])
def test_reversed_numpy_database(block_rows):
    x = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    q = torch.randn(3, 6)
    rev = x[::-1]
    assert_same(fastap.topk_similarity(q, rev, 5, block_rows=block_rows),
                oracle(q, torch.from_numpy(rev.copy()), 5))


def test_fastap_info_names_the_search_path(capsys):
    from fastap.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    path, why = search.search_precision("auto")
    assert f"float32 search coarse pass: {path} ({why})" in out


def test_fastap_info_names_the_cuda_search_path(monkeypatch, capsys):
    """With a (pretend) Hopper GPU and CUDA kernels: the line for the GPU's pass."""
    from fastap.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Pretend H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fastap, "WITH_CUDA", True)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert ("float32 search coarse pass on cuda:0: bf16 (this GPU (compute capability 9.0) has "
            "bfloat16 tensor cores)") in out


def test_strided_and_column_major_databases_in_both_passes():
    q, x = crowded(12, 1500, 40, spread=2e-4, seed=9)
    wide = torch.zeros(3000, 80)
    wide[::2, ::2] = x
    expected = oracle(q, x, 30)
    for strided in (wide[::2, ::2], x.T.contiguous().T):
        assert not strided.is_contiguous()
        assert_same(search_both(q, strided, 30), expected)
    repeated = x[:1].expand(1500, 40)        # stride-0 rows: 1500 equal items, ties by index
    assert_same(search_both(q, repeated, 30), oracle(q, repeated.contiguous(), 30))


def test_cuda_auto_needs_bfloat16_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert search.search_precision("auto", device="cuda") == (
        "fp32", "this GPU (compute capability 7.5) has no bfloat16 tensor cores")
    assert search.search_precision("bf16", device="cuda")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert search.search_precision("auto", device="cuda")[0] == "bf16"
    assert search.search_precision("auto", device="cuda", dtype=torch.float64)[0] == "fp32"


# ---------------------------------------------------------------------------------------------
# the torch-operation path's pieces


def fixed_order_dot(q: np.ndarray, x: np.ndarray) -> np.float32:
    """The documented value, written out: float64 partial sums over d mod 8, then the tree."""
    acc = [0.0] * 8
    for d in range(len(q)):
        acc[d % 8] += float(q[d]) * float(x[d])
    return np.float32(((acc[0] + acc[4]) + (acc[2] + acc[6]))
                      + ((acc[1] + acc[5]) + (acc[3] + acc[7])))


@pytest.mark.parametrize("device", TORCH_PATH_DEVICES)
def test_exact_dot_pairs_is_the_fixed_order_float64_sum(device):
    from fastap.ops import exact_dot_pairs

    g = torch.Generator().manual_seed(9)
    q = torch.randn(6, 37, generator=g) * 10.0 ** torch.randint(-6, 6, (6, 1), generator=g)
    x = torch.randn(50, 37, generator=g)
    x[3] = -x[3] * 1e7                                  # cancellation stresses the order
    qi = torch.randint(0, 6, (200,), generator=g)
    xi = torch.randint(0, 50, (200,), generator=g)
    got = exact_dot_pairs(q.to(device), x.to(device), qi.to(device), xi.to(device)).cpu()
    expected = [fixed_order_dot(q[a].numpy(), x[b].numpy()) for a, b in zip(qi, xi)]
    assert np.array_equal(got.numpy().view(np.uint32),
                          np.array(expected, dtype=np.float32).view(np.uint32))
    with pytest.raises(IndexError, match="database_rows must lie in"):
        exact_dot_pairs(q.to(device), x.to(device), qi[:2].to(device),
                        torch.tensor([0, 50], device=device))
    with pytest.raises(TypeError, match="float32"):
        exact_dot_pairs(q.double().to(device), x.to(device), qi.to(device), xi.to(device))


def test_torch_path_in_small_tiles_on_a_crowd(monkeypatch):
    """Query rows split over many tiles and the database over many blocks, on data where the
    bound settles nothing: the state merge and the thresholds across tiles."""
    import fastap.certified as certified

    monkeypatch.setattr(certified, "_TILE_ELEMENTS", 700)
    q, x = crowded(12, 900, 40, spread=1e-4, seed=10)
    expected = oracle(q, x, 30)
    for coarse in ("fp32", "tf32", "bf16"):
        assert_same(search._search_certified_torch(q, x, 30, True, coarse, block_rows=250),
                    expected)


def test_rank_order_is_the_kernels_order():
    values = torch.tensor([[1.0, math.nan, 1.0, -0.0, 0.0, math.inf, 5.0]])
    indices = torch.tensor([[4, 9, 2, 7, 3, 8, -1]])
    largest = search.rank_order(values, indices, True)
    assert indices.gather(1, largest).tolist() == [[9, 8, 2, 4, 3, 7, -1]]
    smallest = search.rank_order(values, indices, False)
    assert indices.gather(1, smallest).tolist() == [[3, 7, 2, 4, 8, 9, -1]]



def _adversarial_cases():
    g = torch.Generator().manual_seed(11)
    yield "crowd", *crowded(25, 3000, 77), 100
    q, x = crowded(10, 2000, 48, spread=1e-5, seed=12)
    yield "norms", q * 1e12, x * 10.0 ** torch.empty(2000, 1).uniform_(-3, 3, generator=g), 64
    x = torch.randn(400, 33, generator=g) * 1e-20
    x[:100] *= 1e-19                                     # subnormal entries
    yield "subnormal", torch.randn(6, 33, generator=g), x, 50
    x = torch.randn(300, 24, generator=g)
    x[7, 3], x[11, 0], x[12] = math.nan, math.inf, 1e30
    yield "nonfinite", torch.randn(4, 24, generator=g), x, 20
    x = torch.randn(200, 40, generator=g)
    x[50:80] = x[5]
    yield "k=N", torch.randn(1, 40, generator=g), x, 200


@pytest.mark.parametrize("device", TORCH_PATH_DEVICES)
def test_torch_path_through_the_public_api(device):
    """What a GPU user calls: topk_similarity with tensors, a NumPy database and a prepared one
    on `device`, in both passes, against the float64 ranking."""
    for name, q, x, k in _adversarial_cases():
        for largest in (True, False):
            expected = oracle(q, x, k, largest)
            for coarse in ("fp32", "tf32", "bf16"):
                got = search._search_certified_torch(q.to(device), x.to(device), k, largest,
                                                     coarse, block_rows=len(x) // 2 + 1)
                assert_same(tuple(t.cpu() for t in got), expected), (name, largest, coarse)
    q, x = crowded(8, 1500, 40, seed=13)
    expected = oracle(q, x, 30)
    qd = q.to(device)
    for database in (x.to(device), x.numpy(), PreparedDatabase.prepare(x)):
        for precision in ("auto", "fp32", "bf16"):
            got = fastap.topk_similarity(qd, database, 30, block_rows=400, precision=precision)
            assert got[0].device == qd.device
            assert_same(tuple(t.cpu() for t in got), expected)


def test_tf32_rounding_is_round_to_nearest_even_on_11_bits():
    """fastap.certified.to_tf32 against a float64 computation of the same rounding."""
    from fastap.certified import to_tf32

    g = torch.Generator().manual_seed(14)
    x = torch.randn(4000, generator=g) * 10.0 ** torch.randint(-30, 30, (4000,), generator=g)
    ties = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, -(1 + 2.0 ** -11), 2.0 ** -126,
                         1e-40, -1e-41, 3.4028235e38, -3.4028235e38, math.inf, -math.inf, 0.0,
                         -0.0])
    x = torch.cat([x, ties])
    got = to_tf32(x).numpy()
    mantissa, exponent = np.frexp(x.double().numpy())      # x = m·2^e, 0.5 <= |m| < 1
    with np.errstate(over="ignore"):                              # float32's max: to inf
        expected = np.ldexp(np.rint(mantissa * 2.0 ** 11), exponent - 11).astype(np.float32)
    expected[np.abs(x.numpy()) < 2.0 ** -126] = 0.0                 # subnormals flushed
    expected = np.where(np.isinf(x.numpy()), x.numpy(), expected)
    assert np.array_equal(np.abs(got), np.abs(expected))
    assert np.array_equal(np.signbit(got), np.signbit(x.numpy()))
    assert got[-6] == math.inf and got[-5] == -math.inf             # float32's max rounds past TF32's
    assert torch.isnan(to_tf32(torch.tensor([math.nan]))).all()

