// The streaming rule's history on CPU: paged storage walked through a block table, and the per-(request,
// layer) band that answers a decode step's cut without walking it.
//
// A row's history is the capped scores of its earlier tokens, one store row per KV slot (slot = block id *
// block size + offset, as in a paged KV cache). The streaming rule takes a candidate v of a new token when
// fewer than `need` values are strictly greater than v, counting the history's competing columns and the
// token's own better candidates. The store is the source of truth; a band is a cache of it:
//
//   a Band holds every history value in [lo, hi] (distinct values, descending, with their counts and running
//   totals), how many values lie strictly above hi, and how many positions it reflects (`length`). A count
//   "how many values beat v" is then exact for v in [lo, hi], and for v outside it the answer is still known
//   whenever the cut is inside the band. When it is not (the cut drifted out, the band is stale, or it never
//   existed), the band is rebuilt from the store around the cut: O(context) once, O(log band) per query after.
//
// Exactness does not depend on the band: every answer it gives is an exact consequence of exact counts, and
// whatever it cannot answer is recounted from the store. Writers that append to a history without updating
// its band leave `length` behind the history's length, which marks the band stale.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace seqtopk {

// Distinct values a band holds (its half-width around the cut is half that). The cut moves like a random walk
// (a few ranks per step), so a band of half-width h lasts ~h^2 steps before a rebuild, O(context): 128 keeps
// rebuilds to about one per thousand steps of a sequence.
constexpr int kBandValues = 256;

// How decode decisions were reached, process-wide (benchmarks and tests read them): band builds from the store,
// candidates answered by a band, candidates counted by a walk of the history.
inline std::atomic<int64_t> band_builds{0}, band_answers{0}, history_walks{0};

struct Band {
  int64_t length;  // history positions it reflects; -1: stale (rebuild before use)
  int64_t above;   // history values strictly greater than hi
  int64_t total;   // history values it has seen (positions x competing columns)
  int32_t size;    // distinct values held
  int32_t width;   // competing columns per position it was built for
  int64_t last_slot;   // store row of its last position (-1: none), and a hash of that row's competing values:
  uint64_t last_hash;  // a writer that rewrote the history without the band is caught here too
  float hi, lo;    // holds every history value v with lo <= v <= hi
  float value[kBandValues];  // distinct values, descending
  int32_t upto[kBandValues];  // values in the band >= value[i] (running count)
};

constexpr int64_t kBandBytes = sizeof(Band);

// Where a row's history is: the store, its block table row, and how many positions to walk.
struct PagedRows {
  const float* store = nullptr;
  float* store_out = nullptr;
  int64_t slots = 0, cap = 0;
  const int32_t* table = nullptr;
  int64_t blocks = 0, block_size = 1;
  const int64_t* length = nullptr;

  int64_t row_length(int64_t r) const { return length == nullptr ? 0 : length[r]; }

  // Calls fn(values, n) for consecutive runs of the row's first row_length(r) positions: `values` points at
  // n store rows of `cap` floats each.
  template <typename Fn>
  void for_each_block(int64_t r, Fn&& fn) const {
    const int64_t walk = row_length(r);
    for (int64_t start = 0; start < walk; start += block_size) {
      const int64_t block = std::min(start / block_size, blocks - 1);
      const int64_t n = std::min(block_size, walk - start);
      const int64_t base = static_cast<int64_t>(table[r * blocks + block]) * block_size;
      TORCH_CHECK(base >= 0 && base + n <= slots, "block table points outside the routing store");
      fn(store + base * cap, n);
    }
  }

  // Store row of position `pos` of row r.
  int64_t slot_of(int64_t r, int64_t pos) const {
    const int64_t block = std::min(pos / block_size, blocks - 1);
    return static_cast<int64_t>(table[r * blocks + block]) * block_size + pos % block_size;
  }

  // The competing columns [first, cap) of the row's history, appended to `out`.
  void gather(int64_t r, int64_t first, std::vector<float>& out) const {
    for_each_block(r, [&](const float* values, int64_t n) {
      for (int64_t t = 0; t < n; ++t) out.insert(out.end(), values + t * cap + first, values + (t + 1) * cap);
    });
  }
};

// Exact count, from the store, of the row's history values strictly greater than each of `queries` (w values,
// competing columns only): a walk over the whole history. counts[j] is added to.
inline void count_greater_walk(const PagedRows& h, int64_t r, int64_t first, const float* queries, int64_t w,
                               int64_t* counts) {
  constexpr int64_t lanes = 16;  // queries compared per pass (padded with +inf, which nothing beats)
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> pool;
  for (int64_t j0 = 0; j0 < w; j0 += lanes) {
    float lane[lanes];
    for (int64_t j = 0; j < lanes; ++j) lane[j] = j0 + j < w ? queries[j0 + j] : inf;
    h.for_each_block(r, [&](const float* values, int64_t n) {
      // A block's slots are consecutive store rows: with every column competing its values are one contiguous
      // run; otherwise the competing columns are copied out first.
      const float* run = values;
      int64_t size = n * h.cap;
      if (first > 0) {
        pool.resize(n * (h.cap - first));
        for (int64_t t = 0; t < n; ++t)
          std::copy(values + t * h.cap + first, values + (t + 1) * h.cap, pool.data() + t * (h.cap - first));
        run = pool.data();
        size = static_cast<int64_t>(pool.size());
      }
      int32_t local[lanes] = {0};
      for (int64_t p = 0; p < size; ++p) {
        const float x = run[p];
#pragma GCC unroll 16
        for (int64_t j = 0; j < lanes; ++j) local[j] += x > lane[j];
      }
      for (int64_t j = 0; j0 + j < w && j < lanes; ++j) counts[j0 + j] += local[j];
    });
  }
}

// ----------------------------------------------------------------------------------------------- bands

inline uint64_t hash_values(const float* v, int64_t n) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof(bits));
    h = (h ^ bits) * 1099511628211ull;
  }
  return h;
}

// Whether the band still describes row r's history: same length and width, and the same last position.
inline bool band_current(const Band& b, const PagedRows& h, int64_t r, int64_t first) {
  const int64_t length = h.row_length(r);
  if (b.length != length || b.width != h.cap - first) return false;
  if (length == 0) return b.last_slot == -1;
  const int64_t slot = h.slot_of(r, length - 1);
  if (slot != b.last_slot || slot < 0 || slot >= h.slots) return false;
  return hash_values(h.store + slot * h.cap + first, h.cap - first) == b.last_hash;
}

inline void band_reset(Band& b, int64_t length, int32_t width) {
  std::memset(&b, 0, sizeof(Band));
  b.length = length;
  b.width = width;
  b.last_slot = -1;
  b.hi = b.lo = -std::numeric_limits<float>::infinity();
}

inline void band_recount(Band& b) {
  int32_t running = 0;
  for (int32_t i = 0; i < b.size; ++i) {
    running += b.upto[i];  // upto holds plain counts on entry
    b.upto[i] = running;
  }
}

inline int64_t band_count(const Band& b, int32_t i) { return b.upto[i] - (i ? b.upto[i - 1] : 0); }

inline int64_t band_held(const Band& b) { return b.size ? b.upto[b.size - 1] : 0; }

// Build the band of row r's history (every competing value of its first row_length(r) positions) around the
// value ranked `center` (0 = largest). `scratch` is reused.
inline void band_build(Band& b, const PagedRows& h, int64_t r, int64_t first, int64_t center,
                       std::vector<float>& scratch) {
  band_builds.fetch_add(1, std::memory_order_relaxed);
  const int32_t width = static_cast<int32_t>(h.cap - first);
  band_reset(b, h.row_length(r), width);
  scratch.clear();
  h.gather(r, first, scratch);
  const int64_t total = static_cast<int64_t>(scratch.size());
  b.total = total;
  if (b.length > 0) {
    b.last_slot = h.slot_of(r, b.length - 1);
    b.last_hash = hash_values(h.store + b.last_slot * h.cap + first, width);
  }
  if (total == 0) return;  // empty: hi = lo = -inf, nothing above; every finite value is "above" the band
  const int64_t half = kBandValues / 2 - 1;
  center = std::min(std::max<int64_t>(center, 0), total - 1);
  const int64_t top = std::max<int64_t>(center - half, 0);
  const int64_t bottom = std::min<int64_t>(center + half, total - 1);
  std::vector<float> ranked(scratch);
  auto by_value = std::greater<float>();
  std::nth_element(ranked.begin(), ranked.begin() + top, ranked.end(), by_value);
  const float hi = ranked[top];
  std::nth_element(ranked.begin() + top, ranked.begin() + bottom, ranked.end(), by_value);
  const float lo = ranked[bottom];
  b.hi = hi;
  b.lo = lo;
  // Distinct values in [lo, hi]: at most bottom - top + 1 of them (values equal to hi or lo ranked outside the
  // window are counted with them).
  std::vector<float> held;
  for (const float x : scratch) {
    if (x > hi) ++b.above;
    else if (x >= lo) held.push_back(x);
  }
  std::sort(held.begin(), held.end(), by_value);
  for (size_t i = 0; i < held.size(); ++i) {
    if (b.size > 0 && b.value[b.size - 1] == held[i]) {
      ++b.upto[b.size - 1];
    } else {
      TORCH_CHECK(b.size < kBandValues, "routing band overflow");
      b.value[b.size] = held[i];
      b.upto[b.size] = 1;
      ++b.size;
    }
  }
  band_recount(b);
}

enum class Answer { kTake, kSkip, kUnknown };

// Whether fewer than `need` history values are strictly greater than v, from the band alone.
inline Answer band_decide(const Band& b, float v, int64_t need) {
  if (v > b.hi) return b.above < need ? Answer::kTake : Answer::kUnknown;  // greater <= above
  if (b.size > 0 && v >= b.lo) {
    // distinct values > v: the first i with value[i] <= v (values descending)
    int32_t lo = 0, hi = b.size;
    while (lo < hi) {
      const int32_t mid = (lo + hi) / 2;
      if (b.value[mid] > v) lo = mid + 1;
      else hi = mid;
    }
    const int64_t greater = b.above + (lo ? b.upto[lo - 1] : 0);
    return greater < need ? Answer::kTake : Answer::kSkip;
  }
  // v below the band: at least every value the band holds, and everything above it, beats v
  return b.above + band_held(b) >= need ? Answer::kSkip : Answer::kUnknown;
}

// Drop the band's largest (or smallest) distinct value, keeping it exact (only used on a full band, so at
// least one value stays).
inline void band_drop_top(Band& b) {
  const int64_t gone = band_count(b, 0);
  b.above += gone;
  for (int32_t i = 1; i < b.size; ++i) {
    b.value[i - 1] = b.value[i];
    b.upto[i - 1] = b.upto[i] - gone;
  }
  --b.size;
  b.hi = b.value[0];
}

inline void band_drop_bottom(Band& b) {
  --b.size;
  b.lo = b.value[b.size - 1];
}

// Add one history value. Keeps at most kBandValues distinct values, dropping the end farther from `center`
// (the rank the next step's cut is expected at).
inline void band_insert(Band& b, float x, int64_t center) {
  ++b.total;
  if (x > b.hi) {
    ++b.above;
    return;
  }
  if (x < b.lo) return;
  auto position = [&]() {  // distinct values > x (values descending)
    return static_cast<int32_t>(std::lower_bound(b.value, b.value + b.size, x, std::greater<float>()) - b.value);
  };
  int32_t at = position();
  if (at < b.size && b.value[at] == x) {
    for (int32_t i = at; i < b.size; ++i) ++b.upto[i];
    return;
  }
  if (b.size == kBandValues) {
    // full: make room at the end farther from the cut (ranks held: [above, above + held))
    const int64_t to_top = center - b.above;
    const int64_t to_bottom = b.above + band_held(b) - 1 - center;
    if (to_top > to_bottom) {
      band_drop_top(b);
      if (x > b.hi) {
        ++b.above;
        return;
      }
    } else {
      band_drop_bottom(b);
      if (x < b.lo) return;
    }
    at = position();
  }
  for (int32_t i = b.size; i > at; --i) {
    b.value[i] = b.value[i - 1];
    b.upto[i] = b.upto[i - 1] + 1;
  }
  b.value[at] = x;
  b.upto[at] = (at ? b.upto[at - 1] : 0) + 1;
  ++b.size;
}

}  // namespace seqtopk
