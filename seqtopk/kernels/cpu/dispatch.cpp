// How chosen (token, expert) pairs reach the experts on CPU, and how their outputs come back. Torch
// references: seqtopk.routing.dispatch (plan_pairs, combine_rows) and count_groups in the same module.
//
// - plan_rows: the chosen slots as R rows of one expert each, sorted by expert (tokens in order within an
//   expert) by a counting sort, with each expert's end offset (what grouped GEMMs take) and, per (token, slot),
//   the row holding it (-1: unchosen).
// - combine_rows: out[n] = sum over token n's chosen slots of weight * rows[row], accumulated in float32.
// - count_groups: for a fused-MoE kernel that takes a fixed number of experts per token (vLLM's), tokens
//   grouped by how many experts they chose, each group one kernel call with that many slots; groups of
//   neighbouring counts are merged (the smaller counts padded with a repeat of their best expert at weight 0)
//   where a cost model says a call costs more than the padding.
// - gather_rows / scatter_rows: row copies for those groups.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace seqtopk {
namespace {

at::Tensor as_long(const at::Tensor& ids) { return ids.scalar_type() == at::kLong ? ids.contiguous() : ids.to(at::kLong).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_rows(const at::Tensor& ids, const at::Tensor& mask,
                                                                      int64_t num_experts) {
  TORCH_CHECK(ids.dim() == 2 && mask.sizes() == ids.sizes() && mask.scalar_type() == at::kBool,
              "ids and mask must be [N, C] (mask bool)");
  TORCH_CHECK(num_experts > 0, "num_experts must be positive");
  const auto id = as_long(ids);
  const auto chosen = mask.contiguous();
  const int64_t tokens = ids.size(0), cap = ids.size(1);
  const int64_t* e = id.data_ptr<int64_t>();
  const bool* m = chosen.data_ptr<bool>();
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t i = 0; i < tokens * cap; ++i) {
    if (!m[i]) continue;
    TORCH_CHECK(e[i] >= 0 && e[i] < num_experts, "a chosen slot names expert ", e[i], " outside 0..", num_experts - 1);
    ++start[e[i] + 1];
  }
  for (int64_t x = 0; x < num_experts; ++x) start[x + 1] += start[x];
  const int64_t rows = start[num_experts];
  auto row_token = at::empty({rows}, ids.options().dtype(at::kLong));
  auto row_expert = at::empty({rows}, ids.options().dtype(at::kInt));
  auto expert_end = at::empty({num_experts}, ids.options().dtype(at::kInt));
  auto slot_row = at::empty({tokens, cap}, ids.options().dtype(at::kLong));
  int64_t* rt = row_token.data_ptr<int64_t>();
  int32_t* re = row_expert.data_ptr<int32_t>();
  int64_t* sr = slot_row.data_ptr<int64_t>();
  for (int64_t x = 0; x < num_experts; ++x) expert_end.data_ptr<int32_t>()[x] = static_cast<int32_t>(start[x + 1]);
  for (int64_t i = 0; i < tokens * cap; ++i) {
    if (!m[i]) {
      sr[i] = -1;
      continue;
    }
    const int64_t r = start[e[i]]++;
    rt[r] = i / cap;
    re[r] = static_cast<int32_t>(e[i]);
    sr[i] = r;
  }
  return {row_token, row_expert, expert_end, slot_row};
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
void combine_impl(const T* rows, const int64_t* slot_row, const float* weights, T* out, int64_t tokens, int64_t cap,
                  int64_t hidden) {
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)), [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(hidden);
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < cap; ++j) {
        const int64_t r = slot_row[n * cap + j];
        if (r < 0) continue;
        const float w = weights[n * cap + j];
        const T* src = rows + r * hidden;
#pragma GCC ivdep
        for (int64_t h = 0; h < hidden; ++h) acc[h] += w * to_float(src[h]);
      }
      T* dst = out + n * hidden;
      for (int64_t h = 0; h < hidden; ++h) dst[h] = static_cast<T>(acc[h]);
    }
  });
}

at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& slot_row, const at::Tensor& weights) {
  TORCH_CHECK(rows.dim() == 2, "rows must be [R, H]");
  TORCH_CHECK(slot_row.dim() == 2 && slot_row.scalar_type() == at::kLong && weights.sizes() == slot_row.sizes(),
              "slot_row must be [N, C] int64 and weights [N, C]");
  const auto r = rows.contiguous();
  const auto s = slot_row.contiguous();
  const auto w = weights.to(at::kFloat).contiguous();
  const int64_t tokens = s.size(0), cap = s.size(1), hidden = r.size(1);
  const int64_t* sp = s.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens * cap; ++i) TORCH_CHECK(sp[i] < r.size(0), "slot_row names a row outside rows");
  auto out = at::empty({tokens, hidden}, r.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "combine_rows", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "combine_rows takes float32, bfloat16 or float16 rows");
    } else {
      combine_impl<scalar_t>(r.data_ptr<scalar_t>(), sp, w.data_ptr<float>(), out.data_ptr<scalar_t>(), tokens, cap,
                             hidden);
    }
  });
  return out;
}

}  // namespace

// Tokens grouped by their number of chosen experts. Returns [tokens_0, ids_0, weights_0, tokens_1, ...]:
// tokens_g [N_g] int64 (in order), ids_g [N_g, c_g] int32 (a token's chosen experts in slot order, then its first
// chosen expert again), weights_g [N_g, c_g] float32 (0 on the repeats). Tokens that chose nothing are in no group.
// Cost of a group of n tokens padded to c slots, in expert rows: call_rows + reload_rows * (the experts its n*c
// rows are expected to touch, E * (1 - (1 - 1/E)^(n*c)): each is read once per call) + n * c * slot_cost[c] (slot_cost: relative cost of a row in a call with c slots; the last entry serves larger c).
std::vector<at::Tensor> count_groups(const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& mask,
                                     int64_t num_experts, double call_rows, double reload_rows,
                                     const std::vector<double>& slot_cost) {
  TORCH_CHECK(ids.dim() == 2 && mask.sizes() == ids.sizes() && weights.sizes() == ids.sizes() &&
                  mask.scalar_type() == at::kBool, "ids, weights and mask must be [N, C] (mask bool)");
  TORCH_CHECK(!slot_cost.empty(), "slot_cost must not be empty");
  const auto id = as_long(ids);
  const auto w = weights.to(at::kFloat).contiguous();
  const auto chosen = mask.contiguous();
  const int64_t tokens = ids.size(0), cap = ids.size(1);
  const int64_t* e = id.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  const bool* m = chosen.data_ptr<bool>();
  std::vector<int32_t> count(tokens, 0);
  std::vector<int64_t> per_count(cap + 1, 0);
  for (int64_t n = 0; n < tokens; ++n) {
    for (int64_t j = 0; j < cap; ++j) count[n] += m[n * cap + j];
    ++per_count[count[n]];
  }
  auto cost_of = [&](int64_t lo, int64_t hi) {  // counts in (lo, hi], padded to hi
    int64_t n = 0;
    for (int64_t c = lo + 1; c <= hi; ++c) n += per_count[c];
    if (n == 0) return 0.0;
    const double rows = static_cast<double>(n) * hi;
    const double slot = slot_cost[std::min<size_t>(hi - 1, slot_cost.size() - 1)];
    const double touched = num_experts * (1.0 - std::pow(1.0 - 1.0 / num_experts, rows));
    return call_rows + reload_rows * touched + rows * slot;
  };
  // best[j]: cheapest split of counts 1..j; cut[j]: where its last group starts
  std::vector<double> best(cap + 1, 0.0);
  std::vector<int64_t> cut(cap + 1, 0);
  for (int64_t j = 1; j <= cap; ++j) {
    best[j] = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < j; ++i) {
      const double c = best[i] + cost_of(i, j);
      if (c < best[j]) {
        best[j] = c;
        cut[j] = i;
      }
    }
  }
  std::vector<std::pair<int64_t, int64_t>> ranges;  // (lo, hi]
  for (int64_t j = cap; j > 0; j = cut[j]) ranges.emplace_back(cut[j], j);
  std::reverse(ranges.begin(), ranges.end());
  std::vector<int64_t> group_of(cap + 1, -1);
  std::vector<at::Tensor> out;
  std::vector<int64_t> width;
  for (const auto& [lo, hi] : ranges) {
    int64_t n = 0;
    for (int64_t c = lo + 1; c <= hi; ++c) n += per_count[c];
    if (n == 0) continue;
    for (int64_t c = lo + 1; c <= hi; ++c) group_of[c] = static_cast<int64_t>(width.size());
    width.push_back(hi);
    out.push_back(at::empty({n}, ids.options().dtype(at::kLong)));
    out.push_back(at::empty({n, hi}, ids.options().dtype(at::kInt)));
    out.push_back(at::zeros({n, hi}, ids.options().dtype(at::kFloat)));
  }
  std::vector<int64_t> filled(width.size(), 0);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t g = group_of[count[n]];
    if (count[n] == 0 || g < 0) continue;
    const int64_t c = width[g], at = filled[g]++;
    out[3 * g].data_ptr<int64_t>()[at] = n;
    int32_t* gi = out[3 * g + 1].data_ptr<int32_t>() + at * c;
    float* gw = out[3 * g + 2].data_ptr<float>() + at * c;
    int64_t k = 0;
    for (int64_t j = 0; j < cap; ++j) {
      if (!m[n * cap + j]) continue;
      TORCH_CHECK(e[n * cap + j] >= 0 && e[n * cap + j] < num_experts, "a chosen slot names an expert outside 0..",
                  num_experts - 1);
      gi[k] = static_cast<int32_t>(e[n * cap + j]);
      gw[k] = wp[n * cap + j];
      ++k;
    }
    for (; k < c; ++k) gi[k] = gi[0];  // weight 0: adds nothing
  }
  return out;
}

void gather_rows_into(const at::Tensor& x, const at::Tensor& index, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && index.dim() == 1 && index.scalar_type() == at::kLong, "x must be [N, H], index [M] int64");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == index.size(0) && out.size(1) == x.size(1) &&
                  out.scalar_type() == x.scalar_type(), "gather_rows: out must be a contiguous [M, H] tensor of x's dtype");
  const auto src = x.contiguous();
  const auto idx = index.contiguous();
  const int64_t rows = idx.size(0), bytes = src.size(1) * src.element_size();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < src.size(0), "gather index outside the rows");
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(bytes, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(d + i * bytes, s + ip[i] * bytes, bytes);
  });
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index) {
  auto out = at::empty({index.size(0), x.size(1)}, x.options());
  gather_rows_into(x, index, out);
  return out;
}

void scatter_rows(at::Tensor out, const at::Tensor& index, const at::Tensor& rows) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && rows.dim() == 2 && rows.size(1) == out.size(1) &&
                  rows.scalar_type() == out.scalar_type() && index.dim() == 1 && index.scalar_type() == at::kLong &&
                  index.size(0) == rows.size(0), "out [N, H] contiguous, index [M] int64, rows [M, H] of out's dtype");
  const auto src = rows.contiguous();
  const auto idx = index.contiguous();
  const int64_t n = idx.size(0), bytes = src.size(1) * src.element_size();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < out.size(0), "scatter index outside the rows");
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(bytes, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(d + ip[i] * bytes, s + i * bytes, bytes);
  });
}

}  // namespace seqtopk

TORCH_LIBRARY_FRAGMENT(seqtopk_cpu, m) {
  m.def("plan_rows(Tensor ids, Tensor mask, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("combine_rows(Tensor rows, Tensor slot_row, Tensor weights) -> Tensor");
  m.def("count_groups(Tensor ids, Tensor weights, Tensor mask, int num_experts, float call_rows, float reload_rows, "
        "float[] slot_cost) -> Tensor[]");
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor(a!) out, Tensor index, Tensor rows) -> ()");
}

TORCH_LIBRARY_IMPL(seqtopk_cpu, CPU, m) {
  m.impl("plan_rows", &seqtopk::plan_rows);
  m.impl("combine_rows", &seqtopk::combine_rows);
  m.impl("count_groups", &seqtopk::count_groups);
  m.impl("gather_rows", &seqtopk::gather_rows);
  m.impl("scatter_rows", &seqtopk::scatter_rows);
}
