// llmc::rms_norm for CPU: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, one row per task.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

template <typename scalar_t>
static void rms_rows(const scalar_t* x, const scalar_t* w, scalar_t* y, int64_t rows, int64_t H, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
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

at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight must have one dtype");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty_like(xc);
  const int64_t H = x.size(-1), rows = x.numel() / H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, H, eps);
  });
  return y;
}

// llmc::add_rms_norm: h = x + residual (rounded to x's dtype, as torch's add), y = rms_norm(h) * w.
// Returns (y, h): the residual stream goes on, the normalised copy feeds the next block.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor w, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(), "add_rms_norm: x and residual must match");
  auto h = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto xc = x.contiguous(), rc = residual.contiguous();
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* a = xc.data_ptr<scalar_t>();
    const scalar_t* b = rc.data_ptr<scalar_t>();
    scalar_t* o = h.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
    });
  });
  return {rms_norm(h, w, eps), h};
}
