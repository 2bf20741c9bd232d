// Core-to-core latency of the OpenMP team the native kernels run on: the round trip of one cache line
// between thread 0 and thread 1 of a team of 2 (thread 0 writes an odd value, thread 1 answers with the
// next even one). Called by lattice_lab.bench.cores through ctypes.
//
// On a VM the host may place the two vCPUs on cores that share a cache (~80-90 ns on the AMD EPYC of our
// benchmark machine) or on distant ones (~350-380 ns), and it moves them every few seconds. Every
// barrier, fork, join and read of another thread's rows costs a few such round trips, so small
// multi-threaded calls (tens of us) slow down by up to ~40% in the distant state (docs/bench.md).
//
// The loop stops after `iters` round trips or `max_ns` nanoseconds (a team squeezed onto one CPU would
// take a scheduler time slice per round trip); thread 0 then raises `stop`, which thread 1 also watches.
#include <atomic>
#include <chrono>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct alignas(64) Line {
  std::atomic<int64_t> v{0};
  char pad[64 - sizeof(std::atomic<int64_t>)];
};

}  // namespace

extern "C" {

// mean round trip in ns over the round trips done (out: how many); -1 without a team of 2 threads
double ll_core_round_trip_ns(int64_t iters, double max_ns, int64_t* done) {
  *done = 0;
#ifdef _OPENMP
  Line line, stop;
  double result = -1.0;
  int64_t n_done = 0;
#pragma omp parallel num_threads(2)
  {
    if (omp_get_num_threads() == 2) {
      if (omp_get_thread_num() == 1) {
        for (int64_t i = 0; !stop.v.load(std::memory_order_acquire); ++i) {
          while (line.v.load(std::memory_order_acquire) != 2 * i + 1) {
            if (stop.v.load(std::memory_order_relaxed)) break;
          }
          line.v.store(2 * i + 2, std::memory_order_release);  // harmless after a stop
        }
      } else {
        using clock = std::chrono::steady_clock;
        const auto t0 = clock::now();
        auto over = [&] { return std::chrono::duration<double, std::nano>(clock::now() - t0).count() > max_ns; };
        int64_t i = 0;
        bool late = false;
        for (; i < iters && !late; ++i) {
          line.v.store(2 * i + 1, std::memory_order_release);
          // the clock is read every 64 round trips, and inside a wait only after 2^20 spins (a team
          // sharing one CPU), so that it does not add to a normal round trip
          for (int64_t spins = 1; line.v.load(std::memory_order_acquire) != 2 * i + 2; ++spins) {
            if ((spins & ((int64_t(1) << 20) - 1)) == 0 && over()) {
              late = true;
              break;
            }
          }
          if (late) break;
          if ((i & 63) == 63 && over()) late = true;
        }
        const double ns = std::chrono::duration<double, std::nano>(clock::now() - t0).count();
        stop.v.store(1, std::memory_order_release);
        n_done = i;
        result = i > 0 ? ns / double(i) : -1.0;
      }
    }
  }
  *done = n_done;
  return result;
#else
  (void)iters;
  (void)max_ns;
  return -1.0;
#endif
}

}  // extern "C"
