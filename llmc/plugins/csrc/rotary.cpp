// llmc::rotary_embedding for CPU: out = x * cos + rotate(x) * sin in one pass (rotary.h), for 4-D x of
// any strides (queries and keys arrive as transposed or sliced views) and cos / sin broadcast to it.
// Other inputs (not 4-D, an odd last dimension, mixed dtypes) run the reference's ATen ops (plugins/rotary.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "rotary.h"
#include "parallel.h"

namespace llmc::rotary_kernel {

at::Tensor rotary_embedding_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "rotary_embedding: x's last dimension must be even, got ", x.sizes());
  at::Tensor rotated;
  if (interleaved) {
    auto even = x.slice(-1, 0, c10::nullopt, 2), odd = x.slice(-1, 1, c10::nullopt, 2);
    rotated = at::stack({-odd, even}, -1).flatten(-2);
  } else {
    const int64_t half = x.size(-1) / 2;
    rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  }
  return x * cos + rotated * sin;
}

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  if (x.dim() != 4 || x.size(3) % 2 || x.scalar_type() != cos.scalar_type() || x.scalar_type() != sin.scalar_type() ||
      !at::isFloatingType(x.scalar_type()))
    return rotary_embedding_reference(x, cos, sin, interleaved);
  auto out = at::empty_like(x);
  auto c = cos.expand_as(x), s = sin.expand_as(x);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding", [&] {
    auto xa = x.accessor<scalar_t, 4>();
    auto ca = c.accessor<scalar_t, 4>();
    auto sa = s.accessor<scalar_t, 4>();
    auto oa = out.accessor<scalar_t, 4>();
    llmc::parallel_for(0, B * H * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (H * T), h = i / T % H, t = i % T;
        for (int64_t d = 0; d < D; ++d)
          oa[b][h][t][d] = rope_channel<scalar_t>(xa[b][h][t], d, D, interleaved, static_cast<float>(ca[b][h][t][d]),
                                                  static_cast<float>(sa[b][h][t][d]));
      }
    });
  });
  return out;
}

}  // namespace llmc::rotary_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("rotary_embedding", &llmc::rotary_kernel::rotary_embedding); }
