// llmc::prepacked_linear for CPU: y = x W^T + b with W prepacked at load time into column blocks of
// 16 output features (llmc/plugins/linear.py, `prepack_weight`):
//   fp32: [N/16, K, 16]           block[k][j] = W[16 b + j][k]
//   bf16: [N/16, K/2, 16, 2]      block[k/2][j][k%2] = W[16 b + j][k]   (the pairs AVX512-BF16 multiplies)
// Each step of the inner loop loads 16 outputs' weights for one k (one cache line, read in order)
// and applies them to up to 8 rows of x with broadcast FMAs into 8 x NB vector accumulators. No
// horizontal sums, and a weight is read from memory once per step however many rows there are, so
// the same kernel serves decode (bound by reading W) and prefill (bound by FMAs, about torch's GEMM).
// Written with ATen's Vectorized, so one source serves every ISA level (setup.py); the BF16 dot products
// use AVX512-BF16's instruction where the level has it, and AMX tiles (amx.h) for two rows or more where the CPU
// has them: the bf16 layout is their B operand as it is.
// Inputs the kernel does not take (x and W of different dtypes, other weight dtypes) run the reference's
// unpacking and at::linear (plugins/linear.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#include "blocked_gemm.h"
#include "parallel.h"
#ifdef __AVX512BF16__
#include <immintrin.h>
#include "amx.h"
#endif

namespace llmc {
namespace linear_kernel {

using Vec = at::vec::Vectorized<float>;  // 16 lanes with AVX-512, 8 with AVX2 and in ATen's portable loops
constexpr int64_t kBlock = 16;            // output features per block
constexpr int kVecs = kBlock / Vec::size();
static_assert(kBlock % Vec::size() == 0, "a block is a whole number of vectors");

// Rows of x per tile, and column blocks per tile: more blocks keep more loads in flight when there are few
// rows; with many rows, fewer keep the rows x blocks x kVecs accumulators in registers (32 with AVX-512, 16 else).
#ifdef CPU_CAPABILITY_AVX512
constexpr int kMaxRows = 8;
constexpr int blocks_for(int rows) { return rows <= 4 ? 4 : 3; }
#else
constexpr int kMaxRows = 4;
constexpr int blocks_for(int rows) { return rows <= 2 ? 2 : 1; }
#endif

// acc[m][b * kVecs + v] += x[m] . block b's outputs v * Vec::size() onwards, over all of K. `w` points at the
// first block, `stride` apart.
template <int MB, int NB>
inline void tile(const float* x, int64_t ldx, int64_t K, const float* w, int64_t stride, Vec (&acc)[MB][NB * kVecs]) {
  for (int64_t k = 0; k < K; ++k) {
    Vec wv[NB * kVecs];
    for (int b = 0; b < NB; ++b)
      for (int v = 0; v < kVecs; ++v) wv[b * kVecs + v] = Vec::loadu(w + b * stride + k * kBlock + v * Vec::size());
    for (int m = 0; m < MB; ++m) {
      const Vec xv(x[m * ldx + k]);
      for (int i = 0; i < NB * kVecs; ++i) acc[m][i] = at::vec::fmadd(xv, wv[i], acc[m][i]);
    }
  }
}

template <int MB, int NB>
inline void tile(const c10::BFloat16* x, int64_t ldx, int64_t K, const c10::BFloat16* w, int64_t stride,
                 Vec (&acc)[MB][NB * kVecs]) {
  const int64_t pairs = K / 2;  // K is even: prepacking pads it
#ifdef __AVX512BF16__
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * stride + k2 * 2 * kBlock);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * k2, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, (__m512bh)wv[b]);
    }
  }
#else  // bf16 -> fp32 is a 16-bit shift: even k in the low halves of the pairs, odd k in the high halves
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec shift(16), high(static_cast<int32_t>(0xFFFF0000));
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    IVec wv[NB * kVecs];
    for (int b = 0; b < NB; ++b)
      for (int v = 0; v < kVecs; ++v)
        wv[b * kVecs + v] = IVec::loadu(w + b * stride + k2 * 2 * kBlock + v * 2 * Vec::size());
    for (int m = 0; m < MB; ++m) {
      const Vec x0(static_cast<float>(x[m * ldx + 2 * k2])), x1(static_cast<float>(x[m * ldx + 2 * k2 + 1]));
      for (int i = 0; i < NB * kVecs; ++i) {
        const Vec lo = at::vec::cast<float>(wv[i] << shift), hi = at::vec::cast<float>(wv[i] & high);
        acc[m][i] = at::vec::fmadd(x1, hi, at::vec::fmadd(x0, lo, acc[m][i]));
      }
    }
  }
#endif
}

inline void store_lanes(float* y, const Vec& v, int64_t count) { v.store(y, count); }
inline void store_lanes(c10::BFloat16* y, const Vec& v, int64_t count) {  // rounded to nearest even, in the kernel:
#ifdef __AVX512BF16__                                                      // no fp32 copy of a prefill's output
  _mm256_mask_storeu_epi16(y, static_cast<__mmask16>((1u << count) - 1), (__m256i)_mm512_cvtneps_pbh(v));
#else
  float f[Vec::size()];
  v.store(f);
  for (int64_t j = 0; j < count; ++j) y[j] = static_cast<c10::BFloat16>(f[j]);
#endif
}

// y[m][n0 : n0 + 16 NB] (clipped to N) = acc + bias.
template <int MB, int NB, typename Y>
inline void store(Vec (&acc)[MB][NB * kVecs], const float* bias, Y* y, int64_t ldy, int64_t n0, int64_t N) {
  for (int i = 0; i < NB * kVecs; ++i) {
    const int64_t n = n0 + i * Vec::size(), count = std::min<int64_t>(Vec::size(), N - n);
    if (count <= 0) return;
    const Vec bv = bias ? Vec::loadu(bias + n, count) : Vec(0.f);
    for (int m = 0; m < MB; ++m) store_lanes(y + m * ldy + n, acc[m][i] + bv, count);
  }
}

template <int MB, int NB, typename T, typename Y>
void rows_times_blocks(const T* x, int64_t K, const T* w, int64_t stride, const float* bias, Y* y,
                       int64_t N, int64_t n0) {
  Vec acc[MB][NB * kVecs];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < NB * kVecs; ++i) acc[m][i] = Vec(0.f);
  tile<MB, NB>(x, K, K, w, stride, acc);
  store<MB, NB>(acc, bias, y, N, n0, N);
}

// A tile of mb (<= MB) rows against nb (<= NB) column blocks: the last rows and columns may be short.
template <int MB, int NB, typename T, typename Y>
void tile_dispatch(int64_t mb, int nb, const T* x, int64_t K, const T* w, int64_t stride, const float* bias, Y* y,
                   int64_t N, int64_t n0) {
  if constexpr (MB > 1)
    if (mb < MB) return tile_dispatch<MB - 1, NB>(mb, nb, x, K, w, stride, bias, y, N, n0);
  if constexpr (NB > 1)
    if (nb < NB) return tile_dispatch<MB, NB - 1>(mb, nb, x, K, w, stride, bias, y, N, n0);
  rows_times_blocks<MB, NB>(x, K, w, stride, bias, y, N, n0);
}

#ifdef __AVX512BF16__
// Rows from which bf16 products run on AMX tiles where the CPU has them (amx.h). One row streams W about 5 % faster
// through the vector tiles (batch-1 decode); from two rows on, the AMX tiles are faster (docs/performance-history.md).
constexpr int64_t kAmxRows = 2;
// Column blocks a thread runs for each 32 rows before the next ones: their part of W (16 blocks x K x 32 bytes,
// 384 KB at K = 768) stays in L2 across all the rows, each 32 rows of x in L1 across the blocks.
constexpr int64_t kAmxChunk = 16;

// gemm_columns on AMX tiles: panels of up to 32 rows x 2 column blocks over all K (a multiple of amx::kChunk).
template <typename Y>
void amx_gemm_columns(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, int64_t stride,
                      int64_t blocks, const float* bias, Y* y, int64_t N, int64_t n0) {
  constexpr int64_t R = amx::kRows;
  amx::Tiles tiles;
  float out[2][2][R * kBlock];
  for (int64_t chunk = 0; chunk < blocks; chunk += kAmxChunk) {
    const int64_t chunk_end = std::min(blocks, chunk + kAmxChunk);
    for (int64_t m = 0; m < M; m += 2 * R) {
      const int rows0 = static_cast<int>(std::min(R, M - m)), rows1 = static_cast<int>(std::clamp<int64_t>(M - m - R, 0, R));
      tiles.configure(rows0, rows1);
      for (int64_t b = chunk; b < chunk_end; b += 2) {
        const int nb = static_cast<int>(std::min<int64_t>(2, chunk_end - b));
        amx::panel(rows1 ? 2 : 1, nb, x + m * K, K, w + b * stride, stride, out);
        for (int j = 0; j < nb; ++j) {
          const int64_t n = n0 + (b + j) * kBlock, count = std::min<int64_t>(kBlock, N - n);
          if (count <= 0) break;
          const Vec bv = bias ? Vec::loadu(bias + n, count) : Vec(0.f);
          for (int64_t r = 0; r < rows0 + rows1; ++r)
            store_lanes(y + (m + r) * N + n, Vec::loadu(out[r / R][j] + (r % R) * kBlock) + bv, count);
        }
      }
    }
  }
}
#endif

// All M rows against `blocks` consecutive column blocks (w at the first, `stride` apart), into y[:, n0 : n0 + 16 blocks]
// clipped to N. Serial: callers split the columns among threads.
template <typename T, typename Y>
void gemm_columns(const T* x, int64_t M, int64_t K, const T* w, int64_t stride, int64_t blocks, const float* bias, Y* y,
                  int64_t N, int64_t n0) {
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (M >= kAmxRows && K % amx::kChunk == 0 && amx::available())
      return amx_gemm_columns(x, M, K, w, stride, blocks, bias, y, N, n0);
#endif
  const int nb = blocks_for(static_cast<int>(std::min<int64_t>(M, kMaxRows)));
  for (int64_t b = 0; b < blocks; b += nb)
    for (int64_t m = 0; m < M; m += kMaxRows)
      tile_dispatch<kMaxRows, blocks_for(1)>(std::min<int64_t>(kMaxRows, M - m), static_cast<int>(std::min<int64_t>(nb, blocks - b)),
                                             x + m * K, K, w + b * stride, stride, bias, y + m * N, N, n0 + b * kBlock);
}

// Without bf16 dot products (below AVX512-BF16) the bf16 tile widens each weight in its inner loop, once per tile
// of rows: with many rows, widening x once and each column block once, then the fp32 tile, is about twice as fast
// (docs/performance-history.md). The same products summed in the same order: the same result.
#ifdef __AVX512BF16__
constexpr int64_t kWidenRows = INT64_MAX;
#else
constexpr int64_t kWidenRows = 32;
#endif

void widened_gemm(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, const float* bias,
                  c10::BFloat16* y, int64_t N) {
  const int64_t num_blocks = (N + kBlock - 1) / kBlock, stride = K * kBlock;
  const int nb = blocks_for(kMaxRows);
  std::vector<float> xf(M * K);
  llmc::parallel_for(0, M * K, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) xf[i] = static_cast<float>(x[i]);
  });
  llmc::parallel_for(0, (num_blocks + nb - 1) / nb, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> wf(nb * stride);
    for (int64_t first = g0 * nb; first < std::min(g1 * nb, num_blocks); first += nb) {
      const int64_t blocks = std::min<int64_t>(nb, num_blocks - first);
      for (int64_t b = 0; b < blocks; ++b)  // [K / 2][16][2] pairs -> [K][16]
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < kBlock; ++j)
            wf[b * stride + k * kBlock + j] = static_cast<float>(w[(first + b) * stride + ((k / 2) * kBlock + j) * 2 + k % 2]);
      gemm_columns(xf.data(), M, K, wf.data(), stride, blocks, bias, y, N, first * kBlock);
    }
  });
}

template <typename T>
void blocked_gemm(const T* x, int64_t M, int64_t K, const T* w, const float* bias, T* y, int64_t N) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (M >= kWidenRows) return widened_gemm(x, M, K, w, bias, y, N);
  const int64_t num_blocks = (N + kBlock - 1) / kBlock, stride = K * kBlock;
  const int nb = blocks_for(static_cast<int>(std::min<int64_t>(M, kMaxRows)));
  // Threads split the columns: each streams its own contiguous part of W, once, for all rows.
  llmc::parallel_for(0, (num_blocks + nb - 1) / nb, 1, [&](int64_t g0, int64_t g1) {
    const int64_t first = g0 * nb, blocks = std::min(g1 * nb, num_blocks) - first;
    gemm_columns(x, M, K, w + first * stride, stride, blocks, bias, y, N, first * kBlock);
  });
}

// The reference's unpack_weight: [N, K] from the prepacked layout.
at::Tensor unpack_weight(const at::Tensor& w, int64_t N, int64_t K) {
  auto blocks = w.dim() == 4 ? w.transpose(2, 3).flatten(1, 2) : w;  // bf16 pairs
  return blocks.transpose(1, 2).flatten(0, 1).slice(0, 0, N).slice(1, 0, K);
}

at::Tensor prepacked_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                            int64_t out_features) {
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() >= 1, "prepacked_linear: x must have a features dimension");
  TORCH_CHECK(w.dim() == (bf16 ? 4 : 3) && w.size(2) == kBlock && (!bf16 || w.size(3) == 2),
              "prepacked_linear: weight ", w.sizes(), " is not in the prepacked layout (plugins/linear.py)");
  const int64_t K = bf16 ? 2 * w.size(1) : w.size(1), N = out_features, in = x.size(-1);
  TORCH_CHECK(in <= K && K - in < (bf16 ? 2 : 1), "prepacked_linear: input features ", in, " do not match the weight's ", K);
  TORCH_CHECK(0 <= N && N <= w.size(0) * kBlock, "prepacked_linear: out_features ", N, " exceeds the weight's ",
              w.size(0) * kBlock);
  const bool with_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!with_bias || (bias->dim() == 1 && bias->size(0) == N), "prepacked_linear: bias has shape ",
              with_bias ? bias->sizes() : at::IntArrayRef{}, " for ", N, " outputs");
  if (x.scalar_type() != w.scalar_type() || !(bf16 || w.scalar_type() == at::kFloat))
    return at::linear(x, unpack_weight(w, N, in).to(x.scalar_type()), bias);
  const int64_t M = x.numel() / std::max<int64_t>(in, 1);
  auto x2d = x.reshape({M, in});
  if (in != K) x2d = at::constant_pad_nd(x2d, {0, K - in});  // bf16 pairs: K padded to even
  x2d = x2d.contiguous();
  auto wc = w.contiguous();
  at::Tensor b32;
  if (with_bias) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  auto y = at::empty({M, N}, x2d.options());
  if (M > 0 && N > 0) {
    if (bf16)
      blocked_gemm(x2d.data_ptr<c10::BFloat16>(), M, K, wc.data_ptr<c10::BFloat16>(), bp, y.data_ptr<c10::BFloat16>(), N);
    else
      blocked_gemm(x2d.data_ptr<float>(), M, K, wc.data_ptr<float>(), bp, y.data_ptr<float>(), N);
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace linear_kernel

void blocked_gemm_columns(const float* x, int64_t M, int64_t K, const float* w, int64_t blocks, const float* bias,
                          float* y, int64_t N, int64_t n0) {
  linear_kernel::gemm_columns(x, M, K, w, K * linear_kernel::kBlock, blocks, bias, y, N, n0);
}

void blocked_gemm_columns(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, int64_t blocks,
                          const float* bias, c10::BFloat16* y, int64_t N, int64_t n0) {
  linear_kernel::gemm_columns(x, M, K, w, K * linear_kernel::kBlock, blocks, bias, y, N, n0);
}

void blocked_gemm_columns(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, int64_t blocks,
                          const float* bias, float* y, int64_t N, int64_t n0) {
  linear_kernel::gemm_columns(x, M, K, w, K * linear_kernel::kBlock, blocks, bias, y, N, n0);
}

int64_t blocked_gemm_group(int64_t rows) {
  return linear_kernel::blocks_for(static_cast<int>(std::min<int64_t>(rows, linear_kernel::kMaxRows)));
}

}  // namespace llmc

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("prepacked_linear", &llmc::linear_kernel::prepacked_linear); }
