#include <oomguard/scoped_cache_release.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;

namespace {
// A cache that holds device memory through a budget, like a KV cache.
struct HeldBlocks {
    Budget* budget;
    std::vector<void*> blocks;
    std::size_t block = 1024;
    void fill(int n) {
        for (int i = 0; i < n; ++i) blocks.push_back(budget->allocate(block));
    }
    std::size_t releasable_bytes() const { return blocks.size() * block; }
    std::size_t release() {
        std::size_t b = releasable_bytes();
        for (void* p : blocks) budget->deallocate(p, block);
        blocks.clear();
        return b;
    }
};
}  // namespace

TEST_CASE("releases on scope exit and reports through report_to") {
    SimulatedDevices gpus(1, 1 << 20);
    Budget budget(gpus, 0, 1 << 20);
    CacheRegistry reg;
    HeldBlocks cache{&budget, {}};
    cache.fill(8);
    auto r = reg.add("blocks", 0, cache);
    ReleaseReport report;
    {
        ScopedCacheRelease release(reg);
        release.report_to(report);
        CHECK(budget.used() == 8192);
    }
    CHECK(budget.used() == 0);
    CHECK(report.bytes() == 8192);
    CHECK(gpus.live_allocations() == 0);
}

TEST_CASE("release on demand runs once") {
    CacheRegistry reg;
    int runs = 0;
    auto r = reg.add("c", 0, [] { return std::size_t{4}; }, [&] {
        ++runs;
        return std::size_t{4};
    });
    {
        ScopedCacheRelease release(reg);
        CHECK(release.release().bytes() == 4);
        CHECK(release.released());
    }
    CHECK(runs == 1);
}

TEST_CASE("pressure-only: nothing happens while memory is plentiful") {
    SimulatedDevices gpus(1, 1 << 20);
    Budget budget(gpus, 0, 16384);
    CacheRegistry reg;
    HeldBlocks cache{&budget, {}};
    cache.fill(4);  // 4 KiB of 16 held
    auto r = reg.add("blocks", 0, cache);
    {
        ScopedCacheRelease release(reg);
        release.only_when_available_below(budget, 8192);
        CHECK(release.release().skipped);
    }
    CHECK(budget.used() == 4096);
    cache.fill(8);  // 12 KiB held: 4 KiB available
    {
        ScopedCacheRelease release(reg);
        release.only_when_available_below(budget, 8192);
        ReleaseReport rep = release.release();
        CHECK_FALSE(rep.skipped);
        CHECK(rep.bytes() == 12288);
    }
    CHECK(budget.used() == 0);

    cache.fill(2);
    ScopedCacheRelease by_device(reg);
    by_device.only_when_device_free_below(gpus, 0, 1 << 19);  // plenty free on the device
    CHECK(by_device.release().skipped);
    CHECK(budget.used() == 2048);
    cache.release();
}

TEST_CASE("synchronize first: a sticky error stops the release and propagates") {
    SimulatedDevices gpus(1, 1 << 20);
    CacheRegistry reg;
    int runs = 0;
    auto r = reg.add("c", 0, [] { return std::size_t{1}; }, [&] {
        ++runs;
        return std::size_t{1};
    });
    ScopedCacheRelease ok(reg);
    CHECK(ok.synchronize_first(gpus, 0).release().bytes() == 1);
    gpus.inject_sticky(0);
    ScopedCacheRelease bad(reg);
    bad.synchronize_first(gpus, 0);
    CHECK_THROWS_AS(bad.release(), cuda_error);
    CHECK(runs == 1);
    {
        ScopedCacheRelease silent(reg);  // a destructor must not throw, even on a sticky error
        silent.synchronize_first(gpus, 0);
    }
    CHECK(runs == 1);
}
