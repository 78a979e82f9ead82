// NVML, loaded at run time with dlopen("libnvidia-ml.so.1"): device memory and
// identity without creating a CUDA context (cudaMemGetInfo creates one, hundreds
// of MiB, on every GPU it asks about). The few entry points oomguard needs are
// declared here, so neither NVML's header nor its library is needed to build.
#pragma once

#include <oomguard/visible_devices.hpp>

#include <cstddef>
#include <cstdio>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace oomguard {

/// The NVML entry points oomguard calls, as function pointers. `Nvml` fills
/// them from the driver's library; tests fill them with fakes.
struct NvmlApi {
    using Device = void*;  ///< nvmlDevice_t: a handle NVML gives
    /// nvmlMemory_t: a device's memory, in bytes.
    struct Memory {
        unsigned long long total;  ///< device memory
        unsigned long long free;   ///< not allocated by anyone
        unsigned long long used;   ///< allocated, by any process (and the driver)
    };
    int (*init)() = nullptr;                                           ///< nvmlInit_v2
    int (*shutdown)() = nullptr;                                       ///< nvmlShutdown
    int (*count)(unsigned*) = nullptr;                                 ///< nvmlDeviceGetCount_v2
    int (*handle_by_index)(unsigned, Device*) = nullptr;               ///< nvmlDeviceGetHandleByIndex_v2
    int (*uuid)(Device, char*, unsigned) = nullptr;                    ///< nvmlDeviceGetUUID
    int (*name)(Device, char*, unsigned) = nullptr;                    ///< nvmlDeviceGetName
    int (*memory)(Device, Memory*) = nullptr;                          ///< nvmlDeviceGetMemoryInfo
    int (*pci_bus_id)(Device, char*, unsigned) = nullptr;              ///< the bus id, via nvmlDeviceGetPciInfo_v3
    // MIG (optional: a driver or a GPU without MIG leaves them null or failing)
    int (*max_mig_count)(Device, unsigned*) = nullptr;                 ///< nvmlDeviceGetMaxMigDeviceCount
    int (*mig_handle_by_index)(Device, unsigned, Device*) = nullptr;   ///< nvmlDeviceGetMigDeviceHandleByIndex
    int (*gpu_instance_id)(Device, unsigned*) = nullptr;               ///< nvmlDeviceGetGpuInstanceId
    int (*compute_instance_id)(Device, unsigned*) = nullptr;           ///< nvmlDeviceGetComputeInstanceId
};

/// A loaded NVML (or none). Moves only; shuts NVML down on destruction.
class Nvml {
public:
    /// Tries libnvidia-ml.so.1; `available()` tells whether it worked.
    static Nvml system() {
        Nvml n;
#if defined(__unix__) || defined(__APPLE__)
        void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr) return n;
        n.lib_ = lib;
        auto sym = [&](char const* s) { return dlsym(lib, s); };
        n.api_.init = reinterpret_cast<int (*)()>(sym("nvmlInit_v2"));
        n.api_.shutdown = reinterpret_cast<int (*)()>(sym("nvmlShutdown"));
        n.api_.count = reinterpret_cast<int (*)(unsigned*)>(sym("nvmlDeviceGetCount_v2"));
        n.api_.handle_by_index =
            reinterpret_cast<int (*)(unsigned, NvmlApi::Device*)>(sym("nvmlDeviceGetHandleByIndex_v2"));
        n.api_.uuid = reinterpret_cast<int (*)(NvmlApi::Device, char*, unsigned)>(sym("nvmlDeviceGetUUID"));
        n.api_.name = reinterpret_cast<int (*)(NvmlApi::Device, char*, unsigned)>(sym("nvmlDeviceGetName"));
        n.api_.memory =
            reinterpret_cast<int (*)(NvmlApi::Device, NvmlApi::Memory*)>(sym("nvmlDeviceGetMemoryInfo"));
        pci_info_v3() = reinterpret_cast<int (*)(NvmlApi::Device, PciInfo*)>(sym("nvmlDeviceGetPciInfo_v3"));
        if (pci_info_v3() != nullptr) n.api_.pci_bus_id = &pci_from_info;
        n.api_.max_mig_count =
            reinterpret_cast<int (*)(NvmlApi::Device, unsigned*)>(sym("nvmlDeviceGetMaxMigDeviceCount"));
        n.api_.mig_handle_by_index = reinterpret_cast<int (*)(NvmlApi::Device, unsigned, NvmlApi::Device*)>(
            sym("nvmlDeviceGetMigDeviceHandleByIndex"));
        n.api_.gpu_instance_id =
            reinterpret_cast<int (*)(NvmlApi::Device, unsigned*)>(sym("nvmlDeviceGetGpuInstanceId"));
        n.api_.compute_instance_id =
            reinterpret_cast<int (*)(NvmlApi::Device, unsigned*)>(sym("nvmlDeviceGetComputeInstanceId"));
        n.start();
#endif
        return n;
    }

    /// NVML through a table of your own (tests, or a statically linked NVML).
    static Nvml from(NvmlApi const& api) {
        Nvml n;
        n.api_ = api;
        n.start();
        return n;
    }

    /// No NVML: callers fall back to the CUDA runtime.
    static Nvml none() noexcept { return Nvml(); }

    /// Takes over `o`'s library; `o` is left with none.
    Nvml(Nvml&& o) noexcept : api_(o.api_), lib_(o.lib_), ok_(o.ok_) {
        o.lib_ = nullptr;
        o.ok_ = false;
    }
    /// Shuts down this one's NVML, then takes over `o`'s library.
    Nvml& operator=(Nvml&& o) noexcept {
        if (this != &o) {
            close();
            api_ = o.api_;
            lib_ = o.lib_;
            ok_ = o.ok_;
            o.lib_ = nullptr;
            o.ok_ = false;
        }
        return *this;
    }
    Nvml(Nvml const&) = delete;
    Nvml& operator=(Nvml const&) = delete;
    ~Nvml() { close(); }

    /// True when NVML was loaded and initialised: its figures can be asked for.
    bool available() const noexcept { return ok_; }

    /// Every GPU of the machine, in NVML (PCI) order: element i is NVML index i.
    /// A GPU whose handle NVML cannot give keeps its place, with no identity (so
    /// no later GPU takes its index). Empty when unavailable.
    std::vector<PhysicalDevice> physical_devices() const {
        std::vector<PhysicalDevice> out;
        unsigned n = 0;
        if (!ok_ || api_.count(&n) != 0) return out;
        for (unsigned i = 0; i < n; ++i) {
            PhysicalDevice p;
            p.index = static_cast<int>(i);
            NvmlApi::Device d = nullptr;
            if (api_.handle_by_index(i, &d) != 0) {
                out.push_back(std::move(p));
                continue;
            }
            char buf[96];
            if (api_.uuid != nullptr && api_.uuid(d, buf, sizeof buf) == 0) p.uuid = buf;
            if (api_.name != nullptr && api_.name(d, buf, sizeof buf) == 0) p.name = buf;
            if (api_.pci_bus_id != nullptr && api_.pci_bus_id(d, buf, sizeof buf) == 0) p.pci_bus_id = buf;
            for_each_mig(d, [&](NvmlApi::Device m, unsigned) {
                if (api_.uuid == nullptr || api_.uuid(m, buf, sizeof buf) != 0) return;
                p.mig.push_back(buf);
                unsigned gi = 0, ci = 0;
                bool ids = api_.gpu_instance_id != nullptr && api_.compute_instance_id != nullptr &&
                           api_.gpu_instance_id(m, &gi) == 0 && api_.compute_instance_id(m, &ci) == 0;
                p.mig_legacy.push_back(ids ? "MIG-" + p.uuid + "/" + std::to_string(gi) + "/" + std::to_string(ci)
                                           : std::string());
            });
            out.push_back(std::move(p));
        }
        return out;
    }

    /// Free and total bytes of physical device `index`; false when unreadable.
    bool memory(int index, std::size_t& free, std::size_t& total) const noexcept {
        if (!ok_ || index < 0) return false;
        NvmlApi::Device d = nullptr;
        NvmlApi::Memory m{};
        if (api_.handle_by_index(static_cast<unsigned>(index), &d) != 0 || api_.memory(d, &m) != 0) return false;
        free = static_cast<std::size_t>(m.free);
        total = static_cast<std::size_t>(m.total);
        return true;
    }

    /// Free and total bytes of the MIG instance `mig` (its "MIG-..." UUID) of
    /// physical device `index`: what a process on that instance can use.
    bool mig_memory(int index, std::string const& mig, std::size_t& free, std::size_t& total) const {
        if (!ok_ || index < 0 || api_.uuid == nullptr) return false;
        NvmlApi::Device d = nullptr;
        if (api_.handle_by_index(static_cast<unsigned>(index), &d) != 0) return false;
        bool found = false;
        for_each_mig(d, [&](NvmlApi::Device m, unsigned) {
            char buf[96];
            NvmlApi::Memory mem{};
            if (found || api_.uuid(m, buf, sizeof buf) != 0 || mig != buf || api_.memory(m, &mem) != 0) return;
            free = static_cast<std::size_t>(mem.free);
            total = static_cast<std::size_t>(mem.total);
            found = true;
        });
        return found;
    }

private:
    // Calls f(handle, slot) for each MIG instance of `d` (none without MIG).
    template <class F>
    void for_each_mig(NvmlApi::Device d, F&& f) const {
        unsigned slots = 0;
        if (api_.max_mig_count == nullptr || api_.mig_handle_by_index == nullptr || api_.max_mig_count(d, &slots) != 0)
            return;
        for (unsigned k = 0; k < slots; ++k) {
            NvmlApi::Device m = nullptr;
            if (api_.mig_handle_by_index(d, k, &m) == 0) f(m, k);  // empty slots fail: skipped
        }
    }

    struct PciInfo {  // nvmlPciInfo_t (v3): busIdLegacy[16], domain, bus, device, pciDeviceId, pciSubSystemId, busId[32]
        char bus_id_legacy[16];
        unsigned domain, bus, device, pci_device_id, pci_subsystem_id;
        char bus_id[32];
    };
    static int (*&pci_info_v3())(NvmlApi::Device, PciInfo*) {
        static int (*f)(NvmlApi::Device, PciInfo*) = nullptr;
        return f;
    }
    static int pci_from_info(NvmlApi::Device d, char* buf, unsigned len) {
        PciInfo info{};
        int r = pci_info_v3()(d, &info);
        if (r != 0) return r;
        std::snprintf(buf, len, "%s", info.bus_id);
        return 0;
    }

    Nvml() noexcept = default;
    void start() noexcept {
        ok_ = api_.init != nullptr && api_.count != nullptr && api_.handle_by_index != nullptr &&
              api_.memory != nullptr && api_.init() == 0;
    }
    void close() noexcept {
        if (ok_ && api_.shutdown != nullptr) api_.shutdown();
        ok_ = false;
#if defined(__unix__) || defined(__APPLE__)
        if (lib_ != nullptr) dlclose(lib_);
#endif
        lib_ = nullptr;
    }

    NvmlApi api_;
    void* lib_ = nullptr;
    bool ok_ = false;
};

}  // namespace oomguard
