// llmc::rotary_embedding for CPU: out = x * cos + rotate(x) * sin in one pass (rotary.h), for 4-D x of
// any strides (queries and keys arrive as transposed or sliced views) and cos / sin broadcast to it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "rotary.h"

at::Tensor rotary_embedding(at::Tensor x, at::Tensor cos, at::Tensor sin, bool interleaved) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary_embedding: x must be 4-D with an even last dimension");
  auto out = at::empty_like(x);
  auto c = cos.expand_as(x), s = sin.expand_as(x);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding", [&] {
    auto xa = x.accessor<scalar_t, 4>();
    auto ca = c.accessor<scalar_t, 4>();
    auto sa = s.accessor<scalar_t, 4>();
    auto oa = out.accessor<scalar_t, 4>();
    at::parallel_for(0, B * H * T, 64, [&](int64_t begin, int64_t end) {
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
