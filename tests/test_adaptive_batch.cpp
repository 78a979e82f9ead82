#include <oomguard/adaptive_batch.hpp>
#include <oomguard/config.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/thread_consensus.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;
using Buffer = DeviceBuffer<SimulatedDevices>;
constexpr std::size_t KiB = 1024;

namespace {
// A step that needs fixed + per_sample * m bytes (per_sample scales with precision).
struct Workload {
    SimulatedDevices gpus;
    Budget budget;
    std::size_t fixed, per_sample;
    Workload(std::size_t capacity, std::size_t fixed_bytes, std::size_t per_sample_fp32)
        : gpus(1, capacity), budget(gpus, 0, Limit::unlimited()), fixed(fixed_bytes), per_sample(per_sample_fp32) {}
    std::size_t bytes(std::size_t m, Precision p) const { return fixed + per_sample * m * bytes_per_element(p) / 4; }
    void step(MicroBatch const& mb) { Buffer act(budget, bytes(mb.size, mb.precision)); }
};
}  // namespace

TEST_CASE("bad arguments name the value") {
    auto opts = [] {
        BatchOptions o;
        o.global_batch = 64;
        return o;
    };
    BatchOptions o = opts();
    o.global_batch = 0;
    CHECK_THROWS_WITH_AS(AdaptiveBatch{o}, doctest::Contains("global_batch is 0"), std::invalid_argument);
    o = opts();
    o.micro_batch = 65;
    CHECK_THROWS_WITH_AS(AdaptiveBatch{o}, doctest::Contains("micro_batch 65 is above global_batch 64"),
                         std::invalid_argument);
    o = opts();
    o.micro_batch = 8;
    o.min_micro_batch = 16;
    CHECK_THROWS_WITH_AS(AdaptiveBatch{o}, doctest::Contains("min_micro_batch 16 is above the starting micro_batch 8"),
                         std::invalid_argument);
    o = opts();
    o.min_micro_batch = 0;
    CHECK_THROWS_AS(AdaptiveBatch{o}, std::invalid_argument);
    o = opts();
    o.precisions.clear();
    CHECK_THROWS_WITH_AS(AdaptiveBatch{o}, doctest::Contains("precisions is empty"), std::invalid_argument);
    o = opts();
    o.precisions = {Precision::fp32, Precision::bf16, Precision::fp32};
    CHECK_THROWS_WITH_AS(AdaptiveBatch{o}, doctest::Contains("lists fp32 twice"), std::invalid_argument);
    o = opts();
    o.max_attempts = 0;
    CHECK_THROWS_AS(AdaptiveBatch{o}, std::invalid_argument);
    CHECK_THROWS_WITH_AS(ShrinkPolicy::geometric(1.0), doctest::Contains("geometric(1)"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(ShrinkPolicy::geometric(0.0), doctest::Contains("must be in (0, 1)"), std::invalid_argument);
    CHECK_THROWS_AS(ShrinkPolicy::geometric(-0.5), std::invalid_argument);
    CHECK_THROWS_AS(ShrinkPolicy::geometric(std::nan("")), std::invalid_argument);
    CHECK_THROWS_AS(ShrinkPolicy::predictive(0.6), std::invalid_argument);
    CHECK_THROWS_AS(ShrinkPolicy::custom(nullptr), std::invalid_argument);

    AdaptiveBatch a(opts());
    void (*null_step)(MicroBatch const&) = nullptr;
    CHECK_THROWS_WITH_AS(a.run(null_step, [] {}, [] {}), doctest::Contains("the step is empty"), std::invalid_argument);
    std::function<void(MicroBatch const&)> empty;
    CHECK_THROWS_AS(a.run(empty, [] {}, [] {}), std::invalid_argument);
    std::function<void()> no_commit;
    CHECK_THROWS_WITH_AS(a.run([](MicroBatch const&) {}, no_commit, [] {}), doctest::Contains("the commit is empty"),
                         std::invalid_argument);
}

TEST_CASE("micro-batches cover the global batch once, with weights summing to 1") {
    BatchOptions o;
    o.global_batch = 10;
    o.micro_batch = 4;
    AdaptiveBatch a(o);
    std::vector<std::size_t> sizes;
    double w = 0;
    std::size_t next = 0;
    int commits = 0;
    a.run(
        [&](MicroBatch const& mb) {
            CHECK(mb.offset == next);
            next += mb.size;
            sizes.push_back(mb.size);
            w += mb.weight;
        },
        [&] { ++commits; }, [] { FAIL("no rollback expected"); });
    CHECK(sizes == std::vector<std::size_t>{4, 4, 2});
    CHECK(w == doctest::Approx(1.0));
    CHECK(commits == 1);
}

TEST_CASE("an OOM shrinks the micro-batch, rolls back, and retries the same samples") {
    Workload w(1024 * KiB, 64 * KiB, 16 * KiB);  // fits m <= 60
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 256;
    AdaptiveBatch a(o);
    int rollbacks = 0, commits = 0;
    std::vector<std::size_t> first_offsets;
    BatchResult r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [&] { ++commits; }, [&] { ++rollbacks; });
    CHECK(r.plan.micro_batch == 32);  // 256 -> 128 -> 64 -> 32
    CHECK(r.attempts == 4);
    CHECK(r.micro_batches == 8);  // of the committed attempt only
    CHECK(rollbacks == 3);
    CHECK(commits == 1);
    CHECK(a.counters().ooms == 3);
    CHECK(a.counters().shrinks == 3);
    CHECK(w.gpus.live_bytes() == 0);
    CHECK(w.budget.used() == 0);
    // The plan is remembered: the next global batch starts at 32 and does not fail.
    r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [&] { ++commits; }, [&] { ++rollbacks; });
    CHECK(r.attempts == 1);
    CHECK(a.plan().micro_batch == 32);
    a.reset();
    CHECK(a.plan().micro_batch == 256);
}

TEST_CASE("a non-OOM exception passes through unchanged at once, without rollback") {
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    struct UserError {
        int code;
    };
    int rollbacks = 0;
    try {
        a.run([](MicroBatch const&) { throw UserError{42}; }, [] {}, [&] { ++rollbacks; });
        FAIL("expected UserError");
    } catch (UserError const& e) {
        CHECK(e.code == 42);
    }
    CHECK_THROWS_WITH_AS(a.run([](MicroBatch const&) { throw std::runtime_error("bad data"); }, [] {}, [] {}), "bad data",
                         std::runtime_error);
    CHECK_THROWS_AS(a.run([](MicroBatch const&) { throw std::bad_alloc(); }, [] {}, [] {}), std::bad_alloc);  // host OOM
    CHECK(rollbacks == 0);
    CHECK(a.counters().ooms == 0);
}

TEST_CASE("a sticky error is never retried") {
    Workload w(1024 * KiB, 0, KiB);
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    int calls = 0;
    w.gpus.inject_sticky(0);
    try {
        a.run([&](MicroBatch const& mb) {
            ++calls;
            w.step(mb);
        }, [] {}, [] {});
        FAIL("expected cuda_error");
    } catch (cuda_error const& e) {
        CHECK(e.is_sticky());
    }
    CHECK(calls == 1);
}

TEST_CASE("at the minimum size the precision ladder is next, then a full report") {
    Workload w(100 * KiB, 0, 24 * KiB);  // fp32: 24 KiB/sample, fits 4; bf16: 12 KiB, fits 8; fp8: fits 16
    BatchOptions o;
    o.global_batch = 64;
    o.micro_batch = 32;
    o.min_micro_batch = 8;
    o.precisions = {Precision::fp32, Precision::bf16};
    AdaptiveBatch a(o);
    std::vector<BatchEventKind> events;
    auto watching = a.observe([&](BatchEvent const& e) { events.push_back(e.kind); });
    BatchResult r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(r.plan.micro_batch == 8);
    CHECK(r.plan.precision == Precision::bf16);
    CHECK(a.counters().precision_changes == 1);
    CHECK(events.back() == BatchEventKind::commit);

    Workload tight(50 * KiB, 0, 24 * KiB);
    AdaptiveBatch b(o);
    try {
        b.run([&](MicroBatch const& mb) { tight.step(mb); }, [] {}, [] {});
        FAIL("expected recovery_failed");
    } catch (recovery_failed const& e) {
        CHECK(is_device_oom(e));
        CHECK(e.attempts().size() == 4);  // 32, 16, 8 fp32, 8 bf16
        CHECK(e.attempts().back().plan.precision == Precision::bf16);
        std::string w = e.what();
        CHECK(w.find("gave up on a global batch of 64 after 4 attempts") != std::string::npos);
        CHECK(w.find("[m=32 fp32 GPU 0, failed at 32 after 0 samples]") != std::string::npos);
        CHECK(w.find("last error: oomguard: out of memory") != std::string::npos);
        CHECK(e.info().requested == 8 * 12 * KiB);
    }
    CHECK(b.counters().give_ups == 1);
    CHECK(tight.gpus.live_bytes() == 0);
}

TEST_CASE("one retry at the same size when releasing caches freed memory") {
    Workload w(256 * KiB, 0, 4 * KiB);  // 64 samples fit on an empty device
    CacheRegistry reg;
    std::vector<void*> cached;
    for (int i = 0; i < 4; ++i) cached.push_back(w.budget.allocate(32 * KiB));  // a cache holds 128 KiB
    auto r = reg.add("cache", 0, [&] { return cached.size() * 32 * KiB; }, [&] {
        std::size_t b = cached.size() * 32 * KiB;
        for (void* p : cached) w.budget.deallocate(p, 32 * KiB);
        cached.clear();
        return b;
    });
    BatchOptions o;
    o.global_batch = 64;
    o.caches = &reg;
    AdaptiveBatch a(o);
    BatchResult res = a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(res.plan.micro_batch == 64);  // nothing shrank
    CHECK(res.attempts == 2);
    CHECK(a.counters().retries_same == 1);
    CHECK(a.counters().bytes_released == 128 * KiB);
}

TEST_CASE("a cache whose release throws during recovery: its exception reaches the caller, as thrown") {
    // The registry runs the other caches and records the failure; adaptive_batch
    // then rethrows it (a sticky error is no OOM to shrink for), after the trace
    // has seen the release.
    Workload w(256 * KiB, 0, 4 * KiB);
    CacheRegistry reg;
    bool released_other = false;
    auto fine = reg.add("fine", 0, [] { return std::size_t{KiB}; }, [&] {
        released_other = true;
        return std::size_t{KiB};
    });
    auto bad = reg.add("poisoned", 1, [] { return std::size_t{KiB}; },
                       []() -> std::size_t { throw std::runtime_error("the context is gone"); });
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 128;  // 64 samples fit: the first attempt runs out
    o.caches = &reg;
    AdaptiveBatch a(o);
    CHECK_THROWS_WITH_AS(a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {}), "the context is gone",
                         std::runtime_error);
    CHECK(released_other);
    CHECK(a.counters().releases == 1);
    CHECK(w.gpus.live_bytes() == 0);

    // A cache that runs out of memory as it releases freed nothing: recovery goes on.
    CacheRegistry starving;
    auto fine2 = starving.add("fine", 0, [] { return std::size_t{KiB}; }, [] { return std::size_t{KiB}; });
    auto starved = starving.add("starved", 1, [] { return std::size_t{KiB}; }, []() -> std::size_t {
        throw out_of_memory(oom_info{});
    });
    o.caches = &starving;
    AdaptiveBatch b(o);
    BatchResult res = b.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(res.plan.micro_batch == 64);
    CHECK(b.counters().releases >= 1);
    CHECK(w.gpus.live_bytes() == 0);
}

TEST_CASE("policies: halve, geometric, bisect, predictive, custom") {
    auto run_with = [](ShrinkPolicy p, std::size_t& failures) {
        Workload w(1000 * KiB, 100 * KiB, 10 * KiB);  // fits m <= 90
        BatchOptions o;
        o.global_batch = 256;
        o.policy = p;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        for (int i = 0; i < 12; ++i) a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
        failures = a.counters().ooms;
        CHECK(w.gpus.live_bytes() == 0);
        return a.plan().micro_batch;
    };
    std::size_t f = 0;
    CHECK(run_with(ShrinkPolicy::halve(), f) == 64);
    CHECK(f == 2);
    CHECK(run_with(ShrinkPolicy::geometric(0.9), f) == 87);  // 256, 230, 207, 186, 167, 150, 135, 121, 108, 97, 87
    CHECK(f == 10);
    CHECK(run_with(ShrinkPolicy::bisect(), f) == 90);
    CHECK(f <= 9);
    std::size_t m = run_with(ShrinkPolicy::predictive(0.02), f);
    CHECK(m >= 81);  // within 10 % of the best, 90
    CHECK(m <= 90);
    CHECK(f <= 2);
    auto third = ShrinkPolicy::custom([](ShrinkContext const& c, void*) { return c.failed / 3; }, nullptr, "third");
    CHECK(run_with(third, f) == 85);
    auto broken = ShrinkPolicy::custom([](ShrinkContext const& c, void*) { return c.failed; }, nullptr, "broken");
    CHECK_THROWS_WITH_AS(run_with(broken, f), doctest::Contains("policy 'broken' returned 256"), std::logic_error);
}

TEST_CASE("geometric is strictly decreasing even when the factor rounds to the same size") {
    ShrinkPolicy p = ShrinkPolicy::geometric(0.99);
    StepModel model;
    ShrinkContext c;
    c.failed = 50;
    c.minimum = 1;
    CHECK(p.after_failure(c, model).size == 49);
    c.failed = 2;
    CHECK(p.after_failure(c, model).size == 1);
}

TEST_CASE("grow back after clean batches, never above the requested size") {
    Workload w(1000 * KiB, 0, 10 * KiB);
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 128;
    o.micro_batch = 128;
    o.grow_after = 3;
    AdaptiveBatch a(o);
    w.gpus.set_used_by_others(0, 600 * KiB);  // another process: fits 40
    for (int i = 0; i < 3; ++i) a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(a.plan().micro_batch == 32);
    w.gpus.set_used_by_others(0, 0);  // it went away
    for (int i = 0; i < 40; ++i) a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(a.plan().micro_batch == 100);  // the largest that fits: grows bisect below the ones that failed
    CHECK(a.counters().grow_backs >= 2);
    CHECK(a.plan().micro_batch <= 128);
    CHECK(w.gpus.live_bytes() == 0);
}

TEST_CASE("failover proposes another device when nothing fits") {
    SimulatedDevices gpus({{64 * KiB}, {1024 * KiB}});
    Budget b0(gpus, 0, Limit::unlimited()), b1(gpus, 1, Limit::unlimited());
    Budget* budgets[] = {&b0, &b1};
    BatchOptions o;
    o.global_batch = 32;
    o.min_micro_batch = 16;
    AdaptiveBatch a(o);
    a.failover([](void*, FailoverRequest const& r) { return r.plan.device == 0 ? 1 : -1; });
    BatchResult r = a.run([&](MicroBatch const& mb) { Buffer buf(*budgets[mb.device], mb.size * 8 * KiB); }, [] {}, [] {});
    CHECK(r.plan.device == 1);
    CHECK(r.plan.micro_batch == 32);
    CHECK(a.counters().failovers == 1);
}

TEST_CASE("consensus: an OOM on one rank moves every rank to the same plan") {
    ThreadConsensus tc(2);
    Plan plans[2];
    std::size_t commits[2] = {0, 0};
    auto rank = [&](int r, std::size_t capacity) {
        Workload w(capacity, 0, 10 * KiB);
        BatchOptions o;
        o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
        o.global_batch = 64;
        AdaptiveBatch a(o);
        a.consensus(tc.hook());
        for (int i = 0; i < 4; ++i) a.run([&](MicroBatch const& mb) { w.step(mb); }, [&] { ++commits[r]; }, [] {});
        plans[r] = a.plan();
    };
    std::thread r0(rank, 0, 1000 * KiB);  // fits 100: would keep 64
    std::thread r1(rank, 1, 500 * KiB);   // fits 50: needs 32
    r0.join();
    r1.join();
    CHECK(plans[0].micro_batch == 32);
    CHECK(plans[1].micro_batch == 32);
    CHECK(commits[0] == 4);
    CHECK(commits[1] == 4);
}

namespace {
// Linear regression trained with SGD; the step allocates its activations
// through the budget, so the batch size decides whether it fits.
struct Trainer {
    static constexpr int D = 8;
    std::size_t N;
    std::vector<float> X, y;
    float w[D] = {};
    float grad[D] = {};
    std::vector<int> seen;          // commits per sample in this epoch
    std::vector<std::size_t> pending;
    explicit Trainer(std::size_t n) : N(n), X(n * D), y(n), seen(n, 0) {
        std::uint64_t s = 12345;
        auto rnd = [&] {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            return static_cast<float>((s >> 40) % 2001) / 1000.0f - 1.0f;
        };
        float truth[D];
        for (float& t : truth) t = rnd();
        for (std::size_t i = 0; i < n; ++i) {
            float acc = 0;
            for (int d = 0; d < D; ++d) {
                X[i * D + d] = rnd();
                acc += truth[d] * X[i * D + d];
            }
            y[i] = acc + 0.01f * rnd();
        }
    }
    template <class B>
    void step(B& budget, std::size_t base, MicroBatch const& mb) {
        DeviceBuffer<SimulatedDevices> act(budget, 4096 + mb.size * 1024);  // what the micro-batch needs
        float g[D] = {};
        for (std::size_t k = 0; k < mb.size; ++k) {
            std::size_t i = base + mb.offset + k;
            float pred = 0;
            for (int d = 0; d < D; ++d) pred += w[d] * X[i * D + d];
            float err = pred - y[i];
            for (int d = 0; d < D; ++d) g[d] += err * X[i * D + d];
            pending.push_back(i);
        }
        for (int d = 0; d < D; ++d) grad[d] += static_cast<float>(mb.weight) * g[d] / static_cast<float>(mb.size);
    }
    void commit() {
        for (int d = 0; d < D; ++d) {
            w[d] -= 0.1f * grad[d];
            grad[d] = 0;
        }
        for (auto i : pending) ++seen[i];
        pending.clear();
    }
    void rollback() {
        for (float& g : grad) g = 0;
        pending.clear();
    }
};

std::vector<float> train(std::size_t capacity, ShrinkPolicy policy, std::size_t& ooms, double fault_rate = 0.0) {
    SimulatedDevices gpus(1, capacity);
    if (fault_rate > 0) {
        FaultPlan f;
        f.probability = fault_rate;
        f.seed = 99;
        gpus.set_faults(0, f);
    }
    MemoryBudget<SimulatedDevices> budget(gpus, 0, Limit::unlimited());
    Trainer t(512);
    BatchOptions o;
    o.global_batch = 128;
    o.policy = policy;
    o.max_attempts = 1000;
    AdaptiveBatch a(o);
    a.measure_with(budget);
    for (int epoch = 0; epoch < 5; ++epoch) {
        for (std::size_t base = 0; base < t.N; base += o.global_batch)
            a.run([&](MicroBatch const& mb) { t.step(budget, base, mb); }, [&] { t.commit(); }, [&] { t.rollback(); });
        for (int c : t.seen) REQUIRE(c == 1);  // every sample committed exactly once this epoch
        std::fill(t.seen.begin(), t.seen.end(), 0);
    }
    ooms = a.counters().ooms;
    CHECK(gpus.live_bytes() == 0);
    CHECK(gpus.live_allocations() == 0);
    return std::vector<float>(t.w, t.w + Trainer::D);
}
}  // namespace

TEST_CASE("a run whose full batch cannot fit ends with the same weights as one that fits") {
    std::size_t ooms_big = 0, ooms = 0;
    auto reference = train(std::size_t{1} << 30, ShrinkPolicy::halve(), ooms_big);
    CHECK(ooms_big == 0);
    for (auto policy : {ShrinkPolicy::halve(), ShrinkPolicy::geometric(0.9), ShrinkPolicy::bisect(),
                        ShrinkPolicy::predictive()}) {
        CAPTURE(policy.name());
        auto w = train(40 * 1024, policy, ooms);  // fits about 35 of 128 samples
        CHECK(ooms > 0);
        for (int d = 0; d < Trainer::D; ++d) CHECK(w[d] == doctest::Approx(reference[d]).epsilon(1e-5));
    }
    auto w = train(std::size_t{1} << 30, ShrinkPolicy::halve(), ooms, 0.05);  // 5 % random faults
    CHECK(ooms > 0);
    for (int d = 0; d < Trainer::D; ++d) CHECK(w[d] == doctest::Approx(reference[d]).epsilon(1e-5));
}

TEST_CASE("OOMGUARD_CONF settings apply to BatchOptions") {
    BatchOptions o;
    o.global_batch = 64;
    o.apply(parse_config("min_batch=4,max_attempts=9,policy=bisect,grow_after=5,precision=fp32>fp16"));
    CHECK(o.min_micro_batch == 4);
    CHECK(o.max_attempts == 9);
    CHECK(o.policy.kind() == ShrinkPolicy::Kind::bisect);
    CHECK(o.grow_after == 5);
    CHECK(o.precisions.size() == 2);
    AdaptiveBatch a(o);
    CHECK(a.plan().micro_batch == 64);
}

TEST_CASE("a transient OOM at a size that has fit is retried, not shrunk") {
    Workload w(1024 * KiB, 0, 10 * KiB);  // fits 102
    BatchOptions o;
    o.global_batch = 64;
    AdaptiveBatch a(o);
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    w.gpus.fail_next(0, 2);  // another process's burst
    BatchResult r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(r.attempts == 3);
    CHECK(r.plan.micro_batch == 64);
    CHECK(a.counters().retries_same == 2);
    CHECK(a.counters().shrinks == 0);
    w.gpus.fail_next(0, 4);  // it keeps failing: after three retries the plan shrinks
    r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(r.plan.micro_batch == 32);
    CHECK(a.counters().shrinks == 1);
}

// --- The recovery paths real jobs take (each failed before the planner) ---

TEST_CASE("the ladder goes on at the minimum: a size that completed, then fails for good, moves to bf16") {
    Workload w(100 * KiB, 0, 40 * KiB);  // fp32: 40 KiB a sample, bf16: 20 KiB
    BatchOptions o;
    o.global_batch = 4;
    o.micro_batch = 1;
    o.precisions = {Precision::fp32, Precision::bf16};
    AdaptiveBatch a(o);
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});  // fp32 at m=1 fits once
    w.gpus.set_used_by_others(0, 70 * KiB);            // now only bf16 does
    BatchResult r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(r.plan.precision == Precision::bf16);
    CHECK(r.attempts == 5);  // three transient retries of m=1, then the next precision
    CHECK(a.counters().retries_same == 3);
    CHECK(a.counters().precision_changes == 1);
    CHECK(w.gpus.live_bytes() == 0);
}

// --- Observers: RAII registrations that cannot dangle ---

namespace {
std::size_t commits_heard(std::vector<BatchEventKind> const& v) {
    return static_cast<std::size_t>(std::count(v.begin(), v.end(), BatchEventKind::commit));
}
void one_batch(AdaptiveBatch& a) { a.run([](MicroBatch const&) {}, [] {}, [] {}); }
}  // namespace

TEST_CASE("observe(): any callable; the registration detaches when it ends or on detach()") {
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    std::vector<BatchEventKind> heard, by_function;
    std::string const tag = "captured";  // a capturing lambda, as people write them
    std::string seen_tag;
    ObserverRegistration lambda = a.observe([&heard, tag, &seen_tag](BatchEvent const& e) {
        heard.push_back(e.kind);
        seen_tag = tag;
    });
    std::function<void(BatchEvent const&)> f = [&](BatchEvent const& e) { by_function.push_back(e.kind); };
    ObserverRegistration function = a.observe(f);
    CHECK(lambda);
    CHECK(function);
    one_batch(a);
    CHECK(commits_heard(heard) == 1);
    CHECK(commits_heard(by_function) == 1);
    CHECK(seen_tag == "captured");
    {
        auto scoped = a.observe([&](BatchEvent const& e) { heard.push_back(e.kind); });
        one_batch(a);
    }
    CHECK(commits_heard(heard) == 3);  // twice in that batch: both lambdas
    function.detach();
    CHECK_FALSE(function);
    function.detach();  // again: nothing
    one_batch(a);
    CHECK(commits_heard(heard) == 4);
    CHECK(commits_heard(by_function) == 2);  // not the batch after its detach()
    // Moved: one owner, which detaches.
    ObserverRegistration moved = std::move(lambda);
    CHECK_FALSE(lambda);
    CHECK(moved);
    moved = ObserverRegistration();
    CHECK_FALSE(moved);
    one_batch(a);
    CHECK(commits_heard(heard) == 4);
}

TEST_CASE("a registration outlives its batch, or follows it when the batch is moved") {
    BatchOptions o;
    o.global_batch = 8;
    std::vector<BatchEventKind> heard;
    ObserverRegistration outlives;
    {
        AdaptiveBatch a(o);
        outlives = a.observe([&](BatchEvent const& e) { heard.push_back(e.kind); });
        one_batch(a);
    }
    CHECK_FALSE(outlives);  // the batch is gone
    outlives.detach();       // and detaching does nothing (no use after free)
    CHECK(commits_heard(heard) == 1);

    auto first = std::make_unique<AdaptiveBatch>(o);
    ObserverRegistration follows = first->observe([&](BatchEvent const& e) { heard.push_back(e.kind); });
    AdaptiveBatch second(std::move(*first));
    first.reset();
    CHECK(follows);
    one_batch(second);
    CHECK(commits_heard(heard) == 2);
    follows.detach();
    one_batch(second);
    CHECK(commits_heard(heard) == 2);
    // Move-assigned over a batch with observers of its own: those are dropped.
    AdaptiveBatch third(o);
    ObserverRegistration of_third = third.observe([&](BatchEvent const& e) { heard.push_back(e.kind); });
    ObserverRegistration of_second = second.observe([&](BatchEvent const& e) { heard.push_back(e.kind); });
    third = std::move(second);
    CHECK_FALSE(of_third);
    CHECK(of_second);
    one_batch(third);
    CHECK(commits_heard(heard) == 3);
}

TEST_CASE("an observer may detach itself or another, or add one, from inside its call") {
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    std::vector<std::string> log;
    ObserverRegistration self, other, later, added;
    self = a.observe([&](BatchEvent const& e) {
        log.push_back("self " + std::string(to_string(e.kind)));
        self.detach();  // destroys this lambda only once the event is delivered
        log.push_back("self still runs");
    });
    other = a.observe([&](BatchEvent const& e) {
        log.push_back("other " + std::string(to_string(e.kind)));
        later.detach();  // one not yet called for this event: it is skipped
        if (!added)
            added = a.observe([&](BatchEvent const& f) { log.push_back("added " + std::string(to_string(f.kind))); });
    });
    later = a.observe([&](BatchEvent const&) { log.push_back("later"); });
    one_batch(a);
    REQUIRE(log.size() >= 5);
    CHECK(log[0] == "self batch_begin");
    CHECK(log[1] == "self still runs");
    CHECK(log[2] == "other batch_begin");
    CHECK(log[3] == "other micro_batch_begin");  // `added` hears from the next event on
    CHECK(log[4] == "added micro_batch_begin");
    CHECK(std::find(log.begin(), log.end(), "later") == log.end());
    CHECK(std::count(log.begin(), log.end(), "self still runs") == 1);
    CHECK_FALSE(self);
    CHECK_FALSE(later);
    CHECK(other);
}

TEST_CASE("observe() refuses an empty observer") {
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    void (*none)(BatchEvent const&) = nullptr;
    CHECK_THROWS_WITH_AS((void)a.observe(none), doctest::Contains("null function pointer"), std::invalid_argument);
    CHECK_THROWS_WITH_AS((void)a.observe(std::function<void(BatchEvent const&)>()),
                         doctest::Contains("empty std::function"), std::invalid_argument);
    CHECK_THROWS_WITH_AS((void)a.observe(nullptr), doctest::Contains("null function"), std::invalid_argument);
}

TEST_CASE("an OOM in commit rolls back and retries the global batch; an observer's exception changes nothing") {
    Workload w(1024 * KiB, 0, KiB);
    BatchOptions o;
    o.global_batch = 8;
    o.micro_batch = 4;
    AdaptiveBatch a(o);
    int observed = 0;
    auto watching = a.observe(  // the C-callback form
        [](BatchEvent const& e, void* u) {
            if (e.kind == BatchEventKind::commit) {
                ++*static_cast<int*>(u);
                throw std::runtime_error("observer failed");
            }
        },
        &observed);
    double acc = 0;
    int commits = 0, rollbacks = 0;
    void* state = nullptr;
    std::vector<double> seen;
    auto step = [&](MicroBatch const& mb) {
        w.step(mb);
        acc += mb.weight;
    };
    auto commit = [&] {
        if (state == nullptr) {  // Adam allocates its state on its first step
            if (commits++ == 0) w.gpus.fail_next(0, 1);
            state = w.budget.allocate(64 * KiB);
        }
        seen.push_back(acc);
        acc = 0;
    };
    BatchResult r = a.run(step, commit, [&] {
        acc = 0;
        ++rollbacks;
    });
    CHECK(r.attempts == 2);
    CHECK(rollbacks == 1);
    CHECK(a.counters().commit_ooms == 1);
    CHECK(a.counters().wasted_samples == 8);
    REQUIRE(r.observer_error != nullptr);
    CHECK_THROWS_WITH_AS(std::rethrow_exception(r.observer_error), "observer failed", std::runtime_error);
    r = a.run(step, commit, [&] { acc = 0; });
    CHECK(r.attempts == 1);
    CHECK(seen == std::vector<double>{1.0, 1.0});
    CHECK(observed == 2);
    CHECK(a.counters().observer_errors == 2);
    CHECK(a.counters().global_batches == 2);
    w.budget.deallocate(state, 64 * KiB);
}

TEST_CASE("a short remainder that fails never decides the plan: the plan's size stays, the remainder runs in halves") {
    Workload w(1024 * KiB, 0, KiB);
    BatchOptions o;
    o.global_batch = 10;
    o.micro_batch = 8;
    AdaptiveBatch a(o);
    a.measure_with(w.budget);  // tells a fault (the device had room) from the remainder's own need
    int fails = 4;  // the trailing micro-batch of 2 fails four times
    std::vector<std::size_t> sizes;
    a.run([&](MicroBatch const& mb) {
        sizes.push_back(mb.size);
        if (mb.size == 2 && fails > 0) {
            --fails;
            w.gpus.fail_next(0, 1);
        }
        w.step(mb);
    }, [] {}, [] {});
    CHECK(a.plan().micro_batch == 8);  // three transient retries, then the remainder in pieces of 1; never 4
    CHECK(sizes == std::vector<std::size_t>{8, 2, 8, 2, 8, 2, 8, 2, 8, 1, 1});
    // Without a meter too: the next batch's remainder fails by its own need each time.
    BatchOptions p = o;
    AdaptiveBatch b(p);
    sizes.clear();
    fails = 100;  // the remainder never fits whole
    b.run([&](MicroBatch const& mb) {
        sizes.push_back(mb.size);
        if (mb.size == 2) w.gpus.fail_next(0, 1);
        w.step(mb);
    }, [] {}, [] {});
    CHECK(b.plan().micro_batch == 8);
    CHECK(sizes == std::vector<std::size_t>{8, 2, 8, 1, 1});
}

TEST_CASE("a passing exception or a give-up leaves the last good plan and no half-made state") {
    Workload w(1024 * KiB, 0, 10 * KiB);
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 64;
    AdaptiveBatch a(o);
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    w.gpus.set_used_by_others(0, 700 * KiB);  // fits 32
    int calls = 0;
    struct UserError {};
    CHECK_THROWS_AS(a.run([&](MicroBatch const& mb) {
        if (++calls == 5) throw UserError{};  // on the first attempt at 32, after three transient retries of 64
        w.step(mb);
    }, [] {}, [] {}),
                    UserError);
    CHECK(a.plan() == a.last_good_plan());
    CHECK(a.plan().micro_batch == 64);
    // The next run starts at the last good plan; what was measured stays known
    // (64 kept failing, so it is no longer taken for a transient): one failure, then 32.
    BatchResult r = a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(r.attempts == 2);
    CHECK(r.plan.micro_batch == 32);
    CHECK(w.gpus.live_bytes() == 0);
}

TEST_CASE("a rollback that throws a non-OOM passes through unchanged and leaves the last good plan") {
    Workload w(256 * KiB, 0, 8 * KiB);
    BatchOptions o;
    o.global_batch = 64;
    AdaptiveBatch a(o);
    CHECK_THROWS_WITH_AS(a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {},
                               [] { throw std::runtime_error("rollback bug"); }),
                         "rollback bug", std::runtime_error);
    CHECK(a.plan().micro_batch == 64);
}

TEST_CASE("one transient failure during a grow-back does not cap growth for good") {
    Workload w(1000 * KiB, 0, 10 * KiB);
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 64;
    o.grow_after = 1;
    AdaptiveBatch a(o);
    w.gpus.set_used_by_others(0, 600 * KiB);
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(a.plan().micro_batch == 32);
    w.gpus.set_used_by_others(0, 0);
    bool inject = true;
    for (int i = 0; i < 60; ++i)
        a.run([&](MicroBatch const& mb) {
            if (inject && mb.size > 32) {  // the first grow-back meets another process's burst
                inject = false;
                w.gpus.fail_next(0, 1);
            }
            w.step(mb);
        }, [] {}, [] {});
    CHECK(a.plan().micro_batch == 64);
}

TEST_CASE("the precision comes back with grow_after = 0, after restore_precision_after clean batches") {
    Workload w(100 * KiB, 0, 40 * KiB);
    BatchOptions o;
    o.global_batch = 4;
    o.micro_batch = 1;
    o.precisions = {Precision::fp32, Precision::bf16};
    o.restore_precision_after = 10;
    AdaptiveBatch a(o);
    w.gpus.set_used_by_others(0, 70 * KiB);
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(a.plan().precision == Precision::bf16);
    for (int i = 0; i < 9; ++i) a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(a.plan().precision == Precision::bf16);  // 9 clean batches: not yet
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});  // tried at fp32 and fails: back, wait 21 more
    CHECK(a.plan().precision == Precision::bf16);
    w.gpus.set_used_by_others(0, 0);
    for (int i = 0; i < 22; ++i) a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    CHECK(a.plan().precision == Precision::fp32);
    CHECK(a.counters().grow_backs == 2);
}

TEST_CASE("after failover the peaks are measured on the new device's budget") {
    SimulatedDevices gpus({{64 * KiB}, {1024 * KiB}});
    Budget b0(gpus, 0, Limit::unlimited()), b1(gpus, 1, Limit::unlimited());
    Budget* budgets[] = {&b0, &b1};
    BatchOptions o;
    o.global_batch = 256;
    o.min_micro_batch = 16;
    o.policy = ShrinkPolicy::predictive();
    AdaptiveBatch a(o);
    a.measure_with(b0).measure_with(b1);
    a.failover([](void*, FailoverRequest const& r) { return r.plan.device == 0 ? 1 : -1; });
    std::vector<std::size_t> calibration_bytes;
    auto watching = a.observe([&](BatchEvent const& e) {
        if (e.kind == BatchEventKind::calibration) calibration_bytes.push_back(e.bytes);
    });
    // 100 KiB + 8 KiB a sample: device 1 fits 115.
    auto step = [&](MicroBatch const& mb) { Buffer buf(*budgets[mb.device], 100 * KiB + mb.size * 8 * KiB); };
    a.run(step, [] {}, [] {});
    CHECK(a.plan().device == 1);
    REQUIRE(calibration_bytes.size() == 2);  // the calibration size twice: the batch's first, and a later one
    CHECK(calibration_bytes[0] == 100 * KiB + 16 * 8 * KiB);  // measured through b1
    CHECK(calibration_bytes[1] == 100 * KiB + 16 * 8 * KiB);
    a.run(step, [] {}, [] {});
    CHECK(a.plan().micro_batch >= 104);  // the fit jumped near the best, 115
    CHECK(a.plan().micro_batch <= 115);
}

// --- Recovery that wastes nothing: resume, results that cannot leak, calibration kept ---

TEST_CASE("resume: an OOM in micro-batch k keeps 1..k-1 and retries from k; rollback only on give-up") {
    Workload w(1024 * KiB, 0, KiB);
    BatchOptions o;
    o.global_batch = 40;
    o.micro_batch = 8;
    o.resume = true;
    AdaptiveBatch a(o);
    std::vector<std::size_t> offsets;
    int rollbacks = 0;
    bool fault = true;
    BatchResult r = a.run(
        [&](MicroBatch const& mb) {
            offsets.push_back(mb.offset);
            if (mb.offset == 24 && fault) {  // the fourth micro-batch meets a burst once
                fault = false;
                w.gpus.fail_next(0, 1);
            }
            w.step(mb);
        },
        [] {}, [&] { ++rollbacks; });
    CHECK(offsets == std::vector<std::size_t>{0, 8, 16, 24, 24, 32});
    CHECK(rollbacks == 0);
    CHECK(r.attempts == 2);
    CHECK(r.micro_batches == 5);  // the kept ones: 0, 8, 16, then 24 and 32
    CHECK(a.counters().wasted_samples == 0);

    // A give-up undoes the kept micro-batches too.
    Workload tight(1024 * KiB, 0, KiB);
    BatchOptions t = o;
    t.max_attempts = 2;
    AdaptiveBatch b(t);
    rollbacks = 0;
    CHECK_THROWS_AS(b.run(
                        [&](MicroBatch const& mb) {
                            if (mb.offset >= 16) tight.gpus.fail_next(0, 1);
                            tight.step(mb);
                        },
                        [] {}, [&] { ++rollbacks; }),
                    recovery_failed);
    CHECK(rollbacks == 1);
}

TEST_CASE("reduce and run(step): only the kept micro-batches' results count, with and without resume") {
    for (bool resume : {false, true}) {
        CAPTURE(resume);
        Workload w(200 * KiB, 0, 10 * KiB);  // fits 20
        BatchOptions o;
        o.global_batch = 64;
        o.micro_batch = 16;
        o.resume = resume;
        AdaptiveBatch a(o);
        int faults = 2;
        auto step = [&](MicroBatch const& mb) {
            if (mb.offset == 32 && faults > 0) {
                --faults;
                w.gpus.fail_next(0, 1);
            }
            w.step(mb);
            return static_cast<long>(mb.size);  // e.g. the number of samples scored
        };
        Reduced<long> r = a.run(step);
        CHECK(r.value == 64);
        CHECK(r.batch.attempts == 3);
        auto sum_offsets = a.reduce([&](MicroBatch const& mb) { return static_cast<long>(mb.offset); }, 0L,
                                    [](long x, long y) { return x + y; });
        CHECK(sum_offsets.value == 0 + 16 + 32 + 48);
    }
}

TEST_CASE("the first commit's optimizer state: the next batch is planned over it, with no OOM") {
    // 100 KiB + 10 KiB a sample, 1000 KiB: the first batch fails at 256 and
    // calibrates; its commit allocates 100 KiB of optimizer state for good.
    // Gradients of 50 KiB: none; allocated by the batch's first step and kept
    // (zero_grad outside the commit, or set to zero); or freed by the commit
    // (zero_grad(set_to_none), as libtorch does) and allocated again.
    // kept_temp: kept (made by the first backward, over the activations, so
    // the failed first attempt never made them), and the commit runs a 60 KiB
    // temporary after making its state (Adam's foreach update).
    enum Gradients { none, kept, freed, kept_temp };
    for (Gradients g : {none, kept, freed, kept_temp}) {
        CAPTURE(static_cast<int>(g));
        Workload w(1000 * KiB, 100 * KiB, 10 * KiB);
        BatchOptions o;
        o.global_batch = 256;
        o.policy = ShrinkPolicy::predictive(0.02);
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        std::vector<Buffer> state;
        std::vector<Buffer> grads;
        std::vector<std::size_t> plans;
        for (int b = 0; b < 3; ++b) {
            a.run(
                [&](MicroBatch const& mb) {
                    if (g == kept_temp) {  // made by the backward, over the activations
                        Buffer act(w.budget, w.bytes(mb.size, mb.precision));
                        if (grads.empty()) grads.emplace_back(w.budget, 50 * KiB);
                        return;
                    }
                    if (g != none && grads.empty()) grads.emplace_back(w.budget, 50 * KiB);
                    w.step(mb);
                },
                [&] {
                    if (state.empty()) state.emplace_back(w.budget, 100 * KiB);
                    if (g == kept_temp) Buffer temporary(w.budget, 60 * KiB);
                    if (g == freed) grads.clear();
                },
                [&] {
                    if (g == freed) grads.clear();
                });
            plans.push_back(a.last_good_plan().micro_batch);
        }
        CHECK(a.counters().ooms == 1);  // the first only: none in the batch after the state appeared
        // Planned over the state: 100 + 100 + 10 * 81 is over 1000 KiB, so
        // (980 - 100 - 100) / 10 = 78. Kept gradients: the first batch's 75
        // still fits exactly (100 + 50 + 100 + 750) -- they count once, as
        // they were held before the commit as well (over all it left held,
        // twice: 68). Freed gradients: the commit leaves 50 KiB more held than
        // it began with, but its own peak says 100 KiB stays (the state, made
        // before the gradients went): 76 -> (980 - 50 - 100 - 100) / 10 = 73.
        // Kept with the temporary, the commit's aggregates (50 held before it,
        // 210 at its peak, 150 after, over a batch base of 0) are those of a
        // commit that made 100 KiB of state while freeing 50 KiB of
        // gradients: 100 + min(50, 60) counts as growth, 68 is planned for
        // one batch, and the refits bring it back up with no OOM.
        std::size_t const first[] = {81, 75, 76, 76}, second[] = {78, 75, 73, 68};  // by Gradients
        CHECK(plans[0] == first[g]);
        CHECK(plans[1] == second[g]);
        if (g == kept_temp)
            CHECK(plans[2] > plans[1]);
        else
            CHECK(plans[2] == plans[1]);
    }
}

TEST_CASE("a commit's small growth does not plan down the edge size bisection found") {
    // A concave need (100 + 12 m - 0.02 m^2 KiB): bisection settles at 87, at
    // 992.6 KiB of 1000, by probes the line through its points (a straight
    // line through a curve) does not predict exactly. Batch 12's commit keeps
    // 1 KiB for good (a step counter): 87 still holds, and stays the plan.
    SimulatedDevices gpus(1, 1000 * KiB);
    Budget budget(gpus, 0, Limit::unlimited());
    BatchOptions o;
    o.global_batch = 256;
    o.policy = ShrinkPolicy::bisect();
    AdaptiveBatch a(o);
    a.measure_with(budget);
    std::vector<Buffer> kept;
    std::size_t ooms_before = 0;
    for (int b = 0; b < 16; ++b) {
        a.run(
            [&](MicroBatch const& mb) {
                double const m = static_cast<double>(mb.size);
                Buffer act(budget, static_cast<std::size_t>((100 + 12 * m - 0.02 * m * m) * KiB));
            },
            [&] {
                if (b == 12) kept.emplace_back(budget, KiB);
            },
            [] {});
        if (b == 11) {
            REQUIRE(a.last_good_plan().micro_batch == 87);
            ooms_before = a.counters().ooms;
        }
        if (b >= 12) CHECK(a.last_good_plan().micro_batch == 87);
    }
    CHECK(a.plan().micro_batch == 87);
    CHECK(a.counters().ooms == ooms_before);
}

TEST_CASE("calibrating first, a first global batch that ends in the calibration still finds the fit") {
    // 100 KiB + 10 KiB a sample on 1000 KiB. The first run() has 26 or 40
    // samples: 8 twice, then a short c2 (33 planned). The next batch runs 33,
    // a second point, and jumps to the fit: a plan left at 8 would have one
    // point and, calibrating first, no probe to find another.
    for (std::size_t first : {26u, 40u}) {
        CAPTURE(first);
        Workload w(1000 * KiB, 100 * KiB, 10 * KiB);
        BatchOptions o;
        o.global_batch = 256;
        o.policy = ShrinkPolicy::predictive(0.02);
        o.start = BatchOptions::Start::calibrate;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        auto step = [&](MicroBatch const& mb) { w.step(mb); };
        a.run(GlobalBatch{first}, step, [] {}, [] {});
        CHECK(a.plan().micro_batch == 33);
        for (int b = 0; b < 3; ++b) a.run(step, [] {}, [] {});
        CHECK(a.plan().micro_batch >= 81);
        CHECK(a.counters().ooms == 0);
    }
}

TEST_CASE("a transient OOM at the calibration's second size, without resume, runs the first again before it") {
    Workload w(1000 * KiB, 100 * KiB, 10 * KiB);  // fits m <= 90
    BatchOptions o;
    o.global_batch = 256;
    o.policy = ShrinkPolicy::predictive(0.02);
    o.start = BatchOptions::Start::calibrate;
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    std::vector<std::size_t> sizes;
    bool injected = false;
    a.run(
        [&](MicroBatch const& mb) {
            sizes.push_back(mb.size);
            if (!injected && !mb.calibration) {  // another process's burst meets c2's first allocation
                injected = true;
                w.gpus.fail_next(0, 1);
            }
            w.step(mb);
        },
        [] {}, [] {});
    // 8 twice, then c2 = 0.75 * 8 * 1000 / 180 = 33 fails; the whole batch is
    // rolled back, so 8 runs twice again before 33 (else 33 would run first
    // and measure only a bound, and the jump would not be the fit's).
    REQUIRE(sizes.size() >= 7);
    CHECK(sizes[0] == 8);
    CHECK(sizes[1] == 8);
    CHECK(sizes[2] == 33);
    CHECK(sizes[3] == 8);
    CHECK(sizes[4] == 8);
    CHECK(sizes[5] == 33);
    CHECK(sizes[6] == 81);  // the fit: (980 - 100) / (10 * 1.08)
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().calibrations == 4);
}

TEST_CASE("predictive calibrates inside the retried batch, keeps that work, and jumps within it") {
    Workload w(1000 * KiB, 100 * KiB, 10 * KiB);  // fits m <= 90
    BatchOptions o;
    o.global_batch = 256;
    o.policy = ShrinkPolicy::predictive(0.02);
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    std::vector<std::size_t> sizes;
    std::vector<bool> calibration;
    int rollbacks = 0;
    BatchResult r = a.run(
        [&](MicroBatch const& mb) {
            sizes.push_back(mb.size);
            calibration.push_back(mb.calibration);
            w.step(mb);
        },
        [] {}, [&] { ++rollbacks; });
    // 256 fails, needing at least 2660 KiB where 1000 KiB were available: the
    // first calibration size is half of a quarter of what that bound allows:
    // 256 * 1000 / (4 * 2660) = 24, halved. 12 runs twice (the batch's first
    // micro-batch, and one after it); its 220 KiB, scaled to the 1000 KiB a
    // step may reach, put the second at 0.75 * 12 * 1000 / 220 = 40. All three
    // are measured and kept, and the rest of the batch runs at the fitted
    // size: (980 - 100) / (10 * 1.08) = 81.
    REQUIRE(sizes.size() >= 5);
    CHECK(sizes[0] == 256);
    CHECK(sizes[1] == 12);
    CHECK(calibration[1]);
    CHECK(sizes[2] == 12);
    CHECK(calibration[2]);
    CHECK(sizes[3] == 40);
    CHECK_FALSE(calibration[3]);
    CHECK(sizes[4] == 81);
    CHECK(rollbacks == 1);  // only the first, failed attempt
    CHECK(r.attempts == 2);
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().wasted_samples == 0);
    CHECK(a.counters().calibrations == 2);
    std::size_t total = 0;
    for (std::size_t i = 1; i < sizes.size(); ++i) total += sizes[i];
    CHECK(total == 256);
}

TEST_CASE("with resume, attempts that kept a micro-batch do not count toward max_attempts") {
    for (bool resume : {true, false}) {
        CAPTURE(resume);
        Workload w(1024 * KiB, 0, KiB);
        BatchOptions o;
        o.global_batch = 64;
        o.micro_batch = 4;
        o.max_attempts = 3;
        o.resume = resume;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        std::size_t calls = 0;
        auto step = [&](MicroBatch const& mb) {
            if (++calls % 2 == 0) w.gpus.fail_next(0, 1);  // every other micro-batch meets a burst
            w.step(mb);
        };
        if (resume) {
            BatchResult r = a.run(step, [] {}, [] {});
            CHECK(r.attempts > 3);  // many attempts, each one kept a micro-batch
            CHECK(a.counters().give_ups == 0);
        } else {
            CHECK_THROWS_AS(a.run(step, [] {}, [] {}), recovery_failed);
        }
    }
}

TEST_CASE("with resume, a give-up by an error in the failure path still undoes the kept micro-batches") {
    Workload w(1024 * KiB, 0, KiB);
    BatchOptions o;
    o.global_batch = 32;
    o.micro_batch = 8;
    o.resume = true;
    o.transient_retries = 0;
    o.policy = ShrinkPolicy::custom([](ShrinkContext const&, void*) -> std::size_t {
        throw std::runtime_error("policy bug");
    });
    AdaptiveBatch a(o);
    int applied = 0, rollbacks = 0;
    CHECK_THROWS_WITH_AS(a.run(
                             [&](MicroBatch const& mb) {
                                 if (mb.offset == 16) w.gpus.fail_next(0, 1);
                                 w.step(mb);
                                 ++applied;
                             },
                             [] {},
                             [&] {
                                 ++rollbacks;
                                 applied = 0;
                             }),
                         "policy bug", std::runtime_error);
    CHECK(rollbacks == 1);
    CHECK(applied == 0);
}

TEST_CASE("reduce: a null combine is a bad argument; one that throws leaves the batch uncommitted") {
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    int (*null_combine)(int, int) = nullptr;
    CHECK_THROWS_WITH_AS(a.reduce([](MicroBatch const&) { return 1; }, 0, null_combine),
                         doctest::Contains("the combine is empty"), std::invalid_argument);
    int commits = 0;
    CHECK_THROWS_WITH_AS(a.reduce([](MicroBatch const&) { return 1; }, 0,
                                  [](int, int) -> int { throw std::runtime_error("combine bug"); }, [&] { ++commits; },
                                  [] {}),
                         "combine bug", std::runtime_error);
    CHECK(commits == 0);
}

TEST_CASE("a give-up after many attempts still shows the last error and its advice first") {
    Workload w(64 * KiB, 0, 80 * KiB);  // not even one sample fits
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 64;
    o.max_attempts = 30;
    o.transient_retries = 100;
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    try {
        a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
        FAIL("expected recovery_failed");
    } catch (recovery_failed const& e) {
        std::string s = e.what();
        CAPTURE(s);
        CHECK(s.find("gave up on a global batch of 64 after 7 attempts") != std::string::npos);
        CHECK(s.find("last error: oomguard: out of memory") < s.find("attempts: ["));
        CHECK(s.find("Advice:") != std::string::npos);
        CHECK(s.find("... (2 more) ...") != std::string::npos);
        CHECK(s.find("[m=64 fp32 GPU 0, failed at 64 after 0 samples]") != std::string::npos);
        CHECK(s.find("[m=1 fp32 GPU 0, failed at 1 after 0 samples]") != std::string::npos);
    }
}

TEST_CASE("an OOM's advice: a smaller batch inside a step, setup advice outside one") {
    Workload w(100 * KiB, 0, KiB);
    Budget capped(w.gpus, 0, Limit::bytes(10 * KiB));
    auto what = [](Budget& b) {
        try {
            b.allocate(200 * KiB);
        } catch (out_of_memory const& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    // Setup (weights, optimizer state) runs before any step: a batch is no lever there.
    std::string const device_setup = what(w.budget), budget_setup = what(capped);
    BatchOptions o;
    o.global_batch = 4;
    AdaptiveBatch a(o);
    std::string device_step, budget_step;
    a.run(
        [&](MicroBatch const&) {
            if (device_step.empty()) device_step = what(w.budget);  // swallowed here: the test reads it
            if (budget_step.empty()) budget_step = what(capped);
        },
        [] {}, [] {});
    std::string const device_after = what(w.budget);
    for (std::string const* s : {&device_step, &budget_step}) {
        CAPTURE(*s);
        CHECK(s->find("lower the batch") != std::string::npos);
        CHECK(s->find("outside an adaptive_batch step") == std::string::npos);
    }
    for (std::string const* s : {&device_setup, &budget_setup, &device_after}) {
        CAPTURE(*s);
        CHECK(s->find("lower the batch") == std::string::npos);
        CHECK(s->find("outside an adaptive_batch step (setup: model weights, optimizer state)") != std::string::npos);
        CHECK(s->find("lower the precision of the weights") != std::string::npos);
    }
    CHECK(budget_setup.find("raise the budget") != std::string::npos);
    CHECK(device_setup.find("free memory held elsewhere") != std::string::npos);
    CHECK(device_setup.find("DeviceSelector") != std::string::npos);
}

TEST_CASE("observers see each global batch and micro-batch: its samples, what it held and its peak; an OOM's demand") {
    Workload w(100 * KiB, 0, 4 * KiB);  // fits 25 samples at a time
    Buffer weights(w.budget, 10 * KiB);  // held across steps
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    o.global_batch = 40;
    o.micro_batch = 40;
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    std::vector<BatchEvent> events;
    auto watching = a.observe([&](BatchEvent const& e) { events.push_back(e); });
    a.run([&](MicroBatch const& mb) { w.step(mb); }, [] {}, [] {});
    std::vector<BatchEventKind> kinds;
    std::string names;
    for (auto const& e : events) {
        kinds.push_back(e.kind);
        names += std::string(to_string(e.kind)) + " ";
    }
    CAPTURE(names);
    using K = BatchEventKind;
    // m=40 fails (no cache registered: nothing released); halve to 20: two micro-batches of 20.
    std::vector<K> const expected{K::batch_begin,       K::micro_batch_begin, K::oom_caught,
                                  K::shrink,            K::micro_batch_begin, K::micro_batch_end,
                                  K::micro_batch_begin, K::micro_batch_end,   K::commit};
    REQUIRE(kinds == expected);
    BatchEvent const& oom = events[2];
    CHECK(oom.offset == 0);
    CHECK(oom.size == 40);
    CHECK(oom.bytes == 160 * KiB);  // the request
    CHECK(oom.held == 10 * KiB);    // the weights: the micro-batch wanted 170 KiB
    CHECK(events[4].offset == 0);
    CHECK(events[4].size == 20);
    BatchEvent const& end2 = events[7];
    CHECK(end2.offset == 20);
    CHECK(end2.size == 20);
    CHECK(end2.held == 10 * KiB);
    CHECK(end2.bytes == 80 * KiB);
    CHECK(end2.to.micro_batch == 20);
    // Unmeasured: held is unknown, the peak 0.
    AdaptiveBatch b(o);
    events.clear();
    auto watching_b = b.observe([&](BatchEvent const& e) { events.push_back(e); });
    b.run([&](MicroBatch const&) {}, [] {}, [] {});
    REQUIRE(events.size() == 4);
    CHECK(events[2].kind == K::micro_batch_end);
    CHECK(events[2].held == oom_info::unknown);
    CHECK(events[2].bytes == 0);
}

namespace {
// A meter of an allocator oomguard does not own (libtorch's caching allocator is one):
// it counts its own bytes, and its OOM is the library's, not a budget's.
struct CountingMeter {
    std::size_t capacity, held = 0, high = 0, resets = 0;
    int device() const { return 0; }
    std::size_t used() const { return held; }
    std::size_t peak() const { return high; }
    std::size_t reset_peak() {
        ++resets;
        std::size_t old = high;
        high = held;
        return old;
    }
    void raise_peak(std::size_t v) { high = v > high ? v : high; }
    std::size_t available() const { return capacity - held; }
    void take(std::size_t b) {
        if (b > capacity - held) throw std::runtime_error("CUDA out of memory. Tried to allocate (a library's OOM)");
        held += b;
        raise_peak(held);
    }
    void give(std::size_t b) { held -= b; }
};
}  // namespace

TEST_CASE("measure_with takes any meter: the predictive policy fits what it measures") {
    static_assert(detail::is_meter<CountingMeter>::value, "a meter");
    static_assert(!detail::is_meter<Budget>::value, "a budget has its own overload");
    static_assert(!detail::is_meter<int>::value, "not a meter");
    struct Int64Meter {  // c10's statistics are int64_t
        int device() const { return 0; }
        std::int64_t used() const { return 0; }
        std::int64_t peak() const { return 0; }
        std::int64_t reset_peak() { return 0; }
        void raise_peak(std::size_t) {}
        std::int64_t available() const { return 0; }
    };
    static_assert(detail::is_meter<Int64Meter>::value, "any integer type");
    struct DerivedBudget : Budget {
        using Budget::Budget;
    };
    static_assert(!detail::is_meter<DerivedBudget>::value, "a budget, derived or not, has its own overload");
    CountingMeter meter{200 * KiB};
    BatchOptions o;
    o.global_batch = 256;
    o.policy = ShrinkPolicy::predictive();
    AdaptiveBatch a(o);
    a.measure_with(meter);
    std::vector<std::pair<std::size_t, std::size_t>> calibration;  // size, measured bytes
    auto watching = a.observe([&](BatchEvent const& e) {
        if (e.kind == BatchEventKind::calibration) calibration.push_back({e.to.micro_batch, e.bytes});
    });
    auto step = [&](MicroBatch const& mb) {  // 1 KiB a sample
        meter.take(mb.size * KiB);
        meter.give(mb.size * KiB);
    };
    a.run(step, [] {}, [] {});
    REQUIRE(calibration.size() == 2);  // the calibration size twice
    CHECK(calibration[0].first > 0);
    CHECK(calibration[0].second == calibration[0].first * KiB);  // measured through the meter
    CHECK(meter.resets >= 3);
    CHECK(a.plan().micro_batch >= 180);  // the fit: close to the 200 that fit, under the margin
    CHECK(a.plan().micro_batch <= 200);
    CHECK(meter.held == 0);
}

namespace {
// A caching allocator's meter: used() counts its reserve, free blocks and all,
// as a budget under it does; its segments empty themselves when a segment
// allocation fails, before the one more try that fails too.
struct ReserveMeter {
    std::size_t capacity = 1000, held = 0, high = 0;
    int device() const { return 0; }
    std::size_t used() const { return held; }
    std::size_t peak() const { return high; }
    std::size_t reset_peak() {
        std::size_t old = high;
        high = held;
        return old;
    }
    void raise_peak(std::size_t v) { high = v > high ? v : high; }
    std::size_t available() const { return capacity - held; }
};
}  // namespace

TEST_CASE("a failure with less held than its micro-batch began with is the size's need, not an unknown one") {
    // G = 64 at 32 under bisection: the first batch completes at 32 (a size
    // that completed). In the second, micro-batch 2 begins with 700 held (300
    // of it free blocks of the reserve), the allocator empties those when its
    // segment of 600 fails and tries again: the denial says 500 held, 600
    // asked, 1100 in all against 1000. Read as "held below the base: need
    // unknown", a completed size that fails is retried as a transient; it is
    // a data point, and the size shrinks.
    ReserveMeter meter;
    meter.held = 400;
    BatchOptions o;
    o.global_batch = 64;
    o.micro_batch = 32;
    o.policy = ShrinkPolicy::bisect();
    o.release_caches = false;
    AdaptiveBatch a(o);
    a.measure_with(meter);
    int batch = 0;
    bool failed = false;
    auto step = [&](MicroBatch const& mb) {
        if (batch == 1 && mb.offset > 0 && !failed) {
            failed = true;
            meter.held = 400;  // the allocator emptied its free blocks: 500 with the failed micro-batch's
            oom_info info;
            info.requested = 600;
            info.budget_used = 500;
            info.free = 500;
            throw out_of_memory(info);
        }
        meter.raise_peak(meter.held + 200);
        // The second batch's first micro-batch leaves 300 of free blocks in the reserve.
        if (batch == 1 && mb.offset == 0 && !failed) meter.held = 700;
    };
    a.run(step, [] {}, [] {});
    REQUIRE(a.counters().ooms == 0);
    batch = 1;
    a.run(step, [] {}, [] {});
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().retries_same == 0);
    CHECK(a.counters().shrinks == 1);
    CHECK(a.plan().micro_batch < 32);
}

TEST_CASE("measured, a release that frees only what the failed micro-batch left cached earns no retry") {
    // A caching step: it frees its first buffer (5 KiB a sample) into a cache
    // it keeps, then asks for 10 KiB a sample. At 64 on 800 KiB: 320 cached
    // + 640 > 800. The release after the OOM frees those 320, but the failed
    // micro-batch put them there itself, and a retry would cache them again
    // and fail the same way: the size shrinks at once, at one OOM.
    SimulatedDevices gpus(1, 800 * KiB);
    Budget budget(gpus, 0, Limit::unlimited());
    CacheRegistry reg;
    std::vector<Buffer> cached;
    auto held = [&] {
        std::size_t n = 0;
        for (auto const& b : cached) n += b.size();
        return n;
    };
    auto r = reg.add("step's pool", 0, held, [&] {
        std::size_t const n = held();
        cached.clear();
        return n;
    });
    BatchOptions o;
    o.global_batch = 64;
    o.policy = ShrinkPolicy::bisect();
    o.caches = &reg;
    AdaptiveBatch a(o);
    a.measure_with(budget);
    a.run(
        [&](MicroBatch const& mb) {
            cached.emplace_back(budget, mb.size * 5 * KiB);  // used, then kept for reuse
            Buffer big(budget, mb.size * 10 * KiB);
        },
        [] {}, [] {});
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().retries_same == 0);
    CHECK(a.counters().shrinks == 1);
    CHECK(a.last_good_plan().micro_batch == 32);  // (bisection probes 48 next)
    cached.clear();
    CHECK(budget.used() == 0);
}

TEST_CASE("a meter whose used() leaves out the caches' bytes: they are not subtracted from the batch's base") {
    // 300 held when the batch begins, 200 of it in a registered cache's
    // estimate. A budget (or any meter by default) counts the cache among
    // what it holds: the base is 300 - 200. A caching allocator's meter of
    // bytes in use (counts_cached() false) does not: the base is all 300.
    struct InUseMeter : ReserveMeter {
        static constexpr bool counts_cached() noexcept { return false; }
    };
    static_assert(detail::is_meter<InUseMeter>::value, "a meter");
    CacheRegistry reg;
    auto r = reg.add("allocator's reserve", 0, [] { return std::size_t{200}; }, [] { return std::size_t{0}; });
    BatchOptions o;
    o.global_batch = 64;
    o.micro_batch = 32;
    o.caches = &reg;
    auto run_once = [&](auto& meter) {
        meter.held = 300;
        AdaptiveBatch a(o);
        a.measure_with(meter);
        a.run([&](MicroBatch const&) { meter.raise_peak(meter.held + 100); }, [] {}, [] {});
        REQUIRE(a.planner().model().has_base);
        return a.planner().model().base;
    };
    ReserveMeter counts;
    InUseMeter in_use;
    CHECK(run_once(counts) == 100);
    CHECK(run_once(in_use) == 300);
}

TEST_CASE("an OOM caused only by frees pending on another stream: release synchronizes, the same size again") {
    SimulatedDevices sim(1, 1024 * KiB);
    Budget budget(sim, 0);
    CacheRegistry reg;
    SimulatedPendingFrees pending(sim, 0);
    auto r = reg.add("stream-ordered pool", 0, pending);
    {  // a previous phase freed 800 KiB on stream 9 and never synchronized
        void* p = budget.allocate_async(800 * KiB, 9);
        budget.deallocate_async(p, 800 * KiB, 9);
    }
    BatchOptions o;
    o.global_batch = 128;
    o.micro_batch = 64;
    o.caches = &reg;
    AdaptiveBatch a(o);
    a.measure_with(budget);
    auto step = [&](MicroBatch const& mb) { StreamBuffer buf(budget, mb.size * 4 * KiB, SimulatedDevices::stream_type{1}); };
    BatchResult res = a.run(step, [] {}, [] {});
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().retries_same == 1);  // the release freed 800 KiB: the same size once more
    CHECK(a.counters().shrinks == 0);
    CHECK(a.counters().bytes_released == 800 * KiB);
    CHECK(res.plan.micro_batch == 64);
    REQUIRE(sim.synchronize(0).ok());
    CHECK(sim.live_bytes() == 0);
    CHECK(budget.used() == 0);
}

TEST_CASE("an OOM in commit is charged to max_attempts with resume too: a commit that always fails gives up") {
    // An optimizer whose step() always runs out of memory. With resume, an
    // attempt that completed micro-batches but failed in commit keeps nothing,
    // so it made no progress: it counts, and it does not restart the retries.
    for (bool resume : {true, false}) {
        CAPTURE(resume);
        Workload w(1024 * KiB, 0, KiB);
        BatchOptions o;
        o.global_batch = 64;
        o.micro_batch = 16;
        o.resume = resume;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        int commits = 0, rollbacks = 0;
        auto commit = [&] {
            ++commits;
            REQUIRE(commits < 200);  // the defect: retried forever at the same size
            Buffer state(w.budget, 2048 * KiB);  // the optimizer's state never fits
        };
        CHECK_THROWS_AS(a.run([&](MicroBatch const& mb) { w.step(mb); }, commit, [&] { ++rollbacks; }),
                        recovery_failed);
        // The transient retries (3), one shrink for the commit, and the give-up:
        // shrinking the micro-batch twice cannot help a commit that needs the same.
        CHECK(commits == 5);
        CHECK(a.counters().commit_ooms == 5);
        CHECK(a.counters().shrinks == 1);
        CHECK(a.counters().give_ups == 1);
        CHECK(a.plan().micro_batch == 16);  // back at the last good plan
        CHECK(w.budget.used() == 0);
    }
}

TEST_CASE("an observer that owns another observer's registration on the same batch: each is destroyed once") {
    // Destroying the outer observer detaches the inner one from inside the
    // list's sweep (an observer that co-owns a Report of the same batch): the
    // sweep must not destroy anything twice.
    BatchOptions o;
    o.global_batch = 4;
    AdaptiveBatch batch(o);
    int destroyed = 0;
    struct Counted {
        int* n;
        ~Counted() { ++*n; }
    };
    auto counted = std::shared_ptr<Counted>(new Counted{&destroyed});
    auto inner = std::make_shared<ObserverRegistration>(batch.observe([counted](BatchEvent const&) {}));
    counted.reset();
    ObserverRegistration outer = batch.observe([inner](BatchEvent const&) {});
    inner.reset();  // only the outer observer owns the inner registration now
    batch.run([](MicroBatch const&) {}, [] {}, [] {});
    outer.detach();
    CHECK(destroyed == 1);
    // The same from inside an event: the outer observer detaches itself.
    int destroyed2 = 0;
    auto counted2 = std::shared_ptr<Counted>(new Counted{&destroyed2});
    auto inner2 = std::make_shared<ObserverRegistration>(batch.observe([counted2](BatchEvent const&) {}));
    counted2.reset();
    ObserverRegistration self;
    self = batch.observe([inner2, &self](BatchEvent const& e) {
        if (e.kind == BatchEventKind::commit) self.detach();
    });
    inner2.reset();
    batch.run([](MicroBatch const&) {}, [] {}, [] {});
    CHECK(destroyed2 == 1);
    CHECK_FALSE(self);
}

TEST_CASE("an OOM another library raises over oomguard's, noted with note_rewrapped, keeps the budget's figures") {
    // libtorch's allocator catches the budget's out_of_memory and throws its
    // own error, without oomguard's figures: the runner takes them from the
    // budget's denial under it, so the planner still sees what was asked and held.
    Workload w(1000 * KiB, 100 * KiB, 10 * KiB);  // fits m <= 90
    BatchOptions o;
    o.global_batch = 256;
    o.policy = ShrinkPolicy::predictive(0.02);
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    std::vector<BatchEvent> caught;
    std::vector<std::string> texts;  // an event's `what` lives as long as the call
    auto watching = a.observe([&](BatchEvent const& e) {
        if (e.kind != BatchEventKind::oom_caught) return;
        caught.push_back(e);
        texts.push_back(e.what);
    });
    a.run([&](MicroBatch const& mb) {
        try {
            w.step(mb);
        } catch (out_of_memory const& e) {
            note_rewrapped(e);
            throw std::runtime_error("CUDA error: out of memory");  // a CUDA_CHECK's text, figures gone
        }
    }, [] {}, [] {});
    REQUIRE(!caught.empty());
    CHECK(caught[0].bytes == (100 + 10 * 256) * KiB);  // what the denied request asked for
    CHECK(caught[0].held == 0);                        // held under the budget when it was denied
    CHECK(texts[0] == "CUDA error: out of memory");
    CHECK(a.last_observation().need == 0);  // the last attempt completed
    CHECK(a.plan().micro_batch <= 90);
    CHECK(a.counters().ooms <= 2);  // the need told the calibration where to measure
}

TEST_CASE("with a meter, another process's burst is a transient: the same size again, and the plan stays") {
    for (auto policy : {ShrinkPolicy::halve(), ShrinkPolicy::bisect(), ShrinkPolicy::predictive()}) {
        CAPTURE(std::string(policy.name()));
        SimulatedDevices gpus(1, 1024 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 64;
        o.policy = policy;
        AdaptiveBatch a(o);
        a.measure_with(budget);
        bool burst = false;
        auto step = [&](MicroBatch const& mb) {
            if (burst) {  // another process takes the device for a moment
                gpus.set_used_by_others(0, 900 * KiB);
                burst = false;
            }
            Buffer act(budget, mb.size * 10 * KiB);  // fits 102 samples
        };
        auto rollback = [&] { gpus.set_used_by_others(0, 0); };  // gone by the retry
        a.run(step, [] {}, rollback);
        burst = true;
        for (int i = 0; i < 6; ++i) a.run(step, [] {}, rollback);
        CHECK(a.plan().micro_batch == 64);
        CHECK(a.counters().retries_same == 1);
        CHECK(a.counters().shrinks == 0);
        CHECK(a.planner().model().high == 0);  // no search ceiling from a burst
    }
}

TEST_CASE("a workspace cache sized for a smaller micro-batch is emptied before a larger one runs, not after its OOM") {
    // The step keeps its activations as a workspace (a cache) and allocates a
    // larger one while the old is held, as a caching allocator would: at 48
    // after 32, the 32 KiB workspace + 48 + 24 over 20 held is 124 KiB > 100;
    // emptied first, 92 fits.
    SimulatedDevices gpus(1, 100 * KiB);
    Budget budget(gpus, 0, Limit::unlimited());
    Buffer held(budget, 20 * KiB);
    std::unique_ptr<Buffer> workspace;
    std::size_t workspace_samples = 0;
    CacheRegistry reg;
    auto r = reg.add("workspace", 0, [&] { return workspace ? workspace->size() : 0; }, [&] {
        std::size_t b = workspace ? workspace->size() : 0;
        workspace.reset();
        workspace_samples = 0;
        return b;
    });
    BatchOptions o;
    o.global_batch = 64;
    o.grow_after = 1;
    o.caches = &reg;
    o.policy = ShrinkPolicy::halve();  // written for halving (the default is auto)
    AdaptiveBatch a(o);
    std::vector<std::size_t> sizes;
    auto step = [&](MicroBatch const& mb) {
        sizes.push_back(mb.size);
        Buffer temp(budget, mb.size * KiB / 2);
        if (workspace_samples < mb.size) {
            auto grown = std::make_unique<Buffer>(budget, mb.size * KiB);  // the old one still held
            workspace = std::move(grown);
            workspace_samples = mb.size;
        }
    };
    auto none = [] {};
    a.run(step, none, none);  // 64 needs 116 KiB: one OOM, then 32 twice
    CHECK(a.counters().ooms == 1);
    CHECK(a.plan().micro_batch == 32);
    std::size_t const releases = a.counters().releases;
    CHECK(releases == 1);  // after the OOM only: the second 32 reuses the workspace
    a.run(step, none, none);  // the grow-back to 48: the workspace of 32 is emptied before it runs
    CHECK(a.plan().micro_batch == 48);
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().releases == releases + 1);
    CHECK(sizes == std::vector<std::size_t>{64, 32, 32, 48, 16});
}

namespace {
// A pool that keeps each freed block for a request of exactly its size, as a
// per-shape buffer pool does: blocks of one batch's shapes are held, unusable,
// while the next batch's shapes are allocated afresh.
struct ShapePool {
    Budget& budget;
    std::vector<Buffer> free_blocks;
    explicit ShapePool(Budget& b) : budget(b) {}
    Buffer take(std::size_t bytes) {
        for (auto it = free_blocks.begin(); it != free_blocks.end(); ++it)
            if (it->size() == bytes) {
                Buffer b = std::move(*it);
                free_blocks.erase(it);
                return b;
            }
        return Buffer(budget, bytes);
    }
    void give(Buffer b) { free_blocks.push_back(std::move(b)); }
    std::size_t held() const {
        std::size_t n = 0;
        for (auto const& b : free_blocks) n += b.size();
        return n;
    }
    std::size_t release() {
        std::size_t const n = held();
        free_blocks.clear();
        return n;
    }
};

// A GPU of `capacity` bytes whose steps draw from a ShapePool registered as a
// cache; `before_release` runs at each release (it may throw), after
// `releases` counts it.
struct PooledGpu {
    SimulatedDevices gpus;
    Budget budget;
    ShapePool pool;
    CacheRegistry reg;
    int releases = 0;
    std::function<void(int)> before_release;
    CacheRegistration registration;
    explicit PooledGpu(std::size_t capacity, std::function<void(int)> hook = nullptr)
        : gpus(1, capacity), budget(gpus, 0, Limit::unlimited()), pool(budget), before_release(std::move(hook)),
          registration(reg.add("shape pool", 0, [this] { return pool.held(); }, [this] {
              ++releases;
              if (before_release) before_release(releases);
              return pool.release();
          })) {}
    ~PooledGpu() { pool.release(); }
    BatchOptions options(std::size_t G, ShrinkPolicy policy) {
        BatchOptions o;
        o.global_batch = G;
        o.caches = &reg;
        o.policy = policy;
        return o;
    }
};
}  // namespace

TEST_CASE("an OOM of a step that began with cached blocks: the caches go before every later batch") {
    // Each global batch has its own sample size (bucketed sequence lengths):
    // 4, 5, 6, 7 KiB a sample, micro-batches of 32 on 256 KiB. Batch 2 needs
    // 160 KiB while batch 1's 128 KiB block sits in the pool: 288 > 256, an
    // OOM, a release, the same size again. From then on the pool is emptied
    // before each batch, and batches 3 and 4 (192 and 224 KiB after 160 and
    // 192 cached) need no OOM to get there. Without it: an OOM every batch.
    PooledGpu gpu(256 * KiB);
    ShapePool& pool = gpu.pool;
    BatchOptions o = gpu.options(64, ShrinkPolicy::bisect());
    o.micro_batch = 32;
    AdaptiveBatch a(o);
    std::size_t per_sample = 4 * KiB;
    std::vector<std::pair<BatchEventKind, unsigned>> events;
    auto seen = a.observe([&](BatchEvent const& e) {
        if (e.kind != BatchEventKind::micro_batch_begin && e.kind != BatchEventKind::micro_batch_end)
            events.emplace_back(e.kind, e.attempt);
    });
    auto step = [&](MicroBatch const& mb) { pool.give(pool.take(mb.size * per_sample)); };
    auto none = [] {};
    a.run(step, none, none);
    CHECK(a.counters().ooms == 0);
    CHECK_FALSE(a.release_before_batches());
    per_sample = 5 * KiB;
    a.run(step, none, none);
    CHECK(a.counters().ooms == 1);
    CHECK(a.counters().retries_same == 1);
    CHECK(a.release_before_batches());
    CHECK(a.learned().release_before_batches);
    CHECK(a.plan().micro_batch == 32);
    for (std::size_t kib : {6, 7}) {
        per_sample = kib * KiB;
        events.clear();
        std::size_t const releases = a.counters().releases;
        a.run(step, none, none);
        CHECK(a.counters().ooms == 1);
        CHECK(a.counters().releases == releases + 1);
        REQUIRE(events.size() == 3);  // the release comes ahead of any attempt (attempt 0)
        CHECK(events[0].first == BatchEventKind::batch_begin);
        CHECK(events[1] == std::make_pair(BatchEventKind::released, 0u));
        CHECK(events[2].first == BatchEventKind::commit);
    }
    a.reset();
    CHECK_FALSE(a.release_before_batches());
    pool.release();
    CHECK(gpu.budget.used() == 0);
}

namespace {
// Batch 1 at 4 KiB a sample, batch 2 at 5 KiB: an OOM on batch 1's cached
// block, after which the caches go before each batch; the third batch's
// release throws what `release_error` makes (nothing: none). Returns what
// run() threw in batch 3 ("" when it committed) and the sizes batch 3 ran.
std::pair<std::string, std::vector<std::size_t>> third_batch_release(std::function<void()> release_error,
                                                                     ThreadConsensus* tc = nullptr) {
    PooledGpu gpu(256 * KiB, [&](int n) {
        if (n == 2 && release_error) release_error();
    });
    ShapePool& pool = gpu.pool;
    BatchOptions o = gpu.options(64, ShrinkPolicy::bisect());
    o.micro_batch = 32;
    AdaptiveBatch a(o);
    if (tc != nullptr) a.consensus(tc->hook());
    std::size_t per_sample = 4 * KiB;
    std::vector<std::size_t> sizes;
    auto step = [&](MicroBatch const& mb) {
        mb.sync();
        sizes.push_back(mb.size);
        pool.give(pool.take(mb.size * per_sample));
    };
    a.run(step, [] {}, [] {});
    per_sample = 5 * KiB;
    a.run(step, [] {}, [] {});
    REQUIRE(a.release_before_batches());
    REQUIRE(gpu.releases == 1);
    per_sample = 6 * KiB;
    sizes.clear();
    std::string what;
    try {
        a.run(step, [] {}, [] {});
    } catch (recovery_failed const& e) {
        what = std::string("recovery_failed: ") + e.what();
    } catch (std::exception const& e) {
        what = e.what();
    }
    return {what, sizes};
}
}  // namespace

TEST_CASE("the release before a batch: an OOM in it is a courtesy's, anything else passes, on every rank together") {
    auto ran = third_batch_release(nullptr);
    CHECK(ran.first.empty());
    CHECK(ran.second == std::vector<std::size_t>{32, 32});
    ran = third_batch_release([] { throw out_of_memory(oom_info{}); });
    CHECK(ran.first.empty());  // the batch runs as if it had not been asked: it fails on the cache, once
    CHECK(ran.second == std::vector<std::size_t>{32, 32, 32});
    ran = third_batch_release([] { throw std::runtime_error("the pool's stream is gone"); });
    CHECK(ran.first == "the pool's stream is gone");  // as thrown, before any step
    CHECK(ran.second.empty());
    // With ranks: rank 1's release throws. Rank 0 does not wait for it in
    // its first step: both leave at the first attempt's agreement.
    ThreadConsensus tc(2);
    std::pair<std::string, std::vector<std::size_t>> ranks[2];
    std::thread r0([&] { ranks[0] = third_batch_release(nullptr, &tc); });
    std::thread r1([&] { ranks[1] = third_batch_release([] { throw std::runtime_error("the pool's stream is gone"); }, &tc); });
    r0.join();
    r1.join();
    CHECK(ranks[1].first == "the pool's stream is gone");
    CHECK(ranks[0].first.rfind("recovery_failed: ", 0) == 0);
    CHECK(ranks[0].second.empty());
    CHECK(ranks[1].second.empty());
}

TEST_CASE("a cache that says it holds bytes and frees none teaches nothing by an OOM") {
    SimulatedDevices gpus(1, 300 * KiB);
    Budget budget(gpus, 0, Limit::unlimited());
    CacheRegistry reg;
    auto r = reg.add("tails of live segments", 0, [] { return 4 * KiB; }, [] { return std::size_t{0}; });
    BatchOptions o;
    o.global_batch = 64;
    o.caches = &reg;
    o.policy = ShrinkPolicy::halve();
    AdaptiveBatch a(o);
    auto step = [&](MicroBatch const& mb) { Buffer b(budget, mb.size * 8 * KiB); };  // 64: 512 KiB
    a.run(step, [] {}, [] {});
    CHECK(a.counters().ooms == 1);
    CHECK_FALSE(a.release_before_batches());
    std::size_t const releases = a.counters().releases;
    a.run(step, [] {}, [] {});
    CHECK(a.counters().releases == releases);
}

TEST_CASE("an OOM of a step that began with the caches empty teaches nothing about them") {
    // 96 KiB at 64 on 80 KiB: the first micro-batch of the run fails with
    // nothing cached. The 48 KiB blocks of 32 stay cached and are reused.
    PooledGpu gpu(80 * KiB);
    ShapePool& pool = gpu.pool;
    AdaptiveBatch a(gpu.options(64, ShrinkPolicy::halve()));
    auto step = [&](MicroBatch const& mb) { pool.give(pool.take(mb.size * 3 * KiB / 2)); };
    auto none = [] {};
    a.run(step, none, none);
    CHECK(a.counters().ooms == 1);
    CHECK_FALSE(a.release_before_batches());
    std::size_t const releases = a.counters().releases;
    a.run(step, none, none);
    CHECK(a.counters().releases == releases);  // the 48 KiB block is reused, not let go
    CHECK(a.counters().ooms == 1);
    pool.release();
}

TEST_CASE("a commit that adds state over 1 MiB: the caches go once, before the next batch") {
    // The step's 4 MiB block goes back to a pool; the first commit adds what
    // stays (an optimizer's moments). Over 1 MiB the pool is emptied before
    // batch 2 (once: batch 3 reuses it); exactly 1 MiB (a caching allocator's
    // small blocks) it is not.
    constexpr std::size_t MiB = 1024 * KiB;
    for (std::size_t state : {MiB + 1, MiB}) {
        CAPTURE(state);
        PooledGpu gpu(64 * MiB);
        ShapePool& pool = gpu.pool;
        Budget& budget = gpu.budget;
        AdaptiveBatch a(gpu.options(8, ShrinkPolicy::automatic()));
        a.measure_with(budget);
        std::vector<Buffer> moments;
        auto step = [&](MicroBatch const& mb) { pool.give(pool.take(mb.size * MiB / 2)); };
        auto commit = [&] {
            if (moments.empty()) moments.emplace_back(budget, state);
        };
        a.run(step, commit, [] {});
        REQUIRE(a.last_observation().commit_growth == state);
        std::size_t const releases = a.counters().releases;
        a.run(step, commit, [] {});
        CHECK(a.counters().releases == releases + (state > MiB ? 1 : 0));
        a.run(step, commit, [] {});
        CHECK(a.counters().releases == releases + (state > MiB ? 1 : 0));
        CHECK(a.counters().ooms == 0);
        CHECK_FALSE(a.release_before_batches());
        // reset() forgets a growth not yet answered: a new state's commit, then reset.
        moments.clear();
        a.run(step, commit, [] {});
        std::size_t const before_reset = a.counters().releases;
        a.reset();
        a.run(step, commit, [] {});
        CHECK(a.counters().releases == before_reset);
        pool.release();
    }
}

TEST_CASE("the default policy: predictive with a meter, bisect without; predictive without one is refused") {
    BatchOptions o;
    o.global_batch = 64;
    CHECK(o.policy.kind() == ShrinkPolicy::Kind::automatic);
    CHECK(std::string(o.policy.name()) == "auto");
    // Without a meter: bisection, which probes above the size that held (halving stays at 32).
    Workload w(1024 * KiB, 0, 14 * KiB);                        // 14 KiB per sample
    w.gpus.set_used_by_others(0, 1024 * KiB - 40 * 14 * KiB);  // room for 40 samples
    AdaptiveBatch a(o);
    auto step = [&](MicroBatch const& mb) { w.step(mb); };
    auto none = [] {};
    a.run(step, none, none);  // 64 fails, 32 holds; the probe comes next batch
    CHECK(a.policy().kind() == ShrinkPolicy::Kind::bisect);
    CHECK(a.plan().micro_batch == 48);
    for (int i = 0; i < 6; ++i) a.run(step, none, none);
    CHECK(a.plan().micro_batch == 40);  // the largest that fits, where halving stays at 32
    // With a meter: predictive.
    Workload v(1024 * KiB, 0, 14 * KiB);
    AdaptiveBatch b(o);
    b.measure_with(v.budget);
    b.run([&](MicroBatch const& mb) { v.step(mb); }, none, none);
    CHECK(b.policy().kind() == ShrinkPolicy::Kind::predictive);
    // predictive chosen by name without a meter: an error naming measure_with.
    o.policy = ShrinkPolicy::predictive();
    AdaptiveBatch c(o);
    CHECK_THROWS_WITH_AS(c.run(step, none, none), doctest::Contains("measure_with"), std::invalid_argument);
}

TEST_CASE("a short last batch under the same object: the plan is kept, every sample counted once") {
    // 10 KiB per sample in 500 KiB: 64 fails, 32 holds (halving). An epoch of
    // 3 * 64 + 20 samples: the last batch of 20 runs under the same plan.
    Workload w(500 * KiB, 0, 10 * KiB);
    BatchOptions o;
    o.global_batch = 64;
    o.policy = ShrinkPolicy::halve();
    AdaptiveBatch a(o);
    std::vector<double> seen(3 * 64 + 20, 0.0);  // each sample's weight x its batch's size, committed
    std::vector<std::pair<std::size_t, double>> pending;
    std::size_t first = 0, batch = 0;
    double total = 0;  // the committed batch's weights
    auto step = [&](MicroBatch const& mb) {
        w.step(mb);
        for (std::size_t i = 0; i < mb.size; ++i)
            pending.emplace_back(first + mb.offset + i, mb.weight * static_cast<double>(batch) / static_cast<double>(mb.size));
    };
    auto commit = [&] {
        total = 0;
        for (auto const& p : pending) {
            seen[p.first] += p.second;
            total += p.second / static_cast<double>(batch);
        }
        pending.clear();
    };
    auto rollback = [&] { pending.clear(); };
    for (int b = 0; b < 3; ++b, first += 64) {
        batch = 64;
        a.run(step, commit, rollback);
        CHECK(total == doctest::Approx(1.0));
    }
    REQUIRE(a.plan().micro_batch == 32);
    std::size_t const ooms = a.counters().ooms;
    batch = 20;
    BatchResult r = a.run(GlobalBatch{20}, step, commit, rollback);
    CHECK(total == doctest::Approx(1.0));
    CHECK(r.micro_batches == 1);        // one micro-batch of 20: the plan's 32, cut to the batch
    CHECK(a.plan().micro_batch == 32);  // kept: the learned plan, not one from scratch
    CHECK(a.counters().ooms == ooms);
    CHECK(a.planner().global_batch() == 20);
    for (double x : seen) CHECK(x == doctest::Approx(1.0));  // every sample once, weighted 1 / its batch
    // The next full batch runs at the plan again.
    first = 0;
    batch = 64;
    a.run(step, commit, rollback);
    CHECK(total == doctest::Approx(1.0));
    CHECK(a.planner().global_batch() == 64);
    CHECK(a.plan().micro_batch == 32);
    // A short batch that does not fit the plan's size: the batch runs in pieces, and the plan stays.
    w.gpus.set_used_by_others(0, 500 * KiB - 25 * 10 * KiB);  // room for 25
    batch = 30;
    a.run(GlobalBatch{30}, step, commit, rollback);
    CHECK(total == doctest::Approx(1.0));
    CHECK(a.plan().micro_batch == 32);
    // Bad sizes name the value and the range.
    CHECK_THROWS_WITH_AS(a.run(GlobalBatch{0}, step, commit, rollback), doctest::Contains("GlobalBatch{0}"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(a.run(GlobalBatch{65}, step, commit, rollback), doctest::Contains("[1, 64]"),
                         std::invalid_argument);
    CHECK(a.plan().micro_batch == 32);
}

TEST_CASE("consensus: a short last batch on every rank; ranks that give different sizes fail together") {
    ThreadConsensus tc(3);
    Plan plans[3];
    std::string errors[3];
    std::size_t micro[3] = {0, 0, 0};
    auto rank = [&](int r, std::size_t last) {
        Workload w(r == 1 ? 500 * KiB : 1000 * KiB, 0, 10 * KiB);  // rank 1 fits 50: every rank runs 32
        BatchOptions o;
        o.global_batch = 64;
        o.policy = ShrinkPolicy::halve();
        AdaptiveBatch a(o);
        a.consensus(tc.hook());
        auto step = [&](MicroBatch const& mb) {
            w.step(mb);
            mb.sync();
            return mb.size;
        };
        a.run(step);
        auto res = a.run(GlobalBatch{20}, step);  // the epoch's last batch, on every rank
        micro[r] = res.batch.micro_batches;
        plans[r] = a.plan();
        try {
            a.run(GlobalBatch{last}, step);
        } catch (std::logic_error const& e) {
            errors[r] = e.what();
        }
    };
    std::thread r0(rank, 0, 20), r1(rank, 1, 20), r2(rank, 2, 21);  // rank 2 disagrees on the second
    r0.join();
    r1.join();
    r2.join();
    for (int r = 0; r < 3; ++r) {
        CHECK(plans[r].micro_batch == 32);
        CHECK(micro[r] == 1);
        CHECK(errors[r].find("different sizes (20 to 21 samples)") != std::string::npos);
    }
}

TEST_CASE("consensus: the automatic policy is predictive only when every rank measures; predictive named where one "
          "does not is refused on every rank") {
    auto run_ranks = [](ShrinkPolicy policy, Plan (&plans)[2], std::string (&errors)[2], ShrinkPolicy::Kind (&kinds)[2]) {
        ThreadConsensus tc(2);
        auto rank = [&](int r) {
            Workload w(1024 * KiB, 0, 10 * KiB);
            w.gpus.set_used_by_others(0, 1024 * KiB - 25 * 10 * KiB);  // room for 25 samples
            BatchOptions o;
            o.global_batch = 256;
            o.policy = policy;
            AdaptiveBatch a(o);
            a.consensus(tc.hook());
            if (r == 0) a.measure_with(w.budget);  // rank 1 has no meter
            try {
                for (int i = 0; i < 3; ++i)
                    a.run([&](MicroBatch const& mb) { w.step(mb); mb.sync(); }, [] {}, [] {});
            } catch (std::exception const& e) {
                errors[r] = e.what();
            }
            plans[r] = a.plan();
            kinds[r] = a.policy().kind();
        };
        std::thread r0(rank, 0), r1(rank, 1);
        r0.join();
        r1.join();
    };
    Plan plans[2];
    std::string errors[2];
    ShrinkPolicy::Kind kinds[2];
    run_ranks(ShrinkPolicy::automatic(), plans, errors, kinds);
    for (int r = 0; r < 2; ++r) {
        CHECK(errors[r].empty());
        CHECK(kinds[r] == ShrinkPolicy::Kind::bisect);  // not every rank measures
    }
    CHECK(plans[0] == plans[1]);
    Plan p2[2];
    std::string e2[2];
    ShrinkPolicy::Kind k2[2];
    run_ranks(ShrinkPolicy::predictive(), p2, e2, k2);
    CHECK(e2[0].find("another rank has none") != std::string::npos);
    CHECK(e2[1].find("measure_with") != std::string::npos);
}

TEST_CASE("a cache release before a larger micro-batch that throws: rolled back, and every rank leaves together") {
    // Predictive: 64 fails, the calibration runs 6 twice, and before 12 the
    // workspace of 6 is emptied: on rank 0 that release throws a non-OOM.
    struct Broken : std::runtime_error {
        using std::runtime_error::runtime_error;
    };
    ThreadConsensus tc(2);
    std::string errors[2];
    int rollbacks[2] = {0, 0};
    double weight[2] = {0, 0};
    std::vector<std::size_t> sizes[2];
    auto rank = [&](int r) {
        Workload w(1024 * KiB, 0, 10 * KiB);
        w.gpus.set_used_by_others(0, 1024 * KiB - 50 * 10 * KiB);  // room for 50
        CacheRegistry reg;
        std::size_t cached = 0;  // the step's workspace, kept as a cache
        int releases = 0;
        auto reg_r = reg.add("workspace", 0, [&] { return cached; }, [&]() -> std::size_t {
            // The first (after 64's OOM) works; the one before the larger 12 throws on rank 0.
            if (r == 0 && ++releases == 2) throw Broken("the workspace's stream is gone");
            std::size_t const b = cached;
            cached = 0;
            return b;
        });
        BatchOptions o;
        o.global_batch = 64;
        o.policy = ShrinkPolicy::predictive();
        o.caches = &reg;
        AdaptiveBatch a(o);
        a.consensus(tc.hook());
        a.measure_with(w.budget);
        try {
            a.run([&](MicroBatch const& mb) {
                w.step(mb);
                mb.sync();
                cached = mb.size;
                weight[r] += mb.weight;
                sizes[r].push_back(mb.size);
            }, [] {}, [&] {
                ++rollbacks[r];
                weight[r] = 0;
            });
        } catch (Broken const& e) {
            errors[r] = std::string("Broken: ") + e.what();
        } catch (recovery_failed const& e) {
            errors[r] = std::string("recovery_failed: ") + e.what();
        } catch (std::exception const& e) {
            errors[r] = std::string("other: ") + e.what();
        }
    };
    std::thread r0(rank, 0), r1(rank, 1);
    r0.join();
    r1.join();
    CHECK(errors[0] == "Broken: the workspace's stream is gone");  // as thrown
    CHECK(errors[1].rfind("recovery_failed: ", 0) == 0);
    for (int r = 0; r < 2; ++r) {
        CHECK(sizes[r] == std::vector<std::size_t>{6, 6});  // (64 failed) 12 never began
        CHECK(rollbacks[r] == 2);  // after 64's OOM, and the calibration's work, undone
        CHECK(weight[r] == 0.0);   // nothing of the batch is left in the user's state
    }
}
