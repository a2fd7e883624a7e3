// llmc::paged_attention for CPU: the same numerics as the plain-torch reference in attention.py
// (write the new K/V into the paged cache, then causal attention of each new token over its
// sequence's context), in one pass per (token, head) with an online softmax, threaded with OpenMP.
// An FP8 cache (float8_e4m3fn) holds k / k_scale and v / v_scale, saturated at 448 as torch's cast does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

template <typename cache_t>
static cache_t to_cache(float x, float inv_scale) {
  if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn>)
    return static_cast<cache_t>(std::clamp(x * inv_scale, -448.f, 448.f));
  else
    return static_cast<cache_t>(x);
}

template <typename scalar_t, typename cache_t>
static void write_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& cache, int64_t layer,
                        const at::Tensor& slot_mapping, float k_scale, float v_scale) {
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
          kd[h * D + d] = to_cache<cache_t>(static_cast<float>(ka[0][h][t][d]), k_inv);
          vd[h * D + d] = to_cache<cache_t>(static_cast<float>(va[0][h][t][d]), v_inv);
        }
    }
  });
}

template <typename scalar_t, typename cache_t>
static void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_tables,
                   const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
                   int64_t sliding_window, float k_scale, float v_scale, at::Tensor& out) {
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
    std::vector<float> qv(D), acc(D);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t t = work / H, h = work % H, kvh = h / group, i = seq_of[t];
      const int64_t context = lens[i], n_new = starts[i + 1] - starts[i];
      const int64_t pos = context - n_new + (t - starts[i]);  // this token's position
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
      for (int64_t d = 0; d < D; ++d) {
        qv[d] = static_cast<float>(qa[0][h][t][d]) * static_cast<float>(scale) * k_scale;
        acc[d] = 0.f;
      }
      float m = -INFINITY, l = 0.f;
      for (int64_t j = first; j <= pos; ++j) {
        const int64_t slot = static_cast<int64_t>(tables[i * max_blocks + j / BS]) * BS + j % BS;
        const cache_t* kr = kbase + (slot * Hkv + kvh) * D;
        const cache_t* vr = vbase + (slot * Hkv + kvh) * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qv[d] * static_cast<float>(kr[d]);
        if (s > m) {  // rescale what was accumulated under the old maximum
          const float c = std::exp(m - s);
          l *= c;
          for (int64_t d = 0; d < D; ++d) acc[d] *= c;
          m = s;
        }
        const float p = std::exp(s - m);
        l += p;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vr[d]);
      }
      for (int64_t d = 0; d < D; ++d) oa[0][h][t][d] = static_cast<scalar_t>(acc[d] * v_scale / l);
    }
  });
}

at::Tensor paged_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                           at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor seq_lens,
                           at::Tensor query_start_loc, double scale, int64_t sliding_window,
                           c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale) {
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache must have one dtype, or the cache be FP8");
  TORCH_CHECK(fp8 == (k_scale.has_value() && v_scale.has_value()), "an FP8 cache, and only it, takes k_scale and v_scale");
  const float ks = fp8 ? k_scale->item<float>() : 1.f, vs = fp8 ? v_scale->item<float>() : 1.f;
  auto slots = slot_mapping.to(at::kLong).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  auto starts = query_start_loc.to(at::kInt).contiguous();
  // [1, T, H, D] memory viewed as [1, H, T, D]: what HF's transpose(1, 2) after attention expects.
  auto out = at::empty({1, q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    if (fp8) {
      write_cache<scalar_t, c10::Float8_e4m3fn>(k, v, kv_cache, layer, slots, ks, vs);
      attend<scalar_t, c10::Float8_e4m3fn>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, ks, vs, out);
    } else {
      write_cache<scalar_t, scalar_t>(k, v, kv_cache, layer, slots, 1.f, 1.f);
      attend<scalar_t, scalar_t>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, 1.f, 1.f, out);
    }
  });
  return out;
}

