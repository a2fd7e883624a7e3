// One channel of RoPE, shared by llmc::rotary_embedding and llmc::paged_attention (which folds RoPE in),
// so the fused and the separate op round alike: x * cos + rotate(x) * sin, rounded to scalar_t after
// each op as the reference's torch ops round (bf16, fp16). rotate pairs channel d of the first
// `rotary_dim` with d + rotary_dim/2 (rotate-half) or with d ^ 1 (interleaved); the first of a pair
// takes its partner negated, the second takes its partner. `x` is anything indexable by channel.
#pragma once
#include <cstdint>

namespace llmc {

// A product rounded on its own: the compiler may not contract it and the next add into an FMA (it does in fp32
// otherwise), so every path rounds as torch's separate mul and add do, the vectorized ones included.
inline float unfused(float product) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(product));
#endif
  return product;
}

template <typename scalar_t, typename Row>
inline scalar_t rope_channel(const Row& x, int64_t d, int64_t rotary_dim, bool interleaved, float cos, float sin) {
  const int64_t half = rotary_dim / 2;
  const bool first = interleaved ? d % 2 == 0 : d < half;
  const int64_t partner = interleaved ? d ^ 1 : (first ? d + half : d - half);
  const float rotated = first ? -static_cast<float>(x[partner]) : static_cast<float>(x[partner]);
  const scalar_t straight = unfused(static_cast<float>(x[d]) * cos);
  const scalar_t turned = unfused(rotated * sin);
  return static_cast<float>(straight) + static_cast<float>(turned);
}

}  // namespace llmc
