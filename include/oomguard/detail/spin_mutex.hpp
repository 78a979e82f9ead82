// A small lock for cold paths (fault plans, pointer maps, registries). <mutex>
// costs more to compile than the rest of oomguard's core together, and none of
// these critical sections does more than a few loads and stores.
#pragma once

#include <atomic>

#if defined(__unix__) || defined(__APPLE__)
#include <sched.h>
#endif

namespace oomguard {
namespace detail {

/// Gives the CPU to another thread (a plain spin where the platform has no sched_yield).
inline void yield_cpu() noexcept {
#if defined(__unix__) || defined(__APPLE__)
    sched_yield();
#endif
}

/// Test-and-test-and-set lock that yields the CPU when it spins too long.
/// Meets BasicLockable, so std::lock_guard works with it too.
class SpinMutex {
public:
    void lock() noexcept {
        for (unsigned spins = 0;; ++spins) {
            if (!locked_.load(std::memory_order_relaxed) &&
                !locked_.exchange(true, std::memory_order_acquire))
                return;
            if (spins >= 64) {
                yield_cpu();
                spins = 0;
            }
        }
    }
    bool try_lock() noexcept {
        return !locked_.load(std::memory_order_relaxed) &&
               !locked_.exchange(true, std::memory_order_acquire);
    }
    void unlock() noexcept { locked_.store(false, std::memory_order_release); }

private:
    std::atomic<bool> locked_{false};
};

/// Scoped lock for SpinMutex (std::lock_guard would need <mutex>).
class SpinLock {
public:
    explicit SpinLock(SpinMutex& m) noexcept : m_(m) { m_.lock(); }
    SpinLock(SpinLock const&) = delete;
    SpinLock& operator=(SpinLock const&) = delete;
    ~SpinLock() { m_.unlock(); }

private:
    SpinMutex& m_;
};

}  // namespace detail
}  // namespace oomguard
