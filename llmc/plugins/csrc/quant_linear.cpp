// llmc::fp8_linear and llmc::nvfp4_linear for CPU: y = x dequant(W)^T + b with W kept packed.
// Decode (few rows) reads all of W per step, so the kernels stream the packed bytes (1 or 9/16
// byte per weight) and decode them in registers inside the dot products: each thread takes a band
// of W's rows and decodes each row once per 8 inputs. (On the dev machine decoding, not memory,
// is the limit: about 15 G weights/s per core for both formats.) Larger batches are GEMMs: the
// Python side dequantizes W tile by tile (dequantize_* here) and calls torch.
//
// E4M3 -> fp32 without a table: an E4M3 byte shifted into an fp16's bit positions (sign 15,
// exponent 13..10, mantissa 9..7) is the same number times 2^-8 (the biases are 7 and 15), also
// for subnormals, and the CPU converts fp16 to fp32 exactly. The 2^8 goes into the row's scale.
// E2M1 -> fp32: _mm512_permutexvar_ps looks up 16 nibbles in a 16-entry table at once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "quant_linear.cpp needs AVX-512 (F, BW, VL): build with -march=native on an AVX-512 CPU"
#endif

namespace {

constexpr float kE4M3Max = 448.0f, kE2M1Max = 6.0f, kFp16Bias = 256.0f;  // kFp16Bias: 2^(15 - 7)
constexpr int64_t kBlock = 16, kMaxRows = 16;
constexpr float kE2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// ---- scalar formats, the same arithmetic as quant_formats.py (bit for bit) ----

inline float e4m3_round(float v) {  // saturating, round to nearest even
  return static_cast<float>(c10::Float8_e4m3fn(std::min(std::max(v, -kE4M3Max), kE4M3Max)));
}

inline uint8_t e2m1_code(float v) {  // quant_formats.fp4_e2m1_encode
  const float a = std::fabs(v);
  uint8_t c = (a > .25f) + (a >= .75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);
  return std::isnan(v) ? 8 : c | (std::signbit(v) << 3);
}

float e4m3_value(uint8_t b) { return static_cast<float>(c10::bit_cast<c10::Float8_e4m3fn>(b)); }

// One block of 16 activations quantized to NVFP4 with the given global scale and read back
// (quant_formats.fake_quantize_nvfp4_activation).
void fake_quantize_block(const float* x, float global_scale, float* out) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = e4m3_round(amax / kE2M1Max / global_scale) * global_scale;
  const float divisor = scale > 0.f ? scale : 1.f;
  for (int i = 0; i < kBlock; ++i) out[i] = kE2M1[e2m1_code(x[i] / divisor)] * scale;
}

// ---- vector decoding ----

// 16 E4M3 bytes -> 16 floats, each 2^-8 times its value (256-bit integer steps measured faster
// than 512-bit ones for 32 bytes at once).
inline __m512 e4m3x16(__m128i bytes) {
  // Sign-extending puts the sign in bit 15 (and in 14, cleared); the shift aligns exponent and mantissa.
  const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
  return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

// 16 bytes; in a row's last, partial step (Tail) only those under the mask, the others read as 0.
template <bool Tail>
inline __m128i load16(const uint8_t* p, __mmask16 mask) {
  if constexpr (Tail) return _mm_maskz_loadu_epi8(mask, p);
  else return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Runs step(k, tail) for k = 0, S, 2S, ... < K: whole steps with tail = false, a last partial one
// with tail = true (std::true_type, so the step can pick masked loads at compile time).
template <int S, typename Step>
inline void steps(int64_t K, Step step) {
  int64_t k = 0;
  for (; k + S <= K; k += S) step(k, std::false_type{});
  if (k < K) step(k, std::true_type{});
}

// 8 E4M3 bytes -> 8 floats (2^-8 times their value) in the low half.
inline __m512 e4m3x8(const uint8_t* p, __mmask16 mask) {
  __m128i h = _mm_cvtepi8_epi16(_mm_maskz_loadu_epi8(mask, p));
  h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16(static_cast<int16_t>(0xBFFF)));
  return _mm512_castps256_ps512(_mm256_cvtph_ps(h));
}

inline __mmask16 first16(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1); }
inline __mmask64 first64(int64_t n) { return n >= 64 ? ~0ull : (1ull << n) - 1; }

// ---- one weight row against MB inputs, into out[m * N] ----
// A single row at a time keeps the weights one sequential stream for the hardware prefetcher
// (software prefetching measured no faster), and A accumulators per input keep FMAs in flight.
// The loops over inputs and vectors are unrolled by pragma: GCC does not unroll them all by itself
// for 8 inputs, and then keeps the accumulators on the stack (half the speed).

template <int MB, int A>
inline void store(__m512 (&acc)[MB][A], int64_t N, float* out) {
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    __m512 sum = acc[m][0];
    #pragma GCC unroll 16
    for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
    out[m * N] = _mm512_reduce_add_ps(sum);
  }
}

// x: MB rows of Kx floats (K rounded up to 64, zero padded). Result is 2^-8 times the true dot.
template <int MB>
void fp8_dot(const float* x, int64_t Kx, const uint8_t* w, int64_t K, int64_t N, float* out) {
  constexpr int A = MB == 1 ? 4 : 2;
  __m512 acc[MB][A];
  for (auto& a : acc) for (auto& v : a) v = _mm512_setzero_ps();
  steps<64>(K, [&](int64_t k, auto tail) {
    const __mmask64 mask = first64(K - k);
    __m512 v[4];
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) v[j] = e4m3x16(load16<tail>(w + k + 16 * j, static_cast<__mmask16>(mask >> (16 * j))));
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
      #pragma GCC unroll 16
      for (int j = 0; j < 4; ++j) acc[m][j % A] = _mm512_fmadd_ps(v[j], _mm512_loadu_ps(x + m * Kx + k + 16 * j), acc[m][j % A]);
  });
  store(acc, N, out);
}

// x: MB rows of Kx floats (K rounded up to 128, zero padded), each 32 reordered as
// [elements 0, 2, ..., 30 | 1, 3, ..., 31]: the low and the high nibbles of 16 packed bytes.
// Result is 2^-8 / global scale times the true dot.
template <int MB>
void nvfp4_dot(const float* x, int64_t Kx, const uint8_t* w, const uint8_t* scales, int64_t K, int64_t N, float* out) {
  constexpr int A = MB == 1 ? 4 : 2;
  const __m512 table = _mm512_loadu_ps(kE2M1);
  // Lanes 0..7 of the low/high vectors of the c-th 32 weights are in block 2c, lanes 8..15 in 2c+1.
  const __m512i block_of_lane[4] = {
      _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
      _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
      _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
      _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
  __m512 acc[MB][A];
  for (auto& a : acc) for (auto& v : a) v = _mm512_setzero_ps();
  steps<128>(K, [&](int64_t k, auto tail) {  // 128 weights: 64 bytes, 8 block scales
    const __mmask64 bytes = first64((K - k) / 2);
    const __m512 s = e4m3x8(scales + k / kBlock, static_cast<__mmask16>(tail ? (1u << (K - k) / kBlock) - 1 : 0xFF));
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {  // in the last step, what is past K reads as 0 (and x is padded)
      const __m512i b = _mm512_cvtepu8_epi32(load16<tail>(w + k / 2 + 16 * c, static_cast<__mmask16>(bytes >> (16 * c))));
      const __m512 sv = _mm512_permutexvar_ps(block_of_lane[c], s);
      __m512 lo = _mm512_permutexvar_ps(b, table);  // the permute reads bits 0..3 only
      __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
      const float* xp = x + k + 32 * c;
      if constexpr (MB == 1) {  // scale the products: one multiply less per 32 weights
        const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xp)));
        acc[0][c % A] = _mm512_fmadd_ps(t, sv, acc[0][c % A]);
      } else {  // scale the weights once for all inputs
        lo = _mm512_mul_ps(lo, sv), hi = _mm512_mul_ps(hi, sv);
        #pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp + m * Kx), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp + m * Kx + 16), acc[m][1]);
        }
      }
    }
  });
  store(acc, N, out);
}

// Rows [n0, n1) of W against all M inputs, into y[m * N + n]: each row is decoded once per 8 inputs.
template <typename Dot>
void rows_times_inputs(int64_t M, int64_t n0, int64_t n1, Dot dot) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) dot.template run<8>(m, n);
    if (M - m >= 4) dot.template run<4>(m, n), m += 4;
    if (M - m >= 2) dot.template run<2>(m, n), m += 2;
    if (M - m >= 1) dot.template run<1>(m, n);
  }
}

struct Fp8Dot {
  const float* x; int64_t Kx; const uint8_t* w; int64_t K, N; float* y;
  template <int MB> void run(int64_t m, int64_t n) const { fp8_dot<MB>(x + m * Kx, Kx, w + n * K, K, N, y + m * N + n); }
};

struct Nvfp4Dot {
  const float* x; int64_t Kx; const uint8_t* w; const uint8_t* s; int64_t K, N; float* y;
  template <int MB> void run(int64_t m, int64_t n) const {
    nvfp4_dot<MB>(x + m * Kx, Kx, w + n * (K / 2), s + n * (K / kBlock), K, N, y + m * N + n);
  }
};

at::Tensor rows_of(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.size(-1) == K, op, ": input features ", x.size(-1), " != weight's ", K);
  auto x2d = x.reshape({-1, K});
  TORCH_CHECK(x2d.size(0) <= kMaxRows, op, ": the CPU kernel takes at most ", kMaxRows, " rows");
  return x2d.to(at::kFloat).contiguous();
}

// The kernels' copy of the inputs: zero padded, reused from call to call (a step's inputs are small).
float* input_buffer(int64_t size) {
  thread_local std::vector<float> buffer;
  buffer.assign(size, 0.f);
  return buffer.data();
}

float scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1, what, " must be a scalar tensor, got shape ", t.sizes());
  return t.scalar_type() == at::kFloat && t.is_cpu() ? *t.data_ptr<float>() : t.item<float>();
}

// y [M, N] (2^-8 times the dots) -> output: times the row scales (and the factor), plus bias.
at::Tensor finish(at::Tensor y, const at::Tensor& x, const float* row_scale, float factor,
                  const c10::optional<at::Tensor>& bias) {
  const int64_t M = y.size(0), N = y.size(1);
  float* yp = y.data_ptr<float>();
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values for ", N, " outputs");
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) yp[m * N + n] = yp[m * N + n] * (row_scale ? row_scale[n] * factor : factor) + (bp ? bp[n] : 0.f);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

at::Tensor fp8_linear(at::Tensor x, at::Tensor w, at::Tensor w_scale, c10::optional<at::Tensor> in_scale,
                      c10::optional<at::Tensor> bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_linear: weight must be a contiguous float8_e4m3fn [N, K] matrix");
  const int64_t N = w.size(0), K = w.size(1), Kx = (K + 63) / 64 * 64;
  auto xf = rows_of(x, K, "fp8_linear");
  const int64_t M = xf.size(0);
  auto scale = w_scale.to(at::kFloat).contiguous();
  TORCH_CHECK(scale.numel() == N, "fp8_linear: weight_scale must have one value per output channel (", N, ")");
  // W8A8 quantizes the inputs to E4M3 with their static scale and reads them back.
  const bool w8a8 = in_scale.has_value() && in_scale->defined();
  const float s = w8a8 ? scalar(*in_scale, "fp8_linear: input_scale") : 1.f;
  const float* src = xf.data_ptr<float>();
  float* xp = input_buffer(M * Kx);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[m * Kx + k] = w8a8 ? e4m3_round(src[m * K + k] / s) * s : src[m * K + k];
  auto y = at::empty({M, N}, xf.options());
  const Fp8Dot dot{xp, Kx, static_cast<const uint8_t*>(w.data_ptr()), K, N, y.data_ptr<float>()};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows_times_inputs(M, n0, n1, dot); });
  return finish(y, x, scale.data_ptr<float>(), kFp16Bias, bias);
}

at::Tensor nvfp4_linear(at::Tensor x, at::Tensor w, at::Tensor w_scale, at::Tensor w_global_scale,
                        c10::optional<at::Tensor> in_global_scale, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte,
              "nvfp4_linear: weight must be a contiguous uint8 [N, K/2] matrix of packed E2M1 pairs");
  const int64_t N = w.size(0), K = 2 * w.size(1), Kx = (K + 127) / 128 * 128;
  TORCH_CHECK(K % kBlock == 0, "nvfp4_linear: K (", K, ") must be a multiple of ", kBlock);
  TORCH_CHECK(w_scale.is_contiguous() && w_scale.scalar_type() == at::kFloat8_e4m3fn && w_scale.numel() == N * K / kBlock,
              "nvfp4_linear: weight_scale must be a contiguous float8_e4m3fn [N, K/16] matrix");
  auto xf = rows_of(x, K, "nvfp4_linear");
  const int64_t M = xf.size(0);
  // The inputs (W4A4: quantized block by block and read back), each 32 reordered even | odd.
  const bool w4a4 = in_global_scale.has_value() && in_global_scale->defined();
  const float in_gs = w4a4 ? scalar(*in_global_scale, "nvfp4_linear: input_global_scale") : 0.f;
  const float* src = xf.data_ptr<float>();
  float* xp = input_buffer(M * Kx);
  float block[kBlock];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += kBlock) {
      const float* b = src + m * K + k;
      if (w4a4) fake_quantize_block(b, in_gs, block);
      else std::copy(b, b + kBlock, block);
      float* d = xp + m * Kx + k / 32 * 32 + (k % 32) / 2;  // this block's 8 even, then 8 odd slots
      for (int i = 0; i < kBlock / 2; ++i) d[i] = block[2 * i], d[16 + i] = block[2 * i + 1];
    }
  auto y = at::empty({M, N}, xf.options());
  const Nvfp4Dot dot{xp, Kx, w.data_ptr<uint8_t>(), static_cast<const uint8_t*>(w_scale.data_ptr()), K, N, y.data_ptr<float>()};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows_times_inputs(M, n0, n1, dot); });
  const float gs = scalar(w_global_scale, "nvfp4_linear: weight_global_scale");
  return finish(y, x, nullptr, gs * kFp16Bias, bias);
}

// Whole matrices (or row tiles) to fp32, exactly as quant_formats' dequantize_* compute them.
at::Tensor fp8_dequantize(at::Tensor w, at::Tensor w_scale) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat8_e4m3fn, "fp8_dequantize: bad weight");
  const int64_t N = w.size(0), K = w.size(1);
  auto scale = w_scale.to(at::kFloat).contiguous();
  auto out = at::empty({N, K}, scale.options());
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m512 s = _mm512_set1_ps(sp[n]), unbias = _mm512_set1_ps(kFp16Bias);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = first16(K - k);
        // Times 2^8 is exact, so the product with the scale rounds once, as q * scale does.
        const __m512 v = _mm512_mul_ps(e4m3x16(load16<true>(wp + n * K + k, mask)), unbias);
        _mm512_mask_storeu_ps(op + n * K + k, mask, _mm512_mul_ps(v, s));
      }
    }
  });
  return out;
}

at::Tensor nvfp4_dequantize(at::Tensor w, at::Tensor w_scale, at::Tensor w_global_scale) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte, "nvfp4_dequantize: bad weight");
  TORCH_CHECK(w_scale.is_contiguous() && w_scale.scalar_type() == at::kFloat8_e4m3fn, "nvfp4_dequantize: bad weight_scale");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(K % kBlock == 0 && w_scale.numel() == N * K / kBlock, "nvfp4_dequantize: weight_scale must be [N, K/16]");
  const float gs = scalar(w_global_scale, "nvfp4_dequantize: weight_global_scale");
  auto out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint8_t* sp = static_cast<const uint8_t*>(w_scale.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * K / kBlock, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = e4m3_value(sp[b]) * gs;
      for (int i = 0; i < kBlock / 2; ++i) {
        const uint8_t byte = wp[b * kBlock / 2 + i];
        op[b * kBlock + 2 * i] = kE2M1[byte & 0xF] * s;
        op[b * kBlock + 2 * i + 1] = kE2M1[byte >> 4] * s;
      }
    }
  });
  return out;
}
