// llmc::rms_norm for CPU: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, one row per task;
// llmc::add_rms_norm: the residual add before it too. Inputs the kernel does not take (mixed dtypes,
// a broadcast residual) run the reference's ATen ops (plugins/norms.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "parallel.h"

namespace llmc::rms_norm_kernel {

template <typename scalar_t>
void rms_rows(const scalar_t* x, const scalar_t* w, scalar_t* y, int64_t rows, int64_t H, double eps) {
  llmc::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * H;
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      for (int64_t i = 0; i < H; ++i)  // round to x's dtype before the weight, as HF does
        y[r * H + i] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(static_cast<float>(xr[i]) * inv)) *
                                             static_cast<float>(w[i]));
    }
  });
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto h = x.to(at::kFloat);
  return w * (h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have a hidden dimension");
  if (x.scalar_type() != w.scalar_type() || !at::isFloatingType(x.scalar_type())) return rms_norm_reference(x, w, eps);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "rms_norm: weight has shape ", w.sizes(), " for ", H, " features");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, H, eps);
  });
  return y;
}

// h = x + residual (rounded to x's dtype, as torch's add), y = rms_norm(h) * w.
// Returns (y, h): the residual stream goes on, the normalised copy feeds the next block.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                                double eps) {
  if (x.sizes() != residual.sizes() || x.scalar_type() != residual.scalar_type() || !at::isFloatingType(x.scalar_type())) {
    auto h = x + residual;
    return {rms_norm(h, w, eps), h};
  }
  auto h = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto xc = x.contiguous(), rc = residual.contiguous();
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* a = xc.data_ptr<scalar_t>();
    const scalar_t* b = rc.data_ptr<scalar_t>();
    scalar_t* o = h.data_ptr<scalar_t>();
    llmc::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
    });
  });
  return {rms_norm(h, w, eps), h};
}

}  // namespace llmc::rms_norm_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) {
  m.impl("rms_norm", &llmc::rms_norm_kernel::rms_norm);
  m.impl("add_rms_norm", &llmc::rms_norm_kernel::add_rms_norm);
}
