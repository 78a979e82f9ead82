// A consumer of the installed package: caps a (simulated) device and gets a typed OOM.
// It prints the version it was compiled against (tests/consumer/run.cmake checks it).
#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/version.hpp>

#include <cstdio>

int main() {
    oomguard::SimulatedDevices gpus(1, std::size_t{1} << 30);
    oomguard::MemoryBudget<oomguard::SimulatedDevices> budget(gpus, 0, std::size_t{64} << 20);
    oomguard::DeviceBuffer<oomguard::SimulatedDevices> ok(budget, std::size_t{32} << 20);
    try {
        oomguard::DeviceBuffer<oomguard::SimulatedDevices> too_big(budget, std::size_t{48} << 20);
        std::puts("consumer: expected an out_of_memory");
        return 1;
    } catch (oomguard::out_of_memory const& e) {
        std::printf("consumer: oomguard %s, caught as expected: %s\n", OOMGUARD_VERSION_STRING, e.what());
    }
    return budget.used() == (std::size_t{32} << 20) ? 0 : 1;
}
