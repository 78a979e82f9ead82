// How well each shrink policy recovers, over 1000 seeded workloads on phantom
// simulated GPUs. A workload needs bytes(m) = a + b*m*(1 + noise(m)) for a
// micro-batch of m samples (noise: a fixed +-2 % per size, as allocator rounding
// and workspace choices give), on a card of random capacity, starting from a
// random size that does not fit. Per policy it reports, as Google Benchmark
// counters (and so in the JSON):
//   ratio_mean, ratio_worst   final m / the largest m that fits
//   failures_mean             failed attempts after the OOM that started the recovery
//   wasted_mean               samples processed and thrown away, per global batch
// The framework rows (sweep_framework) run the same counters over the 300
// workloads of bench_real_steps' family 4 (real_workloads.hpp; that file's header
// comment has the whole shape): layered steps allocated through a caching
// allocator that only grows, in segments, and fragments, with gradients from the
// first backward to the commit, Adam's state from the first commit and
// temporaries on the first and last micro-batches, 12 global batches each, no
// faults. Their best m is the largest such that every size up to it runs
// (found by running the program), so ratio_mean and ratio_worst there are the
// largest micro-batch of the last global batch over it, and may exceed 1 when a
// plan settles on a larger size that happens to run; failures_mean counts every
// failed attempt after the first OOM, and given_up the global batches that
// recovery_failed ended, of all workloads.
#include "real_workloads.hpp"

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/plan_cache.hpp>
#include <oomguard/detail/random.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/simulated_devices.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include <unistd.h>

using namespace oomguard;

namespace {

constexpr int kWorkloads = 1000;
constexpr int kGlobalBatches = 12;
constexpr std::size_t MiB = std::size_t{1} << 20;

// A uniform [0, 1) hashed from x: the first draw of a SplitMix64.
double unit(std::uint64_t x) { return detail::SplitMix64(x).uniform(); }

struct Workload {
    std::uint64_t seed;
    std::size_t a, b, capacity, start, best;
    std::size_t bytes(std::size_t m) const {
        double noise = 0.02 * (2.0 * unit(seed * 1000003u + m) - 1.0);
        return a + static_cast<std::size_t>(static_cast<double>(b) * static_cast<double>(m) * (1.0 + noise));
    }
    static Workload make(std::uint64_t seed) {
        Workload w{seed, 0, 0, 0, 0, 0};
        w.a = static_cast<std::size_t>((64 + 1984 * unit(seed * 4 + 1)) * static_cast<double>(MiB));
        w.b = static_cast<std::size_t>((1 + 63 * unit(seed * 4 + 2)) * static_cast<double>(MiB));
        w.capacity = static_cast<std::size_t>((8 + 72 * unit(seed * 4 + 3)) * 1024.0 * static_cast<double>(MiB));
        std::size_t guess = (w.capacity - w.a) / w.b;  // about the best size
        for (std::size_t m = 2 * guess + 2; m >= 1; --m) {
            if (w.bytes(m) <= w.capacity) {
                w.best = m;
                break;
            }
        }
        // Start above the best, up to 8x it: the first step always runs out of memory.
        w.start = w.best + 1 + static_cast<std::size_t>(unit(seed * 4 + 4) * 7.0 * static_cast<double>(w.best));
        return w;
    }
};

struct Outcome {
    double ratio;
    std::size_t failures, wasted;
};

Outcome recover(Workload const& w, ShrinkPolicy policy) {
    SimulatedDevices gpu({{w.capacity}}, SimulatedMemory::phantom, false);
    MemoryBudget<SimulatedDevices> budget(gpu, 0, Limit::unlimited());
    BatchOptions o;
    o.global_batch = w.start;
    o.policy = policy;
    o.release_caches = false;
    o.max_attempts = 200;
    AdaptiveBatch a(o);
    a.measure_with(budget);
    std::size_t largest = 0;
    for (int i = 0; i < kGlobalBatches; ++i) {
        largest = 0;
        a.run([&](MicroBatch const& mb) {
            DeviceBuffer<SimulatedDevices> act(budget, w.bytes(mb.size));
            if (mb.size > largest) largest = mb.size;
        }, [] {}, [] {});
    }
    auto const& c = a.counters();
    return Outcome{static_cast<double>(largest) / static_cast<double>(w.best), c.ooms > 0 ? c.ooms - 1 : 0,
                   c.wasted_samples};
}

// One run of kGlobalBatches global batches of `w` with a fresh AdaptiveBatch:
// calibrating first (issue 24), attached to the cache at `path` when it is
// not empty. Returns the OOMs it met.
std::size_t run_once(Workload const& w, std::string const& path) {
    SimulatedDevices gpu({{w.capacity}}, SimulatedMemory::phantom, false);
    MemoryBudget<SimulatedDevices> budget(gpu, 0, Limit::unlimited());
    BatchOptions o;
    o.global_batch = w.start;
    o.policy = ShrinkPolicy::predictive();
    o.release_caches = false;
    o.max_attempts = 200;
    o.start = BatchOptions::Start::calibrate;
    AdaptiveBatch a(o);
    a.measure_with(budget);
    PlanCache cache(path.empty() ? std::string("unused") : path);
    ObserverRegistration saving;
    if (!path.empty()) saving = cache.attach(a, {"train", device_identity(budget, "phantom"), "bench"});
    for (int i = 0; i < kGlobalBatches; ++i)
        a.run([&](MicroBatch const& mb) { DeviceBuffer<SimulatedDevices> act(budget, w.bytes(mb.size)); }, [] {},
              [] {});
    return a.counters().ooms;
}

// Issue 24's rows: first_run_calibrate (restart = false): OOMs per workload in
// a first run that calibrates first (target <= 0.2); restart_with_cache
// (restart = true): OOMs in a second run from the first run's PlanCache entry (target 0).
void plan_cache_rows(benchmark::State& state, bool restart) {
    double sum = 0;
    std::size_t worst = 0;
    std::string const path = "/tmp/oomguard_bench_plans_" + std::to_string(::getpid()) + ".json";
    for (auto _ : state) {
        sum = 0;
        worst = 0;
        for (int i = 0; i < kWorkloads; ++i) {
            Workload w = Workload::make(static_cast<std::uint64_t>(i) + 1);
            std::remove(path.c_str());
            std::size_t ooms = run_once(w, restart ? path : std::string());
            if (restart) ooms = run_once(w, path);  // the restart: the first run's entry
            sum += static_cast<double>(ooms);
            worst = std::max(worst, ooms);
        }
    }
    for (char const* f : {"", ".lock", ".tmp"}) std::remove((path + f).c_str());
    state.counters[restart ? "restart_ooms_mean" : "first_run_ooms_mean"] = sum / kWorkloads;
    state.counters[restart ? "restart_ooms_worst" : "first_run_ooms_worst"] = static_cast<double>(worst);
    state.counters["workloads"] = kWorkloads;
}

void sweep(benchmark::State& state, ShrinkPolicy policy) {
    double ratio_sum = 0, ratio_worst = 1e9, fail_sum = 0, waste_sum = 0;
    for (auto _ : state) {
        ratio_sum = fail_sum = waste_sum = 0;
        ratio_worst = 1e9;
        for (int i = 0; i < kWorkloads; ++i) {
            Workload w = Workload::make(static_cast<std::uint64_t>(i) + 1);
            Outcome out = recover(w, policy);
            ratio_sum += out.ratio;
            ratio_worst = std::min(ratio_worst, out.ratio);
            fail_sum += static_cast<double>(out.failures);
            waste_sum += static_cast<double>(out.wasted) / static_cast<double>(w.start);
        }
    }
    state.counters["ratio_mean"] = ratio_sum / kWorkloads;
    state.counters["ratio_worst"] = ratio_worst;
    state.counters["failures_mean"] = fail_sum / kWorkloads;
    state.counters["wasted_mean"] = waste_sum / kWorkloads;
    state.counters["workloads"] = kWorkloads;
}

// One family-4 workload under `policy`, 12 global batches.
struct FrameworkOutcome {
    double ratio = 0, failures = 0, wasted = 0, given_up = 0;
};

FrameworkOutcome recover_framework(bench::Model const& w, ShrinkPolicy policy, bool resume) {
    bench::Run run(w, 0.0);
    BatchOptions o;
    o.global_batch = w.start;
    o.policy = policy;
    o.resume = resume;
    o.release_caches = true;  // the allocator's free segments, registered in the run's own registry
    o.caches = &run.caches;
    o.max_attempts = 1000;
    AdaptiveBatch a(o);
    a.measure_with(run.budget);
    FrameworkOutcome out;
    std::size_t largest = 0;
    for (int i = 0; i < kGlobalBatches; ++i) {
        largest = 0;
        try {
            a.run([&](MicroBatch const& mb) {
                run.step(mb, w.start);
                if (mb.size > largest) largest = mb.size;
            }, [&] { run.commit(); }, [&] { run.rollback(); });
        } catch (recovery_failed const&) {
            out.given_up += 1;
        }
    }
    auto const& c = a.counters();
    out.ratio = static_cast<double>(largest) / static_cast<double>(w.best);
    out.failures = static_cast<double>(c.ooms > 0 ? c.ooms - 1 : 0);
    out.wasted = static_cast<double>(c.wasted_samples) / static_cast<double>(w.start);
    return out;
}

constexpr int kFrameworkWorkloads = 300;

void sweep_framework(benchmark::State& state, ShrinkPolicy policy, bool resume) {
    double ratio_sum = 0, ratio_worst = 1e9, fail_sum = 0, waste_sum = 0, given_up = 0;
    for (auto _ : state) {
        ratio_sum = fail_sum = waste_sum = given_up = 0;
        ratio_worst = 1e9;
        for (int i = 0; i < kFrameworkWorkloads; ++i) {
            FrameworkOutcome out = recover_framework(bench::workload(i, 4), policy, resume);
            ratio_sum += out.ratio;
            ratio_worst = std::min(ratio_worst, out.ratio);
            fail_sum += out.failures;
            waste_sum += out.wasted;
            given_up += out.given_up;
        }
    }
    state.counters["ratio_mean"] = ratio_sum / kFrameworkWorkloads;
    state.counters["ratio_worst"] = ratio_worst;
    state.counters["failures_mean"] = fail_sum / kFrameworkWorkloads;
    state.counters["wasted_mean"] = waste_sum / kFrameworkWorkloads;
    state.counters["given_up"] = given_up;
    state.counters["workloads"] = kFrameworkWorkloads;
}

}  // namespace

BENCHMARK_CAPTURE(sweep, halve, ShrinkPolicy::halve())->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep, geometric_0_9, ShrinkPolicy::geometric(0.9))->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep, bisect, ShrinkPolicy::bisect())->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep, predictive, ShrinkPolicy::predictive())->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep_framework, halve, ShrinkPolicy::halve(), false)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep_framework, geometric_0_9, ShrinkPolicy::geometric(0.9), false)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep_framework, bisect, ShrinkPolicy::bisect(), false)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep_framework, bisect_resume, ShrinkPolicy::bisect(), true)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep_framework, predictive, ShrinkPolicy::predictive(), false)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(sweep_framework, predictive_resume, ShrinkPolicy::predictive(), true)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(plan_cache_rows, first_run_calibrate, false)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(plan_cache_rows, restart_with_cache, true)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
