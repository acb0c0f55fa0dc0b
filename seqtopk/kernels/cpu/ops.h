// The compiled CPU ops one source file shares with another (candidates.cpp, route.cpp, dispatch.cpp -> moe.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace seqtopk {

// candidates.cpp: each row's best `cap` scores, best first, exact ties to the lower id -> (values, int64 ids)
std::tuple<at::Tensor, at::Tensor> capped_candidates(const at::Tensor& scores, int64_t cap);

// route.cpp: every rule of one routing step -> (mask, weights or undefined, packed ids or undefined)
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_step(
    const at::Tensor& values, const at::Tensor& row_start, const std::optional<at::Tensor>& token_valid,
    const std::optional<at::Tensor>& token_rule, int64_t rule, const at::Tensor& row_seen,
    const std::optional<at::Tensor>& store, const std::optional<at::Tensor>& block_table, int64_t block_size,
    const std::optional<at::Tensor>& row_length, const std::optional<at::Tensor>& write_slots,
    const std::optional<at::Tensor>& bands, const std::optional<at::Tensor>& row_band, int64_t forced, int64_t first,
    int64_t per_token, int64_t scale, int64_t k, const std::optional<at::Tensor>& histogram,
    const std::optional<at::Tensor>& token_class, const std::optional<at::Tensor>& class_counters,
    const std::optional<at::Tensor>& ids, int64_t unchosen, int64_t weight_mode);

// dispatch.cpp: tokens grouped by their number of chosen experts, [tokens_g, ids_g, weights_g, ...]
std::vector<at::Tensor> count_groups(const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& mask,
                                     int64_t num_experts, double call_rows, double reload_rows,
                                     const std::vector<double>& slot_cost);
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index);
void gather_rows_into(const at::Tensor& x, const at::Tensor& index, const at::Tensor& out);
void scatter_rows(at::Tensor out, const at::Tensor& index, const at::Tensor& rows);

}  // namespace seqtopk
