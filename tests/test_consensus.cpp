// Data-parallel recovery with threads as ranks (ThreadConsensus): every rank
// runs the same micro-batch sizes, a step's own collectives after
// MicroBatch::sync() never pair with the wrong one, and when one rank gives up
// or its recovery throws, every rank leaves together. A hang fails the test:
// each scenario runs under a watchdog that ends the process.
#include <oomguard/adaptive_batch.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/plan_cache.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/thread_consensus.hpp>

#include <doctest/doctest.h>

#include "policies.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;
using Buffer = DeviceBuffer<SimulatedDevices>;
constexpr std::size_t KiB = 1024;

namespace {

// Runs body(rank) on `n` threads; if they have not all ended within `seconds`,
// a rank is hung: report it and end the process (the test fails, never hangs).
void run_ranks(int n, std::function<void(int)> const& body, int seconds = 120) {
    std::mutex m;
    std::condition_variable cv;
    int finished = 0;
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r)
        threads.emplace_back([&, r] {
            body(r);
            std::lock_guard<std::mutex> lock(m);
            ++finished;
            cv.notify_all();
        });
    {
        std::unique_lock<std::mutex> lock(m);
        if (!cv.wait_for(lock, std::chrono::seconds(seconds), [&] { return finished == n; })) {
            std::fprintf(stderr, "test_consensus: %d of %d ranks still running after %d s: a rank is hung\n",
                         n - finished, n, seconds);
            std::fflush(stderr);
            std::_Exit(3);
        }
    }
    for (auto& t : threads) t.join();
}

// What each rank saw: every step() call, and how run() ended.
struct Call {
    std::size_t offset, size, precision;
    bool calibration;
    bool operator==(Call const& o) const {
        return offset == o.offset && size == o.size && precision == o.precision && calibration == o.calibration;
    }
};
struct RankLog {
    std::vector<Call> calls;
    std::vector<std::string> outcomes;  // "commit" or the exception's type, per run()
    std::size_t commits = 0, rollbacks = 0, ooms = 0;
    Plan plan;
};

// A data-parallel step: allocate the activations, reach the sync point, then
// the gradient all-reduce every DDP step makes. The all-reduce carries the
// micro-batch's offset and size: a rank at a different micro-batch would be
// caught here, not only by a hang.
struct DataParallel {
    int ranks;
    ThreadConsensus group, gradients;
    explicit DataParallel(int n) : ranks(n), group(n), gradients(n) {}

    void step(Budget& budget, MicroBatch const& mb, std::size_t fixed, std::size_t per_sample, RankLog& log) {
        log.calls.push_back(Call{mb.offset, mb.size, static_cast<std::size_t>(mb.precision), mb.calibration});
        Buffer act(budget, fixed + per_sample * mb.size * bytes_per_element(mb.precision) / 4);
        mb.sync();
        std::uint64_t v[4] = {mb.offset, ~std::uint64_t{mb.offset}, mb.size, ~std::uint64_t{mb.size}};
        gradients.all_min(v, 4);
        if (v[0] != ~v[1] || v[2] != ~v[3])
            throw std::logic_error("an in-step all-reduce paired ranks at different micro-batches");
    }
};

using test_support::every_policy;

char const* outcome_of(std::exception_ptr const& e) {
    if (!e) return "none";
    try {
        std::rethrow_exception(e);
    } catch (recovery_failed const&) {
        return "recovery_failed";
    } catch (std::logic_error const&) {
        return "logic_error";
    } catch (std::exception const&) {
        return "other";
    }
}

}  // namespace

TEST_CASE("threads as ranks, every policy: the same step() sizes on every rank, grow-back on, faults on one rank") {
    for (ShrinkPolicy policy : every_policy()) {
        CAPTURE(std::string(policy.name()));
        DataParallel dp(2);
        RankLog logs[2];
        run_ranks(2, [&](int r) {
            // Rank 1 has less memory, another process comes and goes, and random faults.
            SimulatedDevices gpus(1, r == 0 ? 4096 * KiB : 1400 * KiB);
            if (r == 1) {
                FaultPlan f;
                f.probability = 0.03;
                f.seed = 7;
                gpus.set_faults(0, f);
            }
            Budget budget(gpus, 0, Limit::unlimited());
            BatchOptions o;
            o.global_batch = 100;
            o.grow_after = 1;
            o.max_attempts = 1000;
            o.precisions = {Precision::fp32, Precision::bf16};
            o.policy = policy;
            AdaptiveBatch a(o);
            a.measure_with(budget);
            a.consensus(dp.group.hook());
            for (int batch = 0; batch < 24; ++batch) {
                if (r == 1) gpus.set_used_by_others(0, batch % 8 < 4 ? 0 : 600 * KiB);
                a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 64 * KiB, 12 * KiB, logs[r]); },
                      [&] { ++logs[r].commits; }, [&] { ++logs[r].rollbacks; });
            }
            logs[r].ooms = a.counters().ooms;
            logs[r].plan = a.plan();
            CHECK(gpus.live_bytes() == 0);
        });
        CHECK(logs[0].commits == 24);
        CHECK(logs[1].commits == 24);
        CHECK(logs[0].rollbacks == logs[1].rollbacks);
        CHECK(logs[0].ooms == 0);  // rank 0 never runs out itself
        CHECK(logs[1].ooms > 0);
        CHECK(logs[0].plan == logs[1].plan);
        REQUIRE(logs[0].calls.size() == logs[1].calls.size());
        CHECK(logs[0].calls == logs[1].calls);
        MESSAGE(std::string(policy.name()) << ": " << logs[0].calls.size() << " step calls on each rank, "
                              << logs[1].ooms << " OOMs on rank 1, plan m=" << logs[0].plan.micro_batch);
    }
}

TEST_CASE("a grow-back that fails on one rank moves every rank back (G=100, grow_after=1)") {
    DataParallel dp(2);
    RankLog logs[2];
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, r == 0 ? 4096 * KiB : 1024 * KiB);  // rank 1 fits 60, rank 0 everything
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 100;
        o.grow_after = 1;
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        for (int batch = 0; batch < 8; ++batch)
            a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 64 * KiB, 16 * KiB, logs[r]); },
                  [&] { ++logs[r].commits; }, [] {});
        logs[r].plan = a.plan();
    });
    CHECK(logs[0].calls == logs[1].calls);
    CHECK(logs[0].plan == logs[1].plan);
    CHECK(logs[0].commits == 8);
}

TEST_CASE("give-up on one rank: every rank throws recovery_failed together, each back at its last good plan") {
    for (ShrinkPolicy policy : every_policy()) {
        CAPTURE(std::string(policy.name()));
        DataParallel dp(3);
        std::exception_ptr errors[3];
        Plan plans[3], good[3];
        RankLog logs[3];
        run_ranks(3, [&](int r) {
            SimulatedDevices gpus(1, r == 2 ? 100 * KiB : 4096 * KiB);
            Budget budget(gpus, 0, Limit::unlimited());
            BatchOptions o;
            o.global_batch = 64;
            o.min_micro_batch = 8;
            o.policy = policy;
            AdaptiveBatch a(o);
            a.measure_with(budget);
            a.consensus(dp.group.hook());
            try {
                // A first batch that fits everywhere, then rank 2's neighbour moves in.
                a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 0, KiB, logs[r]); }, [] {}, [] {});
                if (r == 2) gpus.set_used_by_others(0, 90 * KiB);
                a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 0, 8 * KiB, logs[r]); }, [] {}, [] {});
            } catch (...) {
                errors[r] = std::current_exception();
            }
            plans[r] = a.plan();
            good[r] = a.last_good_plan();
        });
        for (int r = 0; r < 3; ++r) {
            CAPTURE(r);
            REQUIRE(errors[r] != nullptr);
            CHECK(std::string(outcome_of(errors[r])) == "recovery_failed");
            CHECK(plans[r] == good[r]);
            CHECK(plans[r].micro_batch == 64);
        }
        CHECK(logs[0].calls == logs[2].calls);
        CHECK(logs[1].calls == logs[2].calls);
    }
}

TEST_CASE("a rollback that throws on one rank: that rank rethrows it, the others give up, nobody waits") {
    DataParallel dp(2);
    std::exception_ptr errors[2];
    RankLog logs[2];
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, r == 0 ? 4096 * KiB : 512 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 64;
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        try {
            a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 0, 16 * KiB, logs[r]); }, [] {},
                  [&] {
                      if (r == 0) throw std::runtime_error("rollback failed on rank 0");
                  });
        } catch (...) {
            errors[r] = std::current_exception();
        }
    });
    REQUIRE(errors[0] != nullptr);
    REQUIRE(errors[1] != nullptr);
    CHECK(std::string(outcome_of(errors[0])) == "other");
    CHECK(std::string(outcome_of(errors[1])) == "recovery_failed");
    try {
        std::rethrow_exception(errors[1]);
    } catch (recovery_failed const& e) {
        CHECK(std::string(e.what()).find("another rank's recovery failed") != std::string::npos);
    }
}

TEST_CASE("a custom policy or a failover hook that throws on one rank ends every rank together") {
    DataParallel dp(2);
    std::exception_ptr errors[2];
    RankLog logs[2];
    static int const ranks[2] = {0, 1};
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 256 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 64;
        o.policy = ShrinkPolicy::custom(
            [](ShrinkContext const& c, void* user) -> std::size_t {
                if (*static_cast<int const*>(user) == 1) throw std::runtime_error("policy bug on rank 1");
                return c.failed / 2;
            },
            const_cast<int*>(&ranks[r]), "flaky");
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        try {
            a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 0, 16 * KiB, logs[r]); }, [] {}, [] {});
        } catch (...) {
            errors[r] = std::current_exception();
        }
    });
    CHECK(std::string(outcome_of(errors[0])) == "recovery_failed");
    CHECK(std::string(outcome_of(errors[1])) == "other");

    // A failover hook that finds another device on rank 0 only: nobody moves, both give up.
    DataParallel dp2(2);
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus({{64 * KiB}, {4096 * KiB}});
        Budget b0(gpus, 0, Limit::unlimited()), b1(gpus, 1, Limit::unlimited());
        Budget* budgets[] = {&b0, &b1};
        BatchOptions o;
        o.global_batch = 32;
        o.min_micro_batch = 16;
        AdaptiveBatch a(o);
        a.consensus(dp2.group.hook());
        a.failover([](void* user, FailoverRequest const&) { return *static_cast<int const*>(user) == 0 ? 1 : -1; },
                   const_cast<int*>(&ranks[r]));
        try {
            a.run([&](MicroBatch const& mb) { dp2.step(*budgets[mb.device], mb, 0, 8 * KiB, logs[r]); }, [] {}, [] {});
            errors[r] = nullptr;
        } catch (...) {
            errors[r] = std::current_exception();
        }
        CHECK(a.plan().device == 0);
        CHECK(a.counters().failovers == 0);
    });
    CHECK(std::string(outcome_of(errors[0])) == "recovery_failed");
    CHECK(std::string(outcome_of(errors[1])) == "recovery_failed");
}

TEST_CASE("an OOM in commit: on every rank it is retried together; on some ranks only, all give up together") {
    for (bool everywhere : {true, false}) {
        CAPTURE(everywhere);
        DataParallel dp(2);
        std::exception_ptr errors[2];
        RankLog logs[2];
        run_ranks(2, [&](int r) {
            SimulatedDevices gpus(1, 4096 * KiB);
            Budget budget(gpus, 0, Limit::unlimited());
            BatchOptions o;
            o.global_batch = 16;
            AdaptiveBatch a(o);
            a.consensus(dp.group.hook());
            void* state = nullptr;
            bool first = true;
            try {
                a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 0, KiB, logs[r]); },
                      [&] {
                          if (first && (everywhere || r == 1)) {
                              first = false;
                              gpus.fail_next(0, 1);
                          }
                          if (state == nullptr) state = budget.allocate(64 * KiB);  // Adam's state, on its first step
                          ++logs[r].commits;
                      },
                      [&] { ++logs[r].rollbacks; });
            } catch (...) {
                errors[r] = std::current_exception();
            }
            if (state != nullptr) budget.deallocate(state, 64 * KiB);
            logs[r].ooms = a.counters().commit_ooms;
        });
        if (everywhere) {
            CHECK(errors[0] == nullptr);
            CHECK(errors[1] == nullptr);
            CHECK(logs[0].commits == 1);
            CHECK(logs[0].rollbacks == 1);
            CHECK(logs[0].calls.size() == 2);  // the global batch ran twice
        } else {
            CHECK(std::string(outcome_of(errors[0])) == "recovery_failed");
            CHECK(std::string(outcome_of(errors[1])) == "recovery_failed");
            CHECK(logs[0].rollbacks == 0);  // rank 0 applied its commit: nothing to undo
            CHECK(logs[1].rollbacks == 1);  // rank 1's commit failed: its accumulation is undone
            CHECK(logs[1].ooms == 1);
        }
        CHECK(logs[0].calls == logs[1].calls);
    }
}

TEST_CASE("ranks that call sync() at different points fail together with a logic_error, not a hang") {
    DataParallel dp(2);
    std::exception_ptr errors[2];
    run_ranks(2, [&](int r) {
        BatchOptions o;
        o.global_batch = 8;
        o.micro_batch = 4;
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        try {
            a.run([&](MicroBatch const& mb) {
                mb.sync();
                if (r == 0) mb.sync();  // rank 0 has one collective more per micro-batch
            }, [] {}, [] {});
        } catch (...) {
            errors[r] = std::current_exception();
        }
    });
    CHECK(std::string(outcome_of(errors[0])) == "logic_error");
    CHECK(std::string(outcome_of(errors[1])) == "logic_error");

    // Rank 1 never calls sync(): it ends its step while rank 0 waits at one.
    DataParallel dp2(2);
    run_ranks(2, [&](int r) {
        BatchOptions o;
        o.global_batch = 4;
        AdaptiveBatch a(o);
        a.consensus(dp2.group.hook());
        errors[r] = nullptr;
        try {
            a.run([&](MicroBatch const& mb) {
                if (r == 0) mb.sync();
            }, [] {}, [] {});
        } catch (...) {
            errors[r] = std::current_exception();
        }
        CHECK(a.counters().global_batches == 0);
    });
    CHECK(std::string(outcome_of(errors[0])) == "logic_error");
    CHECK(std::string(outcome_of(errors[1])) == "logic_error");
}

TEST_CASE("without a consensus hook sync() does nothing; outside its step it is a logic_error") {
    BatchOptions o;
    o.global_batch = 4;
    AdaptiveBatch a(o);
    MicroBatch kept;
    int n = 0;
    a.run([&](MicroBatch const& mb) {
        mb.sync();
        ++n;
        kept = mb;
    }, [] {}, [] {});
    CHECK(n == 1);
    CHECK_THROWS_WITH_AS(kept.sync(), doctest::Contains("outside the step"), std::logic_error);
    MicroBatch plain;  // not from a runner: no hook
    CHECK_NOTHROW(plain.sync());
}

TEST_CASE("a rank that fails in the calibration micro-batch does not lend its need to another's failure") {
    // Each rank fits 6 samples of 1 KiB. After 64 fails (needing at least 7 KiB
    // where 6 were available), predictive calibrates at 6 (twice) then 13 (a
    // quarter of what that bound allows, 64 * 6 / (4 * 7)); rank 0 meets a fault
    // at the first buffer of the calibration micro-batch (6 needed at least
    // 1 KiB), rank 1 runs out at 13 (7 KiB). The agreed observation must say
    // "6 failed, needing 1 KiB", not pair 6 with rank 1's 7 KiB.
    DataParallel dp(2);
    Observation seen[2];
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 6 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 64;
        o.policy = ShrinkPolicy::predictive(0.0);
        AdaptiveBatch a(o);
        a.measure_with(budget);
        a.consensus(dp.group.hook());
        auto watching = a.observe([&a, &seen, r](BatchEvent const& e) {
            bool decided = e.kind == BatchEventKind::shrink || e.kind == BatchEventKind::retry_same;
            if (decided && e.attempt == 2) seen[r] = a.last_observation();
        });
        bool injected = false;
        a.run(
            [&](MicroBatch const& mb) {
                if (r == 0 && mb.calibration && !injected) {
                    injected = true;
                    gpus.fail_next(0, 1);
                }
                std::vector<Buffer> act;  // a buffer a sample: the failed request says little
                act.reserve(mb.size);
                for (std::size_t i = 0; i < mb.size; ++i) act.emplace_back(budget, KiB);
                if (mb.offset + mb.size == o.global_batch) mb.sync();  // no_sync micro-batches, one sync at the end
            },
            [] {}, [] {});
    });
    for (Observation const& o : seen) {
        CHECK(o.outcome == Observation::Outcome::step_oom);
        CHECK(o.failed_size == 6);
        CHECK(o.need == KiB);  // rank 0's fault hit the first sample's buffer: held 0, asked 1 KiB
    }
}

TEST_CASE("a step that swallows peer_out_of_memory cannot hide a protocol error or its own OOM") {
    // Rank 1 never calls sync(); rank 0 catches what its sync() throws and goes on.
    DataParallel dp(2);
    std::exception_ptr errors[2];
    run_ranks(2, [&](int r) {
        BatchOptions o;
        o.global_batch = 4;
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        try {
            a.run([&](MicroBatch const& mb) {
                if (r == 0) try {
                        mb.sync();
                    } catch (std::bad_alloc const&) {
                    }
            }, [] {}, [] {});
        } catch (...) {
            errors[r] = std::current_exception();
        }
    });
    CHECK(std::string(outcome_of(errors[0])) == "logic_error");
    CHECK(std::string(outcome_of(errors[1])) == "logic_error");

    // Rank 1 runs out of memory; rank 0 swallows the peer OOM, then runs out itself.
    DataParallel dp2(2);
    std::size_t ooms[2] = {0, 0}, aborts[2] = {0, 0};
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 4096 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 8;
        o.micro_batch = 4;
        AdaptiveBatch a(o);
        a.consensus(dp2.group.hook());
        bool failed_once = false;
        a.run([&](MicroBatch const& mb) {
            if (!failed_once && (r == 1 || mb.offset == 4)) {
                failed_once = true;
                gpus.fail_next(0, 1);
            }
            Buffer act(budget, KiB);
            try {
                mb.sync();
            } catch (peer_out_of_memory const&) {  // wrong, but it must not go unnoticed
            }
        }, [] {}, [] {});
        ooms[r] = a.counters().ooms;
        aborts[r] = a.counters().peer_aborts;
    });
    CHECK(ooms[0] == 1);  // its own OOM counts as one, with its release and its figures
    CHECK(aborts[0] == 0);
    CHECK(ooms[1] == 1);
}

TEST_CASE("ranks that fail in the same attempt release a shared cache once at a time, not all at once") {
    // Every rank runs out of memory in the same attempt and releases the same
    // registry; a workspace cache that is not thread-safe must see one release
    // at a time (TSan watches its plain members too).
    struct Workspace {
        std::size_t cached = 0, releases = 0;
        std::atomic<int> inside{0};
        std::atomic<bool> overlapped{false};
        std::size_t releasable_bytes() const { return cached; }
        std::size_t release() {
            if (inside.fetch_add(1) != 0) overlapped = true;
            auto const until = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
            while (std::chrono::steady_clock::now() < until) std::this_thread::yield();  // others run into it
            ++releases;
            std::size_t b = cached;
            cached = 0;
            inside.fetch_sub(1);
            return b;
        }
    } ws;
    CacheRegistry caches;
    auto registration = caches.add("workspace", 0, ws);
    int const n = 4;
    ThreadConsensus group(n);
    std::size_t freed[n] = {};
    run_ranks(n, [&](int r) {
        BatchOptions o;
        o.global_batch = 16;
        o.micro_batch = 16;
        o.caches = &caches;
        AdaptiveBatch a(o);
        a.consensus(group.hook());
        a.run([&](MicroBatch const& mb) {
            if (mb.size > 4) throw out_of_memory(oom_info{});  // every rank, every attempt above 4
            mb.sync();
        }, [] {}, [] {});
        freed[r] = a.counters().releases;
    });
    CHECK_FALSE(ws.overlapped.load());
    for (std::size_t f : freed) CHECK(f >= 1);
    CHECK(ws.releases >= 1);
}

TEST_CASE("run() from inside its own step is a logic_error") {
    BatchOptions o;
    o.global_batch = 4;
    AdaptiveBatch a(o);
    bool nested_threw = false;
    a.run([&](MicroBatch const&) {
        try {
            a.run([](MicroBatch const&) {}, [] {}, [] {});
        } catch (std::logic_error const& e) {
            nested_threw = std::string(e.what()).find("inside its own step") != std::string::npos;
        }
    }, [] {}, [] {});
    CHECK(nested_threw);
    CHECK(a.counters().global_batches == 1);
}

TEST_CASE("resume under consensus: every rank keeps the same micro-batches; without a sync in each, it fails together") {
    for (ShrinkPolicy policy : every_policy()) {
        CAPTURE(std::string(policy.name()));
        DataParallel dp(2);
        RankLog logs[2];
        run_ranks(2, [&](int r) {
            SimulatedDevices gpus(1, r == 0 ? 4096 * KiB : 1400 * KiB);
            if (r == 1) {
                FaultPlan f;
                f.probability = 0.05;
                f.seed = 3;
                gpus.set_faults(0, f);
            }
            Budget budget(gpus, 0, Limit::unlimited());
            BatchOptions o;
            o.global_batch = 100;
            o.micro_batch = 10;
            o.resume = true;
            o.max_attempts = 1000;
            o.policy = policy;
            AdaptiveBatch a(o);
            a.measure_with(budget);
            a.consensus(dp.group.hook());
            for (int batch = 0; batch < 12; ++batch)
                a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 64 * KiB, 12 * KiB, logs[r]); },
                      [&] { ++logs[r].commits; }, [&] { ++logs[r].rollbacks; });
            logs[r].ooms = a.counters().ooms;
        });
        CHECK(logs[0].commits == 12);
        CHECK(logs[1].commits == 12);
        CHECK(logs[0].rollbacks == 0);
        CHECK(logs[1].rollbacks == 0);
        CHECK(logs[1].ooms > 0);
        CHECK(logs[0].calls == logs[1].calls);
    }

    // Resume with no sync point: rank 1 fails in micro-batch 2 while rank 0 runs on.
    DataParallel dp(2);
    std::exception_ptr errors[2];
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 4096 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 32;
        o.micro_batch = 8;
        o.resume = true;
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        try {
            a.run(
                [&](MicroBatch const& mb) {
                    if (r == 1 && mb.offset == 16) gpus.fail_next(0, 1);
                    Buffer act(budget, KiB);
                },
                [] {}, [] {});
        } catch (...) {
            errors[r] = std::current_exception();
        }
    });
    CHECK(std::string(outcome_of(errors[0])) == "logic_error");
    CHECK(std::string(outcome_of(errors[1])) == "logic_error");
}

TEST_CASE("a commit that adds state on one rank only: every rank plans the next batch over the most any added") {
    // The sharded optimizer state lives on rank 0 (100 KiB from the first
    // commit); rank 1's commit adds nothing. Both plan 78 after it, over
    // rank 0's growth: (980 - 100 - 100) / 10 -- and run the same sizes.
    DataParallel dp(2);
    RankLog logs[2];
    std::size_t plans[2][3] = {};
    std::size_t ooms[2] = {};
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 1000 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 256;
        o.policy = ShrinkPolicy::predictive(0.02);
        AdaptiveBatch a(o);
        a.measure_with(budget);
        a.consensus(dp.group.hook());
        std::vector<Buffer> state;
        for (int b = 0; b < 3; ++b) {
            a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 100 * KiB, 10 * KiB, logs[r]); },
                  [&] {
                      if (r == 0 && state.empty()) state.emplace_back(budget, 100 * KiB);
                  },
                  [] {});
            plans[r][b] = a.last_good_plan().micro_batch;
        }
        ooms[r] = a.counters().ooms;
    });
    CHECK(logs[0].calls == logs[1].calls);
    for (int r = 0; r < 2; ++r) {
        CAPTURE(r);
        CHECK(plans[r][0] == 81);
        CHECK(plans[r][1] == 78);
        CHECK(plans[r][2] == 78);
    }
    CHECK(ooms[0] == 1);  // the first only
}

// docs/data_parallel.md quotes the ballot's size (48 integers, 384 bytes per round).
static_assert(detail::Ballot::count == 48, "update the consensus cost in docs/data_parallel.md");

TEST_CASE("a short remainder's failure on one rank does not hide another rank's full-size failure") {
    // G = 10 at m = 8: micro-batches of 8 and 2. Rank 1 fails in its first (8,
    // full size), rank 0 in its last (2, a short remainder). Both planned 8: the
    // agreed failure is a full-size one, whose bound and transient rules apply.
    DataParallel dp(2);
    Observation seen[2];
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 64 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 10;
        o.micro_batch = 8;
        AdaptiveBatch a(o);
        a.measure_with(budget);
        a.consensus(dp.group.hook());
        int calls = 0;
        a.run(
            [&](MicroBatch const& mb) {
                ++calls;
                if (calls == 3) seen[r] = a.last_observation();  // the retry's first micro-batch
                bool const fail = (r == 1 && calls == 1) || (r == 0 && calls == 2);
                // The remainder holds a large temporary first: its need is large, and says nothing of 8.
                Buffer temp(budget, r == 0 && calls == 2 ? 30 * KiB : 0);
                if (fail) gpus.fail_next(0, 1);
                Buffer act(budget, mb.size * KiB);
            },
            [] {}, [] {});
    });
    for (Observation const& o : seen) {
        CHECK(o.outcome == Observation::Outcome::step_oom);
        CHECK(o.failed_size == 8);
        CHECK_FALSE(o.failed_short);
        CHECK(o.need == 8 * KiB);  // rank 1's full-size need, not rank 0's remainder's
    }
}

TEST_CASE("ThreadConsensus: a rank that passes a different count fails every rank, none is left waiting") {
    ThreadConsensus group(3);
    std::string messages[3];
    run_ranks(3, [&](int r) {
        std::uint64_t v[3] = {1, 2, 3};
        try {
            group.all_min(v, r == 1 ? 3 : 2);
        } catch (std::invalid_argument const& e) {
            messages[r] = e.what();
        }
    }, 20);
    for (auto const& m : messages) {
        CAPTURE(m);
        CHECK(m.find("ThreadConsensus") != std::string::npos);
        CHECK(m.find("different counts") != std::string::npos);
        bool const both = m.find("(3 values and 2)") != std::string::npos || m.find("(2 values and 3)") != std::string::npos;
        CHECK(both);
    }
    std::uint64_t v[2] = {1, 2};  // the group is broken: every later call says so, at once
    CHECK_THROWS_AS(group.all_min(v, 2), std::invalid_argument);
}

TEST_CASE("a step that rewraps a peer's OOM as text: the ranks retry together, the rank that did not fail is a peer") {
    DataParallel dp(2);
    BatchCounters counters[2];
    std::string outcomes[2];
    run_ranks(2, [&](int r) {
        SimulatedDevices gpus(1, 64 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 8;
        o.micro_batch = 4;
        AdaptiveBatch a(o);
        a.consensus(dp.group.hook());
        bool injected = false;
        try {
            a.run(
                [&](MicroBatch const& mb) {
                    try {
                        if (r == 0 && !injected) {
                            injected = true;
                            gpus.fail_next(0, 1);
                        }
                        Buffer act(budget, mb.size * KiB);
                        mb.sync();
                    } catch (std::exception const& e) {
                        throw std::runtime_error(e.what());  // a framework's error wrapper
                    }
                },
                [] {}, [] {});
            outcomes[r] = "commit";
        } catch (std::exception const& e) {
            outcomes[r] = e.what();
        }
        counters[r] = a.counters();
    });
    CHECK(outcomes[0] == "commit");
    CHECK(outcomes[1] == "commit");
    CHECK(counters[0].ooms == 1);
    CHECK(counters[1].ooms == 0);  // it did not fail: it left by its peer's OOM
    CHECK(counters[1].peer_aborts == 1);
}

TEST_CASE("ranks holding different plan caches or none start at the same plan and run the same steps") {
    // Each rank's cache file: a plan of its own (with a model of its own), or none.
    struct Case {
        char const* name;
        std::size_t plans[3];  // 0: that rank holds no entry
        bool same_model;
        std::size_t start;     // the micro-batch every rank must start at (0: calibration)
    };
    Case const cases[] = {{"two caches and none", {40, 30, 0}, false, 0},
                          {"three different caches", {50, 30, 40}, false, 30},
                          {"three equal caches", {40, 40, 40}, true, 40},
                          {"no cache anywhere", {0, 0, 0}, false, 0}};
    for (Case const& c : cases) {
        CAPTURE(std::string(c.name));
        char tmpl[] = "/tmp/oomguard_consensus_cache_XXXXXX";
        REQUIRE(::mkdtemp(tmpl) != nullptr);
        std::string const dir = tmpl;
        BatchOptions o;
        o.global_batch = 100;
        o.max_attempts = 1000;
        o.precisions = {Precision::fp32, Precision::bf16};
        o.policy = ShrinkPolicy::predictive();
        o.start = BatchOptions::Start::calibrate;
        PlanKey const key{"train", DeviceIdentity{"simulated", 900 * KiB, ""}, "consensus test"};
        for (int r = 0; r < 3; ++r) {
            if (c.plans[r] == 0) continue;
            LearnedPlan l;
            l.plan.micro_batch = c.plans[r];
            l.model.observe(10, 200 * KiB + (c.same_model ? 0 : static_cast<std::size_t>(r) * KiB));
            l.model.observe(20, 320 * KiB);
            l.model.has_base = true;
            l.model.limit = 900 * KiB;
            PlanCache cache(dir + "/rank" + std::to_string(r) + ".json");
            REQUIRE(cache.save(PlanCache::make_entry(key, o, l)));
        }
        DataParallel dp(3);
        RankLog logs[3];
        Plan starts[3];
        run_ranks(3, [&](int r) {
            SimulatedDevices gpus(1, 900 * KiB);  // the whole batch (1264 KiB) does not fit
            Budget budget(gpus, 0, Limit::unlimited());
            AdaptiveBatch a(o);
            a.measure_with(budget);
            a.consensus(dp.group.hook());
            PlanCache cache(dir + "/rank" + std::to_string(r) + ".json");
            auto saving = cache.attach(a, key);
            bool first = true;
            auto watch = a.observe([&](BatchEvent const& e) {
                if (e.kind == BatchEventKind::batch_begin && first) {
                    starts[r] = e.from;
                    first = false;
                }
            });
            for (int batch = 0; batch < 8; ++batch)
                a.run([&](MicroBatch const& mb) { dp.step(budget, mb, 64 * KiB, 12 * KiB, logs[r]); },
                      [&] { ++logs[r].commits; }, [&] { ++logs[r].rollbacks; });
            logs[r].plan = a.plan();
            logs[r].ooms = a.counters().ooms;
            CHECK(gpus.live_bytes() == 0);
        });
        for (int r = 0; r < 3; ++r) {
            CHECK(logs[r].commits == 8);
            CHECK(starts[r] == starts[0]);
            CHECK(logs[r].plan == logs[0].plan);
            REQUIRE(logs[r].calls.size() == logs[0].calls.size());
            CHECK(logs[r].calls == logs[0].calls);
        }
        REQUIRE(!logs[0].calls.empty());
        if (c.start == 0) {
            CHECK(logs[0].calls[0].calibration);  // nobody's cache: every rank calibrates
        } else {
            CHECK(logs[0].calls[0].size == c.start);
            CHECK_FALSE(logs[0].calls[0].calibration);
        }
        MESSAGE(std::string(c.name) << ": first micro-batch " << logs[0].calls[0].size << ", " << logs[0].calls.size()
                       << " step calls on each rank, OOMs " << logs[0].ooms << "/" << logs[1].ooms << "/"
                       << logs[2].ooms << ", plan m=" << logs[0].plan.micro_batch);
        std::system(("rm -rf '" + dir + "'").c_str());
    }
}
