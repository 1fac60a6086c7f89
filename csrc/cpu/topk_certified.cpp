// Certified exact top-k on the CPU: a coarse pass, a certified candidate selection and an exact
// re-score (docs/search.md derives the bound and proves the selection).
//
// The value of a pair is v = fl32(Σ_d q_d·x_d), the products of the float32 inputs (exact in
// float64) summed in float64 in one fixed order (exact_dot below) and rounded to float32. It does
// not depend on the BLAS, the blocking, the thread count or the coarse pass, so the float32 and
// the bfloat16 paths return the same values and indices, bit for bit.
//
// Coarse pass: s̃ = q·x tile by tile with at::mm, in float32 or (bfloat16 path) on bfloat16
// copies, with a per-pair bound |s̃ − v| ≤ e = a_i·n_j + b_i·m_j + c·|s̃| + abs, from per-row
// norms (a, b of the query; n, m of the database row). A row keeps every candidate whose upper
// bound s̃ + e reaches T, the k-th largest lower bound s̃ − e seen so far: an item below T ranks
// after k others whatever its exact value. Candidates are re-scored exactly, and the top k of
// the exact values (ties to the lower index) are the result.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <utility>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "topk_certified.h"
#include "topk_common.h"
#include "topk_similarity.h"

namespace fastap {
namespace {

using at::Tensor;
using namespace topk_cpu;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Every computed bound term is inflated by this factor: it covers the float32/float64 rounding
// of the norms and of the bound's own arithmetic (a few units of 2^-24 each).
constexpr double kInflate = 1.0 + 0x1p-18;
// Database rows a lane converts to bfloat16 at a time when the search converts as it goes.
constexpr int64_t kFusedSubRows = 1024;

// The hot loops are compiled for AVX-512 and AVX2 as well as the baseline the extension is
// built for, and the loader picks one at run time (GCC/Clang function multiversioning). Each
// gives the same results: the loops are written so that vectorising them reorders nothing.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FASTAP_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTAP_HOT
#endif

// A candidate of one query row: bounds of its key (the score, negated when smallest first, so
// that larger is always better) and, once re-scored, its exact value.
struct Candidate {
  float lo, hi, v;
  int32_t exact;
  int64_t i;
};

// The key of an exact value: NaN ranks above every number for largest, below for smallest.
template <bool largest>
inline float key_of(float v) {
  if (v != v) return largest ? kInf : -kInf;
  return largest ? v : -v;
}

// A candidate re-scored: its key's bounds close on its exact value.
template <bool largest>
inline void set_exact(Candidate& e, float v) {
  e.v = v;
  e.lo = e.hi = key_of<largest>(v);
  e.exact = 1;
}

// v = fl32 of the float64 sum of the exact float64 products, in a fixed order: 8 partial sums
// over d mod 8, then a fixed tree. Deterministic on every machine and vector width (each partial
// sum is a sequential chain, so vectorising across them reorders nothing; an FMA contraction is
// exact because the product is).
float exact_dot_tail(double* acc, const float* q, const float* x, int64_t d, int64_t D) {
  for (int t = 0; d < D; ++d, ++t) acc[t] += double(q[d]) * double(x[d]);
  return float(((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])));
}

FASTAP_HOT float exact_dot_scalar(const float* q, const float* x, int64_t D) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int t = 0; t < 8; ++t) acc[t] += double(q[d + t]) * double(x[d + t]);
  }
  return exact_dot_tail(acc, q, x, d, D);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The eight partial sums are the eight lanes of one register. Each lane is one chain of
// dependent additions, so one dot product waits on the FMA latency; exact_dot4 runs four pairs
// in flight, each in the same order.
__attribute__((target("avx512f"))) float exact_dot_avx512(const float* q, const float* x,
                                                          int64_t D) {
  __m512d acc = _mm512_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    acc = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(q + d)),
                          _mm512_cvtps_pd(_mm256_loadu_ps(x + d)), acc);
  }
  alignas(64) double lanes[8];
  _mm512_store_pd(lanes, acc);
  return exact_dot_tail(lanes, q, x, d, D);
}

__attribute__((target("avx512f"))) void exact_dot4_avx512(const float* const* q,
                                                          const float* const* x, int64_t D,
                                                          float* out) {
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                    _mm512_setzero_pd()};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int c = 0; c < 4; ++c) {
      acc[c] = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(q[c] + d)),
                               _mm512_cvtps_pd(_mm256_loadu_ps(x[c] + d)), acc[c]);
    }
  }
  for (int c = 0; c < 4; ++c) {
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, acc[c]);
    out[c] = exact_dot_tail(lanes, q[c], x[c], d, D);
  }
}

const bool kExactDotAvx512 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));

float exact_dot(const float* q, const float* x, int64_t D) {
  return kExactDotAvx512 ? exact_dot_avx512(q, x, D) : exact_dot_scalar(q, x, D);
}

// exact_dot of four pairs (q[c], x[c]), into out[0..3].
void exact_dot4(const float* const* q, const float* const* x, int64_t D, float* out) {
  if (kExactDotAvx512) return exact_dot4_avx512(q, x, D, out);
  for (int c = 0; c < 4; ++c) out[c] = exact_dot_scalar(q[c], x[c], D);
}
#else
float exact_dot(const float* q, const float* x, int64_t D) { return exact_dot_scalar(q, x, D); }

void exact_dot4(const float* const* q, const float* const* x, int64_t D, float* out) {
  for (int c = 0; c < 4; ++c) out[c] = exact_dot_scalar(q[c], x[c], D);
}
#endif

// Re-scores n candidates, cand[p] the pair (q[p], x[p]), four at a time.
template <bool largest>
void rescore_pairs(Candidate* const* cand, const float* const* q, const float* const* x,
                   int64_t n, int64_t D) {
  int64_t p = 0;
  for (; p + 4 <= n; p += 4) {
    float v[4];
    exact_dot4(q + p, x + p, D, v);
    for (int c = 0; c < 4; ++c) set_exact<largest>(*cand[p + c], v[c]);
  }
  for (; p < n; ++p) set_exact<largest>(*cand[p], exact_dot(q[p], x[p], D));
}

// ‖x‖ in float64 (the query's, once per query row).
double norm2(const float* x, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += double(x[d]) * double(x[d]);
  return std::sqrt(s);
}

// float32 not below x (a bound must not shrink when it is stored).
inline float round_up(double x) {
  float f = float(x);
  return double(f) < x ? std::nextafter(f, kInf) : f;
}

// bfloat16 as the dot-product instructions see it: round to nearest even, with subnormals
// flushed to zero (the instructions flush them; doing it here makes the rounding error δ the
// bound uses exactly the one the product sees). Bit operations only, so that loops over a row
// vectorise; NaN stays NaN.
inline uint16_t to_lowp_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t mag = bits & 0x7FFFFFFFu;
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t flushed = mag < 0x00800000u ? (bits & 0x80000000u) >> 16 : rounded;
  return uint16_t(mag > 0x7F800000u ? 0x7FC0u : flushed);
}

inline float lowp_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// (‖x̂‖, ‖x − x̂‖) from float32 sums of squares, rounded up: the sums' rounding (below
// 2·D·2^-24 relative) and squares lost to underflow (each below 2^-126) are added back.
std::pair<float, float> upper_norms(double lowp2, double delta2, int64_t D) {
  const double slack = 1.0 + 2.0 * double(D) * 0x1p-24, lost = double(D) * 0x1p-126;
  return {round_up(std::sqrt(lowp2 * slack + lost) * kInflate),
          round_up(std::sqrt(delta2 * slack + lost) * kInflate)};
}

// Converts one row to bfloat16 (out) and returns (‖x̂‖, ‖x − x̂‖), each an upper bound.
std::pair<float, float> lowp_row_scalar(const float* x, uint16_t* out, int64_t D) {
  float lowp2 = 0, delta2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = to_lowp_bits(x[d]);
    const float h = lowp_to_float(out[d]), e = x[d] - h;
    lowp2 += h * h;
    delta2 += e * e;
  }
  return upper_norms(lowp2, delta2, D);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) std::pair<float, float> lowp_row_avx512(const float* x,
                                                                            uint16_t* out,
                                                                            int64_t D) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), smallest = _mm512_set1_epi32(0x00800000);
  const __m512i inf = _mm512_set1_epi32(0x7F800000), bias = _mm512_set1_epi32(0x7FFF);
  const __m512i one = _mm512_set1_epi32(1), sign = _mm512_set1_epi32(0x8000);
  const __m512i nan = _mm512_set1_epi32(0x7FC0);
  __m512 lowp2 = _mm512_setzero_ps(), delta2 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 v = _mm512_loadu_ps(x + d);
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i mag = _mm512_and_si512(bits, magnitude);
    const __m512i high = _mm512_srli_epi32(bits, 16);
    // the same bits as to_lowp_bits: round to nearest even, subnormals to a signed zero, NaN
    __m512i h = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(bits, bias), _mm512_and_si512(high, one)), 16);
    h = _mm512_mask_mov_epi32(h, _mm512_cmplt_epu32_mask(mag, smallest),
                              _mm512_and_si512(high, sign));
    h = _mm512_mask_mov_epi32(h, _mm512_cmpgt_epu32_mask(mag, inf), nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), _mm512_cvtepi32_epi16(h));
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    const __m512 e = _mm512_sub_ps(v, hf);
    lowp2 = _mm512_fmadd_ps(hf, hf, lowp2);
    delta2 = _mm512_fmadd_ps(e, e, delta2);
  }
  const auto tail = lowp_row_scalar(x + d, out + d, D - d);  // bounds of the tail alone
  const double t0 = double(tail.first), t1 = double(tail.second);
  return upper_norms(double(_mm512_reduce_add_ps(lowp2)) + t0 * t0,
                     double(_mm512_reduce_add_ps(delta2)) + t1 * t1, D);
}

std::pair<float, float> lowp_row(const float* x, uint16_t* out, int64_t D) {
  static const bool avx512 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return avx512 ? lowp_row_avx512(x, out, D) : lowp_row_scalar(x, out, D);
}
#else
std::pair<float, float> lowp_row(const float* x, uint16_t* out, int64_t D) {
  return lowp_row_scalar(x, out, D);
}
#endif

// An upper bound of ‖x‖ for the float32 coarse pass, in float32 (it vectorises 16 wide):
// the sum's rounding (below 2·D·2^-24 relative) and squares lost to underflow (each below
// 2^-126) are added back before the root.
FASTAP_HOT float upper_norm(const float* x, int64_t D) {
  constexpr int W = 16;
  float acc[W] = {};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    for (int t = 0; t < W; ++t) acc[t] += x[d + t] * x[d + t];
  }
  for (int t = 0; d < D; ++d, ++t) acc[t] += x[d] * x[d];
  double s = 0;
  for (int t = 0; t < W; ++t) s += acc[t];
  const double Dd = double(D);
  return round_up(std::sqrt(s * (1.0 + 2.0 * Dd * 0x1p-24) + Dd * 0x1p-126) * kInflate);
}

// The int8 copy as the integer dot products see it: x̂ = s·X, X = round(x/s) in [−127, 127],
// with the row's own scale s = max|x|/127 (float32). The product of two copies is
// s_q·s_x·Σ X_q·X_x, the sum exact in int32 (|Σ| ≤ D·127² < 2^31 for D ≤ kInt8MaxDim). The
// bound does not need X to be the nearest integer nor s to be exact: it uses the x̂ = s·X that
// was stored, through (‖x̂‖, ‖x − x̂‖). A row with NaN or Inf gets NaN for all three (its bounds
// are NaN, so its pairs are always re-scored); a zero row gets zeros.
constexpr int64_t kInt8MaxDim = int64_t(1) << 17;

// A low-precision row's bound terms: ‖x̂‖, ‖x − x̂‖ (rounded up) and, for int8, its scale s.
struct RowTerms {
  float nrm, mrm, scale;
};

// Rows whose largest magnitude is below this are quantised in float64: 127/max|x| could
// overflow float32 and x − s·X could lose bits to underflow.
constexpr float kInt8Tiny = 0x1p-100f;

RowTerms int8_row_tiny(const float* x, int8_t* out, int64_t D, float amax) {
  const float scale = float(double(amax) / 127.0);
  double lowp2 = 0, delta2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double r = scale > 0 ? std::clamp(std::nearbyint(double(x[d]) / scale), -127.0, 127.0)
                               : 0.0;
    out[d] = int8_t(r);
    const double h = double(scale) * r, e = double(x[d]) - h;  // exact in float64
    lowp2 += h * h;
    delta2 += e * e;
  }
  const double slack = 1.0 + 2.0 * double(D) * 0x1p-53;
  return {round_up(std::sqrt(lowp2 * slack) * kInflate),
          round_up(std::sqrt(delta2 * slack) * kInflate), scale};
}

// Lane t of the sums below takes d ≡ t (mod 16), in the scalar code as in the vector code, so
// both give the same copy and the same bounds.
constexpr int kInt8Lanes = 16;

// Quantises x[d] for d in [d, D) into lane t = d − d0 of the sums (scalar: the tail, and CPUs
// without AVX-512).
void int8_quantise_scalar(const float* x, int8_t* out, int64_t d, int64_t D, float scale,
                          float inv, int32_t* sq, float* delta2) {
  for (int64_t d0 = d; d < D; ++d) {
    const int t = int((d - d0) % kInt8Lanes);
    const float r = std::clamp(std::nearbyint(x[d] * inv), -127.0f, 127.0f);
    out[d] = int8_t(r);
    sq[t] += int32_t(r) * int32_t(r);
    // x − s·X in one rounding: its relative error 2^-24 is covered in int8_finish.
    const float e = std::fma(-scale, r, x[d]);
    delta2[t] = std::fma(e, e, delta2[t]);
  }
}

RowTerms int8_finish(const int32_t* sq, const float* delta2, float scale, int64_t D) {
  int64_t sum_sq = 0;
  double sum_delta2 = 0;
  for (int t = 0; t < kInt8Lanes; ++t) {
    sum_sq += sq[t];
    sum_delta2 += delta2[t];
  }
  // ‖x̂‖ = s·sqrt(Σ X²), Σ X² exact; ‖x − x̂‖ from the float32 sums of the squares (the sums'
  // rounding below 2·D·2^-24 relative, each e's own below 2^-23 relative in e², squares lost
  // to underflow below 2^-126 each).
  const double Dd = double(D);
  const double slack = (1.0 + 2.0 * Dd * 0x1p-24) * (1.0 + 0x1p-22);
  return {round_up(std::sqrt(double(sum_sq)) * double(scale) * kInflate),
          round_up(std::sqrt(sum_delta2 * slack + Dd * 0x1p-126) * kInflate), scale};
}

// NaN/Inf rows and rows too small for the float32 quantisation; nullopt for the others.
std::optional<RowTerms> int8_special(const float* x, int8_t* out, int64_t D, float amax,
                                    bool finite) {
  if (finite && amax >= kInt8Tiny) return std::nullopt;
  if (finite) return int8_row_tiny(x, out, D, amax);
  std::memset(out, 0, size_t(D));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return RowTerms{nan, nan, nan};
}

RowTerms int8_row_scalar(const float* x, int8_t* out, int64_t D) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    const float a = std::fabs(x[d]);
    finite &= a <= std::numeric_limits<float>::max();  // false for Inf and NaN
    amax = a > amax ? a : amax;
  }
  if (auto special = int8_special(x, out, D, amax, finite)) return *special;
  const float scale = amax / 127.0f, inv = 127.0f / amax;
  int32_t sq[kInt8Lanes] = {};
  float delta2[kInt8Lanes] = {};
  int8_quantise_scalar(x, out, 0, D, scale, inv, sq, delta2);
  return int8_finish(sq, delta2, scale, D);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw"))) RowTerms int8_row_avx512(const float* x, int8_t* out,
                                                                    int64_t D) {
  const __m512 flt_max = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  int64_t d = 0;
  for (; d + kInt8Lanes <= D; d += kInt8Lanes) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + d));
    finite &= _mm512_cmp_ps_mask(a, flt_max, _CMP_LE_OQ);
    vmax = _mm512_max_ps(vmax, a);
  }
  float amax = _mm512_reduce_max_ps(vmax);
  bool all_finite = finite == 0xFFFF;
  for (int64_t t = d; t < D; ++t) {
    const float a = std::fabs(x[t]);
    all_finite &= a <= std::numeric_limits<float>::max();
    amax = a > amax ? a : amax;
  }
  if (auto special = int8_special(x, out, D, amax, all_finite)) return *special;
  const float scale = amax / 127.0f, inv = 127.0f / amax;
  const __m512 vinv = _mm512_set1_ps(inv), vscale = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512i sq = _mm512_setzero_si512();
  __m512 delta2 = _mm512_setzero_ps();
  const int64_t body = D - D % kInt8Lanes;
  for (d = 0; d < body; d += kInt8Lanes) {
    const __m512 v = _mm512_loadu_ps(x + d);
    const __m512 r = _mm512_min_ps(
        hi, _mm512_max_ps(lo, _mm512_roundscale_ps(_mm512_mul_ps(v, vinv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __m512i xi = _mm512_cvtps_epi32(r);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), _mm512_cvtepi32_epi8(xi));
    sq = _mm512_add_epi32(sq, _mm512_mullo_epi32(xi, xi));
    const __m512 e = _mm512_fnmadd_ps(vscale, r, v);
    delta2 = _mm512_fmadd_ps(e, e, delta2);
  }
  alignas(64) int32_t sq_lanes[kInt8Lanes];
  alignas(64) float delta2_lanes[kInt8Lanes];
  _mm512_store_si512(sq_lanes, sq);
  _mm512_store_ps(delta2_lanes, delta2);
  int8_quantise_scalar(x, out, body, D, scale, inv, sq_lanes, delta2_lanes);
  return int8_finish(sq_lanes, delta2_lanes, scale, D);
}

const bool kRowTermsAvx512 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") &&
                                                       __builtin_cpu_supports("avx512bw"));

RowTerms int8_row(const float* x, int8_t* out, int64_t D) {
  return kRowTermsAvx512 ? int8_row_avx512(x, out, D) : int8_row_scalar(x, out, D);
}
#else
RowTerms int8_row(const float* x, int8_t* out, int64_t D) { return int8_row_scalar(x, out, D); }
#endif

// Row j of `copy` (int8 or bfloat16, (n, D)) made from the float32 row x, and its bound terms
// (the scale is 0 for bfloat16).
RowTerms lowp_copy_row(const float* x, Tensor& copy, int64_t j, int64_t D) {
  if (copy.scalar_type() == at::kChar) {
    return int8_row(x, copy.mutable_data_ptr<int8_t>() + j * D, D);
  }
  auto* out = reinterpret_cast<uint16_t*>(copy.mutable_data_ptr<c10::BFloat16>()) + j * D;
  const auto [nrm, mrm] = lowp_row(x, out, D);
  return {nrm, mrm, 0.0f};
}

// out (m, n) int32 = q (m, D) · x (n, D)ᵀ for int8 rows, exact. at::_int_mm returns wrong sums
// for D = 1 on the CPU (torch 2.14: measured over m, n in 1..33), so that case is multiplied here.
void int8_product(Tensor& out, const Tensor& q, const Tensor& x) {
  if (q.size(1) != 1) {
    at::_int_mm_out(out, q, x.t());
    return;
  }
  const int64_t m = q.size(0), n = x.size(0);
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const int8_t* xp = x.const_data_ptr<int8_t>();
  int32_t* o = out.mutable_data_ptr<int32_t>();  // contiguous (m, n)
  for (int64_t i = 0; i < m; ++i) {
    const int32_t qi = qp[i * q.stride(0)];
    for (int64_t j = 0; j < n; ++j) o[i * n + j] = qi * int32_t(xp[j * x.stride(0)]);
  }
}

// One query row's coarse scores from the int32 products: s̃_j = fl(fl(acc_j)·fl(s_q·s_j)),
// within 3·2^-24 relative of s_q·s_j·acc_j, plus underflow (bound_constants).
FASTAP_HOT void int8_scores(const int32_t* acc, float sq, const float* scales, int64_t n,
                            float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = float(acc[j]) * (sq * scales[j]);
}

// The first j in [j0, n) whose upper bound sign·s_j + (a·nrm_j + b·mrm_j + rel·|s_j| + abs)
// reaches thr (a NaN bound does), or n. Coarse scores are float32 or bfloat16 bits. Most of a
// long scan has no candidate, so this loop is the selection's cost: it is written with AVX-512
// and AVX2 intrinsics, chosen at run time, and in scalar code for other CPUs. The evaluation
// order of the bound differs between them by a few roundings, which its slack covers.
struct ScanArgs {
  const void* s;
  bool lowp;
  const float *nrm, *mrm;
  float a, b, rel, abs, sign, thr;
};

inline float coarse_at(const ScanArgs& g, int64_t j) {
  return g.lowp ? lowp_to_float(static_cast<const uint16_t*>(g.s)[j])
                : static_cast<const float*>(g.s)[j];
}

inline bool reaches(const ScanArgs& g, int64_t j) {
  const float x = coarse_at(g, j);
  const float hi = g.sign * x + (g.a * g.nrm[j] + g.b * g.mrm[j] + g.rel * std::fabs(x) + g.abs);
  return !(hi < g.thr);
}

int64_t scan_scalar(const ScanArgs& g, int64_t j, int64_t n) {
  for (; j < n; ++j) {
    if (reaches(g, j)) return j;
  }
  return n;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) int64_t scan_avx512(const ScanArgs& g, int64_t j, int64_t n) {
  const __m512 a = _mm512_set1_ps(g.a), b = _mm512_set1_ps(g.b), rel = _mm512_set1_ps(g.rel);
  const __m512 abs = _mm512_set1_ps(g.abs), sign = _mm512_set1_ps(g.sign);
  const __m512 thr = _mm512_set1_ps(g.thr);
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  for (; j + 16 <= n; j += 16) {
    const __m512 x =
        g.lowp ? _mm512_castsi512_ps(_mm512_slli_epi32(
                     _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                         static_cast<const uint16_t*>(g.s) + j))),
                     16))
               : _mm512_loadu_ps(static_cast<const float*>(g.s) + j);
    const __m512 ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude));
    const __m512 e = _mm512_fmadd_ps(a, _mm512_loadu_ps(g.nrm + j),
                                     _mm512_fmadd_ps(b, _mm512_loadu_ps(g.mrm + j),
                                                     _mm512_fmadd_ps(rel, ax, abs)));
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_fmadd_ps(sign, x, e), thr, _CMP_NLT_UQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  return scan_scalar(g, j, n);
}

__attribute__((target("avx2,fma"))) int64_t scan_avx2(const ScanArgs& g, int64_t j, int64_t n) {
  const __m256 a = _mm256_set1_ps(g.a), b = _mm256_set1_ps(g.b), rel = _mm256_set1_ps(g.rel);
  const __m256 abs = _mm256_set1_ps(g.abs), sign = _mm256_set1_ps(g.sign);
  const __m256 thr = _mm256_set1_ps(g.thr);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (; j + 8 <= n; j += 8) {
    const __m256 x =
        g.lowp ? _mm256_castsi256_ps(_mm256_slli_epi32(
                     _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                         static_cast<const uint16_t*>(g.s) + j))),
                     16))
               : _mm256_loadu_ps(static_cast<const float*>(g.s) + j);
    const __m256 ax = _mm256_and_ps(x, magnitude);
    const __m256 e = _mm256_fmadd_ps(a, _mm256_loadu_ps(g.nrm + j),
                                     _mm256_fmadd_ps(b, _mm256_loadu_ps(g.mrm + j),
                                                     _mm256_fmadd_ps(rel, ax, abs)));
    const __m256 hi = _mm256_fmadd_ps(sign, x, e);
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(hi, thr, _CMP_NLT_UQ));
    if (hit) return j + __builtin_ctz(hit);
  }
  return scan_scalar(g, j, n);
}

using ScanFn = int64_t (*)(const ScanArgs&, int64_t, int64_t);

ScanFn pick_scan() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &scan_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &scan_avx2;
  return &scan_scalar;
}

int64_t next_candidate(const ScanArgs& g, int64_t j, int64_t n) {
  static const ScanFn scan = pick_scan();
  return scan(g, j, n);
}
#else
int64_t next_candidate(const ScanArgs& g, int64_t j, int64_t n) { return scan_scalar(g, j, n); }
#endif

// The coarse passes: the product's inputs and what it returns.
enum class Coarse {
  kFloat32,   // float32 rows, float32 BLAS product
  kBFloat16,  // bfloat16 copies, float32 accumulation, bfloat16 output
  kInt8,      // int8 copies with a scale per row, exact int32 accumulation
};

// The bound's constants for dimension D (docs/search.md, "The bound").
struct BoundConstants {
  double gamma32;   // γ_D = D·2^-24 / (1 − D·2^-24): float32 accumulation of D products
  double rescore;   // 2^-24 + 2·γ64_D: float64 re-score and its rounding to float32
  float rel;        // c: the coarse value's own rounding, plus slack
  float abs;        // subnormal products, partial sums and scale products flushed or rounded
};

BoundConstants bound_constants(int64_t D, Coarse coarse) {
  const double Dd = double(D);
  // int8: the integer sum is exact; the scores' rounding is in `out`.
  const double g32 = coarse == Coarse::kInt8 ? 0.0 : Dd * 0x1p-24 / (1.0 - Dd * 0x1p-24);
  const double g64 = Dd * 0x1p-53 / (1.0 - Dd * 0x1p-53);
  // bfloat16 keeps 8 significant bits: |s̃ − y| ≤ 2^-8·|y| ≤ 2^-8/(1 − 2^-8)·|s̃|. int8: three
  // float32 roundings (the int32 sum, s_q·s_x and their product), 3·2^-24/(1 − 3·2^-24).
  const double out = coarse == Coarse::kBFloat16 ? 0x1p-8 / (1.0 - 0x1p-8)
                     : coarse == Coarse::kInt8   ? 3.0 * 0x1p-24 / (1.0 - 3.0 * 0x1p-24)
                                                 : 0.0;
  // abs: (2D + 8)·2^-126 also covers the int8 scores' underflow, below (127²·D + 1)·2^-150.
  return {g32, 0x1p-24 + 2.0 * g64, float(out + 0x1p-20), float((2.0 * Dd + 8.0) * 0x1p-126)};
}

// A query row's coefficients: e = a·n_j + b·m_j + c·|s̃| + abs, and its int8 scale s_q.
struct QueryBound {
  float a, b, scale;
};

// Buffers of the thread that prunes or re-scores a row, kept between rows.
struct RowScratch {
  std::vector<float> lows;
  std::vector<Candidate*> todo;
  std::vector<const float*> queries, rows;  // of the pairs in todo
};

RowScratch& thread_scratch() {
  thread_local RowScratch scratch;
  return scratch;
}

// The per-row candidate list: at most `cap` entries, re-scored when pruning alone does not
// halve a full list, so memory stays bounded on adversarial data. It is pruned first at k
// entries, then whenever it has doubled (and reached 4k): the threshold rises early in the
// stream, so fewer items pass the scan, without a pruning every few candidates.
template <bool largest>
struct RowCandidates {
  std::vector<Candidate>* c;
  float* thr;
  int64_t* next_prune;  // the size at which the list is pruned next
  int64_t k, cap;
  const float* q;  // the query row, float32
  int64_t* rescored;  // exact re-scores done for this row (a count the benchmarks report)

  // Re-scores every candidate of the first `count` (all by default) not yet exact; database row
  // of index i is rows + (i - first) * ld.
  void rescore(const float* rows, int64_t first, int64_t ld, int64_t D,
               int64_t count = std::numeric_limits<int64_t>::max()) {
    // The rows are scattered over the database and the bfloat16 pass never touched them:
    // fetching rows ahead of the one being summed hides most of the memory latency (measured:
    // no prefetch 365 ms, 4 ahead 351, 8 ahead 343 at B = 1000, N = 100,000, D = 512).
    constexpr size_t kAhead = 8;
    auto row_of = [&](const Candidate& e) { return rows + (e.i - first) * ld; };
    auto fetch = [&](const Candidate& e) {
      const char* row = reinterpret_cast<const char*>(row_of(e));
      for (int64_t b = 0; b < D * int64_t(sizeof(float)); b += 64) __builtin_prefetch(row + b);
    };
    RowScratch& scratch = thread_scratch();
    std::vector<Candidate*>& todo = scratch.todo;
    todo.clear();
    const int64_t n = std::min<int64_t>(count, int64_t(c->size()));
    for (int64_t e = 0; e < n; ++e) {
      if (!(*c)[e].exact) todo.push_back(&(*c)[e]);
    }
    scratch.queries.assign(todo.size(), q);
    scratch.rows.resize(todo.size());
    for (size_t t = 0; t < todo.size(); ++t) scratch.rows[t] = row_of(*todo[t]);
    for (size_t t = 0; t < std::min(kAhead, todo.size()); ++t) fetch(*todo[t]);
    for (size_t t = 0; t < todo.size(); t += 4) {  // four rows in flight
      for (size_t a = t + kAhead; a < std::min(t + kAhead + 4, todo.size()); ++a) fetch(*todo[a]);
      const int64_t m = std::min<int64_t>(4, int64_t(todo.size() - t));
      rescore_pairs<largest>(&todo[t], &scratch.queries[t], &scratch.rows[t], m, D);
    }
    *rescored += int64_t(todo.size());
  }

  // Keeps the k best exact candidates (all must be exact).
  void keep_best_exact() {
    auto better = [](const Candidate& x, const Candidate& y) {
      return ranks_before<float, largest>(x.v, x.i, y.v, y.i);
    };
    if (int64_t(c->size()) > k) {
      std::nth_element(c->begin(), c->begin() + (k - 1), c->end(), better);
      c->resize(k);
    }
    std::sort(c->begin(), c->end(), better);
  }

  // T = the k-th largest lower bound; drops every candidate whose upper bound is below it.
  void prune_by_bounds() {
    const int64_t n = int64_t(c->size());
    if (n < k) return;
    // The selection runs on the lower bounds alone (4 bytes each, not the 24 of a candidate).
    std::vector<float>& lows = thread_scratch().lows;
    lows.resize(n);
    for (int64_t e = 0; e < n; ++e) lows[e] = (*c)[e].lo;
    std::nth_element(lows.begin(), lows.begin() + (k - 1), lows.end(), std::greater<float>());
    const float t = lows[k - 1];
    *thr = std::max(*thr, t);
    c->erase(std::remove_if(c->begin(), c->end(), [t](const Candidate& e) { return e.hi < t; }),
             c->end());
  }

  // Raises T from the k-th largest lower bound towards the k-th exact value: the k candidates
  // of largest upper bound are re-scored, and the list pruned again. Candidates then need
  // s̃ + e ≥ v_k rather than s̃ + e ≥ v_k − 2e: where the bound is wide (int8), about half as
  // many are kept and re-scored in the end.
  void tighten(const float* rows, int64_t first, int64_t ld, int64_t D) {
    std::nth_element(c->begin(), c->begin() + (k - 1), c->end(),
                     [](const Candidate& x, const Candidate& y) { return x.hi > y.hi; });
    rescore(rows, first, ld, D, k);
    prune_by_bounds();
  }

  void prune(const float* rows, int64_t first, int64_t ld, int64_t D) {
    prune_by_bounds();
    if (int64_t(c->size()) * 2 > cap) {
      rescore(rows, first, ld, D);
      keep_best_exact();
      *thr = std::max(*thr, c->back().lo);
    } else if (int64_t(c->size()) > 4 * k) {
      tighten(rows, first, ld, D);
    }
  }

  void push(const Candidate& e, const float* rows, int64_t first, int64_t ld, int64_t D) {
    c->push_back(e);
    if (int64_t(c->size()) >= *next_prune) {
      prune(rows, first, ld, D);
      *next_prune = std::min(cap, std::max<int64_t>(2 * int64_t(c->size()), 4 * k));
    }
  }
};

// The exact top-k of one group of query rows against one database block (float32, contiguous
// rows), into the rows' candidate lists; see certified_topk.
template <bool largest, typename coarse_t>
struct BlockSearch {
  static constexpr bool kInt8 = std::is_same_v<coarse_t, int8_t>;
  static constexpr bool kBFloat16 = std::is_same_v<coarse_t, c10::BFloat16>;
  const Tensor& q_coarse;      // (G, D) in coarse_t
  const Tensor& db_coarse;     // (n, D) in coarse_t, contiguous; undefined: converted here
  const float* db_norms;       // (n, 2) bfloat16: ‖x̂_j‖, ‖x_j − x̂_j‖; (n, 3) int8: and s_j;
                               // null: float32 path, or converted here
  int64_t n;                   // rows in the block
  const float* rows;           // (n, D) float32 rows of the block, for the re-score
  int64_t ld;                  // their row stride
  int64_t first;               // database index of the block's first row
  const QueryBound* qb;        // (G,)
  BoundConstants bc;
  const LanePlan& plan;
  int64_t G, D;

  template <typename RowOf>
  void run(const RowOf& row_of) const {
    // Without a prepared copy, each lane converts its sub-blocks as it goes: a query chunk of
    // at most 512 rows keeps the products efficient, at the price of converting the database
    // once per chunk (measured: 1000 queries in two chunks beat one chunk of 1000, 335 vs 368
    // ms at N = 100,000, D = 512).
    const bool convert = !std::is_same_v<coarse_t, float> && !db_coarse.defined();
    const int64_t norm_cols = kInt8 ? 3 : 2;
    struct Scratch {
      Tensor tile, converted;
      std::vector<float> nrm, mrm, scale, row;
    };
    for_each_tile(
        plan, G, n,
        [&] {
          // int8 products are int32; one query row's float32 scores are made from them in `row`.
          const auto tile_options = kInt8 ? q_coarse.options().dtype(at::kInt) : q_coarse.options();
          const size_t per_row = kInt8 ? size_t(plan.sub_rows) : 0;
          return Scratch{at::empty({plan.chunk_rows * plan.sub_rows}, tile_options),
                         convert ? at::empty({plan.sub_rows, D}, q_coarse.options()) : Tensor(),
                         std::vector<float>(plan.sub_rows), std::vector<float>(plan.sub_rows),
                         std::vector<float>(per_row), std::vector<float>(per_row)};
        },
        [&](Scratch& w, int64_t split, int64_t r0, int64_t nr, int64_t t, int64_t ns) {
          float* nrm = w.nrm.data();
          float* mrm = w.mrm.data();
          float* scale = w.scale.data();
          Tensor db_tile;
          if (convert) {
            for (int64_t j = 0; j < ns; ++j) {
              const RowTerms c = lowp_copy_row(rows + (t + j) * ld, w.converted, j, D);
              nrm[j] = c.nrm, mrm[j] = c.mrm;
              if (kInt8) scale[j] = c.scale;
            }
            db_tile = w.converted.narrow(0, 0, ns);
          } else {
            db_tile = db_coarse.narrow(0, t, ns);
            for (int64_t j = 0; j < ns; ++j) {
              const float* norms = db_norms != nullptr ? db_norms + norm_cols * (t + j) : nullptr;
              nrm[j] = norms != nullptr ? norms[0] : upper_norm(rows + (t + j) * ld, D);
              mrm[j] = norms != nullptr ? norms[1] : 0.0f;
              if (kInt8) scale[j] = norms[2];
            }
          }
          Tensor scores = w.tile.narrow(0, 0, nr * ns).view({nr, ns});
          if constexpr (kInt8) {
            int8_product(scores, q_coarse.narrow(0, r0, nr), db_tile);
            const int32_t* acc = scores.const_data_ptr<int32_t>();
            for (int64_t r = 0; r < nr; ++r) {
              int8_scores(acc + r * ns, qb[r0 + r].scale, scale, ns, w.row.data());
              fold_row(w.row.data(), false, ns, t, nrm, mrm, qb[r0 + r], row_of(split, r0 + r));
            }
          } else {
            at::mm_out(scores, q_coarse.narrow(0, r0, nr), db_tile.t());
            const coarse_t* s = scores.const_data_ptr<coarse_t>();
            for (int64_t r = 0; r < nr; ++r) {
              fold_row(s + r * ns, kBFloat16, ns, t, nrm, mrm, qb[r0 + r], row_of(split, r0 + r));
            }
          }
        });
  }

  // Offers the coarse scores s[0..ns) of block rows t.. (float32, or bfloat16 bits if lowp) to
  // one query row's candidates.
  void fold_row(const void* s, bool lowp, int64_t ns, int64_t t, const float* nrm,
                const float* mrm, QueryBound b, RowCandidates<largest> row) const {
    ScanArgs g{s, lowp, nrm, mrm, b.a, b.b, bc.rel, bc.abs, largest ? 1.0f : -1.0f, *row.thr};
    auto bounds = [&](int64_t j) {
      const float x = coarse_at(g, j);
      const float e = b.a * nrm[j] + b.b * mrm[j] + bc.rel * std::fabs(x) + bc.abs;
      const float lo = g.sign * x - e, hi = g.sign * x + e;
      // no usable bound: only the exact value decides
      return !(lo == lo) || !(hi == hi) ? std::pair(-kInf, kInf) : std::pair(lo, hi);
    };
    if (row.c->empty() && ns >= row.k) {
      // The row's first tile: T starts at the tile's own k-th largest lower bound (those k
      // items all pass the scan below) rather than admitting every item of the tile.
      std::vector<float>& lows = thread_scratch().lows;
      lows.resize(ns);
      for (int64_t j = 0; j < ns; ++j) lows[j] = bounds(j).first;
      std::nth_element(lows.begin(), lows.begin() + (row.k - 1), lows.end(),
                       std::greater<float>());
      g.thr = *row.thr = std::max(*row.thr, lows[row.k - 1]);
    }
    for (int64_t j = next_candidate(g, 0, ns); j < ns; j = next_candidate(g, j + 1, ns)) {
      // Admitted even if this scalar evaluation of the bound rounds a hair below thr.
      const auto [lo, hi] = bounds(j);
      row.push({lo, hi, 0.0f, 0, first + t + j}, rows, first, ld, D);
      g.thr = *row.thr;
    }
  }
};

// Bound coefficients of each query row, and its copy (q_coarse, (B, D)) on the bfloat16 and
// int8 paths.
std::vector<QueryBound> query_bounds(const Tensor& q32, const BoundConstants& bc, Coarse coarse,
                                     Tensor& q_coarse) {
  const int64_t B = q32.size(0), D = q32.size(1);
  std::vector<QueryBound> out(B);
  const float* q = q32.const_data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = q + i * D;
      const double norm = norm2(row, D);
      if (coarse == Coarse::kFloat32) {
        out[i] = {round_up((bc.gamma32 + bc.rescore) * norm * kInflate), 0.0f, 0.0f};
        continue;
      }
      const RowTerms c = lowp_copy_row(row, q_coarse, i, D);
      const double a = double(c.mrm) + bc.gamma32 * double(c.nrm) + bc.rescore * norm;
      out[i] = {round_up(a * kInflate), round_up((1.0 + bc.rescore) * norm * kInflate), c.scale};
    }
  });
  return out;
}

// Re-scores the candidates of many query rows that are not exact yet, one database row at a
// time: each row is read from memory once, in index order, for every query that wants it.
// (Row by row per query, each candidate row came from a random place in memory; grouped, a
// database row is a candidate of about B·170/N queries, so most of the traffic goes away.)
// lists[s] is a list of query row queries[s]; database index i is rows + (i - first) * ld.
template <bool largest>
void rescore_grouped(std::vector<std::vector<Candidate>*>& lists,
                     const std::vector<const float*>& queries, int64_t* rescored,
                     const float* rows, int64_t first, int64_t ld, int64_t n, int64_t D) {
  // Counting sort of the pending candidates by database row.
  std::vector<int64_t> start(n + 1, 0);
  for (std::vector<Candidate>* list : lists) {
    for (const Candidate& e : *list) {
      if (!e.exact) ++start[e.i - first + 1];
    }
  }
  for (int64_t j = 0; j < n; ++j) start[j + 1] += start[j];
  const int64_t total = start[n];
  std::vector<Candidate*> cand(total);
  std::vector<const float*> q(total), x(total);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (size_t s = 0; s < lists.size(); ++s) {
    for (Candidate& e : *lists[s]) {
      if (e.exact) continue;
      const int64_t p = fill[e.i - first]++;
      cand[p] = &e, q[p] = queries[s], x[p] = rows + (e.i - first) * ld;
      ++rescored[s];
    }
  }
  // In row order, so consecutive pairs share their database row.
  at::parallel_for(0, ceil_div(total, 4), 64, [&](int64_t begin, int64_t end) {
    const int64_t p0 = 4 * begin, p1 = std::min(total, 4 * end);
    rescore_pairs<largest>(&cand[p0], &q[p0], &x[p0], p1 - p0, D);
  });
}

template <bool largest>
void certified_topk_impl(const Tensor& q32, const Tensor& database, const Tensor& lowp,
                         const Tensor& lowp_norms, Coarse coarse, int64_t offset, int64_t k,
                         float* out_v, int64_t* out_i, bool merge_state, int64_t* out_rescored) {
  const int64_t B = q32.size(0), N = database.size(0), D = q32.size(1);
  if (B == 0) return;
  const bool use_lowp = coarse != Coarse::kFloat32;
  const bool fused = use_lowp && !lowp.defined();
  const BoundConstants bc = bound_constants(D, coarse);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // The int8 bound is about four times as wide as bfloat16's, so ordinary data keeps several
  // times k candidates per row: a list that small must not be re-scored as the stream goes
  // (from rows scattered over memory) rather than once, grouped, at the end. Its lists may
  // take twice the memory, so that 1000 queries still make one group (each group streams, and
  // without a prepared copy converts, the whole database: measured at B = 1000, N = 100,000,
  // D = 512, k = 100, groups of 341 rows took 313 ms, one group 277).
  const bool int8 = coarse == Coarse::kInt8;
  const int64_t cap = int8 ? std::max<int64_t>(20 * k, 2048) : std::max<int64_t>(8 * k, 512);
  const int64_t list_bytes = int8 ? 2 * kReservoirBytes : kReservoirBytes;
  const int64_t group_rows = std::clamp<int64_t>(
      list_bytes / (cap * int64_t(sizeof(Candidate))), std::min(B, threads), B);

  // The re-score reads float32 rows in place when the database has them; otherwise blocks are
  // converted into one reused buffer and their candidates re-scored before the next block.
  const bool in_place = database.scalar_type() == at::kFloat && (database.stride(1) == 1 || D <= 1);
  const int64_t block_rows =
      in_place ? std::max<int64_t>(N, 1)
               : std::max<int64_t>(1, kConvertBytes / (int64_t(sizeof(float)) *
                                                         std::max<int64_t>(D, 1)));
  Tensor convert_buf;
  if (!in_place && N > 0) convert_buf = at::empty({std::min(block_rows, N), D}, q32.options());
  const Tensor db_norms = use_lowp && !fused ? lowp_norms.contiguous() : Tensor();

  std::vector<std::vector<Candidate>> cands;
  std::vector<float> thr;
  std::vector<int64_t> next_prune;
  std::vector<int64_t> rescored;
  for (int64_t g0 = 0; g0 < B; g0 += group_rows) {
    const int64_t G = std::min(group_rows, B - g0);
    const Tensor qg = q32.narrow(0, g0, G);
    Tensor q_coarse =
        coarse == Coarse::kBFloat16 ? at::empty({G, D}, q32.options().dtype(at::kBFloat16))
        : coarse == Coarse::kInt8   ? at::empty({G, D}, q32.options().dtype(at::kChar))
                                    : qg;
    const std::vector<QueryBound> qb = query_bounds(qg, bc, coarse, q_coarse);
    // Bytes of one product in the score tile: bfloat16 2, float32 and int32 4.
    LanePlan plan =
        plan_lanes(G, std::max<int64_t>(N, 1), threads, coarse == Coarse::kBFloat16 ? 2 : 4);
    // Few queries make long sub-blocks; converted as the search goes, one must still fit in
    // cache (at B = 8 an uncapped sub-block of 65,536 rows ran 47 ms against 16 in float32).
    if (fused) plan.sub_rows = std::min<int64_t>(plan.sub_rows, kFusedSubRows);
    cands.assign(plan.splits * G, {});
    thr.assign(plan.splits * G, -kInf);
    next_prune.assign(plan.splits * G, k);
    rescored.assign(plan.splits * G, 0);
    auto row_of = [&](int64_t split, int64_t r) {
      const int64_t slot = split * G + r;
      return RowCandidates<largest>{&cands[slot], &thr[slot], &next_prune[slot], k, cap,
                                    qg.const_data_ptr<float>() + r * D, &rescored[slot]};
    };
    // The lists of the first `slots` slots pruned, re-scored against the n rows of `rows`
    // (database indices first ..) and cut to their k best, best first.
    auto settle = [&](int64_t slots, const float* rows, int64_t first, int64_t ld, int64_t n) {
      std::vector<std::vector<Candidate>*> lists(slots);
      std::vector<const float*> queries(slots);
      at::parallel_for(0, slots, 16, [&](int64_t begin, int64_t end) {
        for (int64_t slot = begin; slot < end; ++slot) {
          row_of(slot / G, slot % G).prune_by_bounds();
          lists[slot] = &cands[slot];
          queries[slot] = qg.const_data_ptr<float>() + (slot % G) * D;
        }
      });
      rescore_grouped<largest>(lists, queries, rescored.data(), rows, first, ld, n, D);
      at::parallel_for(0, slots, 16, [&](int64_t begin, int64_t end) {
        for (int64_t slot = begin; slot < end; ++slot) row_of(slot / G, slot % G).keep_best_exact();
      });
    };
    at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t p = 0; p < plan.splits; ++p) {
          cands[p * G + r].reserve(std::min<int64_t>(cap, 2 * k + 64));
        }
        if (!merge_state) continue;
        const float* v = out_v + (g0 + r) * k;
        const int64_t* ix = out_i + (g0 + r) * k;
        for (int64_t p = 0; p < k; ++p) {
          const float key = key_of<largest>(v[p]);
          if (ix[p] >= 0) cands[r].push_back({key, key, v[p], 1, ix[p]});
        }
        row_of(0, r).prune_by_bounds();
      }
    });

    for (int64_t b0 = 0; b0 < N; b0 += block_rows) {
      const int64_t nb = std::min(block_rows, N - b0);
      const Tensor block = database_rows(database, b0, nb, convert_buf);
      const float* rows = block.const_data_ptr<float>();
      const int64_t ld = block.stride(0);
      const Tensor db_coarse = !use_lowp ? block : fused ? Tensor() : lowp.narrow(0, b0, nb);
      const float* block_norms =
          fused || !use_lowp ? nullptr
                             : db_norms.const_data_ptr<float>() + db_norms.size(1) * b0;
      if (coarse == Coarse::kInt8) {
        BlockSearch<largest, int8_t>{q_coarse, db_coarse, block_norms, nb, rows, ld, offset + b0,
                                     qb.data(), bc, plan, G, D}
            .run(row_of);
      } else if (coarse == Coarse::kBFloat16) {
        BlockSearch<largest, c10::BFloat16>{q_coarse, db_coarse, block_norms, nb, rows, ld,
                                            offset + b0, qb.data(), bc, plan, G, D}
            .run(row_of);
      } else {
        BlockSearch<largest, float>{q_coarse, db_coarse, nullptr, nb, rows, ld, offset + b0,
                                    qb.data(), bc, plan, G, D}
            .run(row_of);
      }
      if (in_place) continue;
      // The buffer is about to be overwritten: settle this block's candidates now.
      settle(plan.splits * G, rows, offset + b0, ld, nb);
    }

    // Merge the database splits, re-score what is left and write the k best, best first.
    at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        std::vector<Candidate>& merged = cands[r];
        for (int64_t p = 1; p < plan.splits; ++p) {
          std::vector<Candidate>& part = cands[p * G + r];
          merged.insert(merged.end(), part.begin(), part.end());
          std::vector<Candidate>().swap(part);
          rescored[r] += rescored[p * G + r];
        }
      }
    });
    if (in_place) {
      settle(G, database.const_data_ptr<float>(), offset, database.stride(0), N);
    } else {  // each block was settled already: only the splits' k best are left to merge
      at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row_of(0, r).keep_best_exact();
      });
    }
    at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const std::vector<Candidate>& best = cands[r];  // settled: exact, best first
        float* v = out_v + (g0 + r) * k;
        int64_t* ix = out_i + (g0 + r) * k;
        const int64_t got = std::min<int64_t>(k, int64_t(best.size()));
        for (int64_t p = 0; p < k; ++p) {
          v[p] = p < got ? best[p].v : empty_slot_value<float, largest>();
          ix[p] = p < got ? best[p].i : -1;
        }
        std::vector<Candidate>().swap(cands[r]);
        if (out_rescored != nullptr) out_rescored[g0 + r] += rescored[r];
      }
    });
  }
}

// The coarse pass a low-precision dtype names: bfloat16 (the default) or int8.
Coarse coarse_of(std::optional<at::ScalarType> dtype) {
  const at::ScalarType t = dtype.value_or(at::kBFloat16);
  TORCH_CHECK_VALUE(t == at::kBFloat16 || t == at::kChar,
                    "the low-precision copy must be bfloat16 or int8, got ", t);
  return t == at::kChar ? Coarse::kInt8 : Coarse::kBFloat16;
}

// Whether at::_int_mm returns exact int32 sums of products of values in [−127, 127]. It does on
// the int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX); an implementation that adds
// u8·s8 pairs in saturating int16 (AVX2's vpmaddubsw) does not, and the bound would not hold.
// Checked once, on the values that saturate such a sequence.
bool int8_products_exact() {
  static const bool exact = [] {
    constexpr int64_t M = 5, K = 96, N = 7;
    Tensor a = at::empty({M, K}, at::TensorOptions().dtype(at::kChar));
    Tensor b = at::empty({N, K}, a.options());
    int8_t* pa = a.mutable_data_ptr<int8_t>();
    int8_t* pb = b.mutable_data_ptr<int8_t>();
    for (int64_t i = 0; i < M * K; ++i) pa[i] = (i % K) % (i / K + 1) == 0 ? -127 : 127;
    for (int64_t i = 0; i < N * K; ++i) pb[i] = (i % K) % (i / K + 2) == 0 ? 127 : -127;
    const Tensor got = at::_int_mm(a, b.t()).contiguous();
    const int32_t* g = got.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        int64_t want = 0;
        for (int64_t d = 0; d < K; ++d) want += int64_t(pa[i * K + d]) * int64_t(pb[j * K + d]);
        if (want != g[i * N + j]) return false;
      }
    }
    return true;
  }();
  return exact;
}

void check_coarse_pass(Coarse coarse, int64_t D) {
  if (coarse == Coarse::kInt8) {
    TORCH_CHECK_VALUE(D <= kInt8MaxDim, "the int8 coarse pass needs D <= ", kInt8MaxDim,
                      " (exact int32 sums), got D = ", D, "; use precision='bf16'");
    TORCH_CHECK(int8_products_exact(),
                "the int8 coarse pass needs exact int32 products, and this CPU's int8 matrix "
                "product saturates (no int8 dot-product instructions); use precision='bf16' or "
                "'fp32'");
  } else {
    TORCH_CHECK_VALUE(D < (int64_t(1) << 20), "the bfloat16 bound needs D < 2^20, got D = ", D);
  }
}

// The low-precision copy of a float32 database as the coarse pass multiplies it, and the
// per-row numbers its bound needs, rounded up: bfloat16 (rows as the dot-product instructions
// see them) with (‖x̂_j‖, ‖x_j − x̂_j‖) (N, 2); int8 with (‖x̂_j‖, ‖x_j − x̂_j‖, s_j) (N, 3).
std::tuple<Tensor, Tensor> prepare_lowp_cpu(const Tensor& database,
                                            std::optional<at::ScalarType> dtype) {
  const Coarse coarse = coarse_of(dtype);
  TORCH_CHECK_VALUE(database.dim() == 2, "database must be a 2-D (N, D) tensor, got shape ",
                    database.sizes());
  TORCH_CHECK_TYPE(database.scalar_type() == at::kFloat,
                   "database must be float32 for a low-precision copy, got ",
                   database.scalar_type());
  const Tensor x = database.detach().contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  const bool int8 = coarse == Coarse::kInt8;
  Tensor lowp = at::empty({N, D}, x.options().dtype(int8 ? at::kChar : at::kBFloat16));
  const int64_t cols = int8 ? 3 : 2;
  Tensor norms = at::empty({N, cols}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* nrm = norms.mutable_data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const RowTerms c = lowp_copy_row(src + j * D, lowp, j, D);
      nrm[cols * j] = c.nrm, nrm[cols * j + 1] = c.mrm;
      if (int8) nrm[3 * j + 2] = c.scale;
    }
  });
  return {lowp, norms};
}

Tensor topk_similarity_lowp_update_cpu(const Tensor& queries, const Tensor& database_block,
                                       const std::optional<Tensor>& lowp_block_opt,
                                       const std::optional<Tensor>& lowp_norms_opt,
                                       int64_t index_offset, const Tensor& values,
                                       const Tensor& indices, bool largest,
                                       std::optional<at::ScalarType> lowp_dtype) {
  const auto acc_dtype = check_topk_similarity_args(queries, database_block, "database_block");
  TORCH_CHECK_TYPE(acc_dtype == at::kFloat,
                   "the low-precision coarse passes rank float32 scores; float64 inputs take "
                   "the float64 path (precision='fp32')");
  const int64_t n = database_block.size(0), D = database_block.size(1);
  TORCH_CHECK_VALUE(lowp_block_opt.has_value() == lowp_norms_opt.has_value(),
                    "lowp_block and lowp_norms must be given together (prepare_lowp's output) "
                    "or both be None (converted as the search goes)");
  const Tensor lowp_block = lowp_block_opt.value_or(Tensor());
  const Tensor lowp_norms = lowp_norms_opt.value_or(Tensor());
  const Coarse coarse = coarse_of(lowp_block.defined() && !lowp_dtype.has_value()
                                      ? std::optional(lowp_block.scalar_type())
                                      : lowp_dtype);
  const at::ScalarType copy_dtype = coarse == Coarse::kInt8 ? at::kChar : at::kBFloat16;
  if (lowp_block.defined()) {
    const int64_t cols = coarse == Coarse::kInt8 ? 3 : 2;
    TORCH_CHECK_VALUE(lowp_block.dim() == 2 && lowp_block.size(0) == n &&
                          lowp_block.size(1) == D && lowp_block.scalar_type() == copy_dtype &&
                          lowp_block.is_contiguous(),
                      "lowp_block must be the contiguous ", copy_dtype, " (", n, ", ", D,
                      ") copy of database_block from prepare_lowp, got ",
                      lowp_block.scalar_type(), " ", lowp_block.sizes());
    TORCH_CHECK_VALUE(lowp_norms.dim() == 2 && lowp_norms.size(0) == n &&
                          lowp_norms.size(1) == cols && lowp_norms.scalar_type() == at::kFloat,
                      "lowp_norms must be the float32 (", n, ", ", cols,
                      ") norms from prepare_lowp, got ", lowp_norms.scalar_type(), " ",
                      lowp_norms.sizes());
  } else {
    TORCH_CHECK_TYPE(database_block.scalar_type() == at::kFloat,
                     "database_block must be float32 to be converted to ", copy_dtype, ", got ",
                     database_block.scalar_type());
  }
  check_coarse_pass(coarse, D);
  check_topk_state(queries, values, indices, acc_dtype, index_offset, n);
  const int64_t B = queries.size(0), k = values.size(1);
  Tensor rescored = at::zeros({B}, queries.options().dtype(at::kLong));
  if (B == 0) return rescored;
  const Tensor q = queries.detach().to(at::kFloat).contiguous();
  dispatch_largest(largest, [&](auto largest_t) {
    constexpr bool kLargest = decltype(largest_t)::value;
    certified_topk_impl<kLargest>(q, database_block.detach(), lowp_block, lowp_norms, coarse,
                                  index_offset, k, values.data_ptr<float>(),
                                  indices.data_ptr<int64_t>(), /*merge_state=*/true,
                                  rescored.data_ptr<int64_t>());
  });
  return rescored;
}

Tensor exact_dot_pairs_cpu(const Tensor& queries, const Tensor& database, const Tensor& query_rows,
                           const Tensor& database_rows) {
  check_exact_dot_pairs_args(queries, database, query_rows, database_rows);
  const Tensor q = queries.contiguous(), x = database.contiguous();
  const Tensor qi = query_rows.contiguous(), xi = database_rows.contiguous();
  const int64_t P = qi.numel(), D = q.size(1);
  Tensor out = at::empty({P}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const int64_t* qip = qi.const_data_ptr<int64_t>();
  const int64_t* xip = xi.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) o[p] = exact_dot(qp + qip[p] * D, xp + xip[p] * D, D);
  });
  return out;
}

}  // namespace

void certified_topk(const Tensor& q32, const Tensor& database, int64_t offset, int64_t k,
                    bool largest, float* out_v, int64_t* out_i, bool merge_state) {
  dispatch_largest(largest, [&](auto largest_t) {
    constexpr bool kLargest = decltype(largest_t)::value;
    certified_topk_impl<kLargest>(q32, database, Tensor(), Tensor(), Coarse::kFloat32, offset, k,
                                  out_v, out_i, merge_state, /*out_rescored=*/nullptr);
  });
}

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("prepare_lowp", &prepare_lowp_cpu);
  m.impl("topk_similarity_lowp_update", &topk_similarity_lowp_update_cpu);
  m.impl("exact_dot_pairs", &exact_dot_pairs_cpu);
}

}  // namespace fastap
