// llmc::rms_norm for CPU: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, one row per task;
// llmc::add_rms_norm: the residual add before it too. Inputs the kernel does not take (mixed dtypes,
// a broadcast residual) run the reference's ATen ops (plugins/norms.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <cmath>
#include <tuple>
#include "parallel.h"

namespace llmc::rms_norm_kernel {

// Rows of H values: h = x + residual (rounded to x's dtype, as torch's add; with no residual h is x), then
// y = (h * rsqrt(mean(h^2) + eps)).to(x.dtype) * w, rounded to x's dtype before the weight, as HF does. Vectorized
// in fp32 (ATen's Vectorized: bf16 and fp16 widened and rounded back to nearest even, as torch's ops round them).
template <typename scalar_t>
void rms_rows(const scalar_t* x, const scalar_t* residual, const scalar_t* w, scalar_t* h, scalar_t* y, int64_t rows,
              int64_t H, double eps) {
  using Vec = at::vec::Vectorized<float>;
  using VecT = at::vec::Vectorized<scalar_t>;
  constexpr int64_t step = VecT::size();
  constexpr bool reduced = at::is_reduced_floating_point_v<scalar_t>;
  llmc::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = residual ? h + r * H : x + r * H;
      Vec squares(0.f);
      for (int64_t i = 0; i < H; i += step) {
        const int64_t n = std::min(step, H - i);
        VecT v = VecT::loadu(x + r * H + i, n);  // zeros past n
        if (residual) {
          v = v + VecT::loadu(residual + r * H + i, n);
          v.store(h + r * H + i, n);
        }
        if constexpr (reduced) {
          auto [a, b] = at::vec::convert_to_float<scalar_t>(v);
          squares = at::vec::fmadd(b, b, at::vec::fmadd(a, a, squares));
        } else {
          squares = at::vec::fmadd(v, v, squares);
        }
      }
      const float sum = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, squares);
      const Vec inv(1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps)));
      for (int64_t i = 0; i < H; i += step) {
        const int64_t n = std::min(step, H - i);
        const VecT v = VecT::loadu(xr + i, n), wv = VecT::loadu(w + i, n);
        if constexpr (reduced) {
          auto [a, b] = at::vec::convert_to_float<scalar_t>(v);
          auto [wa, wb] = at::vec::convert_to_float<scalar_t>(wv);
          auto [na, nb] = at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(a * inv, b * inv));
          at::vec::convert_from_float<scalar_t>(na * wa, nb * wb).store(y + r * H + i, n);
        } else {
          (v * inv * wv).store(y + r * H + i, n);
        }
      }
    }
  });
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto h = x.to(at::kFloat);
  return w * (h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
}

// The dtypes the kernel takes (x's and w's alike); others run the reference's ATen ops.
bool takes(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// y = rms_norm(x + residual) * w and h = x + residual where a residual is given (h undefined without one).
std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& w,
                                        double eps) {
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "rms_norm: weight has shape ", w.sizes(), " for ", H, " features");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto rc = residual ? residual->contiguous() : at::Tensor();
  auto h = residual ? at::empty_like(xc) : at::Tensor();
  auto y = at::empty_like(xc);
  const auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), residual ? rc.data_ptr<scalar_t>() : nullptr, wc.data_ptr<scalar_t>(),
                       residual ? h.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), rows, H, eps);
  };
  if (x.scalar_type() == at::kFloat) run(float{});
  else if (x.scalar_type() == at::kBFloat16) run(c10::BFloat16{});
  else run(c10::Half{});
  return {y, h};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have a hidden dimension");
  if (x.scalar_type() != w.scalar_type() || !takes(x.scalar_type())) return rms_norm_reference(x, w, eps);
  return std::get<0>(norm(x, c10::nullopt, w, eps));
}

// Returns (y, h): the residual stream h = x + residual goes on, the normalised copy y feeds the next block.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                                double eps) {
  if (x.dim() == 0 || x.sizes() != residual.sizes() || x.scalar_type() != residual.scalar_type() ||
      x.scalar_type() != w.scalar_type() || !takes(x.scalar_type())) {
    auto h = x + residual;
    return {rms_norm(h, w, eps), h};
  }
  return norm(x, residual, w, eps);
}

}  // namespace llmc::rms_norm_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) {
  m.impl("rms_norm", &llmc::rms_norm_kernel::rms_norm);
  m.impl("add_rms_norm", &llmc::rms_norm_kernel::add_rms_norm);
}
