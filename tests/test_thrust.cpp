// Thrust through a budget. The same source is the CPP-system test (g++, over
// SimulatedDevices, run in CI) and the CUDA test (nvcc, over CudaRuntime, run
// on a GPU by scripts/gpu-check).
#include <oomguard/cache_registry.hpp>
#include <oomguard/thrust.hpp>

#include <thrust/mr/disjoint_pool.h>
#include <thrust/mr/new.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>

#include <doctest/doctest.h>

#include <limits>

#include <string>

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#include <oomguard/cuda_runtime.hpp>
using Backend = oomguard::CudaRuntime;
#else
#include <oomguard/simulated_devices.hpp>
using Backend = oomguard::SimulatedDevices;
#endif

using namespace oomguard;
using Budget = MemoryBudget<Backend>;
constexpr std::size_t N = 1 << 16;

namespace {
struct Fixture {
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    Backend backend;
    bool usable() {
        int n = 0;
        return backend.device_count(&n).ok() && n > 0;
    }
    std::size_t live() { return 0; }  // the budget's counters are the witness on a GPU
#else
    Backend backend{1, std::size_t{1} << 30};
    bool usable() { return true; }
    std::size_t live() { return backend.live_bytes(); }
#endif
};

void fill_descending(thrust_vector<int, Backend>& v) {
    thrust::sequence(v.begin(), v.end(), static_cast<int>(v.size()), -1);
}
}  // namespace

TEST_CASE("thrust::sort under a budget too small for its temporaries raises a typed OOM") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, N * sizeof(int) + N * sizeof(int) / 2);  // storage + half a copy
    {
        thrust_vector<int, Backend> v(N, ThrustAllocator<int, Backend>(budget));
        fill_descending(v);
        CHECK(budget.used() == N * sizeof(int));
        try {
            thrust::sort(thrust_policy(budget), v.begin(), v.end());
            FAIL("expected out_of_memory");
        } catch (out_of_memory const& e) {
            CHECK(e.info().source == oom_source::budget);
            CHECK(e.info().requested >= N * sizeof(int) / 2);
            CHECK(e.info().budget_limit == budget.limit());
            CHECK(std::string(e.what()).find("held under this budget of") != std::string::npos);
            CHECK(is_device_oom(e));
        }
        CHECK(budget.used() == N * sizeof(int));  // the failed sort left nothing behind
    }
    CHECK(budget.used() == 0);
    CHECK(f.live() == 0);
}

TEST_CASE("the same sort under a larger budget succeeds and frees its temporaries") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, 64 * N * sizeof(int));
    {
        thrust_vector<int, Backend> v(N, ThrustAllocator<int, Backend>(budget));
        fill_descending(v);
        thrust::sort(thrust_policy(budget), v.begin(), v.end());
        CHECK(v[0] == 1);
        CHECK(v[N - 1] == static_cast<int>(N));
        CHECK(budget.used() == N * sizeof(int));
        CHECK(budget.peak() > N * sizeof(int));  // temporaries went through the budget
    }
    CHECK(budget.used() == 0);
    CHECK(f.live() == 0);
}

TEST_CASE("a sort on a stream: its temporaries from the budget's stream-ordered pool, freed on that stream") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, 64 * N * sizeof(int));
    Backend::stream_type const stream{};  // the default stream (CUDA), stream 0 (the simulator)
    {
        thrust_vector<int, Backend> v(N, ThrustAllocator<int, Backend>(budget));
        fill_descending(v);
        std::size_t const allocations = budget.allocations();
        thrust::sort(thrust_policy(budget, stream), v.begin(), v.end());
        CHECK(v[0] == 1);
        CHECK(v[N - 1] == static_cast<int>(N));
        CHECK(budget.allocations() > allocations);  // temporaries through allocate_async
        CHECK(budget.used() == N * sizeof(int));
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
        CHECK(f.backend.pending_bytes(0, stream) > 0);  // freed on the stream, pending until it synchronizes
        REQUIRE(f.backend.synchronize_stream(0, stream).ok());
#endif
        // Too small for the temporaries: the typed OOM, and nothing left behind.
        Budget tight(f.backend, 0, 16);
        CHECK_THROWS_AS(thrust::sort(thrust_policy(tight, stream), v.begin(), v.end()), out_of_memory);
        CHECK(tight.used() == 0);
    }
    CHECK(budget.used() == 0);
    CHECK(f.live() == 0);
}

TEST_CASE("device_vector growth past the budget is a typed OOM and leaks nothing") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, 1000 * sizeof(double));
    thrust_vector<double, Backend> v{ThrustAllocator<double, Backend>(budget)};
    v.resize(600);
    CHECK_THROWS_AS(v.resize(1200), out_of_memory);
    CHECK(v.size() == 600);
    v.clear();
    v.shrink_to_fit();
    CHECK(budget.used() == 0);
    thrust_vector<double, Backend> unbound;  // default allocator: refuses clearly
    CHECK_THROWS_AS(unbound.resize(1), std::logic_error);
}

TEST_CASE("Thrust's text-only OOM errors become typed ones; others pass through") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, 1 << 20);
    try {
        translate_thrust_oom(budget, []() -> int {
            throw thrust::system::detail::bad_alloc("cudaErrorMemoryAllocation: out of memory");
        });
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK_FALSE(e.info().requested_known);
        CHECK(e.info().budget_limit == (1u << 20));
        CHECK(std::string(e.what()).find("an unknown size") != std::string::npos);
        CHECK(std::string(e.what()).find("Thrust said: std::bad_alloc: cudaErrorMemoryAllocation") !=
              std::string::npos);
    }
    CHECK_THROWS_AS(translate_thrust_oom(budget, []() -> int { throw std::runtime_error("user bug"); }),
                    std::runtime_error);
    CHECK(translate_thrust_oom(budget, [] { return 7; }) == 7);
}

TEST_CASE("a Thrust mr pool over the budget, released through the registry") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, 1 << 24);
    ThrustBudgetResource<Backend> upstream(budget);
    // Disjoint: the pool's bookkeeping lives on the host, its blocks on the device.
    thrust::mr::new_delete_resource bookkeeping;
    thrust::mr::disjoint_unsynchronized_pool_resource<ThrustBudgetResource<Backend>, thrust::mr::new_delete_resource>
        pool(&upstream, &bookkeeping);
    auto p = pool.do_allocate(4096, 256);
    pool.do_deallocate(p, 4096, 256);
    CHECK(budget.used() > 0);  // the pool keeps the block
    CacheRegistry reg;
    ThrustPoolCache<decltype(pool), Backend> cache(pool, budget);
    auto r = reg.add("thrust pool", 0, cache);
    ReleaseReport rep = reg.release_all();
    CHECK(rep.bytes() > 0);
    CHECK(budget.used() == 0);
}

TEST_CASE("a temporary request above PTRDIFF_MAX is an out_of_memory, not a bad argument") {
    Fixture f;
    if (!f.usable()) return;
    Budget budget(f.backend, 0, 1 << 20);
    ThrustTemporaryAllocator<Backend> alloc(budget);
    std::size_t const huge = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max()) + 1;
    CHECK_THROWS_AS(alloc.allocate(huge), out_of_memory);
    CHECK(budget.used() == 0);
}

TEST_CASE("a Thrust vector moved, copied or swapped between budgets leaves each budget exact") {
    Fixture f;
    if (!f.usable()) return;
    Budget b0(f.backend, 0, 1 << 20), b1(f.backend, 0, 1 << 20);
    {
        thrust_vector<int, Backend> a{ThrustAllocator<int, Backend>(b0)};
        thrust_vector<int, Backend> c{ThrustAllocator<int, Backend>(b1)};
        a.resize(500);
        c.resize(1000);
        a = std::move(c);  // a takes c's storage, and with it c's budget
        CHECK(b0.used() == 0);
        CHECK(b1.used() == 1000 * sizeof(int));
        thrust_vector<int, Backend> d{ThrustAllocator<int, Backend>(b0)};
        d.resize(10);
        d = a;  // a copy on a's budget
        CHECK(b0.used() == 0);
        CHECK(b1.used() == 2000 * sizeof(int));
        thrust_vector<int, Backend> e{ThrustAllocator<int, Backend>(b0)};
        e.resize(7);
        e.swap(d);
        CHECK(b0.used() == 7 * sizeof(int));
        CHECK(b1.used() == 2000 * sizeof(int));
    }
    CHECK(b0.used() == 0);
    CHECK(b1.used() == 0);
    CHECK(b0.accounting_errors() == 0);
    CHECK(b1.accounting_errors() == 0);
    CHECK(f.live() == 0);
}
