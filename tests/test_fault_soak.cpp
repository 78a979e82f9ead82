// The fault soak: 10 000 global steps of the example's model with seeded random
// OOMs at any allocation (5 %) and at chosen points -- inside a cache release,
// during rollback, in the middle of a Thrust temporary. Afterwards nothing is
// left on the simulated device, the budget is back at 0, every sample was
// committed exactly once per epoch, and the weights equal the fault-free run's.
#include "../examples/mlp.hpp"

#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <vector>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;

namespace {

constexpr std::size_t kSamples = 512, kBatch = 32, kSteps = 10000;

struct Outcome {
    std::vector<float> weights;
    std::size_t steps = 0, faults_injected = 0, ooms_survived = 0, release_failures = 0, rollback_retries = 0;
    std::size_t leaked_bytes = 0, leaked_allocations = 0, budget_used = 0;
    bool exactly_once = true;
};

Outcome run(bool faults) {
    SimulatedDevices gpus(1, std::size_t{64} << 20);
    Budget budget(gpus, 0, Limit::fraction(1.0));
    Outcome out;
    {
        mlp::Data data(kSamples, 8, 8, 11);
        mlp::Model<SimulatedDevices> model(budget, data);

        // A cache that holds device memory and allocates while it releases
        // (compaction); an injected OOM there must not stop the other caches.
        CacheRegistry reg;
        std::vector<void*> cached;
        auto cache = reg.add("compacting cache", 0, [&] { return cached.size() * 4096; }, [&] {
            if (faults && gpus.allocation_calls(0) % 3 == 0) gpus.fail_next(0);
            DeviceBuffer<SimulatedDevices> scratch(budget, 1024);  // may throw: reported by the registry
            std::size_t b = cached.size() * 4096;
            for (void* p : cached) budget.deallocate(p, 4096);
            cached.clear();
            return b;
        });
        auto refill = [&] {
            while (cached.size() < 4) cached.push_back(budget.allocate(4096));
        };

        BatchOptions o;
        o.global_batch = kBatch;
        o.micro_batch = kBatch;
        o.max_attempts = 1000;
        o.policy = ShrinkPolicy::halve();
        o.grow_after = 4;  // random faults shrink the plan; let it grow back
        o.caches = &reg;
        AdaptiveBatch a(o);

        if (faults) {
            FaultPlan f;
            f.probability = 0.05;  // any allocation: step buffers, Thrust temporaries, the cache, rollback
            f.seed = 2024;
            gpus.set_faults(0, f);
        }
        std::vector<int> seen(kSamples, 0);
        std::vector<std::size_t> pending;
        std::size_t rollbacks = 0;
        for (std::size_t step = 0; step < kSteps; ++step) {
            std::size_t first = (step * kBatch) % kSamples;
            try {
                refill();
            } catch (out_of_memory const&) {
                // the cache refills on the next step
            }
            a.run(
                [&](MicroBatch const& mb) {
                    model.step(first, mb, true);
                    for (std::size_t k = 0; k < mb.size; ++k) pending.push_back(first + mb.offset + k);
                },
                [&] {
                    model.commit(0.05f);
                    for (auto i : pending) ++seen[i];
                    pending.clear();
                },
                [&] {
                    ++rollbacks;
                    // Rollback through a temporary: an injected OOM here is retried.
                    if (faults && rollbacks % 7 == 0) gpus.fail_next(0);
                    DeviceBuffer<SimulatedDevices> scratch(budget, 256);
                    model.rollback();
                    pending.clear();
                });
            ++out.steps;
            if ((step + 1) * kBatch % kSamples == 0) {  // an epoch ended
                for (int& c : seen) {
                    if (c != 1) out.exactly_once = false;
                    c = 0;
                }
            }
        }
        gpus.clear_faults(0);
        for (void* p : cached) budget.deallocate(p, 4096);
        cached.clear();
        out.weights = model.weights();
        out.ooms_survived = a.counters().ooms;
        out.rollback_retries = a.counters().rollback_retries;
        out.faults_injected = gpus.failed_allocations(0);
    }
    out.leaked_bytes = gpus.live_bytes();
    out.leaked_allocations = gpus.live_allocations();
    out.budget_used = budget.used();
    return out;
}

}  // namespace

TEST_CASE("fault soak: 10 000 steps, 5 % random OOMs and chosen points; exact accounting, same weights") {
    Outcome clean = run(false);
    Outcome soak = run(true);
    std::printf("fault soak: steps %zu, faults injected %zu, OOMs survived by adaptive_batch %zu, rollback retries %zu, "
                "bytes leaked %zu, allocations leaked %zu, budget at %zu\n",
                soak.steps, soak.faults_injected, soak.ooms_survived, soak.rollback_retries, soak.leaked_bytes,
                soak.leaked_allocations, soak.budget_used);
    CHECK(clean.ooms_survived == 0);
    CHECK(soak.steps == kSteps);
    CHECK(soak.faults_injected > 1000);
    CHECK(soak.ooms_survived > 500);
    CHECK(soak.rollback_retries > 0);
    CHECK(soak.exactly_once);
    CHECK(clean.exactly_once);
    CHECK(soak.leaked_bytes == 0);
    CHECK(soak.leaked_allocations == 0);
    CHECK(soak.budget_used == 0);
    REQUIRE(soak.weights.size() == clean.weights.size());
    double worst = 0;
    for (std::size_t i = 0; i < clean.weights.size(); ++i) {
        double rel = std::fabs(soak.weights[i] - clean.weights[i]) / std::fmax(std::fabs(clean.weights[i]), 1e-3);
        if (rel > worst) worst = rel;
    }
    std::printf("fault soak: largest relative weight difference to the fault-free run %.3g (limit 1e-5)\n", worst);
    CHECK(worst <= 1e-5);
}

TEST_CASE("a sticky error in the middle of training propagates untouched") {
    SimulatedDevices gpus(1, std::size_t{16} << 20);
    Budget budget(gpus, 0, Limit::fraction(1.0));
    mlp::Data data(64, 4, 4, 3);
    mlp::Model<SimulatedDevices> model(budget, data);
    model.keep_workspace(false);  // every step allocates its activations: the second allocation is the step's
    BatchOptions o;
    o.global_batch = 16;
    AdaptiveBatch a(o);
    int rollbacks = 0;
    a.run([&](MicroBatch const& mb) { model.step(0, mb, true); }, [&] { model.commit(0.1f); }, [&] { ++rollbacks; });
    FaultPlan sticky;
    sticky.sticky_after = 2;  // the second allocation of the next step
    gpus.set_faults(0, sticky);
    try {
        a.run([&](MicroBatch const& mb) { model.step(16, mb, true); }, [&] { model.commit(0.1f); },
              [&] { ++rollbacks; });
        FAIL("expected a sticky cuda_error");
    } catch (cuda_error const& e) {
        CHECK(e.is_sticky());
        CHECK(e.code() == 700);
        CHECK_FALSE(is_device_oom(e));
    }
    CHECK(rollbacks == 0);
    CHECK(a.counters().ooms == 0);
    gpus.clear_sticky(0);
    gpus.clear_faults(0);
}
