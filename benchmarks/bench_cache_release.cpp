// Clearing caches after every step versus only under memory pressure, on a
// continuous workload: each step takes 16 blocks of 1 MiB from a caching pool
// (the way PyTorch's allocator or a CUB caching allocator serves a training
// step) and gives them back. Releasing every step makes the next step go back
// to the device for all of them; the pressure-only valve does nothing while the
// budget has room.
#include <oomguard/scoped_cache_release.hpp>
#include <oomguard/simulated_devices.hpp>

#include <benchmark/benchmark.h>

#include <vector>

using namespace oomguard;

namespace {

constexpr std::size_t kBlock = std::size_t{1} << 20;
constexpr int kBlocks = 16;

// A minimal caching pool of fixed-size blocks over a budget.
struct BlockPool {
    MemoryBudget<SimulatedDevices>* budget;
    std::vector<void*> cached;
    void* take() {
        if (!cached.empty()) {
            void* p = cached.back();
            cached.pop_back();
            return p;
        }
        return budget->allocate(kBlock);
    }
    void give(void* p) { cached.push_back(p); }
    std::size_t releasable_bytes() const { return cached.size() * kBlock; }
    std::size_t release() {
        std::size_t b = releasable_bytes();
        for (void* p : cached) budget->deallocate(p, kBlock);
        cached.clear();
        return b;
    }
};

enum class Mode { every_step, pressure_only };

void run(benchmark::State& state, Mode mode) {
    SimulatedDevices gpus(1, std::size_t{1} << 30);  // host-backed: allocations cost what malloc costs
    MemoryBudget<SimulatedDevices> budget(gpus, 0, std::size_t{512} << 20);
    CacheRegistry registry;
    BlockPool pool{&budget, {}};
    auto reg = registry.add("blocks", 0, pool);
    std::vector<void*> held;
    held.reserve(kBlocks);
    for (auto _ : state) {
        ScopedCacheRelease release(registry);
        if (mode == Mode::pressure_only) release.only_when_available_below(budget, std::size_t{64} << 20);
        for (int i = 0; i < kBlocks; ++i) held.push_back(pool.take());
        benchmark::DoNotOptimize(held.data());
        for (void* p : held) pool.give(p);
        held.clear();
    }
    pool.release();
}

}  // namespace

static void every_step(benchmark::State& s) { run(s, Mode::every_step); }
static void pressure_only(benchmark::State& s) { run(s, Mode::pressure_only); }
BENCHMARK(every_step);
BENCHMARK(pressure_only);
BENCHMARK_MAIN();
