// llmc::rotary_embedding for CPU: out = x * cos + rotate(x) * sin in one pass, for 4-D x of any strides
// (queries and keys arrive as transposed or sliced views) and cos / sin broadcast to it. rotate pairs
// channel d with d + D/2 (rotate-half) or with d ^ 1 (interleaved); the first of a pair takes its
// partner negated, the second takes its partner.
#include <torch/extension.h>
#include <ATen/Parallel.h>

at::Tensor rotary_embedding(at::Tensor x, at::Tensor cos, at::Tensor sin, bool interleaved) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary_embedding: x must be 4-D with an even last dimension");
  auto out = at::empty_like(x);
  auto c = cos.expand_as(x), s = sin.expand_as(x);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding", [&] {
    auto xa = x.accessor<scalar_t, 4>();
    auto ca = c.accessor<scalar_t, 4>();
    auto sa = s.accessor<scalar_t, 4>();
    auto oa = out.accessor<scalar_t, 4>();
    at::parallel_for(0, B * H * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (H * T), h = i / T % H, t = i % T;
        for (int64_t d = 0; d < D; ++d) {
          const bool first = interleaved ? d % 2 == 0 : d < half;
          const int64_t partner = interleaved ? d ^ 1 : (first ? d + half : d - half);
          const float rotated = first ? -static_cast<float>(xa[b][h][t][partner]) : static_cast<float>(xa[b][h][t][partner]);
          // Rounded to scalar_t after each op, as the reference's torch ops round (bf16, fp16).
          const scalar_t straight = static_cast<float>(xa[b][h][t][d]) * static_cast<float>(ca[b][h][t][d]);
          const scalar_t turned = rotated * static_cast<float>(sa[b][h][t][d]);
          oa[b][h][t][d] = static_cast<float>(straight) + static_cast<float>(turned);
        }
      }
    });
  });
  return out;
}
