// ScopedDevice: switch the current device for a scope and restore the previous
// one on exit, exceptions included. Like PyTorch's CUDAGuard: it can be neither
// copied nor moved, and its destructor never throws.
#pragma once

#include <oomguard/backend.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>

#include <atomic>
#include <cstdio>

namespace oomguard {

/// Called when a ScopedDevice cannot restore the previous device (a sticky
/// error, a lost GPU). The default writes one line to stderr; a destructor
/// cannot throw, so this is where the failure is reported.
using RestoreFailureHandler = void (*)(status s, int device);

namespace detail {
inline void default_restore_failure(status s, int device) {
    std::fprintf(stderr, "oomguard: ScopedDevice could not restore device %d: %s (code %d)\n", device,
                 s.name ? s.name : "unknown", s.code);
}
inline std::atomic<RestoreFailureHandler>& restore_failure_handler() {
    static std::atomic<RestoreFailureHandler> h{&default_restore_failure};
    return h;
}
inline std::atomic<unsigned long>& restore_failures() {
    static std::atomic<unsigned long> n{0};
    return n;
}
}  // namespace detail

/// Installs a handler for failed restores; returns the previous one. nullptr
/// restores the default.
inline RestoreFailureHandler set_restore_failure_handler(RestoreFailureHandler h) noexcept {
    return detail::restore_failure_handler().exchange(h != nullptr ? h : &detail::default_restore_failure);
}
/// How many restores have failed in this process.
inline unsigned long restore_failures() noexcept { return detail::restore_failures().load(); }

/// Note: restoring sets the previous device, and cudaSetDevice creates a
/// primary context on a device that has none (CUDA 12 and later). A program
/// that has not used any GPU yet should set its device once for the thread
/// rather than scope a switch away from device 0.
template <class Backend = default_backend>
class ScopedDevice {
public:
    /// Makes `device` current if it is not already. Throws std::invalid_argument
    /// for a device that does not exist, cuda_error / no_device_error otherwise.
    ScopedDevice(Backend& backend, int device) : backend_(&backend), device_(device) {
        status s = backend.current_device(&previous_);
        if (!s.ok()) detail::throw_status(s, "ScopedDevice: reading the current device");
        if (previous_ == device) return;
        s = backend.set_device(device);
        if (s.kind == status_kind::invalid_argument) {
            int count = 0;
            backend.device_count(&count);
            detail::throw_invalid(detail::Message() << "oomguard: ScopedDevice: device " << device
                                                    << " does not exist; valid ordinals are 0.." << count - 1);
        }
        if (!s.ok()) detail::throw_status(s, "ScopedDevice: switching device");
        switched_ = true;
    }
    ScopedDevice(ScopedDevice const&) = delete;
    ScopedDevice& operator=(ScopedDevice const&) = delete;
    ScopedDevice(ScopedDevice&&) = delete;
    ScopedDevice& operator=(ScopedDevice&&) = delete;

    ~ScopedDevice() {
        if (!switched_) return;
        status s = backend_->set_device(previous_);
        if (!s.ok()) {
            detail::restore_failures().fetch_add(1);
            detail::restore_failure_handler().load()(s, previous_);
        }
    }

    /// The device made current for the scope.
    int device() const noexcept { return device_; }
    /// The device that was current before, restored when the scope ends.
    int previous() const noexcept { return previous_; }
    /// Whether the constructor changed the device (and the destructor will restore).
    bool switched() const noexcept { return switched_; }

private:
    Backend* backend_;
    int device_;
    int previous_ = 0;
    bool switched_ = false;
};

}  // namespace oomguard
