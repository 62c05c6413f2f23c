// indis_native: the CPU twin of the fused ragged solver step (kernels/ragged_step.py, `_ragged_step_kernel`).
//
// Per sample b at stage s = step[b] (untouched unless 0 <= s < stages), with row = rows[b, s]:
//     h      = row[0] * y + row[1] * raw
//     y'     = sum_i row[2 + i]     * (y, stash, h, H_1..H_K)[i]
//     stash' = sum_i row[2 + W + i] * (...)[i]        (only with a stash; an all-zero row keeps it)
//     hist[s mod K, b] <- h                            (H_j lives in slot (s + K - j) mod K)
// An input whose coefficients are exactly zero is never read (it may hold NaN). Sums run in the order of
// `ragged_step_torch` (y, stash, h, H_1..H_K) without fused multiply-adds, so float32 results equal the
// reference's. Storage and arithmetic: float32, or float64 with float64 rows.
//
// `ragged_step_advance` also does a continuous batcher's per-iteration bookkeeping in that call: after the
// step, step[b] += 1 for each sample b < n_active with 0 <= step[b] < stage_counts[b] (its own stage count;
// the step itself keeps the table's S as its bound), and done[b] = whether step[b] reached stage_counts[b].
//
// `compact_slots` moves a batcher's surviving slots to the front of its per-slot buffers in one call: for
// each buffer (address, outer count and stride, slot stride, row bytes) and each outer index, row i <- row
// keep[i], keep strictly increasing (so keep[i] >= i and forward copies never overwrite a row still to be
// read); then the freed rows m..clear_to-1 (m = len(keep)) of each buffer given a fill get that fill (the
// bytes of one row: a free slot's value).
//
// `slot_times` reads each slot's network time at its own stage: out[b] = time[b, max(step[b], 0)].
//
// `take_rows` copies the rows of some slots out of a state buffer (dst row i <- slot slots[i]) and says
// whether each is finite (no NaN or inf), as a retirement reads its results.
//
// Python passes raw addresses, sizes and strides (kernels/native.py validates the tensors), so the module
// does not link libtorch. Each sample's elements are processed in tiles: a tile's inputs are combined into
// small local accumulators (one vectorised loop per output) and written back after every read of the tile,
// so in-place updates are safe (the written history slot is H_K's). Work items (a chunk of one sample) are
// split over threads (OpenMP, else std::thread).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kApiVersion = 5;
constexpr int kMaxHistory = 13;             // inputs per output: y, stash, h and up to 13 history slots
constexpr int kMaxInputs = 3 + kMaxHistory;
constexpr int64_t kTile = 512;              // elements combined at a time (accumulators stay in L1)
constexpr int64_t kChunk = 16384;           // elements of one sample per work item
#ifdef INDIS_OPENMP
constexpr int64_t kWorkPerThread = 1 << 14;  // elements worth a thread: OpenMP wakes pooled threads (~µs)
#else
constexpr int64_t kWorkPerThread = 1 << 18;  // std::thread spawns and joins per call (~50 µs each)
#endif

// x86-64 Linux with GNU attributes: an AVX2 clone of the hot loop beside the baseline, picked at load time.
#ifdef _MSC_VER
#define INDIS_RESTRICT __restrict
#else
#define INDIS_RESTRICT __restrict__
#endif
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define INDIS_HOT __attribute__((target_clones("avx2", "default"), flatten))
#elif defined(__GNUC__)
#define INDIS_HOT __attribute__((flatten))
#else
#define INDIS_HOT
#endif

struct Args {  // one call's buffers (addresses as passed from Python) and sizes
  uintptr_t y, raw, stash, hist, rows;
  int64_t numel, slot_stride, stages, history;
  bool uses_stash;
};

template <typename T>
struct Terms {  // sum_t coef[t] * input[t]: the nonzero coefficients of one output, in the reference's order
  int count = 0;
  int input[kMaxInputs];  // 0: y, 1: stash, 2: h, 2 + j: H_j
  T coef[kMaxInputs];

  void add(int i, T c) {
    if (c == 0) return;
    input[count] = i;
    coef[count++] = c;
  }
};

template <typename T>
struct Sample {  // one active sample's buffers (at its element 0) and its gathered row
  T* y;
  const T* raw;
  T* stash;                       // null unless this solver keeps a stash
  T* h_out;                       // history slot s mod K, null without history
  const T* older[kMaxHistory];    // H_1..H_K
  T conv_state, conv_raw;
  Terms<T> to_y, to_stash;        // to_stash.count == 0: the stash is kept
};

template <typename T>
Sample<T> gather(const Args& p, int64_t b, int64_t s) {
  const int64_t k = p.history, width = 3 + k, base = b * p.numel;
  const T* row = reinterpret_cast<const T*>(p.rows) + (b * p.stages + s) * (2 + 2 * width);
  T* hist = reinterpret_cast<T*>(p.hist);
  Sample<T> a{};
  a.y = reinterpret_cast<T*>(p.y) + base;
  a.raw = reinterpret_cast<const T*>(p.raw) + base;
  a.stash = p.uses_stash ? reinterpret_cast<T*>(p.stash) + base : nullptr;
  a.h_out = k > 0 ? hist + (s % k) * p.slot_stride + base : nullptr;
  for (int64_t j = 1; j <= k; ++j) a.older[j - 1] = hist + ((s + k - j) % k) * p.slot_stride + base;
  a.conv_state = row[0];
  a.conv_raw = row[1];
  for (int i = 0; i < width; ++i) {
    if (i == 1 && !p.uses_stash) continue;  // no stash: the reference adds zeros
    a.to_y.add(i, row[2 + i]);
    if (p.uses_stash) a.to_stash.add(i, row[2 + width + i]);
  }
  return a;
}

// out[i] = sum_t c[t] * src[t][i], in order t = 0..N-1 (one vectorised pass, N known at compile time).
template <typename T, int N>
void combine_n(T* INDIS_RESTRICT out, const T* const* src, const T* c, int64_t n) {
  const T* x[N];
  T w[N];
  for (int t = 0; t < N; ++t) x[t] = src[t], w[t] = c[t];
  for (int64_t i = 0; i < n; ++i) {
    T acc = w[0] * x[0][i];
    for (int t = 1; t < N; ++t) acc += w[t] * x[t][i];
    out[i] = acc;
  }
}

template <typename T>
void combine(T* INDIS_RESTRICT out, const T* const* src, const T* c, int count, int64_t n) {
  switch (count) {
    case 0: std::fill(out, out + n, T(0)); return;  // the reference's empty sum
    case 1: combine_n<T, 1>(out, src, c, n); return;
    case 2: combine_n<T, 2>(out, src, c, n); return;
    case 3: combine_n<T, 3>(out, src, c, n); return;
    case 4: combine_n<T, 4>(out, src, c, n); return;
    case 5: combine_n<T, 5>(out, src, c, n); return;
    default:  // six or more terms (long histories): the first six in one pass, then one pass per term
      combine_n<T, 6>(out, src, c, n);
      for (int t = 6; t < count; ++t)
        for (int64_t i = 0; i < n; ++i) out[i] += c[t] * src[t][i];
  }
}

// Elements [lo, hi) of one sample, a tile at a time: h, then y' and stash' into local accumulators from
// the inputs with nonzero coefficients, then the writes (every read of the tile precedes them).
template <typename T>
void step_range_impl(const Sample<T>& a, int64_t lo, int64_t hi) {
  alignas(64) T h[kTile], acc_y[kTile], acc_s[kTile];
  const T* src_y[kMaxInputs];
  const T* src_s[kMaxInputs];
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t n = std::min(kTile, hi - t0);
    const T* y = a.y + t0;
    const T* raw = a.raw + t0;
    for (int64_t i = 0; i < n; ++i) h[i] = a.conv_state * y[i] + a.conv_raw * raw[i];
    auto input = [&](int i) -> const T* {
      return i == 0 ? y : i == 1 ? a.stash + t0 : i == 2 ? static_cast<const T*>(h) : a.older[i - 3] + t0;
    };
    for (int t = 0; t < a.to_y.count; ++t) src_y[t] = input(a.to_y.input[t]);
    for (int t = 0; t < a.to_stash.count; ++t) src_s[t] = input(a.to_stash.input[t]);
    combine(acc_y, src_y, a.to_y.coef, a.to_y.count, n);
    if (a.to_stash.count) combine(acc_s, src_s, a.to_stash.coef, a.to_stash.count, n);
    std::copy(acc_y, acc_y + n, a.y + t0);
    if (a.to_stash.count) std::copy(acc_s, acc_s + n, a.stash + t0);
    if (a.h_out) std::copy(h, h + n, a.h_out + t0);
  }
}

INDIS_HOT void step_range(const Sample<float>& a, int64_t lo, int64_t hi) { step_range_impl(a, lo, hi); }
INDIS_HOT void step_range(const Sample<double>& a, int64_t lo, int64_t hi) { step_range_impl(a, lo, hi); }

// fn(i) for every work item i < items on `threads` threads (contiguous ranges, the caller's included).
template <typename Fn>
void parallel_items(int64_t items, int threads, const Fn& fn) {
#ifdef INDIS_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < items; ++i) fn(i);
#else
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  auto run = [&](int t) {
    const int64_t i0 = items * t / threads, i1 = items * (t + 1) / threads;
    for (int64_t i = i0; i < i1; ++i) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
#endif
}

template <typename T>
void step_all(const Args& p, const std::vector<std::pair<int64_t, int64_t>>& active, int threads) {
  std::vector<Sample<T>> samples;
  samples.reserve(active.size());
  for (const auto& [b, s] : active) samples.push_back(gather<T>(p, b, s));
  const int64_t chunks = (p.numel + kChunk - 1) / kChunk;
  const int64_t items = static_cast<int64_t>(samples.size()) * chunks;
  const int64_t work = static_cast<int64_t>(samples.size()) * p.numel;
  const int64_t most = std::min<int64_t>(threads, items);
  const int nt = static_cast<int>(std::clamp<int64_t>(work / kWorkPerThread, 1, most));
  parallel_items(items, nt, [&](int64_t i) {
    const int64_t c = i % chunks;
    step_range(samples[i / chunks], c * kChunk, std::min(p.numel, (c + 1) * kChunk));
  });
}

struct StepIndex {  // step[B] as passed: int32 or int64 entries, `stride` elements apart
  uintptr_t addr;
  int bits;
  int64_t stride;

  int64_t get(int64_t b) const {
    return bits == 32 ? reinterpret_cast<const int32_t*>(addr)[b * stride]
                      : reinterpret_cast<const int64_t*>(addr)[b * stride];
  }
  void set(int64_t b, int64_t v) const {
    if (bits == 32)
      reinterpret_cast<int32_t*>(addr)[b * stride] = static_cast<int32_t>(v);
    else
      reinterpret_cast<int64_t*>(addr)[b * stride] = v;
  }
};

// Validates one call, then steps every sample whose stage is in [0, stages).
void step_checked(const Args& p, const StepIndex& step, int64_t bsz, int float_bits, int threads) {
  if (float_bits != 32 && float_bits != 64) throw std::invalid_argument("float_bits must be 32 or 64");
  if (step.bits != 32 && step.bits != 64) throw std::invalid_argument("step_bits must be 32 or 64");
  if (bsz < 0 || p.numel < 0 || p.stages < 1 || threads < 1)
    throw std::invalid_argument("negative size, no stages or fewer than one thread");
  if (p.history < 0 || p.history > kMaxHistory)
    throw std::invalid_argument("the native step keeps 0 to " + std::to_string(kMaxHistory) +
                                " history slots, not " + std::to_string(p.history));
  if (!p.y || !p.raw || !p.rows || !step.addr || (p.uses_stash && !p.stash) || (p.history > 0 && !p.hist))
    throw std::invalid_argument("a required buffer address is null");
  std::vector<std::pair<int64_t, int64_t>> active;  // (sample, stage) of the samples that step
  active.reserve(bsz);
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t s = step.get(b);
    if (s >= 0 && s < p.stages) active.emplace_back(b, s);
  }
  if (active.empty() || p.numel == 0) return;
  if (float_bits == 32)
    step_all<float>(p, active, threads);
  else
    step_all<double>(p, active, threads);
}

void ragged_step(uintptr_t y, uintptr_t raw, uintptr_t stash, uintptr_t hist, uintptr_t rows, uintptr_t step,
                 int step_bits, int64_t step_stride, int64_t bsz, int64_t numel, int64_t slot_stride,
                 int64_t stages, int64_t history, bool uses_stash, int float_bits, int threads) {
  const Args p{y, raw, stash, hist, rows, numel, slot_stride, stages, history, uses_stash};
  step_checked(p, StepIndex{step, step_bits, step_stride}, bsz, float_bits, threads);
}

// The step, then each sample's own stage counter and finished flag; returns how many samples finished.
// The arguments are ragged_step's, then the stage counts (int64 [bsz]), done (bool or uint8 [bsz]), n_active.
int64_t ragged_step_advance(uintptr_t y, uintptr_t raw, uintptr_t stash, uintptr_t hist, uintptr_t rows,
                            uintptr_t step, int step_bits, int64_t step_stride, int64_t bsz, int64_t numel,
                            int64_t slot_stride, int64_t stages, int64_t history, bool uses_stash,
                            int float_bits, int threads, uintptr_t stage_counts, uintptr_t done,
                            int64_t n_active) {
  if (!stage_counts || !done) throw std::invalid_argument("a required buffer address is null");
  if (n_active < 0 || n_active > bsz) throw std::invalid_argument("n_active must be in [0, bsz]");
  if (step_stride == 0 && bsz > 1) throw std::invalid_argument("step is advanced in place: no stride 0");
  const StepIndex idx{step, step_bits, step_stride};
  const Args p{y, raw, stash, hist, rows, numel, slot_stride, stages, history, uses_stash};
  step_checked(p, idx, bsz, float_bits, threads);
  const int64_t* counts = reinterpret_cast<const int64_t*>(stage_counts);
  uint8_t* flags = reinterpret_cast<uint8_t*>(done);  // bool or uint8: 0 / 1
  int64_t finished = 0;
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t s = idx.get(b);
    const bool advance = b < n_active && s >= 0 && s < counts[b];
    if (advance) idx.set(b, s + 1);
    flags[b] = advance && s + 1 == counts[b];
    finished += flags[b];
  }
  return finished;
}

// One buffer of compact_slots: `outer` blocks `outer_stride` bytes apart, each holding slots `slot_stride`
// bytes apart whose first `row_bytes` bytes are the slot's data.
using SlotBuffer = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>;

// `fills[k]`: buffer k's fill (row_bytes bytes) or empty (its freed rows keep their bytes).
void compact_slots(const std::vector<SlotBuffer>& buffers, const std::vector<int64_t>& keep, int64_t slots,
                   int64_t clear_to, const std::vector<std::string>& fills) {
  const int64_t m = static_cast<int64_t>(keep.size());
  for (int64_t i = 0; i < m; ++i) {
    if (keep[i] >= slots || keep[i] < i || (i > 0 && keep[i] <= keep[i - 1]))
      throw std::invalid_argument("keep must be strictly increasing slot indices in [0, " +
                                  std::to_string(slots) + ")");
  }
  if (clear_to < m || clear_to > slots)
    throw std::invalid_argument("clear_to must be in [len(keep), " + std::to_string(slots) + "]");
  if (fills.size() != buffers.size()) throw std::invalid_argument("one fill per buffer (empty: none)");
  for (size_t k = 0; k < buffers.size(); ++k) {
    const auto& [addr, outer, outer_stride, slot_stride, row_bytes] = buffers[k];
    if (!addr) throw std::invalid_argument("a buffer address is null");
    if (!fills[k].empty() && static_cast<int64_t>(fills[k].size()) != row_bytes)
      throw std::invalid_argument("a fill must hold one row's bytes");
  }
  for (size_t k = 0; k < buffers.size(); ++k) {
    const auto& [addr, outer, outer_stride, slot_stride, row_bytes] = buffers[k];
    char* base = reinterpret_cast<char*>(addr);
    for (int64_t o = 0; o < outer; ++o) {
      char* block = base + o * outer_stride;
      for (int64_t i = 0; i < m; ++i) {
        if (keep[i] != i) std::memcpy(block + i * slot_stride, block + keep[i] * slot_stride, row_bytes);
      }
      if (fills[k].empty()) continue;
      for (int64_t i = m; i < clear_to; ++i) std::memcpy(block + i * slot_stride, fills[k].data(), row_bytes);
    }
  }
}

template <typename T, typename S>
void slot_times_impl(const T* time, const S* step, T* out, int64_t bsz, int64_t stages) {
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t s = step[b] > 0 ? static_cast<int64_t>(step[b]) : 0;
    if (s >= stages) throw std::out_of_range("slot " + std::to_string(b) + " is at step " +
                                             std::to_string(s) + ", past its table's " +
                                             std::to_string(stages) + " stages");
    out[b] = time[b * stages + s];
  }
}

template <typename T>
bool all_finite(const T* x, int64_t numel) {
  bool ok = true;
  for (int64_t i = 0; i < numel; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

// src: slots of `numel` float32 / float64 elements (float_bits), `slots_total` of them, contiguous.
std::vector<bool> take_rows(uintptr_t src, int64_t numel, int64_t slots_total, const std::vector<int64_t>& slots,
                            uintptr_t dst, int float_bits) {
  if (!src || !dst) throw std::invalid_argument("a buffer address is null");
  if (float_bits != 32 && float_bits != 64) throw std::invalid_argument("rows must be float32 or float64");
  for (const int64_t s : slots) {
    if (s < 0 || s >= slots_total)
      throw std::invalid_argument("slots must lie in [0, " + std::to_string(slots_total) + ")");
  }
  const int64_t row_bytes = numel * float_bits / 8;
  std::vector<bool> finite(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    char* out = reinterpret_cast<char*>(dst) + static_cast<int64_t>(i) * row_bytes;
    std::memcpy(out, reinterpret_cast<const char*>(src) + slots[i] * row_bytes, row_bytes);
    finite[i] = float_bits == 32 ? all_finite(reinterpret_cast<const float*>(out), numel)
                                 : all_finite(reinterpret_cast<const double*>(out), numel);
  }
  return finite;
}

// time: [bsz, stages] contiguous, float32 or float64 (float_bits); step: int32 or int64 (step_bits), contiguous.
void slot_times(uintptr_t time, uintptr_t step, uintptr_t out, int64_t bsz, int64_t stages, int step_bits,
                int float_bits) {
  if (!time || !step || !out) throw std::invalid_argument("a buffer address is null");
  if (bsz < 0 || stages < 1) throw std::invalid_argument("need bsz >= 0 and stages >= 1");
  if (step_bits != 32 && step_bits != 64) throw std::invalid_argument("step must be int32 or int64");
  if (float_bits != 32 && float_bits != 64) throw std::invalid_argument("time must be float32 or float64");
  auto run = [&](auto* t) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(t)>>;
    T* o = reinterpret_cast<T*>(out);
    if (step_bits == 32) slot_times_impl(t, reinterpret_cast<const int32_t*>(step), o, bsz, stages);
    else slot_times_impl(t, reinterpret_cast<const int64_t*>(step), o, bsz, stages);
  };
  if (float_bits == 32) run(reinterpret_cast<const float*>(time));
  else run(reinterpret_cast<const double*>(time));
}

}  // namespace

PYBIND11_MODULE(indis_native, m) {
  m.doc() = "CPU twin of indis' fused ragged solver step (see kernels/native.py for the tensor interface)";
  m.attr("API_VERSION") = kApiVersion;
#ifdef INDIS_OPENMP
  m.attr("THREADING") = "openmp";
#else
  m.attr("THREADING") = "std::thread";
#endif
  m.def("ragged_step", &ragged_step, py::call_guard<py::gil_scoped_release>(),
        "Advance each active sample by one stage of its own coefficient row, in place (raw addresses).",
        py::arg("y"), py::arg("raw"), py::arg("stash"), py::arg("hist"), py::arg("rows"), py::arg("step"),
        py::arg("step_bits"), py::arg("step_stride"), py::arg("bsz"), py::arg("numel"),
        py::arg("slot_stride"), py::arg("stages"), py::arg("history"), py::arg("uses_stash"),
        py::arg("float_bits"), py::arg("threads"));
  m.def("ragged_step_advance", &ragged_step_advance, py::call_guard<py::gil_scoped_release>(),
        "ragged_step, then step[b] += 1 for samples b < n_active below their own stage count and done[b] = "
        "whether b reached it in this call; returns how many did (raw addresses).",
        py::arg("y"), py::arg("raw"), py::arg("stash"), py::arg("hist"), py::arg("rows"), py::arg("step"),
        py::arg("step_bits"), py::arg("step_stride"), py::arg("bsz"), py::arg("numel"),
        py::arg("slot_stride"), py::arg("stages"), py::arg("history"), py::arg("uses_stash"),
        py::arg("float_bits"), py::arg("threads"), py::arg("stage_counts"), py::arg("done"),
        py::arg("n_active"));
  m.def("compact_slots", &compact_slots, py::call_guard<py::gil_scoped_release>(),
        "Move slots keep (increasing, < slots) to the front of every buffer, in order, then fill the freed "
        "rows len(keep)..clear_to-1 of each buffer with a fill (raw addresses).",
        py::arg("buffers"), py::arg("keep"), py::arg("slots"), py::arg("clear_to"), py::arg("fills"));
  m.def("take_rows", &take_rows, py::call_guard<py::gil_scoped_release>(),
        "Copy slots' rows of a state buffer to dst, in order; returns whether each is finite (raw addresses).",
        py::arg("src"), py::arg("numel"), py::arg("slots_total"), py::arg("slots"), py::arg("dst"),
        py::arg("float_bits"));
  m.def("slot_times", &slot_times,
        "out[b] = time[b, max(step[b], 0)] for b < bsz (raw addresses).", py::arg("time"), py::arg("step"),
        py::arg("out"), py::arg("bsz"), py::arg("stages"), py::arg("step_bits"), py::arg("float_bits"));
}
