// llmc::prepacked_linear for CPU: y = x W^T + b with W prepacked at load time into column blocks of
// 16 output features (llmc/plugins/linear.py, `prepack_weight`):
//   fp32: [N/16, K, 16]           block[k][j] = W[16 b + j][k]
//   bf16: [N/16, K/2, 16, 2]      block[k/2][j][k%2] = W[16 b + j][k]   (the pairs AVX512-BF16 multiplies)
// Each step of the inner loop loads 16 outputs' weights for one k (one cache line, read in order)
// and applies them to up to 8 rows of x with broadcast FMAs into 8 x NB vector accumulators. No
// horizontal sums, and a weight is read from memory once per step however many rows there are, so
// the same kernel serves decode (bound by reading W) and prefill (bound by FMAs, about torch's GEMM).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include "blocked_gemm.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 16;  // output features per block: one vector of fp32
constexpr int kMaxRows = 8;     // rows of x per tile

// Column blocks per tile: more blocks keep more loads in flight when there are few rows; with many
// rows, fewer keep the accumulators in registers (rows x blocks <= 24 of the 32 vector registers).
constexpr int blocks_for(int rows) { return rows <= 4 ? 4 : 3; }

#ifdef __AVX512F__
// acc[m][b] += x[m] . block b, over all of K. `w` points at the first block, `stride` apart.
template <int MB, int NB>
inline void tile(const float* x, int64_t ldx, int64_t K, const float* w, int64_t stride, __m512 (&acc)[MB][NB]) {
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(w + b * stride + k * kBlock);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(xv, wv[b], acc[m][b]);
    }
  }
}

template <int MB, int NB>
inline void tile(const c10::BFloat16* x, int64_t ldx, int64_t K, const c10::BFloat16* w, int64_t stride,
                 __m512 (&acc)[MB][NB]) {
  const int64_t pairs = K / 2;  // K is even: prepacking pads it
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * stride + k2 * 2 * kBlock);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * k2, sizeof(pair));
#ifdef __AVX512BF16__
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, (__m512bh)wv[b]);
#else  // bf16 -> fp32 is a 16-bit shift: even k in the low halves, odd k in the high halves
      const __m512 x0 = _mm512_set1_ps(static_cast<float>(x[m * ldx + 2 * k2]));
      const __m512 x1 = _mm512_set1_ps(static_cast<float>(x[m * ldx + 2 * k2 + 1]));
      for (int b = 0; b < NB; ++b) {
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(wv[b], 16));
        const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(wv[b], _mm512_set1_epi32(0xFFFF0000)));
        acc[m][b] = _mm512_fmadd_ps(x1, hi, _mm512_fmadd_ps(x0, lo, acc[m][b]));
      }
#endif
    }
  }
}

inline void store16(float* y, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(y, mask, v); }
inline void store16(c10::BFloat16* y, __mmask16 mask, __m512 v) {  // rounded to nearest even, in the kernel:
#ifdef __AVX512BF16__                                              // no fp32 copy of a prefill's output
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
#else
  float f[kBlock];
  _mm512_storeu_ps(f, v);
  for (int j = 0; j < kBlock; ++j)
    if (mask >> j & 1) y[j] = static_cast<c10::BFloat16>(f[j]);
#endif
}

// y[m][n0 : n0 + 16 NB] (clipped to N) = acc + bias.
template <int MB, int NB, typename T>
inline void store(__m512 (&acc)[MB][NB], const float* bias, T* y, int64_t ldy, int64_t n0, int64_t N) {
  for (int b = 0; b < NB; ++b) {
    const int64_t n = n0 + b * kBlock;
    const __mmask16 mask = N - n >= kBlock ? 0xFFFF : static_cast<__mmask16>((1u << (N - n)) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) store16(y + m * ldy + n, mask, _mm512_add_ps(acc[m][b], bv));
  }
}

template <int MB, int NB, typename T>
void rows_times_blocks(const T* x, int64_t K, const T* w, int64_t stride, const float* bias, T* y,
                       int64_t N, int64_t n0) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  tile<MB, NB>(x, K, K, w, stride, acc);
  store<MB, NB>(acc, bias, y, N, n0, N);
}
#else
// Portable fallback: the same blocked layout, in scalar loops.
template <int MB, int NB, typename T>
void rows_times_blocks(const T* x, int64_t K, const T* w, int64_t stride, const float* bias, T* y,
                       int64_t N, int64_t n0) {
  const bool bf16 = std::is_same_v<T, c10::BFloat16>;
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b)
      for (int64_t j = 0; j < kBlock && n0 + b * kBlock + j < N; ++j) {
        const int64_t n = n0 + b * kBlock + j;
        float acc = bias ? bias[n] : 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = bf16 ? (k / 2) * 2 * kBlock + j * 2 + k % 2 : k * kBlock + j;
          acc += static_cast<float>(x[m * K + k]) * static_cast<float>(w[b * stride + at]);
        }
        y[m * N + n] = static_cast<T>(acc);
      }
}
#endif

// One tile of MB rows against nb (<= NB) column blocks: the last group of columns may be short.
template <int MB, typename T>
void tile_dispatch(int nb, const T* x, int64_t K, const T* w, int64_t stride, const float* bias, T* y, int64_t N,
                   int64_t n0) {
  switch (nb) {
    case 4: return rows_times_blocks<MB, 4>(x, K, w, stride, bias, y, N, n0);
    case 3: return rows_times_blocks<MB, 3>(x, K, w, stride, bias, y, N, n0);
    case 2: return rows_times_blocks<MB, 2>(x, K, w, stride, bias, y, N, n0);
    default: return rows_times_blocks<MB, 1>(x, K, w, stride, bias, y, N, n0);
  }
}

template <typename T>
void rows_dispatch(int64_t mb, int nb, const T* x, int64_t K, const T* w, int64_t stride, const float* bias, T* y,
                   int64_t N, int64_t n0) {
  switch (mb) {
    case 8: return tile_dispatch<8>(nb, x, K, w, stride, bias, y, N, n0);
    case 7: return tile_dispatch<7>(nb, x, K, w, stride, bias, y, N, n0);
    case 6: return tile_dispatch<6>(nb, x, K, w, stride, bias, y, N, n0);
    case 5: return tile_dispatch<5>(nb, x, K, w, stride, bias, y, N, n0);
    case 4: return tile_dispatch<4>(nb, x, K, w, stride, bias, y, N, n0);
    case 3: return tile_dispatch<3>(nb, x, K, w, stride, bias, y, N, n0);
    case 2: return tile_dispatch<2>(nb, x, K, w, stride, bias, y, N, n0);
    default: return tile_dispatch<1>(nb, x, K, w, stride, bias, y, N, n0);
  }
}

// All M rows against `blocks` consecutive column blocks (w at the first, `stride` apart), into y[:, n0 : n0 + 16 blocks]
// clipped to N. Serial: callers split the columns among threads.
template <typename T>
void gemm_columns(const T* x, int64_t M, int64_t K, const T* w, int64_t stride, int64_t blocks, const float* bias, T* y,
                  int64_t N, int64_t n0) {
  const int nb = blocks_for(static_cast<int>(std::min<int64_t>(M, kMaxRows)));
  for (int64_t b = 0; b < blocks; b += nb)
    for (int64_t m = 0; m < M; m += kMaxRows)
      rows_dispatch(std::min<int64_t>(kMaxRows, M - m), static_cast<int>(std::min<int64_t>(nb, blocks - b)), x + m * K, K,
                    w + b * stride, stride, bias, y + m * N, N, n0 + b * kBlock);
}

template <typename T>
void blocked_gemm(const T* x, int64_t M, int64_t K, const T* w, const float* bias, T* y, int64_t N) {
  const int64_t num_blocks = (N + kBlock - 1) / kBlock, stride = K * kBlock;
  const int nb = blocks_for(static_cast<int>(std::min<int64_t>(M, kMaxRows)));
  // Threads split the columns: each streams its own contiguous part of W, once, for all rows.
  at::parallel_for(0, (num_blocks + nb - 1) / nb, 1, [&](int64_t g0, int64_t g1) {
    const int64_t first = g0 * nb, blocks = std::min(g1 * nb, num_blocks) - first;
    gemm_columns(x, M, K, w + first * stride, stride, blocks, bias, y, N, first * kBlock);
  });
}

}  // namespace

void blocked_gemm_columns(const float* x, int64_t M, int64_t K, const float* w, int64_t blocks, const float* bias,
                          float* y, int64_t N, int64_t n0) {
  gemm_columns(x, M, K, w, K * kBlock, blocks, bias, y, N, n0);
}

at::Tensor prepacked_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, int64_t out_features) {
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(w.scalar_type() == at::kFloat || bf16, "prepacked_linear: weights of dtype ", w.scalar_type(),
              " have no CPU kernel");
  TORCH_CHECK(w.is_contiguous() && w.dim() == (bf16 ? 4 : 3) && w.size(2) == kBlock,
              "prepacked_linear: weight is not in the prepacked layout");
  const int64_t K = bf16 ? 2 * w.size(1) : w.size(1), N = out_features, M = x.numel() / x.size(-1);
  TORCH_CHECK(x.size(-1) <= K && K - x.size(-1) < (bf16 ? 2 : 1), "prepacked_linear: input features ", x.size(-1),
              " do not match the weight's ", K);
  TORCH_CHECK(N <= w.size(0) * kBlock, "prepacked_linear: out_features ", N, " exceeds the weight's");
  auto x2d = x.reshape({M, x.size(-1)}).to(w.scalar_type());
  if (x2d.size(1) != K) x2d = at::constant_pad_nd(x2d, {0, K - x2d.size(1)});  // bf16 pairs: K padded to even
  x2d = x2d.contiguous();
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  auto y = at::empty({M, N}, x2d.options());
  if (bf16)
    blocked_gemm(x2d.data_ptr<c10::BFloat16>(), M, K, w.data_ptr<c10::BFloat16>(), bp, y.data_ptr<c10::BFloat16>(), N);
  else
    blocked_gemm(x2d.data_ptr<float>(), M, K, w.data_ptr<float>(), bp, y.data_ptr<float>(), N);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}
