// linear.cpp's blocked fp32 GEMM, for kernels that produce prepacked fp32 weights on the fly (quant_linear.cpp
// decodes a column group into this layout and runs it over all rows).
#pragma once
#include <cstdint>

namespace llmc {

// y[m][n0 + j] (j < 16 blocks, n0 + j < N; y is [M, N]) = x[m] . W column n0 + j + bias[n0 + j], for all M rows of x
// [M, K] and `blocks` consecutive column blocks of a prepacked fp32 weight: block b is w[b][k][16], K * 16 floats
// apart. Serial: callers split the columns among threads. bias may be null.
void blocked_gemm_columns(const float* x, int64_t M, int64_t K, const float* w, int64_t blocks, const float* bias,
                          float* y, int64_t N, int64_t n0);

}  // namespace llmc
