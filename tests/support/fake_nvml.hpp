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

struct Gpu {
    std::string uuid, pci_bus_id, name;
};

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
        std::snprintf(buf, len, "%s", state().gpus[reinterpret_cast<std::uintptr_t>(d) - 1].uuid.c_str());
        return 0;
    };
    a.name = [](oomguard::NvmlApi::Device d, char* buf, unsigned len) {
        std::snprintf(buf, len, "%s", state().gpus[reinterpret_cast<std::uintptr_t>(d) - 1].name.c_str());
        return 0;
    };
    a.pci_bus_id = [](oomguard::NvmlApi::Device d, char* buf, unsigned len) {
        std::snprintf(buf, len, "%s", state().gpus[reinterpret_cast<std::uintptr_t>(d) - 1].pci_bus_id.c_str());
        return 0;
    };
    a.memory = [](oomguard::NvmlApi::Device d, oomguard::NvmlApi::Memory* m) {
        std::size_t free = 0, total = 0;
        ++state().memory_reads;
        if (state().memory == nullptr ||
            !state().memory(static_cast<int>(reinterpret_cast<std::uintptr_t>(d) - 1), &free, &total))
            return 999;
        m->free = free;
        m->total = total;
        m->used = total - free;
        return 0;
    };
    return a;
}

}  // namespace fake_nvml
