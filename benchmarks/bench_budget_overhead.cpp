// What a MemoryBudget adds to an allocate+free pair, side by side with the bare
// phantom device and with a mutex-guarded counter (the way RMM's statistics
// adaptor counts), in one run. Run through scripts/bench, which writes JSON.
//
// The same three again over a device that writes no shared state (null_*): with
// two threads the phantom simulated device's own atomics are contended, and a
// mutex that puts one thread to sleep also spares the device that contention, so
// the phantom rows mix the accounting's scaling with the device's. The null rows
// measure the accounting alone.
#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <mutex>

using namespace oomguard;

namespace {

constexpr std::size_t kBytes = 4096;

// A backend that shares nothing between threads: every call succeeds at once,
// each thread gets its own address.
struct NullDevice {
    static constexpr char const* backend_name = "null";
    status allocate(void** out, std::size_t, int) noexcept {
        thread_local unsigned char slot;
        *out = &slot;
        return status::success();
    }
    status deallocate(void*, std::size_t, int) noexcept { return status::success(); }
    status memory_info(int, std::size_t* free, std::size_t* total) noexcept {
        *free = *total = std::size_t{80} << 30;
        return status::success();
    }
    status device_count(int* n) noexcept {
        *n = 1;
        return status::success();
    }
    status current_device(int* d) noexcept {
        *d = 0;
        return status::success();
    }
    status set_device(int) noexcept { return status::success(); }
    status synchronize(int) noexcept { return status::success(); }
};
static_assert(is_backend_v<NullDevice>);

// The one device of each kind the rows share.
template <class Device>
Device& device();
// A phantom device with no pointer map: the cheapest honest simulated backend.
template <>
SimulatedDevices& device<SimulatedDevices>() {
    static SimulatedDevices d({{std::size_t{80} << 30}}, SimulatedMemory::phantom, false);
    return d;
}
template <>
NullDevice& device<NullDevice>() {
    static NullDevice d;
    return d;
}

template <class Device>
void bare(benchmark::State& state) {
    auto& d = device<Device>();
    for (auto _ : state) {
        void* p = nullptr;
        d.allocate(&p, kBytes, 0);
        benchmark::DoNotOptimize(p);
        d.deallocate(p, kBytes, 0);
    }
}

template <class Device>
void with_budget(benchmark::State& state) {
    static MemoryBudget<Device> budget(device<Device>(), 0, Limit::fraction(0.9));
    for (auto _ : state) {
        void* p = budget.allocate(kBytes);
        benchmark::DoNotOptimize(p);
        budget.deallocate(p, kBytes);
    }
}

// The mutex-guarded statistics counter of RMM's statistics_resource_adaptor, in spirit:
// a lock around current/peak/total on both paths.
struct MutexCounter {
    std::mutex m;
    std::size_t current = 0, peak = 0, total = 0;
};

template <class Device>
void with_mutex_counter(benchmark::State& state) {
    static MutexCounter c;
    auto& d = device<Device>();
    for (auto _ : state) {
        void* p = nullptr;
        d.allocate(&p, kBytes, 0);
        {
            std::lock_guard<std::mutex> lock(c.m);
            c.current += kBytes;
            c.total += 1;
            if (c.current > c.peak) c.peak = c.current;
        }
        benchmark::DoNotOptimize(p);
        d.deallocate(p, kBytes, 0);
        {
            std::lock_guard<std::mutex> lock(c.m);
            c.current -= kBytes;
        }
    }
}

}  // namespace

BENCHMARK(bare<SimulatedDevices>)->Name("bare_device")->Threads(1)->Threads(2);
BENCHMARK(with_budget<SimulatedDevices>)->Name("with_budget")->Threads(1)->Threads(2);
BENCHMARK(with_mutex_counter<SimulatedDevices>)->Name("with_mutex_counter")->Threads(1)->Threads(2);
BENCHMARK(bare<NullDevice>)->Name("null_bare")->Threads(1)->Threads(2);
BENCHMARK(with_budget<NullDevice>)->Name("null_with_budget")->Threads(1)->Threads(2);
BENCHMARK(with_mutex_counter<NullDevice>)->Name("null_with_mutex_counter")->Threads(1)->Threads(2);
BENCHMARK_MAIN();
