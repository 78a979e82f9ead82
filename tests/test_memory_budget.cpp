#include <oomguard/device_buffer.hpp>
#include <oomguard/memory_budget.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;

constexpr std::size_t MiB = 1 << 20;

TEST_CASE("a request over the cap never reaches the device") {
    SimulatedDevices gpus(1, 1024 * MiB);
    Budget budget(gpus, 0, 100 * MiB);
    void* a = budget.allocate(60 * MiB);
    CHECK(budget.used() == 60 * MiB);
    std::uint64_t calls = gpus.allocation_calls(0);
    try {
        budget.allocate(50 * MiB);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::budget);
        CHECK(e.info().requested == 50 * MiB);
        CHECK(e.info().budget_used == 60 * MiB);
        CHECK(e.info().budget_limit == 100 * MiB);
        CHECK(e.info().total == 1024 * MiB);
        CHECK(e.info().free == 964 * MiB);
        CHECK(std::string(e.what()).find("held under this budget of 100.00 MiB") != std::string::npos);
    }
    CHECK(gpus.allocation_calls(0) == calls);  // the device was not asked
    CHECK(budget.denials() == 1);
    budget.deallocate(a, 60 * MiB);
    CHECK(budget.used() == 0);
    CHECK(budget.peak() == 60 * MiB);
    CHECK(budget.allocations() == 1);
    CHECK(gpus.live_bytes() == 0);
}

TEST_CASE("a device refusal rolls the reservation back and reports the device's figures") {
    SimulatedDevices gpus({{100 * MiB, 70 * MiB}});
    Budget budget(gpus, 0, Limit::unlimited());
    try {
        budget.allocate(40 * MiB);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::device);
        CHECK(e.info().code == 2);
        CHECK(std::string(e.info().code_name) == "cudaErrorMemoryAllocation");
        CHECK(e.info().free == 30 * MiB);
        CHECK(std::string(e.what()).find("GPU 0 (simulated)") != std::string::npos);
    }
    CHECK(budget.used() == 0);
    CHECK(budget.device_ooms() == 1);
}

TEST_CASE("a sticky error passes through as cuda_error and is never an OOM") {
    SimulatedDevices gpus(1, 100 * MiB);
    Budget budget(gpus, 0, 50 * MiB);
    gpus.inject_sticky(0);
    CHECK_THROWS_AS(budget.allocate(MiB), cuda_error);
    CHECK(budget.used() == 0);
    gpus.clear_sticky(0);
    void* p = budget.allocate(MiB);
    gpus.inject_sticky(0);
    budget.deallocate(p, MiB);  // noexcept; the failure is counted
    CHECK(budget.free_failures() == 1);
    CHECK(budget.used() == 0);
    CHECK(gpus.live_bytes() == 0);
}

TEST_CASE("caps as fraction and headroom resolve against the device") {
    SimulatedDevices gpus({{1000 * MiB, 100 * MiB}});
    Budget f(gpus, 0, Limit::fraction(0.5));
    CHECK(f.limit() == 500 * MiB);
    Budget h(gpus, 0, Limit::headroom(200 * MiB));
    CHECK(h.limit() == 700 * MiB);  // 900 free - 200
    Budget one(gpus, 0, Limit::fraction(1.0));
    CHECK(one.limit() == 1000 * MiB);
    CHECK_THROWS_AS(Limit::fraction(0.0), std::invalid_argument);
    CHECK_THROWS_AS(Limit::fraction(1.01), std::invalid_argument);
    CHECK_THROWS_AS(Limit::fraction(-0.5), std::invalid_argument);
    CHECK_THROWS_AS(Limit::fraction(std::nan("")), std::invalid_argument);
    CHECK_THROWS_WITH_AS(Budget(gpus, 0, Limit::headroom(2000 * MiB)),
                         doctest::Contains("more than the 900.00 MiB free"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(Budget(gpus, 1, 10), doctest::Contains("device 1 does not exist"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(Budget(gpus, -1, 10), doctest::Contains("valid ordinals are 0..0"),
                         std::invalid_argument);
}

TEST_CASE("headroom re-applied: what the budget holds counts as its own, not as the device's") {
    constexpr std::size_t KiB = 1024;
    SimulatedDevices gpus(1, 1024 * KiB);
    Budget b(gpus, 0, Limit::headroom(100 * KiB));
    CHECK(b.limit() == 924 * KiB);
    void* held = b.allocate(600 * KiB);
    // 424 KiB free on the device + 600 KiB held here - 100 KiB: the same 924 KiB.
    b.set_limit(Limit::headroom(100 * KiB));
    CHECK(b.limit() == 924 * KiB);
    CHECK(b.available() == 324 * KiB);
    void* more = b.allocate(64 * KiB);
    b.deallocate(more, 64 * KiB);
    // The boundary: headroom up to free + held is allowed (a cap of what is held), one byte more is not.
    b.set_limit(Limit::headroom(1024 * KiB));
    CHECK(b.limit() == 0);
    b.set_limit(Limit::headroom(1024 * KiB - 1));
    CHECK(b.limit() == 1);
    CHECK_THROWS_WITH_AS(b.set_limit(Limit::headroom(1024 * KiB + 1)),
                         doctest::Contains("is more than the 424.00 KiB free on the device plus the 600.00 KiB "
                                           "this budget holds"),
                         std::invalid_argument);
    CHECK(b.limit() == 1);  // a refused limit changes nothing
    b.deallocate(held, 600 * KiB);
    CHECK(gpus.live_bytes() == 0);
}

TEST_CASE("no device: a clear no_device_error, not an OOM") {
    SimulatedDevices none(0, 1);
    CHECK_THROWS_AS(Budget(none, 0, 10), no_device_error);
}

TEST_CASE("overflow-safe near SIZE_MAX") {
    SimulatedDevices gpus(1, 100 * MiB);
    constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
    Budget unlimited(gpus, 0, Limit::unlimited());
    void* p = unlimited.allocate(MiB);
    CHECK_THROWS_AS(unlimited.allocate(max), out_of_memory);  // no wrap: the device refuses
    CHECK_THROWS_AS(unlimited.allocate(max - MiB + 1), out_of_memory);
    CHECK(unlimited.used() == MiB);
    unlimited.deallocate(p, MiB);
    // A cap above what a budget holds is refused, not clamped.
    CHECK_THROWS_WITH_AS(Budget(gpus, 0, max - 1),
                         doctest::Contains("a cap of 18446744073709551614 bytes (16.00 EiB) is more than"),
                         std::invalid_argument);
    CHECK_THROWS_AS(Budget(gpus, 0, Budget::max_limit + 1), std::invalid_argument);
    Budget capped(gpus, 0, Budget::max_limit);  // the largest cap a budget holds
    CHECK(capped.limit() == Budget::max_limit);
    CHECK(capped.try_reserve(Budget::max_limit - 1));
    CHECK_FALSE(capped.try_reserve(2));
    CHECK_FALSE(capped.try_reserve(max));
    capped.release(Budget::max_limit - 1);
    CHECK(capped.used() == 0);
    CHECK(capped.allocations() == 0);
}

TEST_CASE("the allocation count stays exact across its 16-bit carry, with failures around it") {
    SimulatedDevices gpus({{std::size_t{1} << 30}}, SimulatedMemory::phantom, false);
    Budget budget(gpus, 0, Limit::unlimited());
    std::size_t ok = 0;
    for (int i = 0; i < 200000; ++i) {
        if (i % 65536 == 0 || i % 65536 == 65535) gpus.fail_next(0);  // a rollback at the edge
        try {
            budget.deallocate(budget.allocate(512), 512);
            ++ok;
        } catch (out_of_memory const&) {
        }
    }
    CHECK(budget.allocations() == ok);
    CHECK(ok == 200000 - 7);  // i = 0, 65535, 65536, 131071, 131072, 196607, 196608
    CHECK(budget.used() == 0);
}

TEST_CASE("zero bytes allocates nothing") {
    SimulatedDevices gpus(1, MiB);
    Budget budget(gpus, 0, MiB);
    CHECK(budget.allocate(0) == nullptr);
    budget.deallocate(nullptr, 0);
    CHECK(budget.used() == 0);
    CHECK(budget.allocations() == 0);
}

TEST_CASE("lowering the limit below what is held denies new requests until freed") {
    SimulatedDevices gpus(1, 100 * MiB);
    Budget budget(gpus, 0, 50 * MiB);
    void* p = budget.allocate(40 * MiB);
    budget.set_limit(Limit::bytes(30 * MiB));
    CHECK(budget.available() == 0);
    CHECK_THROWS_AS(budget.allocate(1), out_of_memory);
    budget.deallocate(p, 40 * MiB);
    CHECK_NOTHROW(budget.deallocate(budget.allocate(30 * MiB), 30 * MiB));
}

TEST_CASE("RAII reservations") {
    SimulatedDevices gpus(1, 100 * MiB);
    Budget budget(gpus, 0, 10 * MiB);
    {
        auto r = budget.reserve(6 * MiB);
        CHECK(r.bytes() == 6 * MiB);
        CHECK(budget.used() == 6 * MiB);
        CHECK_THROWS_AS(budget.reserve(5 * MiB), out_of_memory);
        auto moved = std::move(r);
        CHECK(budget.used() == 6 * MiB);
        CHECK_FALSE(r);
    }
    CHECK(budget.used() == 0);
}

TEST_CASE("PeakScope measures the peak of a scope, nested, and restores the outer peak") {
    SimulatedDevices gpus(1, 100 * MiB);
    Budget budget(gpus, 0, 100 * MiB);
    void* big = budget.allocate(50 * MiB);
    budget.deallocate(big, 50 * MiB);
    void* base = budget.allocate(10 * MiB);
    {
        PeakScope<SimulatedDevices> outer(budget);
        CHECK(outer.peak() == 10 * MiB);
        void* a = budget.allocate(20 * MiB);
        {
            PeakScope<SimulatedDevices> inner(budget);
            budget.deallocate(a, 20 * MiB);
            void* b = budget.allocate(5 * MiB);
            CHECK(inner.peak() == 30 * MiB);  // held when the inner scope began
            budget.deallocate(b, 5 * MiB);
        }
        CHECK(outer.peak() == 30 * MiB);
        CHECK(outer.peak_increase() == 20 * MiB);
    }
    CHECK(budget.peak() == 50 * MiB);
    budget.deallocate(base, 10 * MiB);
}

TEST_CASE("4 threads x 100000 random allocate/free pairs: the cap holds and all returns to 0") {
    constexpr std::size_t cap = 64 * 1024;
    SimulatedDevices gpus({{cap * 4}}, SimulatedMemory::phantom, /*track_pointers=*/false);
    Budget budget(gpus, 0, cap);
    std::atomic<bool> exceeded{false};
    std::atomic<std::size_t> denied{0};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937 rng(1234 + t);
            std::uniform_int_distribution<std::size_t> size(1, cap / 3);
            for (int i = 0; i < 100000; ++i) {
                std::size_t n = size(rng);
                void* p = nullptr;
                try {
                    p = budget.allocate(n);
                } catch (out_of_memory const&) {
                    denied.fetch_add(1);
                    continue;
                }
                if (budget.used() > cap || gpus.live_bytes(0) > cap) exceeded = true;
                budget.deallocate(p, n);
            }
        });
    }
    for (auto& th : threads) th.join();
    CHECK_FALSE(exceeded.load());
    CHECK(budget.peak() <= cap);
    CHECK(budget.used() == 0);
    CHECK(gpus.live_bytes() == 0);
    CHECK(gpus.live_allocations() == 0);
    CHECK(budget.allocations() + denied.load() == 400000);
    CHECK(budget.denials() == denied.load());
    MESSAGE("allocations " << budget.allocations() << ", denials " << budget.denials() << ", peak "
                           << budget.peak() << " of cap " << cap);
}

TEST_CASE("the peak counts only what the device accepted; an uncapped budget's OOM says what it holds") {
    SimulatedDevices gpus(1, 1024 * 1024);
    MemoryBudget<SimulatedDevices> b(gpus, 0, Limit::unlimited());
    void* p = b.allocate(768 * 1024);
    CHECK_THROWS_AS(b.allocate(512 * 1024), out_of_memory);  // the device refuses it
    CHECK(b.peak() == 768 * 1024);
    try {
        b.allocate(512 * 1024);
    } catch (out_of_memory const& e) {
        CHECK(std::string(e.what()).find("768.00 KiB already allocated through this budget") != std::string::npos);
    }
    b.deallocate(p, 768 * 1024);
}

TEST_CASE("giving back more than is held is counted and changes nothing") {
    SimulatedDevices gpus(1, 1 << 20);
    Budget b(gpus, 0, Limit::bytes(1 << 20));
    void* p = b.allocate(4096);
    b.release(8192);  // a double free, or memory from another budget
    CHECK(b.used() == 4096);
    CHECK(b.allocations() == 1);
    CHECK(b.accounting_errors() == 1);
    void* q = b.allocate(4096);  // and the budget still works
    b.deallocate(q, 4096);
    b.deallocate(p, 4096);
    CHECK(b.used() == 0);
    CHECK(b.accounting_errors() == 1);
}

TEST_CASE("set_limit from two threads while a third reads: the spec always matches the cap") {
    SimulatedDevices gpus(1, 1 << 30);
    Budget b(gpus, 0, Limit::bytes(1 << 20));
    std::atomic<bool> stop{false};
    std::atomic<int> mismatches{0};
    auto setter = [&](std::size_t bytes) {
        for (int i = 0; i < 2000; ++i) b.set_limit(Limit::bytes(bytes));
    };
    std::thread reader([&] {
        while (!stop.load()) {
            Limit spec = b.limit_spec();
            (void)spec;
        }
    });
    std::thread a(setter, std::size_t{1} << 20), c(setter, std::size_t{2} << 20);
    a.join();
    c.join();
    stop = true;
    reader.join();
    Limit spec = b.limit_spec();
    if (spec.resolve(0, 0) != b.limit()) ++mismatches;
    CHECK(mismatches.load() == 0);
}

TEST_CASE("stream-ordered: the largest request a budget can count is taken, one byte more is not") {
    // 2^48 - 512 rounds to itself, within the largest cap (2^48 - 1); one byte
    // more rounds to 2^48, which no budget counts: a typed refusal, not a wrap.
    std::size_t const top = Budget::max_limit / 512 * 512;
    SimulatedDevices sim({{std::size_t{1} << 50}}, SimulatedMemory::phantom, false);
    Budget budget(sim, 0);
    void* p = budget.allocate_async(top, 7);
    CHECK(budget.used() == top);
    budget.deallocate_async(p, top, 7);
    CHECK(budget.used() == 0);
    CHECK_THROWS_AS(budget.allocate_async(top + 1, 7), out_of_memory);
    CHECK(budget.denials() == 1);
    CHECK(budget.used() == 0);
}

TEST_CASE("stream-ordered allocation through a budget counts what the pool takes") {
    SimulatedDevices sim(1, 1 << 20);
    MemoryBudget<SimulatedDevices> budget(sim, 0, Limit::bytes(2048));
    void* a = budget.allocate_async(1, 7);  // one byte takes a 512-byte block
    CHECK(budget.used() == 512);
    CHECK(budget.async_bytes(1) == 512);
    CHECK(budget.async_bytes(513) == 1024);
    void* b = budget.allocate_async(1536, 7);
    CHECK(budget.used() == 2048);  // exactly at the cap
    try {
        (void)budget.allocate_async(1, 8);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::budget);
        CHECK(e.info().requested == 1);
    }
    budget.deallocate_async(b, 1536, 7);
    budget.deallocate_async(a, 1, 7);
    CHECK(budget.used() == 0);
    CHECK(budget.accounting_errors() == 0);
    CHECK(sim.pending_bytes(0) == 2048);
    // The device refuses while frees are pending on another stream: a device OOM, typed.
    MemoryBudget<SimulatedDevices> all(sim, 0);
    void* big = all.allocate_async((1 << 20) - 2048, 7);
    try {
        (void)all.allocate_async(4096, 8);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::device);
    }
    REQUIRE(sim.synchronize_stream(0, 7).ok());
    void* now_fits = all.allocate_async(2048, 8);
    all.deallocate_async(now_fits, 2048, 8);
    all.deallocate_async(big, (1 << 20) - 2048, 7);
    REQUIRE(sim.synchronize(0).ok());
    CHECK(sim.live_bytes() == 0);
    CHECK(all.used() == 0);
    {
        StreamBuffer buf(all, 1000, SimulatedDevices::stream_type{3});
        static_assert(std::is_same<decltype(buf), StreamBuffer<SimulatedDevices>>::value, "CTAD");
        CHECK(all.used() == 1024);
        CHECK(buf.stream() == 3);
    }
    CHECK(all.used() == 0);
    CHECK(sim.pending_bytes(0, 3) == 1024);  // freed on its stream
}
