// A real OOM on a real GPU, survived: a hog takes all but `--leave` of the
// card, then adaptive_batch runs a step that asks for 16 MiB per sample of a
// global batch of 256 (4 GiB), through an uncapped budget, so cudaMalloc itself
// refuses. Prints one line of figures for scripts/gpu-check. Exit 0 on recovery.
#include <oomguard/oomguard.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
    std::size_t leave = std::size_t{1} << 30;  // bytes left free on the card
    for (int i = 1; i + 1 < argc; i += 2)
        if (std::strcmp(argv[i], "--leave-mib") == 0) leave = std::strtoull(argv[i + 1], nullptr, 10) << 20;
    oomguard::CudaRuntime cuda;
    std::size_t free = 0, total = 0;
    if (!cuda.memory_info(0, &free, &total).ok()) {
        std::puts("gpu_oom_check: no usable GPU");
        return 2;
    }
    // The hog: raw cudaMalloc outside any budget, in 1 GiB pieces, until `leave` is left.
    std::vector<void*> hog;
    while (free > leave + (std::size_t{1} << 30)) {
        void* p = nullptr;
        if (cudaMalloc(&p, std::size_t{1} << 30) != cudaSuccess) {
            (void)cudaGetLastError();
            break;
        }
        hog.push_back(p);
        cuda.memory_info(0, &free, &total);
    }
    oomguard::MemoryBudget<> budget(cuda, 0, oomguard::Limit::unlimited());
    oomguard::BatchOptions o;
    o.global_batch = 256;
    o.policy = oomguard::ShrinkPolicy::predictive();
    oomguard::AdaptiveBatch a(o);
    a.measure_with(budget);
    constexpr std::size_t per_sample = std::size_t{16} << 20;
    auto t0 = std::chrono::steady_clock::now();
    int rc = 0;
    try {
        a.run([&](oomguard::MicroBatch const& mb) {
            oomguard::DeviceBuffer<> act(budget, mb.size * per_sample);
            cudaMemset(act.data(), 0, act.size());
            cudaDeviceSynchronize();
        }, [] {}, [] {});
    } catch (std::exception const& e) {
        std::printf("gpu_oom_check: not recovered: %s\n", e.what());
        rc = 1;
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::size_t best = free / per_sample;
    std::printf("gpu_oom_check: free %.2f GiB of %.2f GiB; requested m=256 (4.00 GiB); final m=%zu (largest that fits "
                "about %zu); OOMs %zu; failed attempts after the first %zu; time to recover %.1f ms; cudaGetLastError "
                "after: %s\n",
                free / 1073741824.0, total / 1073741824.0, a.plan().micro_batch, best, a.counters().ooms,
                a.counters().ooms > 0 ? a.counters().ooms - 1 : 0, ms, cudaGetErrorName(cudaGetLastError()));
    for (void* p : hog) cudaFree(p);
    return rc == 0 && a.counters().ooms > 0 ? 0 : 1;
}
