// A fake NVML for tests: the machine's GPUs as a table, memory read through a
// function the test gives (a SimulatedDevices peek, the fake cudart, ...).
#pragma once

#include <oomguard/nvml.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace fake_nvml {

struct Mig {
    std::string uuid;  // "MIG-..."
    unsigned gpu_instance, compute_instance;
    std::size_t free, total;
};
struct Gpu {
    std::string uuid, pci_bus_id, name;
    std::vector<Mig> migs{};  // MIG instances, in slots 0..; an empty uuid is an empty slot
};

// Handles: GPU i is i + 1; its MIG slot k is (i + 1) << 16 | (k + 1).
inline std::uintptr_t handle_value(oomguard::NvmlApi::Device d) { return reinterpret_cast<std::uintptr_t>(d); }
inline bool is_mig(oomguard::NvmlApi::Device d) { return handle_value(d) >= (std::uintptr_t{1} << 16); }
inline std::size_t gpu_of(oomguard::NvmlApi::Device d) {
    return (is_mig(d) ? handle_value(d) >> 16 : handle_value(d)) - 1;
}

struct State {
    std::vector<Gpu> gpus;
    bool (*memory)(int index, std::size_t* free, std::size_t* total) = nullptr;
    int memory_reads = 0;
    int fail_handle = -1;  // NVML cannot give this index's handle
};

inline State& state() {
    static State s;
    return s;
}

inline oomguard::NvmlApi api() {
    oomguard::NvmlApi a;
    a.init = [] { return 0; };
    a.shutdown = [] { return 0; };
    a.count = [](unsigned* n) {
        *n = static_cast<unsigned>(state().gpus.size());
        return 0;
    };
    a.handle_by_index = [](unsigned i, oomguard::NvmlApi::Device* d) {
        if (i >= state().gpus.size() || static_cast<int>(i) == state().fail_handle) return 2;
        *d = reinterpret_cast<oomguard::NvmlApi::Device>(static_cast<std::uintptr_t>(i) + 1);
        return 0;
    };
    a.uuid = [](oomguard::NvmlApi::Device d, char* buf, unsigned len) {
        Gpu const& g = state().gpus[gpu_of(d)];
        std::snprintf(buf, len, "%s",
                      is_mig(d) ? g.migs[(handle_value(d) & 0xffff) - 1].uuid.c_str() : g.uuid.c_str());
        return 0;
    };
    a.name = [](oomguard::NvmlApi::Device d, char* buf, unsigned len) {
        std::snprintf(buf, len, "%s", state().gpus[gpu_of(d)].name.c_str());
        return 0;
    };
    a.pci_bus_id = [](oomguard::NvmlApi::Device d, char* buf, unsigned len) {
        std::snprintf(buf, len, "%s", state().gpus[gpu_of(d)].pci_bus_id.c_str());
        return 0;
    };
    a.memory = [](oomguard::NvmlApi::Device d, oomguard::NvmlApi::Memory* m) {
        std::size_t free = 0, total = 0;
        ++state().memory_reads;
        if (is_mig(d)) {
            Mig const& g = state().gpus[gpu_of(d)].migs[(handle_value(d) & 0xffff) - 1];
            m->free = g.free;
            m->total = g.total;
            m->used = g.total - g.free;
            return 0;
        }
        if (state().memory == nullptr ||
            !state().memory(static_cast<int>(gpu_of(d)), &free, &total))
            return 999;
        m->free = free;
        m->total = total;
        m->used = total - free;
        return 0;
    };
    a.max_mig_count = [](oomguard::NvmlApi::Device d, unsigned* n) {
        if (state().gpus[gpu_of(d)].migs.empty()) return 3;  // NVML_ERROR_NOT_SUPPORTED: no MIG
        *n = static_cast<unsigned>(state().gpus[gpu_of(d)].migs.size());
        return 0;
    };
    a.mig_handle_by_index = [](oomguard::NvmlApi::Device d, unsigned k, oomguard::NvmlApi::Device* out) {
        auto const& migs = state().gpus[gpu_of(d)].migs;
        if (k >= migs.size() || migs[k].uuid.empty()) return 6;  // NVML_ERROR_NOT_FOUND: an empty slot
        *out = reinterpret_cast<oomguard::NvmlApi::Device>(((gpu_of(d) + 1) << 16) | (k + 1));
        return 0;
    };
    a.gpu_instance_id = [](oomguard::NvmlApi::Device d, unsigned* id) {
        *id = state().gpus[gpu_of(d)].migs[(handle_value(d) & 0xffff) - 1].gpu_instance;
        return 0;
    };
    a.compute_instance_id = [](oomguard::NvmlApi::Device d, unsigned* id) {
        *id = state().gpus[gpu_of(d)].migs[(handle_value(d) & 0xffff) - 1].compute_instance;
        return 0;
    };
    return a;
}

}  // namespace fake_nvml
