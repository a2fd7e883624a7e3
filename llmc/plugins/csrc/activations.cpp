// llmc::gated_activation for CPU: out = act(gate) * up in one pass over each row, act in {silu, gelu,
// gelu_tanh}. The math is torch's own vectorized math (ATen's Vectorized: Sleef's exp and tanh, ATen's
// erf), in the formulas of torch's activation kernels, so outputs equal the reference's wherever torch
// takes its vector path (the reference differs where torch takes another: std::exp in a kernel's scalar
// tail, oneDNN's GELU for contiguous fp32 / bf16). AVX-512 or AVX2 as compiled for, else ATen's portable
// per-lane loops. bf16 and fp16 are computed in fp32 and rounded after the activation and after the
// product, as the reference's two ops round.
// Inputs the kernel does not take (broadcast shapes, mixed dtypes) run the reference's ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <cmath>
#include "parallel.h"

namespace llmc::activations_kernel {

using at::vec::Vectorized;

struct Silu {
  template <typename V>
  V operator()(V x) const { return x / (V(1) + x.neg().exp()); }
};

struct Gelu {
  template <typename V>
  V operator()(V x) const { return x * V(0.5) * (V(1) + (x * V(M_SQRT1_2)).erf()); }
};

struct GeluTanh {
  template <typename V>
  V operator()(V x) const {
    const V inner = V(M_SQRT2 * M_2_SQRTPI * 0.5) * (x + V(0.044715) * (x * x * x));
    return V(0.5) * x * (V(1) + inner.tanh());
  }
};

template <typename T, typename Act>
Vectorized<T> gated(Vectorized<T> gate, Vectorized<T> up, Act act) {
  if constexpr (at::is_reduced_floating_point_v<T>) {
    auto [g0, g1] = at::vec::convert_to_float<T>(gate);
    auto [a0, a1] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(act(g0), act(g1)));
    auto [u0, u1] = at::vec::convert_to_float<T>(up);
    return at::vec::convert_from_float<T>(a0 * u0, a1 * u1);
  } else {
    return act(gate) * up;
  }
}

// Rows of H values; gate and up rows may lie further apart (the halves of a merged gate/up linear).
template <typename T, typename Act>
void gated_rows(const T* gate, int64_t gate_stride, const T* up, int64_t up_stride, T* out, int64_t rows,
                       int64_t H, Act act) {
  using Vec = Vectorized<T>;
  // Tasks of at least 16K values, torch's own threshold for threading GELU: smaller ones cost more to
  // hand to a thread than to compute (a decode step's rows run on the calling thread).
  llmc::parallel_for(0, rows, std::max<int64_t>(1, 16384 / H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < H; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), H - i);
        const Vec g = Vec::loadu(gate + r * gate_stride + i, n), u = Vec::loadu(up + r * up_stride + i, n);
        gated<T>(g, u, act).store(out + r * H + i, n);
      }
  });
}

template <typename Act>
at::Tensor gated_activation_with(const at::Tensor& gate, const at::Tensor& up, Act act) {
  auto out = at::empty(gate.sizes(), gate.options());
  const int64_t H = gate.size(-1);
  if (out.numel() == 0) return out;
  // [rows, H] views where the strides allow (a split's halves do), copies otherwise.
  auto g = gate.reshape({-1, H}), u = up.reshape({-1, H});
  if (g.stride(1) != 1) g = g.contiguous();
  if (u.stride(1) != 1) u = u.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "gated_activation", [&] {
    gated_rows<scalar_t>(g.data_ptr<scalar_t>(), g.stride(0), u.data_ptr<scalar_t>(), u.stride(0), out.data_ptr<scalar_t>(),
                         g.size(0), H, act);
  });
  return out;
}

at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, c10::string_view act) {
  TORCH_CHECK(act == "silu" || act == "gelu" || act == "gelu_tanh", "gated_activation: unknown activation '", act,
              "' (silu, gelu or gelu_tanh)");
  if (gate.dim() == 0 || gate.sizes() != up.sizes() || gate.scalar_type() != up.scalar_type() ||
      !at::isFloatingType(gate.scalar_type())) {
    if (act == "silu") return at::silu(gate) * up;
    return at::gelu(gate, act == "gelu" ? "none" : "tanh") * up;
  }
  if (act == "silu") return gated_activation_with(gate, up, Silu{});
  if (act == "gelu") return gated_activation_with(gate, up, Gelu{});
  return gated_activation_with(gate, up, GeluTanh{});
}

}  // namespace llmc::activations_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("gated_activation", &llmc::activations_kernel::gated_activation); }
