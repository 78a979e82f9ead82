// Recovery on steps shaped like real training, over seeded workload families on
// phantom simulated GPUs (a 16-80 GiB card costs no host memory):
//   - persistent weights and Adam state (3x the weights) allocated before
//     training; gradients allocated by the first backward and kept, as .grad is;
//   - a forward that allocates activations layer by layer, with a cuBLAS-like
//     workspace request of varying size per layer and size, freed at once;
//   - a backward that walks the layers in reverse, allocating each activation's
//     gradient and freeing it and the activation (the peak is in the middle);
//   - other processes holding 0-10 % of the card;
//   - +-4 % non-linearity per micro-batch size (allocator rounding, kernels
//     choosing other algorithms).
// The global batch starts above the best size (1.2x to 8x it), so the first
// step runs out of memory. Per policy, as Google Benchmark counters:
//   after_first_mean, _worst      the plan committed after the first global batch / the best plan
//   ratio_mean, ratio_worst       the plan's micro-batch after 12 global batches / the best plan (the
//                                 largest m such that every size up to m fits), at most 1
//   vs_largest_mean, _worst       the same against the largest size that fits at all (a size may fit
//                                 by the luck of its workspace choice where a smaller one does not)
//   further_mean, further_max     failed attempts in the first global batch after its first OOM
//   later_mean, later_max         failed attempts in the 11 batches after it (probes at batch starts)
//   thrown_mean                   completed samples rolled back per recovery, in global batches
//   stable_mean                   global batches until the plan stops changing
//   given_up                      global batches given up (recovery_failed), over all workloads
// The `family` argument picks the family's shape: 0 the one above; 1 deeper
// models (16-32 layers) with larger workspaces and heavier neighbours (0-15 %);
// 2 shallow models (2-4 layers) whose peak a large workspace dominates, started
// from 1.05x to 16x the best size -- for checking that a figure is not tuned to
// one family; 3 family 0's shapes with a framework's timing (issue 21): the
// gradients appear at the first backward of each global batch and stay until
// its commit (zero_grad sets them to none, rollback too), Adam's two moments
// appear at the first commit, and the last micro-batch of a batch holds a
// gradient-norm buffer of half the weights through its backward; 4 family 3's
// workloads (the same seeds and shapes) as a framework allocates them, through a
// caching allocator after PyTorch's (real_workloads.hpp, Reserve): every
// allocation is a block of the reserve, which grows only by segments (2 MiB for
// blocks up to 1 MiB; 20 MiB under 10 MiB; the size rounded up to 2 MiB above),
// keeps what the step frees for reuse (best fit, split, merged with free
// neighbours: it fragments) and, when a segment's cudaMalloc fails, frees its
// wholly free segments and tries once more; the budget, and so the meter, sees
// the segments. Its wholly free segments are a cache in the run's own
// CacheRegistry (BatchOptions::caches, release_caches on), which adaptive_batch
// empties before retries and before a larger attempt. Weights, .grad and Adam's
// moments are per layer: each layer's gradient is allocated when the first
// backward of a global batch reaches it (between that layer's activation
// gradient and its workspace), Adam's two moments per layer at the first commit.
// Temporaries by position: the first micro-batch of a global batch holds a
// lazily built buffer of a quarter of the weights from its start through its
// backward, the last the gradient-norm buffer of family 3. Family 4's best plan
// is found by running the program: global batches at m, from a fresh program
// with its steady state reached (runs() in real_workloads.hpp), for every size
// up to m. Family 5 is family 4's workloads (the same seeds) measured and
// released as torch.hpp pairs TorchCudaMeter and TorchCudaCache: the meter reads
// the allocator's bytes in use (not its segments) and their peak, available is
// the device's free memory plus what the reserve holds unused, and the
// registered cache estimates reserved - in use and empties the wholly free
// segments. `faults` is the chance, in percent, that a micro-batch meets a
// transient OOM (another process's burst) at one of its allocations, chosen at
// random; in families 4 and 5 the burst fails that allocation only if it reaches the
// device (a miss of the reserve: then both its cudaMalloc and the one after
// emptying fail), so a warm reserve absorbs it.
//
// Two rows of issue 24 (predictive, no faults), per family:
//   first_run_calibrate   first_run_ooms_mean, _max: OOMs in a workload's first run when it
//                         calibrates first (BatchOptions::start = calibrate); ratio_mean: its
//                         plan after 12 batches / the best plan
//   restart_with_cache    restart_ooms_mean, _max: OOMs in a second run started from the first
//                         run's PlanCache entry; ratio_mean: its plan / the best plan
#include "real_workloads.hpp"

#include <oomguard/plan_cache.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include <unistd.h>

using namespace bench;

namespace {

constexpr int kWorkloads = 300;
constexpr int kGlobalBatches = 12;

struct Outcome {
    double ratio = 0, ratio_largest = 0, further = 0, later = 0, thrown = 0, stable = 0, given_up = 0, after_first = 0;
};

Outcome recover(Model const& w, ShrinkPolicy policy, bool resume, double fault_rate) {
    Run run(w, fault_rate);
    BatchOptions o;
    o.global_batch = w.start;
    o.policy = policy;
    o.resume = resume;
    // Family 4 empties its allocator's free segments before retries, as torch.hpp's TorchCudaCache does.
    o.release_caches = w.caching;  // (release_caches = false for families 0-3)
    o.caches = &run.caches;
    o.max_attempts = 1000;
    AdaptiveBatch a(o);
    if (w.allocator_meter)
        a.measure_with(run.allocator_meter);
    else
        a.measure_with(run.budget);
    Outcome out;
    std::size_t last_plan = 0, recoveries = 0, ooms_before = 0, wasted_before = 0;
    for (int i = 0; i < kGlobalBatches; ++i) {
        try {
            a.run([&](MicroBatch const& mb) { run.step(mb, w.start); }, [&] { run.commit(); }, [&] { run.rollback(); });
        } catch (recovery_failed const&) {
            out.given_up += 1;
        }
        auto const& c = a.counters();
        if (c.ooms > ooms_before) {
            ++recoveries;
            if (i == 0) out.further = static_cast<double>(c.ooms - ooms_before - 1);
        }
        if (i > 0) out.later += static_cast<double>(c.ooms - ooms_before);
        out.thrown += static_cast<double>(c.wasted_samples - wasted_before) / static_cast<double>(w.start);
        ooms_before = c.ooms;
        wasted_before = c.wasted_samples;
        if (a.last_good_plan().micro_batch != last_plan) out.stable = i + 1;
        last_plan = a.last_good_plan().micro_batch;
        if (i == 0)
            out.after_first = std::min(1.0, static_cast<double>(last_plan) / static_cast<double>(w.best));
    }
    out.ratio = std::min(1.0, static_cast<double>(last_plan) / static_cast<double>(w.best));
    out.ratio_largest = static_cast<double>(last_plan) / static_cast<double>(w.largest);
    if (recoveries > 0) out.thrown /= static_cast<double>(recoveries);
    return out;
}

void real_steps(benchmark::State& state, ShrinkPolicy policy, bool resume) {
    int const family = static_cast<int>(state.range(0));
    double const fault_rate = static_cast<double>(state.range(1)) / 100.0;
    double first_sum = 0, first_worst = 1e9;
    double ratio_sum = 0, ratio_worst = 1e9, largest_sum = 0, largest_worst = 1e9, further_sum = 0, further_max = 0,
           later_sum = 0, later_max = 0, thrown_sum = 0, stable_sum = 0, given_up = 0;
    for (auto _ : state) {
        first_sum = 0;
        first_worst = 1e9;
        ratio_sum = largest_sum = further_sum = further_max = later_sum = later_max = thrown_sum = stable_sum =
            given_up = 0;
        ratio_worst = largest_worst = 1e9;
        for (int i = 0; i < kWorkloads; ++i) {
            Model const& w = workload(i, family);
            Outcome out = recover(w, policy, resume, fault_rate);
            first_sum += out.after_first;
            first_worst = std::min(first_worst, out.after_first);
            ratio_sum += out.ratio;
            ratio_worst = std::min(ratio_worst, out.ratio);
            largest_sum += out.ratio_largest;
            largest_worst = std::min(largest_worst, out.ratio_largest);
            further_sum += out.further;
            further_max = std::max(further_max, out.further);
            later_sum += out.later;
            later_max = std::max(later_max, out.later);
            thrown_sum += out.thrown;
            stable_sum += out.stable;
            given_up += out.given_up;
        }
    }
    state.counters["after_first_mean"] = first_sum / kWorkloads;
    state.counters["after_first_worst"] = first_worst;
    state.counters["ratio_mean"] = ratio_sum / kWorkloads;
    state.counters["ratio_worst"] = ratio_worst;
    state.counters["vs_largest_mean"] = largest_sum / kWorkloads;
    state.counters["vs_largest_worst"] = largest_worst;
    state.counters["further_mean"] = further_sum / kWorkloads;
    state.counters["further_max"] = further_max;
    state.counters["later_mean"] = later_sum / kWorkloads;
    state.counters["later_max"] = later_max;
    state.counters["thrown_mean"] = thrown_sum / kWorkloads;
    state.counters["stable_mean"] = stable_sum / kWorkloads;
    state.counters["given_up"] = given_up;
}

// One run of kGlobalBatches global batches, calibrating first, attached to
// the plan cache at `path` when it is not empty: its OOMs and its plan / the best.
std::pair<std::size_t, double> calibrated_run(Model const& w, std::string const& path) {
    Run run(w, 0.0);
    BatchOptions o;
    o.global_batch = w.start;
    o.policy = ShrinkPolicy::predictive();
    o.release_caches = w.caching;
    o.caches = &run.caches;
    o.max_attempts = 1000;
    o.start = BatchOptions::Start::calibrate;
    AdaptiveBatch a(o);
    if (w.allocator_meter)
        a.measure_with(run.allocator_meter);
    else
        a.measure_with(run.budget);
    PlanCache cache(path.empty() ? std::string("unused") : path);
    ObserverRegistration saving;
    if (!path.empty()) saving = cache.attach(a, {"train", device_identity(run.budget, "phantom"), "bench"});
    for (int i = 0; i < kGlobalBatches; ++i) {
        try {
            a.run([&](MicroBatch const& mb) { run.step(mb, w.start); }, [&] { run.commit(); }, [&] { run.rollback(); });
        } catch (recovery_failed const&) {
        }
    }
    double const ratio = std::min(1.0, static_cast<double>(a.last_good_plan().micro_batch) / static_cast<double>(w.best));
    return {a.counters().ooms, ratio};
}

// first_run_calibrate (restart = false) and restart_with_cache (restart = true).
void plan_cache_rows(benchmark::State& state, bool restart) {
    int const family = static_cast<int>(state.range(0));
    std::string const path = "/tmp/oomguard_bench_real_plans_" + std::to_string(::getpid()) + ".json";
    double sum = 0, worst = 0, ratio_sum = 0;
    for (auto _ : state) {
        sum = worst = ratio_sum = 0;
        for (int i = 0; i < kWorkloads; ++i) {
            Model const& w = workload(i, family);
            std::remove(path.c_str());
            auto out = calibrated_run(w, restart ? path : std::string());
            if (restart) out = calibrated_run(w, path);  // the restart: the first run's entry
            sum += static_cast<double>(out.first);
            worst = std::max(worst, static_cast<double>(out.first));
            ratio_sum += out.second;
        }
    }
    for (char const* f : {"", ".lock", ".tmp"}) std::remove((path + f).c_str());
    state.counters[restart ? "restart_ooms_mean" : "first_run_ooms_mean"] = sum / kWorkloads;
    state.counters[restart ? "restart_ooms_max" : "first_run_ooms_max"] = worst;
    state.counters["ratio_mean"] = ratio_sum / kWorkloads;
}

void family_args(benchmark::internal::Benchmark* b) {
    for (int family : {0, 1, 2, 3, 4, 5}) b->Args({family});
    b->ArgNames({"family"})->Iterations(1)->Unit(benchmark::kMillisecond);
}

void args(benchmark::internal::Benchmark* b) {
    for (int family : {0, 1, 2, 3, 4, 5})
        for (int faults : {0, 1, 5}) b->Args({family, faults});
    b->ArgNames({"family", "faults%"})->Iterations(1)->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_CAPTURE(real_steps, halve, ShrinkPolicy::halve(), false)->Apply(args);
BENCHMARK_CAPTURE(real_steps, geometric_0_9, ShrinkPolicy::geometric(0.9), false)->Apply(args);
BENCHMARK_CAPTURE(real_steps, bisect, ShrinkPolicy::bisect(), false)->Apply(args);
BENCHMARK_CAPTURE(real_steps, bisect_resume, ShrinkPolicy::bisect(), true)->Apply(args);
BENCHMARK_CAPTURE(real_steps, predictive, ShrinkPolicy::predictive(), false)->Apply(args);
BENCHMARK_CAPTURE(real_steps, predictive_resume, ShrinkPolicy::predictive(), true)->Apply(args);
BENCHMARK_CAPTURE(plan_cache_rows, first_run_calibrate, false)->Apply(family_args);
BENCHMARK_CAPTURE(plan_cache_rows, restart_with_cache, true)->Apply(family_args);
BENCHMARK_MAIN();
