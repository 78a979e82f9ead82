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
#include <oomguard/simulated_devices.hpp>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <type_traits>

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

namespace detail {
// Whether a backend's allocations are host memory a CPU kernel may touch: not
// the GPU's, not the simulator's phantom addresses.
template <class Backend>
bool host_memory(Backend const&) noexcept {
    return true;  // a backend of your own over host memory
}
inline bool host_memory(SimulatedDevices const& sim) noexcept { return sim.memory() == SimulatedMemory::host; }
}  // namespace detail

/// A c10::Allocator for CPU tensors over a MemoryBudget of a backend whose
/// memory is on the host (SimulatedDevices with SimulatedMemory::host, or one
/// of your own): every CPU tensor's storage is counted, capped and, on a
/// simulated device, limited by its capacity. A request the budget or the
/// device refuses throws c10::OutOfMemoryError carrying oomguard's message
/// (requested, free, held, cap), so libtorch reports it, and adaptive_batch
/// recovers from it, as from a CUDA OOM. Storage is 64-byte aligned, as
/// libtorch's CPU kernels expect; the budget counts the alignment slack too.
template <class Backend>
class TorchCpuAllocator final : public c10::Allocator {
public:
    static_assert(!std::is_same<Backend, CudaRuntime>::value,
                  "oomguard: TorchCpuAllocator hands CPU kernels the budget's memory: give it a budget over host "
                  "memory (MemoryBudget<SimulatedDevices>), not over the GPU");
    /// Every storage's address is a multiple of this, as libtorch's CPU kernels expect.
    static constexpr std::size_t alignment = 64;

    /// CPU tensors' storage through `budget`, which must outlive every tensor allocated here; throws
    /// std::invalid_argument for a budget over phantom simulated memory.
    explicit TorchCpuAllocator(MemoryBudget<Backend>& budget) : budget_(&budget) {
        if (!detail::host_memory(budget.backend()))
            detail::throw_invalid("oomguard: TorchCpuAllocator: the budget's device hands out phantom addresses "
                                  "(SimulatedMemory::phantom) that no CPU kernel may touch; give it a "
                                  "SimulatedDevices with SimulatedMemory::host");
    }

    /// Tensors' storage blocks allocated here and not yet freed.
    std::size_t live_blocks() const noexcept { return live_.load(std::memory_order_relaxed); }

    /// `n` bytes of storage through the budget (plus the alignment slack and a small header, which
    /// the budget counts too); throws c10::OutOfMemoryError with oomguard's message when the budget
    /// or the device refuses.
    c10::DataPtr allocate(std::size_t n) override {
        if (n == 0) return c10::DataPtr(nullptr, nullptr, &TorchCpuAllocator::free, c10::Device(c10::DeviceType::CPU));
        if (n > static_cast<std::size_t>(-1) - alignment - sizeof(Block)) throw_oom(n, "the size overflows");
        std::size_t const bytes = n + alignment + sizeof(Block);
        void* raw = nullptr;
        try {
            raw = budget_->allocate(bytes);
        } catch (out_of_memory const& e) {
            note_rewrapped(e);  // c10's error cannot carry the figures: adaptive_batch finds them here
            throw_oom(n, e.what());
        }
        // The block's header sits right below the aligned storage.
        auto base = reinterpret_cast<std::uintptr_t>(raw) + sizeof(Block);
        auto aligned = (base + alignment - 1) & ~static_cast<std::uintptr_t>(alignment - 1);
        void* data = reinterpret_cast<void*>(aligned);
        ::new (static_cast<void*>(static_cast<Block*>(data) - 1)) Block{budget_->device(), raw, bytes, this};
        live_.fetch_add(1, std::memory_order_relaxed);
        return c10::DataPtr(data, data, &TorchCpuAllocator::free, c10::Device(c10::DeviceType::CPU));
    }

    /// The function that frees a storage allocated here, for libtorch's raw allocations.
    c10::DeleterFnPtr raw_deleter() const override { return &TorchCpuAllocator::free; }

    /// Copies `count` bytes between storages (host memory: a plain copy).
    void copy_data(void* dest, void const* src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }

    /// The budget the storage goes through.
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
        TorchCpuAllocator const* owner = b->owner;
        owner->budget_->deallocate(b->raw, b->bytes);
        owner->live_.fetch_sub(1, std::memory_order_relaxed);
    }

    MemoryBudget<Backend>* budget_;
    mutable std::atomic<std::size_t> live_{0};
};

/// Installs a TorchCpuAllocator as libtorch's CPU allocator (process-wide:
/// every thread's CPU tensors) for its lifetime, and puts the previous one back
/// on destruction. c10::SetCPUAllocator keeps the priority it was last given,
/// so `priority` (at least the installed allocator's; 0 for libtorch's own)
/// stays in force after the scope. Every tensor allocated meanwhile must be
/// freed before the scope ends -- declare it before the tensors and the model:
/// one still alive then would be freed through a destroyed allocator, so the
/// destructor ends the program with a message instead. Neither copyable nor movable.
template <class Backend>
class ScopedTorchCpuAllocator {
public:
    /// Installs an allocator over `budget` at `priority`; throws std::invalid_argument when libtorch
    /// keeps an allocator of higher priority (or TorchCpuAllocator's own refusal of the budget).
    explicit ScopedTorchCpuAllocator(MemoryBudget<Backend>& budget, std::uint8_t priority = 0)
        : allocator_(budget), previous_(c10::GetCPUAllocator()), priority_(priority) {
        c10::SetCPUAllocator(&allocator_, priority_);
        if (c10::GetCPUAllocator() != &allocator_)
            detail::throw_invalid("oomguard: ScopedTorchCpuAllocator: libtorch kept its CPU allocator; an allocator "
                                  "of higher priority is installed: give a priority at least as high");
    }
    ScopedTorchCpuAllocator(ScopedTorchCpuAllocator const&) = delete;
    ScopedTorchCpuAllocator& operator=(ScopedTorchCpuAllocator const&) = delete;
    ~ScopedTorchCpuAllocator() {
        c10::SetCPUAllocator(previous_, priority_);
        if (std::size_t n = allocator_.live_blocks()) {
            std::fprintf(stderr,
                         "oomguard: ScopedTorchCpuAllocator ends with %zu tensor storages it allocated still alive; "
                         "they would be freed through it later. Declare it before the tensors, the model and the "
                         "optimizer, so that it outlives them.\n",
                         n);
            std::abort();
        }
    }

    /// The installed allocator (live_blocks(), budget()).
    TorchCpuAllocator<Backend>& allocator() noexcept { return allocator_; }

private:
    TorchCpuAllocator<Backend> allocator_;
    c10::Allocator* previous_;
    std::uint8_t priority_;
};

#if OOMGUARD_TORCH_CUDA

namespace detail {
// Set while the caching allocator runs our free-memory callback: it is then
// looking for room to allocate, and emptying its own cache from inside that
// search would free the blocks it is choosing among.
inline thread_local bool in_torch_free_callback = false;

// The fraction set_torch_memory_fraction gave each device (0: none), for the meter.
inline std::atomic<double>* torch_fractions() noexcept {
    static std::atomic<double> f[64] = {};
    return f;
}

inline c10::CachingDeviceAllocator::DeviceStats torch_stats(int device) {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
}
constexpr std::size_t aggregate = static_cast<std::size_t>(c10::CachingAllocator::StatType::AGGREGATE);
}  // namespace detail

/// libtorch's CUDA caching allocator on `device` as a cache for CacheRegistry:
/// releasable is what it reserves beyond what tensors use; release() empties
/// it (emptyCache, which frees the cached blocks of every device) and returns
/// the reserved bytes `device` gave back.
class TorchCudaCache {
public:
    /// The caching allocator's blocks on `device`.
    explicit TorchCudaCache(int device) noexcept : device_(device) {}
    /// Bytes reserved on the device beyond what tensors use (the caching allocator's statistics).
    std::size_t releasable_bytes() const {
        auto s = detail::torch_stats(device_);
        auto reserved = static_cast<std::size_t>(s.reserved_bytes[detail::aggregate].current);
        auto allocated = static_cast<std::size_t>(s.allocated_bytes[detail::aggregate].current);
        return reserved > allocated ? reserved - allocated : 0;
    }
    /// emptyCache(), then the reserved bytes the device gave back; 0 while the caching allocator
    /// itself is asking (from TorchFreeMemoryCallback), since it holds its lock then.
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
/// allocated to tensors now and at their peak, and available = the device's
/// free memory plus what the allocator reserves but does not use, within the
/// cap set_torch_memory_fraction gave. reset_peak() is resetPeakStats: it
/// restarts every peak statistic of the device (torch.cuda.max_memory_allocated
/// and a profiler's too) at each micro-batch.
class TorchCudaMeter {
public:
    /// Measures the caching allocator on `device`.
    explicit TorchCudaMeter(int device) noexcept : device_(device) {}
    /// The device measured.
    int device() const noexcept { return device_; }
    /// Bytes allocated to tensors on the device now.
    std::size_t used() const {
        return static_cast<std::size_t>(detail::torch_stats(device_).allocated_bytes[detail::aggregate].current);
    }
    /// The most bytes allocated to tensors since the last reset_peak (or raise_peak's value, if higher).
    std::size_t peak() const {
        auto p = static_cast<std::size_t>(detail::torch_stats(device_).allocated_bytes[detail::aggregate].peak);
        return p > raised_ ? p : raised_;
    }
    /// Restarts every peak statistic of the device (resetPeakStats) and returns the old peak.
    std::size_t reset_peak() {
        std::size_t old = peak();
        c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device_));
        raised_ = 0;
        return old;
    }
    /// Raises the peak peak() reports to at least `v` until the next reset_peak.
    void raise_peak(std::size_t v) noexcept { raised_ = v > raised_ ? v : raised_; }
    /// false: used() counts tensors' bytes, not what the allocator keeps cached
    /// (TorchCudaCache's bytes), so AdaptiveBatch does not subtract those from it.
    static constexpr bool counts_cached() noexcept { return false; }
    /// Bytes a step could still reach: the device's free memory plus what the allocator reserves and
    /// does not use, within the memory fraction set_torch_memory_fraction gave; 0 when CUDA cannot say.
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
        std::size_t avail = free + (reserved > allocated ? reserved - allocated : 0);
        double f = device_ >= 0 && device_ < 64 ? detail::torch_fractions()[device_].load() : 0.0;
        if (f > 0) {  // the caching allocator refuses to reserve past fraction x total
            auto cap = static_cast<std::size_t>(f * static_cast<double>(total));
            std::size_t room = cap > allocated ? cap - allocated : 0;
            avail = room < avail ? room : avail;
        }
        return avail;
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
/// once, now (headroom: what is free plus what the allocator already reserves,
/// less the headroom). Call it once libtorch has initialised CUDA (after the
/// first CUDA tensor): the allocator asserts otherwise. For an exact cap on
/// every byte libtorch allocates, route it through a MemoryBudget with
/// torch::cuda::CUDAPluggableAllocator (which gives up the cache), or count
/// other allocations in the budget with reserve().
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
        case Limit::kind::headroom: {
            auto reserved = static_cast<std::size_t>(detail::torch_stats(device).reserved_bytes[detail::aggregate].current);
            std::size_t could = free + reserved;
            f = could > limit.amount() ? static_cast<double>(could - limit.amount()) / static_cast<double>(total) : 0.0;
            break;
        }
        default: f = 1.0; break;
    }
    if (!(f > 0.0 && f <= 1.0))
        detail::throw_invalid("oomguard: set_torch_memory_fraction: the limit leaves no memory for libtorch, or is "
                              "above the device's total; give a cap in (0, total]");
    c10::cuda::CUDACachingAllocator::setMemoryFraction(f, static_cast<c10::DeviceIndex>(device));
    if (device >= 0 && device < 64) detail::torch_fractions()[device].store(f);
    return f;
}

/// The caching allocator's free-memory callback. The allocator runs its
/// callbacks whenever its pool has no block for a request, before it asks
/// cudaMalloc, and retries when one freed something. This one releases every
/// cache in CacheRegistry::global() (a Thrust or RMM pool in the same process;
/// a TorchCudaCache there does nothing while the allocator asks) -- but only
/// when the device is short: less than `pressure` (default 1/16) of its memory
/// free, so that ordinary growth of the pool does not empty the others' caches.
/// Register it once, at global namespace scope: OOMGUARD_TORCH_FREE_MEMORY_CALLBACK();
class TorchFreeMemoryCallback : public c10::FreeMemoryCallback {
public:
    /// The fraction of the device's memory under which free memory counts as short (default 1/16).
    static inline std::atomic<double> pressure{1.0 / 16};

    /// Releases CacheRegistry::global() when the device is short; true when that freed something
    /// (the caching allocator then retries its request).
    bool Execute() override {
        std::size_t free = 0, total = 0;
        if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
            (void)cudaGetLastError();
            return false;
        }
        if (static_cast<double>(free) >= pressure.load() * static_cast<double>(total)) return false;
        struct Flag {
            bool was = detail::in_torch_free_callback;
            Flag() { detail::in_torch_free_callback = true; }
            ~Flag() { detail::in_torch_free_callback = was; }
        } flag;
        try {
            return CacheRegistry::global().release_all().bytes() > 0;
        } catch (...) {
            return false;  // the allocator then reports its OOM as it would have
        }
    }
};

// libtorch's registry macro names its registry unqualified: it must expand inside
// namespace c10, so use this at global namespace scope.
#define OOMGUARD_TORCH_FREE_MEMORY_CALLBACK()                                                      \
    namespace c10 {                                                                                \
    REGISTER_FREE_MEMORY_CALLBACK("oomguard_cache_registry", ::oomguard::TorchFreeMemoryCallback) \
    }                                                                                              \
    static_assert(true, "a semicolon after the macro")

#endif  // OOMGUARD_TORCH_CUDA

}  // namespace oomguard
