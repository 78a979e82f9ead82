#include <oomguard/device_buffer.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <limits>
#include <utility>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;
using Buffer = DeviceBuffer<SimulatedDevices>;

TEST_CASE("DeviceBuffer owns its memory and frees it once") {
    SimulatedDevices gpus(1, 1 << 20);
    Budget budget(gpus, 0, 4096);
    {
        Buffer a(budget, 1024);
        CHECK(a.size() == 1024);
        CHECK(a.data() != nullptr);
        a.as<float>()[255] = 1.0f;  // host-backed: writable
        Buffer b = std::move(a);
        CHECK(a.empty());
        CHECK(a.data() == nullptr);
        CHECK(budget.used() == 1024);
        Buffer c(budget, 2048);
        c = std::move(b);  // frees c's old memory
        CHECK(budget.used() == 1024);
        CHECK_THROWS_AS(c.as<double[3]>(), std::invalid_argument);
    }
    CHECK(budget.used() == 0);
    CHECK(gpus.live_allocations() == 0);
}

TEST_CASE("a buffer that does not fit throws and leaks nothing") {
    SimulatedDevices gpus(1, 1 << 20);
    Budget budget(gpus, 0, 4096);
    Buffer held(budget, 4000);
    CHECK_THROWS_AS(Buffer(budget, 100), out_of_memory);
    CHECK(budget.used() == 4000);
    CHECK_THROWS_AS(make_device_buffer<double>(budget, std::numeric_limits<std::size_t>::max() / 4),
                    std::length_error);
    auto f = make_device_buffer<float>(budget, 24);
    CHECK(f.size() == 96);
}

TEST_CASE("DeviceBuffer buf(budget, bytes) deduces the budget's backend") {
    SimulatedDevices sim(1, 1 << 20);
    MemoryBudget<SimulatedDevices> budget(sim, 0);
    DeviceBuffer buf(budget, 64);
    static_assert(std::is_same<decltype(buf), DeviceBuffer<SimulatedDevices>>::value, "CTAD takes the budget's backend");
    CHECK(buf.size() == 64);
    CHECK(budget.used() == 64);
}
