// Each token's best `cap` experts, best first: the candidates every rule then chooses among.
//
// The order is part of the routing's definition, so every path must give the same one (its torch reference is
// seqtopk.routing.rules.capped_candidates): scores compared as floats (-0.0 equal to +0.0, NaN above +inf), and
// exact ties to the lower expert id. Exact ties are common: bf16 router logits take few distinct values, and
// which of two equal experts lands in front of the cut decides which one a token gets.
//
// ATen's topk leaves the order of ties to its selection algorithm, and costs ~0.8 us per 64-expert row at cap 10
// on our 2-core machine (1 thread): 0.8 ms of a 1024-token prefill layer. One pass of insertion into the best so
// far, tested 16 keys at a time, costs ~0.3 us.

#include "ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <climits>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace seqtopk {

namespace {

// A float's rank as a signed integer (the same map as rules.order_keys): larger float, larger key.
inline int32_t order_key(float x) {
  x += 0.0f;  // (-0.0 -> +0.0)
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// One row: the `cap` best of `experts` keys, best first, ties to the lower id, by insertion (any cap).
void top_row_scalar(const int32_t* keys, int64_t experts, int64_t cap, int32_t* held_keys, int64_t* best) {
  int64_t held = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int32_t k = keys[e];
    int64_t at;
    if (held == cap) {
      if (k <= held_keys[cap - 1]) continue;  // (an equal score with a higher id loses the tie)
      at = cap - 1;
    } else {
      at = held++;
    }
    for (; at > 0 && held_keys[at - 1] < k; --at) held_keys[at] = held_keys[at - 1], best[at] = best[at - 1];
    held_keys[at] = k, best[at] = e;
  }
}

#if defined(__AVX512F__)
// The same for cap <= 16, the best-so-far held in one register each for keys and ids: an insertion is a compare,
// a popcount and two masked shifts, with no data-dependent branch, and 16 keys at a time are tested against the
// current cut so that most experts are passed over in bulk. ~2x fewer cycles than the scalar loop at 64 experts,
// cap 10 (the branches of the insertion loop mispredict).
void top_row_avx512(const int32_t* keys, int64_t experts, int64_t cap, int64_t* best) {
  const __m512i back = _mm512_set_epi32(14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0);  // lane i <- i - 1
  __m512i kv = _mm512_set1_epi32(INT32_MIN), iv = _mm512_setzero_si512();
  alignas(64) int32_t lane[16];
  const auto insert = [&](int32_t k, int32_t e, __mmask16 held) {
    const __m512i kb = _mm512_set1_epi32(k);
    const int at = __builtin_popcount(_mm512_mask_cmpge_epi32_mask(held, kv, kb));  // held keys >= k stay ahead
    const auto after = static_cast<__mmask16>(~((2u << at) - 1));
    kv = _mm512_mask_mov_epi32(_mm512_mask_permutexvar_epi32(kv, after, back, kv), 1u << at, kb);
    iv = _mm512_mask_mov_epi32(_mm512_mask_permutexvar_epi32(iv, after, back, iv), 1u << at, _mm512_set1_epi32(e));
  };
  for (int64_t e = 0; e < cap; ++e) insert(keys[e], static_cast<int32_t>(e), static_cast<__mmask16>((1u << e) - 1));
  const auto full = static_cast<__mmask16>((1u << cap) - 1);
  _mm512_store_si512(lane, kv);
  int32_t cut = lane[cap - 1];
  for (int64_t e0 = cap; e0 < experts; e0 += 16) {
    const auto inside = experts - e0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (experts - e0)) - 1);
    __mmask16 over = _mm512_mask_cmpgt_epi32_mask(inside, _mm512_loadu_si512(keys + e0), _mm512_set1_epi32(cut));
    while (over) {
      const int b = __builtin_ctz(over);
      over &= over - 1;
      const int32_t k = keys[e0 + b];
      if (k <= cut) continue;  // (the cut rose since the 16 were tested)
      insert(k, static_cast<int32_t>(e0 + b), full);
      _mm512_store_si512(lane, kv);
      cut = lane[cap - 1];
    }
  }
  _mm512_store_si512(lane, iv);
  for (int64_t c = 0; c < cap; ++c) best[c] = lane[c];
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> capped_candidates(const at::Tensor& scores, int64_t cap) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat, "capped_candidates: scores must be [N, E] float32");
  const int64_t tokens = scores.size(0), experts = scores.size(1);
  TORCH_CHECK(0 < cap && cap <= experts, "capped_candidates: cap must be in [1, ", experts, "], got ", cap);
  const at::Tensor s = scores.contiguous();
  at::Tensor values = at::empty({tokens, cap}, s.options());
  at::Tensor ids = at::empty({tokens, cap}, s.options().dtype(at::kLong));
  const float* in = s.data_ptr<float>();
  float* v = values.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / experts), [&](int64_t lo, int64_t hi) {
    std::vector<int32_t> keys(experts + 16), held(cap);
    for (int64_t n = lo; n < hi; ++n) {
      const float* row = in + n * experts;
      int64_t* best = id + n * cap;
      for (int64_t e = 0; e < experts; ++e) keys[e] = order_key(row[e]);
#if defined(__AVX512F__)
      if (cap <= 16)
        top_row_avx512(keys.data(), experts, cap, best);
      else
#endif
        top_row_scalar(keys.data(), experts, cap, held.data(), best);
      for (int64_t c = 0; c < cap; ++c) v[n * cap + c] = row[best[c]];
    }
  });
  return {values, ids};
}

}  // namespace seqtopk

TORCH_LIBRARY_FRAGMENT(seqtopk_cpu, m) {
  m.def("capped_candidates(Tensor scores, int cap) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqtopk_cpu, CPU, m) { m.impl("capped_candidates", &seqtopk::capped_candidates); }
