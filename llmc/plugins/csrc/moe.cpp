// llmc::moe for CPU (plugins/moe.py is the definition): the (token, slot) pairs routed to each of this rank's
// experts are bucketed in one pass over the router's ids, then each expert with tokens runs its two matrix
// products on just its rows (ATen's GEMM, as the reference) and its weighted rows are added into an fp32
// sum with the reference's ops, in its order (experts ascending, tokens ascending within one). Optional biases
// and GPT-OSS's clamped SwiGLU are the reference's ops too.
//
// llmc::prepacked_moe is the same layer over expert weights prepacked at load (plugins/moe.py, prepack_experts),
// each in linear.cpp's column blocks: the chosen experts' rows, grouped by expert, run linear.cpp's blocked GEMM
// (blocked_gemm.h) on each expert's weights, every (expert, column group) of a product a piece of work for the
// threads, so a decode step streams each chosen expert's weights once, split among all threads. Activation and
// the weighted sum are the reference's ops over all rows at once.
// Plain C++, ATen and linear.cpp's kernel only: it compiles and runs alike at every ISA level.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <optional>
#include <string>
#include <vector>
#include "blocked_gemm.h"
#include "parallel.h"

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

void check_routing(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights, const std::string& act) {
  TORCH_CHECK(act == "silu" || act == "gelu" || act == "gelu_tanh" || act == "clamped_swiglu",
              "moe: unknown activation ", act);
  TORCH_CHECK(x.dim() == 2, "moe: x must be [tokens, hidden], got ", x.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_ids.scalar_type() == at::kLong,
              "moe: topk_ids must be int64 [tokens, k], got ", topk_ids.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && at::isFloatingType(topk_weights.scalar_type()),
              "moe: topk_weights must be floating [tokens, k] like topk_ids, got ", topk_weights.sizes());
}

// tokens[e], slots[e]: the (token, slot) pairs routed to this rank's expert e, tokens ascending.
void route(const at::Tensor& topk_ids, int64_t first_expert, int64_t E, std::vector<std::vector<int64_t>>& tokens,
           std::vector<std::vector<int64_t>>& slots) {
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1);
  auto ids = topk_ids.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  tokens.assign(E, {});
  slots.assign(E, {});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = id[t * K + k] - first_expert;
      if (e >= 0 && e < E) {  // another rank's expert otherwise
        tokens[e].push_back(t);
        slots[e].push_back(k);
      }
    }
}

std::optional<at::Tensor> bias_of(const std::optional<at::Tensor>& bias, int64_t e) {
  return bias.has_value() ? std::optional<at::Tensor>((*bias)[e]) : std::nullopt;
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
               const at::Tensor& gate_up, const at::Tensor& down, c10::string_view act_view, int64_t first_expert,
               const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias,
               double swiglu_alpha, double swiglu_limit) {
  const std::string act(act_view);
  check_routing(x, topk_ids, topk_weights, act);
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
  const int64_t T = x.size(0), E = gate_up.size(0);
  std::vector<std::vector<int64_t>> tokens, slots;
  route(topk_ids, first_expert, E, tokens, slots);
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

// y[rows of expert a] = x[those rows] W_e^T + bias[e] for each active expert a (e = experts[a], its rows
// offsets[a] to offsets[a + 1] of x and y), W_e the e-th of w's prepacked weights ([blocks, K, 16] or bf16 pairs).
template <typename T>
void experts_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& y,
                  const std::vector<int64_t>& experts, const std::vector<int64_t>& offsets) {
  const int64_t K = x.size(1), N = y.size(1), blocks = (N + 15) / 16, per_expert = w[0].numel();
  struct Work { int64_t active, first_block, blocks; };
  std::vector<Work> work;
  for (size_t a = 0; a < experts.size(); ++a) {
    const int64_t group = blocked_gemm_group(offsets[a + 1] - offsets[a]);
    for (int64_t b = 0; b < blocks; b += group) work.push_back({static_cast<int64_t>(a), b, std::min(group, blocks - b)});
  }
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  T* yp = y.data_ptr<T>();
  llmc::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Work& piece = work[i];
      const int64_t e = experts[piece.active], row = offsets[piece.active];
      blocked_gemm_columns(xp + row * K, offsets[piece.active + 1] - row, K, wp + e * per_expert + piece.first_block * K * 16,
                           piece.blocks, bp ? bp + e * N : nullptr, yp + row * N, N, piece.first_block * 16);
    }
  });
}

// x's rows padded with zero features to K (a bf16 weight's K is even), contiguous.
at::Tensor padded(const at::Tensor& x, int64_t K) {
  return (x.size(1) == K ? x : at::constant_pad_nd(x, {0, K - x.size(1)})).contiguous();
}

at::Tensor prepacked_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                         const at::Tensor& gate_up, const at::Tensor& down, c10::string_view act_view, int64_t first_expert,
                         const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias,
                         double swiglu_alpha, double swiglu_limit, int64_t out_features) {
  const std::string act(act_view);
  check_routing(x, topk_ids, topk_weights, act);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || x.scalar_type() == at::kFloat) && gate_up.scalar_type() == x.scalar_type() &&
                  down.scalar_type() == x.scalar_type(),
              "prepacked_moe: x and the expert weights must be all float32 or all bfloat16");
  const int64_t dims = bf16 ? 5 : 4, pair = bf16 ? 2 : 1;  // [E, N / 16, K, 16] or [E, N / 16, K / 2, 16, 2]
  const auto packed = [&](const at::Tensor& w) {
    return w.dim() == dims && w.size(3) == 16 && (!bf16 || w.size(4) == 2) && w.size(0) == gate_up.size(0);
  };
  TORCH_CHECK(packed(gate_up) && packed(down), "prepacked_moe: expert weights gate_up ", gate_up.sizes(), " and down ",
              down.sizes(), " are not in the prepacked layout (plugins/moe.py)");
  const int64_t H = x.size(1), I = out_features / 2, E = gate_up.size(0);
  const int64_t gate_up_k = pair * gate_up.size(2), down_k = pair * down.size(2);
  TORCH_CHECK(out_features % 2 == 0 && out_features <= 16 * gate_up.size(1) && 16 * (gate_up.size(1) - 1) < out_features &&
                  H <= gate_up_k && gate_up_k - H < pair && I <= down_k && down_k - I < pair && H <= 16 * down.size(1) &&
                  16 * (down.size(1) - 1) < H,
              "prepacked_moe: expert weights gate_up ", gate_up.sizes(), " and down ", down.sizes(), " do not fit x ",
              x.sizes(), " and ", out_features, " gate_up features");
  const auto float_bias = [&](const std::optional<at::Tensor>& bias, int64_t n, const char* name) {
    if (!bias.has_value()) return at::Tensor();
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == n && bias->scalar_type() == x.scalar_type(),
                "prepacked_moe: ", name, " must be [experts, ", n, "] in x's dtype, got ", bias->sizes());
    return bias->to(at::kFloat).contiguous();
  };
  const auto gate_up_b = float_bias(gate_up_bias, out_features, "gate_up_bias");
  const auto down_b = float_bias(down_bias, H, "down_bias");

  std::vector<std::vector<int64_t>> tokens, slots;
  route(topk_ids, first_expert, E, tokens, slots);
  std::vector<int64_t> experts, offsets{0}, rows, cols;  // the routed rows, grouped by expert ascending
  for (int64_t e = 0; e < E; ++e) {
    if (tokens[e].empty()) continue;
    experts.push_back(e);
    rows.insert(rows.end(), tokens[e].begin(), tokens[e].end());
    cols.insert(cols.end(), slots[e].begin(), slots[e].end());
    offsets.push_back(static_cast<int64_t>(rows.size()));
  }
  auto out = at::zeros({x.size(0), H}, x.options().dtype(at::kFloat));
  if (rows.empty()) return out.to(x.scalar_type());
  const int64_t S = static_cast<int64_t>(rows.size());
  auto row_index = at::from_blob(rows.data(), {S}, at::kLong), col_index = at::from_blob(cols.data(), {S}, at::kLong);
  auto xs = padded(x.index_select(0, row_index), gate_up_k);
  auto gu = at::empty({S, out_features}, x.options());
  auto y = at::empty({S, H}, x.options());
  if (bf16) experts_gemm<c10::BFloat16>(xs, gate_up.contiguous(), gate_up_b, gu, experts, offsets);
  else experts_gemm<float>(xs, gate_up.contiguous(), gate_up_b, gu, experts, offsets);
  auto parts = gu.chunk(2, -1);
  auto h = padded(glu(parts[0], parts[1], act, swiglu_alpha, swiglu_limit), down_k);
  if (bf16) experts_gemm<c10::BFloat16>(h, down.contiguous(), down_b, y, experts, offsets);
  else experts_gemm<float>(h, down.contiguous(), down_b, y, experts, offsets);
  out.index_add_(0, row_index, y.to(at::kFloat) * at::index(topk_weights.to(at::kFloat), {row_index, col_index}).unsqueeze(1));
  return out.to(x.scalar_type());
}

}  // namespace llmc::moe_kernel

TORCH_LIBRARY_IMPL(llmc, CPU, m) {
  m.impl("moe", &llmc::moe_kernel::moe);
  m.impl("prepacked_moe", &llmc::moe_kernel::prepacked_moe);
}
