// DeviceSelector: "use another GPU", done right. CUDA ordinals (not nvidia-smi
// indices), free memory read through NVML when it is there -- so asking about
// eight GPUs does not create eight CUDA contexts -- and through the backend
// otherwise (cudaMemGetInfo: a context, hundreds of MiB, on each device asked).
//
//   oomguard::CudaRuntime cuda;
//   oomguard::DeviceSelector<> gpus(cuda);
//   int d = gpus.first_with_free(20ull << 30);     // or most_free(), wait_for_free(...)
//   oomguard::ScopedDevice<> on(cuda, d);
//   std::puts(gpus.table().c_str());
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/memory_budget.hpp>
#include <oomguard/nvml.hpp>
#include <oomguard/scoped_device.hpp>
#include <oomguard/visible_devices.hpp>

#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace oomguard {

/// What is known of one visible device.
struct DeviceFacts {
    int ordinal = 0;                ///< CUDA ordinal
    int physical = -1;              ///< NVML / nvidia-smi index (-1: unknown without NVML)
    std::string name{};             ///< product name ("" when unknown)
    std::string uuid{};             ///< "GPU-..." ("" when unknown)
    std::string pci_bus_id{};       ///< "00000000:3B:00.0" ("" when unknown)
    std::size_t total = 0;          ///< device memory, bytes (when readable)
    std::size_t free = 0;           ///< free device memory when read, bytes (when readable)
    std::size_t held = 0;           ///< bytes this process holds under tracked budgets
    bool readable = false;          ///< memory figures could be read
    bool from_nvml = false;         ///< read without a CUDA context
};

/// Devices to leave out of a selection.
struct Exclude {
    std::vector<int> ordinals{};       ///< CUDA ordinals
    std::vector<std::string> uuids{};  ///< full UUIDs or unique prefixes
    /// True when `f`'s ordinal is listed, or its UUID starts with a listed one (any case).
    bool contains(DeviceFacts const& f) const {
        for (int o : ordinals)
            if (o == f.ordinal) return true;
        for (auto const& u : uuids)
            if (!u.empty() && !f.uuid.empty() && detail::starts_with_nocase(f.uuid, u)) return true;
        return false;
    }
};

/// No device meets the request. what() names every device and why it was rejected.
class no_fitting_device : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Picks the GPU to run on, in CUDA's numbering: reads CUDA_VISIBLE_DEVICES and
/// CUDA_DEVICE_ORDER by the driver's rules (UUIDs, MIG instances, repeated and
/// invalid entries), reads each device's memory through NVML when it can (no CUDA
/// context is created) and through the backend otherwise, ranks the devices by free
/// memory, prints a table, and moves an AdaptiveBatch to another device on failover.
template <class Backend = default_backend>
class DeviceSelector {
public:
    /// `visible_devices` and `device_order` default to the environment's
    /// CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER.
    explicit DeviceSelector(Backend& backend, Nvml nvml = Nvml::system(),
                            char const* visible_devices = std::getenv("CUDA_VISIBLE_DEVICES"),
                            char const* device_order = std::getenv("CUDA_DEVICE_ORDER"))
        : backend_(&backend), nvml_(std::move(nvml)) {
        int count = 0;
        status s = backend.device_count(&count);
        if (!s.ok() && s.kind != status_kind::no_device) detail::throw_status(s, "DeviceSelector: counting devices");
        count_ = s.ok() ? count : 0;
        if (nvml_.available()) {
            std::vector<std::string> warnings;
            DeviceOrder order = parse_device_order(device_order, &warnings);
            visible_ = parse_visible_devices(visible_devices, nvml_.physical_devices(), order);
            visible_.warnings.insert(visible_.warnings.begin(), warnings.begin(), warnings.end());
            if (static_cast<int>(visible_.devices.size()) != count_)
                visible_.warnings.push_back("NVML and the CUDA runtime disagree on the number of visible devices (" +
                                            std::to_string(visible_.devices.size()) + " and " +
                                            std::to_string(count_) + "); memory is read through the runtime");
        }
    }

    DeviceSelector(DeviceSelector const&) = delete;
    DeviceSelector& operator=(DeviceSelector const&) = delete;

    /// The CUDA_VISIBLE_DEVICES mapping (empty without NVML: the runtime has
    /// already applied the variable and cannot say what it dropped).
    VisibleDevices const& visible() const noexcept { return visible_; }
    /// Warnings about CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER, for the program to show.
    std::vector<std::string> const& warnings() const noexcept { return visible_.warnings; }
    /// Devices the backend reports (CUDA's device count).
    int count() const noexcept { return count_; }
    /// True when memory figures come from NVML (no CUDA context) for every visible device.
    bool uses_nvml() const noexcept { return nvml_.available() && static_cast<int>(visible_.devices.size()) == count_; }

    /// Counts `budget`'s bytes as held by this process on its device.
    template <class B>
    void track(MemoryBudget<B>& budget) {
        tracked_.push_back(Tracked{&budget, budget.device(),
                                   [](void* b) -> std::size_t { return static_cast<MemoryBudget<B>*>(b)->used(); }});
    }

    /// Reads every device now.
    std::vector<DeviceFacts> facts() const {
        std::vector<DeviceFacts> out;
        for (int d = 0; d < count_; ++d) out.push_back(read(d));
        return out;
    }

    /// The device with the most free memory. Throws no_fitting_device when all are excluded or unreadable.
    int most_free(Exclude const& exclude = {}) const { return pick(0, 0.0, exclude, true); }

    /// The first device (in CUDA order) with at least `bytes` free.
    int first_with_free(std::size_t bytes, Exclude const& exclude = {}) const {
        return pick(bytes, 0.0, exclude, false);
    }

    /// The first device with at least `fraction` (in (0, 1]) of its memory free.
    int first_with_free_fraction(double fraction, Exclude const& exclude = {}) const {
        if (!(fraction > 0.0 && fraction <= 1.0))
            throw std::invalid_argument((detail::Message() << "oomguard: DeviceSelector::first_with_free_fraction("
                                                           << fraction << "): give a fraction in (0, 1]")
                                            .c_str());
        return pick(0, fraction, exclude, false);
    }

    /// Polls every `poll` until a device has `bytes` free, for at most `timeout`.
    /// Throws no_fitting_device (with the last reading) when the time is up.
    int wait_for_free(std::size_t bytes, std::chrono::milliseconds timeout,
                      std::chrono::milliseconds poll = std::chrono::milliseconds(500),
                      Exclude const& exclude = {}) const {
        if (timeout.count() < 0 || poll.count() <= 0)
            throw std::invalid_argument((detail::Message() << "oomguard: DeviceSelector::wait_for_free: timeout "
                                                           << static_cast<long long>(timeout.count())
                                                           << " ms and poll " << static_cast<long long>(poll.count())
                                                           << " ms; give timeout >= 0 and poll > 0")
                                            .c_str());
        auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            try {
                return first_with_free(bytes, exclude);
            } catch (no_fitting_device const&) {
                if (std::chrono::steady_clock::now() + poll > deadline) throw;
            }
            std::this_thread::sleep_for(poll);
        }
    }

    /// A failover hook for AdaptiveBatch: the device, other than the failing
    /// one and those this global batch already failed on (r.tried), with the
    /// most free memory and at least the failed request free; -1 when none.
    static int failover(void* self, FailoverRequest const& r) {
        auto* s = static_cast<DeviceSelector*>(self);
        Exclude ex;
        ex.ordinals.push_back(r.plan.device);
        ex.ordinals.insert(ex.ordinals.end(), r.tried.begin(), r.tried.end());
        std::size_t need = r.last.requested_known ? r.last.requested : 0;
        try {
            int best = s->pick(need, 0.0, ex, true);
            return best;
        } catch (no_fitting_device const&) {
            return -1;
        }
    }
    /// Installs `failover` on an AdaptiveBatch. This selector must outlive it.
    void attach_failover(AdaptiveBatch& a) { a.failover(&DeviceSelector::failover, this); }

    /// GPUtil's showUtilization, in CUDA's numbering.
    std::string table() const {
        std::string t = "CUDA  NVML  name                              used / total              free        held here\n";
        for (auto const& f : facts()) {
            char line[256];
            if (f.readable) {
                std::snprintf(line, sizeof line, "%4d  %4s  %-32.32s  %10s / %-10s  %10s  %10s%s\n", f.ordinal,
                              f.physical >= 0 ? std::to_string(f.physical).c_str() : "?",
                              f.name.empty() ? "?" : f.name.c_str(), detail::format_bytes(f.total - f.free).c_str(),
                              detail::format_bytes(f.total).c_str(), detail::format_bytes(f.free).c_str(),
                              detail::format_bytes(f.held).c_str(), f.from_nvml ? "" : "  (read through a context)");
            } else {
                std::snprintf(line, sizeof line, "%4d  %4s  %-32.32s  unreadable\n", f.ordinal,
                              f.physical >= 0 ? std::to_string(f.physical).c_str() : "?",
                              f.name.empty() ? "?" : f.name.c_str());
            }
            t += line;
        }
        for (auto const& w : visible_.warnings) t += "warning: " + w + "\n";
        return t;
    }

private:
    struct Tracked {
        void* budget;
        int device;
        std::size_t (*used)(void*);
    };

    DeviceFacts read(int d) const {
        DeviceFacts f;
        f.ordinal = d;
        if (VisibleDevice const* v = uses_nvml() ? visible_.find(d) : nullptr) {
            f.physical = v->physical;
            f.name = v->name;
            f.uuid = v->uuid;
            f.pci_bus_id = v->pci_bus_id;
            f.readable = v->mig.empty() ? nvml_.memory(v->physical, f.free, f.total)
                                        : nvml_.mig_memory(v->physical, v->mig, f.free, f.total);
            f.from_nvml = f.readable;
        }
        if (!f.readable) {
            // The fallback: on CUDA this creates a context on the device.
            f.readable = backend_->memory_info(d, &f.free, &f.total).ok();
        }
        for (auto const& t : tracked_)
            if (t.device == d) f.held += t.used(t.budget);
        return f;
    }

    int pick(std::size_t bytes, double fraction, Exclude const& exclude, bool most) const {
        detail::Message why;
        int best = -1;
        std::size_t best_free = 0;
        for (int d = 0; d < count_; ++d) {
            DeviceFacts f = read(d);
            why << " GPU " << d;
            if (!f.uuid.empty()) why << " (" << f.uuid.substr(0, 12) << "...)";
            if (exclude.contains(f)) {
                why << ": excluded;";
                continue;
            }
            if (!f.readable) {
                why << ": memory unreadable;";
                continue;
            }
            std::size_t need = bytes;
            if (fraction > 0.0) need = static_cast<std::size_t>(static_cast<double>(f.total) * fraction);
            if (f.free < need) {
                why << ": " << detail::format_bytes(f.free) << " free of " << detail::format_bytes(f.total)
                    << ", needs " << detail::format_bytes(need) << ';';
                continue;
            }
            if (!most) return d;
            if (best < 0 || f.free > best_free) {
                best = d;
                best_free = f.free;
            }
            why << ": fits;";
        }
        if (best >= 0) return best;
        detail::Message m;
        m << "oomguard: DeviceSelector: no device fits";
        if (count_ == 0) m << " (no device is visible)";
        m << ":" << why.view();
        throw no_fitting_device(m.c_str());
    }

    Backend* backend_;
    Nvml nvml_;
    VisibleDevices visible_;
    int count_ = 0;
    std::vector<Tracked> tracked_;
};

}  // namespace oomguard
