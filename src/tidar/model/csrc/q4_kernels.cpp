// x @ W^T with W held as GGUF Q4_1 blocks (per 32 inputs of an output row: float16 d and m, 32
// 4-bit q; the weight is d * q + m). Built by `tidar.model.quant`.
//
// Exactness: every weight is computed as fma(q, d, m) in float32. q * d is exact in float32 (an
// 11-bit significand times a 4-bit integer), so this is one rounding of d * q + m, the value
// gguf.quants.dequantize computes (its product, then its sum). Each output is one float32
// accumulator that adds x[k] * w[k] with fma for k = 0, 1, ..., K-1 in that order, whatever the
// number of rows in the call, the row tiling or the thread split: a token's row comes out bit for
// bit the same alone or among others (TiDAR's greedy output equals AR's). The portable path below
// makes the same std::fma calls in the same order, so it gives the same bits as the AVX-512 one.
//
// Speed: a block of 32 inputs x 32 outputs is dequantized once per tile of up to 12 rows (12 x 2
// accumulators stay in registers) and read from memory once per call; at a decode step's few rows
// the matmul streams 4.5 bits per weight instead of bfloat16's 16.
//
// Layout (`quant.Q4Weight`): qw uint8 (N/32, K, 16): for output block b and input k, byte j holds
// q[32b + j][k] in its low nibble and q[32b + 16 + j][k] in its high nibble; dm float16
// (N/32, K/32, 2, 32): d then m of the block's 32 outputs for input group g.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int MAX_TILE = 12;

template <typename T>
inline void store_row(T* out, const float* acc32) {
  for (int j = 0; j < 32; ++j) out[j] = static_cast<T>(acc32[j]);
}

#if defined(__AVX512F__)
// float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float)'s bits
inline __m256i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v)); }

// MT rows (xf: float32, row stride K) x one 32-output block, all of K; out: row stride N
template <int MT, typename T>
void tile(const float* xf, int64_t K, const uint8_t* qw, const uint16_t* dm, T* out, int64_t N) {
  __m512 acc[MT][2];
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(0xF);
  for (int64_t g = 0; g < K / 32; ++g) {
    const uint16_t* p = dm + g * 64;
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
    const __m512 m0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    const __m512 m1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 48)));
    for (int64_t k = g * 32; k < g * 32 + 32; ++k) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qw + k * 16)));
      const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, mask)), d0, m0);
      const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), d1, m1);
      for (int r = 0; r < MT; ++r) {
        const __m512 xv = _mm512_set1_ps(xf[r * K + k]);
        acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
  }
  for (int r = 0; r < MT; ++r) {
    store16(out + r * N, acc[r][0]);
    store16(out + r * N + 16, acc[r][1]);
  }
}
#else
// the same fma sequence per output, one scalar at a time
template <int MT, typename T>
void tile(const float* xf, int64_t K, const uint8_t* qw, const uint16_t* dm, T* out, int64_t N) {
  float acc[MT][32] = {};
  for (int64_t g = 0; g < K / 32; ++g) {
    float d[32], m[32];
    for (int j = 0; j < 32; ++j) {
      d[j] = static_cast<float>(c10::Half(dm[g * 64 + j], c10::Half::from_bits()));
      m[j] = static_cast<float>(c10::Half(dm[g * 64 + 32 + j], c10::Half::from_bits()));
    }
    for (int64_t k = g * 32; k < g * 32 + 32; ++k) {
      float w[32];
      for (int j = 0; j < 16; ++j) {
        w[j] = std::fma(static_cast<float>(qw[k * 16 + j] & 0xF), d[j], m[j]);
        w[j + 16] = std::fma(static_cast<float>(qw[k * 16 + j] >> 4), d[j + 16], m[j + 16]);
      }
      for (int r = 0; r < MT; ++r)
        for (int j = 0; j < 32; ++j) acc[r][j] = std::fma(xf[r * K + k], w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MT; ++r) store_row(out + r * N, acc[r]);
}
#endif

template <typename T>
void run_tile(int64_t rows, const float* xf, int64_t K, const uint8_t* qw, const uint16_t* dm, T* out, int64_t N) {
  switch (rows) {
#define TIDAR_Q4_TILE(n) case n: tile<n>(xf, K, qw, dm, out, N); break;
    TIDAR_Q4_TILE(1) TIDAR_Q4_TILE(2) TIDAR_Q4_TILE(3) TIDAR_Q4_TILE(4) TIDAR_Q4_TILE(5) TIDAR_Q4_TILE(6)
    TIDAR_Q4_TILE(7) TIDAR_Q4_TILE(8) TIDAR_Q4_TILE(9) TIDAR_Q4_TILE(10) TIDAR_Q4_TILE(11) TIDAR_Q4_TILE(12)
#undef TIDAR_Q4_TILE
    default: TORCH_CHECK(false, "q4 tile of ", rows, " rows");
  }
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& dm) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "q4_linear: float32 or bfloat16 input");
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.dim() == 3 && qw.size(2) == 16 && qw.is_contiguous(), "q4_linear: qw (N/32, K, 16) uint8");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous(), "q4_linear: dm float16");
  const int64_t K = x.size(-1), NB = qw.size(0), N = NB * 32;
  TORCH_CHECK(qw.size(1) == K && K % 32 == 0 && dm.numel() == NB * (K / 32) * 64, "q4_linear: shapes");
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  if (M == 0) return out;
  const float* xp = xf.const_data_ptr<float>();
  const uint8_t* qp = qw.const_data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dm.const_data_ptr<at::Half>());
  const int64_t tiles = (M + MAX_TILE - 1) / MAX_TILE;
  auto run = [&](auto* op) {
    at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nb = begin; nb < end; ++nb) {
        int64_t r0 = 0;
        for (int64_t t = 0; t < tiles; ++t) {  // near-equal tiles: 20 rows are 10 + 10, not 12 + 8
          const int64_t rows = (M - r0) / (tiles - t);
          run_tile(rows, xp + r0 * K, K, qp + nb * K * 16, dp + nb * (K / 32) * 64, op + r0 * N + nb * 32, N);
          r0 += rows;
        }
      }
    });
  };
  if (x.scalar_type() == at::kBFloat16) run(out.data_ptr<c10::BFloat16>());
  else run(out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(tidar_q4, m) { m.def("linear(Tensor x, Tensor qw, Tensor dm) -> Tensor"); }

TORCH_LIBRARY_IMPL(tidar_q4, CPU, m) { m.impl("linear", &q4_linear); }
