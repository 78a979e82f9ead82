// MemoryBudget: a cap on the device memory a program allocates through it,
// checked before the backend is called, so an over-budget request never reaches
// cudaMalloc. The PyTorch analogue is set_per_process_memory_fraction.
#pragma once

#include <oomguard/backend.hpp>
#include <oomguard/detail/spin_mutex.hpp>
#include <oomguard/errors.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifndef OOMGUARD_HAS_CUDA
#if defined(__has_include)
#if __has_include(<cuda_runtime_api.h>)
#define OOMGUARD_HAS_CUDA 1
#endif
#endif
#endif
#ifndef OOMGUARD_HAS_CUDA
#define OOMGUARD_HAS_CUDA 0
#endif

namespace oomguard {

class SimulatedDevices;
#if OOMGUARD_HAS_CUDA
class CudaRuntime;  // <oomguard/cuda_runtime.hpp>
#else
namespace detail {
template <class T>
struct no_cuda_toolkit : std::false_type {};
}  // namespace detail
/// Without the CUDA toolkit (OOMGUARD_HAS_CUDA=0) there is no GPU backend: using
/// one is a compile error that says so, not an "incomplete type".
class CudaRuntime {
public:
    static constexpr char const* backend_name = "cuda (not built)";
    template <class T = void>
    CudaRuntime() {
        static_assert(detail::no_cuda_toolkit<T>::value,
                      "oomguard: CudaRuntime needs the CUDA toolkit's headers (<cuda_runtime_api.h>), and this "
                      "build has none (OOMGUARD_HAS_CUDA=0): install the toolkit and add its include directory "
                      "(find_package(oomguard) and pkg-config do), or use oomguard::SimulatedDevices, the default "
                      "backend without CUDA");
    }
};
#endif

/// The backend a plain `MemoryBudget<>` uses: the real GPU when the CUDA toolkit
/// is visible to the compiler, the simulator otherwise.
#if OOMGUARD_HAS_CUDA
using default_backend = CudaRuntime;
#else
using default_backend = SimulatedDevices;
#endif

/// How a budget's cap is given. Resolved against the device's memory when the
/// budget is built (or `set_limit` is called).
class Limit {
public:
    /// How the cap is given: a byte count, a fraction of the device's total, a headroom left free, or none.
    enum class kind : unsigned char { bytes, fraction, headroom, unlimited };

    /// At most `n` bytes.
    static Limit bytes(std::size_t n) { return Limit(kind::bytes, n, 0.0); }
    /// At most `f` of the device's total memory; `f` must be in (0, 1].
    static Limit fraction(double f) {
        if (!(f > 0.0 && f <= 1.0))
            detail::throw_invalid(detail::Message()
                                  << "oomguard: Limit::fraction(" << f
                                  << "): a fraction of device memory must be in (0, 1]");
        return Limit(kind::fraction, 0, f);
    }
    /// Everything free on the device when the cap is set (the budget is built,
    /// or set_limit is called), plus what the budget holds then, less `n` bytes
    /// left for other users (cuBLAS workspaces, other processes, the display).
    static Limit headroom(std::size_t n) { return Limit(kind::headroom, n, 0.0); }
    /// No cap: the budget only counts.
    static Limit unlimited() { return Limit(kind::unlimited, 0, 0.0); }

    /// Which of the four forms this limit is.
    kind type() const noexcept { return kind_; }
    /// The bytes of a `bytes` limit, or the bytes left free by a `headroom` one; 0 otherwise.
    std::size_t amount() const noexcept { return bytes_; }
    /// The fraction of a `fraction` limit, in (0, 1]; 0 otherwise.
    double ratio() const noexcept { return fraction_; }

    /// The cap in bytes for a device with `free` and `total` bytes. A headroom
    /// is taken of `free` alone (MemoryBudget::set_limit adds what the budget
    /// holds before it takes it). Throws std::invalid_argument when a headroom
    /// is more than `free`.
    std::size_t resolve(std::size_t free, std::size_t total) const {
        switch (kind_) {
            case kind::bytes: return bytes_;
            case kind::unlimited: return std::numeric_limits<std::size_t>::max();
            case kind::fraction: {
                // The conversion truncates toward zero: the floor of a positive product.
                double v = static_cast<double>(total) * fraction_;
                return v >= static_cast<double>(total) ? total : static_cast<std::size_t>(v);
            }
            case kind::headroom:
                if (bytes_ > free)
                    detail::throw_invalid(detail::Message()
                                          << "oomguard: Limit::headroom(" << detail::format_bytes(bytes_)
                                          << ") is more than the " << detail::format_bytes(free)
                                          << " free on the device; ask for less headroom");
                return free - bytes_;
        }
        return 0;
    }

private:
    Limit(kind k, std::size_t b, double f) : kind_(k), bytes_(b), fraction_(f) {}
    kind kind_;
    std::size_t bytes_;
    double fraction_;
};

template <class Backend>
class Reservation;

/// A cap on one device's memory, shared by every thread that allocates through it.
///
/// The accounting costs one compare-and-swap on the allocation path and one
/// fetch-sub on the free path; no lock and no virtual call. Two choices keep it
/// there:
///  - A CAS rather than a fetch-add rolled back on overshoot: two concurrent
///    requests can never deny each other spuriously, so an OOM is only reported
///    when the cap is really reached (a false OOM would make adaptive_batch
///    shrink for nothing), and the cap is never exceeded, even for an instant.
///  - The bytes held (low 48 bits) and the allocation count modulo 2^16 (high 16
///    bits) share one 64-bit word, so the same CAS counts the allocation; the
///    rare carry out of the count is added to a second counter. A budget
///    therefore holds at most 256 TiB, more than any device has.
///
/// Neither copyable nor movable: reservations and buffers point to it.
template <class Backend = default_backend>
class MemoryBudget {
    static_assert(sizeof(std::size_t) == 8, "oomguard needs a 64-bit size_t");

public:
    /// The backend the budget allocates through (see backend.hpp).
    using backend_type = Backend;

    /// The largest cap a budget can hold (256 TiB); a larger one is an invalid_argument.
    static constexpr std::size_t max_limit = (std::size_t{1} << 48) - 1;

    /// A budget on `device` of `backend`. Throws std::invalid_argument for a bad
    /// device, no_device_error when there is no usable device.
    MemoryBudget(Backend& backend, int device, Limit limit = Limit::unlimited())
        : backend_(&backend), device_(device), spec_(limit) {
        static_assert(is_backend_v<Backend>, "MemoryBudget needs a backend (see backend.hpp); CudaRuntime is one "
                                            "only where the CUDA toolkit's headers are found (OOMGUARD_HAS_CUDA=1)");
        int count = 0;
        status s = backend.device_count(&count);
        if (!s.ok()) detail::throw_status(s, "MemoryBudget: counting devices");
        if (device < 0 || device >= count)
            detail::throw_invalid(detail::Message() << "oomguard: MemoryBudget: device " << device
                                                    << " does not exist; valid ordinals are 0.."
                                                    << count - 1);
        set_limit(limit);
    }

    /// A budget of `limit_bytes` bytes on `device`.
    MemoryBudget(Backend& backend, int device, std::size_t limit_bytes)
        : MemoryBudget(backend, device, Limit::bytes(limit_bytes)) {}

    MemoryBudget(MemoryBudget const&) = delete;
    MemoryBudget& operator=(MemoryBudget const&) = delete;

    /// Allocates `bytes` on the device under the cap. Returns nullptr for 0 bytes.
    /// Throws out_of_memory (the budget or the device said no; every field filled)
    /// or cuda_error / no_device_error for any other failure, which it never retries.
    void* allocate(std::size_t bytes) {
        if (bytes == 0) return nullptr;
        return take_then(bytes, bytes, "allocate", [&](void** p) { return backend_->allocate(p, bytes, device_); });
    }

    /// Frees what `allocate(bytes)` returned, then gives the bytes back to the cap.
    /// Never throws: a failed free (a sticky error) is counted in free_failures()
    /// and the bytes still leave the budget, since that memory is gone with the context.
    void deallocate(void* p, std::size_t bytes) noexcept {
        if (p == nullptr) return;
        status s = backend_->deallocate(p, bytes, device_);
        if (!s.ok()) free_failures_.fetch_add(1, std::memory_order_relaxed);
        release(bytes);
    }

    /// Stream-ordered (a backend with is_stream_ordered_v): allocates `bytes`
    /// from the device's pool, ordered on `stream` (cudaMallocFromPoolAsync on
    /// CudaRuntime). The budget counts what the pool takes: `bytes` rounded up to
    /// Backend::async_granularity. The same errors as allocate(). Memory freed on
    /// another stream and not yet synchronized is the pool's, not the budget's:
    /// a device OOM here may be only that (release the caches, which synchronize).
    template <class B = Backend, std::enable_if_t<is_stream_ordered_v<B>, int> = 0>
    void* allocate_async(std::size_t bytes, typename B::stream_type stream) {
        if (bytes == 0) return nullptr;
        if (bytes > max_limit / B::async_granularity * B::async_granularity) {  // rounds past any cap
            note_denial();
            throw out_of_memory(denial(bytes, oom_source::budget, status{}));
        }
        return take_then(bytes, async_bytes(bytes), "allocate_async",
                         [&](void** p) { return backend_->allocate_async(p, bytes, device_, stream); });
    }

    /// Frees, ordered on `stream`, what allocate_async(bytes, ...) returned, and
    /// gives its counted bytes back to the cap. Never throws (see deallocate()).
    template <class B = Backend, std::enable_if_t<is_stream_ordered_v<B>, int> = 0>
    void deallocate_async(void* p, std::size_t bytes, typename B::stream_type stream) noexcept {
        if (p == nullptr) return;
        status s = backend_->deallocate_async(p, bytes, device_, stream);
        if (!s.ok()) free_failures_.fetch_add(1, std::memory_order_relaxed);
        release(async_bytes(bytes));
    }

    /// What the budget counts for a stream-ordered request of `bytes`.
    template <class B = Backend, std::enable_if_t<is_stream_ordered_v<B>, int> = 0>
    static constexpr std::size_t async_bytes(std::size_t bytes) noexcept {
        return (bytes + B::async_granularity - 1) / B::async_granularity * B::async_granularity;
    }

    /// Takes `bytes` of the cap without allocating (memory a caller obtains some
    /// other way). False, and a denial counted, when it would exceed the cap.
    bool try_reserve(std::size_t bytes) noexcept {
        std::size_t now = 0;
        if (!take(bytes, 0, now)) return false;
        raise_peak(now);
        return true;
    }

    /// For a resource that allocates elsewhere (BudgetAdaptor): takes `bytes` of
    /// the cap and counts an allocation, as allocate() does before it calls the
    /// backend; `held` is what is held with them. False, and a denial counted,
    /// when it would exceed the cap. Then either raise_peak(held) once the
    /// allocation succeeded, or give the bytes back with release() (and count the
    /// allocator's refusal with note_device_oom()): the peak counts only what was held.
    bool try_account(std::size_t bytes, std::size_t& held) noexcept { return take(bytes, count_one, held); }
    /// Undoes a try_account whose allocation failed: the bytes and the count.
    void cancel_account(std::size_t bytes) noexcept { give_back(bytes, count_one); }
    /// Counts a request within the cap that the device (or the allocator behind try_account) refused.
    void note_device_oom() noexcept { device_ooms_.fetch_add(1, std::memory_order_relaxed); }
    /// Counts a refusal made without asking the cap (a request no cap could hold).
    void note_denial() noexcept { denials_.fetch_add(1, std::memory_order_relaxed); }

    /// Like try_reserve, but returns an RAII Reservation or throws out_of_memory.
    Reservation<Backend> reserve(std::size_t bytes);

    /// Gives back bytes taken by try_reserve. Giving back more than is held (a
    /// double free, memory from another budget) changes nothing and is counted
    /// in accounting_errors(): the bytes must not borrow from the allocation count.
    void release(std::size_t bytes) noexcept { give_back(bytes, 0); }

    /// Releases of more bytes than were held (see release()); 0 in a correct program.
    std::uint64_t accounting_errors() const noexcept { return accounting_errors_.load(std::memory_order_relaxed); }

    /// Recomputes the cap from `limit` and the device's memory now. Lowering it
    /// below what is held is allowed: new requests are denied until enough is freed.
    /// A headroom is taken of what the device has free plus what this budget
    /// holds (its own bytes are not someone else's use), so re-applying the same
    /// Limit::headroom gives the same cap. Throws std::invalid_argument when the
    /// headroom is more than that sum, or the cap comes to more than max_limit;
    /// cuda_error / no_device_error when the device's memory cannot be read.
    void set_limit(Limit limit) {
        std::size_t cap = max_limit;  // Limit::unlimited(): the largest the accounting word holds
        if (limit.type() == Limit::kind::fraction || limit.type() == Limit::kind::headroom) {
            // Read before the device: an allocation racing with this call is then
            // missed by both figures (a lower cap), never counted in both.
            std::size_t const held = used();
            std::size_t free = 0, total = 0;
            status s = backend_->memory_info(device_, &free, &total);
            if (!s.ok()) detail::throw_status(s, "MemoryBudget: reading device memory");
            if (limit.type() == Limit::kind::headroom) {
                // What this budget holds is the budget's to use again, not memory
                // someone else took: without it, re-applying a headroom would cut
                // the cap by everything the budget holds.
                std::size_t const room = held > std::numeric_limits<std::size_t>::max() - free
                                             ? std::numeric_limits<std::size_t>::max()
                                             : free + held;
                if (limit.amount() > room) {
                    detail::Message m;
                    m << "oomguard: Limit::headroom(" << detail::format_bytes(limit.amount()) << ") is more than the "
                      << detail::format_bytes(free) << " free on the device";
                    if (held != 0) m << " plus the " << detail::format_bytes(held) << " this budget holds";
                    m << "; ask for less headroom";
                    detail::throw_invalid(m);
                }
                cap = room - limit.amount();
            } else {
                cap = limit.resolve(free, total);
            }
        } else if (limit.type() == Limit::kind::bytes) {
            cap = limit.resolve(0, 0);
        }
        if (cap > max_limit) {
            detail::Message m;
            m << "oomguard: MemoryBudget: a cap of " << cap << " bytes (" << detail::format_bytes(cap) << ')';
            if (limit.type() == Limit::kind::fraction) m << " from Limit::fraction(" << limit.ratio() << ')';
            if (limit.type() == Limit::kind::headroom) m << " from Limit::headroom";
            m << " is more than a budget can hold (" << max_limit << " bytes, "
              << detail::format_bytes(max_limit) << "); give at most that, or Limit::unlimited()";
            detail::throw_invalid(m);
        }
        // The spec and the cap change together: concurrent calls never leave one
        // describing another's cap (the allocation path reads only limit_).
        detail::SpinLock lock(spec_mutex_);
        spec_ = limit;
        limit_.store(cap, std::memory_order_relaxed);
    }

    /// The cap in bytes, as resolved against the device when it was set.
    std::size_t limit() const noexcept { return limit_.load(std::memory_order_relaxed); }
    /// The cap as it was given (a fraction stays a fraction), for reports and set_limit.
    Limit limit_spec() const noexcept {
        detail::SpinLock lock(spec_mutex_);
        return spec_;
    }
    /// Bytes held under the budget now (the stream-ordered ones rounded as the pool takes them).
    std::size_t used() const noexcept { return word_.load(std::memory_order_relaxed) & bytes_mask; }
    /// Bytes still available under the cap (not what the device has free).
    std::size_t available() const noexcept {
        std::size_t l = limit(), u = used();
        return u >= l ? 0 : l - u;
    }
    /// The most the budget has counted at once. A request counts from the moment
    /// the cap grants it, so while one thread's allocation is in the backend a
    /// block another thread frees meanwhile still counts with it: an upper bound
    /// of what the device held at once, never below it. A request the device
    /// refused never counts.
    std::size_t peak() const noexcept { return peak_.load(std::memory_order_relaxed); }
    /// Successful allocations through allocate().
    std::size_t allocations() const noexcept {
        std::uint64_t w = word_.load(std::memory_order_relaxed);
        return (count_wraps_.load(std::memory_order_relaxed) << count_bits) + (w >> count_shift);
    }
    /// Requests the cap refused (allocate and try_reserve).
    std::size_t denials() const noexcept { return denials_.load(std::memory_order_relaxed); }
    /// Requests within the cap that the device itself refused.
    std::size_t device_ooms() const noexcept { return device_ooms_.load(std::memory_order_relaxed); }
    /// Frees the backend reported as failed (sticky errors).
    std::size_t free_failures() const noexcept { return free_failures_.load(std::memory_order_relaxed); }

    /// Sets the peak to what is held now and returns the old peak.
    std::size_t reset_peak() noexcept { return peak_.exchange(used(), std::memory_order_relaxed); }
    /// Raises the peak to at least `value` (used by PeakScope to restore).
    void raise_peak(std::size_t value) noexcept {
        std::size_t pk = peak_.load(std::memory_order_relaxed);
        while (value > pk && !peak_.compare_exchange_weak(pk, value, std::memory_order_relaxed)) {
        }
    }

    /// The backend this budget allocates through.
    Backend& backend() const noexcept { return *backend_; }
    /// The device this budget caps (the backend's ordinal).
    int device() const noexcept { return device_; }

    /// The oom_info a denial of `bytes` would carry now (also used by integrations
    /// that must turn another library's failure into a typed out_of_memory).
    oom_info denial(std::size_t bytes, oom_source source, status s) const noexcept {
        oom_info i;
        i.device = device_;
        i.requested = bytes;
        i.budget_used = used();
        // An uncapped budget only counts: its "limit" is no figure for a person.
        i.budget_limit = limit() == max_limit ? oom_info::unknown : limit();
        i.backend = Backend::backend_name;
        i.source = source;
        if (source == oom_source::budget) {
            i.code = 0;
            i.code_name = "oomguard budget";
        } else {
            i.code = s.code;
            i.code_name = s.name;
        }
        std::size_t free = 0, total = 0;
        if (backend_->memory_info(device_, &free, &total).ok()) {
            i.free = free;
            i.total = total;
        }
        return i;
    }

private:
    static constexpr unsigned count_shift = 48;
    static constexpr unsigned count_bits = 16;
    static constexpr std::uint64_t bytes_mask = max_limit;
    static constexpr std::uint64_t count_one = std::uint64_t{1} << count_shift;
    static constexpr std::uint64_t count_top = (std::uint64_t{1} << count_bits) - 1;

    // The allocation paths: takes `counted` of the cap for a request of `bytes`,
    // then asks the backend (`call`); the peak rises only when the device said
    // yes, and a refusal gives the bytes back and becomes a typed error.
    template <class Call>
    void* take_then(std::size_t bytes, std::size_t counted, char const* what, Call&& call) {
        std::size_t now = 0;
        if (!take(counted, count_one, now)) throw out_of_memory(denial(bytes, oom_source::budget, status{}));
        void* p = nullptr;
        status s = call(&p);
        if (s.ok()) {
            raise_peak(now);  // what the device refused was never held
            return p;
        }
        give_back(counted, count_one);
        if (s.kind == status_kind::out_of_memory) {
            device_ooms_.fetch_add(1, std::memory_order_relaxed);
            throw out_of_memory(denial(bytes, oom_source::device, s));
        }
        detail::throw_status(s, (detail::Message() << "MemoryBudget::" << what << '(' << bytes << " bytes) on device "
                                                   << device_)
                                    .c_str());
    }

    // Takes `bytes` of the cap; `now` is what is held with them (the caller
    // raises the peak once the bytes are really held).
    bool take(std::size_t bytes, std::uint64_t count, std::size_t& now) noexcept {
        std::uint64_t lim = limit_.load(std::memory_order_relaxed);
        // Ask for the line to write before reading it: a thread that reads first
        // fetches it shared and then again to own it for the CAS, two trips where
        // another core holds it. A hint only; nothing depends on it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDA_ARCH__)
        __asm__ __volatile__("prefetchw %0" : : "m"(word_));  // a no-op on x86-64 CPUs that lack it
#elif defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(&word_, 1, 3);
#endif
        std::uint64_t cur = word_.load(std::memory_order_relaxed);
        std::uint64_t held = 0;
        do {
            held = cur & bytes_mask;
            // Written so that no sum can wrap, even for requests near SIZE_MAX.
            if (bytes > lim || held > lim - bytes) {
                denials_.fetch_add(1, std::memory_order_relaxed);
                return false;
            }
        } while (!word_.compare_exchange_weak(cur, cur + bytes + count, std::memory_order_relaxed));
        if (count != 0 && (cur >> count_shift) == count_top)
            count_wraps_.fetch_add(1, std::memory_order_relaxed);  // the count carried out
        now = held + bytes;
        return true;
    }

    void give_back(std::size_t bytes, std::uint64_t count) noexcept {
        std::uint64_t old = word_.fetch_sub(bytes + count, std::memory_order_relaxed);
        if ((old & bytes_mask) < bytes) {  // more than was held: undo, and count the misuse
            word_.fetch_add(bytes + count, std::memory_order_relaxed);
            accounting_errors_.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        if (count != 0 && (old >> count_shift) == 0)
            count_wraps_.fetch_sub(1, std::memory_order_relaxed);  // the count borrowed
    }

    // Three cache lines. word_, the one word every allocate and free writes, has
    // a line to itself: when threads take turns writing it, nothing else is on
    // the line they pass between them. limit_ and peak_, read on every
    // allocation but written only by set_limit and a new peak, have the next, so
    // those reads hit in every core's cache. The cold counters follow.
    alignas(64) std::atomic<std::uint64_t> word_{0};
    alignas(64) std::atomic<std::size_t> limit_{max_limit};
    std::atomic<std::size_t> peak_{0};
    alignas(64) std::atomic<std::uint64_t> accounting_errors_{0};
    std::atomic<std::uint64_t> count_wraps_{0};
    std::atomic<std::size_t> denials_{0};
    std::atomic<std::size_t> device_ooms_{0};
    std::atomic<std::size_t> free_failures_{0};
    Backend* backend_;
    int device_;
    Limit spec_;
    mutable detail::SpinMutex spec_mutex_;  // spec_ and limit_ are set together
};

/// RAII hold on part of a budget's cap; released on destruction. Move-only.
template <class Backend>
class Reservation {
public:
    Reservation() noexcept = default;
    /// Adopts `bytes` already taken from `budget` (MemoryBudget::reserve and try_reserve make these):
    /// gives them back on destruction.
    Reservation(MemoryBudget<Backend>& budget, std::size_t bytes) noexcept
        : budget_(&budget), bytes_(bytes) {}
    /// Takes over `o`'s bytes; `o` then holds none.
    Reservation(Reservation&& o) noexcept : budget_(o.budget_), bytes_(o.bytes_) {
        o.budget_ = nullptr;
        o.bytes_ = 0;
    }
    /// Gives back what this one held, then takes over `o`'s bytes.
    Reservation& operator=(Reservation&& o) noexcept {
        if (this != &o) {
            reset();
            budget_ = o.budget_;
            bytes_ = o.bytes_;
            o.budget_ = nullptr;
            o.bytes_ = 0;
        }
        return *this;
    }
    Reservation(Reservation const&) = delete;
    Reservation& operator=(Reservation const&) = delete;
    ~Reservation() { reset(); }

    /// Bytes held (0 after reset() or a move).
    std::size_t bytes() const noexcept { return bytes_; }
    /// True while the reservation holds bytes of a budget.
    explicit operator bool() const noexcept { return budget_ != nullptr; }
    /// Gives the bytes back now.
    void reset() noexcept {
        if (budget_ != nullptr) budget_->release(bytes_);
        budget_ = nullptr;
        bytes_ = 0;
    }

private:
    MemoryBudget<Backend>* budget_ = nullptr;
    std::size_t bytes_ = 0;
};

template <class Backend>
Reservation<Backend> MemoryBudget<Backend>::reserve(std::size_t bytes) {
    if (!try_reserve(bytes)) throw out_of_memory(denial(bytes, oom_source::budget, status{}));
    return Reservation<Backend>(*this, bytes);
}

/// Measures the peak bytes held under a budget during a scope. Nested scopes
/// work; scopes on the same budget from different threads see each other's bytes.
template <class Backend>
class PeakScope {
public:
    /// Starts measuring: the budget's peak restarts from what it holds now, and is raised back
    /// to its earlier value when the scope ends.
    explicit PeakScope(MemoryBudget<Backend>& budget) noexcept
        : budget_(&budget), outer_peak_(budget.reset_peak()), start_(budget.used()) {}
    PeakScope(PeakScope const&) = delete;
    PeakScope& operator=(PeakScope const&) = delete;
    ~PeakScope() { budget_->raise_peak(outer_peak_); }

    /// Highest bytes held since the scope began.
    std::size_t peak() const noexcept { return budget_->peak(); }
    /// Bytes held when the scope began.
    std::size_t start() const noexcept { return start_; }
    /// Peak growth over the start: what the scope's work needed on top.
    std::size_t peak_increase() const noexcept {
        std::size_t p = peak();
        return p > start_ ? p - start_ : 0;
    }

private:
    MemoryBudget<Backend>* budget_;
    std::size_t outer_peak_;
    std::size_t start_;
};

}  // namespace oomguard
