// llmc::paged_attention for CPU: the same numerics as the plain-torch reference in attention.py
// (write the new K/V into the paged cache, then causal attention of each new token over its
// sequence's context), in one pass per (token, head) with an online softmax, threaded with OpenMP.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

template <typename scalar_t>
static void write_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& cache, int64_t layer,
                        const at::Tensor& slot_mapping) {
  const int64_t T = k.size(2), Hkv = k.size(1), D = k.size(3);
  const int64_t NB = cache.size(2), BS = cache.size(3);
  scalar_t* base = cache.data_ptr<scalar_t>() + layer * 2 * NB * BS * Hkv * D;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto ka = k.accessor<scalar_t, 4>();
  auto va = v.accessor<scalar_t, 4>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* kd = base + slots[t] * Hkv * D;
      scalar_t* vd = kd + NB * BS * Hkv * D;
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) {
          kd[h * D + d] = ka[0][h][t][d];
          vd[h * D + d] = va[0][h][t][d];
        }
    }
  });
}

template <typename scalar_t>
static void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_tables,
                   const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
                   int64_t sliding_window, at::Tensor& out) {
  const int64_t H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t NB = cache.size(2), BS = cache.size(3), Hkv = cache.size(4);
  const int64_t group = H / Hkv, S = seq_lens.size(0), max_blocks = block_tables.size(1);
  const scalar_t* kbase = cache.data_ptr<scalar_t>() + layer * 2 * NB * BS * Hkv * D;
  const scalar_t* vbase = kbase + NB * BS * Hkv * D;
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
        qv[d] = static_cast<float>(qa[0][h][t][d]) * static_cast<float>(scale);
        acc[d] = 0.f;
      }
      float m = -INFINITY, l = 0.f;
      for (int64_t j = first; j <= pos; ++j) {
        const int64_t slot = static_cast<int64_t>(tables[i * max_blocks + j / BS]) * BS + j % BS;
        const scalar_t* kr = kbase + (slot * Hkv + kvh) * D;
        const scalar_t* vr = vbase + (slot * Hkv + kvh) * D;
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
      for (int64_t d = 0; d < D; ++d) oa[0][h][t][d] = static_cast<scalar_t>(acc[d] / l);
    }
  });
}

at::Tensor paged_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                           at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor seq_lens,
                           at::Tensor query_start_loc, double scale, int64_t sliding_window) {
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache must have one dtype");
  auto slots = slot_mapping.to(at::kLong).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  auto starts = query_start_loc.to(at::kInt).contiguous();
  // [1, T, H, D] memory viewed as [1, H, T, D]: what HF's transpose(1, 2) after attention expects.
  auto out = at::empty({1, q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    write_cache<scalar_t>(k, v, kv_cache, layer, slots);
    attend<scalar_t>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, out);
  });
  return out;
}

