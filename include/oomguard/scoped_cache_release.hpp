// ScopedCacheRelease: "empty the cache" as a scope. Releases every registered
// cache when the scope ends (or on demand), optionally after synchronizing the
// device, optionally only under memory pressure.
#pragma once

#include <oomguard/cache_registry.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>

#include <cstddef>
#include <utility>

namespace oomguard {

/// Releases the caches of a registry on scope exit, or when `release()` is
/// called (then not again at scope exit).
///
/// Clearing caches after every step makes a continuous workload rebuild them
/// every step; `only_when_available_below` / `only_when_device_free_below` turn
/// it into a pressure valve that does nothing while memory is plentiful
/// (benchmarks/bench_cache_release.cpp measures both).
class ScopedCacheRelease {
public:
    /// Releases every cache of `registry` when the scope ends (the registry must outlive it).
    explicit ScopedCacheRelease(CacheRegistry& registry = CacheRegistry::global()) noexcept
        : registry_(&registry) {}
    ScopedCacheRelease(ScopedCacheRelease const&) = delete;
    ScopedCacheRelease& operator=(ScopedCacheRelease const&) = delete;

    /// Releases on scope exit unless release() already ran. Never throws: a cache
    /// that throws is isolated by the registry, and a failed synchronize is dropped
    /// here as a destructor must; call release() to see either.
    ~ScopedCacheRelease() {
        if (!done_) {
            try {
                ReleaseReport r = release();
                if (report_to_ != nullptr) *report_to_ = std::move(r);
            } catch (...) {
                // A destructor may not throw; call release() yourself to see this error.
            }
        }
    }

    /// Synchronizes `device` of `backend` first, so memory that kernels still use
    /// is not handed back under them. A failed synchronize (a sticky error) throws
    /// from release() and nothing is released.
    template <class Backend>
    ScopedCacheRelease& synchronize_first(Backend& backend, int device) noexcept {
        sync_object_ = &backend;
        sync_device_ = device;
        sync_ = [](void* b, int d) -> status { return static_cast<Backend*>(b)->synchronize(d); };
        return *this;
    }

    /// Pressure-only: release only when `budget` has fewer than `bytes` available.
    template <class Backend>
    ScopedCacheRelease& only_when_available_below(MemoryBudget<Backend>& budget, std::size_t bytes) noexcept {
        probe_object_ = &budget;
        threshold_ = bytes;
        probe_ = [](void* b, int, std::size_t t) -> bool {
            return static_cast<MemoryBudget<Backend>*>(b)->available() < t;
        };
        return *this;
    }

    /// Pressure-only: release only when the device has fewer than `bytes` free.
    /// (On CudaRuntime this reads cudaMemGetInfo.)
    template <class Backend>
    ScopedCacheRelease& only_when_device_free_below(Backend& backend, int device, std::size_t bytes) noexcept {
        probe_object_ = &backend;
        probe_device_ = device;
        threshold_ = bytes;
        probe_ = [](void* b, int d, std::size_t t) -> bool {
            std::size_t free = 0, total = 0;
            // An unreadable device counts as pressure: releasing is the safe side.
            if (!static_cast<Backend*>(b)->memory_info(d, &free, &total).ok()) return true;
            return free < t;
        };
        return *this;
    }

    /// Where the destructor's release puts its report (per-cache bytes, failures).
    ScopedCacheRelease& report_to(ReleaseReport& out) noexcept {
        report_to_ = &out;
        return *this;
    }

    /// Releases now and returns what each cache gave back.
    ReleaseReport release() {
        done_ = true;
        ReleaseReport r;
        if (probe_ != nullptr && !probe_(probe_object_, probe_device_, threshold_)) {
            r.skipped = true;
            return r;
        }
        if (sync_ != nullptr) {
            status s = sync_(sync_object_, sync_device_);
            if (!s.ok()) detail::throw_status(s, "ScopedCacheRelease: synchronizing before the release");
        }
        return registry_->release_all();
    }

    /// Whether release() has run (so the destructor will not).
    bool released() const noexcept { return done_; }

private:
    CacheRegistry* registry_;
    bool done_ = false;
    void* sync_object_ = nullptr;
    int sync_device_ = 0;
    status (*sync_)(void*, int) = nullptr;
    void* probe_object_ = nullptr;
    int probe_device_ = 0;
    std::size_t threshold_ = 0;
    bool (*probe_)(void*, int, std::size_t) = nullptr;
    ReleaseReport* report_to_ = nullptr;
};

}  // namespace oomguard
