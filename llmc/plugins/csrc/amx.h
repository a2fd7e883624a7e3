// bf16 products on AMX tiles (Intel Xeon from Sapphire Rapids on), over linear.cpp's prepacked bf16 layout: a
// column block's [K / 2][16][2] pairs are, 16 pairs of k at a time, exactly the B operand of TDPBF16PS (16 rows of
// 64 bytes), so a weight needs no other packing. One TDPBF16PS multiplies 16 rows of x by 32 k by 16 columns: about
// 8 times the products of AVX512-BF16's VDPBF16PS per cycle. Built only at the avx512bf16 level (every AMX CPU has
// AVX512-BF16), with the AMX instructions enabled per function; used where `available()` says the CPU has them
// and Linux lets this process use the tile registers.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
#include <cstring>

namespace llmc {
namespace amx {

constexpr int64_t kRows = 16;   // rows of x in an A tile, and of y in a C tile
constexpr int64_t kChunk = 32;  // k in an A tile (64 bytes of bf16), and in a B tile (16 pairs of k x 16 columns)
constexpr int64_t kCols = 16;   // columns of a B and a C tile: one prepacked column block

inline bool available() {
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool granted = __builtin_cpu_supports("amx-bf16") &&
                              syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return granted;
}

// The tile registers, for one thread's run of panels (the configuration is the thread's, and other code, oneDNN's
// among it, configures tiles too): C tiles 0-3 (row tile i, column block j at 2 i + j), A tiles 4-5, B tiles 6-7.
// A row tile may have fewer than 16 rows; releasing the tiles at the end spares the OS saving them.
class Tiles {
 public:
  ~Tiles() { if (rows_[0]) release(); }

  __attribute__((target("amx-tile"))) void configure(int rows0, int rows1) {
    if (rows0 == rows_[0] && rows1 == rows_[1]) return;
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {};
      uint8_t rows[16] = {};
    } config;
    const int rows[2] = {rows0, rows1};
    for (int i = 0; i < 2; ++i) {
      if (!rows[i]) continue;
      for (int j = 0; j < 2; ++j) config.colsb[2 * i + j] = 64, config.rows[2 * i + j] = rows[i];  // C: rows x 16 fp32
      config.colsb[4 + i] = 64, config.rows[4 + i] = rows[i];                                         // A: rows x 32 bf16
    }
    for (int j = 0; j < 2; ++j) config.colsb[6 + j] = 64, config.rows[6 + j] = kChunk / 2;          // B: 16 pairs x 16
    // _tile_loadconfig tells the compiler it reads 8 bytes: without this, the rest of `config` may never be stored
    asm volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
    rows_[0] = rows0, rows_[1] = rows1;
  }

 private:
  __attribute__((target("amx-tile"))) static void release() { _tile_release(); }
  int rows_[2] = {0, 0};
};

// out[i][j] (16 x 16 fp32, row-major; only the configured rows written) = row tile i of x . column block j of W,
// over all K (a multiple of 32). x is [rows, K] bf16 with rows RT tiles as configured; block j is at w + j * stride.
template <int RT, int CB>
__attribute__((target("amx-tile,amx-bf16"))) void panel(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w,
                                                        int64_t stride, float (*out)[2][kRows * kCols]) {
  const int64_t ldx = K * sizeof(c10::BFloat16), ldw = kCols * 2 * sizeof(c10::BFloat16);
  _tile_zero(0);
  if constexpr (CB == 2) _tile_zero(1);
  if constexpr (RT == 2) _tile_zero(2);
  if constexpr (RT == 2 && CB == 2) _tile_zero(3);
  for (int64_t k = 0; k < K; k += kChunk) {
    // B tiles two steps ahead into L1 (a tile load waits for the products reading its register, so L2's latency
    // would stall each step; 5-10 % faster). Past the block's end they touch the next block's, harmlessly.
    const char* ahead = reinterpret_cast<const char*>(w + (k + 2 * kChunk) * kCols);
    for (int64_t line = 0; line < 1024; line += 64) {
      _mm_prefetch(ahead + line, _MM_HINT_T0);
      if constexpr (CB == 2) _mm_prefetch(ahead + stride * sizeof(c10::BFloat16) + line, _MM_HINT_T0);
    }
    _tile_loadd(4, x + k, ldx);
    if constexpr (RT == 2) _tile_loadd(5, x + kRows * K + k, ldx);
    _tile_loadd(6, w + k * kCols, ldw);
    if constexpr (CB == 2) _tile_loadd(7, w + stride + k * kCols, ldw);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (CB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RT == 2 && CB == 2) _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t ldo = kCols * sizeof(float);
  _tile_stored(0, out[0][0], ldo);
  if constexpr (CB == 2) _tile_stored(1, out[0][1], ldo);
  if constexpr (RT == 2) _tile_stored(2, out[1][0], ldo);
  if constexpr (RT == 2 && CB == 2) _tile_stored(3, out[1][1], ldo);
}

inline void panel(int row_tiles, int blocks, const c10::BFloat16* x, int64_t K, const c10::BFloat16* w, int64_t stride,
                  float (*out)[2][kRows * kCols]) {
  if (row_tiles == 2)
    blocks == 2 ? panel<2, 2>(x, K, w, stride, out) : panel<2, 1>(x, K, w, stride, out);
  else
    blocks == 2 ? panel<1, 2>(x, K, w, stride, out) : panel<1, 1>(x, K, w, stride, out);
}

}  // namespace amx
}  // namespace llmc
