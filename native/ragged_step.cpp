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
// Python passes raw addresses, sizes and strides (kernels/native.py validates the tensors), so the module
// does not link libtorch. Each sample's elements are processed in tiles: a tile's inputs are combined into
// small local accumulators (one vectorised loop per output) and written back after every read of the tile,
// so in-place updates are safe (the written history slot is H_K's). Work items (a chunk of one sample) are
// split over threads (OpenMP, else std::thread).

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kApiVersion = 1;
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

void ragged_step(uintptr_t y, uintptr_t raw, uintptr_t stash, uintptr_t hist, uintptr_t rows, uintptr_t step,
                 int step_bits, int64_t step_stride, int64_t bsz, int64_t numel, int64_t slot_stride,
                 int64_t stages, int64_t history, bool uses_stash, int float_bits, int threads) {
  if (float_bits != 32 && float_bits != 64) throw std::invalid_argument("float_bits must be 32 or 64");
  if (step_bits != 32 && step_bits != 64) throw std::invalid_argument("step_bits must be 32 or 64");
  if (bsz < 0 || numel < 0 || stages < 1 || threads < 1)
    throw std::invalid_argument("negative size, no stages or fewer than one thread");
  if (history < 0 || history > kMaxHistory)
    throw std::invalid_argument("the native step keeps 0 to " + std::to_string(kMaxHistory) +
                                " history slots, not " + std::to_string(history));
  if (!y || !raw || !rows || !step || (uses_stash && !stash) || (history > 0 && !hist))
    throw std::invalid_argument("a required buffer address is null");
  std::vector<std::pair<int64_t, int64_t>> active;  // (sample, stage) of the samples that step
  active.reserve(bsz);
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t s = step_bits == 32 ? reinterpret_cast<const int32_t*>(step)[b * step_stride]
                                      : reinterpret_cast<const int64_t*>(step)[b * step_stride];
    if (s >= 0 && s < stages) active.emplace_back(b, s);
  }
  if (active.empty() || numel == 0) return;
  const Args p{y, raw, stash, hist, rows, numel, slot_stride, stages, history, uses_stash};
  if (float_bits == 32)
    step_all<float>(p, active, threads);
  else
    step_all<double>(p, active, threads);
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
}
