// linear.cpp's blocked GEMM, for kernels that produce prepacked fp32 weights on the fly (quant_linear.cpp
// decodes a column group into this layout and runs it over all rows) or hold many prepacked weights (moe.cpp's experts).
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>

namespace llmc {

// y[m][n0 + j] (j < 16 blocks, n0 + j < N; y is [M, N]) = x[m] . W column n0 + j + bias[n0 + j], for all M rows of x
// [M, K] and `blocks` consecutive column blocks of a prepacked fp32 weight: block b is w[b][k][16], K * 16 floats
// apart. Serial: callers split the columns among threads. bias may be null.
void blocked_gemm_columns(const float* x, int64_t M, int64_t K, const float* w, int64_t blocks, const float* bias,
                          float* y, int64_t N, int64_t n0);
// The same for a prepacked bf16 weight (K even, pairs of k: [K / 2][16][2] per block), summed in fp32, y rounded to bf16.
void blocked_gemm_columns(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, int64_t blocks,
                          const float* bias, c10::BFloat16* y, int64_t N, int64_t n0);

// The same with y left in fp32 (attention's scores and weighted values).
void blocked_gemm_columns(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, int64_t blocks,
                          const float* bias, float* y, int64_t N, int64_t n0);

// The column blocks a tile of `rows` rows runs at once: a thread's share of the columns is best a multiple of it.
int64_t blocked_gemm_group(int64_t rows);

}  // namespace llmc
