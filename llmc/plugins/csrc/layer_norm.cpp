// llmc::add_layer_norm for CPU: h = x + residual (rounded to x's dtype, as torch's add), then
// y = (h - mean) * rsqrt(var + eps) * w + b per row, in fp32 (as torch's layer_norm accumulates).
// Returns (y, h): the residual stream goes on, the normalised copy feeds the next block. Inputs the
// kernel does not take (mixed dtypes, a broadcast residual) run the reference's ATen ops (plugins/norms.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "parallel.h"

namespace llmc::layer_norm_kernel {

// Sums in kLanes independent partial sums, so the compiler vectorizes them (no -ffast-math needed).
constexpr int64_t kLanes = 16;

template <typename F>
float lane_sum(int64_t n, F term) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += term(i + j);
  for (; i < n; ++i) acc[0] += term(i);
  float total = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

template <typename scalar_t>
void add_layer_norm_rows(const scalar_t* x, const scalar_t* r, const scalar_t* w, const scalar_t* b, scalar_t* h,
                         scalar_t* y, int64_t rows, int64_t H, float eps) {
  llmc::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const scalar_t* xr = x + row * H;
      const scalar_t* rr = r + row * H;
      scalar_t* hr = h + row * H;
      scalar_t* yr = y + row * H;
      for (int64_t i = 0; i < H; ++i) hr[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      const float mean = lane_sum(H, [&](int64_t i) { return static_cast<float>(hr[i]); }) / static_cast<float>(H);
      // Two passes over a row in cache: as exact as Welford, and simpler.
      const float var = lane_sum(H, [&](int64_t i) {
        const float d = static_cast<float>(hr[i]) - mean;
        return d * d;
      }) / static_cast<float>(H);
      const float rstd = 1.f / std::sqrt(var + eps);
      for (int64_t i = 0; i < H; ++i)
        yr[i] = static_cast<scalar_t>((static_cast<float>(hr[i]) - mean) * rstd * static_cast<float>(w[i]) + static_cast<float>(b[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                                  const at::Tensor& b, double eps) {
  const auto dtype = x.scalar_type();
  if (x.sizes() != residual.sizes() || residual.scalar_type() != dtype || w.scalar_type() != dtype ||
      b.scalar_type() != dtype || !at::isFloatingType(dtype) || x.dim() == 0) {
    auto h = x + residual;
    return {at::layer_norm(h, {h.size(-1)}, w, b, eps), h};
  }
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H && b.dim() == 1 && b.size(0) == H, "add_layer_norm: weight ", w.sizes(),
              " and bias ", b.sizes(), " must have ", H, " features");
  auto xc = x.contiguous(), rc = residual.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  auto h = at::empty_like(xc), y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "add_layer_norm", [&] {
    add_layer_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                  bc.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, H,
                                  static_cast<float>(eps));
  });
  return {y, h};
}

}  // namespace llmc::layer_norm_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("add_layer_norm", &llmc::layer_norm_kernel::add_layer_norm); }
