// A host emulation of the CUDA execution model, enough to run this package's kernels on the CPU:
// force-included (g++ -include) before every source of the emulated build, with the headers beside
// it standing in for the CUDA toolkit's.
//
// A launch runs its blocks one after another; the threads of a block are fibers (ucontext) on the
// calling thread, each running until it reaches a barrier or a warp-wide operation. So:
//   - __syncthreads is a block barrier over the block's live threads; a barrier that some threads
//     never reach is reported as a deadlock, naming where each thread waits;
//   - warp operations (__shfl_xor_sync, __syncwarp, ldmatrix, mma.sync, wmma) gather all 32 lanes,
//     which must be live and at the same operation (else an error names both), then compute;
//   - dynamic shared memory is sized exactly as launched, filled with 0xff bytes (NaN as fp32, fp16
//     and bf16) before each block, and followed by a guard zone checked after it; PTX operands in
//     shared memory are checked to lie inside it, aligned;
//   - cp.async copies land at the issuing thread's wait, not before; a thread that exits with
//     copies in flight is an error;
//   - launch limits are checked: block size, grid size, and shared memory above 48 KB only after a
//     cudaFuncSetAttribute that allows it, up to the H100's 227 KB;
//   - the fibers of a block run in thread order or, with set_reverse_order(true), in reverse, so a
//     read of another warp's shared-memory writes without a barrier gives a different answer in one
//     of the two orders;
//   - set_block_filter runs only the blocks of the given blockIdx.x values (negative: from the end).
// Device memory is host memory: the kernels run on CPU tensors.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace vk_emu {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultShared = 48 * 1024;
constexpr size_t kOptinShared = 232448;  // H100: 227 KB
constexpr size_t kGuard = 4096;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kMaxOperand = 64;

struct Fiber {
  ucontext_t context;
  unsigned index = 0;
  bool done = false;
  const char* waiting = nullptr;  // what the fiber waits at, for deadlock reports
  std::vector<std::pair<void*, const void*>> copies;  // cp.async in flight: (shared, global)
};

struct Warp {
  int arrived = 0;
  int live = 0;
  unsigned generation = 0;
  const char* op = nullptr;
  unsigned first = 0;  // the lane that opened the current operation
  alignas(16) unsigned char in[kWarpSize][kMaxOperand];
  alignas(16) unsigned char out[kWarpSize][kMaxOperand];
};

struct State {
  dim3 grid, block, block_idx;
  unsigned char* shared = nullptr;
  size_t shared_size = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  int arrived = 0, live = 0;
  unsigned generation = 0;
  uint64_t progress = 0;
  std::string error;
  dim3 thread_idx;
};

inline State*& state() {
  static thread_local State* s = nullptr;
  return s;
}

// Block columns (blockIdx.x values) a launch runs, negative ones counted from the grid's end (-1:
// the last); empty: all. Lets a test run the few blocks that touch the far end of a tensor larger
// than 2^31 elements, whose other pages are then never touched.
inline std::vector<int64_t>& block_filter() {
  static std::vector<int64_t> columns;
  return columns;
}
inline void set_block_filter(std::vector<int64_t> columns) { block_filter() = std::move(columns); }

inline bool runs_column(unsigned x, unsigned grid_x) {
  const std::vector<int64_t>& columns = block_filter();
  return columns.empty() || std::any_of(columns.begin(), columns.end(), [&](int64_t c) {
           return (c < 0 ? c + grid_x : c) == static_cast<int64_t>(x);
         });
}

inline bool& reverse_order() {
  static bool reverse = false;
  return reverse;
}
inline void set_reverse_order(bool reverse) { reverse_order() = reverse; }

// The dynamic shared memory the last cudaFuncSetAttribute allowed: a launch above 48 KB must come
// after one that allows it (the kernel itself is not identified).
inline size_t& shared_optin() {
  static size_t optin = 0;
  return optin;
}

inline std::string block_name(const State& s) {
  std::ostringstream os;
  os << "block (" << s.block_idx.x << ", " << s.block_idx.y << ", " << s.block_idx.z << ")";
  return os.str();
}

// Ends the launch with an error: from a fiber, back to the scheduler for good.
[[noreturn]] inline void fail(const std::string& message) {
  State* s = state();
  if (s == nullptr || s->current == nullptr) {
    throw std::runtime_error("cuda emulation: " + message);
  }
  if (s->error.empty()) {
    s->error = block_name(*s) + " thread " + std::to_string(s->current->index) + ": " + message;
  }
  swapcontext(&s->current->context, &s->scheduler);
  std::abort();  // never resumed
}

inline void yield(const char* waiting) {
  State& s = *state();
  s.current->waiting = waiting;
  swapcontext(&s.current->context, &s.scheduler);
  s.current->waiting = nullptr;
}

inline Fiber& self() { return *state()->current; }
inline unsigned lane() { return self().index % kWarpSize; }

inline void check_shared(const void* p, size_t bytes, size_t align, const char* op) {
  const State& s = *state();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < s.shared || c + bytes > s.shared + s.shared_size) {
    fail(std::string(op) + ": operand outside the launch's dynamic shared memory");
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    fail(std::string(op) + ": operand not aligned to " + std::to_string(align) + " bytes");
  }
}

inline void syncthreads() {
  State& s = *state();
  const unsigned generation = s.generation;
  ++s.progress;
  if (++s.arrived == s.live) {
    s.arrived = 0;
    ++s.generation;
    return;
  }
  while (s.generation == generation) {
    yield("__syncthreads");
  }
}

// A warp-wide operation: every lane passes `in`, the last to arrive runs compute(ins, outs) over
// all 32, and each lane gets its own out.
template <typename Out, typename In, typename F>
Out warp_op(const char* op, const In& in, F&& compute) {
  static_assert(sizeof(In) <= kMaxOperand && sizeof(Out) <= kMaxOperand, "warp operand too large");
  State& s = *state();
  Warp& w = s.warps[self().index / kWarpSize];
  const unsigned l = lane();
  if (w.live != kWarpSize) {
    fail(std::string(op) + " with a full mask in a warp of " + std::to_string(w.live) + " live lanes");
  }
  if (w.arrived == 0) {
    w.op = op;
    w.first = l;
  } else if (std::strcmp(w.op, op) != 0) {
    fail(std::string("warp divergence: lane ") + std::to_string(l) + " at " + op + " while lane " +
         std::to_string(w.first) + " is at " + w.op);
  }
  std::memcpy(w.in[l], &in, sizeof(In));
  const unsigned generation = w.generation;
  ++s.progress;
  if (++w.arrived == kWarpSize) {
    In ins[kWarpSize];
    Out outs[kWarpSize];
    for (int i = 0; i < kWarpSize; ++i) {
      std::memcpy(&ins[i], w.in[i], sizeof(In));
    }
    compute(ins, outs);
    for (int i = 0; i < kWarpSize; ++i) {
      std::memcpy(w.out[i], &outs[i], sizeof(Out));
    }
    w.arrived = 0;
    ++w.generation;
  } else {
    while (w.generation == generation) {
      yield(op);
    }
  }
  Out out;
  std::memcpy(&out, w.out[l], sizeof(Out));
  return out;
}

inline void check_mask(unsigned mask, const char* op) {
  if (mask != 0xffffffffu) {
    fail(std::string(op) + ": only full-warp masks are emulated");
  }
}

inline void syncwarp(unsigned mask = 0xffffffffu) {
  check_mask(mask, "__syncwarp");
  warp_op<int>("__syncwarp", 0, [](const int*, int* outs) {
    for (int i = 0; i < kWarpSize; ++i) {
      outs[i] = 0;
    }
  });
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int width) {
  check_mask(mask, "__shfl_xor_sync");
  if (width != kWarpSize) {
    fail("__shfl_xor_sync: only width 32 is emulated");
  }
  return warp_op<T>("__shfl_xor_sync", value, [lane_mask](const T* ins, T* outs) {
    for (int i = 0; i < kWarpSize; ++i) {
      outs[i] = ins[(i ^ lane_mask) % kWarpSize];
    }
  });
}

inline void copy_async(void* to_shared, const void* from_global, size_t bytes) {
  check_shared(to_shared, bytes, bytes, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(from_global) % bytes != 0) {
    fail("cp.async: source not aligned to " + std::to_string(bytes) + " bytes");
  }
  self().copies.emplace_back(to_shared, from_global);
}

inline void wait_copies() {
  for (const auto& [to, from] : self().copies) {
    std::memcpy(to, from, 16);
  }
  self().copies.clear();
}

inline thread_local std::function<void()>* body = nullptr;

inline void entry() {
  State& s = *state();
  Fiber& f = *s.current;
  try {
    (*body)();
  } catch (const std::exception& e) {
    fail(std::string("threw: ") + e.what());
  }
  if (!f.copies.empty()) {
    fail("exits with cp.async copies never waited for");
  }
  Warp& w = s.warps[f.index / kWarpSize];
  if (w.arrived > 0) {
    fail(std::string("exits while its warp waits at ") + w.op);
  }
  f.done = true;
  --w.live;
  ++s.progress;
  if (--s.live > 0 && s.arrived == s.live) {
    s.arrived = 0;
    ++s.generation;
  }
  swapcontext(&f.context, &s.scheduler);
}

struct Config {
  dim3 grid, block;
  size_t shared;
  Config(dim3 g, dim3 b, size_t shared_bytes = 0, cudaStream_t = nullptr) : grid(g), block(b), shared(shared_bytes) {}
};

// Runs kernel(args...) over the grid, blocks one after another; throws std::runtime_error on the
// first error any thread reports.
template <typename Kernel, typename... Args>
void launch(const Config& c, Kernel&& kernel, const Args&... args) {
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024) {
    fail("launch with " + std::to_string(threads) + " threads per block");
  }
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 || c.grid.z > 65535 ||
      c.grid.x > 2147483647u) {
    std::ostringstream os;
    os << "launch with grid (" << c.grid.x << ", " << c.grid.y << ", " << c.grid.z << ")";
    fail(os.str());
  }
  if (c.shared > kDefaultShared) {
    if (shared_optin() < c.shared) {
      fail("launch with " + std::to_string(c.shared) +
           " bytes of dynamic shared memory without cudaFuncSetAttribute opting the kernel in");
    }
  }
  State s;
  s.grid = c.grid;
  s.block = c.block;
  s.shared_size = c.shared;
  std::vector<unsigned char> shared(c.shared + kGuard);
  s.shared = shared.data();
  const size_t stack_bytes = kStack * threads;
  void* stacks = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) {
    throw std::runtime_error("cuda emulation: no memory for fiber stacks");
  }
  std::function<void()> run = [&] { kernel(args...); };
  State* const outer = state();
  std::function<void()>* const outer_body = body;
  state() = &s;
  body = &run;
  auto restore = [&] {
    state() = outer;
    body = outer_body;
    munmap(stacks, stack_bytes);
  };
  for (unsigned z = 0; z < c.grid.z && s.error.empty(); ++z) {
    for (unsigned y = 0; y < c.grid.y && s.error.empty(); ++y) {
      for (unsigned x = 0; x < c.grid.x && s.error.empty(); ++x) {
        if (!runs_column(x, c.grid.x)) {
          continue;
        }
        s.block_idx = dim3(x, y, z);
        std::memset(shared.data(), 0xff, shared.size());
        s.fibers.assign(threads, Fiber{});
        s.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp{});
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = s.fibers[t];
          f.index = t;
          s.warps[t / kWarpSize].live++;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = static_cast<char*>(stacks) + kStack * t;
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = nullptr;
          makecontext(&f.context, entry, 0);
        }
        s.live = static_cast<int>(threads);
        s.arrived = 0;
        while (s.error.empty() && s.live > 0) {
          const uint64_t before = s.progress;
          for (unsigned i = 0; i < threads && s.error.empty(); ++i) {
            Fiber& f = s.fibers[reverse_order() ? threads - 1 - i : i];
            if (f.done) {
              continue;
            }
            s.current = &f;
            s.thread_idx =
                dim3(f.index % c.block.x, f.index / c.block.x % c.block.y, f.index / (c.block.x * c.block.y));
            swapcontext(&s.scheduler, &f.context);
            s.current = nullptr;
          }
          if (s.error.empty() && s.live > 0 && s.progress == before) {
            std::ostringstream os;
            os << block_name(s) << ": deadlock;";
            for (const Fiber& f : s.fibers) {
              if (!f.done) {
                os << " thread " << f.index << " waits at " << (f.waiting ? f.waiting : "?") << ";";
              }
            }
            s.error = os.str();
          }
        }
        for (size_t i = c.shared; i < shared.size() && s.error.empty(); ++i) {
          if (shared[i] != 0xff) {
            s.error =
                block_name(s) + ": wrote past its " + std::to_string(c.shared) + " bytes of dynamic shared memory";
          }
        }
      }
    }
  }
  restore();
  if (!s.error.empty()) {
    throw std::runtime_error("cuda emulation: " + s.error);
  }
}

inline unsigned char* dynamic_shared() { return state()->shared; }

}  // namespace vk_emu

#define threadIdx (::vk_emu::state()->thread_idx)
#define blockIdx (::vk_emu::state()->block_idx)
#define blockDim (::vk_emu::state()->block)
#define gridDim (::vk_emu::state()->grid)

inline void __syncthreads() { ::vk_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::vk_emu::syncwarp(mask); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::vk_emu::shfl_xor(mask, value, lane_mask, width);
}
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// fp16 and bf16 as the CUDA headers name them, with c10's round-to-nearest-even conversions.
struct __half {
  uint16_t x;
  __half() = default;
  __half(float f) : x(c10::Half(f).x) {}
  operator float() const { return static_cast<float>(c10::Half(x, c10::Half::from_bits())); }
};
struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : x(c10::BFloat16(f).x) {}
  operator float() const { return static_cast<float>(c10::BFloat16(x, c10::BFloat16::from_bits())); }
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = static_cast<int>(::vk_emu::kOptinShared);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > ::vk_emu::kOptinShared) {
      return cudaErrorInvalidValue;
    }
    ::vk_emu::shared_optin() = static_cast<size_t>(value);
  }
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
