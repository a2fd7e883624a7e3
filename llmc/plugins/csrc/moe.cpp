// llmc::moe for CPU (plugins/moe.py is the definition): the (token, slot) pairs routed to each of this rank's
// experts are bucketed in one pass over the router's ids, then each expert with tokens runs its two matrix
// products on just its rows (ATen's GEMM, as the reference) and its weighted rows are added into an fp32
// sum with the reference's ops, in its order (experts ascending, tokens ascending within one). Optional biases
// and GPT-OSS's clamped SwiGLU are the reference's ops too.
// Plain C++ and ATen only: it compiles and runs alike at every ISA level.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <optional>
#include <string>
#include <vector>

namespace llmc::moe_kernel {

at::Tensor glu(const at::Tensor& gate, const at::Tensor& up, const std::string& act, double alpha, double limit) {
  if (act == "clamped_swiglu") {
    auto g = at::clamp_max(gate, limit);
    return (at::clamp_max(at::clamp_min(up, -limit), limit) + 1) * (g * at::sigmoid(g * alpha));
  }
  if (act == "silu") return at::silu(gate) * up;
  if (act == "gelu") return at::gelu(gate) * up;
  return at::gelu(gate, "tanh") * up;
}

std::optional<at::Tensor> bias_of(const std::optional<at::Tensor>& bias, int64_t e) {
  return bias.has_value() ? std::optional<at::Tensor>((*bias)[e]) : std::nullopt;
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
               const at::Tensor& gate_up, const at::Tensor& down, c10::string_view act_view, int64_t first_expert,
               const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias,
               double swiglu_alpha, double swiglu_limit) {
  const std::string act(act_view);
  TORCH_CHECK(act == "silu" || act == "gelu" || act == "gelu_tanh" || act == "clamped_swiglu",
              "moe: unknown activation ", act);
  TORCH_CHECK(x.dim() == 2, "moe: x must be [tokens, hidden], got ", x.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_ids.scalar_type() == at::kLong,
              "moe: topk_ids must be int64 [tokens, k], got ", topk_ids.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && at::isFloatingType(topk_weights.scalar_type()),
              "moe: topk_weights must be floating [tokens, k] like topk_ids, got ", topk_weights.sizes());
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0) &&
                  gate_up.size(2) == x.size(1) && down.size(1) == x.size(1) && gate_up.size(1) == 2 * down.size(2),
              "moe: expert weights gate_up ", gate_up.sizes(), " and down ", down.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK(gate_up.scalar_type() == x.scalar_type() && down.scalar_type() == x.scalar_type(),
              "moe: expert weights must have x's dtype");
  TORCH_CHECK(!gate_up_bias.has_value() || (gate_up_bias->sizes() == gate_up.sizes().slice(0, 2) &&
                                            gate_up_bias->scalar_type() == x.scalar_type()),
              "moe: gate_up_bias must be [experts, 2 x intermediate] like gate_up's rows, in x's dtype");
  TORCH_CHECK(!down_bias.has_value() || (down_bias->sizes() == down.sizes().slice(0, 2) &&
                                         down_bias->scalar_type() == x.scalar_type()),
              "moe: down_bias must be [experts, hidden] like down's rows, in x's dtype");
  const int64_t T = x.size(0), K = topk_ids.size(1), E = gate_up.size(0);
  auto ids = topk_ids.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> tokens(E), slots(E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = id[t * K + k] - first_expert;
      if (e >= 0 && e < E) {  // another rank's expert otherwise
        tokens[e].push_back(t);
        slots[e].push_back(k);
      }
    }
  auto out = at::zeros({T, x.size(1)}, x.options().dtype(at::kFloat));
  auto weights = topk_weights.to(at::kFloat);
  for (int64_t e = 0; e < E; ++e) {
    if (tokens[e].empty()) continue;
    const int64_t n = static_cast<int64_t>(tokens[e].size());
    auto rows = at::from_blob(tokens[e].data(), {n}, at::kLong);
    auto cols = at::from_blob(slots[e].data(), {n}, at::kLong);
    auto gu = at::linear(x.index_select(0, rows), gate_up[e], bias_of(gate_up_bias, e)).chunk(2, -1);
    auto y = at::linear(glu(gu[0], gu[1], act, swiglu_alpha, swiglu_limit), down[e], bias_of(down_bias, e))
                 .to(at::kFloat);
    out.index_add_(0, rows, y * at::index(weights, {rows, cols}).unsqueeze(1));
  }
  return out.to(x.scalar_type());
}

}  // namespace llmc::moe_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) { m.impl("moe", &llmc::moe_kernel::moe); }
