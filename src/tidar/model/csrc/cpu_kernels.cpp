// CPU kernels for the decoding engine's small ops: decode-step attention over the KV cache, the
// adapter's [MASK]-row up-projection, and a layer's glue (RMSNorm, residual add + RMSNorm, RoPE +
// KV-cache writes). At a decode step's few rows, a oneDNN call costs 15-25 us whatever its size and
// a small PyTorch op 1-3 us; SmolLM2's 30 layers made some 2,000 of them per step. Every kernel
// works row by row (a row's result never depends on the other rows of the call).
//
// Exactness contract of `decode_attention`: each query row's output is a function of that row's
// query and the sequence of keys/values it attends to only, computed by the same instruction
// sequence whatever the number of rows in the call, the cache capacity, the thread split, or the
// slots those keys sit in. That is what makes a token verified among many rows equal, bit for bit,
// to the same token in a one-token AR step, and a sequence in a batch (left padding, holes left by
// drafts rejected while another sequence accepted more) equal to the same sequence alone. Hence:
// sums that run over keys in order (masked keys contribute exact zeros, which change no nonzero
// sum), each key's score summed over d in a fixed order, key blocks padded to a whole vector (no
// scalar tails), and our own polynomial exp (libm's vector and scalar exp round differently, and
// which one a compiler uses can depend on the loop shape).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int L = 16;  // lanes per vector: one AVX-512 register (two AVX2 ones)
typedef float vf __attribute__((vector_size(L * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(L * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(L * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(L * sizeof(uint16_t))));

inline vf splat(float x) { return vf{} + x; }

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// float32 -> bfloat16 bits (in the low half of each lane), round to nearest even, NaN -> 0x7FC0:
// c10::BFloat16(float)'s bits, a whole vector at a time (the scalar constructor's NaN branch keeps
// compilers from vectorizing it, and at a decode step's few rows these conversions were a large
// share of the small kernels' time)
inline vu bf16_bits(vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof u);
  const vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where v is NaN
  return (((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16) & ~nan) | (nan & 0x7FC0u);
}
inline void store(c10::BFloat16* p, vf v) {
  const vh h = __builtin_convertvector(bf16_bits(v), vh);
  std::memcpy(p, &h, sizeof h);
}

// x rounded to T and back to float32: what T(x) then float(...) gives, one vector at a time
inline vf rounded(vf x, float) { return x; }
inline vf rounded(vf x, c10::BFloat16) {
  const vu u = bf16_bits(x) << 16;
  vf r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

inline float hsum(vf v) {  // fixed pairwise order
  float s[L];
  std::memcpy(s, &v, sizeof s);
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// exp(x) for x <= 0 (softmax after subtracting the max), 0 below -87 (float32's normal range) and
// for -inf: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-6 polynomial
// (about 1 ulp).
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.0f);
  vi under = x < lo;
  x = under ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat(1.44269504088896341f) + magic;
  vi n;
  {
    vi ti;
    std::memcpy(&ti, &t, sizeof ti);
    vi mi;
    vf m = magic;
    std::memcpy(&mi, &m, sizeof mi);
    n = ti - mi;
  }
  vf nf = t - magic;
  vf r = x - nf * splat(0.693359375f);
  r = r - nf * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi e = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  vf y = p * scale;
  return under ? splat(0.0f) : y;
}

constexpr int ROWS = 6;  // rows that share one pass over the values (their sums live in registers)
constexpr int TASK_ROWS = 16;  // query rows per task: they share each converted key block
constexpr int QROWS = 8;  // rows whose scores are summed side by side (TASK_ROWS is a multiple)
// rows per pass over the values: their sums (4 vectors each at head_dim 64) and denominators, the
// value vectors and a weight fit AVX-512's 32 registers (6 rows spilled: 10% slower here), and 4
// divides a task's 16 rows
constexpr int VROWS = 4;

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// QR rows' scores against 16 keys (kt: (D, 16) float32), each row summed over d in order
template <int QR, int64_t D>
inline void row_scores(const float* qi, const float* kt, vf* acc) {
  for (int r = 0; r < QR; ++r) acc[r] = splat(qi[r * D]) * load(kt);
  for (int64_t d = 1; d < D; ++d) {
    const vf kd = load(kt + d * L);
    for (int r = 0; r < QR; ++r) acc[r] = acc[r] + splat(qi[r * D + d]) * kd;
  }
}

inline float hmax(vf v) {
  float m = v[0];
  for (int j = 1; j < L; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// DV = head_dim / 16, a compile-time constant so the per-row sums stay in registers
template <typename T, int DV>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                    at::Tensor& out, int64_t n_keys) {
  constexpr int64_t D = DV * L;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2);
  const int64_t Hkv = k.size(1), G = H / Hkv, R = G * Tq, W = k.size(3);  // R: query rows per kv head
  const int64_t chunks = (R + TASK_ROWS - 1) / TASK_ROWS, n_pad = (n_keys + L - 1) / L * L;
  const float scale = 1.0f / std::sqrt(float(D));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* bp = bias.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t bs0 = bias.size(0) == 1 ? 0 : bias.stride(0), bs2 = bias.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);

  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(TASK_ROWS * n_pad), qf(TASK_ROWS * D, 0.0f), kt(D * L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hkv * chunks), hk = task / chunks % Hkv, c = task % chunks;
      const int64_t r0 = c * TASK_ROWS, nr = std::min<int64_t>(TASK_ROWS, R - r0);
      const T* kb = kp + b * ks0 + hk * ks1;
      const T* vb = vp + b * vs0 + hk * vs1;
      const float* brow[TASK_ROWS];
      int64_t head[TASK_ROWS], tok[TASK_ROWS];
      for (int64_t i = 0; i < nr; ++i) {
        head[i] = hk * G + (r0 + i) / Tq;
        tok[i] = (r0 + i) % Tq;
        brow[i] = bp + b * bs0 + tok[i] * bs2;
        const T* qrow = qp + b * qs0 + head[i] * qs1 + tok[i] * qs2;
        for (int64_t d = 0; d < D; ++d) qf[i * D + d] = float(qrow[d]);
      }
      // scores, 16 keys at a time: K is stored transposed, (D, W), so each lane is one key's dot
      // product summed over d in order, with no horizontal sums
      vf mx[TASK_ROWS];
      for (int64_t i = 0; i < nr; ++i) mx[i] = splat(neg_inf);
      for (int64_t s0 = 0; s0 < n_pad; s0 += L) {
        const int64_t nk = std::min<int64_t>(L, n_keys - s0);
        if (s0 + L <= W) {
          for (int64_t d = 0; d < D; ++d) store(kt.data() + d * L, load(kb + d * ks2 + s0));
        } else {  // the buffer ends inside this block
          for (int64_t d = 0; d < D; ++d)
            for (int64_t j = 0; j < L; ++j) kt[d * L + j] = j < nk ? float(kb[d * ks2 + s0 + j]) : 0.0f;
        }
        // up to QROWS rows at a time: independent dependency chains (one row's sum over d is
        // sequential, the same whatever the rows beside it)
        for (int64_t i0 = 0; i0 < nr; i0 += QROWS) {
          const float* qi = qf.data() + i0 * D;
          vf acc[QROWS];
          switch (std::min<int64_t>(QROWS, nr - i0)) {  // only the rows there are (an AR step has 3 per kv head)
            case 1: row_scores<1, D>(qi, kt.data(), acc); break;
            case 2: row_scores<2, D>(qi, kt.data(), acc); break;
            case 3: row_scores<3, D>(qi, kt.data(), acc); break;
            case 4: row_scores<4, D>(qi, kt.data(), acc); break;
            case 5: row_scores<5, D>(qi, kt.data(), acc); break;
            case 6: row_scores<6, D>(qi, kt.data(), acc); break;
            case 7: row_scores<7, D>(qi, kt.data(), acc); break;
            default: row_scores<QROWS, D>(qi, kt.data(), acc);
          }
          for (int64_t i = i0; i < std::min<int64_t>(nr, i0 + QROWS); ++i) {
            vf bv;
            if (nk == L) {
              bv = load(brow[i] + s0);
            } else {
              for (int64_t j = 0; j < L; ++j) bv[j] = j < nk ? brow[i][s0 + j] : neg_inf;
            }
            vf sc = acc[i - i0] * splat(scale) + bv;
            store(probs.data() + i * n_pad + s0, sc);
            mx[i] = vmax(mx[i], sc);
          }
        }
      }
      // exp(score - max); masked keys give exact zeros
      for (int64_t i = 0; i < nr; ++i) {
        float* pr = probs.data() + i * n_pad;
        const vf m = splat(hmax(mx[i]));
        for (int64_t s = 0; s < n_pad; s += L) store(pr + s, exp_nonpositive(load(pr + s) - m));
      }
      // weighted sum of values and the softmax denominator, both keys in order: a masked key adds
      // +-0, which changes no nonzero sum, so the result depends only on the sequence of attended
      // keys, not on which slots they sit in (a batch's left padding, the holes its ragged
      // acceptance leaves in the cache). Summing the denominator by lane (slot mod 16) would not.
      for (int64_t i0 = 0; i0 < nr; i0 += VROWS) {
        const int64_t ni = std::min<int64_t>(VROWS, nr - i0);
        vf acc[VROWS][DV];
        float den[VROWS];
        for (int64_t i = 0; i < ni; ++i) {
          den[i] = 0.0f;
          for (int64_t d = 0; d < DV; ++d) acc[i][d] = splat(0.0f);
        }
        for (int64_t s = 0; s < n_keys; ++s) {
          const T* vrow = vb + s * vs2;
          vf vv[DV];
          for (int64_t d = 0; d < DV; ++d) vv[d] = load(vrow + d * L);
          for (int64_t i = 0; i < ni; ++i) {
            const float ps = probs[(i0 + i) * n_pad + s];
            den[i] += ps;
            const vf p = splat(ps);
            for (int64_t d = 0; d < DV; ++d) acc[i][d] = acc[i][d] + p * vv[d];
          }
        }
        for (int64_t i = 0; i < ni; ++i) {
          T* orow = op + b * os0 + head[i0 + i] * os1 + tok[i0 + i] * os2;
          const vf inv = splat(1.0f / den[i]);
          for (int64_t d = 0; d < DV; ++d) store(orow + d * L, acc[i][d] * inv);
        }
      }
    }
  });
}

// Softmax attention for the engine's cached steps. q (B, H, T, D), any strides with unit stride in
// D; k_t (B, H_kv, D, W) (keys transposed, unit stride in W); v (B, H_kv, W, D) with unit stride in
// D; bias (B or 1, 1, T, >= n_keys) float32, 0 or -inf. Attends over the first n_keys slots.
// Returns (B, T, H, D), contiguous: the o-projection's input layout.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            int64_t n_keys) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && bias.dim() == 4, "decode_attention: 4-d inputs");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "decode_attention: one dtype");
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "decode_attention: float32 bias");
    TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: unit stride in the last dim");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && k.size(2) == q.size(3) && v.size(2) == k.size(3) && n_keys <= v.size(2) &&
                  n_keys <= bias.size(3) && bias.size(2) == q.size(2),
              "decode_attention: shapes");
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  auto view = out.transpose(1, 2);  // (B, H, T, D) over the (B, T, H, D) storage
  auto b = bias.stride(3) == 1 ? bias : bias.contiguous();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == at::kFloat, "decode_attention: float32 or bfloat16");
  switch (q.size(3)) {
    case 16: bf16 ? attention_impl<c10::BFloat16, 1>(q, k, v, b, view, n_keys) : attention_impl<float, 1>(q, k, v, b, view, n_keys); break;
    case 32: bf16 ? attention_impl<c10::BFloat16, 2>(q, k, v, b, view, n_keys) : attention_impl<float, 2>(q, k, v, b, view, n_keys); break;
    case 64: bf16 ? attention_impl<c10::BFloat16, 4>(q, k, v, b, view, n_keys) : attention_impl<float, 4>(q, k, v, b, view, n_keys); break;
    case 128: bf16 ? attention_impl<c10::BFloat16, 8>(q, k, v, b, view, n_keys) : attention_impl<float, 8>(q, k, v, b, view, n_keys); break;
    default: TORCH_CHECK(false, "decode_attention: head_dim must be 16, 32, 64 or 128");
  }
  return out;
}

// out rows [row_start, T) += down rows @ up_t over output columns [n0, n0 + NV * 16)
template <typename T, int NV>
inline void lora_block(T* op, const T* dp, const T* up, int64_t B, int64_t rows, int64_t row_start, int64_t r_lo,
                       int64_t r_hi, int64_t N, int64_t n0, int64_t os0, int64_t os1, int64_t ds0, int64_t ds1) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t0 = 0; t0 < rows; t0 += ROWS) {
      const int64_t nr = std::min<int64_t>(ROWS, rows - t0);
      vf acc[ROWS][NV];
      for (int64_t i = 0; i < ROWS; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = splat(0.0f);
      for (int64_t r = r_lo; r < r_hi; ++r) {
        vf w[NV];
        for (int j = 0; j < NV; ++j) w[j] = load(up + r * N + n0 + j * L);
        for (int64_t i = 0; i < nr; ++i) {
          const vf x = splat(float(dp[b * ds0 + (row_start + t0 + i) * ds1 + r]));
          for (int j = 0; j < NV; ++j) acc[i][j] = acc[i][j] + x * w[j];
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        T* orow = op + b * os0 + (row_start + t0 + i) * os1 + n0;
        for (int j = 0; j < NV; ++j) store(orow + j * L, load(orow + j * L) + acc[i][j]);
      }
    }
  }
}

#if defined(__AVX512BF16__)
// The same for bfloat16 on CPUs with AVX512-BF16: ranks in pairs through `vdpbf16ps` (two products
// per lane and instruction, no conversions), an odd last rank as above. Its sums round differently
// from the float32 loop's, which is fine: these are [MASK] rows, drafts only, and each row is still
// computed by the same instructions whatever the other rows.
template <int NV>
inline void lora_block_dp(c10::BFloat16* op, const c10::BFloat16* dp, const c10::BFloat16* up, int64_t B, int64_t rows,
                          int64_t row_start, int64_t r_lo, int64_t r_hi, int64_t N, int64_t n0, int64_t os0, int64_t os1,
                          int64_t ds0, int64_t ds1) {
  // word 2j of a pair vector is rank r's column j, word 2j + 1 rank r + 1's
  alignas(64) static const int16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t0 = 0; t0 < rows; t0 += ROWS) {
      const int64_t nr = std::min<int64_t>(ROWS, rows - t0);
      const c10::BFloat16* drow = dp + b * ds0 + (row_start + t0) * ds1;
      __m512 acc[ROWS][NV];
      for (int64_t i = 0; i < ROWS; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
      int64_t r = r_lo;
      for (; r + 1 < r_hi; r += 2) {
        __m512bh w[NV];
        for (int j = 0; j < NV; ++j) {
          const __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(up + r * N + n0 + j * L)));
          const __m512i hi = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(up + (r + 1) * N + n0 + j * L)));
          w[j] = (__m512bh)_mm512_permutex2var_epi16(lo, idx, hi);
        }
        for (int64_t i = 0; i < nr; ++i) {
          int32_t pair;
          std::memcpy(&pair, drow + i * ds1 + r, sizeof pair);
          const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
          for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, w[j]);
        }
      }
      if (r < r_hi) {
        vf w[NV];
        for (int j = 0; j < NV; ++j) w[j] = load(up + r * N + n0 + j * L);
        for (int64_t i = 0; i < nr; ++i) {
          const vf x = splat(float(drow[i * ds1 + r]));
          for (int j = 0; j < NV; ++j) acc[i][j] = (__m512)((vf)acc[i][j] + x * w[j]);
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        c10::BFloat16* orow = op + b * os0 + (row_start + t0 + i) * os1 + n0;
        for (int j = 0; j < NV; ++j) store(orow + j * L, load(orow + j * L) + (vf)acc[i][j]);
      }
    }
  }
}

#endif

template <int NV, typename T>
inline void lora_block_any(T* op, const T* dp, const T* up, int64_t B, int64_t rows, int64_t row_start, int64_t r_lo,
                           int64_t r_hi, int64_t N, int64_t n0, int64_t os0, int64_t os1, int64_t ds0, int64_t ds1) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    lora_block_dp<NV>(op, dp, up, B, rows, row_start, r_lo, r_hi, N, n0, os0, os1, ds0, ds1);
    return;
  }
#endif
  lora_block<T, NV>(op, dp, up, B, rows, row_start, r_lo, r_hi, N, n0, os0, os1, ds0, ds1);
}

template <typename T>
void lora_add_impl(at::Tensor& out, const at::Tensor& down, const at::Tensor& up_t, int64_t row_start,
                   const std::vector<int64_t>& col_bounds, const std::vector<int64_t>& rank_bounds) {
  const int64_t B = out.size(0), N = out.size(2), R = down.size(2), rows = out.size(1) - row_start;
  T* op = out.data_ptr<T>();
  const T* dp = down.data_ptr<T>();
  const T* up = up_t.data_ptr<T>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1), ds0 = down.stride(0), ds1 = down.stride(1);
  const int64_t blocks = N / (4 * L), tail = N / L - 4 * blocks;  // 64-column blocks, then 16-column ones
  // the ranks feeding columns [c0, c1): up_t is block-diagonal over the fused parts, so only the
  // ranks of the parts these columns belong to can be nonzero
  auto ranks = [&](int64_t c0, int64_t c1) -> std::pair<int64_t, int64_t> {
    if (col_bounds.empty()) return {0, R};
    int64_t lo = 0, hi = R;
    for (size_t p = 0; p + 1 < col_bounds.size(); ++p) {
      if (col_bounds[p] <= c0 && c0 < col_bounds[p + 1]) lo = rank_bounds[p];
      if (col_bounds[p] < c1 && c1 <= col_bounds[p + 1]) hi = rank_bounds[p + 1];
    }
    return {lo, hi};
  };
  at::parallel_for(0, blocks + tail, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const bool wide = blk < blocks;
      const int64_t n0 = wide ? blk * 4 * L : (4 * blocks + blk - blocks) * L;
      const auto [lo, hi] = ranks(n0, n0 + (wide ? 4 * L : L));
      if (wide) lora_block_any<4>(op, dp, up, B, rows, row_start, lo, hi, N, n0, os0, os1, ds0, ds1);
      else lora_block_any<1>(op, dp, up, B, rows, row_start, lo, hi, N, n0, os0, os1, ds0, ds1);
    }
  });
}

// out[:, row_start:] += down[:, row_start:] @ up_t, in place, float32 sums, one rounding.
// out (B, T, N), down (B, T, R): unit stride in the last dim (column slices of one matmul output);
// up_t (R, N) contiguous, N a multiple of 16. The adapter's mask-row branch: rows < row_start are
// not touched. col_bounds / rank_bounds (optional, same length): cumulative output sizes and ranks
// of the fused parts, whose up-projections sit on up_t's block diagonal (zeros elsewhere are skipped).
void lora_add_(at::Tensor out, const at::Tensor& down, const at::Tensor& up_t, int64_t row_start,
               at::IntArrayRef col_bounds, at::IntArrayRef rank_bounds) {
  TORCH_CHECK(out.dim() == 3 && down.dim() == 3 && up_t.dim() == 2, "lora_add_: out (B,T,N), down (B,T,R), up_t (R,N)");
  TORCH_CHECK(out.scalar_type() == down.scalar_type() && out.scalar_type() == up_t.scalar_type(), "lora_add_: one dtype");
  TORCH_CHECK(out.stride(2) == 1 && down.stride(2) == 1 && up_t.is_contiguous(), "lora_add_: unit stride in the last dim");
  TORCH_CHECK(up_t.size(0) == down.size(2) && up_t.size(1) == out.size(2) && out.size(2) % L == 0 &&
                  down.size(0) == out.size(0) && down.size(1) == out.size(1) && 0 <= row_start && row_start <= out.size(1),
              "lora_add_: shapes");
  TORCH_CHECK(col_bounds.size() == rank_bounds.size() &&
                  (col_bounds.empty() || (col_bounds.front() == 0 && col_bounds.back() == out.size(2) &&
                                          rank_bounds.front() == 0 && rank_bounds.back() == down.size(2))),
              "lora_add_: col_bounds / rank_bounds must run from 0 to N and from 0 to R");
  const std::vector<int64_t> cb(col_bounds.begin(), col_bounds.end()), rb(rank_bounds.begin(), rank_bounds.end());
  if (out.scalar_type() == at::kBFloat16) lora_add_impl<c10::BFloat16>(out, down, up_t, row_start, cb, rb);
  else if (out.scalar_type() == at::kFloat) lora_add_impl<float>(out, down, up_t, row_start, cb, rb);
  else TORCH_CHECK(false, "lora_add_: float32 or bfloat16");
}

// ---- the glue of a decoder layer: each op below replaces 5-12 small PyTorch ops (1-3 us each)

// one row: y = w * T(h * rsqrt(mean(h^2) + eps)), h = float(x), the reference formula's two roundings
template <typename T>
inline void rms_row(const T* x, const T* w, T* y, int64_t n, float eps) {
  vf acc = splat(0.0f);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vf h = load(x + i);
    acc = acc + h * h;
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss += float(x[i]) * float(x[i]);
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
  const vf rv = splat(r);
  int64_t j = 0;
  for (; j + L <= n; j += L) store(y + j, load(w + j) * rounded(load(x + j) * rv, T{}));
  for (; j < n; ++j) y[j] = T(float(w[j]) * float(T(float(x[j]) * r)));
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(xp + r * n, wp, yp + r * n, n, float(eps));
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 1 && x.size(-1) == w.size(0),
              "rms_norm: contiguous x (..., n) and weight (n,)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: float32 or bfloat16, one dtype");
}

// RMSNorm of each row of x (the engine's layer norms)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm(x, w);
  auto y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) rms_norm_impl<c10::BFloat16>(x, w, y, eps);
  else rms_norm_impl<float>(x, w, y, eps);
  return y;
}

// (x + delta, RMSNorm(x + delta)): a residual add and the next norm in one pass
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w,
                                                double eps) {
  check_norm(x, w);
  // delta may be a column slice of a wider matmul output: unit stride in the last dim, any row strides
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type() && delta.stride(-1) == 1 &&
                  x.dim() >= 2 && x.dim() <= 3,
              "add_rms_norm: delta shaped like x ((T, n) or (B, T, n)), unit stride in the last dim");
  auto s = at::empty_like(x);
  auto y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = x.numel() / n, n_tok = x.size(-2);
  const int64_t d0 = x.dim() == 3 ? delta.stride(0) : 0, d1 = delta.stride(-2);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* dp = delta.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    T* sp = s.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* drow = dp + (r / n_tok) * d0 + (r % n_tok) * d1;
        int64_t j = 0;
        for (; j + L <= n; j += L) store(sp + r * n + j, load(xp + r * n + j) + load(drow + j));
        for (; j < n; ++j) sp[r * n + j] = T(float(xp[r * n + j]) + float(drow[j]));
        rms_row(sp + r * n, wp, yp + r * n, n, float(eps));
      }
    });
  };
  if (x.scalar_type() == at::kBFloat16) run(c10::BFloat16{});
  else run(float{});
  return {s, y};
}

// SwiGLU's gate: silu(g) * u for gu = [g | u] (the fused gate/up projection's output), rounded as
// F.silu(g) * u rounds (silu to T, then the product to T). gu (B, T, 2I), unit stride in the last
// dim; returns (B, T, I) contiguous. silu(g) = g * sigmoid(g), sigmoid from exp(-|g|) <= 1.
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 3 && gu.stride(2) == 1 && gu.size(2) % 2 == 0, "silu_mul: gu (B, T, 2I), unit stride in the last dim");
  const auto dt = gu.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "silu_mul: float32 or bfloat16");
  const int64_t B = gu.size(0), T = gu.size(1), I = gu.size(2) / 2;
  auto y = at::empty({B, T, I}, gu.options());
  auto run = [&](auto tag) {
    using E = decltype(tag);
    const E* gp = gu.data_ptr<E>();
    E* yp = y.data_ptr<E>();
    const int64_t s0 = gu.stride(0), s1 = gu.stride(1);
    at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const E* g = gp + (bt / T) * s0 + (bt % T) * s1;
        const E* u = g + I;
        E* out = yp + bt * I;
        int64_t j = 0;
        for (; j + L <= I; j += L) {
          const vf x = load(g + j);
          const vf e = exp_nonpositive(x < 0 ? x : -x);
          const vf sig = x < 0 ? e / (splat(1.0f) + e) : splat(1.0f) / (splat(1.0f) + e);
          store(out + j, rounded(x * sig, E{}) * load(u + j));
        }
        for (; j < I; ++j) {
          const float x = float(g[j]), e = std::exp(-std::fabs(x));
          const float sig = x < 0 ? e / (1.0f + e) : 1.0f / (1.0f + e);
          out[j] = E(float(E(x * sig)) * float(u[j]));
        }
      }
    });
  };
  if (dt == at::kBFloat16) run(c10::BFloat16{});
  else run(float{});
  return y;
}

// RoPE on the q and k columns of a fused q|k|v projection output, k (transposed) and v written into
// the KV cache at slots offset.., q returned. qkv (B, T, (H + 2 H_kv) D), unit stride in the last
// dim; cos, sin (B, 1, T, D) contiguous, sin carrying rotate_half's sign; k_cache (B, H_kv, D, W);
// v_cache (B, H_kv, W, D). Returns q as (B, H, T, D) over (B, T, H, D) storage.
at::Tensor rope_cache_(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                       at::Tensor v_cache, int64_t offset, int64_t n_head) {
  const int64_t B = qkv.size(0), T = qkv.size(1), Hkv = k_cache.size(1), D = k_cache.size(2), W = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1 && qkv.size(2) == (n_head + 2 * Hkv) * D && D % 2 == 0,
              "rope_cache_: qkv (B, T, (H + 2 H_kv) D)");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * T * D && sin.numel() == B * T * D,
              "rope_cache_: cos/sin (B, 1, T, D)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.size(2) == W && v_cache.size(3) == D &&
                  k_cache.size(0) == B && offset >= 0 && offset + T <= W,
              "rope_cache_: caches (B, H_kv, D, W) and (B, H_kv, W, D) with room at offset");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && cos.scalar_type() == dt && sin.scalar_type() == dt &&
                  k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "rope_cache_: float32 or bfloat16, one dtype");
  auto q = at::empty({B, T, n_head, D}, qkv.options());
  auto run = [&](auto tag) {
    using E = decltype(tag);
    const E* xp = qkv.data_ptr<E>();
    const E* cp = cos.data_ptr<E>();
    const E* sp = sin.data_ptr<E>();
    E* qp = q.data_ptr<E>();
    E* kp = k_cache.data_ptr<E>();
    E* vp = v_cache.data_ptr<E>();
    const int64_t xs0 = qkv.stride(0), xs1 = qkv.stride(1), half = D / 2;
    // one thread up to 64 rows: a decode step's few rows write neighbouring slots of the transposed
    // k cache, and two threads sharing those cache lines took longer than one (T = 7: 35 vs 19 us)
    at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const E* row = xp + b * xs0 + t * xs1;
        const E* c = cp + bt * D;
        const E* s = sp + bt * D;
        for (int64_t h = 0; h < n_head + Hkv; ++h) {
          const E* x = row + h * D;
          for (int64_t d = 0; d < D; ++d) {
            const float rot = float(x[d < half ? d + half : d - half]);
            const E y = E(float(x[d]) * float(c[d]) + rot * float(s[d]));
            if (h < n_head) qp[(bt * n_head + h) * D + d] = y;
            else kp[((b * Hkv + h - n_head) * D + d) * W + offset + t] = y;
          }
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          const E* x = row + (n_head + Hkv + h) * D;
          E* dst = vp + ((b * Hkv + h) * W + offset + t) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = x[d];
        }
      }
    });
  };
  if (dt == at::kBFloat16) run(c10::BFloat16{});
  else run(float{});
  return q.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY(tidar_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor bias, int n_keys) -> Tensor");
  m.def("lora_add_(Tensor(a!) out, Tensor down, Tensor up_t, int row_start, int[] col_bounds, int[] rank_bounds) -> ()");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("rope_cache_(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int offset, int n_head) -> Tensor");
}

TORCH_LIBRARY_IMPL(tidar_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("lora_add_", &lora_add_);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_cache_", &rope_cache_);
}
