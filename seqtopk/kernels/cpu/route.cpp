// One SeqTopK routing step of one MoE layer on CPU: every rule, the history write, the bands, the statistics.
//
// The torch reference is seqtopk.routing.rules (select_sequence, select_causal, topk_mask, applied per token by
// rules.choose); this op makes the same decisions, slot for slot, ties included, in one call:
//
// - sequence rule (a row's tokens the rule routes): the B(n)-th largest competing value is found by
//   selection (std::nth_element, O(n*W)), then one pass in flat order (token-major, then column) takes every
//   value above the cut and as many values equal to it as the budget leaves: exact ties go to the earlier token,
//   then the better column, as in the reference;
// - causal rule over a chunk (prefill under prefill="causal", later chunks of a chunked prompt): the history is
//   sorted once and the chunk's values enter a Fenwick tree over their ranks as its tokens arrive, so each
//   count "values strictly greater, up to and including this token" is O(log) instead of a scan: O((P + N) log N);
// - causal rule on one new token (a decode step): answered from the row's band (history.h) in O(log band), the
//   band rebuilt from the paged store only when the cut has left it (or it is stale); without bands, a walk of
//   the history;
// - TopK rule: the first k slots.
// Budgets: the competing columns of m real tokens share B(m) = floor(m * per_token / scale + 1/2) pairs (scale 1
// for a whole k: m * per_token). Every routed token keeps its first `forced` slots (min_experts). Tokens with valid == false take nothing.
// Each token's capped scores are written to its history slot (write_slots >= 0; -inf for padding tokens) after
// every decision is made.
//
// Layout: rows are sequences, each a contiguous range of tokens [row_start[r], row_start[r+1]); tokens past the
// last row are padding. Rule codes follow seqtopk.routing.rules.RULES: 0 sequence, 1 causal, 2 topk; any other
// code routes nothing.

#include "history.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <utility>

namespace seqtopk {
namespace {

constexpr int8_t kSequence = 0, kCausal = 1, kTopK = 2;

struct Split {
  int64_t forced, first, per_token, scale, k;
  // Pairs the competing columns of m real tokens share: floor(m * per_token / scale + 1/2) (rules.BudgetSplit).
  int64_t pairs(int64_t m) const { return scale == 1 ? m * per_token : (m * per_token + scale / 2) / scale; }
};

// Order statistics over a small set of ranks (the chunk's distinct values), counting inserted values.
struct Fenwick {
  std::vector<int64_t> tree;
  explicit Fenwick(size_t n) : tree(n + 1, 0) {}
  void add(size_t i) {
    for (++i; i < tree.size(); i += i & (~i + 1)) ++tree[i];
  }
  int64_t prefix(size_t i) const {  // inserted values with rank <= i
    int64_t s = 0;
    for (++i; i > 0; i -= i & (~i + 1)) s += tree[i];
    return s;
  }
};

struct Step {
  const float* values;
  int64_t cap;
  const int64_t* row_start;
  const bool* valid;  // nullptr: every token inside a row is real
  const int8_t* rules;  // nullptr: `rule` for every token
  int8_t rule;
  const int64_t* seen;
  PagedRows history;
  Band* bands;  // nullptr: no bands
  const int64_t* row_band;
  Split split;
  const int64_t* write_slots;  // nullptr: nothing is written
  bool* mask;

  bool real(int64_t t) const { return valid == nullptr || valid[t]; }
  int8_t rule_of(int64_t t) const { return rules == nullptr ? rule : rules[t]; }
  const float* competing(int64_t t) const { return values + t * cap + split.first; }
  int64_t width() const { return cap - split.first; }
};

void select_sequence_row(const Step& s, int64_t begin, int64_t end, std::vector<float>& entries) {
  const int64_t w = s.width();
  entries.clear();
  for (int64_t t = begin; t < end; ++t)
    if (s.real(t) && s.rule_of(t) == kSequence) entries.insert(entries.end(), s.competing(t), s.competing(t) + w);
  const int64_t budget = s.split.pairs(static_cast<int64_t>(entries.size()) / w);
  if (budget <= 0) return;
  float cut = -std::numeric_limits<float>::infinity();
  int64_t room = budget;
  const bool everything = budget >= static_cast<int64_t>(entries.size());
  if (!everything) {
    std::vector<float> ranked(entries);
    std::nth_element(ranked.begin(), ranked.begin() + (budget - 1), ranked.end(), std::greater<float>());
    cut = ranked[budget - 1];
    int64_t above = 0;
    for (const float x : entries) above += x > cut;
    room = budget - above;
  }
  for (int64_t t = begin; t < end; ++t) {
    if (!(s.real(t) && s.rule_of(t) == kSequence)) continue;
    const float* v = s.competing(t);
    bool* m = s.mask + t * s.cap + s.split.first;
    for (int64_t j = 0; j < w; ++j) {
      if (everything || v[j] > cut) m[j] = true;
      else if (v[j] == cut && room > 0) {
        m[j] = true;
        --room;
      }
    }
  }
}

// A float's bits as an unsigned integer in the float's order (-0.0 just below 0.0; NaN not expected).
inline uint64_t ordered_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void select_causal_chunk(const Step& s, int64_t r, int64_t begin, int64_t end, std::vector<float>& scratch) {
  const int64_t w = s.width();
  scratch.clear();
  s.history.gather(r, s.split.first, scratch);
  std::sort(scratch.begin(), scratch.end());
  const int64_t earlier = static_cast<int64_t>(scratch.size());
  // The chunk's values (NaN left out: it competes with nothing), ranked once by value: equal values share a
  // rank (-0.0 == 0.0, as they compare), and each rank knows how many earlier (history) values exceed it.
  // Sorted as 64-bit keys: the value's order-preserving bits, then its place in the chunk.
  std::vector<uint64_t> order;
  order.reserve(static_cast<size_t>((end - begin) * w));
  for (int64_t t = begin; t < end; ++t) {
    if (!s.real(t)) continue;
    const float* v = s.competing(t);
    for (int64_t j = 0; j < w; ++j)
      if (!std::isnan(v[j])) order.push_back((ordered_bits(v[j]) << 32) | static_cast<uint64_t>((t - begin) * w + j));
  }
  std::sort(order.begin(), order.end());
  auto value_of = [&](uint64_t key) {
    const uint64_t place = key & 0xffffffffu;
    return s.competing(begin + static_cast<int64_t>(place) / w)[place % w];
  };
  std::vector<int32_t> rank(static_cast<size_t>((end - begin) * w), -1);
  std::vector<int64_t> history_above;  // per rank: history values > the rank's value
  size_t below = 0;  // history values <= the current value (history sorted ascending)
  float previous = 0.f;
  for (size_t i = 0; i < order.size(); ++i) {
    const float x = value_of(order[i]);
    if (i == 0 || previous < x) {
      while (below < scratch.size() && !(x < scratch[below])) ++below;
      history_above.push_back(earlier - static_cast<int64_t>(below));
    }
    previous = x;
    rank[order[i] & 0xffffffffu] = static_cast<int32_t>(history_above.size() - 1);
  }
  Fenwick tree(history_above.size());
  int64_t inserted = 0, m = s.seen[r];
  for (int64_t t = begin; t < end; ++t) {
    if (!s.real(t)) continue;
    ++m;
    const float* v = s.competing(t);
    const int32_t* rt = rank.data() + (t - begin) * w;
    for (int64_t j = 0; j < w; ++j) {
      if (rt[j] < 0) continue;
      tree.add(static_cast<size_t>(rt[j]));
      ++inserted;
    }
    if (s.rule_of(t) != kCausal) continue;
    const int64_t budget = s.split.pairs(m);
    bool* mt = s.mask + t * s.cap + s.split.first;
    for (int64_t j = 0; j < w; ++j) {
      if (!std::isfinite(v[j])) continue;
      const int64_t from_chunk = inserted - tree.prefix(static_cast<size_t>(rt[j]));
      if (history_above[rt[j]] + from_chunk < budget) mt[j] = true;
    }
  }
}

// Per-thread scratch for the decode path (no allocation per row).
std::vector<int64_t>& scratch_need() {
  thread_local std::vector<int64_t> v;
  return v;
}
std::vector<int64_t>& scratch_exact() {
  thread_local std::vector<int64_t> v;
  return v;
}

// One new token of row r under the causal rule: from the band where one is given, else a walk of the history.
void select_causal_token(const Step& s, int64_t r, int64_t t, std::vector<float>& scratch) {
  const int64_t w = s.width();
  const float* v = s.competing(t);
  bool* mt = s.mask + t * s.cap + s.split.first;
  const int64_t budget = s.split.pairs(s.seen[r] + 1);
  std::vector<int64_t>& need = scratch_need();
  need.resize(w);
  for (int64_t j = 0; j < w; ++j) {
    int64_t own = 0;
    for (int64_t i = 0; i < w; ++i) own += v[i] > v[j];
    need[j] = budget - own;
  }
  Band* band = nullptr;
  if (s.bands != nullptr && s.row_band[r] >= 0) band = s.bands + s.row_band[r];
  const int64_t center = budget - 1 - w / 2;
  bool walked = false;
  std::vector<int64_t>& exact = scratch_exact();
  auto walk = [&]() {
    history_walks.fetch_add(1, std::memory_order_relaxed);
    exact.assign(w, 0);
    count_greater_walk(s.history, r, s.split.first, v, w, exact.data());
    walked = true;
  };
  if (band != nullptr) {
    bool rebuilt = false;
    if (!band_current(*band, s.history, r, s.split.first)) {
      band_build(*band, s.history, r, s.split.first, center, scratch);
      rebuilt = true;
    }
    for (int64_t j = 0; j < w; ++j) {
      if (!std::isfinite(v[j]) || need[j] <= 0) continue;
      Answer answer = band_decide(*band, v[j], need[j]);
      if (answer == Answer::kUnknown && !rebuilt) {
        band_build(*band, s.history, r, s.split.first, center, scratch);
        rebuilt = true;
        answer = band_decide(*band, v[j], need[j]);
      }
      if (answer == Answer::kUnknown) {
        if (!walked) walk();
        answer = exact[j] < need[j] ? Answer::kTake : Answer::kSkip;
      } else {
        band_answers.fetch_add(1, std::memory_order_relaxed);
      }
      if (answer == Answer::kTake) mt[j] = true;
    }
    // This token's scores join the history (written after every decision): the band follows.
    const int64_t next_center = s.split.pairs(s.seen[r] + 2) - 1 - w / 2;
    const int64_t slot = s.write_slots != nullptr ? s.write_slots[t] : -1;
    if (slot < 0) {  // not recorded: the history does not move, and the band must not either
      band->length = -1;
      return;
    }
    for (int64_t j = 0; j < w; ++j) band_insert(*band, v[j], next_center);
    band->length += 1;
    band->last_slot = slot;
    band->last_hash = hash_values(v, w);
    return;
  }
  walk();
  for (int64_t j = 0; j < w; ++j)
    if (std::isfinite(v[j]) && exact[j] < need[j]) mt[j] = true;
}

void route_row(const Step& s, int64_t r, std::vector<float>& scratch) {
  const int64_t begin = s.row_start[r], end = s.row_start[r + 1];
  const Split& split = s.split;
  bool sequence = false, causal = false;
  int64_t real = 0;
  for (int64_t t = begin; t < end; ++t) {
    if (!s.real(t)) continue;
    ++real;
    const int8_t rule = s.rule_of(t);
    sequence |= rule == kSequence;
    causal |= rule == kCausal;
    bool* m = s.mask + t * s.cap;
    if (rule == kSequence || rule == kCausal) {
      for (int64_t j = 0; j < split.forced; ++j) m[j] = true;
    } else if (rule == kTopK) {
      for (int64_t j = 0; j < std::min(split.k, s.cap); ++j) m[j] = true;
    }
  }
  const bool decode = causal && end - begin == 1 && real == 1;
  if (s.bands != nullptr && s.row_band[r] >= 0 && !decode) s.bands[s.row_band[r]].length = -1;  // history moves on without it
  if (split.per_token <= 0 || s.width() <= 0) {
    if (decode && s.bands != nullptr && s.row_band[r] >= 0) s.bands[s.row_band[r]].length = -1;
    return;
  }
  if (sequence) select_sequence_row(s, begin, end, scratch);
  if (!causal) return;
  if (decode) select_causal_token(s, r, begin, scratch);
  else select_causal_chunk(s, r, begin, end, scratch);
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_vector(const std::optional<at::Tensor>& t, at::ScalarType type, int64_t size, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->scalar_type() == type && t->is_contiguous() && t->size(0) >= size, name,
              " must be a contiguous 1-D ", type, " tensor of at least ", size, " entries");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_step(const at::Tensor& values, const at::Tensor& row_start, const std::optional<at::Tensor>& token_valid,
                      const std::optional<at::Tensor>& token_rule, int64_t rule, const at::Tensor& row_seen,
                      const std::optional<at::Tensor>& store, const std::optional<at::Tensor>& block_table,
                      int64_t block_size, const std::optional<at::Tensor>& row_length,
                      const std::optional<at::Tensor>& write_slots, const std::optional<at::Tensor>& bands,
                      const std::optional<at::Tensor>& row_band, int64_t forced, int64_t first, int64_t per_token,
                      int64_t scale, int64_t k, const std::optional<at::Tensor>& histogram, const std::optional<at::Tensor>& token_class,
                      const std::optional<at::Tensor>& class_counters, const std::optional<at::Tensor>& ids,
                      int64_t unchosen, int64_t weight_mode) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "values must be a contiguous [N, C] float32 tensor");
  const int64_t tokens = values.size(0), cap = values.size(1);
  TORCH_CHECK(0 <= first && first <= forced && forced <= cap, "bad budget split");
  TORCH_CHECK(row_start.dim() == 1 && row_start.scalar_type() == at::kLong && row_start.is_contiguous() &&
                  row_start.size(0) >= 1, "row_start must be a contiguous [R+1] int64 tensor");
  const int64_t rows = row_start.size(0) - 1;
  const int64_t* starts = row_start.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] >= 0 && starts[rows] <= tokens, "row_start points outside the tokens");
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(starts[r] <= starts[r + 1], "row_start must not decrease");
  check_vector(token_valid, at::kBool, tokens, "token_valid");
  check_vector(token_rule, at::kChar, tokens, "token_rule");
  check_vector(row_seen, at::kLong, rows, "row_seen");
  check_vector(write_slots, at::kLong, tokens, "write_slots");
  check_vector(row_band, at::kLong, rows, "row_band");

  Step s{};
  s.values = values.data_ptr<float>();
  s.cap = cap;
  s.row_start = starts;
  s.valid = ptr_or_null<bool>(token_valid);
  s.rules = ptr_or_null<int8_t>(token_rule);
  s.rule = static_cast<int8_t>(rule);
  s.seen = row_seen.data_ptr<int64_t>();
  TORCH_CHECK(scale >= 1, "scale (the budget's denominator) must be >= 1");
  s.split = Split{forced, first, per_token, scale, k};
  const bool has_history = store.has_value() && store->defined();
  if (has_history) {
    TORCH_CHECK(store->dim() == 2 && store->scalar_type() == at::kFloat && store->size(1) == cap &&
                    store->is_contiguous(), "store must be a contiguous [slots, C] float32 tensor with the values' C");
    TORCH_CHECK(block_table.has_value() && block_table->dim() == 2 && block_table->scalar_type() == at::kInt &&
                    block_table->is_contiguous() && block_table->size(0) >= rows && block_size > 0,
                "block_table must be a contiguous [R, B] int32 tensor");
    check_vector(row_length, at::kLong, rows, "row_length");
    s.history = PagedRows{store->data_ptr<float>(), store->data_ptr<float>(), store->size(0), cap,
                          block_table->data_ptr<int32_t>(), block_table->size(1), block_size,
                          ptr_or_null<int64_t>(row_length)};
  } else {
    s.history.cap = cap;
  }
  if (bands.has_value() && bands->defined() && row_band.has_value() && row_band->defined()) {
    TORCH_CHECK(bands->dim() == 2 && bands->scalar_type() == at::kByte && bands->size(1) == kBandBytes &&
                    bands->is_contiguous(), "bands must be a contiguous [slots, ", kBandBytes, "] uint8 tensor");
    s.bands = reinterpret_cast<Band*>(bands->data_ptr<uint8_t>());
    s.row_band = row_band->data_ptr<int64_t>();
    std::vector<bool> taken(bands->size(0), false);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = s.row_band[r];
      TORCH_CHECK(b < bands->size(0), "row_band outside the bands");
      if (b < 0) continue;
      TORCH_CHECK(!taken[b], "two rows share one routing band");
      taken[b] = true;
    }
  }
  auto mask = at::empty({tokens, cap}, values.options().dtype(at::kBool));  // (zeroed here: at::zeros forks threads)
  s.mask = mask.data_ptr<bool>();
  std::memset(s.mask, 0, tokens * cap);
  s.write_slots = ptr_or_null<int64_t>(write_slots);

  // Rows in parallel when there is enough work to share (a decode step of a few rows runs on one thread).
  const int64_t work = tokens * cap + (has_history && s.history.length != nullptr ? rows * 64 : 0);
  at::parallel_for(0, rows, work < (1 << 15) ? rows : 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch;
    for (int64_t r = lo; r < hi; ++r) route_row(s, r, scratch);
  });

  // Writes after every decision: no row reads a value written in this step.
  const int64_t* slots = s.write_slots;
  if (slots != nullptr) {
    TORCH_CHECK(has_history, "write_slots needs a store");
    float* out = s.history.store_out;
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t at = slots[t];
      if (at < 0) continue;
      TORCH_CHECK(at < s.history.slots, "write slot outside the routing store");
      const bool inside = t >= starts[0] && t < starts[rows];
      if (inside && s.real(t)) std::copy(s.values + t * cap, s.values + (t + 1) * cap, out + at * cap);
      else std::fill(out + at * cap, out + (at + 1) * cap, -std::numeric_limits<float>::infinity());
    }
  }

  // Statistics: experts per token (histogram, padding in its last bin) and per-class token/pair counters.
  int64_t* hist = const_cast<int64_t*>(ptr_or_null<int64_t>(histogram));
  const int8_t* classes = ptr_or_null<int8_t>(token_class);
  int64_t* counters = const_cast<int64_t*>(ptr_or_null<int64_t>(class_counters));
  if (hist != nullptr || (classes != nullptr && counters != nullptr)) {
    const int64_t spill = hist != nullptr ? histogram->size(0) - 1 : 0;
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t chosen = 0;
      for (int64_t j = 0; j < cap; ++j) chosen += s.mask[t * cap + j];
      const bool inside = t >= starts[0] && t < starts[rows];
      if (hist != nullptr) ++hist[inside && s.real(t) ? std::min(chosen, spill - 1) : spill];
      if (classes != nullptr && counters != nullptr && classes[t] > 0) {
        counters[2 * (classes[t] - 1)] += 1;
        counters[2 * (classes[t] - 1) + 1] += chosen;
      }
    }
  }
  // Outputs for softmax-scored families (weight_mode 1: the chosen scores; 2: renormalised over the chosen) and
  // the ids packed by the engine's convention (unchosen 0: -1, "drop"; 1: the token's best, "repeat_best").
  at::Tensor weights, packed;
  if (weight_mode > 0) {
    weights = at::empty({tokens, cap}, values.options());
    float* w = weights.data_ptr<float>();
    std::fill(w, w + tokens * cap, 0.f);
    for (int64_t t = 0; t < tokens; ++t) {
      float total = 0.f;
      for (int64_t j = 0; j < cap; ++j) total += s.mask[t * cap + j] ? s.values[t * cap + j] : 0.f;
      for (int64_t j = 0; j < cap; ++j) {
        if (!s.mask[t * cap + j]) continue;
        const float v = s.values[t * cap + j];
        w[t * cap + j] = weight_mode == 1 ? v : (total > 0.f ? v / total : 0.f);
      }
    }
  }
  if (ids.has_value() && ids->defined()) {
    TORCH_CHECK(ids->sizes() == values.sizes() && ids->scalar_type() == at::kLong, "ids must be [N, C] int64");
    const auto id = ids->contiguous();
    packed = at::empty({tokens, cap}, id.options());
    const int64_t* in = id.data_ptr<int64_t>();
    int64_t* out = packed.data_ptr<int64_t>();
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < cap; ++j)
        out[t * cap + j] = s.mask[t * cap + j] ? in[t * cap + j] : (unchosen == 0 ? -1 : in[t * cap]);
  }
  return {mask, weights, packed};
}

}  // namespace seqtopk

TORCH_LIBRARY(seqtopk_cpu, m) {
  m.def("route_step(Tensor values, Tensor row_start, Tensor? token_valid, Tensor? token_rule, int rule, "
        "Tensor row_seen, Tensor(a!)? store, Tensor? block_table, int block_size, Tensor? row_length, "
        "Tensor? write_slots, Tensor(b!)? bands, Tensor? row_band, int forced, int first, int per_token, int scale, int k, "
        "Tensor(c!)? histogram, Tensor? token_class, Tensor(d!)? class_counters, Tensor? ids, int unchosen, "
        "int weight_mode) -> (Tensor, Tensor, Tensor)");
  m.def("band_bytes() -> int", []() -> int64_t { return seqtopk::kBandBytes; });
  // (band builds, candidates answered by a band, history walks) since the last call; resets them
  m.def("band_counters() -> int[]", []() -> std::vector<int64_t> {
    return {seqtopk::band_builds.exchange(0), seqtopk::band_answers.exchange(0), seqtopk::history_walks.exchange(0)};
  });
}

TORCH_LIBRARY_IMPL(seqtopk_cpu, CPU, m) { m.impl("route_step", &seqtopk::route_step); }
