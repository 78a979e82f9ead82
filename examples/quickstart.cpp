// oomguard in 40 lines, on a simulated GPU: no CUDA device needed.
#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>
#include <cstdio>

int main() {
    oomguard::SimulatedDevices gpu(1, 1 << 20);  // one 1 MiB "GPU" in host memory
    oomguard::MemoryBudget<oomguard::SimulatedDevices> budget(gpu, 0, oomguard::Limit::fraction(0.9));

    oomguard::BatchOptions opts;
    opts.global_batch = 1024;  // samples per optimizer step: kept whatever happens
    oomguard::AdaptiveBatch train(opts);
    train.measure_with(budget);  // peaks measured: the default policy fits the step (predictive)
    auto log = train.observe([](oomguard::BatchEvent const& e) {
        if (e.kind == oomguard::BatchEventKind::oom_caught)
            std::printf("OOM at m=%zu: %s\n", e.from.micro_batch, e.what);
    });

    double grad = 0;           // stands for the accumulated gradient
    std::size_t samples = 0;   // samples in it
    for (int step = 0; step < 3; ++step) {
        auto r = train.run(
            [&](oomguard::MicroBatch const& mb) {
                // 1 KiB of activations per sample: 1024 samples need 1 MiB, more than the cap.
                oomguard::DeviceBuffer activations(budget, mb.size * 1024);
                grad += mb.weight;  // add this micro-batch's gradient, weighted by size / G
                samples += mb.size;
            },
            [&] {  // commit: the optimizer step, once per global batch
                std::printf("step %d: %zu samples, weights sum to %.2f\n", step, samples, grad);
                grad = 0, samples = 0;
            },
            [&] { grad = 0, samples = 0; });  // rollback: a failed attempt's partial sums go
        std::printf("step %d: %u attempt(s), %zu micro-batches, next plan m=%zu\n", step, r.attempts,
                    r.micro_batches, r.plan.micro_batch);
    }
    auto const& c = train.counters();
    std::printf("OOMs survived: %zu, bytes still allocated: %zu\n", c.ooms, gpu.live_bytes());
}
