// A seam into SimulatedDevices' room-taking, between its reads and its CAS,
// for the race test at the end; this file is the only one of its program
// that includes the header.
#include <atomic>

namespace race {
using Hook = void (*)();
inline std::atomic<Hook> hook{nullptr};  // read by every thread's room-taking
}  // namespace race
#define OOMGUARD_SIMULATED_DEVICES_RACE_HOOK()                     \
    do {                                                           \
        if (race::Hook h = race::hook.load()) h();                 \
    } while (false)
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <cstring>
#include <atomic>
#include <thread>
#include <vector>

using namespace oomguard;

static_assert(is_backend_v<SimulatedDevices>, "SimulatedDevices models the backend concept");

TEST_CASE("allocations count against capacity and other processes") {
    SimulatedDevices gpus({{1000, 200}, {500}});
    void* p = nullptr;
    REQUIRE(gpus.allocate(&p, 600, 0).ok());
    std::memset(p, 0xab, 600);  // host memory: usable
    void* q = nullptr;
    status s = gpus.allocate(&q, 300, 0);  // 200 + 600 + 300 > 1000
    CHECK(s.kind == status_kind::out_of_memory);
    CHECK(s.code == 2);
    CHECK(q == nullptr);
    std::size_t free = 0, total = 0;
    REQUIRE(gpus.memory_info(0, &free, &total).ok());
    CHECK(total == 1000);
    CHECK(free == 200);
    CHECK(gpus.live_bytes(0) == 600);
    CHECK(gpus.live_allocations(0) == 1);
    CHECK(gpus.deallocate(p, 600, 0).ok());
    CHECK(gpus.live_bytes() == 0);
    CHECK(gpus.live_allocations() == 0);
    CHECK(gpus.failed_allocations(0) == 1);
    CHECK(gpus.allocation_calls(0) == 2);
}

TEST_CASE("bad arguments are answered with codes, never a crash") {
    SimulatedDevices gpus(2, 1000);
    void* p = nullptr;
    CHECK(gpus.allocate(&p, 10, 2).code == 101);
    CHECK(gpus.allocate(&p, 10, -1).code == 101);
    CHECK(gpus.allocate(nullptr, 10, 0).code == 1);
    int x = 0;
    CHECK(gpus.deallocate(&x, 4, 0).code == 1);  // not ours
    CHECK(gpus.deallocate(nullptr, 4, 0).ok());
    CHECK(gpus.allocate(&p, ~std::size_t{0}, 0).kind == status_kind::out_of_memory);
    CHECK_THROWS_AS(SimulatedDevices({{0}}), std::invalid_argument);
    CHECK_THROWS_AS(SimulatedDevices({{100, 101}}), std::invalid_argument);
    CHECK_THROWS_AS(SimulatedDevices(-1, 100), std::invalid_argument);
    CHECK_THROWS_AS(gpus.set_faults(0, FaultPlan{0, 1.5}), std::invalid_argument);
    CHECK_THROWS_AS(gpus.set_faults(7, FaultPlan{}), std::out_of_range);
    CHECK_THROWS_AS(gpus.set_used_by_others(0, 1001), std::invalid_argument);
}

TEST_CASE("braces build `count` devices, never a device per number") {
    SimulatedDevices gpus{2, 1000};
    CHECK(gpus.count() == 2);
    CHECK(gpus.spec(1).capacity == 1000);
}

TEST_CASE("no devices reads as no_device") {
    SimulatedDevices none(0, 1);
    int n = 5;
    CHECK(none.device_count(&n).kind == status_kind::no_device);
    CHECK(n == 0);
}

TEST_CASE("fault plans: k-th call, size threshold, fail_next, sticky") {
    SimulatedDevices gpus(1, 1 << 20);
    void* p = nullptr;
    gpus.set_faults(0, FaultPlan{3});
    CHECK(gpus.allocate(&p, 8, 0).ok());
    gpus.deallocate(p, 8, 0);
    CHECK(gpus.allocate(&p, 8, 0).ok());
    gpus.deallocate(p, 8, 0);
    CHECK(gpus.allocate(&p, 8, 0).kind == status_kind::out_of_memory);
    CHECK(gpus.allocate(&p, 8, 0).ok());
    gpus.deallocate(p, 8, 0);

    FaultPlan big;
    big.fail_above = 100;
    gpus.set_faults(0, big);
    CHECK(gpus.allocate(&p, 101, 0).kind == status_kind::out_of_memory);
    CHECK(gpus.allocate(&p, 100, 0).ok());
    gpus.deallocate(p, 100, 0);

    gpus.clear_faults(0);
    gpus.fail_next(0, 2);
    CHECK(gpus.allocate(&p, 1, 0).kind == status_kind::out_of_memory);
    CHECK(gpus.allocate(&p, 1, 0).kind == status_kind::out_of_memory);
    CHECK(gpus.allocate(&p, 1, 0).ok());
    gpus.deallocate(p, 1, 0);

    FaultPlan sticky;
    sticky.sticky_after = 2;
    gpus.set_faults(0, sticky);
    void* q = nullptr;
    CHECK(gpus.allocate(&q, 4, 0).ok());
    CHECK(gpus.allocate(&p, 4, 0).kind == status_kind::sticky);
    CHECK(gpus.synchronize(0).kind == status_kind::sticky);
    CHECK(gpus.deallocate(q, 4, 0).kind == status_kind::sticky);  // reported, memory still freed
    CHECK(gpus.live_bytes() == 0);
    gpus.clear_sticky(0);
    CHECK(gpus.synchronize(0).ok());
}

TEST_CASE("a seeded probability reproduces the same failures") {
    auto run = [](std::uint64_t seed) {
        SimulatedDevices gpus(1, 1 << 20);
        FaultPlan f;
        f.probability = 0.3;
        f.seed = seed;
        gpus.set_faults(0, f);
        std::vector<int> pattern;
        for (int i = 0; i < 200; ++i) {
            void* p = nullptr;
            bool ok = gpus.allocate(&p, 16, 0).ok();
            pattern.push_back(ok);
            if (ok) gpus.deallocate(p, 16, 0);
        }
        return pattern;
    };
    auto a = run(7), b = run(7), c = run(8);
    CHECK(a == b);
    CHECK(a != c);
    long fails = std::count(a.begin(), a.end(), 0);
    CHECK(fails > 30);  // about 60 expected
    CHECK(fails < 100);
}

TEST_CASE("phantom memory simulates a card larger than the host") {
    SimulatedDevices gpus({{80ull << 30}}, SimulatedMemory::phantom);
    void* a = nullptr;
    void* b = nullptr;
    REQUIRE(gpus.allocate(&a, 40ull << 30, 0).ok());
    REQUIRE(gpus.allocate(&b, 39ull << 30, 0).ok());
    CHECK(a != b);
    CHECK(reinterpret_cast<std::uintptr_t>(a) % SimulatedDevices::alignment == 0);
    void* c = nullptr;
    CHECK(gpus.allocate(&c, 2ull << 30, 0).kind == status_kind::out_of_memory);
    gpus.deallocate(a, 40ull << 30, 0);
    gpus.deallocate(b, 39ull << 30, 0);
    CHECK(gpus.live_bytes() == 0);
}

TEST_CASE("current device is per thread, and contexts are only made when touched") {
    SimulatedDevices gpus(3, 1000);
    CHECK_FALSE(gpus.context_created(1));
    REQUIRE(gpus.set_device(1).ok());
    int d = -1;
    gpus.current_device(&d);
    CHECK(d == 1);
    std::thread([&] {
        int e = -1;
        gpus.current_device(&e);
        CHECK(e == 0);
    }).join();
    CHECK(gpus.context_created(1));
    CHECK_FALSE(gpus.context_created(2));
    CHECK(gpus.set_device_calls() == 1);
    CHECK(gpus.set_device(3).code == 101);
}

TEST_CASE("thread-safe: concurrent allocate/free keeps exact counts") {
    SimulatedDevices gpus(1, 1 << 20);
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t)
        ts.emplace_back([&] {
            for (int i = 0; i < 5000; ++i) {
                void* p = nullptr;
                if (gpus.allocate(&p, 64 + (i % 7) * 64, 0).ok()) gpus.deallocate(p, 0, 0);
            }
        });
    for (auto& t : ts) t.join();
    CHECK(gpus.live_bytes() == 0);
    CHECK(gpus.live_allocations() == 0);
    CHECK(gpus.allocation_calls(0) == 20000);
}

TEST_CASE("the stream-ordered pool: a free is reusable at once on its stream, elsewhere after a synchronize") {
    SimulatedDevices sim(1, 4096);
    static_assert(is_stream_ordered_v<SimulatedDevices>, "the simulator is a stream-ordered backend");
    SimulatedDevices::stream_type const s1 = 1, s2 = 2;
    void* a = nullptr;
    REQUIRE(sim.allocate_async(&a, 3000, 0, s1).ok());  // rounds to 3072
    CHECK(sim.live_bytes(0) == 3072);
    REQUIRE(sim.deallocate_async(a, 3000, 0, s1).ok());
    CHECK(sim.live_bytes(0) == 0);
    CHECK(sim.pending_bytes(0) == 3072);
    CHECK(sim.pending_bytes(0, s1) == 3072);
    std::size_t free = 0, total = 0;
    REQUIRE(sim.memory_info(0, &free, &total).ok());
    CHECK(free == 1024);  // pending memory is still the pool's
    void* b = nullptr;
    CHECK(sim.allocate_async(&b, 2048, 0, s2).kind == status_kind::out_of_memory);  // only pending frees in the way
    void* c = nullptr;
    CHECK(sim.allocate(&c, 2048, 0).kind == status_kind::out_of_memory);             // for cudaMalloc too
    REQUIRE(sim.allocate_async(&b, 2048, 0, s1).ok());                               // its own stream reuses them
    CHECK(sim.pending_bytes(0, s1) == 1024);
    CHECK(sim.live_bytes(0) == 2048);
    REQUIRE(sim.deallocate_async(b, 2048, 0, s1).ok());
    REQUIRE(sim.synchronize_stream(0, s1).ok());
    CHECK(sim.pending_bytes(0) == 0);
    REQUIRE(sim.allocate_async(&b, 4096, 0, s2).ok());  // all of it, on the other stream
    REQUIRE(sim.deallocate_async(b, 4096, 0, s2).ok());
    CHECK(sim.pending_bytes(0, s2) == 4096);
    REQUIRE(sim.synchronize(0).ok());  // the device: every stream
    CHECK(sim.pending_bytes(0) == 0);
    CHECK(sim.deallocate_async(b, 4096, 0, s2).kind == status_kind::invalid_argument);  // a double free
    CHECK(sim.live_allocations() == 0);
    // A request the size type cannot round is an OOM, not a wrap.
    CHECK(sim.allocate_async(&b, std::numeric_limits<std::size_t>::max() - 10, 0, s1).kind ==
          status_kind::out_of_memory);
    SimulatedPendingFrees cache(sim, 0);
    REQUIRE(sim.allocate_async(&b, 100, 0, s1).ok());
    REQUIRE(sim.deallocate_async(b, 100, 0, s1).ok());
    CHECK(cache.releasable_bytes() == 512);
    CHECK(cache.release() == 512);
    CHECK(cache.releasable_bytes() == 0);
    CHECK_THROWS_AS(SimulatedPendingFrees(sim, 3), std::out_of_range);
}

TEST_CASE("cudaMalloc and stream-ordered calls from many threads never hold more than the device") {
    constexpr std::size_t capacity = 64 * 1024;
    SimulatedDevices sim(1, capacity);
    std::atomic<bool> over{false};
    std::atomic<std::size_t> successes{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] {
            SimulatedDevices::stream_type const s = static_cast<SimulatedDevices::stream_type>(t % 2 + 1);
            std::uint64_t x = 12345u + static_cast<std::uint64_t>(t);
            for (int i = 0; i < 4000; ++i) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                std::size_t bytes = 1024 + (x >> 33) % (24 * 1024);
                void* p = nullptr;
                bool async = (x >> 20) & 1;
                status st = async ? sim.allocate_async(&p, bytes, 0, s) : sim.allocate(&p, bytes, 0);
                if (!st.ok()) continue;
                successes.fetch_add(1);
                if (sim.live_bytes(0) > capacity) over.store(true);
                if (async) {
                    REQUIRE(sim.deallocate_async(p, bytes, 0, s).ok());
                    if ((x >> 40) % 8 == 0) REQUIRE(sim.synchronize_stream(0, s).ok());
                } else {
                    REQUIRE(sim.deallocate(p, bytes, 0).ok());
                }
            }
        });
    for (auto& th : threads) th.join();
    CHECK_FALSE(over.load());
    CHECK(successes.load() > 1000);
    REQUIRE(sim.synchronize(0).ok());
    CHECK(sim.live_bytes() == 0);
    CHECK(sim.pending_bytes(0) == 0);
    CHECK(sim.live_allocations() == 0);
}

namespace race {
SimulatedDevices* sim = nullptr;
void* held = nullptr;
std::atomic<bool> fired{false}, started{false}, done{false};
std::thread other;
status other_freed{}, other_got{};
// In the first cudaMalloc's room-taking, between its reads and its CAS: another
// thread frees 1 KiB on a stream and cudaMallocs 1 KiB, and this one waits for
// it (for a while: under the device's mutex it cannot finish).
void free_and_allocate_meanwhile() {
    if (fired.exchange(true)) return;
    other = std::thread([] {
        started.store(true);
        other_freed = sim->deallocate_async(held, 1024, 0, 5);  // `used` down, pending up
        void* e = nullptr;
        other_got = sim->allocate(&e, 1024, 0);  // `used` back up, if it fits
        done.store(true);
    });
    while (!started.load()) std::this_thread::yield();  // running: a race, not a slow scheduler
    auto const until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    while (!done.load() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
}
}  // namespace race

TEST_CASE("a cudaMalloc that loses its race to a free on a stream and another cudaMalloc takes no pending memory") {
    // Before: the cudaMalloc read the pending bytes (0), the free moved 1 KiB
    // from `used` to pending, the other cudaMalloc took 1 KiB back into `used`,
    // and the first CAS, on `used` alone, succeeded on the stale figure: 3 KiB
    // busy on a 2 KiB device.
    SimulatedDevices sim(1, 2048);
    race::sim = &sim;
    REQUIRE(sim.allocate_async(&race::held, 1024, 0, 5).ok());  // streams in use
    race::hook.store(&race::free_and_allocate_meanwhile);
    void* mine = nullptr;
    status const got = sim.allocate(&mine, 1024, 0);
    race::hook.store(nullptr);
    race::other.join();
    REQUIRE(race::other_freed.ok());
    CHECK(got.ok());  // it fitted when it asked
    CHECK_FALSE(race::other_got.ok());  // the other then did not: the freed KiB is pending
    CHECK(sim.live_bytes(0) + sim.pending_bytes(0) <= 2048);
    REQUIRE(sim.synchronize(0).ok());
    CHECK(sim.live_bytes(0) == 1024);
}
