// SeqTopK streaming rule for one-token steps, reading the routing history straight from paged storage.
//
// The torch reference is seqtopk.routing.rules.select_causal (one new token per row, history gathered
// with seqtopk.routing.paged.gather_paged). This kernel makes the same decisions without gathering the
// history: for each row it walks the first length[r] slots of the row through its block table and counts,
// for each competing candidate, the earlier values strictly greater than it (-inf entries, e.g. left
// padding in a dense buffer, never count); the budget is (seen[r] + 1) * per_token. The counts are exact
// integer counts of float comparisons, so the choices equal the torch rule's, ties included.
//
// Token i of the step belongs to row i (a one-token step: query_start_loc is 0..R); tokens >= R are padding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t kLanes = 16;  // candidates compared per pass (padded with +inf, which nothing beats)

// counts[j] += number of values in `pool` (n values, stride 1) strictly greater than v[j], j < kLanes.
inline void count_above(const float* pool, int64_t n, const float* v, int32_t* counts) {
  int32_t local[kLanes] = {0};
  for (int64_t p = 0; p < n; ++p) {
    const float x = pool[p];
#pragma GCC unroll 16
    for (int64_t j = 0; j < kLanes; ++j) local[j] += x > v[j];
  }
  for (int64_t j = 0; j < kLanes; ++j) counts[j] += local[j];
}

// Where a row's history is: the store, its block table row, and how many positions to walk.
struct PagedRows {
  const float* store;
  int64_t slots, cap;
  const int32_t* table;
  int64_t blocks, block_size;
  const int64_t* length;
  const int64_t* seen;
};

// The streaming rule for row r's one new token (v: its cap candidate scores, best first). Sets m[j] for the
// chosen slots; `pool` is scratch.
void decide_row(const PagedRows& h, int64_t r, const float* v, bool* m, int64_t forced, int64_t first,
                int64_t per_token, std::vector<float>& pool, std::vector<int32_t>& counts) {
  const int64_t cap = h.cap, width = cap - first;
  for (int64_t j = 0; j < forced; ++j) m[j] = true;
  if (per_token <= 0 || width <= 0) return;
  counts.assign(width, 0);
  // the token's own better candidates
  for (int64_t j = 0; j < width; ++j)
    for (int64_t i = 0; i < width; ++i) counts[j] += v[first + i] > v[first + j];
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t walk = h.length[r];
  // the earlier tokens of the row, block by block
  for (int64_t start = 0; start < walk; start += h.block_size) {
    const int64_t block = std::min(start / h.block_size, h.blocks - 1);
    const int64_t n = std::min(h.block_size, walk - start);
    const int64_t base = static_cast<int64_t>(h.table[r * h.blocks + block]) * h.block_size;
    TORCH_CHECK(base >= 0 && base + n <= h.slots, "block table points outside the store");
    // A block's slots are consecutive rows of the store: with every column competing (first == 0) its values
    // are one contiguous run; otherwise the competing columns are copied out.
    const float* values = h.store + base * cap;
    if (first > 0) {
      pool.resize(n * width);
      for (int64_t t = 0; t < n; ++t)
        std::copy(h.store + (base + t) * cap + first, h.store + (base + t + 1) * cap, pool.data() + t * width);
      values = pool.data();
    }
    for (int64_t j0 = 0; j0 < width; j0 += kLanes) {
      float lane[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) lane[j] = j0 + j < width ? v[first + j0 + j] : inf;
      int32_t lane_counts[kLanes] = {0};
      count_above(values, n * width, lane, lane_counts);
      for (int64_t j = 0; j0 + j < width && j < kLanes; ++j) counts[j0 + j] += lane_counts[j];
    }
  }
  const int64_t budget = (h.seen[r] + 1) * per_token;
  for (int64_t j = 0; j < width; ++j)
    if (counts[j] < budget && std::isfinite(v[first + j])) m[first + j] = true;
}

PagedRows paged_rows(const at::Tensor& store, const at::Tensor& table, int64_t block_size, const at::Tensor& length,
                     const at::Tensor& seen, int64_t cap) {
  TORCH_CHECK(store.dim() == 2 && store.scalar_type() == at::kFloat && store.size(1) == cap && store.is_contiguous(),
              "store must be a contiguous [slots, C] float32 tensor with the candidates' C");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kInt && table.is_contiguous(),
              "block_table must be a contiguous [R, B] int32 tensor");
  TORCH_CHECK(length.dim() == 1 && length.scalar_type() == at::kLong && length.is_contiguous(),
              "length must be a contiguous [R] int64 tensor");
  TORCH_CHECK(seen.sizes() == length.sizes() && seen.scalar_type() == at::kLong && seen.is_contiguous(),
              "seen must be a contiguous [R] int64 tensor");
  TORCH_CHECK(table.size(0) >= length.size(0) && block_size > 0, "bad block table");
  return PagedRows{store.data_ptr<float>(), store.size(0), cap, table.data_ptr<int32_t>(), table.size(1), block_size,
                   length.data_ptr<int64_t>(), seen.data_ptr<int64_t>()};
}

at::Tensor paged_causal_decode(const at::Tensor& values, const at::Tensor& store, const at::Tensor& block_table,
                               int64_t block_size, const at::Tensor& length, const at::Tensor& seen,
                               int64_t forced, int64_t first, int64_t per_token) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat, "values must be [N, C] float32");
  TORCH_CHECK(0 <= first && first <= forced && forced <= values.size(1), "bad budget split");
  const auto vals = values.contiguous();
  const int64_t tokens = vals.size(0), cap = vals.size(1);
  const PagedRows rows = paged_rows(store, block_table, block_size, length, seen, cap);
  auto mask = at::zeros({tokens, cap}, values.options().dtype(at::kBool));
  const float* v_ptr = vals.data_ptr<float>();
  bool* m_ptr = mask.data_ptr<bool>();
  at::parallel_for(0, std::min(tokens, length.size(0)), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pool;
    std::vector<int32_t> counts;
    for (int64_t r = begin; r < end; ++r)
      decide_row(rows, r, v_ptr + r * cap, m_ptr + r * cap, forced, first, per_token, pool, counts);
  });
  return mask;
}

// A whole decode step of a softmax-scored MoE layer (Mixtral, Qwen2/3-MoE, OLMoE) in one call, from the
// softmax probabilities (computed by torch.softmax, so the scores are bit-identical to the torch path's):
// each token's best `cap` (ties: lower expert id first), the streaming rule from the paged
// history, combine weights (the chosen probabilities, renormalised over the chosen ones if `renormalize`),
// unchosen slots repeating the best expert at weight 0, and the write of the token's capped scores to its
// history slot (negative slot: not written). Tokens >= R are padding: weight 0 everywhere, nothing written.
// Returns (values [N, C] float32 capped scores, weights [N, C] float32, ids [N, C] int32, chosen [N, C] bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_decode_step(
    const at::Tensor& probs, at::Tensor store, const at::Tensor& block_table, int64_t block_size,
    const at::Tensor& length, const at::Tensor& seen, const at::Tensor& slots, int64_t cap, int64_t forced,
    int64_t first, int64_t per_token, bool renormalize) {
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat, "probs must be [N, E] float32");
  const int64_t tokens = probs.size(0), experts = probs.size(1);
  TORCH_CHECK(0 < cap && cap <= experts, "cap must be in 1..E");
  TORCH_CHECK(0 <= first && first <= forced && forced <= cap, "bad budget split");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == tokens && slots.scalar_type() == at::kLong, "slots must be [N] int64");
  const auto scores = probs.contiguous();
  const auto slot = slots.contiguous();
  const PagedRows rows = paged_rows(store, block_table, block_size, length, seen, cap);
  auto capped = at::empty({tokens, cap}, probs.options());
  auto weights = at::zeros({tokens, cap}, probs.options());
  auto ids = at::empty({tokens, cap}, probs.options().dtype(at::kInt));
  auto mask = at::zeros({tokens, cap}, probs.options().dtype(at::kBool));
  const float* l_ptr = scores.data_ptr<float>();
  const int64_t* s_ptr = slot.data_ptr<int64_t>();
  float* w_ptr = weights.data_ptr<float>();
  float* v_ptr = capped.data_ptr<float>();
  int32_t* i_ptr = ids.data_ptr<int32_t>();
  bool* m_ptr = mask.data_ptr<bool>();
  float* store_ptr = store.data_ptr<float>();
  const int64_t real_rows = std::min(tokens, length.size(0));
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pool;
    std::vector<int32_t> counts, order(cap);
    for (int64_t r = begin; r < end; ++r) {
      const float* p = l_ptr + r * experts;
      float* values = v_ptr + r * cap;
      // best `cap` by insertion (experts in id order; a tie never displaces the lower id)
      int64_t filled = 0;
      for (int32_t e = 0; e < experts; ++e) {
        const float x = p[e];
        if (filled == cap && !(x > values[cap - 1])) continue;
        int64_t j = filled < cap ? filled++ : cap - 1;
        for (; j > 0 && x > values[j - 1]; --j) {
          values[j] = values[j - 1];
          order[j] = order[j - 1];
        }
        values[j] = x;
        order[j] = e;
      }
      bool* m = m_ptr + r * cap;
      int32_t* id = i_ptr + r * cap;
      float* w = w_ptr + r * cap;
      if (r < real_rows) {
        decide_row(rows, r, values, m, forced, first, per_token, pool, counts);
        const int64_t at = s_ptr[r];
        if (at >= 0) {
          TORCH_CHECK(at < rows.slots, "slot outside the store");
          std::copy(values, values + cap, store_ptr + at * cap);
        }
      }
      float chosen = 0.f;
      for (int64_t j = 0; j < cap; ++j) chosen += m[j] ? values[j] : 0.f;
      for (int64_t j = 0; j < cap; ++j) {
        id[j] = m[j] ? order[j] : order[0];
        w[j] = !m[j] ? 0.f : renormalize ? (chosen > 0.f ? values[j] / chosen : 0.f) : values[j];
      }
    }
  });
  return {capped, weights, ids, mask};
}

}  // namespace

TORCH_LIBRARY(seqtopk_cpu, m) {
  m.def("paged_causal_decode(Tensor values, Tensor store, Tensor block_table, int block_size, Tensor length, "
        "Tensor seen, int forced, int first, int per_token) -> Tensor");
  m.def("softmax_decode_step(Tensor probs, Tensor(a!) store, Tensor block_table, int block_size, Tensor length, "
        "Tensor seen, Tensor slots, int cap, int forced, int first, int per_token, bool renormalize) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqtopk_cpu, CPU, m) {
  m.impl("paged_causal_decode", &paged_causal_decode);
  m.impl("softmax_decode_step", &softmax_decode_step);
}
