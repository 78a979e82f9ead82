// oomguard in a libtorch training loop. Opt-in, and C++20 as libtorch's own
// headers require (the rest of oomguard stays C++17). What it gives:
//
// - c10::OutOfMemoryError recognised by its type, whatever its text (a CUDA,
//   MPS or XPU OOM, or one a custom allocator raised): registered when this
//   header is included, so is_device_oom and adaptive_batch know it.
// - TorchCpuAllocator: CPU tensors allocated through a MemoryBudget. Over
//   SimulatedDevices a real torch::nn model runs out of "device" memory on a
//   CPU machine as it would on a GPU: the allocator throws c10::OutOfMemoryError
//   with oomguard's message, as libtorch's CUDA allocator does.
// - With libtorch's CUDA headers (c10/cuda) and the toolkit's: the caching
//   allocator as a registered cache (TorchCudaCache) and as a meter for the
//   predictive policy (TorchCudaMeter), a cap from a Limit (set_torch_memory_fraction),
//   and the free-memory callback that lets the caching allocator release
//   every other registered cache before it gives up.
//
//   auto cpu = oomguard::ScopedTorchCpuAllocator<oomguard::SimulatedDevices>(budget);
//   oomguard::TorchCudaCache cache(0);                       // GPU builds
//   auto reg = oomguard::CacheRegistry::global().add("libtorch caching allocator", 10, cache);
//   oomguard::TorchCudaMeter meter(0);
//   train.measure_with(meter);
#pragma once

#if __cplusplus < 202002L
#error "oomguard: <oomguard/torch.hpp> needs C++20, as libtorch's headers do: compile with -std=c++20 (the rest of oomguard needs C++17)"
#endif

#include <oomguard/classify.hpp>
#include <oomguard/cache_registry.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>

#if !defined(OOMGUARD_TORCH_CUDA)
#if __has_include(<c10/cuda/CUDACachingAllocator.h>) && __has_include(<cuda_runtime_api.h>)
#define OOMGUARD_TORCH_CUDA 1
#else
#define OOMGUARD_TORCH_CUDA 0
#endif
#endif
#if OOMGUARD_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace oomguard {

/// True when `e` is a c10::OutOfMemoryError, whatever its text says.
inline bool is_torch_oom(std::exception const& e) noexcept {
    return dynamic_cast<c10::OutOfMemoryError const*>(&e) != nullptr;
}

namespace detail {
// Registered once per program by the first translation unit that includes this
// header; a rule slot of the 16 is taken for the program's life.
inline OomRuleRegistration const torch_oom_rule{&is_torch_oom};
}  // namespace detail

/// A c10::Allocator for CPU tensors over a MemoryBudget: every CPU tensor's
/// storage is counted, capped and, on a simulated device, limited by its
/// capacity. A request the budget or the device refuses throws
/// c10::OutOfMemoryError carrying oomguard's message (requested, free, held,
/// cap), so libtorch reports it, and adaptive_batch recovers from it, as from
/// a CUDA OOM. Storage is 64-byte aligned, as libtorch's CPU kernels expect;
/// the budget counts the alignment slack too.
template <class Backend = default_backend>
class TorchCpuAllocator final : public c10::Allocator {
public:
    static constexpr std::size_t alignment = 64;

    explicit TorchCpuAllocator(MemoryBudget<Backend>& budget) noexcept : budget_(&budget) {}

    c10::DataPtr allocate(std::size_t n) override {
        if (n == 0) return c10::DataPtr(nullptr, nullptr, &TorchCpuAllocator::free, c10::Device(c10::DeviceType::CPU));
        if (n > static_cast<std::size_t>(-1) - alignment - sizeof(Block)) throw_oom(n, "the size overflows");
        std::size_t const bytes = n + alignment + sizeof(Block);
        void* raw = nullptr;
        try {
            raw = budget_->allocate(bytes);
        } catch (out_of_memory const& e) {
            throw_oom(n, e.what());
        }
        // The block's header sits right below the aligned storage.
        auto base = reinterpret_cast<std::uintptr_t>(raw) + sizeof(Block);
        auto aligned = (base + alignment - 1) & ~static_cast<std::uintptr_t>(alignment - 1);
        void* data = reinterpret_cast<void*>(aligned);
        ::new (static_cast<void*>(static_cast<Block*>(data) - 1)) Block{budget_->device(), raw, bytes, this};
        return c10::DataPtr(data, data, &TorchCpuAllocator::free, c10::Device(c10::DeviceType::CPU));
    }

    c10::DeleterFnPtr raw_deleter() const override { return &TorchCpuAllocator::free; }

    void copy_data(void* dest, void const* src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }

    MemoryBudget<Backend>& budget() const noexcept { return *budget_; }

private:
    struct Block {
        int device;
        void* raw;
        std::size_t bytes;
        TorchCpuAllocator const* owner;
    };

    [[noreturn]] static void throw_oom(std::size_t n, char const* why) {
        // As libtorch raises its own: c10::OutOfMemoryError, with oomguard's figures.
        TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU tensor of ", n, " bytes through an oomguard budget: ", why);
        throw std::bad_alloc();  // not reached
    }

    static void free(void* data) noexcept {
        if (data == nullptr) return;
        Block const* b = static_cast<Block const*>(data) - 1;
        b->owner->budget_->deallocate(b->raw, b->bytes);
    }

    MemoryBudget<Backend>* budget_;
};

/// Installs a TorchCpuAllocator as libtorch's CPU allocator for its lifetime
/// and puts the previous one back on destruction (c10::SetCPUAllocator, at
/// `priority`, which must be at least the installed allocator's). Tensors
/// allocated meanwhile must be freed before it ends. Neither copyable nor movable.
template <class Backend = default_backend>
class ScopedTorchCpuAllocator {
public:
    explicit ScopedTorchCpuAllocator(MemoryBudget<Backend>& budget, std::uint8_t priority = 100)
        : allocator_(budget), previous_(c10::GetCPUAllocator()), priority_(priority) {
        c10::SetCPUAllocator(&allocator_, priority_);
        if (c10::GetCPUAllocator() != &allocator_)
            detail::throw_invalid("oomguard: ScopedTorchCpuAllocator: libtorch kept its CPU allocator; an allocator "
                                  "of higher priority is installed: give a priority at least as high");
    }
    ScopedTorchCpuAllocator(ScopedTorchCpuAllocator const&) = delete;
    ScopedTorchCpuAllocator& operator=(ScopedTorchCpuAllocator const&) = delete;
    ~ScopedTorchCpuAllocator() { c10::SetCPUAllocator(previous_, priority_); }

    TorchCpuAllocator<Backend>& allocator() noexcept { return allocator_; }

private:
    TorchCpuAllocator<Backend> allocator_;
    c10::Allocator* previous_;
    std::uint8_t priority_;
};

#if OOMGUARD_TORCH_CUDA

namespace detail {
// Set while the caching allocator runs our free-memory callback: it holds its
// own lock then, so releasing it from inside would deadlock.
inline thread_local bool in_torch_free_callback = false;

inline c10::CachingDeviceAllocator::DeviceStats torch_stats(int device) {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
}
constexpr std::size_t aggregate = static_cast<std::size_t>(c10::CachingAllocator::StatType::AGGREGATE);
}  // namespace detail

/// libtorch's CUDA caching allocator on `device` as a cache for CacheRegistry:
/// releasable is what it reserves beyond what tensors use; release() empties
/// it (emptyCache) and returns the reserved bytes it gave back.
class TorchCudaCache {
public:
    explicit TorchCudaCache(int device) noexcept : device_(device) {}
    std::size_t releasable_bytes() const {
        auto s = detail::torch_stats(device_);
        auto reserved = static_cast<std::size_t>(s.reserved_bytes[detail::aggregate].current);
        auto allocated = static_cast<std::size_t>(s.allocated_bytes[detail::aggregate].current);
        return reserved > allocated ? reserved - allocated : 0;
    }
    std::size_t release() {
        if (detail::in_torch_free_callback) return 0;  // the allocator is asking us: it holds its lock
        auto before = static_cast<std::size_t>(detail::torch_stats(device_).reserved_bytes[detail::aggregate].current);
        c10::cuda::CUDACachingAllocator::emptyCache();
        auto after = static_cast<std::size_t>(detail::torch_stats(device_).reserved_bytes[detail::aggregate].current);
        return before > after ? before - after : 0;
    }

private:
    int device_;
};

/// The caching allocator as a meter for AdaptiveBatch::measure_with: bytes
/// allocated to tensors now and at their peak (resetPeakStats restarts it),
/// and available = the device's free memory plus what the allocator reserves
/// but does not use.
class TorchCudaMeter {
public:
    explicit TorchCudaMeter(int device) noexcept : device_(device) {}
    int device() const noexcept { return device_; }
    std::size_t used() const {
        return static_cast<std::size_t>(detail::torch_stats(device_).allocated_bytes[detail::aggregate].current);
    }
    std::size_t peak() const {
        auto p = static_cast<std::size_t>(detail::torch_stats(device_).allocated_bytes[detail::aggregate].peak);
        return p > raised_ ? p : raised_;
    }
    std::size_t reset_peak() {
        std::size_t old = peak();
        c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device_));
        raised_ = 0;
        return old;
    }
    void raise_peak(std::size_t v) noexcept { raised_ = v > raised_ ? v : raised_; }
    std::size_t available() const {
        std::size_t free = 0, total = 0;
        int previous = 0;
        if (cudaGetDevice(&previous) != cudaSuccess) return 0;
        bool ok = cudaSetDevice(device_) == cudaSuccess && cudaMemGetInfo(&free, &total) == cudaSuccess;
        (void)cudaSetDevice(previous);
        if (!ok) {
            (void)cudaGetLastError();
            return 0;
        }
        auto s = detail::torch_stats(device_);
        auto reserved = static_cast<std::size_t>(s.reserved_bytes[detail::aggregate].current);
        auto allocated = static_cast<std::size_t>(s.allocated_bytes[detail::aggregate].current);
        return free + (reserved > allocated ? reserved - allocated : 0);
    }

private:
    int device_;
    std::size_t raised_ = 0;
};

/// Caps libtorch's caching allocator on `device` by `limit` through
/// setMemoryFraction and returns the fraction set. This caps what the caching
/// allocator reserves -- not the CUDA context, not cuBLAS/cuDNN handles' own
/// memory, not NCCL or other libraries -- so it does not bound the whole
/// process, and a byte or headroom limit is turned into a fraction of the total
/// once, now. For an exact cap on every byte libtorch allocates, route it
/// through a MemoryBudget with torch::cuda::CUDAPluggableAllocator (which
/// gives up the cache), or count other allocations in the budget with reserve().
inline double set_torch_memory_fraction(Limit limit, int device) {
    std::size_t free = 0, total = 0;
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess ||
        cudaMemGetInfo(&free, &total) != cudaSuccess) {
        cudaError_t e = cudaGetLastError();
        (void)cudaSetDevice(previous);
        throw cuda_error(status{status_kind::other, static_cast<int>(e), cudaGetErrorName(e)},
                         "set_torch_memory_fraction: reading the device's memory");
    }
    (void)cudaSetDevice(previous);
    double f = 1.0;
    switch (limit.type()) {
        case Limit::kind::fraction: f = limit.ratio(); break;
        case Limit::kind::bytes: f = static_cast<double>(limit.amount()) / static_cast<double>(total); break;
        case Limit::kind::headroom:
            f = free > limit.amount() ? static_cast<double>(free - limit.amount()) / static_cast<double>(total) : 0.0;
            break;
        default: f = 1.0; break;
    }
    if (!(f > 0.0 && f <= 1.0))
        detail::throw_invalid("oomguard: set_torch_memory_fraction: the limit leaves no memory for libtorch, or is "
                              "above the device's total; give a cap in (0, total]");
    c10::cuda::CUDACachingAllocator::setMemoryFraction(f, static_cast<c10::DeviceIndex>(device));
    return f;
}

/// The caching allocator's free-memory callback: before it reports an OOM it
/// asks each registered callback to free memory, then retries. This one
/// releases every cache in CacheRegistry::global() (a Thrust or RMM pool in the
/// same process; a TorchCudaCache there does nothing while the allocator asks).
/// Register it once, at namespace scope: OOMGUARD_TORCH_FREE_MEMORY_CALLBACK();
class TorchFreeMemoryCallback : public c10::FreeMemoryCallback {
public:
    bool Execute() override {
        struct Flag {
            Flag() { detail::in_torch_free_callback = true; }
            ~Flag() { detail::in_torch_free_callback = false; }
        } flag;
        try {
            return CacheRegistry::global().release_all().bytes() > 0;
        } catch (...) {
            return false;  // the allocator then reports its OOM as it would have
        }
    }
};

// libtorch's registry macro names its registry unqualified: it must expand inside namespace c10.
#define OOMGUARD_TORCH_FREE_MEMORY_CALLBACK()                                                      \
    namespace c10 {                                                                                \
    REGISTER_FREE_MEMORY_CALLBACK("oomguard_cache_registry", ::oomguard::TorchFreeMemoryCallback) \
    }                                                                                              \
    static_assert(true, "a semicolon after the macro")

#endif  // OOMGUARD_TORCH_CUDA

}  // namespace oomguard
