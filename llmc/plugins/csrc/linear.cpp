// llmc::linear for CPU at small batch (decode): y = x W^T + b with x [M, K], W [N, K], M small.
// Decode is bound by reading W; each thread streams a band of W's rows once and applies every row
// to all M inputs while it is in L1, so the weights cross the memory bus once per step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift of the bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

// out[m * N + r] = dot(x[m], w[r]) for MB inputs and NR weight rows at once: each 16 weights are
// loaded once and used MB times, and NR rows stream side by side (more loads in flight).
template <int MB, int NR, typename W>
inline void dots(const float* x, int64_t K, const W* w, int64_t N, float* out) {
  int64_t k = 0;
  float acc_tail[MB][NR] = {};
#ifdef __AVX512F__
  __m512 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = load16(w + r * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc_tail[m][r] = _mm512_reduce_add_ps(acc[m][r]);
#endif
  for (; k < K; ++k)
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < NR; ++r) acc_tail[m][r] += x[m * K + k] * static_cast<float>(w[r * K + k]);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) out[m * N + r] = acc_tail[m][r];
}

// Rows [n0, n1) of W against all M inputs, into y[m * N + n].
template <typename W>
inline void rows_times_inputs(const float* x, int64_t M, int64_t K, const W* w, int64_t N, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  // Row blocking pays when each weight is reused by several inputs; for one input (measured) the
  // single-row loop streams bf16 weights faster (its conversions do not crowd the FMAs).
  for (; M > 1 && n + 4 <= n1; n += 4) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dots<4, 4>(x + m * K, K, w + n * K, N, y + m * N + n);
    for (; m < M; ++m) dots<1, 4>(x + m * K, K, w + n * K, N, y + m * N + n);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) dots<1, 1>(x + m * K, K, w + n * K, N, y + m * N + n);
}

constexpr int64_t kMaxRows = 16;  // larger batches are GEMMs: torch's own kernels do those

template <typename scalar_t>
at::Tensor gemv(const at::Tensor& x2d, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x2d.size(0), K = x2d.size(1), N = w.size(0);
  auto xf = x2d.to(at::kFloat).contiguous();  // inputs are small; the weights stay as they are
  auto y = at::empty({M, N}, x2d.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  float* yp = y.data_ptr<float>();
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    rows_times_inputs(xp, M, K, wp, N, n0, n1, yp);
    if (bp)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] += bp[n];
  });
  return y.to(x2d.scalar_type());
}

}  // namespace

at::Tensor linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "linear: weight must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.size(-1) == w.size(1), "linear: input features ", x.size(-1), " != weight's ", w.size(1));
  auto x2d = x.reshape({-1, x.size(-1)});
  TORCH_CHECK(x2d.size(0) <= kMaxRows, "linear: the CPU kernel takes at most ", kMaxRows, " rows");
  at::Tensor y;
  if (w.scalar_type() == at::kFloat) y = gemv<float>(x2d, w, bias);
  else if (w.scalar_type() == at::kBFloat16) y = gemv<c10::BFloat16>(x2d, w, bias);
  else TORCH_CHECK(false, "linear: weights of dtype ", w.scalar_type(), " have no CPU kernel");
  auto shape = x.sizes().vec();
  shape.back() = w.size(0);
  return y.view(shape);
}
