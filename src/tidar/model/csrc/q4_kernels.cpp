// x @ W^T with W held as GGUF Q4_1 blocks (per 32 inputs of an output row: float16 d and m, 32
// 4-bit q; the weight is d * q + m). Built by `tidar.model.quant`.
//
// Two paths, each exact in the sense the decoder needs: every row's output depends on that row of x
// alone (not on how many rows the call has, the row tiling or the thread split), so a token's row
// comes out bit for bit the same alone or among others and TiDAR's greedy output equals AR's.
//
// float32 x (and bfloat16 x where the CPU or the OS gives no AMX): every weight is fma(q, d, m) in
// float32. q * d is exact in float32 (an 11-bit significand times a 4-bit integer), so this is one
// rounding of d * q + m, the value gguf.quants.dequantize computes. Each output is one float32
// accumulator that adds x[k] * w[k] with fma for k = 0, 1, ..., K-1 in that order. The portable
// path makes the same std::fma calls in the same order, so it gives the same bits as the AVX-512 one.
//
// bfloat16 x with AMX (the decoding engine's case; TIDAR_Q4_AMX=0 turns it off): per group g of 32
// inputs the sum is split as d * sum_k(x_k q_k) + m * sum_k(x_k), the same value in exact arithmetic.
// x_k and q_k (an integer 0..15) are both exact in bfloat16, so the tile multiply (tdpbf16ps)
// forms every product exactly and adds them in float32; a row of its result depends on that row of
// the input tile alone. The group's codes become bfloat16 once per call (a 16-entry table) and serve
// every row, so a row costs a few AMX instructions per group instead of 64 vector fmas. The float32
// result differs from the fma path's by accumulation rounding only (tests/test_quant.py bounds it).
// Every bfloat16 call takes the same path, whatever its number of rows. On this path a call may also
// compute dense bfloat16 rows beside the projection (`extra`: the adapter's A rows), in their own tiles.
//
// Speed: a block of 32 inputs x 32 outputs is dequantized once per tile of up to 12 (AMX: 16) rows and read
// from memory once per call; at a decode step's few rows the matmul streams 4.5 bits per weight
// instead of bfloat16's 16.
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
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>
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

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
constexpr bool HAS_AMX = true;
constexpr int AMX_ROWS = 16;  // rows of an AMX tile

// Linux hands out AMX's tile state only on request (once per process)
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles: 0 the rows' 32 inputs of a group, 1 and 2 the codes of outputs 0-15 and 16-31, 3 and 4 their sums
void configure_tiles(int rows) {
  TileConfig c;
  for (int t = 0; t < 5; ++t) c.colsb[t] = 64;
  c.rows[0] = c.rows[3] = c.rows[4] = static_cast<uint8_t>(rows);
  c.rows[1] = c.rows[2] = 16;
  _tile_loadconfig(&c);
}

// `rows` (<= 16) bfloat16 rows (x: row stride K; xg: their per-group sums, row stride K/32) x one
// 32-output block. The tiles must be configured for `rows` (configure_tiles).
//
// The groups go in chunks of AMX_CHUNK, each in three passes: every group's codes become bfloat16 (each
// group into its own buffer), then the tiles multiply each group (its sums into their own buffer), then
// the sums are scaled into y, row by row, the groups in input order. Group by group in one pass, each
// group's tile loads waited for its own code stores and its sum loads for its own tile stores; in
// chunks the vector and tile work of neighbouring groups overlap (1.1-1.3x a call on SmolLM2's shapes at
// 1 to 16 rows, 2 threads). y gets the same fmas in the same order either way: the same bits.
constexpr int AMX_CHUNK = 3;
// In a decode step the weights stream from memory (a step reads all 56 MB of codes once): the codes 8 groups
// (4 KB) ahead are requested while a group is converted. All 120 projections, one pass: 1 row 3.5-5.4 vs
// 7.1-7.3 ms, 7 rows 5.9-7.0 vs 7.7-7.9 (benchmarks/q4_model_pass.py, one process per build, alternating,
// benchmarks/results/q4-prefetch-2026-12-07.log); in q4_rows.py's loop over one hot weight it stays within
// noise. Prefetching changes no arithmetic.
constexpr int PREFETCH_GROUPS = 8;
template <typename T>
void tile_amx(int rows, const uint16_t* x, const float* xg, int64_t K, const uint8_t* qw, const uint16_t* dm,
              T* out, int64_t N) {
  alignas(64) uint16_t codes[AMX_CHUNK][2][16 * 32];  // a group's codes as bfloat16, VNNI layout (input pairs)
  alignas(64) float sums[AMX_CHUNK][2][AMX_ROWS * 16];
  alignas(64) float dmf[AMX_CHUNK][4][16];  // d of outputs 0-15, 16-31, then m, as float32
  alignas(64) float y[AMX_ROWS][32] = {};
  // bfloat16 bits of 0..15, twice: vpermw reads an index's low five bits, so bit 4 (and all above) of the
  // 16-bit lane it looks up may hold anything
  const __m512i lut = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
      0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
      0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  // byte 4j of a 32-bit lane <- code byte j of input 2pr, byte 4j+2 <- byte j of input 2pr+1: 16-bit lanes
  // of codes, interleaved per output, in one shuffle (the odd bytes, which the lookups ignore, get byte 0)
  alignas(64) static const uint8_t pair_index[64] = {
      0, 0, 16, 0, 1, 0, 17, 0, 2, 0, 18, 0, 3, 0, 19, 0, 4, 0, 20, 0, 5, 0, 21, 0, 6, 0, 22, 0, 7, 0, 23, 0,
      8, 0, 24, 0, 9, 0, 25, 0, 10, 0, 26, 0, 11, 0, 27, 0, 12, 0, 28, 0, 13, 0, 29, 0, 14, 0, 30, 0, 15, 0, 31, 0};
  const __m512i pairs = _mm512_load_si512(pair_index);
  const int64_t G = K / 32;
  for (int64_t g0 = 0; g0 < G; g0 += AMX_CHUNK) {
    const int n = static_cast<int>(G - g0 < AMX_CHUNK ? G - g0 : AMX_CHUNK);
    for (int c = 0; c < n; ++c) {
      const uint8_t* q = qw + (g0 + c) * 32 * 16;
      for (int line = 0; line < 8; ++line)  // the codes PREFETCH_GROUPS groups on (past the block's end: the next block's)
        _mm_prefetch(reinterpret_cast<const char*>(q + PREFETCH_GROUPS * 512 + line * 64), _MM_HINT_T0);
      for (int pr = 0; pr < 16; ++pr) {
        // codes of inputs 2pr and 2pr+1 of the group, interleaved per output (16-bit lane 2j: input 2pr);
        // a lane's low nibble is output j's code, its next four bits output j + 16's
        const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + pr * 32)));
        const __m512i v = _mm512_permutexvar_epi8(pairs, bytes);
        _mm512_store_si512(codes[c][0] + pr * 32, _mm512_permutexvar_epi16(v, lut));
        _mm512_store_si512(codes[c][1] + pr * 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut));
      }
      const uint16_t* p = dm + (g0 + c) * 64;
      for (int h = 0; h < 4; ++h)
        _mm512_store_ps(dmf[c][h], _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * h))));
    }
    for (int c = 0; c < n; ++c) {
      _tile_loadd(0, x + (g0 + c) * 32, K * 2);
      _tile_loadd(1, codes[c][0], 64);
      _tile_loadd(2, codes[c][1], 64);
      _tile_zero(3);
      _tile_zero(4);
      _tile_dpbf16ps(3, 0, 1);
      _tile_dpbf16ps(4, 0, 2);
      _tile_stored(3, sums[c][0], 64);
      _tile_stored(4, sums[c][1], 64);
    }
    for (int r = 0; r < rows; ++r) {
      __m512 y0 = _mm512_load_ps(y[r]), y1 = _mm512_load_ps(y[r] + 16);
      for (int c = 0; c < n; ++c) {
        const __m512 xs = _mm512_set1_ps(xg[r * G + g0 + c]);
        y0 = _mm512_fmadd_ps(_mm512_load_ps(dmf[c][2]), xs,
                             _mm512_fmadd_ps(_mm512_load_ps(dmf[c][0]), _mm512_load_ps(sums[c][0] + r * 16), y0));
        y1 = _mm512_fmadd_ps(_mm512_load_ps(dmf[c][3]), xs,
                             _mm512_fmadd_ps(_mm512_load_ps(dmf[c][1]), _mm512_load_ps(sums[c][1] + r * 16), y1));
      }
      _mm512_store_ps(y[r], y0);
      _mm512_store_ps(y[r] + 16, y1);
    }
  }
  for (int r = 0; r < rows; ++r) {
    store16(out + r * N, _mm512_load_ps(y[r]));
    store16(out + r * N + 16, _mm512_load_ps(y[r] + 16));
  }
}


// `rows` (<= 16) bfloat16 rows x 32 dense bfloat16 outputs (the adapter's A rows that ride along with a
// projection): a packed (K/2, 2, 16, 2), per input pair outputs 0-15 then 16-31 in the tiles' pair
// layout. The sums run over all of K in the tiles, with no per-group scale.
template <typename T>
void tile_amx_dense(int rows, const uint16_t* x, int64_t K, const uint16_t* a, T* out, int64_t ld) {
  alignas(64) float sums[2][AMX_ROWS * 16];
  _tile_zero(3);
  _tile_zero(4);
  for (int64_t g = 0; g < K / 32; ++g) {
    _tile_loadd(0, x + g * 32, K * 2);
    _tile_loadd(1, a + g * 16 * 64, 128);
    _tile_loadd(2, a + g * 16 * 64 + 32, 128);
    _tile_dpbf16ps(3, 0, 1);
    _tile_dpbf16ps(4, 0, 2);
  }
  _tile_stored(3, sums[0], 64);
  _tile_stored(4, sums[1], 64);
  for (int r = 0; r < rows; ++r) {
    store16(out + r * ld, _mm512_load_ps(sums[0] + r * 16));
    store16(out + r * ld + 16, _mm512_load_ps(sums[1] + r * 16));
  }
}
#else
constexpr bool HAS_AMX = false;
constexpr int AMX_ROWS = 16;
bool amx_permitted() { return false; }
void configure_tiles(int) {}
template <typename T>
void tile_amx(int, const uint16_t*, const float*, int64_t, const uint8_t*, const uint16_t*, T*, int64_t) {}
template <typename T>
void tile_amx_dense(int, const uint16_t*, int64_t, const uint16_t*, T*, int64_t) {}
#endif

#define TIDAR_Q4_TILES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)

template <typename T>
void run_tile(int64_t rows, const float* xf, int64_t K, const uint8_t* qw, const uint16_t* dm, T* out, int64_t N) {
  switch (rows) {
#define TIDAR_Q4_TILE(n) case n: tile<n>(xf, K, qw, dm, out, N); break;
    TIDAR_Q4_TILES(TIDAR_Q4_TILE)
#undef TIDAR_Q4_TILE
    default: TORCH_CHECK(false, "q4 tile of ", rows, " rows");
  }
}

// every 32-output block of the weight, in parallel; per block, the rows in near-equal tiles of at most
// `max_rows` (20 rows are 10 + 10, not 12 + 8); `start(begin)` runs first in each thread's share
template <typename S, typename F>
void for_each_tile(int64_t M, int64_t NB, int64_t max_rows, S&& start, F&& tile_fn) {
  const int64_t tiles = (M + max_rows - 1) / max_rows;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    start();
    for (int64_t nb = begin; nb < end; ++nb) {
      int64_t r0 = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = (M - r0) / (tiles - t);
        tile_fn(nb, r0, rows);
        r0 += rows;
      }
    }
  });
}

// per row, the float32 sums of its groups of 32 inputs, each added in input order
at::Tensor group_sums(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xg = at::empty({M, K / 32}, x.options().dtype(at::kFloat));
  const c10::BFloat16* xp = x.const_data_ptr<c10::BFloat16>();
  float* gp = xg.data_ptr<float>();
  for (int64_t i = 0; i < M * (K / 32); ++i) {
    float acc = 0.f;
    for (int j = 0; j < 32; ++j) acc += static_cast<float>(xp[i * 32 + j]);
    gp[i] = acc;
  }
  return xg;
}

// bfloat16 x takes the AMX path where the CPU has it, the OS grants it and TIDAR_Q4_AMX is not 0
bool amx_path() {
  static const bool on = HAS_AMX && amx_permitted() && !(std::getenv("TIDAR_Q4_AMX") && std::string(std::getenv("TIDAR_Q4_AMX")) == "0");
  return on;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& dm, bool use_amx,
                     const std::optional<at::Tensor>& extra) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "q4_linear: float32 or bfloat16 input");
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.dim() == 3 && qw.size(2) == 16 && qw.is_contiguous(), "q4_linear: qw (N/32, K, 16) uint8");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous(), "q4_linear: dm float16");
  const int64_t K = x.size(-1), NB = qw.size(0), N = NB * 32;
  TORCH_CHECK(qw.size(1) == K && K % 32 == 0 && dm.numel() == NB * (K / 32) * 64, "q4_linear: shapes");
  const bool amx = x.scalar_type() == at::kBFloat16 && use_amx && amx_path();
  TORCH_CHECK(!extra || amx, "q4_linear: extra rows need bfloat16 x on the AMX path");
  const int64_t EB = extra ? extra->size(0) : 0;  // 32-row blocks of extra outputs
  TORCH_CHECK(!extra || (extra->scalar_type() == at::kBFloat16 && extra->is_contiguous() && extra->dim() == 5 &&
                         extra->size(1) * 2 == K), "q4_linear: extra (R/32, K/2, 2, 16, 2) bfloat16");
  const int64_t ld = N + EB * 32;
  auto sizes = x.sizes().vec();
  sizes.back() = ld;
  at::Tensor out = at::empty(sizes, x.options());
  const int64_t M = x.numel() / K;
  if (M == 0) return out;
  const uint8_t* qp = qw.const_data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dm.const_data_ptr<at::Half>());
  if (amx) {
    const at::Tensor xb = x.reshape({-1, K}).contiguous();
    const at::Tensor xg = group_sums(xb);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<c10::BFloat16>());
    const float* gp = xg.const_data_ptr<float>();
    c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
    // the tile configuration is per thread, and other AMX users (oneDNN) load their own in between
    thread_local int configured = -1;
    const uint16_t* ep = extra ? reinterpret_cast<const uint16_t*>(extra->const_data_ptr<c10::BFloat16>()) : nullptr;
    for_each_tile(M, NB + EB, AMX_ROWS, [&] { configured = -1; }, [&](int64_t nb, int64_t r0, int64_t rows) {
      if (rows != configured) configure_tiles(configured = static_cast<int>(rows));
      if (nb < NB)
        tile_amx(static_cast<int>(rows), xp + r0 * K, gp + r0 * (K / 32), K, qp + nb * K * 16,
                 dp + nb * (K / 32) * 64, op + r0 * ld + nb * 32, ld);
      else
        tile_amx_dense(static_cast<int>(rows), xp + r0 * K, K, ep + (nb - NB) * K * 32, op + r0 * ld + nb * 32, ld);
    });
    return out;
  }
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const float* xp = xf.const_data_ptr<float>();
  auto run = [&](auto* op) {
    for_each_tile(M, NB, MAX_TILE, [] {}, [&](int64_t nb, int64_t r0, int64_t rows) {
      run_tile(rows, xp + r0 * K, K, qp + nb * K * 16, dp + nb * (K / 32) * 64, op + r0 * N + nb * 32, N);
    });
  };
  if (x.scalar_type() == at::kBFloat16) run(out.data_ptr<c10::BFloat16>());
  else run(out.data_ptr<float>());
  return out;
}


}  // namespace

TORCH_LIBRARY(tidar_q4, m) {
  m.def("linear(Tensor x, Tensor qw, Tensor dm, bool amx=True, Tensor? extra=None) -> Tensor");  // amx=False: the fma path
  m.def("amx() -> bool", &amx_path);  // whether bfloat16 x takes the AMX path
}

TORCH_LIBRARY_IMPL(tidar_q4, CPU, m) {
  m.impl("linear", &q4_linear);
}
