#include <oomguard/cache_registry.hpp>
#include <oomguard/classify.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace oomguard;

namespace {
struct Pool {
    std::size_t cached;
    std::vector<std::string>* log;
    std::string name;
    std::size_t releasable_bytes() const { return cached; }
    std::size_t release() {
        log->push_back(name);
        std::size_t b = cached;
        cached = 0;
        return b;
    }
};
}  // namespace

TEST_CASE("releases run cheapest-first and report per-cache bytes") {
    CacheRegistry reg;
    std::vector<std::string> log;
    Pool kv{300, &log, "kv"}, work{100, &log, "workspace"}, act{200, &log, "activations"};
    auto a = reg.add("kv-cache", 10, kv);
    auto b = reg.add("workspace", 0, work);
    auto c = reg.add("activations", 5, act);
    auto d = reg.add("also-0", 0, [] { return std::size_t{7}; }, [&] {
        log.push_back("also-0");
        return std::size_t{7};
    });
    CHECK(reg.size() == 4);
    CHECK(reg.releasable_bytes() == 607);
    ReleaseReport r = reg.release_all();
    CHECK(log == std::vector<std::string>{"workspace", "also-0", "activations", "kv"});
    REQUIRE(r.caches.size() == 4);
    CHECK(r.caches[0].name == "workspace");
    CHECK(r.caches[0].bytes == 100);
    CHECK(r.caches[3].name == "kv-cache");
    CHECK(r.caches[3].bytes == 300);
    CHECK(r.bytes() == 607);
    CHECK(r.failures() == 0);
    CHECK(reg.releasable_bytes() == 7);
}

TEST_CASE("a throwing cache does not stop the others and its failure is reported") {
    CacheRegistry reg;
    std::vector<std::string> log;
    Pool p1{10, &log, "p1"}, p2{20, &log, "p2"};
    auto a = reg.add("p1", 0, p1);
    auto bad = reg.add("broken", 1, [] { return std::size_t{5}; },
                       []() -> std::size_t { throw std::runtime_error("driver said no"); });
    auto weird = reg.add("weird", 2, [] { return std::size_t{0}; }, []() -> std::size_t { throw 42; });
    auto b = reg.add("p2", 3, p2);
    ReleaseReport r = reg.release_all();
    REQUIRE(r.caches.size() == 4);
    CHECK(r.caches[1].failed);
    CHECK(r.caches[1].error == "driver said no");
    CHECK(r.caches[2].error == "unknown exception");
    CHECK(r.failures() == 2);
    CHECK(r.bytes() == 30);
    CHECK(log == std::vector<std::string>{"p1", "p2"});
    // The first failure, in the order the caches ran, rethrown as it was thrown.
    CHECK_THROWS_WITH_AS(r.rethrow_failure(), "driver said no", std::runtime_error);
    CHECK_THROWS_WITH_AS(r.rethrow_failure(&is_device_oom), "driver said no", std::runtime_error);  // no OOM
    r.caches[1].failed = false;
    CHECK_THROWS_AS(r.rethrow_failure(), int);
    r.caches[2].failed = false;
    CHECK_NOTHROW(r.rethrow_failure());
    // A cache that ran out of memory as it released: passed over when OOMs are absorbed.
    CacheRegistry oom_reg;
    auto starved = oom_reg.add("starved", 0, [] { return std::size_t{1}; },
                               []() -> std::size_t { throw out_of_memory(oom_info{}); });
    ReleaseReport o = oom_reg.release_all();
    CHECK(o.failures() == 1);
    CHECK_THROWS_AS(o.rethrow_failure(), out_of_memory);
    CHECK_NOTHROW(o.rethrow_failure(&is_device_oom));
}

TEST_CASE("RAII: a registration unregisters, and moves keep one owner") {
    CacheRegistry reg;
    std::vector<std::string> log;
    Pool p{1, &log, "p"};
    {
        auto r1 = reg.add("p", 0, p);
        CHECK(reg.size() == 1);
        CacheRegistration r2 = std::move(r1);
        CHECK_FALSE(r1);
        CHECK(reg.size() == 1);
    }
    CHECK(reg.size() == 0);
    CHECK(reg.release_all().caches.empty());
    CHECK_THROWS_AS((void)reg.add("", 0, p), std::invalid_argument);
}

TEST_CASE("names are 1 to 63 characters; a long error text is cut, not lost") {
    CacheRegistry reg;
    std::string const longest(CacheName::capacity, 'a');
    std::string const long_error(1000, 'e');
    auto ok = reg.add(longest, 0, [] { return std::size_t{0}; },
                      [&]() -> std::size_t { throw std::runtime_error(long_error); });
    CHECK_THROWS_WITH_AS((void)reg.add(longest + "b", 0, [] { return std::size_t{0}; },
                                       [] { return std::size_t{0}; }),
                         doctest::Contains("is 64 characters; give one of 1 to 63"), std::invalid_argument);
    CHECK(reg.size() == 1);
    ReleaseReport r = reg.release_all();
    REQUIRE(r.caches.size() == 1);
    CHECK(r.caches[0].name == longest);
    CHECK(r.caches[0].failed);
    CHECK(r.caches[0].error.size() == 255);
    CHECK(r.caches[0].error.view() == std::string(252, 'e') + "...");
}

TEST_CASE("a cache unregistered mid-release: a running one finishes first, a pending one is skipped") {
    CacheRegistry reg;
    std::atomic<bool> first_started{false}, go_on{false}, second_ran{false};
    std::atomic<bool> first_finished{false};
    auto first = reg.add("first", 0, [] { return std::size_t{1}; }, [&] {
        first_started = true;
        while (!go_on) std::this_thread::yield();
        first_finished = true;
        return std::size_t{1};
    });
    auto second = std::make_unique<CacheRegistration>(reg.add("second", 1, [] { return std::size_t{2}; }, [&] {
        second_ran = true;
        return std::size_t{2};
    }));
    ReleaseReport report;
    std::thread releaser([&] { report = reg.release_all(); });
    while (!first_started) std::this_thread::yield();
    second.reset();  // not started yet: skipped
    std::atomic<bool> unregistered{false};
    std::thread unregister_first([&] {
        first.reset();  // running: waits for it
        unregistered = true;
    });
    for (int i = 0; i < 1000; ++i) std::this_thread::yield();
    CHECK_FALSE(unregistered.load());
    go_on = true;
    unregister_first.join();
    releaser.join();
    CHECK(first_finished.load());
    CHECK(unregistered.load());
    CHECK_FALSE(second_ran.load());
    REQUIRE(report.caches.size() == 1);
    CHECK(report.caches[0].name == "first");
    CHECK(reg.size() == 0);
}

TEST_CASE("4 threads registering, unregistering and releasing") {
    CacheRegistry reg;
    std::atomic<std::size_t> released{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t) {
        ts.emplace_back([&, t] {
            for (int i = 0; i < 2000; ++i) {
                auto r = reg.add("c" + std::to_string(t), i % 3, [] { return std::size_t{1}; }, [&] {
                    released.fetch_add(1);
                    return std::size_t{1};
                });
                if (i % 2 == 0) {
                    ReleaseReport rep = reg.release_all();
                    CHECK(rep.bytes() <= rep.caches.size());  // a cache another thread releases counts 0
                }
                (void)reg.releasable_bytes();
            }
        });
    }
    for (auto& th : ts) th.join();
    CHECK(reg.size() == 0);
    CHECK(released.load() > 0);
}

TEST_CASE("a registration that outlives its registry is inert: no use after free") {
    std::vector<std::string> log;
    Pool p{5, &log, "p"};
    // Declared before its registry, so destroyed after it (a member order, a
    // local registry in a test).
    CacheRegistration outlives;
    std::size_t destroyed = 0;
    struct Counted {
        std::size_t* destroyed;
        Counted(std::size_t* d) : destroyed(d) {}
        Counted(Counted&& o) noexcept : destroyed(o.destroyed) { o.destroyed = nullptr; }
        ~Counted() {
            if (destroyed != nullptr) ++*destroyed;
        }
        std::size_t operator()() const { return 1; }
    };
    CacheRegistration owned;
    {
        CacheRegistry reg;
        outlives = reg.add("p", 0, p);
        owned = reg.add("owned", 1, Counted(&destroyed), [] { return std::size_t{1}; });
        CHECK(outlives);
        CHECK(owned);
        CHECK(destroyed == 0);
    }
    // The registry let go of both caches (and destroyed the callables it owned).
    CHECK(destroyed == 1);
    CHECK_FALSE(outlives);
    CHECK_FALSE(owned);
    outlives.reset();
    CHECK_FALSE(outlives);
    CacheRegistration moved = std::move(owned);
    CHECK_FALSE(moved);
    // And a registry declared after its registrations in one scope: the registry
    // dies first, then the registration.
    {
        CacheRegistration r;
        CacheRegistry reg;
        r = reg.add("p", 0, p);
        CHECK(reg.size() == 1);
    }
    CHECK(log.empty());
}

TEST_CASE("a registration destroyed while its registry is destroyed on another thread") {
    std::vector<std::string> log;
    Pool p{5, &log, "p"};
    for (int i = 0; i < 200; ++i) {
        auto reg = std::make_unique<CacheRegistry>();
        auto r = reg->add("p", 0, p);
        std::thread t([&] { r.reset(); });
        reg.reset();
        t.join();
        CHECK_FALSE(r);
    }
}

namespace {
// A cache that is not thread-safe, as most are (a workspace, a Thrust pool):
// plain members, and a check that nobody else is inside release() with it.
struct Unsafe {
    std::size_t cached = 1000;
    std::size_t releases = 0;         // plain: TSan sees two releases at once
    std::atomic<int> inside{0};
    std::atomic<bool> overlapped{false};
    std::atomic<bool> entered{false};
    std::atomic<bool> gate{true};     // release() waits here while false
    std::chrono::milliseconds linger{0};  // and stays this long, for others to run into it
    std::size_t releasable_bytes() const { return cached; }
    std::size_t release() {
        if (inside.fetch_add(1) != 0) overlapped = true;
        entered = true;
        auto const until = std::chrono::steady_clock::now() + linger;
        while (!gate || std::chrono::steady_clock::now() < until) std::this_thread::yield();
        ++releases;
        std::size_t b = cached;
        cached = 0;
        inside.fetch_sub(1);
        return b;
    }
};
}  // namespace

TEST_CASE("one release() of a cache at a time: a second caller waits for it and counts nothing") {
    CacheRegistry reg;
    Unsafe ws;
    ws.gate = false;
    auto r = reg.add("workspace", 0, ws);
    ReleaseReport first, second;
    std::thread t1([&] { first = reg.release_all(); });
    while (!ws.entered) std::this_thread::yield();
    std::atomic<bool> second_done{false};
    std::thread t2([&] {
        second = reg.release_all();
        second_done = true;
    });
    for (int i = 0; i < 2000; ++i) std::this_thread::yield();
    CHECK_FALSE(second_done.load());  // it waits for the release in progress
    ws.gate = true;
    t1.join();
    t2.join();
    CHECK_FALSE(ws.overlapped.load());
    CHECK(ws.releases == 1);  // not run again
    CHECK(first.bytes() == 1000);
    REQUIRE(first.caches.size() == 1);
    CHECK_FALSE(first.caches[0].concurrent);
    REQUIRE(second.caches.size() == 1);
    CHECK(second.caches[0].concurrent);
    CHECK(second.caches[0].bytes == 0);
    CHECK_FALSE(second.caches[0].failed);
    CHECK(second.bytes() == 0);
    // Ended: the next release runs it again.
    ws.cached = 10;
    ReleaseReport third = reg.release_all();
    CHECK(third.bytes() == 10);
    CHECK_FALSE(third.caches[0].concurrent);
}

TEST_CASE("an estimate does not wait for a release in progress: that cache counts 0") {
    CacheRegistry reg;
    Unsafe ws;
    ws.gate = false;
    auto r = reg.add("workspace", 0, ws);
    auto other = reg.add("other", 1, [] { return std::size_t{7}; }, [] { return std::size_t{7}; });
    CHECK(reg.releasable_bytes() == 1007);
    std::thread t([&] { (void)reg.release_all(); });
    while (!ws.entered) std::this_thread::yield();
    CHECK(reg.releasable_bytes() == 7);  // returns while the release still runs
    ws.gate = true;
    t.join();
    CHECK(reg.releasable_bytes() == 7);
}

TEST_CASE("ranks releasing together never enter one cache's release() twice at once") {
    CacheRegistry reg;
    Unsafe ws;
    ws.linger = std::chrono::milliseconds(2);
    auto r = reg.add("workspace", 0, ws);
    std::atomic<int> ready{0};
    std::atomic<std::size_t> freed{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t)
        ts.emplace_back([&] {
            ++ready;
            while (ready < 4) std::this_thread::yield();
            for (int i = 0; i < 20; ++i) freed += reg.release_all().bytes();
        });
    for (auto& th : ts) th.join();
    CHECK_FALSE(ws.overlapped.load());
    CHECK(freed.load() == 1000);  // counted once, by the release that freed it
    CHECK(ws.releases >= 1);
}

TEST_CASE("a release that releases the registry again does not deadlock, on one thread or two") {
    SUBCASE("on one thread: the nested call skips the cache whose release runs it") {
        CacheRegistry reg;
        ReleaseReport nested;
        std::size_t nested_estimate = 0;
        auto outer = reg.add("outer", 0, [] { return std::size_t{100}; }, [&] {
            nested = reg.release_all();
            nested_estimate = reg.releasable_bytes();
            return std::size_t{100};
        });
        auto plain = reg.add("plain", 1, [] { return std::size_t{5}; }, [] { return std::size_t{5}; });
        ReleaseReport r = reg.release_all();
        REQUIRE(nested.caches.size() == 2);
        CHECK(nested.caches[0].name == "outer");
        CHECK(nested.caches[0].concurrent);
        CHECK(nested.caches[1].bytes == 5);
        CHECK(nested_estimate == 5);
        REQUIRE(r.caches.size() == 2);
        CHECK(r.caches[0].bytes == 100);
        CHECK(r.caches[1].bytes == 5);
    }
    SUBCASE("on two threads, each inside a cache the other's nested call meets") {
        CacheRegistry reg;
        std::atomic<int> inside{0};
        ReleaseReport nested_a, nested_b;
        auto both_inside = [&] {
            ++inside;
            while (inside < 2) std::this_thread::yield();
        };
        auto a = reg.add("a", 0, [] { return std::size_t{1}; }, [&] {
            both_inside();
            nested_a = reg.release_all();
            return std::size_t{1};
        });
        auto b = reg.add("b", 1, [] { return std::size_t{2}; }, [&] {
            both_inside();
            nested_b = reg.release_all();
            return std::size_t{2};
        });
        // Thread 1 enters a (then would go on to b), thread 2 starts at b: a
        // registry of its own order, so it takes b while thread 1 holds a.
        CacheRegistry only_b;
        auto b2 = only_b.add("b-first", 0, [] { return std::size_t{0}; }, [&] { return reg.release_all().bytes(); });
        std::thread t1([&] { (void)reg.release_all(); });
        while (inside < 1) std::this_thread::yield();
        std::thread t2([&] { (void)only_b.release_all(); });
        t1.join();
        t2.join();
        // Each nested call found the other thread's cache busy and did not wait.
        REQUIRE(nested_a.caches.size() == 2);
        REQUIRE(nested_b.caches.size() == 2);
        CHECK(nested_a.caches[0].concurrent);  // a: its own
        CHECK(nested_b.caches[1].concurrent);  // b: its own
        CHECK((nested_a.caches[1].concurrent || nested_b.caches[0].concurrent));
    }
}

namespace {
CacheRegistry* g_estimating_registry = nullptr;
// A cache whose estimate asks a worker thread for the registry's estimate and joins it.
struct EstimateThroughAWorker {
    std::size_t releasable_bytes() {
        std::size_t seen = 0;
        std::thread worker([&] { seen = g_estimating_registry->releasable_bytes(); });
        worker.join();
        return 1 + seen;  // the worker counted this cache, busy here, as 0
    }
    std::size_t release() { return 1; }
};
}  // namespace

TEST_CASE("an estimate never waits: a cache's estimate that joins a thread estimating the registry ends") {
    CacheRegistry reg;
    g_estimating_registry = &reg;
    EstimateThroughAWorker cache;
    CacheRegistration r = reg.add("estimate via worker", 0, cache);
    auto done = std::async(std::launch::async, [&] { return reg.releasable_bytes(); });
    if (done.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
        std::fprintf(stderr, "test_cache_registry: the estimate waited on itself through its worker\n");
        std::_Exit(3);  // a hang fails the test rather than the whole ctest timeout
    }
    CHECK(done.get() == 1);
    g_estimating_registry = nullptr;
}
