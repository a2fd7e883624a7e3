// llmc::paged_attention for CPU: the same numerics as the plain-torch reference in attention.py
// (write the new K/V into the paged cache, then causal attention of each new token over its
// sequence's context), per token: scores, then the softmax-weighted values, threaded with llmc::parallel_for
// (parallel.h).
// An FP8 cache (float8_e4m3fn) holds k / k_scale and v / v_scale, saturated at 448 as torch's cast does.
// With cos / sin, RoPE is folded in: q and k are rotated as they are read (rotary.h), not by separate ops.
// Attention features as the reference defines them: logit soft-capping, ALiBi slopes, sink logits per head, and
// K and V of different head dims (the cache's last dim is the larger, the other zero-padded).
// A prefill chunk (a sequence with more than 8 new tokens) takes a flash attention blocked over queries and keys
// (attend_blocked), the other sequences of the step (decodes) a loop per token (attend); mixed dtypes take the
// reference's way in ATen ops (SDPA per sequence).
// Every index the step program gives (layer, slots, block tables, sequence bounds) is checked against the
// cache first: a malformed program gets an error, never a read or write outside the cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include "blocked_gemm.h"
#include "rotary.h"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>
#include "parallel.h"
#ifdef CPU_CAPABILITY_AVX512
#include <immintrin.h>
#endif

namespace llmc::rotary_kernel {
at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved);
}

namespace llmc::paged_attention_kernel {

template <typename cache_t>
cache_t to_cache(float x, float inv_scale) {
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

// 16 values of a row as fp32 lanes.
#ifdef CPU_CAPABILITY_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is fp32's upper half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
template <typename T>
inline __m512 load16(const T* p) {  // FP8
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return _mm512_loadu_ps(f);
}

// Lanes rounded to scalar_t and back as c10's scalar conversion rounds: nearest even, a NaN to the canonical NaN.
// In fp32 a rounding point all the same: the compiler may not contract the product before it into an FMA (unfused).
template <typename scalar_t>
inline __m512 round_as(__m512 x) {
  static_assert(std::is_same_v<scalar_t, float>);
  asm("" : "+v"(x));
  return x;
}
template <>
inline __m512 round_as<c10::BFloat16>(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000)));
}
inline __m512 negate(__m512 x) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))); }
#endif

// out[d] = channel d of token t's row as Rope rotates it, times scale, for d < n: 16 channels at a time where the row
// is contiguous and the rotation rotate-half over a multiple of 32 channels (bit for bit the channel-by-channel way).
template <typename scalar_t>
void rotate_row(const Rope<scalar_t>& rope, const at::TensorAccessor<scalar_t, 1>& row, int64_t t, int64_t n, float scale,
                float* out) {
  int64_t d = 0;
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    const scalar_t* x = row.data();
    if (row.stride(0) == 1 && (rope.dim == 0 || (!rope.interleaved && rope.dim % 32 == 0))) {
      const __m512 sv = _mm512_set1_ps(scale);
      const int64_t half = rope.dim / 2;
      const scalar_t* cos = rope.cos + t * rope.dim;
      const scalar_t* sin = rope.sin + t * rope.dim;
      for (; d < half; d += 16) {  // channel d takes its partner d + half negated; d + half takes d
        const __m512 x1 = load16(x + d), x2 = load16(x + d + half);
        const __m512 first = _mm512_add_ps(round_as<scalar_t>(_mm512_mul_ps(x1, load16(cos + d))),
                                           round_as<scalar_t>(_mm512_mul_ps(negate(x2), load16(sin + d))));
        const __m512 second = _mm512_add_ps(round_as<scalar_t>(_mm512_mul_ps(x2, load16(cos + d + half))),
                                            round_as<scalar_t>(_mm512_mul_ps(x1, load16(sin + d + half))));
        _mm512_storeu_ps(out + d, _mm512_mul_ps(round_as<scalar_t>(first), sv));
        _mm512_storeu_ps(out + d + half, _mm512_mul_ps(round_as<scalar_t>(second), sv));
      }
      for (d = rope.dim; d + 16 <= n; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(load16(x + d), sv));
    }
  }
#endif
  for (; d < n; ++d) out[d] = rope(row, t, d) * scale;
}

// A row of fp32 values into the cache's type (scaled for FP8), 16 at a time for an fp32 or bf16 cache.
template <typename cache_t>
void store_row(const float* row, int64_t n, float inv_scale, cache_t* out) {
  int64_t d = 0;
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (std::is_same_v<cache_t, float>)
    for (; d + 16 <= n; d += 16) _mm512_storeu_ps(out + d, _mm512_loadu_ps(row + d));
  if constexpr (std::is_same_v<cache_t, c10::BFloat16>)
    for (; d + 16 <= n; d += 16) {
      const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_as<c10::BFloat16>(_mm512_loadu_ps(row + d))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), _mm512_cvtepi32_epi16(bits));
    }
#endif
  for (; d < n; ++d) out[d] = to_cache<cache_t>(row[d], inv_scale);
}

// Each new token's K (RoPE'd) and V into its slot of the cache, zero-padded to the cache's head dim.
template <typename scalar_t, typename cache_t>
void write_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& cache, int64_t layer,
                        const at::Tensor& slot_mapping, float k_scale, float v_scale, const Rope<scalar_t>& rope) {
  const int64_t T = k.size(2), Hkv = k.size(1), Dk = k.size(3), Dv = v.size(3), D = cache.size(5);
  const int64_t NB = cache.size(2), BS = cache.size(3);
  const float k_inv = 1.f / k_scale, v_inv = 1.f / v_scale;
  cache_t* base = cache.data_ptr<cache_t>() + layer * 2 * NB * BS * Hkv * D;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto ka = k.accessor<scalar_t, 4>();
  auto va = v.accessor<scalar_t, 4>();
  llmc::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t t = begin; t < end; ++t) {
      cache_t* kd = base + slots[t] * Hkv * D;
      cache_t* vd = kd + NB * BS * Hkv * D;
      for (int64_t h = 0; h < Hkv; ++h) {
        std::fill(row.begin() + Dk, row.end(), 0.f);
        rotate_row(rope, ka[0][h][t], t, Dk, 1.f, row.data());
        store_row(row.data(), D, k_inv, kd + h * D);
        std::fill(row.begin() + Dv, row.end(), 0.f);
        rotate_row(Rope<scalar_t>{}, va[0][h][t], t, Dv, 1.f, row.data());  // no rotation: V as fp32
        store_row(row.data(), D, v_inv, vd + h * D);
      }
    }
  });
}

// Cached rows are read in place, 16 values per vector. The scores reduce with a tree sum, not the
// in-order one `omp simd reduction` compiles to (a chain of 16 dependent adds a key), and nothing is
// staged through a buffer (store-forwarding stalls): each was a 2-3x slowdown, measured.
template <typename T>
float dot(const float* q, const T* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef CPU_CAPABILITY_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
void add_scaled(float p, const T* v, float* acc, int64_t n) {  // acc += p * v
  int64_t i = 0;
#ifdef CPU_CAPABILITY_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * static_cast<float>(v[i]);
}

// One layer of the paged cache as the attention kernels read it: the K or V row of token j of sequence i, KV head h.
template <typename cache_t>
struct PagedLayer {
  const cache_t* k;
  const cache_t* v;
  const int32_t* tables;
  int64_t max_blocks, block_size, kv_heads, dim;

  PagedLayer(const at::Tensor& cache, int64_t layer, const at::Tensor& block_tables)
      : tables(block_tables.data_ptr<int32_t>()), max_blocks(block_tables.size(1)), block_size(cache.size(3)),
        kv_heads(cache.size(4)), dim(cache.size(5)) {
    const int64_t layer_size = cache.size(2) * block_size * kv_heads * dim;  // of K, then of V
    k = cache.data_ptr<cache_t>() + layer * 2 * layer_size;
    v = k + layer_size;
  }
  const cache_t* row(const cache_t* base, int64_t i, int64_t j, int64_t h) const {
    const int64_t block = tables[i * max_blocks + j / block_size];
    return base + ((block * block_size + j % block_size) * kv_heads + h) * dim;
  }
};

// With a soft-cap the scale goes inside it; else it is folded into q.
inline float query_scale(double scale, float softcap, float k_scale) {
  return softcap > 0.f ? k_scale : static_cast<float>(scale) * k_scale;
}

using Vec = at::vec::Vectorized<float>;

// The softmax's two vector loops, for both attention paths. The largest of n scores (-inf for none):
inline float max_of(const float* s, int64_t n) {
  Vec m(-INFINITY);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    m = at::vec::maximum(m, Vec::set(m, Vec::loadu(s + j, count), count));
  }
  float lanes[Vec::size()];
  m.store(lanes);
  return *std::max_element(lanes, lanes + Vec::size());
}

// s[j] = exp(s[j] - m) in place (ATen's flash attention's exp, 20 ulp, inlined); returns their sum.
inline float exp_and_sum(float* s, int64_t n, float m) {
  const Vec mv(m);
  Vec sum(0.f);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec e = (Vec::loadu(s + j, count) - mv).exp_u20();
    e.store(s + j, count);
    sum = sum + Vec::set(Vec(0.f), e, count);
  }
  float lanes[Vec::size()];
  sum.store(lanes);
  float total = 0.f;
  for (float x : lanes) total += x;
  return total;
}

// The sequences with at most `max_new` new tokens (the others are attend_blocked's).
template <typename scalar_t, typename cache_t>
void attend(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_tables,
            const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale, int64_t sliding_window,
            float k_scale, float v_scale, const Rope<scalar_t>& rope, const float* alibi, float softcap,
            const float* sinks, int64_t max_new, at::Tensor& out) {
  const PagedLayer<cache_t> pages(cache, layer, block_tables);
  const int64_t H = q.size(1), T = q.size(2), Dk = q.size(3), Dv = out.size(3);
  const int64_t group = H / pages.kv_heads, S = seq_lens.size(0);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  auto qa = q.accessor<scalar_t, 4>();
  auto oa = out.accessor<scalar_t, 4>();
  std::vector<int64_t> tokens, seq_of(T);  // the tokens to attend, and which sequence each token belongs to
  for (int64_t i = 0; i < S; ++i)
    for (int64_t t = starts[i]; t < starts[i + 1]; ++t) {
      seq_of[t] = i;
      if (starts[i + 1] - starts[i] <= max_new) tokens.push_back(t);
    }
  const int64_t n_tokens = static_cast<int64_t>(tokens.size());
  // A work item is one token and a range of KV heads (all of them unless there are fewer tokens than threads): it
  // sweeps the keys once in order, reading each key's rows of those heads together (one stretch of the page), for
  // all the query heads of each. Per head apart, each key row was a separate cache miss the prefetchers did not
  // see coming (docs/performance-history.md).
  const int64_t Hkv = pages.kv_heads;
  const int64_t parts = n_tokens ? std::clamp<int64_t>((at::get_num_threads() + n_tokens - 1) / n_tokens, 1, Hkv) : 1;
  const float qscale = query_scale(scale, softcap, k_scale);

  llmc::parallel_for(0, n_tokens * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qv(H * Dk), acc(H * Dv), total(H), scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t t = tokens[work / parts], part = work % parts, i = seq_of[t];
      const int64_t kv0 = part * Hkv / parts, kv1 = (part + 1) * Hkv / parts, h0 = kv0 * group, h1 = kv1 * group;
      const int64_t context = lens[i], n_new = starts[i + 1] - starts[i];
      const int64_t pos = context - n_new + (t - starts[i]);  // this token's position
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0, n = pos + 1 - first;
      for (int64_t h = h0; h < h1; ++h) rotate_row(rope, qa[0][h][t], t, Dk, qscale, qv.data() + (h - h0) * Dk);
      // The scores, key by key for every head of the range; then each head's softmax, vectorized over the keys.
      scores.resize((h1 - h0) * n);
      for (int64_t j = first; j <= pos; ++j)
        for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
          const cache_t* kr = pages.row(pages.k, i, j, kvh);
          for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
            float s = dot(qv.data() + (h - h0) * Dk, kr, Dk);
            if (softcap > 0.f) s = softcap * std::tanh(s * static_cast<float>(scale) / softcap);
            if (alibi) s += alibi[h] * static_cast<float>(j - pos);
            scores[(h - h0) * n + j - first] = s;
          }
        }
      for (int64_t h = h0; h < h1; ++h) {
        float* sh = scores.data() + (h - h0) * n;
        const float m = std::max(sinks ? sinks[h] : -INFINITY, max_of(sh, n));
        // a sink takes its share of the softmax, adds no value
        total[h - h0] = exp_and_sum(sh, n, m) + (sinks ? std::exp(sinks[h] - m) : 0.f);
      }
      std::fill(acc.begin(), acc.begin() + (h1 - h0) * Dv, 0.f);
      for (int64_t j = first; j <= pos; ++j)
        for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
          const cache_t* vr = pages.row(pages.v, i, j, kvh);
          for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
            add_scaled(scores[(h - h0) * n + j - first], vr, acc.data() + (h - h0) * Dv, Dv);
        }
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t d = 0; d < Dv; ++d)
          oa[0][h][t][d] = static_cast<scalar_t>(acc[(h - h0) * Dv + d] * v_scale / total[h - h0]);
    }
  });
}

// Prefill: flash attention (online softmax) blocked over queries and keys. A work item is one sequence's KV head
// and a block of its new tokens, for every query head sharing that KV head (GQA): their queries, rotated and
// scaled, are the rows of one tile. Each block of keys is copied from its pages into linear.cpp's prepacked layout
// (in fp32; with AVX512-BF16 a bf16 cache stays bf16, summed in fp32 by bf16 dot products, as ATen's flash attention
// does: q unscaled, the scores scaled in fp32, the probabilities rounded to bf16 for the values' GEMM), and the
// scores and the weighted values are that kernel's GEMMs (at 64 x 64 tiles the copies and the softmax leave about half the linears' FMA rate: 1.5-2x
// ATen's SDPA per sequence, docs/performance-history.md); only tiles that cross the diagonal, the window's edge or
// the end of the keys are masked. Threads take items largest first from a shared counter (causal blocks
// differ in size, and on a busy host a thread may run late).
constexpr int64_t kQueryBlock = 64, kKeyBlock = 64, kCols = 16;  // kCols: blocked_gemm's column block

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#ifdef __AVX512BF16__
template <typename scalar_t, typename cache_t>
constexpr bool kBf16Tiles = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<cache_t, c10::BFloat16>;
#else
template <typename scalar_t, typename cache_t>
constexpr bool kBf16Tiles = false;
#endif

#ifdef __AVX512BF16__
// r[p] = word p of every r[i] on entry: a 16 x 16 transpose of 32-bit words.
inline void transpose_words(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane k: rows 2i and 2i + 1 at words 4k, 4k + 1; then at 4k + 2, 4k + 3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane k: word 4k + c of rows 4i to 4i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // lane k of each u to lane i of the result
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// A block of kb keys (a multiple of 16) from their bf16 cache rows (null past the keys: zeros) into blocked_gemm's
// prepacked bf16 operands (linear.cpp's layout: 16-column blocks of pairs of rows), with vector shuffles.
// K^T [Dkp][kb]: per 16 keys, [Dkp / 2][16] pairs of channels, a pair being one 32-bit word of a key's row: 16 words
// of 16 keys at a time, transposed in registers.
inline void pack_keys(const c10::BFloat16* const* rows, int64_t kb, int64_t Dk, int64_t Dkp, c10::BFloat16* kp) {
  const int64_t pairs = Dkp / 2;
  for (int64_t j0 = 0; j0 < kb; j0 += kCols) {
    uint32_t* out = reinterpret_cast<uint32_t*>(kp) + j0 * pairs;
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const int64_t n = std::min<int64_t>(32, Dk - 2 * p0);  // channels: an odd Dk's last beside a zero
      const __mmask32 lanes = static_cast<__mmask32>((1ull << n) - 1);
      __m512i r[16];
      for (int64_t jj = 0; jj < kCols; ++jj)
        r[jj] = rows[j0 + jj] ? _mm512_maskz_loadu_epi16(lanes, rows[j0 + jj] + 2 * p0) : _mm512_setzero_si512();
      transpose_words(r);
      for (int64_t p = 0; p < std::min<int64_t>(16, pairs - p0); ++p) _mm512_storeu_si512(out + (p0 + p) * kCols, r[p]);
    }
  }
}

// V [kb][Dvp]: per 16 channels, [kb / 2][16][2], the channels of two consecutive keys interleaved.
inline void pack_values(const c10::BFloat16* const* rows, int64_t kb, int64_t Dv, int64_t Dvp, c10::BFloat16* vp) {
  alignas(64) static const uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(interleave);
  for (int64_t c = 0; c < Dvp; c += kCols) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::clamp<int64_t>(Dv - c, 0, kCols)) - 1);
    for (int64_t j = 0; j < kb; j += 2) {
      const __m256i a = rows[j] ? _mm256_maskz_loadu_epi16(lanes, rows[j] + c) : _mm256_setzero_si256();
      const __m256i b = rows[j + 1] ? _mm256_maskz_loadu_epi16(lanes, rows[j + 1] + c) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_storeu_si512(vp + ((c / kCols) * (kb / 2) + j / 2) * 2 * kCols, _mm512_permutexvar_epi16(order, both));
    }
  }
}
#endif

template <typename scalar_t, typename cache_t>
void attend_blocked(const at::Tensor& q, const at::Tensor& cache, int64_t layer, const at::Tensor& block_tables,
                    const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
                    int64_t sliding_window, float k_scale, float v_scale, const Rope<scalar_t>& rope,
                    const float* alibi, float softcap, const float* sinks, int64_t min_new, at::Tensor& out) {
  const PagedLayer<cache_t> pages(cache, layer, block_tables);
  const int64_t H = q.size(1), Dk = q.size(3), Dv = out.size(3), Dvp = round_up(Dv, kCols);
  const int64_t Hkv = pages.kv_heads, group = H / Hkv, S = seq_lens.size(0);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  auto qa = q.accessor<scalar_t, 4>();
  auto oa = out.accessor<scalar_t, 4>();
  const float qscale = query_scale(scale, softcap, k_scale);
  using Tile = std::conditional_t<kBf16Tiles<scalar_t, cache_t>, c10::BFloat16, float>;
  constexpr bool bf16_tiles = kBf16Tiles<scalar_t, cache_t>;
  const int64_t Dkp = bf16_tiles ? round_up(Dk, 2) : Dk;  // bf16 pairs

  struct Item { int64_t seq, kvh, q0, nq, cost; };
  std::vector<Item> items;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t n_new = starts[i + 1] - starts[i];
    if (n_new < min_new) continue;  // attend's
    for (int64_t q0 = 0; q0 < n_new; q0 += kQueryBlock)
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        const int64_t nq = std::min(kQueryBlock, n_new - q0), last = lens[i] - n_new + q0 + nq;  // keys up to `last`
        items.push_back({i, kvh, q0, nq, nq * (sliding_window > 0 ? std::min(last, sliding_window + nq) : last)});
      }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  std::atomic<size_t> next{0};

  llmc::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t rows = group * kQueryBlock;
    std::vector<Tile> qt(rows * Dkp), kp(kKeyBlock * Dkp), vp(kKeyBlock * Dvp), probs(bf16_tiles ? rows * kKeyBlock : 0);
    std::vector<float> qrow(Dk), s(rows * kKeyBlock), o(rows * Dvp), pv(rows * Dvp), m(rows), l(rows), alpha(rows);
    std::vector<int64_t> pos(rows);
    for (size_t w = next++; w < items.size(); w = next++) {
      const Item& item = items[w];
      const int64_t i = item.seq, kvh = item.kvh, nq = item.nq, M = group * nq;
      const int64_t n_new = starts[i + 1] - starts[i], first_pos = lens[i] - n_new + item.q0, last_pos = first_pos + nq - 1;
      for (int64_t r = 0; r < M; ++r) {  // row r: query head kvh * group + r / nq, token r % nq of the block
        const int64_t h = kvh * group + r / nq, t = starts[i] + item.q0 + r % nq;
        pos[r] = first_pos + r % nq;
        if constexpr (bf16_tiles) {  // rotated values are bf16's: exact
          rotate_row(rope, qa[0][h][t], t, Dk, 1.f, qrow.data());
          store_row(qrow.data(), Dk, 1.f, qt.data() + r * Dkp);
          std::fill(qt.begin() + r * Dkp + Dk, qt.begin() + (r + 1) * Dkp, Tile(0.f));
        } else {
          rotate_row(rope, qa[0][h][t], t, Dk, qscale, qt.data() + r * Dk);
        }
      }
      std::fill_n(m.begin(), M, -INFINITY);
      std::fill_n(l.begin(), M, 0.f);
      std::fill_n(o.begin(), M * Dvp, 0.f);
      const int64_t j_begin = sliding_window > 0 ? std::max<int64_t>(0, first_pos - sliding_window + 1) : 0;
      for (int64_t j0 = j_begin; j0 <= last_pos; j0 += kKeyBlock) {
        const int64_t jn = std::min(kKeyBlock, last_pos + 1 - j0), kb = round_up(jn, kCols);
        if constexpr (bf16_tiles) {  // K^T [Dkp][kb] and V [kb][Dvp] as prepacked bf16 pairs; zeros past the keys, Dk, Dv
          const cache_t* krows[kKeyBlock];
          const cache_t* vrows[kKeyBlock];
          for (int64_t jj = 0; jj < kb; ++jj) {
            krows[jj] = jj < jn ? pages.row(pages.k, i, j0 + jj, kvh) : nullptr;
            vrows[jj] = jj < jn ? pages.row(pages.v, i, j0 + jj, kvh) : nullptr;
          }
          pack_keys(krows, kb, Dk, Dkp, kp.data());
          pack_values(vrows, kb, Dv, Dvp, vp.data());
        } else {  // the same in fp32: K as prepacked columns [kb / 16][Dk][16], V as [Dvp / 16][kb][16]; zeros past the
                  // keys and Dv.
          for (int64_t jj = 0; jj < kb; ++jj) {
            float* kd = kp.data() + (jj / kCols) * Dk * kCols + jj % kCols;
            if (jj >= jn) {
              for (int64_t d = 0; d < Dk; ++d) kd[d * kCols] = 0.f;
              for (int64_t b = 0; b < Dvp / kCols; ++b) std::fill_n(vp.data() + (b * kb + jj) * kCols, kCols, 0.f);
              continue;
            }
            const cache_t* kr = pages.row(pages.k, i, j0 + jj, kvh);
            const cache_t* vr = pages.row(pages.v, i, j0 + jj, kvh);
            for (int64_t d = 0; d < Dk; ++d) kd[d * kCols] = static_cast<float>(kr[d]);
            for (int64_t b = 0; b < Dvp / kCols; ++b) {  // 16 consecutive channels of the row
              float* vd = vp.data() + (b * kb + jj) * kCols;
              const int64_t n = std::min(kCols, Dv - b * kCols);
              for (int64_t c = 0; c < n; ++c) vd[c] = static_cast<float>(vr[b * kCols + c]);
              std::fill(vd + n, vd + kCols, 0.f);
            }
          }
        }
        blocked_gemm_columns(qt.data(), M, Dkp, kp.data(), kb / kCols, nullptr, s.data(), kb, 0);
        for (int64_t r = 0; r < M; ++r) {
          float* sr = s.data() + r * kb;
          if (bf16_tiles && qscale != 1.f)
            for (int64_t jj = 0; jj < kb; jj += Vec::size()) (Vec::loadu(sr + jj) * Vec(qscale)).store(sr + jj);
          const int64_t p = pos[r];
          const bool inside = j0 + kb - 1 <= p && (sliding_window <= 0 || j0 > p - sliding_window);
          if (!inside || softcap > 0.f || alibi) {
            const float slope = alibi ? alibi[kvh * group + r / nq] : 0.f;
            for (int64_t jj = 0; jj < kb; ++jj) {
              const int64_t j = j0 + jj;
              const bool allowed = jj < jn && j <= p && (sliding_window <= 0 || j > p - sliding_window);
              float x = sr[jj];
              if (softcap > 0.f) x = softcap * std::tanh(x * static_cast<float>(scale) / softcap);
              sr[jj] = allowed ? x + slope * static_cast<float>(j - p) : -INFINITY;
            }
          }
          const float m_new = std::max(m[r], max_of(sr, kb));
          if (m_new == -INFINITY) {  // no key of this row yet (a window's edge): nothing to add
            alpha[r] = 1.f;
            std::fill_n(sr, kb, 0.f);
            continue;
          }
          alpha[r] = std::exp(m[r] - m_new);
          const float total = exp_and_sum(sr, kb, m_new);
          l[r] = l[r] * alpha[r] + total;
          m[r] = m_new;
        }
        if constexpr (bf16_tiles) {
          store_row(s.data(), M * kb, 1.f, probs.data());
          blocked_gemm_columns(probs.data(), M, kb, vp.data(), Dvp / kCols, nullptr, pv.data(), Dvp, 0);
        } else {
          blocked_gemm_columns(s.data(), M, kb, vp.data(), Dvp / kCols, nullptr, pv.data(), Dvp, 0);
        }
        for (int64_t r = 0; r < M; ++r) {
          const Vec a(alpha[r]);
          float* orow = o.data() + r * Dvp;
          const float* prow = pv.data() + r * Dvp;
          for (int64_t d = 0; d < Dvp; d += Vec::size())
            at::vec::fmadd(Vec::loadu(orow + d), a, Vec::loadu(prow + d)).store(orow + d);
        }
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t h = kvh * group + r / nq, t = starts[i] + item.q0 + r % nq;
        float rescale = 1.f, total = l[r];
        if (sinks) {  // a sink takes its share of the softmax, adds no value
          const float mn = std::max(m[r], sinks[h]);
          rescale = std::exp(m[r] - mn);
          total = total * rescale + std::exp(sinks[h] - mn);
        }
        const float factor = rescale * v_scale / total;
        for (int64_t d = 0; d < Dv; ++d) oa[0][h][t][d] = static_cast<scalar_t>(o[r * Dvp + d] * factor);
      }
    }
  });
}

// The program's indices, checked against the cache before anything is read or written.
void check_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache, int64_t layer,
                const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& starts) {
  TORCH_CHECK(cache.dim() == 6 && cache.size(1) == 2 && cache.is_contiguous(),
              "paged_attention: kv_cache must be a contiguous [num_layers, 2, num_blocks, block_size, num_kv_heads, "
              "head_dim] tensor, got ", cache.sizes());
  const int64_t NB = cache.size(2), BS = cache.size(3), Hkv = cache.size(4), D = cache.size(5);
  TORCH_CHECK(0 <= layer && layer < cache.size(0), "paged_attention: layer ", layer, " is outside the cache's ",
              cache.size(0), " layers");
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(3) <= D, "paged_attention: q must be [1, num_heads, T, dk <= ", D,
              "], got ", q.sizes());
  const int64_t T = q.size(2);
  for (const auto* x : {&k, &v})
    TORCH_CHECK(x->dim() == 4 && x->size(0) == 1 && x->size(1) == Hkv && x->size(2) == T && x->size(3) <= D,
                "paged_attention: k and v must be [1, ", Hkv, ", ", T, ", d <= ", D, "], got ", x->sizes());
  TORCH_CHECK(k.size(3) == q.size(3) && std::max(k.size(3), v.size(3)) == D, "paged_attention: k's head dim must be q's (",
              q.size(3), ") and the cache's the larger of k's and v's, got k ", k.sizes(), ", v ", v.sizes(), ", cache ", D);
  TORCH_CHECK(Hkv > 0 && q.size(1) % Hkv == 0, "paged_attention: ", q.size(1), " query heads for ", Hkv, " KV heads");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T, "paged_attention: slot_mapping must have one slot per token (", T,
              "), got ", slots.sizes());
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(0 <= slot[t] && slot[t] < NB * BS, "paged_attention: slot ", slot[t], " of token ", t,
                " is outside the cache's ", NB * BS, " slots");
  const int64_t S = lens.numel();
  TORCH_CHECK(lens.dim() == 1 && starts.dim() == 1 && starts.size(0) == S + 1, "paged_attention: query_start_loc must have "
              "num_seqs + 1 (", S + 1, ") entries, got ", starts.sizes());
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) >= S, "paged_attention: block_tables must be [num_seqs, max_blocks], got ",
              tables.sizes());
  const int32_t* start = starts.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  TORCH_CHECK(start[0] == 0 && start[S] == T, "paged_attention: query_start_loc must run from 0 to ", T);
  for (int64_t i = 0; i < S; ++i) {
    const int64_t n_new = start[i + 1] - start[i], blocks = (static_cast<int64_t>(len[i]) + BS - 1) / BS;
    TORCH_CHECK(0 <= n_new && n_new <= len[i], "paged_attention: sequence ", i, " has ", n_new, " new tokens and ",
                len[i], " tokens of context");
    TORCH_CHECK(blocks <= tables.size(1), "paged_attention: sequence ", i, " needs ", blocks,
                " blocks; block_tables has ", tables.size(1));
    const int32_t* table = tables.data_ptr<int32_t>() + i * tables.size(1);
    for (int64_t b = 0; b < blocks; ++b)
      TORCH_CHECK(0 <= table[b] && table[b] < NB, "paged_attention: block ", table[b], " of sequence ", i,
                  " is outside the cache's ", NB, " blocks");
  }
}

// [1, T, H, D] memory viewed as [1, H, T, D]: what HF's transpose(1, 2) after attention expects (attention.py's
// attention_output, the layout of every implementation's result).
at::Tensor output_like(const at::Tensor& q, int64_t head_dim) {
  return at::empty({1, q.size(2), q.size(1), head_dim}, q.options()).transpose(1, 2);
}

// The first `cos.size(-1)` channels of x [1, heads, T, head_dim] rotated (the reference's `apply_rope`).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  const int64_t dim = cos.size(-1);
  auto c = cos.view({1, 1, -1, dim}), s = sin.view({1, 1, -1, dim});
  if (dim == x.size(3)) return rotary_kernel::rotary_embedding(x, c, s, interleaved);
  return at::cat({rotary_kernel::rotary_embedding(x.slice(3, 0, dim), c, s, interleaved), x.slice(3, dim)}, 3);
}

// The reference's write_kv_cache and paged_attention_reference in ATen: one SDPA per sequence.
at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache,
                               int64_t layer, const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens,
                               const at::Tensor& starts, double scale, int64_t sliding_window,
                               const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                               const at::Tensor& alibi, double softcap, const at::Tensor& sinks) {
  const int64_t BS = cache.size(3), Hkv = cache.size(4), D = cache.size(5), Dk = q.size(3), Dv = v.size(3);
  const bool features = alibi.defined() || softcap > 0 || sinks.defined();
  const c10::optional<at::Tensor>* scales[] = {&k_scale, &v_scale};
  const at::Tensor* news[] = {&k, &v};
  for (int i = 0; i < 2; ++i) {
    auto x = news[i]->select(0, 0).transpose(0, 1);
    if (scales[i]->has_value()) x = x.to(at::kFloat) / **scales[i];  // FP8: torch's cast saturates at 448
    if (x.size(-1) < D) x = at::constant_pad_nd(x, {0, D - x.size(-1)});
    cache.select(0, layer).select(0, i).view({-1, Hkv, D}).index_put_({slots}, x.to(cache.scalar_type()));
  }
  auto out = output_like(q, Dv);
  const int32_t* start = starts.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < lens.numel(); ++i) {
    const int64_t context = len[i], n_new = start[i + 1] - start[i];
    auto blocks = tables.select(0, i).slice(0, 0, (context + BS - 1) / BS).to(at::kLong);
    // [2, num_blocks, block_size, kv_heads, d] -> [2, kv_heads, context, d]
    auto kv = cache.select(0, layer).index_select(1, blocks).flatten(1, 2).slice(1, 0, context).transpose(1, 2).to(q.scalar_type());
    if (k_scale.has_value()) kv = kv * at::stack({*k_scale, *v_scale}).to(q.scalar_type()).view({2, 1, 1, 1});
    auto keys = kv[0].slice(2, 0, Dk).unsqueeze(0), values = kv[1].slice(2, 0, Dv).unsqueeze(0);
    auto qs = q.slice(2, start[i], start[i + 1]);
    if (features) {  // the reference's _attention_math
      const int64_t group = q.size(1) / Hkv;
      auto scores = at::matmul(qs.to(at::kFloat), keys.repeat_interleave(group, 1).to(at::kFloat).transpose(-1, -2)) * scale;
      if (softcap > 0) scores = at::tanh(scores / softcap) * softcap;
      auto query_pos = at::arange(context - n_new, context, q.options().dtype(at::kLong)).unsqueeze(1);
      auto key_pos = at::arange(context, q.options().dtype(at::kLong)).unsqueeze(0);
      if (alibi.defined()) scores = scores + alibi.view({1, -1, 1, 1}) * (key_pos - query_pos).to(at::kFloat);
      auto allowed = key_pos <= query_pos;
      if (sliding_window > 0) allowed = allowed & (key_pos > query_pos - sliding_window);
      scores = scores.masked_fill(allowed.logical_not(), -INFINITY);
      at::Tensor probs;
      if (sinks.defined()) {
        auto sink = sinks.view({1, -1, 1, 1}).expand({scores.size(0), scores.size(1), scores.size(2), 1});
        probs = at::softmax(at::cat({scores, sink}, -1), -1).slice(-1, 0, context);
      } else {
        probs = at::softmax(scores, -1);
      }
      out.slice(2, start[i], start[i + 1]).copy_(at::matmul(probs, values.repeat_interleave(group, 1).to(at::kFloat)));
      continue;
    }
    c10::optional<at::Tensor> mask;
    if (context != n_new || sliding_window > 0) {
      auto query_pos = at::arange(context - n_new, context, q.options().dtype(at::kLong)).unsqueeze(1);
      auto key_pos = at::arange(context, q.options().dtype(at::kLong)).unsqueeze(0);
      auto allowed = key_pos <= query_pos;
      if (sliding_window > 0) allowed = allowed & (key_pos > query_pos - sliding_window);
      mask = allowed;
    }
    // 4-D inputs: SDPA sends 3-D ones to its slow math path on CPU.
    out.slice(2, start[i], start[i + 1]).copy_(at::scaled_dot_product_attention(
        qs, keys, values, mask, 0.0, !mask.has_value(), scale,
        /*enable_gqa=*/true));
  }
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor kv_cache, int64_t layer,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t sliding_window,
                           const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                           const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                           bool rotary_interleaved, const c10::optional<at::Tensor>& alibi_slopes, double softcap,
                           const c10::optional<at::Tensor>& sinks) {
  auto slots = slot_mapping.to(at::kLong).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  auto starts = query_start_loc.to(at::kInt).contiguous();
  check_step(q, k, v, kv_cache, layer, slots, tables, lens, starts);
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 == (k_scale.has_value() && v_scale.has_value()),
              "paged_attention: an FP8 cache, and only it, takes k_scale and v_scale");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "paged_attention: RoPE takes both cos and sin");
  const int64_t T = q.size(2), H = q.size(1);
  at::Tensor alibi, sink;  // [H] float32, contiguous
  for (auto [given, name, into] : {std::tuple{&alibi_slopes, "alibi_slopes", &alibi}, std::tuple{&sinks, "sinks", &sink}}) {
    if (!given->has_value()) continue;
    TORCH_CHECK((*given)->numel() == H && at::isFloatingType((*given)->scalar_type()), "paged_attention: ", name,
                " must hold one float per query head (", H, "), got ", (*given)->sizes());
    *into = (*given)->to(at::kFloat).contiguous().view({-1});
  }
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "paged_attention: softcap must be finite and >= 0, got ", softcap);
  at::Tensor cos_rows, sin_rows;  // [T, rotary_dim], contiguous
  if (cos.has_value()) {
    cos_rows = cos->reshape({T, -1}).contiguous();
    sin_rows = sin->reshape({T, -1}).contiguous();
    TORCH_CHECK(sin_rows.sizes() == cos_rows.sizes() && cos_rows.size(1) % 2 == 0 && cos_rows.size(1) <= q.size(3),
                "paged_attention: cos and sin must be [num_tokens, rotary_dim], rotary_dim even and at most head_dim");
  }
  const auto dtype = q.scalar_type();
  const bool one_dtype = k.scalar_type() == dtype && v.scalar_type() == dtype && (fp8 || kv_cache.scalar_type() == dtype) &&
                         (!cos_rows.defined() || (cos_rows.scalar_type() == dtype && sin_rows.scalar_type() == dtype)) &&
                         at::isFloatingType(dtype);
  // Sequences with more than kChunkTokens new tokens (prefill chunks) take attend_blocked, whose tiles are GEMMs that
  // read each key once for all the queries sharing it; the others (decodes) attend, a loop per token that streams
  // its keys once. Mixed dtypes take the reference's ATen ops; RoPE there is the rotary kernel.
  if (!one_dtype) {
    at::Tensor qr = q, kr = k;
    if (cos_rows.defined()) qr = apply_rope(q, cos_rows, sin_rows, rotary_interleaved), kr = apply_rope(k, cos_rows, sin_rows, rotary_interleaved);
    return attention_reference(qr, kr, v, kv_cache, layer, slots, tables, lens, starts, scale, sliding_window, k_scale, v_scale,
                               alibi, softcap, sink);
  }
  const float ks = fp8 ? k_scale->item<float>() : 1.f, vs = fp8 ? v_scale->item<float>() : 1.f;
  auto out = output_like(q, v.size(3));
  const int32_t* start = starts.data_ptr<int32_t>();
  constexpr int64_t kChunkTokens = 8;
  bool chunks = false, decodes = false;
  for (int64_t i = 0; i < lens.numel(); ++i) (start[i + 1] - start[i] > kChunkTokens ? chunks : decodes) = true;
  const float* alibi_ptr = alibi.defined() ? alibi.data_ptr<float>() : nullptr;
  const float* sink_ptr = sink.defined() ? sink.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "paged_attention", [&] {
    Rope<scalar_t> rope;
    if (cos_rows.defined())
      rope = {cos_rows.data_ptr<scalar_t>(), sin_rows.data_ptr<scalar_t>(), cos_rows.size(1), rotary_interleaved};
    const auto attend_step = [&](auto cache_zero, float k_scale_, float v_scale_) {
      using cache_t = decltype(cache_zero);
      write_cache<scalar_t, cache_t>(k, v, kv_cache, layer, slots, k_scale_, v_scale_, rope);
      if (chunks)
        attend_blocked<scalar_t, cache_t>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, k_scale_, v_scale_,
                                          rope, alibi_ptr, softcap, sink_ptr, kChunkTokens + 1, out);
      if (decodes)
        attend<scalar_t, cache_t>(q, kv_cache, layer, tables, lens, starts, scale, sliding_window, k_scale_, v_scale_, rope,
                                  alibi_ptr, softcap, sink_ptr, kChunkTokens, out);
    };
    if (fp8)
      attend_step(c10::Float8_e4m3fn{}, ks, vs);
    else
      attend_step(scalar_t{}, 1.f, 1.f);
  });
  return out;
}

}  // namespace llmc::paged_attention_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("paged_attention", &llmc::paged_attention_kernel::paged_attention); }
