// SimulatedDevices: N GPUs in host memory, with fault plans, for testing OOM
// handling on machines without a GPU (CI, laptops) and for benchmarks that need
// an 80 GiB card. A public feature: users test their own recovery code with it.
#pragma once

#include <oomguard/backend.hpp>
#include <oomguard/detail/format.hpp>
#include <oomguard/detail/pointer_map.hpp>
#include <oomguard/detail/random.hpp>
#include <oomguard/detail/spin_mutex.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace oomguard {

/// One simulated GPU. An aggregate whose members all have defaults, so
/// `{capacity}` and `{capacity, used_by_others}` stay clean under -Wextra, and
/// a bare number never converts to a spec (see SimulatedDevices' constructors).
struct SimulatedDeviceSpec {
    std::size_t capacity = 0;        ///< total bytes, > 0
    std::size_t used_by_others = 0;  ///< bytes other processes hold (never freed by us)
    std::string name = "oomguard simulated GPU";  ///< what nvidia-smi would call it, in tables and messages
    std::string uuid{};              ///< "GPU-…"; generated from the ordinal when empty
    std::string pci_bus_id{};        ///< "00000000:XX:00.0"; generated when empty
};

/// Where allocations live: real host memory (a program can compute on it) or
/// phantom addresses that are never touched (simulate an 80 GiB card on a laptop).
enum class SimulatedMemory : unsigned char { host, phantom };

/// Deterministic fault injection for one device. Every field is off by default.
struct FaultPlan {
    std::uint64_t fail_nth = 0;      ///< the k-th allocation call (1-based, counted from
                                     ///< when the plan was set) fails with OOM; 0 = off
    double probability = 0.0;        ///< each allocation fails with this probability, in [0, 1]
    std::uint64_t seed = 0;          ///< seed of that random stream (reproducible runs)
    std::size_t fail_above = std::numeric_limits<std::size_t>::max();  ///< larger requests fail
    std::uint64_t sticky_after = 0;  ///< the k-th allocation call raises a sticky error
                                     ///< (illegal address) that poisons the device; 0 = off
};

namespace detail {
inline status sim_oom() noexcept {
    return {status_kind::out_of_memory, 2, "cudaErrorMemoryAllocation"};
}
inline status sim_invalid_device() noexcept {
    return {status_kind::invalid_argument, 101, "cudaErrorInvalidDevice"};
}
inline status sim_invalid_value() noexcept {
    return {status_kind::invalid_argument, 1, "cudaErrorInvalidValue"};
}
inline status sim_sticky() noexcept {
    return {status_kind::sticky, 700, "cudaErrorIllegalAddress"};
}
inline status sim_no_device() noexcept { return {status_kind::no_device, 100, "cudaErrorNoDevice"}; }
}  // namespace detail

/// A backend (see backend.hpp) of simulated GPUs. Thread-safe. Counts live bytes
/// and allocations per device so a test can prove that nothing leaked.
class SimulatedDevices {
public:
    /// The backend's name in messages and reports.
    static constexpr char const* backend_name = "simulated";
    /// Every allocation's address is a multiple of this, as cudaMalloc's is.
    static constexpr std::size_t alignment = 256;  // cudaMalloc's guarantee
    /// A stream: any number you choose; 0 is the default stream. Streams are
    /// per simulator, shared by its devices.
    using stream_type = std::uint64_t;
    /// What the stream-ordered pool takes for any request: sizes round up to it.
    static constexpr std::size_t async_granularity = 512;

    /// One spec per device. `track_pointers` keeps a map of live allocations so a bad free is caught
    /// (cudaErrorInvalidValue) and the true size is used; benchmarks turn it off.
    explicit SimulatedDevices(std::vector<SimulatedDeviceSpec> specs,
                              SimulatedMemory memory = SimulatedMemory::host,
                              bool track_pointers = true)
        : memory_(memory), track_(track_pointers) {
        for (std::size_t i = 0; i < specs.size(); ++i) {
            auto& s = specs[i];
            if (s.capacity == 0)
                throw std::invalid_argument((detail::Message() << "oomguard: SimulatedDevices: device " << i
                                                               << " has capacity 0; give a capacity > 0 bytes")
                                                .c_str());
            if (s.used_by_others > s.capacity)
                throw std::invalid_argument((detail::Message()
                                             << "oomguard: SimulatedDevices: device " << i << " has used_by_others "
                                             << s.used_by_others << " above its capacity " << s.capacity)
                                                .c_str());
            if (s.uuid.empty()) {
                char buf[64];
                std::snprintf(buf, sizeof buf, "GPU-%08x-5151-4d4d-8000-%012x",
                              0x51d00000u + static_cast<unsigned>(i), static_cast<unsigned>(i));
                s.uuid = buf;
            }
            if (s.pci_bus_id.empty()) {
                char buf[32];
                std::snprintf(buf, sizeof buf, "00000000:%02X:00.0", static_cast<unsigned>(i + 1));
                s.pci_bus_id = buf;
            }
            devices_.push_back(std::unique_ptr<Device>(new Device(std::move(s), i)));
        }
    }

    /// `SimulatedDevices({{80ull << 30}, {40ull << 30, 10ull << 30}})`. Since a
    /// spec is an aggregate, `SimulatedDevices gpus{2, capacity}` still means two
    /// devices of `capacity` bytes (the constructor below), never two specs.
    SimulatedDevices(std::initializer_list<SimulatedDeviceSpec> specs,
                     SimulatedMemory memory = SimulatedMemory::host, bool track_pointers = true)
        : SimulatedDevices(std::vector<SimulatedDeviceSpec>(specs), memory, track_pointers) {}

    /// `count` identical devices of `capacity` bytes each.
    SimulatedDevices(int count, std::size_t capacity,
                     SimulatedMemory memory = SimulatedMemory::host, bool track_pointers = true)
        : SimulatedDevices(make_specs(count, capacity), memory, track_pointers) {}

    SimulatedDevices(SimulatedDevices const&) = delete;
    SimulatedDevices& operator=(SimulatedDevices const&) = delete;

    ~SimulatedDevices() {
        // Free what the program leaked so the host does not leak too; the
        // counters have already told any test that cared.
        for (auto& d : devices_) {
            if (memory_ == SimulatedMemory::host)
                d->live.for_each([](void* p, std::size_t) { ::operator delete(p, std::align_val_t(alignment)); });
        }
    }

    // ---- backend concept -------------------------------------------------

    /// cudaMalloc's part of the backend concept, simulated: out_of_memory when `bytes` exceed what the
    /// device has free or a fault plan says so, a sticky status once the device is poisoned. Never throws.
    status allocate(void** out, std::size_t bytes, int device) noexcept {
        Device* d = nullptr;
        status const entry = enter_allocation(out, device, bytes, d);
        if (!entry.ok()) return entry;
        if (bytes == 0) return status::success();
        if (!take_room_sync(*d, bytes)) {
            d->failures.fetch_add(1, std::memory_order_relaxed);
            return detail::sim_oom();
        }
        return place(*d, bytes, out);
    }

    /// cudaFree's part, simulated: gives back `bytes` (the size it was allocated with) at once.
    status deallocate(void* p, std::size_t bytes, int device) noexcept {
        Device* d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        if (p == nullptr) return status::success();
        if (track_) {
            detail::SpinLock lock(d->mutex);
            if (!d->live.erase(p, bytes)) return detail::sim_invalid_value();
        }
        release_memory(*d, p, bytes);
        // A poisoned context still reports its error on free, like cudaFree;
        // the memory is gone with the context either way.
        return d->sticky.load(std::memory_order_relaxed) ? detail::sim_sticky() : status::success();
    }

    // ---- stream-ordered allocation (the pool behind cudaMallocAsync) -------
    //
    // As a real pool does: memory freed on a stream is reusable at once by later
    // allocations on that stream, and by other streams only after the stream
    // (or the device) is synchronized -- until then it is "pending" and counts
    // as used, so an allocation on another stream can run out of memory while
    // frees are pending. At a synchronization pending memory returns to the
    // device (a release threshold of 0, CUDA's default). Sizes round up to
    // async_granularity, as the pool's own accounting does.

    /// cudaMallocFromPoolAsync, simulated: `bytes` rounded up to async_granularity, ordered on `stream`;
    /// memory `stream` itself freed is reused at once, other streams' pending frees are not.
    status allocate_async(void** out, std::size_t bytes, int device, stream_type stream) noexcept {
        Device* d = nullptr;
        status const entry = enter_allocation(out, device, bytes, d);
        if (!entry.ok()) return entry;
        if (bytes == 0) return status::success();
        if (bytes > std::numeric_limits<std::size_t>::max() - async_granularity) {
            d->failures.fetch_add(1, std::memory_order_relaxed);
            return detail::sim_oom();
        }
        std::size_t const rounded = round_async(bytes);
        note_streams(*d);
        {
            // Memory this stream freed is its own to reuse at once: it counts as
            // room for this request (a credit), and leaves the pending bytes only
            // once the room is taken -- until then others see it as still pending,
            // so no allocation on another stream can take it meanwhile.
            detail::SpinLock lock(d->mutex);
            auto it = d->pending.find(stream);  // never inserts: no allocation under the lock
            std::size_t const reuse = it == d->pending.end() ? 0 : (it->second < rounded ? it->second : rounded);
            if (!take_room(*d, rounded, reuse)) {
                d->failures.fetch_add(1, std::memory_order_relaxed);
                return detail::sim_oom();
            }
            if (reuse != 0) {
                d->pending_total.fetch_sub(reuse, std::memory_order_acq_rel);
                it->second -= reuse;
                if (it->second == 0) d->pending.erase(it);
            }
        }
        return place(*d, rounded, out);
    }

    /// Frees on `stream`: the memory is pending until `stream` or the device is synchronized.
    status deallocate_async(void* p, std::size_t bytes, int device, stream_type stream) noexcept {
        Device* d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        if (p == nullptr) return status::success();
        std::size_t rounded = round_async(bytes);  // with the map: the size it was allocated with
        note_streams(*d);
        {
            detail::SpinLock lock(d->mutex);
            if (track_ && !d->live.erase(p, rounded)) return detail::sim_invalid_value();
            try {
                d->pending[stream] += rounded;
            } catch (...) {  // no room to note it pending: it is free at once
                release_memory(*d, p, rounded);
                return status::success();
            }
            // Pending first, then free: a concurrent allocation that sees the lower
            // `used` (take_room loads it first) sees the pending bytes too.
            d->pending_total.fetch_add(rounded, std::memory_order_acq_rel);
            if (memory_ == SimulatedMemory::host) ::operator delete(p, std::align_val_t(alignment));
            d->used.fetch_sub(rounded, std::memory_order_acq_rel);
            d->live_count.fetch_sub(1, std::memory_order_relaxed);
        }
        return d->sticky.load(std::memory_order_relaxed) ? detail::sim_sticky() : status::success();
    }

    /// Waits for `stream` on `device`: what was freed on it becomes free for every stream.
    status synchronize_stream(int device, stream_type stream) noexcept {
        Device* d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        {
            detail::SpinLock lock(d->mutex);
            auto it = d->pending.find(stream);
            if (it != d->pending.end()) {
                d->pending_total.fetch_sub(it->second, std::memory_order_relaxed);
                d->pending.erase(it);
            }
        }
        return d->sticky.load(std::memory_order_relaxed) ? detail::sim_sticky() : status::success();
    }

    /// Bytes freed on some stream and not yet synchronized (on every stream, or on one).
    std::size_t pending_bytes(int device) const { return at(device).pending_total.load(); }
    /// Bytes freed on `stream` alone and not yet synchronized.
    std::size_t pending_bytes(int device, stream_type stream) const {
        Device& d = at(device);
        detail::SpinLock lock(d.mutex);
        auto it = d.pending.find(stream);
        return it == d.pending.end() ? 0 : it->second;
    }
    /// What the simulated pool takes for a request of `bytes`: rounded up to async_granularity.
    static constexpr std::size_t round_async(std::size_t bytes) noexcept {
        return (bytes + async_granularity - 1) / async_granularity * async_granularity;
    }

    /// cudaMemGetInfo, simulated: free is the capacity less what others, live allocations and pending
    /// frees hold.
    status memory_info(int device, std::size_t* free, std::size_t* total) noexcept {
        Device* d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        if (free == nullptr || total == nullptr) return detail::sim_invalid_value();
        if (d->sticky.load(std::memory_order_relaxed)) return detail::sim_sticky();
        touch(*d);  // as cudaMemGetInfo would, it creates the context
        return peek_memory(device, free, total);
    }

    /// What NVML would read: free and total without touching the device (no
    /// simulated context). DeviceSelector's tests use it as their fake NVML.
    status peek_memory(int device, std::size_t* free, std::size_t* total) const noexcept {
        Device* d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        if (free == nullptr || total == nullptr) return detail::sim_invalid_value();
        std::size_t held = d->used.load(std::memory_order_relaxed) + d->others.load(std::memory_order_relaxed) +
                           d->pending_total.load(std::memory_order_relaxed);
        *total = d->capacity;
        *free = held >= d->capacity ? 0 : d->capacity - held;
        return status::success();
    }

    /// The number of simulated devices.
    status device_count(int* count) noexcept {
        if (count == nullptr) return detail::sim_invalid_value();
        *count = static_cast<int>(devices_.size());
        return devices_.empty() ? detail::sim_no_device() : status::success();
    }

    /// The calling thread's current simulated device (0 until set_device).
    status current_device(int* device) noexcept {
        if (device == nullptr) return detail::sim_invalid_value();
        if (devices_.empty()) return detail::sim_no_device();
        *device = 0;
        for (auto const& e : current_table())
            if (e.first == id_) *device = e.second;
        return status::success();
    }

    /// Makes `device` current on the calling thread; cudaErrorInvalidDevice for one that does not exist.
    status set_device(int device) noexcept {
        set_device_calls_.fetch_add(1, std::memory_order_relaxed);
        Device* d = find(device);
        if (d == nullptr) return devices_.empty() ? detail::sim_no_device() : detail::sim_invalid_device();
        touch(*d);
        auto& table = current_table();
        for (auto& e : table) {
            if (e.first == id_) {
                e.second = device;
                return status::success();
            }
        }
        try {
            table.emplace_back(id_, device);
        } catch (...) {
            return {status_kind::other, 999, "cudaErrorUnknown"};
        }
        return status::success();
    }

    /// Waits for the device: every stream's pending frees become free.
    status synchronize(int device) noexcept {
        Device* d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        {
            detail::SpinLock lock(d->mutex);
            d->pending.clear();
            d->pending_total.store(0, std::memory_order_relaxed);
        }
        return d->sticky.load(std::memory_order_relaxed) ? detail::sim_sticky() : status::success();
    }

    // ---- simulation controls ---------------------------------------------

    /// The number of simulated devices.
    int count() const noexcept { return static_cast<int>(devices_.size()); }
    /// Whether allocations are real host memory or phantom addresses.
    SimulatedMemory memory() const noexcept { return memory_; }
    /// The spec `device` was made with; throws std::out_of_range for a device that does not exist.
    SimulatedDeviceSpec const& spec(int device) const { return at(device).spec; }

    /// Installs a fault plan on a device (replacing any earlier one; counting of
    /// `fail_nth` and `sticky_after` restarts). Throws std::invalid_argument for a
    /// bad device or a probability outside [0, 1].
    void set_faults(int device, FaultPlan const& plan) {
        Device& d = at(device);
        if (!(plan.probability >= 0.0 && plan.probability <= 1.0))
            throw std::invalid_argument((detail::Message() << "oomguard: FaultPlan.probability "
                                                           << plan.probability << " is outside [0, 1]")
                                            .c_str());
        detail::SpinLock lock(d.fault_mutex);
        d.plan = plan;
        d.plan_base = d.calls.load(std::memory_order_relaxed);
        d.rng.seed(plan.seed);
        update_faults_flag(d);
    }

    /// Removes the fault plan and any pending `fail_next` of a device.
    void clear_faults(int device) {
        Device& d = at(device);
        detail::SpinLock lock(d.fault_mutex);
        d.plan = FaultPlan{};
        d.fail_next = 0;
        update_faults_flag(d);
    }

    /// The next `n` allocation calls on `device` fail with OOM.
    void fail_next(int device, std::uint64_t n = 1) {
        Device& d = at(device);
        detail::SpinLock lock(d.fault_mutex);
        d.fail_next += n;
        update_faults_flag(d);
    }

    /// Poisons a device now, as an illegal memory access would: every call on it
    /// returns cudaErrorIllegalAddress until `clear_sticky`.
    void inject_sticky(int device) { at(device).sticky.store(true); }
    /// Makes a device poisoned by inject_sticky or a fault plan usable again (a real one never is).
    void clear_sticky(int device) { at(device).sticky.store(false); }

    /// Changes what "other processes" hold (memory pressure that comes and goes).
    void set_used_by_others(int device, std::size_t bytes) {
        Device& d = at(device);
        if (bytes > d.capacity)
            throw std::invalid_argument((detail::Message() << "oomguard: set_used_by_others: " << bytes
                                                           << " bytes is above device " << device
                                                           << "'s capacity " << d.capacity)
                                            .c_str());
        d.others.store(bytes);
    }

    /// Bytes this process holds on a device through the backend.
    std::size_t live_bytes(int device) const { return at(device).used.load(); }
    /// Allocations not yet freed on a device.
    std::size_t live_allocations(int device) const { return at(device).live_count.load(); }
    /// Sum of live bytes over every device.
    std::size_t live_bytes() const noexcept {
        std::size_t s = 0;
        for (auto& d : devices_) s += d->used.load();
        return s;
    }
    /// Sum of live allocations over every device.
    std::size_t live_allocations() const noexcept {
        std::size_t s = 0;
        for (auto& d : devices_) s += d->live_count.load();
        return s;
    }
    /// Allocation calls made on a device, and how many of them failed.
    std::uint64_t allocation_calls(int device) const { return at(device).calls.load(); }
    /// Allocation calls on `device` that failed (any kind: OOM, sticky, injected).
    std::uint64_t failed_allocations(int device) const { return at(device).failures.load(); }
    /// Whether anything has touched the device (cudart would have created a context).
    bool context_created(int device) const { return at(device).context.load(); }
    /// How often set_device was called.
    std::uint64_t set_device_calls() const noexcept { return set_device_calls_.load(); }

private:
    struct Device {
        Device(SimulatedDeviceSpec s, std::size_t ordinal)
            : spec(std::move(s)),
              capacity(spec.capacity),
              others(spec.used_by_others),
              next_phantom((std::uintptr_t{0x10} << 40) + (std::uintptr_t{ordinal} << 44)) {}
        SimulatedDeviceSpec spec;
        std::size_t const capacity;
        std::atomic<std::size_t> others;
        std::atomic<std::size_t> used{0};
        std::atomic<std::size_t> live_count{0};
        std::atomic<std::uint64_t> calls{0};
        std::atomic<std::uint64_t> failures{0};
        std::atomic<bool> faults_on{false};
        std::atomic<bool> sticky{false};
        std::atomic<bool> context{false};
        std::atomic<bool> streams{false};  // a stream-ordered call has been made (note_streams)
        std::atomic<std::uintptr_t> next_phantom;
        detail::SpinMutex mutex;  // guards `live` and `pending`
        detail::PointerMap live;
        std::map<stream_type, std::size_t> pending;  // freed on a stream, not yet synchronized
        std::atomic<std::size_t> pending_total{0};
        detail::SpinMutex fault_mutex;  // guards the plan and its random stream
        FaultPlan plan;
        std::uint64_t plan_base = 0;
        std::uint64_t fail_next = 0;
        detail::SplitMix64 rng;
    };

    static std::vector<SimulatedDeviceSpec> make_specs(int count, std::size_t capacity) {
        if (count < 0)
            throw std::invalid_argument(
                (detail::Message() << "oomguard: SimulatedDevices: device count " << count << " is negative")
                    .c_str());
        std::vector<SimulatedDeviceSpec> v(static_cast<std::size_t>(count));
        for (auto& s : v) s.capacity = capacity;
        return v;
    }

    Device* find(int device) const noexcept {
        if (device < 0 || static_cast<std::size_t>(device) >= devices_.size()) return nullptr;
        return devices_[static_cast<std::size_t>(device)].get();
    }
    Device& at(int device) const {
        Device* d = find(device);
        if (d == nullptr)
            throw std::out_of_range((detail::Message() << "oomguard: simulated device " << device
                                                       << " does not exist; valid ordinals are 0.."
                                                       << static_cast<long>(devices_.size()) - 1)
                                        .c_str());
        return *d;
    }
    static void touch(Device& d) noexcept {
        if (!d.context.load(std::memory_order_relaxed)) d.context.store(true, std::memory_order_relaxed);
    }
    static void update_faults_flag(Device& d) noexcept {
        bool on = d.fail_next > 0 || d.plan.fail_nth > 0 || d.plan.probability > 0.0 ||
                  d.plan.sticky_after > 0 ||
                  d.plan.fail_above != std::numeric_limits<std::size_t>::max();
        d.faults_on.store(on, std::memory_order_release);
    }
    static status apply_faults(Device& d, std::uint64_t call, std::size_t bytes) noexcept {
        detail::SpinLock lock(d.fault_mutex);
        std::uint64_t k = call - d.plan_base;
        if (d.plan.sticky_after != 0 && k == d.plan.sticky_after) {
            d.sticky.store(true);
            return detail::sim_sticky();
        }
        if (d.fail_next > 0) {
            --d.fail_next;
            return detail::sim_oom();
        }
        if (d.plan.fail_nth != 0 && k == d.plan.fail_nth) return detail::sim_oom();
        if (bytes > d.plan.fail_above) return detail::sim_oom();
        if (d.plan.probability > 0.0) {
            if (d.rng.uniform() < d.plan.probability) return detail::sim_oom();
        }
        return status::success();
    }
    // The checks every allocation makes first, in cudart's order, then the fault
    // plan; `d` is the device when they pass.
    status enter_allocation(void** out, int device, std::size_t bytes, Device*& d) noexcept {
        if (out == nullptr) return detail::sim_invalid_value();
        *out = nullptr;
        d = find(device);
        if (d == nullptr) return detail::sim_invalid_device();
        if (d->sticky.load(std::memory_order_relaxed)) return detail::sim_sticky();
        touch(*d);
        std::uint64_t call = d->calls.fetch_add(1, std::memory_order_relaxed) + 1;
        if (d->faults_on.load(std::memory_order_acquire)) {
            status s = apply_faults(*d, call, bytes);
            if (!s.ok()) {
                d->failures.fetch_add(1, std::memory_order_relaxed);
                return s;
            }
        }
        return status::success();
    }

    // The room for `bytes` is taken: gives the block an address (host memory, or
    // a phantom one) and records it. When the host fails either, the room goes
    // back and the answer is an OOM, as the device would give.
    status place(Device& d, std::size_t bytes, void** out) noexcept {
        void* p = nullptr;
        if (memory_ == SimulatedMemory::host) {
            p = ::operator new(bytes, std::align_val_t(alignment), std::nothrow);
            if (p == nullptr) {
                d.used.fetch_sub(bytes, std::memory_order_acq_rel);
                d.failures.fetch_add(1, std::memory_order_relaxed);
                return detail::sim_oom();
            }
        } else {
            std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
            p = reinterpret_cast<void*>(d.next_phantom.fetch_add(rounded, std::memory_order_relaxed));
        }
        if (track_) {
            try {
                detail::SpinLock lock(d.mutex);
                d.live.insert(p, bytes);
            } catch (...) {  // the host could not grow the map
                if (memory_ == SimulatedMemory::host) ::operator delete(p, std::align_val_t(alignment));
                d.used.fetch_sub(bytes, std::memory_order_acq_rel);
                return detail::sim_oom();
            }
        }
        d.live_count.fetch_add(1, std::memory_order_relaxed);
        *out = p;
        return status::success();
    }

    // Takes `bytes` of the device for this process when what it holds, what other
    // processes hold and what is pending on streams (less `credit`: pending bytes
    // the caller may reuse) leave room; one CAS on `used`, which rereads the
    // pending bytes each time it is retried.
    static bool take_room(Device& d, std::size_t bytes, std::size_t credit = 0) noexcept {
        std::size_t cur = d.used.load(std::memory_order_acquire);
        for (;;) {
            std::size_t const pend = d.pending_total.load(std::memory_order_acquire);
            std::size_t const busy = d.others.load(std::memory_order_relaxed) + (pend > credit ? pend - credit : 0);
            std::size_t const cap = busy >= d.capacity ? 0 : d.capacity - busy;
            if (bytes > cap || cur > cap - bytes) return false;
#if defined(OOMGUARD_SIMULATED_DEVICES_RACE_HOOK)
            OOMGUARD_SIMULATED_DEVICES_RACE_HOOK();  // oomguard's race tests: between the reads and the CAS
#endif
            if (d.used.compare_exchange_weak(cur, cur + bytes, std::memory_order_acq_rel, std::memory_order_acquire))
                return true;
        }
    }

    // Once a device has seen a stream-ordered call, pending bytes move under its
    // mutex, and a cudaMalloc takes its room under the mutex too: its CAS on
    // `used` alone cannot see that a free on a stream moved bytes from `used` to
    // pending and an allocation took them back into `used`, meanwhile.
    static void note_streams(Device& d) noexcept {
        if (!d.streams.load(std::memory_order_relaxed)) d.streams.store(true, std::memory_order_seq_cst);
    }
    static bool take_room_sync(Device& d, std::size_t bytes) noexcept {
        if (!d.streams.load(std::memory_order_acquire)) {
            bool const taken = take_room(d, bytes);
            // Still no stream-ordered call: nothing was pending, the answer stands.
            // (Had one moved `used` under this CAS, the CAS's acquire would show it
            // here.) Otherwise decide again, under the mutex.
            if (!d.streams.load(std::memory_order_acquire)) return taken;
            if (taken) d.used.fetch_sub(bytes, std::memory_order_acq_rel);
        }
        detail::SpinLock lock(d.mutex);
        return take_room(d, bytes);
    }

    void release_memory(Device& d, void* p, std::size_t bytes) noexcept {
        if (memory_ == SimulatedMemory::host) ::operator delete(p, std::align_val_t(alignment));
        d.used.fetch_sub(bytes, std::memory_order_relaxed);
        d.live_count.fetch_sub(1, std::memory_order_relaxed);
    }

    SimulatedMemory memory_;
    bool track_;
    std::vector<std::unique_ptr<Device>> devices_;
    std::atomic<std::uint64_t> set_device_calls_{0};
    // The current device is per thread, as in cudart, and per simulator: each
    // thread keeps a small table keyed by a simulator id that is never reused.
    static std::vector<std::pair<std::uint64_t, int>>& current_table() noexcept {
        static thread_local std::vector<std::pair<std::uint64_t, int>> table;
        return table;
    }
    static std::uint64_t next_id() noexcept {
        static std::atomic<std::uint64_t> counter{0};
        return counter.fetch_add(1, std::memory_order_relaxed) + 1;
    }
    std::uint64_t id_ = next_id();
};

/// The simulated stream-ordered pool's pending frees as a cache for
/// CacheRegistry: releasable is what streams freed and nobody has synchronized;
/// release() synchronizes the device (as a release step must before it trims a
/// real pool) and returns those bytes.
class SimulatedPendingFrees {
public:
    /// The pending frees of `device` on `sim`; throws std::out_of_range for a device that does not exist.
    SimulatedPendingFrees(SimulatedDevices& sim, int device) : sim_(&sim), device_(device) {
        (void)sim.pending_bytes(device);  // std::out_of_range for a device that does not exist
    }
    /// Bytes freed on some stream of the device and not yet synchronized.
    std::size_t releasable_bytes() const { return sim_->pending_bytes(device_); }
    /// Synchronizes the device and returns the bytes that were pending; throws std::runtime_error
    /// naming the device and the status when the synchronization fails (a poisoned device).
    std::size_t release() {
        std::size_t before = sim_->pending_bytes(device_);
        status s = sim_->synchronize(device_);
        if (!s.ok())
            throw std::runtime_error((detail::Message() << "oomguard: SimulatedPendingFrees: synchronizing device "
                                                        << device_ << " failed: " << s.name)
                                         .c_str());
        std::size_t after = sim_->pending_bytes(device_);
        return before > after ? before - after : 0;
    }

private:
    SimulatedDevices* sim_;
    int device_;
};

}  // namespace oomguard
