// llmc::paged_attention for CPU: the same numerics as the plain-torch reference in attention.py
// (write the new K/V into the paged cache, then causal attention of each new token over its
// sequence's context), per (token, head): scores, then the softmax-weighted values, threaded with OpenMP.
// An FP8 cache (float8_e4m3fn) holds k / k_scale and v / v_scale, saturated at 448 as torch's cast does.
// With cos / sin, RoPE is folded in: q and k are rotated as they are read (rotary.h), not by separate ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "rotary.h"
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

template <typename cache_t>
static cache_t to_cache(float x, float inv_scale) {
  if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn>)
    return static_cast<cache_t>(std::clamp(x * inv_scale, -448.f, 448.f));
  else
    return static_cast<cache_t>(x);
}

// RoPE of the first `dim` channels of each new token's q and k: cos / sin [T, dim] in q's dtype (dim 0: none).
template <typename scalar_t>
struct Rope {
  const scalar_t *cos = nullptr, *sin = nullptr;
  int64_t dim = 0;
  bool interleaved = false;

  // Channel d of token t's row x, rotated if it is one of the first `dim`.
  template <typename Row>
  float operator()(const Row& x, int64_t t, int64_t d) const {
    if (d >= dim) return static_cast<float>(x[d]);
    return static_cast<float>(rope_channel<scalar_t>(x, d, dim, interleaved, static_cast<float>(cos[t * dim + d]),
                                                     static_cast<float>(sin[t * dim + d])));
  }
};

template <typename scalar_t, typename cache_t>
static void write_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& cache, int64_t layer,
                        const at::Tensor& slot_mapping, float k_scale, float v_scale, const Rope<scalar_t>& rope) {
  const int64_t T = k.size(2), Hkv = k.size(1), D = k.size(3);
  const int64_t NB = cache.size(2), BS = cache.size(3);
  const float k_inv = 1.f / k_scale, v_inv = 1.f / v_scale;
  cache_t* base = cache.data_ptr<cache_t>() + layer * 2 * NB * BS * Hkv * D;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto ka = k.accessor<scalar_t, 4>();
  auto va = v.accessor<scalar_t, 4>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      cache_t* kd = base + slots[t] * Hkv * D;
      cache_t* vd = kd + NB * BS * Hkv * D;
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) {
          kd[h * D + d] = to_cache<cache_t>(rope(ka[0][h][t], t, d), k_inv);
          vd[h * D + d] = to_cache<cache_t>(static_cast<float>(va[0][h][t][d]), v_inv);
        }
    }
  });
}

// Cached rows are read in place, 16 values per vector. The scores reduce with a tree sum, not the
// in-order one `omp simd reduction` compiles to (a chain of 16 dependent adds a key), and nothing is
// staged through a buffer (store-forwarding stalls): each was a 2-3x slowdown, measured.
#ifdef __AVX512F__
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {  // bf16 is fp32's upper half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
template <typename T>
static inline __m512 load16(const T* p) {  // FP8
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return _mm512_loadu_ps(f);
}
#endif

template <typename T>
static float dot(const float* q, const T* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
static void add_scaled(float p, const T* v, float* acc, int64_t n) {  // acc += p * v
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * static_cast<float>(v[i]);
}

template <typename scalar_t, typename cache_t>
static void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_tables,
                   const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
                   int64_t sliding_window, float k_scale, float v_scale, const Rope<scalar_t>& rope, at::Tensor& out) {
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t NB = cache.size(2), BS = cache.size(3), Hkv = cache.size(4);
  const int64_t group = H / Hkv, S = seq_lens.size(0), max_blocks = block_tables.size(1);
  const cache_t* kbase = cache.data_ptr<cache_t>() + layer * 2 * NB * BS * Hkv * D;
  const cache_t* vbase = kbase + NB * BS * Hkv * D;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  auto qa = q.accessor<scalar_t, 4>();
  auto oa = out.accessor<scalar_t, 4>();
  // Which sequence each token belongs to.
  std::vector<int64_t> seq_of(T);
  for (int64_t i = 0; i < S; ++i)
    for (int64_t t = starts[i]; t < starts[i + 1]; ++t) seq_of[t] = i;

  at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qv(D), acc(D), scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t t = work / H, h = work % H, kvh = h / group, i = seq_of[t];
      const int64_t context = lens[i], n_new = starts[i + 1] - starts[i];
      const int64_t pos = context - n_new + (t - starts[i]);  // this token's position
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
      const int32_t* table = tables + i * max_blocks;
      auto cached = [&](const cache_t* base, int64_t j) {  // token j's row of this KV head
        return base + ((static_cast<int64_t>(table[j / BS]) * BS + j % BS) * Hkv + kvh) * D;
      };
      for (int64_t d = 0; d < D; ++d) qv[d] = rope(qa[0][h][t], t, d) * static_cast<float>(scale) * k_scale;
      // Two passes: the scores and their maximum, then the softmax-weighted sum of the values.
      scores.resize(pos + 1 - first);
      float m = -INFINITY;
      for (int64_t j = first; j <= pos; ++j) {
        const float s = dot(qv.data(), cached(kbase, j), D);
        scores[j - first] = s;
        m = std::max(m, s);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      for (int64_t j = first; j <= pos; ++j) {
        const float p = std::exp(scores[j - first] - m);
        l += p;
        add_scaled(p, cached(vbase, j), acc.data(), D);
      }
      for (int64_t d = 0; d < D; ++d) oa[0][h][t][d] = static_cast<scalar_t>(acc[d] * v_scale / l);
    }
  });
}

at::Tensor paged_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                           at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor seq_lens,
                           at::Tensor query_start_loc, double scale, int64_t sliding_window,
                           c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale,
                           c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin, bool rotary_interleaved) {
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache must have one dtype, or the cache be FP8");
  TORCH_CHECK(fp8 == (k_scale.has_value() && v_scale.has_value()), "an FP8 cache, and only it, takes k_scale and v_scale");
  const float ks = fp8 ? k_scale->item<float>() : 1.f, vs = fp8 ? v_scale->item<float>() : 1.f;
  TORCH_CHECK(cos.has_value() == sin.has_value(), "RoPE takes both cos and sin");
  at::Tensor cos_rows, sin_rows;  // [T, rotary_dim], contiguous
  if (cos.has_value()) {
    cos_rows = cos->reshape({q.size(2), -1}).contiguous();
    sin_rows = sin->reshape({q.size(2), -1}).contiguous();
    TORCH_CHECK(cos_rows.scalar_type() == q.scalar_type() && sin_rows.sizes() == cos_rows.sizes(),
                "cos and sin must be [num_tokens, rotary_dim] in q's dtype");
    TORCH_CHECK(cos_rows.size(1) % 2 == 0 && cos_rows.size(1) <= q.size(3), "rotary_dim must be even and at most head_dim");
  }
  auto slots = slot_mapping.to(at::kLong).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  auto starts = query_start_loc.to(at::kInt).contiguous();
  // [1, T, H, D] memory viewed as [1, H, T, D]: what HF's transpose(1, 2) after attention expects.
  auto out = at::empty({1, q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    Rope<scalar_t> rope;
    if (cos_rows.defined())
      rope = {cos_rows.data_ptr<scalar_t>(), sin_rows.data_ptr<scalar_t>(), cos_rows.size(1), rotary_interleaved};
    if (fp8) {
      write_cache<scalar_t, c10::Float8_e4m3fn>(k, v, kv_cache, layer, slots, ks, vs, rope);
      attend<scalar_t, c10::Float8_e4m3fn>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, ks, vs, rope, out);
    } else {
      write_cache<scalar_t, scalar_t>(k, v, kv_cache, layer, slots, 1.f, 1.f, rope);
      attend<scalar_t, scalar_t>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, 1.f, 1.f, rope, out);
    }
  });
  return out;
}

