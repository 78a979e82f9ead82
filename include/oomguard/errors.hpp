// Typed errors: `out_of_memory` for a device OOM (the only error oomguard retries)
// and `cuda_error` for every other device failure.
#pragma once

#include <oomguard/backend.hpp>
#include <oomguard/detail/adaptive_step_scope.hpp>
#include <oomguard/detail/format.hpp>
#include <oomguard/detail/std_throw.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <new>

namespace oomguard {

/// Bytes as oomguard's messages write them: "80.00 MiB", "512 B" (binary units,
/// two decimals, as PyTorch does). `.c_str()` gives the text; no allocation.
using detail::format_bytes;

/// Why an allocation was refused.
enum class oom_source : unsigned char {
    budget,  ///< a MemoryBudget denied it before the device was asked
    device   ///< the device (cudaMalloc or the simulator) refused it
};

/// Every figure of PyTorch's "CUDA out of memory" message, typed.
/// `unknown` marks a figure the backend could not tell (for example when a
/// memory query itself failed while the error was being built).
struct oom_info {
    /// A figure nobody could tell: the largest size_t.
    static constexpr std::size_t unknown = std::numeric_limits<std::size_t>::max();

    int device = -1;  ///< the device that ran out of memory (CUDA's ordinal; -1 when not known)
    std::size_t requested = 0;          ///< bytes the failed call asked for
    bool requested_known = true;        ///< false when the failing library did not say (Thrust)
    std::size_t total = unknown;        ///< device capacity
    std::size_t free = unknown;         ///< device bytes free when it failed
    std::size_t budget_used = unknown;  ///< bytes held under the budget
    std::size_t budget_limit = unknown; ///< the budget's cap (unknown: no budget)
    int code = 2;                       ///< backend code (cudaErrorMemoryAllocation = 2)
    char const* code_name = "cudaErrorMemoryAllocation";  ///< the backend code's name, static storage
    char const* backend = "cuda";  ///< the backend's name (its backend_name), static storage
    oom_source source = oom_source::device;  ///< what refused the request: the device, or the budget before the device was asked
};

namespace detail {
inline Message& figure(Message& m, std::size_t b) {
    return b == oom_info::unknown ? m << "unknown" : m << format_bytes(b);
}

inline Message describe(oom_info const& i) noexcept {
    Message m;
    m << "oomguard: out of memory: tried to allocate ";
    if (!i.requested_known)
        m << "an unknown size";
    else
        m << format_bytes(i.requested);
    m << " on GPU " << i.device;
    if (std::strcmp(i.backend, "cuda") != 0) m << " (" << i.backend << ')';
    m << "; ";
    figure(m, i.total) << " total, ";
    figure(m, i.free) << " free";
    if (i.budget_limit != oom_info::unknown) {
        m << "; ";
        figure(m, i.budget_used) << " held under this budget of ";
        figure(m, i.budget_limit);
    } else if (i.budget_used != oom_info::unknown) {
        m << "; ";  // an uncapped budget still knows what it holds (PyTorch's "already allocated")
        figure(m, i.budget_used) << " already allocated through this budget";
    }
    // The advice is chosen when the error is built, on the thread that failed:
    // only inside an adaptive_batch step is the batch the lever.
    bool const in_step = in_adaptive_step();
    if (i.source == oom_source::budget) {
        m << " (denied by the budget before the device was asked). Advice: ";
        if (in_step)
            m << "lower the batch (adaptive_batch does it for you) or raise the budget.";
        else
            m << "outside an adaptive_batch step (setup: model weights, optimizer state) a smaller batch does not "
                 "help: raise the budget, free what else is held under it, lower the precision of the weights "
                 "(FP16/BF16), or use another device.";
    } else {
        m << " (" << i.code_name << "). Advice: ";
        if (in_step)
            m << "release caches (ScopedCacheRelease), lower the batch, use FP16/BF16 buffers, or pick a GPU "
                 "with more free memory (DeviceSelector).";
        else
            m << "outside an adaptive_batch step (setup: model weights, optimizer state) a smaller batch does not "
                 "help: free memory held elsewhere (caches: ScopedCacheRelease; other processes), lower the "
                 "precision of the weights (FP16/BF16), or use a GPU with more free memory (DeviceSelector).";
    }
    return m;
}
}  // namespace detail

/// A device out-of-memory error. Derives from std::bad_alloc so code that already
/// catches allocation failures keeps working. Its text ends with advice, chosen
/// when it is built: inside an adaptive_batch step (on the thread running it)
/// a smaller batch; outside one (setup: weights, optimizer state) what helps there.
class out_of_memory : public std::bad_alloc {
public:
    /// A device OOM with these figures.
    explicit out_of_memory(oom_info info) noexcept : info_(info), what_(detail::describe(info_)) {}
    /// With a message of the caller's (for example one that lists every attempt).
    out_of_memory(oom_info info, detail::Message const& message) noexcept
        : info_(info), what_(message) {}

    /// The whole message, in PyTorch's order of figures, with advice; never null, owned by the exception.
    char const* what() const noexcept override { return what_.c_str(); }
    /// Every figure of the message, typed.
    oom_info const& info() const noexcept { return info_; }
    /// The device that ran out of memory (info().device).
    int device() const noexcept { return info_.device; }
    /// Bytes the failed call asked for (info().requested; 0 when not known).
    std::size_t requested() const noexcept { return info_.requested; }

private:
    oom_info info_;
    detail::Message what_;
};

namespace detail {
/// The last out_of_memory passed to note_rewrapped on this thread, and a count of them.
struct LastOom {
    std::uint64_t serial = 0;  ///< note_rewrapped calls so far on this thread
    oom_info info;             ///< the last one's figures
};
inline LastOom& last_oom() noexcept {
    thread_local LastOom last;
    return last;
}
}  // namespace detail

/// Call where you catch oomguard's out_of_memory and raise another library's
/// error in its place (libtorch's allocator raises c10::OutOfMemoryError, a
/// CUDA_CHECK its "CUDA error: out of memory"): adaptive_batch, catching yours
/// in the same micro-batch on this thread, then plans with these figures (what
/// was asked for and held), which your error's type cannot carry. Only the last
/// one on this thread is kept. Never throws.
inline void note_rewrapped(out_of_memory const& e) noexcept {
    detail::LastOom& last = detail::last_oom();
    ++last.serial;
    last.info = e.info();
}

namespace detail {
inline Message cuda_error_text(status s, char const* context) noexcept {
    Message m;
    m << "oomguard: " << context << ": " << s.name << " (code " << s.code << ", "
      << to_string(s.kind) << ")";
    return m;
}
inline Message no_device_text(status s, char const* context) noexcept {
    Message m;
    m << "oomguard: no usable CUDA device (" << context << ": " << s.name << ", code " << s.code
      << "); check that the NVIDIA driver is installed, a GPU is present and "
         "CUDA_VISIBLE_DEVICES does not hide it, or use SimulatedDevices";
    return m;
}
}  // namespace detail

/// Any device failure that is not an out-of-memory: carries the backend's code
/// and kind. A sticky error (kind() == status_kind::sticky) means the context is
/// corrupted and nothing on this device can be retried.
///
/// Derives from std::exception directly and keeps its text in the object (like
/// out_of_memory): building it allocates nothing on the host, so a device failure
/// is reported even when host memory is short, and the core needs no `<stdexcept>`.
class cuda_error : public std::exception {
public:
    /// The failure `s` of the call named by `context` (for example "cudaMalloc"); builds its text
    /// without allocating, so it never throws.
    cuda_error(status s, char const* context) noexcept
        : what_(detail::cuda_error_text(s, context)), status_(s) {}

    /// The message: the failed call, the code and its name; never null, owned by the exception.
    char const* what() const noexcept override { return what_.c_str(); }

    /// The backend's code (a cudaError_t value for CudaRuntime).
    int code() const noexcept { return status_.code; }
    /// The code's name ("cudaErrorIllegalAddress"), static storage.
    char const* code_name() const noexcept { return status_.name; }
    /// What kind of failure it is (status_kind::sticky, invalid_argument, no_device, other).
    status_kind kind() const noexcept { return status_.kind; }
    /// True when the CUDA context is corrupted: nothing on this device may be retried, and the
    /// process must end to recover the device.
    bool is_sticky() const noexcept { return status_.kind == status_kind::sticky; }

protected:
    /// For derived errors that write their own text (no_device_error).
    cuda_error(status s, detail::Message const& text) noexcept : what_(text), status_(s) {}

private:
    detail::Message what_;
    status status_;
};

/// No usable CUDA device: no driver, no GPU, or CUDA_VISIBLE_DEVICES hides them all.
/// Never an out-of-memory.
class no_device_error : public cuda_error {
public:
    /// The failure `s` of the call named by `context`, read as "no usable CUDA device".
    no_device_error(status s, char const* context) noexcept : cuda_error(s, detail::no_device_text(s, context)) {}
};

namespace detail {
/// Turns a failed non-OOM status into its typed exception.
[[noreturn]] inline void throw_status(status s, char const* context) {
    if (s.kind == status_kind::no_device) throw no_device_error(s, context);
    throw cuda_error(s, context);
}
}  // namespace detail

}  // namespace oomguard
