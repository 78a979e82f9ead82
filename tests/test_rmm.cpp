// oomguard with RAPIDS RMM 26 (librmm-cu13 from PyPI; the rmm leg of
// scripts/test): RMM's own adaptors composed with oomguard's resource, run on
// the CPU over stream-ordered simulated devices, and the GPU compositions
// compiled (they need a driver to run: scripts/gpu-check).
#include <oomguard/rmm.hpp>
#include <oomguard/simulated_devices.hpp>

#include <rmm/cuda_stream_view.hpp>
#include <rmm/mr/cuda_async_memory_resource.hpp>
#include <rmm/mr/failure_callback_resource_adaptor.hpp>
#include <rmm/mr/limiting_resource_adaptor.hpp>
#include <rmm/mr/per_device_resource.hpp>
#include <rmm/mr/statistics_resource_adaptor.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <new>

using namespace oomguard;
using Sim = SimulatedDevices;
constexpr std::size_t KiB = 1024;

static_assert(CCCL_VERSION >= 3005000, "built against RMM's CCCL");
static_assert(cuda::mr::resource_with<BudgetResource<Sim>, cuda::mr::device_accessible>, "a CCCL 3.5 resource");
static_assert(cuda::mr::resource_with<BudgetAdaptor<rmm::mr::cuda_async_memory_resource>, cuda::mr::device_accessible>,
              "in front of RMM's async pool");

namespace {
cuda::stream_ref stream(std::uintptr_t n) { return cuda::stream_ref(reinterpret_cast<cudaStream_t>(n)); }

// Never called here: it needs a driver. It must compile, as a user writes it.
[[maybe_unused]] void budget_in_front_of_the_async_pool() {
    rmm::mr::cuda_async_memory_resource pool;
    BudgetAdaptor<rmm::mr::cuda_async_memory_resource> capped(pool, Limit::bytes(std::size_t{70} << 30));
    rmm::mr::set_current_device_resource(capped);
    rmm::mr::statistics_resource_adaptor stats(capped);
    void* p = stats.allocate(rmm::cuda_stream_view{}, 1 << 20, 256);
    stats.deallocate(rmm::cuda_stream_view{}, p, 1 << 20, 256);
}
}  // namespace

// RMM's synchronous calls synchronize a CUDA stream, which needs a driver: on
// the CPU the RMM adaptors are driven through their stream-ordered calls.
TEST_CASE("RMM's statistics adaptor over oomguard's resource: both count the same bytes") {
    Sim sim(1, 64 * KiB);
    MemoryBudget<Sim> budget(sim, 0);
    rmm::mr::statistics_resource_adaptor stats(BudgetResource<Sim>{budget});
    void* a = stats.allocate(stream(3), 1000, 256);
    void* b = stats.allocate(stream(3), 2048, 256);
    CHECK(stats.get_bytes_counter().value == 3048);
    CHECK(budget.used() == 1024 + 2048);  // the pool's 512-byte blocks
    stats.deallocate(stream(3), b, 2048, 256);
    stats.deallocate(stream(3), a, 1000, 256);
    CHECK(stats.get_bytes_counter().value == 0);
    CHECK(budget.used() == 0);
    CHECK(sim.pending_bytes(0, 3) == 1024 + 2048);
}

TEST_CASE("RMM's failure callback adaptor with oomguard's caches: release, then retry, every time") {
    Sim sim(1, 16 * KiB);
    MemoryBudget<Sim> budget(sim, 0);
    CacheRegistry reg;
    SimulatedPendingFrees pending(sim, 0);
    auto r = reg.add("stream-ordered pool", 0, pending);
    rmm::mr::failure_callback_resource_adaptor<out_of_memory> retrying(BudgetResource<Sim>{budget},
                                                                     release_caches_and_retry, &reg);
    for (int step = 0; step < 6; ++step) {  // the same request, step after step: each one recovered, not only the first few
        CAPTURE(step);
        void* a = retrying.allocate(stream(1), 12 * KiB, 256);
        retrying.deallocate(stream(1), a, 12 * KiB, 256);  // pending on stream 1
        void* b = retrying.allocate(stream(2), 12 * KiB, 256);  // fails, the callback synchronizes, the retry fits
        CHECK(b != nullptr);
        retrying.deallocate(stream(2), b, 12 * KiB, 256);
        REQUIRE(sim.synchronize(0).ok());
    }
    CHECK(budget.device_ooms() == 6);
    // Nothing left to release: the callback says so, and oomguard's typed OOM reaches the caller.
    CHECK_THROWS_AS((void)retrying.allocate(stream(2), 32 * KiB, 256), out_of_memory);
    CHECK(sim.live_bytes() == 0);
}

namespace {
// An upstream whose every allocation fails the way the test sets.
struct Failing {
    int* mode;  // 0: it works, 1: a host std::bad_alloc, 2: rmm::bad_alloc (RMM's host failure), 3: rmm::out_of_memory
    void* go() {
        if (*mode == 1) throw std::bad_alloc();
        if (*mode == 2) throw rmm::bad_alloc("a host allocation failed");
        if (*mode == 3) throw rmm::out_of_memory("the pool is exhausted");
        alignas(256) static unsigned char slot[256];
        return slot;
    }
    void* allocate_sync(std::size_t, std::size_t) { return go(); }
    void deallocate_sync(void*, std::size_t, std::size_t) noexcept {}
    void* allocate(cuda::stream_ref, std::size_t, std::size_t) { return go(); }
    void deallocate(cuda::stream_ref, void*, std::size_t, std::size_t) noexcept {}
    bool operator==(Failing const& o) const noexcept { return mode == o.mode; }
    bool operator!=(Failing const& o) const noexcept { return mode != o.mode; }
    friend constexpr void get_property(Failing const&, cuda::mr::device_accessible) noexcept {}
};
// A cache that always has something to give back, and counts how often it is asked.
struct Bottomless {
    int* releases;
    std::size_t releasable_bytes() const { return KiB; }
    std::size_t release() {
        ++*releases;
        return KiB;
    }
};
}  // namespace

TEST_CASE("RMM's failure callback adaptor: at most three retries between two requests that end, however the caches refill") {
    int mode = 3, releases = 0;
    CacheRegistry reg;
    Bottomless cache{&releases};  // refilled as fast as it is released: every release frees something
    auto r = reg.add("always something", 0, cache);
    BudgetAdaptor<Failing> capped(Failing{&mode}, Limit::bytes(64 * KiB));
    rmm::mr::failure_callback_resource_adaptor<out_of_memory> retrying(capped, release_caches_and_retry, &reg);
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), KiB, 256), out_of_memory);  // typed, with the figures
    CHECK(releases == 3);
    CHECK(capped.budget().device_ooms() == 4);
    // That request ended in an OOM, which RMM does not tell: the next one, with
    // nothing between, gets what is left (nothing). One that succeeds through
    // the budget ends the count; the one after gets its own three.
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), KiB, 256), out_of_memory);
    CHECK(releases == 3);
    mode = 0;
    void* p = retrying.allocate(stream(1), KiB, 256);
    retrying.deallocate(stream(1), p, KiB, 256);
    mode = 3;
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), 2 * KiB, 256), out_of_memory);
    CHECK(releases == 6);
    // Nested failure adaptors share the three: no level starts the count again.
    mode = 0;
    p = retrying.allocate(stream(1), KiB, 256);
    retrying.deallocate(stream(1), p, KiB, 256);
    mode = 3;
    rmm::mr::failure_callback_resource_adaptor<out_of_memory> outer(retrying, release_caches_and_retry, &reg);
    CHECK_THROWS_AS((void)outer.allocate(stream(1), KiB, 256), out_of_memory);
    CHECK(releases == 9);
    CHECK(capped.budget().used() == 0);
}

TEST_CASE("RMM's failure callback adaptor: a cache that allocates while released does not restart the count") {
    Sim sim(1, 1024 * KiB);
    MemoryBudget<Sim> scratch_budget(sim, 0);
    BudgetResource<Sim> scratch(scratch_budget);
    int mode = 0, releases = 0;
    BudgetAdaptor<Failing> capped(Failing{&mode}, Limit::bytes(64 * KiB));
    void* ok = capped.allocate(stream(1), KiB, 256);  // a request that ended: the count starts at zero
    capped.deallocate(stream(1), ok, KiB, 256);
    mode = 3;
    struct Busy {  // its release allocates and frees scratch through an oomguard resource
        BudgetResource<Sim>* scratch;
        int* releases;
        std::size_t releasable_bytes() const { return KiB; }
        std::size_t release() {
            ++*releases;
            void* q = scratch->allocate(stream(9), 256, 256);
            scratch->deallocate(stream(9), q, 256, 256);
            return KiB;
        }
    } busy{&scratch, &releases};
    CacheRegistry reg;
    auto r = reg.add("busy", 0, busy);
    rmm::mr::failure_callback_resource_adaptor<out_of_memory> retrying(capped, release_caches_and_retry, &reg);
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), KiB, 256), out_of_memory);
    CHECK(releases == 3);
    // A cache of the adaptor's own retry that runs out of memory as it releases: it freed
    // nothing, the adaptor's OOM goes up, and the callback above still stops at its three.
    struct Starved {
        std::size_t releasable_bytes() const { return KiB; }
        std::size_t release() { throw out_of_memory(oom_info{}); }
    } starved;
    CacheRegistry own;
    auto r2 = own.add("starved", 0, starved);
    capped.release_caches_on_oom(own, 1);
    mode = 0;
    ok = capped.allocate(stream(1), KiB, 256);
    capped.deallocate(stream(1), ok, KiB, 256);
    mode = 3;
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), KiB, 256), out_of_memory);
    CHECK(releases == 6);
    CHECK(capped.budget().used() == 0);
    CHECK(scratch_budget.used() == 0);
}

TEST_CASE("RMM's failure callback adaptor keyed on oomguard's out_of_memory: only device OOMs release and retry") {
    int mode = 1, releases = 0;
    CacheRegistry reg;
    Bottomless cache{&releases};
    auto r = reg.add("always something", 0, cache);
    BudgetAdaptor<Failing> capped(Failing{&mode}, Limit::bytes(64 * KiB));
    rmm::mr::failure_callback_resource_adaptor<out_of_memory> retrying(capped, release_caches_and_retry, &reg);
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), KiB, 256), std::bad_alloc);  // a host failure: as it was
    mode = 2;
    CHECK_THROWS_AS((void)retrying.allocate(stream(1), KiB, 256), rmm::bad_alloc);
    CHECK(releases == 0);  // neither released a cache nor was retried
    CHECK(capped.budget().device_ooms() == 0);
    CHECK(capped.budget().used() == 0);
}

TEST_CASE("RMM's limiting adaptor and oomguard's budget: each refusal says whose it is") {
    Sim sim(1, 1024 * KiB);
    MemoryBudget<Sim> budget(sim, 0, Limit::bytes(64 * KiB));
    rmm::mr::limiting_resource_adaptor limited(BudgetResource<Sim>{budget}, 32 * KiB);
    void* a = limited.allocate(stream(1), 30 * KiB, 256);
    try {
        (void)limited.allocate(stream(1), 8 * KiB, 256);  // RMM's limit: its own exception
        FAIL("expected rmm::out_of_memory");
    } catch (rmm::out_of_memory const& e) {
        CHECK(is_device_oom(e));  // by type (<oomguard/rmm.hpp>)
        CHECK(is_rmm_oom(e));
    }
    limited.deallocate(stream(1), a, 30 * KiB, 256);
    rmm::mr::limiting_resource_adaptor loose(BudgetResource<Sim>{budget}, 1024 * KiB);
    try {
        (void)loose.allocate(stream(1), 100 * KiB, 256);  // oomguard's cap, behind it: typed, with the figures
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::budget);
    }
    CHECK(budget.used() == 0);
    CHECK_FALSE(is_device_oom(rmm::bad_alloc("a host allocation failed")));
}

TEST_CASE("oomguard's adaptor in front of an RMM adaptor chain, as set_current_device_resource takes it") {
    Sim sim(1, 1024 * KiB);
    MemoryBudget<Sim> unlimited(sim, 0);
    rmm::mr::statistics_resource_adaptor stats(BudgetResource<Sim>{unlimited});
    BudgetAdaptor<rmm::mr::statistics_resource_adaptor> capped(stats, Limit::bytes(16 * KiB));
    cuda::mr::any_resource<cuda::mr::device_accessible> held{capped};  // what RMM stores
    void* p = held.allocate(stream(4), 10 * KiB, 256);
    CHECK(capped.budget().used() == 10 * KiB);
    CHECK(stats.get_bytes_counter().value == 10 * KiB);
    CHECK_THROWS_AS((void)held.allocate(stream(4), 10 * KiB, 256), out_of_memory);
    held.deallocate(stream(4), p, 10 * KiB, 256);
    CHECK(capped.budget().used() == 0);
    CHECK(stats.get_bytes_counter().value == 0);
}
