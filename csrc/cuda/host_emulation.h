// CUDA emulation for running the unetx kernel bodies on the host: a .cu file compiled by the host C++ compiler with
// UNETX_HOST_EMULATION defined (tests/cuda_host/) gets its __global__ kernels and device helpers executed, unchanged,
// by real threads, through the same host launch code (grids, blocks, vector widths) that launches them on a GPU.
//
//   - every thread of a block is a real std::thread with its own threadIdx / blockIdx; blocks of a launch run one
//     after another (so `__shared__` is a static: one copy, owned by the block that is running);
//   - __syncthreads() is a barrier over the block's live threads, and all of them must arrive at the same
//     __syncthreads (a divergent or missing barrier is an error, and ThreadSanitizer sees the races a missing one
//     leaves in shared memory);
//   - warp shuffles are a 32-lane exchange: every lane named in the mask must arrive, from the same call, with the
//     same mask; a lane that exited or diverged is an error, not a silent stale value;
//   - the 16-byte packed loads and stores assert their alignment (UNETX_EMU_CHECK_ALIGNED in common.cuh).
// A block whose live threads all wait at barriers that cannot complete (a hang on a GPU) is an error at once; any
// other barrier not completed within UNETX_EMU_TIMEOUT_S seconds (default 120) too.
// The emulated GPU has UNETX_EMU_SMS multiprocessors (default 1), which sets the grids the host code picks.
//
// The emulation is stricter than a GPU in one way and weaker in one: lanes of a warp are independent threads (a GPU
// may run them in lock-step, hiding nothing that matters here), and a shuffle orders memory among its lanes, as
// __syncwarp would (a GPU's __shfl_sync does not): the kernels never rely on that.
//
// What this proves: indexing, bounds, the use of barriers and shuffles, races in shared and global memory under
// ThreadSanitizer, the arithmetic and its accumulation order. What it cannot: the real warp scheduler (lanes here
// are independent threads, not lock-step), the memory model's weaker orderings, the IntDivider's __umulhi path,
// cuDNN, streams and graph capture, occupancy and speed.
#pragma once

#ifndef UNETX_HOST_EMULATION
#error "cuda/host_emulation.h is for host builds of the CUDA kernels only (define UNETX_HOST_EMULATION)"
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace unetx::emu {

[[noreturn]] inline void fail(const char* what, const std::source_location& at) {
  std::fprintf(stderr, "unetx host emulation: %s (%s:%u)\n", what, at.file_name(), static_cast<unsigned>(at.line()));
  std::fflush(stderr);
  std::abort();
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// Two counts of the running block: its live threads (not exited) and how many of them wait at some barrier. When
// every live thread waits and none of their barriers can complete, the block is deadlocked (on a GPU it would hang):
// an error at once, not a timeout. Relaxed atomics on purpose: a shared lock or an acquire/release count would order
// every thread's barrier arrivals after every other's and hide from ThreadSanitizer exactly the races it must see
// (e.g. warp 1 writing shared memory that thread 0 still reads, with no __syncthreads between).
struct BlockSync {
  std::atomic<int> live{0}, waiting{0};
};
inline BlockSync g_sync;

// A barrier over a changing set of threads: a thread that leaves (exits the kernel) no longer counts. Every arrival
// names its call site; all arrivals of one phase must name the same one. arrive() returns the OR of the arrivals'
// `bits` in that phase. Each barrier has its own lock: it orders exactly what the barrier orders.
class Barrier {
 public:
  void reset(int n) {
    expected_ = n;
    arrived_ = 0;
    bits_ = done_bits_ = 0;
    line_ = 0;
  }

  uint32_t arrive(const char* what, const std::source_location& at, uint32_t bit = 0) {
    std::unique_lock<std::mutex> lock(m_);
    if (arrived_ == 0) {
      line_ = at.line();
    } else if (line_ != at.line()) {
      fail("threads of one barrier phase arrived from different call sites (divergent barrier)", at);
    }
    ++arrived_;
    bits_ |= bit;
    const uint64_t phase = phase_;
    if (arrived_ == expected_) {
      g_sync.waiting.fetch_sub(arrived_ - 1, std::memory_order_relaxed);
      complete();
    } else {
      const int waiting = g_sync.waiting.fetch_add(1, std::memory_order_relaxed) + 1;
      if (waiting == g_sync.live.load(std::memory_order_relaxed)) {
        std::fprintf(stderr,
                     "unetx host emulation: %s: %d of %d threads arrived; every live thread of the block "
                     "waits at a barrier that cannot complete\n",
                     what, arrived_, expected_);
        fail("deadlock (a divergent __syncthreads or shuffle)", at);
      }
      const auto limit = std::chrono::seconds(env_int("UNETX_EMU_TIMEOUT_S", 120));
      if (!cv_.wait_for(lock, limit, [&] { return phase_ != phase; })) {
        std::fprintf(stderr, "unetx host emulation: %s: %d of %d threads arrived, the others never did\n", what,
                     arrived_, expected_);
        fail("deadlock (timeout)", at);
      }
    }
    return done_bits_;
  }

  // A thread that exits the kernel.
  void leave() {
    const std::lock_guard<std::mutex> lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) {
      g_sync.waiting.fetch_sub(arrived_, std::memory_order_relaxed);
      complete();
    }
  }

 private:
  void complete() {
    done_bits_ = bits_;
    bits_ = 0;
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }

  std::mutex m_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t phase_ = 0;
  uint32_t bits_ = 0, done_bits_ = 0;
  unsigned line_ = 0;
};

constexpr int kWarpSize = 32;

struct Warp {
  Barrier bar;
  alignas(16) unsigned char slot[kWarpSize][16];
  unsigned int mask[kWarpSize];
  unsigned int line[kWarpSize];
};

// The block that is running (blocks run one at a time) and each emulated thread's coordinates.
struct Block {
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline Block g_block;
inline dim3 g_grid_dim, g_block_dim;
inline thread_local dim3 t_thread_idx, t_block_idx;
inline thread_local int t_linear = -1;
inline thread_local const char* t_kernel = nullptr;  // the kernel this thread runs (its first index read names it)

// threadIdx / blockIdx: the first read in a thread names the kernel (every kernel reads one before calling a helper),
// which is how the host run counts the launches of each kernel.
inline const dim3& thread_idx(const char* fn) {
  if (!t_kernel) t_kernel = fn;
  return t_thread_idx;
}
inline const dim3& block_idx(const char* fn) {
  if (!t_kernel) t_kernel = fn;
  return t_block_idx;
}

inline void syncthreads(const std::source_location at = std::source_location::current()) {
  if (t_linear < 0) fail("__syncthreads outside a kernel", at);
  g_block.bar.arrive("__syncthreads", at);
}

// __shfl_down_sync: lane l gets the value of lane l + delta (its own past the end of its width-segment).
template <typename T>
T shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = kWarpSize,
                 const std::source_location at = std::source_location::current()) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  if (t_linear < 0) fail("__shfl_down_sync outside a kernel", at);
  const int lane = t_linear % kWarpSize;
  if (!(mask >> lane & 1u)) fail("__shfl_down_sync called by a lane that is not in its mask", at);
  Warp& w = *g_block.warps[t_linear / kWarpSize];
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.mask[lane] = mask;
  w.line[lane] = at.line();
  const uint32_t arrived = w.bar.arrive("__shfl_down_sync", at, 1u << lane);
  if ((arrived & mask) != mask)
    fail("__shfl_down_sync: a lane named in the mask did not take part (exited or diverged)", at);
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1u && (w.mask[l] != mask || w.line[l] != at.line()))
      fail("__shfl_down_sync: lanes of one exchange passed different masks or call sites", at);
  const int seg = lane / width * width, src = lane + static_cast<int>(delta);
  T out = v;
  if (src < seg + width) {
    if (!(mask >> src & 1u)) fail("__shfl_down_sync reads a lane outside the mask", at);
    std::memcpy(&out, w.slot[src], sizeof(T));
  }
  w.bar.arrive("__shfl_down_sync (read)", at);  // nobody overwrites a slot before everyone read it
  return out;
}

// A pool of worker threads, one per thread of a block, reused for every block of every launch.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads wait for work until the process exits
    return *pool;
  }

  void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
    const std::lock_guard<std::mutex> launch(launch_);  // one launch at a time (shared memory is a static)
    const int n = static_cast<int>(block.x * block.y * block.z);
    if (n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
      std::fprintf(stderr, "unetx host emulation: bad launch grid (%u, %u, %u) block (%u, %u, %u)\n", grid.x, grid.y,
                   grid.z, block.x, block.y, block.z);
      std::abort();
    }
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
      workers_.back().detach();
    }
    g_grid_dim = grid;
    g_block_dim = block;
    const int nwarps = (n + kWarpSize - 1) / kWarpSize;
    while (static_cast<int>(g_block.warps.size()) < nwarps) g_block.warps.push_back(std::make_unique<Warp>());
    for (unsigned int bz = 0; bz < grid.z; ++bz)
      for (unsigned int by = 0; by < grid.y; ++by)
        for (unsigned int bx = 0; bx < grid.x; ++bx) {
          g_block.bar.reset(n);
          g_sync.live.store(n, std::memory_order_relaxed);
          g_sync.waiting.store(0, std::memory_order_relaxed);
          for (int w = 0; w < nwarps; ++w) g_block.warps[w]->bar.reset(std::min(kWarpSize, n - w * kWarpSize));
          std::unique_lock<std::mutex> lock(m_);
          body_ = &body;
          block_idx_ = dim3(bx, by, bz);
          threads_ = n;
          running_ = n;
          ++generation_;
          start_.notify_all();
          done_.wait(lock, [&] { return running_ == 0; });
        }
    body_ = nullptr;
    ++launches_[kernel_ ? kernel_ : "(unnamed)"];
  }

  // Launches per kernel since the last reset, by its signature with template arguments (__PRETTY_FUNCTION__).
  std::map<std::string, int64_t> launches() {
    const std::lock_guard<std::mutex> launch(launch_);
    return launches_;
  }
  void reset_launches() {
    const std::lock_guard<std::mutex> launch(launch_);
    launches_.clear();
  }

 private:
  void work(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void()>* body;
      {
        std::unique_lock<std::mutex> lock(m_);
        start_.wait(lock, [&] { return generation_ != seen && id < threads_; });
        seen = generation_;
        body = body_;
        t_block_idx = block_idx_;
      }
      const dim3 b = g_block_dim;
      t_kernel = nullptr;
      t_linear = id;
      t_thread_idx = dim3(id % b.x, id / b.x % b.y, id / (b.x * b.y));
      (*body)();
      {  // the thread has exited: barriers no longer wait for it
        g_block.warps[id / kWarpSize]->bar.leave();
        g_block.bar.leave();
        const int live = g_sync.live.fetch_sub(1, std::memory_order_relaxed) - 1;
        if (live > 0 && g_sync.waiting.load(std::memory_order_relaxed) == live) {
          std::fprintf(stderr,
                       "unetx host emulation: a thread exited while every other live thread of the block "
                       "waits at a barrier that cannot complete\n");
          fail("deadlock (a barrier or shuffle not reached by every thread)", std::source_location::current());
        }
      }
      t_linear = -1;
      std::lock_guard<std::mutex> lock(m_);
      if (id == 0) kernel_ = t_kernel;
      if (--running_ == 0) done_.notify_one();
    }
  }

  std::mutex launch_, m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void()>* body_ = nullptr;
  const char* kernel_ = nullptr;
  std::map<std::string, int64_t> launches_;
  dim3 block_idx_;
  int threads_ = 0, running_ = 0;
  uint64_t generation_ = 0;
};

// kernel<<<grid, block>>>(args...): each emulated thread calls the kernel with its own copies of the arguments.
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, void (*kernel)(P...), const A&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
  const std::function<void()> body = [&] { kernel(static_cast<P>(args)...); };
  Pool::get().run_grid(grid, block, body);
}

inline void check_aligned(const void* p, std::size_t bytes,
                          const std::source_location at = std::source_location::current()) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "unetx host emulation: %zu-byte packed access at %p is misaligned\n", bytes, p);
    fail("misaligned vector access", at);
  }
}

}  // namespace unetx::emu

#define threadIdx (::unetx::emu::thread_idx(__PRETTY_FUNCTION__))
#define blockIdx (::unetx::emu::block_idx(__PRETTY_FUNCTION__))
#define blockDim (::unetx::emu::g_block_dim)
#define gridDim (::unetx::emu::g_grid_dim)
#define __syncthreads() ::unetx::emu::syncthreads()
#define __shfl_down_sync(...) ::unetx::emu::shfl_down_sync(__VA_ARGS__)
