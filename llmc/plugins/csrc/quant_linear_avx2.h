// quant_linear.cpp's kernels for the AVX2 level (AVX2, FMA, F16C): the same layout, algorithm and numerics as its
// AVX-512 code, 8 lanes a vector and 16 registers. Included by quant_linear.cpp after the level-independent
// constants and scalar helpers, in place of the AVX-512 code.
//
// What differs from the AVX-512 code, and why:
// - E2M1 -> fp32: _mm256_permutevar8x32_ps looks the magnitude (bits 0..2) up in an 8-entry table and bit 3 becomes
//   the sign: the same floats as the 16-entry table, -0 included.
// - 16 registers hold fewer accumulators: a group of 64 outputs is computed as tiles of NB vectors (all 8, or halves)
//   against 1 or 2 rows at a time, and more rows go to the dequantize + blocked GEMM path sooner (kDecodeMaxRows:
//   5 rows for E4M3, 2 for E2M1, against 12 with AVX-512).
// - E2M1 -> fp32 by byte-table lookups and unpacks (e2m1x64), not by the permute: on an AVX2 AMD EPYC (Zen 3) one core
//   then decodes and multiplies about 13.6 G E2M1 weights/s at one row (weights in L2), against 10 G with the permute.
//   E4M3 stays on vcvtph2ps (about 13 G weights/s, its issue rate): an exact route without it costs more.
#pragma once
#include <immintrin.h>
#include <climits>

namespace llmc::quant_linear_kernel {

constexpr int64_t kVec = 8;                 // outputs per vector
constexpr int kVecs = kGroup / kVec;        // vectors per group
constexpr int64_t kGemmBlock = 16;          // blocked_gemm.h's column block
constexpr float kE2M1Magnitude[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};

// ---- vector decoding ----

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }

// 8 E4M3 bytes -> 8 floats, each 2^-8 times its value (quant_linear.cpp's fp16 bit trick).
inline __m256 e4m3x8(__m128i bytes) {
  const __m128i h = _mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7);
  return _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

// E2M1 codes in bits 0..3 of each lane (higher bits below 2^28 ignored) -> their values.
inline __m256 e2m1x8(__m256i codes, __m256 magnitudes) {
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(codes, 28), _mm256_set1_epi32(INT_MIN));
  return _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, codes), _mm256_castsi256_ps(sign));
}

// All ones in the lanes below n (maskload / maskstore's mask).
inline __m256i lanes_below(int64_t n) {
  const int count = static_cast<int>(std::min<int64_t>(std::max<int64_t>(n, 0), kVec));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

// ---- activations quantized and read back (W8A8, W4A4), bit for bit as the scalar formats ----

// e4m3_round of each lane: the AVX-512 code's e4m3_round16, 8 lanes.
inline __m256 e4m3_round8(__m256 v) {
  const __m256 a = _mm256_min_ps(abs8(v), _mm256_set1_ps(kE4M3Max));  // NaN -> 448, restored below
  __m256i bits = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFFF), lsb));
  const __m256 normal = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xFFF00000))));
  const __m256 magic = _mm256_set1_ps(16384.f);
  const __m256 subnormal = _mm256_sub_ps(_mm256_add_ps(a, magic), magic);
  __m256 r = _mm256_blendv_ps(normal, subnormal, _mm256_cmp_ps(a, _mm256_set1_ps(0x1p-6f), _CMP_LT_OQ));
  r = _mm256_or_ps(r, _mm256_and_ps(v, _mm256_set1_ps(-0.f)));
  return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

void fake_quantize_fp8(float* x, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n; i += kVec) {
    const __m256i mask = lanes_below(n - i);
    const __m256 v = _mm256_maskload_ps(x + i, mask);
    _mm256_maskstore_ps(x + i, mask, _mm256_mul_ps(e4m3_round8(_mm256_div_ps(v, s)), s));
  }
}

void fake_quantize_nvfp4_block(float* x, float global_scale) {
  const __m256 v[2] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + kVec)};
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(abs8(v[0])), _mm256_extractf128_ps(abs8(v[0]), 1));
  m = _mm_max_ps(m, _mm_max_ps(_mm256_castps256_ps128(abs8(v[1])), _mm256_extractf128_ps(abs8(v[1]), 1)));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const float scale = e4m3_round(amax / kE2M1Max / global_scale) * global_scale;
  const __m256 magnitudes = _mm256_loadu_ps(kE2M1Magnitude), divisor = _mm256_set1_ps(scale > 0.f ? scale : 1.f);
  for (int h = 0; h < 2; ++h) {
    const __m256 q = _mm256_div_ps(v[h], divisor), a = abs8(q);
    // The code: the magnitude's index counts the midpoints below it (ties to even: > or >=), bit 3 the sign. A true
    // comparison is -1: subtracting it counts.
    __m256i code = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(q), 28), _mm256_set1_epi32(8));
    for (const float mid : {.25f, 1.25f, 2.5f, 5.f})
      code = _mm256_sub_epi32(code, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(mid), _CMP_GT_OQ)));
    for (const float mid : {.75f, 1.75f, 3.5f})
      code = _mm256_sub_epi32(code, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(mid), _CMP_GE_OQ)));
    code = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(code), _mm256_castsi256_ps(_mm256_set1_epi32(8)),
                                                _mm256_cmp_ps(q, q, _CMP_UNORD_Q)));  // NaN: code 8
    _mm256_storeu_ps(x + h * kVec, _mm256_mul_ps(e2m1x8(code, magnitudes), _mm256_set1_ps(scale)));
  }
}

// ---- decode path: MB rows of x [*, K] against NB vectors of one group (w, scales: at the first), into acc ----

template <int MB, int NB>
void fp8_tile(const float* x, int64_t K, const uint8_t* w, __m256 (&acc)[MB][NB]) {
  for (int64_t k = 0; k < K; ++k) {
    prefetch_row(w + (k + kPrefetchRows) * kGroup);
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_set1_ps(x[m * K + k]);
    for (int b = 0; b < NB; ++b) {
      const __m256 wv = e4m3x8(load8(w + k * kGroup + b * kVec));
      for (int m = 0; m < MB; ++m) acc[m][b] = _mm256_fmadd_ps(xv[m], wv, acc[m][b]);
    }
  }
}

// E2M1 -> fp32 for 32 outputs' two codes a byte (32 bytes of a group's row, at p), in output order: lo[b] the codes in
// bits 0..3 (k even) of outputs 8b..8b+7, hi[b] those in bits 4..7 (k odd). Neither the 8-entry permute and sign (10
// instructions per 16 weights) nor vcvtph2ps (one 8-lane conversion per 2 cycles on Zen 3): two byte tables give each
// value's fp32 bytes 3 and 2 (its bf16: the exact values, -0 included; bytes 1 and 0 are zero), unpacks interleave them
// into dwords, and the dword permute first puts outputs 4j..4j+3 where the in-lane unpacks take them from, so that they
// come out in order.
inline void e2m1x64(const uint8_t* p, __m256 (&lo)[4], __m256 (&hi)[4]) {
  const __m256i byte3 = _mm256_setr_epi8(0, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, -128, -65, -65, -65, -64, -64, -64, -64,
                                         0, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, -128, -65, -65, -65, -64, -64, -64, -64);
  const __m256i byte2 = _mm256_setr_epi8(0, 0, -128, -64, 0, 0x40, -128, -64, 0, 0, -128, -64, 0, 0x40, -128, -64,
                                         0, 0, -128, -64, 0, 0x40, -128, -64, 0, 0, -128, -64, 0, 0x40, -128, -64);
  const __m256i nibble = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i v = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  const __m256i codes[2] = {_mm256_and_si256(v, nibble), _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble)};
  __m256* out[2] = {lo, hi};
  for (int h = 0; h < 2; ++h) {
    const __m256i b3 = _mm256_shuffle_epi8(byte3, codes[h]), b2 = _mm256_shuffle_epi8(byte2, codes[h]);
    const __m256i bf16[2] = {_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3)};
    for (int j = 0; j < 2; ++j) {
      out[h][2 * j] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bf16[j]));
      out[h][2 * j + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bf16[j]));
    }
  }
}

// Also times the global scale's inverse, as the AVX-512 code: one row sums each block unscaled and scales the sum;
// several rows scale the weights once for all of them. Half a group a tile (NB = 4: e2m1x64's 32 outputs).
template <int MB, int NB>
void nvfp4_tile(const float* x, int64_t K, const uint8_t* w, const uint8_t* scales, __m256 (&acc)[MB][NB]) {
  static_assert(NB == 4, "a tile is e2m1x64's 32 outputs");
  for (int64_t c = 0; c < K / kBlock; ++c) {
    __m256 part[NB], s[NB];
    for (int b = 0; b < NB; ++b) part[b] = _mm256_setzero_ps(), s[b] = e4m3x8(load8(scales + c * kGroup + b * kVec));
    prefetch_row(scales + (c + kPrefetchRows / 8) * kGroup);
    for (int64_t p = 0; p < kBlock / 2; ++p) {
      const int64_t k = c * kBlock + 2 * p;
      prefetch_row(w + (k / 2 + kPrefetchRows) * kGroup);
      __m256 lo[NB], hi[NB];
      e2m1x64(w + (k / 2) * kGroup, lo, hi);
      for (int b = 0; b < NB; ++b) {
        if constexpr (MB == 1) {
          part[b] = _mm256_fmadd_ps(_mm256_set1_ps(x[k]), lo[b], part[b]);
          part[b] = _mm256_fmadd_ps(_mm256_set1_ps(x[k + 1]), hi[b], part[b]);
        } else {
          const __m256 l = _mm256_mul_ps(lo[b], s[b]), h = _mm256_mul_ps(hi[b], s[b]);
          for (int m = 0; m < MB; ++m) {
            acc[m][b] = _mm256_fmadd_ps(_mm256_set1_ps(x[m * K + k]), l, acc[m][b]);
            acc[m][b] = _mm256_fmadd_ps(_mm256_set1_ps(x[m * K + k + 1]), h, acc[m][b]);
          }
        }
      }
    }
    if constexpr (MB == 1)
      for (int b = 0; b < NB; ++b) acc[0][b] = _mm256_fmadd_ps(part[b], s[b], acc[0][b]);
  }
}

// ---- the two formats: a tile at vector v0 of group g, its fp32 dequantization, the output scale ----

struct Fp8Weights {
  const uint8_t* w; const float* channel_scale; int64_t K;
  static constexpr int kTileVecs[3] = {0, 8, 4};  // per rows (1, 2): accumulators + broadcasts + a weight <= 16
  static constexpr int64_t kDecodeMaxRows = 5;  // above: dequantize once for all rows (measured on an AVX2 EPYC)
  template <int MB, int NB> void tile(const float* x, int64_t g, int v0, __m256 (&acc)[MB][NB]) const {
    fp8_tile<MB, NB>(x, K, w + g * K * kGroup + v0 * kVec, acc);
  }
  __m256 output_scale(int64_t n, __m256i mask) const {
    return _mm256_mul_ps(_mm256_maskload_ps(channel_scale + n, mask), _mm256_set1_ps(kFp16Bias));
  }
  // out[b][k][j] = W[64 g + 16 b + j][k], as quant_formats.dequantize_fp8: (q * 2^8 exact) * scale.
  void dequantize(int64_t g, int64_t N, float* out) const {
    __m256 s[kVecs];
    for (int v = 0; v < kVecs; ++v) s[v] = output_scale(g * kGroup + v * kVec, lanes_below(N - g * kGroup - v * kVec));
    for (int64_t k = 0; k < K; ++k)
      for (int v = 0; v < kVecs; ++v)
        _mm256_storeu_ps(out + ((v / 2) * K + k) * kGemmBlock + (v % 2) * kVec,
                         _mm256_mul_ps(e4m3x8(load8(w + (g * K + k) * kGroup + v * kVec)), s[v]));
  }
};

struct Nvfp4Weights {
  const uint8_t* w; const uint8_t* block_scales; float global_scale; int64_t K;
  static constexpr int kTileVecs[3] = {0, 4, 4};  // one row: 4 sums + 4 accumulators + decoding; two: 8 + decoding
  static constexpr int64_t kDecodeMaxRows = 2;  // E2M1 costs more to decode than E4M3: dequantizing pays off sooner
  template <int MB, int NB> void tile(const float* x, int64_t g, int v0, __m256 (&acc)[MB][NB]) const {
    nvfp4_tile<MB, NB>(x, K, w + g * (K / 2) * kGroup + v0 * kVec, block_scales + g * (K / kBlock) * kGroup + v0 * kVec, acc);
  }
  __m256 output_scale(int64_t, __m256i) const { return _mm256_set1_ps(global_scale * kFp16Bias); }
  // As quant_formats.dequantize_nvfp4: e2m1 * (block scale * global scale).
  void dequantize(int64_t g, int64_t, float* out) const {
    const __m256 magnitudes = _mm256_loadu_ps(kE2M1Magnitude), gs = _mm256_set1_ps(global_scale * kFp16Bias);
    const uint8_t* wg = w + g * (K / 2) * kGroup;
    const uint8_t* sg = block_scales + g * (K / kBlock) * kGroup;
    for (int64_t k = 0; k < K; k += 2)
      for (int v = 0; v < kVecs; ++v) {
        const __m256 s = _mm256_mul_ps(e4m3x8(load8(sg + (k / kBlock) * kGroup + v * kVec)), gs);
        const __m256i codes = _mm256_cvtepu8_epi32(load8(wg + (k / 2) * kGroup + v * kVec));
        float* o = out + ((v / 2) * K + k) * kGemmBlock + (v % 2) * kVec;
        _mm256_storeu_ps(o, _mm256_mul_ps(e2m1x8(codes, magnitudes), s));
        _mm256_storeu_ps(o + kGemmBlock, _mm256_mul_ps(e2m1x8(_mm256_srli_epi32(codes, 4), magnitudes), s));
      }
  }
};

// y[m][64 g + ...] = acc * scale(n) + bias(n) for MB rows, the whole group in tiles of NB vectors.
template <int MB, typename Weights>
void decode_rows(const Weights& weights, const float* x, int64_t g, const float* bias, float* y, int64_t N) {
  constexpr int NB = Weights::kTileVecs[MB];
  for (int v0 = 0; v0 < kVecs && g * kGroup + v0 * kVec < N; v0 += NB) {
    __m256 acc[MB][NB];
    for (auto& row : acc) for (auto& a : row) a = _mm256_setzero_ps();
    weights.template tile<MB, NB>(x, g, v0, acc);
    for (int b = 0; b < NB; ++b) {
      const int64_t n = g * kGroup + (v0 + b) * kVec;
      if (n >= N) break;
      const __m256i mask = lanes_below(N - n);
      const __m256 sv = weights.output_scale(n, mask);
      const __m256 bv = bias ? _mm256_maskload_ps(bias + n, mask) : _mm256_setzero_ps();
      for (int m = 0; m < MB; ++m) _mm256_maskstore_ps(y + m * N + n, mask, _mm256_fmadd_ps(acc[m][b], sv, bv));
    }
  }
}

// y [M, N] = x [M, K] dequant(W)^T + bias: threads split the groups of 64 outputs.
template <typename Weights>
void quantized_gemm(const Weights& weights, const float* x, int64_t M, int64_t K, const float* bias, float* y, int64_t N) {
  const int64_t groups = (N + kGroup - 1) / kGroup;
  if (M <= Weights::kDecodeMaxRows)
    return llmc::parallel_for_each(groups, [&](int64_t g) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) decode_rows<2>(weights, x + m * K, g, bias, y + m * N, N);
      if (m < M) decode_rows<1>(weights, x + m * K, g, bias, y + m * N, N);
    });
  llmc::parallel_for_each(groups, [&](int64_t g) {
    thread_local std::vector<float> tile;
    tile.resize(kGroup * K);
    weights.dequantize(g, N, tile.data());
    blocked_gemm_columns(x, M, K, tile.data(), std::min<int64_t>(kGroup / kGemmBlock, (N - g * kGroup + kGemmBlock - 1) / kGemmBlock),
                         bias, y, N, g * kGroup);
  });
}

}  // namespace llmc::quant_linear_kernel
