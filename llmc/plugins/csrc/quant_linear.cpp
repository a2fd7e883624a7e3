// llmc::fp8_prepacked_linear, llmc::fp8_dynamic_prepacked_linear and llmc::nvfp4_prepacked_linear for CPU: y = x dequant(W)^T + b with W kept packed,
// reordered at load time into column groups of 64 outputs (llmc/plugins/quant_linear.py, `prepack_quantized`):
//   fp8 weight     [N/64, K, 64]     E4M3 bytes      group[k][j] = W[64 g + j][k]
//   nvfp4 weight   [N/64, K/2, 64]   two E2M1 codes  group[p][j] = W[64 g + j][2p] | W[64 g + j][2p + 1] << 4
//   nvfp4 scales   [N/64, K/16, 64]  E4M3            group[c][j] = scale of W[64 g + j][16 c : 16 c + 16]
// A step of k reads one cache line: each thread streams its groups once, in order (the hardware prefetcher's best
// case), decodes 16 outputs' weights into a vector and applies it to up to 6 rows with broadcast FMAs. No horizontal
// sums. On the dev machine decoding, not memory, is the limit at one row: about 18 (E4M3) and 24 (E2M1) G weights/s
// per core. Larger batches (prefill) decode each group once into an fp32 tile in linear.cpp's layout and run its
// blocked GEMM over all rows.
//
// E4M3 -> fp32 without a table: an E4M3 byte shifted into an fp16's bit positions (sign 15, exponent 13..10,
// mantissa 9..7) is the same number times 2^-8 (the biases are 7 and 15), also for subnormals, and the CPU converts
// fp16 to fp32 exactly. The 2^8 goes into the output's scale.
// E2M1 -> fp32: _mm512_permutexvar_ps looks up 16 codes in a 16-entry table at once.
//
// Raw intrinsics, per level: AVX-512 (F, BW, VL) below, AVX2 (+FMA, F16C) in quant_linear_avx2.h, the same layout and
// numerics; the argument checks and the ops' entry points after them are shared. The portable library has no
// kernels: there the ops run their reference, and the torch backend keeps these layers unpacked (plugins/linear.py,
// `prepack_linears`).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <immintrin.h>
#include "blocked_gemm.h"
#include "parallel.h"

namespace llmc::quant_linear_kernel {

constexpr float kE4M3Max = 448.0f, kE2M1Max = 6.0f, kFp16Bias = 256.0f;  // kFp16Bias: 2^(15 - 7)
constexpr int64_t kGroup = 64, kBlock = 16;  // outputs per group; NVFP4's block along K

// The decode loops ask for the row (one cache line) kPrefetchRows ahead of the one they read: with the hardware
// prefetcher alone a 2-thread fp8 decode streamed 14-18 GB/s on a Xeon that reads 28 (1.38x faster with it).
constexpr int64_t kPrefetchRows = 64;
inline void prefetch_row(const uint8_t* row) { _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0); }

// ---- scalar formats, the same arithmetic as quant_formats.py (bit for bit) ----

inline float e4m3_round(float v) {  // saturating, round to nearest even
  return static_cast<float>(c10::Float8_e4m3fn(std::min(std::max(v, -kE4M3Max), kE4M3Max)));
}

}  // namespace llmc::quant_linear_kernel

#ifdef CPU_CAPABILITY_AVX512
namespace llmc::quant_linear_kernel {

constexpr int64_t kVec = 16;  // outputs per vector
constexpr int kBlocks = kGroup / kVec;
// Above this many rows a group is decoded once into fp32 for all of them (measured crossover on the dev machine).
constexpr int64_t kDecodeMaxRows = 12;
constexpr float kE2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// ---- vector decoding ----

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// 16 E4M3 bytes -> 16 floats, each 2^-8 times its value.
inline __m512 e4m3x16(__m128i bytes) {
  // Sign-extending puts the sign in bit 15 (and in 14, cleared); the shift aligns exponent and mantissa.
  const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
  return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

inline __mmask16 lanes_below(int64_t n) { return static_cast<__mmask16>(n >= kVec ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1); }

// ---- activations quantized and read back (W8A8, W4A4), 16 at a time, bit for bit as the scalar formats ----

// e4m3_round of each lane: nearest even, saturating at 448; NaN stays NaN.
inline __m512 e4m3_round16(__m512 v) {
  const __m512 a = _mm512_min_ps(_mm512_abs_ps(v), _mm512_set1_ps(kE4M3Max));
  // Normals: round fp32's mantissa to E4M3's 3 bits (nearest even: add half an ulp less one, plus the kept lsb).
  __m512i bits = _mm512_castps_si512(a);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF), lsb));
  const __m512 normal = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xFFF00000))));
  // Subnormals (below 2^-6): multiples of 2^-9, which adding 2^14 (its ulp is 2^-9) rounds to.
  const __m512 magic = _mm512_set1_ps(16384.f);
  const __m512 subnormal = _mm512_sub_ps(_mm512_add_ps(a, magic), magic);
  __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-6f), _CMP_LT_OQ), normal, subnormal);
  r = _mm512_or_ps(r, _mm512_and_ps(v, _mm512_set1_ps(-0.f)));  // the sign, also of a zero
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, v);
}

// n values quantized to E4M3 with a per-tensor scale and read back, in place (W8A8's inputs).
void fake_quantize_fp8(float* x, int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += kVec) {
    const __mmask16 mask = lanes_below(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
    _mm512_mask_storeu_ps(x + i, mask, _mm512_mul_ps(e4m3_round16(_mm512_div_ps(v, s)), s));
  }
}

// One block of 16 values quantized to NVFP4 with the given global scale and read back, in place (W4A4's inputs,
// quant_formats.fake_quantize_nvfp4_activation).
void fake_quantize_nvfp4_block(float* x, float global_scale) {
  const __m512 v = _mm512_loadu_ps(x);
  const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
  const float scale = e4m3_round(amax / kE2M1Max / global_scale) * global_scale;
  const __m512 q = _mm512_div_ps(v, _mm512_set1_ps(scale > 0.f ? scale : 1.f)), a = _mm512_abs_ps(q);
  // The E2M1 code: the magnitude's index counts the midpoints below it (ties to even: > or >=), bit 3 the sign.
  __m512i code = _mm512_srli_epi32(_mm512_castps_si512(q), 28);
  code = _mm512_and_si512(code, _mm512_set1_epi32(8));
  const __m512i one = _mm512_set1_epi32(1);
  for (const float m : {.25f, 1.25f, 2.5f, 5.f}) code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(a, _mm512_set1_ps(m), _CMP_GT_OQ), code, one);
  for (const float m : {.75f, 1.75f, 3.5f}) code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(a, _mm512_set1_ps(m), _CMP_GE_OQ), code, one);
  code = _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q), _mm512_set1_epi32(8));  // NaN: code 8
  _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_permutexvar_ps(code, _mm512_loadu_ps(kE2M1)), _mm512_set1_ps(scale)));
}

// ---- decode path: MB rows of x [*, K] against one group, into acc[m][b] (2^-8 times the dots) ----

template <int MB>
void fp8_group(const float* x, int64_t K, const uint8_t* w, __m512 (&acc)[MB][kBlocks]) {
  for (int64_t k = 0; k < K; ++k) {
    prefetch_row(w + (k + kPrefetchRows) * kGroup);
    __m512 wv[kBlocks];
    for (int b = 0; b < kBlocks; ++b) wv[b] = e4m3x16(load16(w + k * kGroup + b * kVec));
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      for (int b = 0; b < kBlocks; ++b) acc[m][b] = _mm512_fmadd_ps(xv, wv[b], acc[m][b]);
    }
  }
}

// Also times the global scale's inverse: the block scales are applied, the global one is not.
template <int MB>
void nvfp4_group(const float* x, int64_t K, const uint8_t* w, const uint8_t* scales, __m512 (&acc)[MB][kBlocks]) {
  const __m512 table = _mm512_loadu_ps(kE2M1);
  for (int64_t c = 0; c < K / kBlock; ++c) {
    __m512 s[kBlocks], part[kBlocks];  // part: one row's unscaled sums over the block
    for (int b = 0; b < kBlocks; ++b) s[b] = e4m3x16(load16(scales + c * kGroup + b * kVec)), part[b] = _mm512_setzero_ps();
    prefetch_row(scales + (c + kPrefetchRows / 8) * kGroup);
    for (int64_t p = 0; p < kBlock / 2; ++p) {
      const int64_t k = c * kBlock + 2 * p;
      prefetch_row(w + (k / 2 + kPrefetchRows) * kGroup);
      for (int b = 0; b < kBlocks; ++b) {
        const __m512i codes = _mm512_cvtepu8_epi32(load16(w + (k / 2) * kGroup + b * kVec));
        __m512 lo = _mm512_permutexvar_ps(codes, table);  // the permute reads bits 0..3 only
        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
        if constexpr (MB == 1) {  // one row: sum the block unscaled, scale the sum (4 multiplies per 16 k, not 64)
          part[b] = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), lo, part[b]);
          part[b] = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 1]), hi, part[b]);
        } else {  // several rows: scale the weights once for all of them
          lo = _mm512_mul_ps(lo, s[b]), hi = _mm512_mul_ps(hi, s[b]);
          for (int m = 0; m < MB; ++m) {
            acc[m][b] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), lo, acc[m][b]);
            acc[m][b] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k + 1]), hi, acc[m][b]);
          }
        }
      }
    }
    if constexpr (MB == 1)
      for (int b = 0; b < kBlocks; ++b) acc[0][b] = _mm512_fmadd_ps(part[b], s[b], acc[0][b]);
  }
}

// y[m][n0 + ...] = acc * scale(n) + bias(n), for the group's outputs below N.
template <int MB, typename Scale>
void store_group(__m512 (&acc)[MB][kBlocks], Scale scale, const float* bias, float* y, int64_t N, int64_t n0) {
  for (int b = 0; b < kBlocks; ++b) {
    const int64_t n = n0 + b * kVec;
    const __mmask16 mask = lanes_below(N - n);
    const __m512 sv = scale(n, mask);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + m * N + n, mask, _mm512_fmadd_ps(acc[m][b], sv, bv));
  }
}

// ---- the two formats: a group's decode-path tile, its fp32 dequantization, its output scale ----

struct Fp8Weights {
  const uint8_t* w; const float* channel_scale; int64_t K;
  static constexpr int kTileRows = 6;  // 24 accumulators + 4 weight vectors + a broadcast: 29 of 32 registers
  template <int MB> void tile(const float* x, int64_t g, __m512 (&acc)[MB][kBlocks]) const {
    fp8_group<MB>(x, K, w + g * K * kGroup, acc);
  }
  __m512 output_scale(int64_t n, __mmask16 mask) const {
    return _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, channel_scale + n), _mm512_set1_ps(kFp16Bias));
  }
  // out[b][k][j] = W[n0 + 16 b + j][k], exactly as quant_formats.dequantize_fp8 computes it: (q * 2^8 exact) * scale.
  void dequantize(int64_t g, int64_t N, float* out) const {
    for (int b = 0; b < kBlocks; ++b) {
      const __m512 s = output_scale(g * kGroup + b * kVec, lanes_below(N - g * kGroup - b * kVec));
      for (int64_t k = 0; k < K; ++k)
        _mm512_storeu_ps(out + (b * K + k) * kVec, _mm512_mul_ps(e4m3x16(load16(w + (g * K + k) * kGroup + b * kVec)), s));
    }
  }
};

struct Nvfp4Weights {
  const uint8_t* w; const uint8_t* block_scales; float global_scale; int64_t K;
  static constexpr int kTileRows = 5;  // 20 accumulators + 4 block scales + weights, table, broadcasts
  template <int MB> void tile(const float* x, int64_t g, __m512 (&acc)[MB][kBlocks]) const {
    nvfp4_group<MB>(x, K, w + g * (K / 2) * kGroup, block_scales + g * (K / kBlock) * kGroup, acc);
  }
  __m512 output_scale(int64_t, __mmask16) const { return _mm512_set1_ps(global_scale * kFp16Bias); }
  // As quant_formats.dequantize_nvfp4: e2m1 * (block scale * global scale).
  void dequantize(int64_t g, int64_t, float* out) const {
    const __m512 table = _mm512_loadu_ps(kE2M1), gs = _mm512_set1_ps(global_scale * kFp16Bias);
    const uint8_t* wg = w + g * (K / 2) * kGroup;
    const uint8_t* sg = block_scales + g * (K / kBlock) * kGroup;
    for (int b = 0; b < kBlocks; ++b)
      for (int64_t k = 0; k < K; k += 2) {
        const __m512 s = _mm512_mul_ps(e4m3x16(load16(sg + (k / kBlock) * kGroup + b * kVec)), gs);
        const __m512i codes = _mm512_cvtepu8_epi32(load16(wg + (k / 2) * kGroup + b * kVec));
        _mm512_storeu_ps(out + (b * K + k) * kVec, _mm512_mul_ps(_mm512_permutexvar_ps(codes, table), s));
        _mm512_storeu_ps(out + (b * K + k + 1) * kVec, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table), s));
      }
  }
};

template <int MB, typename Weights>
void decode_rows(const Weights& weights, const float* x, int64_t g, const float* bias, float* y, int64_t N) {
  __m512 acc[MB][kBlocks];
  for (auto& row : acc) for (auto& v : row) v = _mm512_setzero_ps();
  weights.template tile<MB>(x, g, acc);
  store_group<MB>(acc, [&](int64_t n, __mmask16 mask) { return weights.output_scale(n, mask); }, bias, y, N, g * kGroup);
}

template <typename Weights>
void decode_rows(int64_t mb, const Weights& weights, const float* x, int64_t g, const float* bias, float* y, int64_t N) {
  switch (mb) {
    case 6: return decode_rows<std::min(6, Weights::kTileRows)>(weights, x, g, bias, y, N);
    case 5: return decode_rows<5>(weights, x, g, bias, y, N);
    case 4: return decode_rows<4>(weights, x, g, bias, y, N);
    case 3: return decode_rows<3>(weights, x, g, bias, y, N);
    case 2: return decode_rows<2>(weights, x, g, bias, y, N);
    default: return decode_rows<1>(weights, x, g, bias, y, N);
  }
}

// y [M, N] = x [M, K] dequant(W)^T + bias: threads split the groups of 64 outputs.
template <typename Weights>
void quantized_gemm(const Weights& weights, const float* x, int64_t M, int64_t K, const float* bias, float* y, int64_t N) {
  const int64_t groups = (N + kGroup - 1) / kGroup;
  if (M <= kDecodeMaxRows)
    return llmc::parallel_for_each(groups, [&](int64_t g) {
      for (int64_t m = 0; m < M; m += Weights::kTileRows)
        decode_rows(std::min<int64_t>(Weights::kTileRows, M - m), weights, x + m * K, g, bias, y + m * N, N);
    });
  llmc::parallel_for_each(groups, [&](int64_t g) {
    thread_local std::vector<float> tile;
    tile.resize(kGroup * K);
    weights.dequantize(g, N, tile.data());
    blocked_gemm_columns(x, M, K, tile.data(), std::min<int64_t>(kBlocks, (N - g * kGroup + kVec - 1) / kVec), bias, y,
                         N, g * kGroup);
  });
}

}  // namespace llmc::quant_linear_kernel
#else
#include "quant_linear_avx2.h"
#endif  // CPU_CAPABILITY_AVX512

namespace llmc::quant_linear_kernel {

// ---- arguments ----

float scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1, what, " must be a scalar tensor, got shape ", t.sizes());
  return t.scalar_type() == at::kFloat && t.is_cpu() ? *t.data_ptr<float>() : t.item<float>();
}

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// x as fp32 rows [M, K], in a copy the caller may quantize in place.
at::Tensor input_rows(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(-1) == K, op, ": input features ", x.size(-1), " do not match the weight's ", K);
  return x.reshape({-1, K}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

at::Tensor bias_of(const c10::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!given(bias)) return {};
  TORCH_CHECK(bias->numel() == N, op, ": bias has ", bias->numel(), " values for ", N, " outputs");
  return bias->to(at::kFloat).contiguous();
}

void check_groups(const at::Tensor& w, int64_t rows, int64_t N, const char* what, const char* op) {
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(2) == kGroup && w.size(1) == rows,
              op, ": ", what, " is not in the prepacked layout [N/64, ", rows, ", 64] (see plugins/quant_linear.py)");
  TORCH_CHECK(N <= w.size(0) * kGroup && N > (w.size(0) - 1) * kGroup, op, ": out_features ", N,
              " does not match the weight's ", w.size(0), " groups of 64");
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.to(x.scalar_type()).view(shape);
}

// The inputs are quantized to E4M3 and read back (W8A8) with a static per-tensor scale if one is given, or with
// `per_token` each row's (token's) own scale, its amax / 448 (1 for a zero row: vLLM's default FP8); else weight-only.
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                      const c10::optional<at::Tensor>& in_scale, bool per_token, const c10::optional<at::Tensor>& bias,
                      int64_t out_features, const char* op) {
  TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn, op, ": weight must be float8_e4m3fn, got ", w.scalar_type());
  const int64_t N = out_features, K = w.size(1);
  check_groups(w, K, N, "weight", op);
  auto scale = w_scale.to(at::kFloat).contiguous();
  TORCH_CHECK(scale.numel() == N, op, ": weight_scale must have one value per output channel (", N, ")");
  auto xf = input_rows(x, K, op);
  const int64_t M = xf.size(0);
  float* xp = xf.data_ptr<float>();
  if (given(in_scale)) {
    const float s = scalar(*in_scale, "fp8_prepacked_linear: input_scale");
    llmc::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { fake_quantize_fp8(xp + m0 * K, (m1 - m0) * K, s); });
  } else if (per_token) {
    llmc::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(xp[m * K + k]));
        const float s = amax / kE4M3Max;
        fake_quantize_fp8(xp + m * K, K, s > 0.f ? s : 1.f);
      }
    });
  }
  auto b = bias_of(bias, N, op);
  auto y = at::empty({M, N}, xf.options());
  const Fp8Weights weights{static_cast<const uint8_t*>(w.data_ptr()), scale.data_ptr<float>(), K};
  quantized_gemm(weights, xp, M, K, b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N);
  return finish(y, x);
}

at::Tensor fp8_prepacked_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& bias,
                                int64_t out_features) {
  return fp8_linear(x, w, w_scale, in_scale, false, bias, out_features, "fp8_prepacked_linear");
}

at::Tensor fp8_dynamic_prepacked_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                        const c10::optional<at::Tensor>& bias, int64_t out_features) {
  return fp8_linear(x, w, w_scale, c10::nullopt, true, bias, out_features, "fp8_dynamic_prepacked_linear");
}

at::Tensor nvfp4_prepacked_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                  const at::Tensor& w_global_scale, const c10::optional<at::Tensor>& in_global_scale,
                                  const c10::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "nvfp4_prepacked_linear";
  TORCH_CHECK(w.scalar_type() == at::kByte, op, ": weight must be uint8 (two E2M1 codes a byte), got ", w.scalar_type());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat8_e4m3fn, op, ": weight_scale must be float8_e4m3fn");
  const int64_t N = out_features, K = 2 * w.size(1);
  TORCH_CHECK(K % kBlock == 0, op, ": in_features (", K, ") must be a multiple of ", kBlock);
  check_groups(w, K / 2, N, "weight", op);
  check_groups(w_scale, K / kBlock, N, "weight_scale", op);
  auto xf = input_rows(x, K, op);
  const int64_t M = xf.size(0);
  if (given(in_global_scale)) {  // W4A4: the inputs quantized to NVFP4 block by block and read back
    const float gs = scalar(*in_global_scale, "nvfp4_prepacked_linear: input_global_scale");
    float* xp = xf.data_ptr<float>();
    llmc::parallel_for(0, M * K / kBlock, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) fake_quantize_nvfp4_block(xp + blk * kBlock, gs);
    });
  }
  auto b = bias_of(bias, N, op);
  auto y = at::empty({M, N}, xf.options());
  const Nvfp4Weights weights{w.data_ptr<uint8_t>(), static_cast<const uint8_t*>(w_scale.data_ptr()),
                             scalar(w_global_scale, "nvfp4_prepacked_linear: weight_global_scale"), K};
  quantized_gemm(weights, xf.data_ptr<float>(), M, K, b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N);
  return finish(y, x);
}

}  // namespace llmc::quant_linear_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) {
  m.impl("fp8_prepacked_linear", &llmc::quant_linear_kernel::fp8_prepacked_linear);
  m.impl("nvfp4_prepacked_linear", &llmc::quant_linear_kernel::nvfp4_prepacked_linear);
  m.impl("fp8_dynamic_prepacked_linear", &llmc::quant_linear_kernel::fp8_dynamic_prepacked_linear);
}
#endif  // CPU_CAPABILITY_AVX512 || CPU_CAPABILITY_AVX2
