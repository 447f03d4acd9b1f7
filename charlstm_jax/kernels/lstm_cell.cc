// XLA FFI handlers for one step of the LSTM cell on the CPU, forward and backward.
//
// model.py scans these over a window (see `cell_kernel.py`): each call computes one step, fused
// (the recurrent product, the gate activations and the cell update in one pass), with the
// kernel pre-packed once per window so that the product reads it as one contiguous stream. A
// step writes its row of the window's outputs and the cell state (or its gradient) in place,
// and reads h from the row before (the backward step: dh from the next step's dz), so that no
// carry is copied from step to step; the backward step is one pass, its product and its
// elementwise part for the same units done by one thread. Two threads share a step: each keeps
// its half of the kernel's blocks from step to step (in its own core's cache) and then helps
// with what is left.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

struct ForwardArgs {
  int64_t hidden, batch;
  const float *gate_inputs, *h, *packed;  // the step's gate inputs [4, H * B], h before, kernel
  // The cell state, in place; the step's rows of the outputs: the backward pass's factors
  // (null when no gradient will be taken) and h.
  float *c, *scale, *to_dc, *forget, *hs;
};

struct BackwardArgs {
  int64_t hidden, batch;
  // dz of the step after (null at the window's last step, which takes dh_last instead), and
  // the step's rows of the window's arrays.
  const float *dz_next, *dh_last, *dh_out, *to_dc, *scale, *forget, *packed;
  float *dc, *dz;  // the cell gradient, in place; the step's row of dz
};

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
#include "lstm_step.inc"
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "lstm_step.inc"
}
#pragma GCC pop_options

namespace baseline {
#include "lstm_step.inc"
}

namespace {

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa Detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}

const Isa kIsa = Detect();

// Worker threads of our own, one fewer than the cores (the caller is the other): XLA's thread
// pool took about 60 us to start a task, a third of a step. A worker spins for a while after
// each task, as the next step's comes within microseconds, then sleeps.
class Workers {
 public:
  static Workers& Get() {
    static Workers* workers = new Workers();  // never destroyed: its threads are detached
    return *workers;
  }

  // Runs work(i) for i in [0, n) on the caller and the workers. Worker p starts on the share
  // [p * n / parts, ...), so a block goes to the same core every step, then takes what is left.
  // The caller waits only for items taken: a worker that is late, or a second caller (several
  // CPU devices), costs speed, never a deadlock.
  void Run(int64_t n, const std::function<void(int64_t)>& work) {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    const int64_t parts = lock.owns_lock() ? std::min<int64_t>(threads_ + 1, n) : 1;
    if (parts <= 1) {
      for (int64_t i = 0; i < n; ++i) work(i);
      return;
    }
    if (static_cast<int64_t>(claimed_.size()) < n) claimed_ = std::vector<std::atomic<bool>>(n);
    for (int64_t i = 0; i < n; ++i) claimed_[i].store(false, std::memory_order_relaxed);
    work_ = &work;
    n_ = n;
    parts_ = parts;
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    Share(0);
    while (done_.load(std::memory_order_acquire) < n) __builtin_ia32_pause();
    finished_.store(generation_.load(std::memory_order_relaxed), std::memory_order_release);
    while (busy_.load(std::memory_order_acquire) != 0) __builtin_ia32_pause();
  }

 private:
  Workers() {
    threads_ = std::max(1u, std::thread::hardware_concurrency()) - 1;
    for (int64_t part = 1; part <= threads_; ++part) std::thread([this, part] { Loop(part); }).detach();
  }

  void Share(int64_t part) {
    const int64_t start = part * n_ / parts_;
    for (int64_t s = 0; s < n_; ++s) {
      const int64_t i = (start + s) % n_;
      if (claimed_[i].load(std::memory_order_relaxed)) continue;
      if (claimed_[i].exchange(true, std::memory_order_acquire)) continue;
      (*work_)(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop(int64_t part) {
    using Clock = std::chrono::steady_clock;
    uint64_t seen = 0;
    for (;;) {
      uint64_t generation = generation_.load(std::memory_order_acquire);
      const auto spin_until = Clock::now() + std::chrono::microseconds(200);
      for (int spin = 1; generation == seen; ++spin) {
        __builtin_ia32_pause();
        if (spin % 256 == 0 && Clock::now() > spin_until) break;
        generation = generation_.load(std::memory_order_acquire);
      }
      if (generation == seen) {
        generation_.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = generation;
      busy_.fetch_add(1, std::memory_order_acq_rel);
      if (finished_.load(std::memory_order_acquire) != generation && part < parts_) Share(part);
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex mutex_;  // one job at a time; a second caller works alone
  int64_t threads_ = 0;
  std::vector<std::atomic<bool>> claimed_;
  std::atomic<uint64_t> generation_{0}, finished_{0};
  std::atomic<int64_t> done_{0}, busy_{0};
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t n_ = 0, parts_ = 1;
};

// Runs `columns(a, block)` for every block on the workers, in this CPU's build of the step.
template <typename Args>
void RunBlocks(int64_t blocks, const Args& a, void (*avx512_columns)(const Args&, int64_t),
               void (*avx2_columns)(const Args&, int64_t),
               void (*baseline_columns)(const Args&, int64_t)) {
  const auto columns = kIsa == Isa::kAvx512 ? avx512_columns
                       : kIsa == Isa::kAvx2 ? avx2_columns
                                            : baseline_columns;
  Workers::Get().Run(blocks, [&a, columns](int64_t block) { columns(a, block); });
}

// One forward step: `scale`, `to_dc` and `forget` are null when no gradient will be taken.
ffi::Error ForwardStep(int64_t t, const ffi::Buffer<ffi::F32>& gate_inputs,
                       const ffi::Buffer<ffi::F32>& h0, const ffi::Buffer<ffi::F32>& packed,
                       float* c, float* scale, float* to_dc, float* forget, float* hs,
                       int64_t steps) {
  const auto dims = packed.dimensions();  // [H / 4, H, 4, 4]
  const int64_t hidden = dims[1], units = h0.element_count();
  if (dims.size() != 4 || dims[0] * 4 != hidden || units % hidden != 0 || t < 0 || t >= steps)
    return ffi::Error::InvalidArgument("lstm_forward_step: inconsistent shapes or step");
  ForwardArgs a{hidden, units / hidden};
  a.gate_inputs = gate_inputs.typed_data() + t * 4 * units;
  a.h = t == 0 ? h0.typed_data() : hs + (t - 1) * units;  // the previous step's output row
  a.packed = packed.typed_data();
  a.c = c;
  a.scale = scale == nullptr ? nullptr : scale + t * 4 * units;
  a.to_dc = to_dc == nullptr ? nullptr : to_dc + t * units;
  a.forget = forget == nullptr ? nullptr : forget + t * units;
  a.hs = hs + t * units;
  RunBlocks(hidden / 4, a, avx512::forward_columns, avx2::forward_columns,
            baseline::forward_columns);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::S32> step, ffi::Buffer<ffi::F32> gate_inputs,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> packed, ffi::Buffer<ffi::F32>,
                   ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                   ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32> c,
                   ffi::ResultBuffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> to_dc,
                   ffi::ResultBuffer<ffi::F32> forget, ffi::ResultBuffer<ffi::F32> hs) {
  return ForwardStep(step.typed_data()[0], gate_inputs, h0, packed, c->typed_data(),
                     scale->typed_data(), to_dc->typed_data(), forget->typed_data(),
                     hs->typed_data(), hs->dimensions()[0]);
}

ffi::Error Inference(ffi::Buffer<ffi::S32> step, ffi::Buffer<ffi::F32> gate_inputs,
                     ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> packed,
                     ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32> c,
                     ffi::ResultBuffer<ffi::F32> hs) {
  return ForwardStep(step.typed_data()[0], gate_inputs, h0, packed, c->typed_data(), nullptr,
                     nullptr, nullptr, hs->typed_data(), hs->dimensions()[0]);
}

ffi::Error Backward(ffi::Buffer<ffi::S32> step, ffi::Buffer<ffi::F32> dh_last,
                    ffi::Buffer<ffi::F32> dh_out, ffi::Buffer<ffi::F32> to_dc,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> forget,
                    ffi::Buffer<ffi::F32> packed, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                    ffi::ResultBuffer<ffi::F32> dc, ffi::ResultBuffer<ffi::F32> dz) {
  const auto dims = packed.dimensions();  // [H / 16, 4H, 16]
  const int64_t hidden = dims[0] * 16, units = dh_last.element_count();
  const int64_t t = step.typed_data()[0], steps = dz->dimensions()[0];
  if (dims.size() != 3 || dims[1] != 4 * hidden || units % hidden != 0 || t < 0 || t >= steps)
    return ffi::Error::InvalidArgument("lstm_backward_step: inconsistent shapes or step");
  BackwardArgs a{hidden, units / hidden};
  a.dz_next = t + 1 < steps ? dz->typed_data() + (t + 1) * 4 * units : nullptr;
  a.dh_last = dh_last.typed_data();
  a.dh_out = dh_out.typed_data() + t * units;
  a.to_dc = to_dc.typed_data() + t * units;
  a.scale = scale.typed_data() + t * 4 * units;
  a.forget = forget.typed_data() + t * units;
  a.packed = packed.typed_data();
  a.dc = dc->typed_data();
  a.dz = dz->typed_data() + t * 4 * units;
  RunBlocks(hidden / 16, a, avx512::backward_columns, avx2::backward_columns,
            baseline::backward_columns);
  return ffi::Error::Success();
}

// Buffers for the window's outputs, left unwritten: the steps write every entry before any is
// read, so filling them with zeros first would only cost time.
ffi::Error LeaveUnwritten(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForwardStep, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // step t
                                  .Arg<F32>()                    // gate inputs [T, 4, H * B]
                                  .Arg<F32>()                    // h before the window [H * B]
                                  .Arg<F32>()                    // packed kernel
                                  .Arg<F32>()                    // c [H * B], aliased
                                  .Arg<F32>()                    // scale [T, 4, H * B], aliased
                                  .Arg<F32>()                    // to_dc [T, H * B], aliased
                                  .Arg<F32>()                    // forget [T, H * B], aliased
                                  .Arg<F32>()                    // hs [T, H * B], aliased
                                  .Ret<F32>()                    // c
                                  .Ret<F32>()                    // scale
                                  .Ret<F32>()                    // to_dc
                                  .Ret<F32>()                    // forget
                                  .Ret<F32>());                  // hs

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmInferenceStep, Inference,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // step t
                                  .Arg<F32>()                    // gate inputs [T, 4, H * B]
                                  .Arg<F32>()                    // h before the window [H * B]
                                  .Arg<F32>()                    // packed kernel
                                  .Arg<F32>()                    // c [H * B], aliased
                                  .Arg<F32>()                    // hs [T, H * B], aliased
                                  .Ret<F32>()                    // c
                                  .Ret<F32>());                  // hs

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackwardStep, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // step t
                                  .Arg<F32>()                    // dh after the window [H * B]
                                  .Arg<F32>()                    // dh_out [T, H * B]
                                  .Arg<F32>()                    // to_dc [T, H * B]
                                  .Arg<F32>()                    // scale [T, 4, H * B]
                                  .Arg<F32>()                    // forget [T, H * B]
                                  .Arg<F32>()                    // packed kernel
                                  .Arg<F32>()                    // dc [H * B], aliased
                                  .Arg<F32>()                    // dz [T, 4, H * B], aliased
                                  .Ret<F32>()                    // dc
                                  .Ret<F32>());                  // dz

XLA_FFI_DEFINE_HANDLER_SYMBOL(Uninitialized, LeaveUnwritten,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
