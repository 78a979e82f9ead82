// Stream-ordered allocation on a real GPU, for scripts/gpu-check:
//  1. a budget in front of the device's real async pool: cudaMallocFromPoolAsync
//     through MemoryBudget::allocate_async, capped;
//  2. a real OOM caused only by frees pending on another stream -- the pool's
//     opportunistic reuse is turned off, so memory freed on stream A is not
//     reusable on stream B until A is synchronized -- recovered by adaptive_batch
//     with CudaDefaultPoolCache registered (its release synchronizes, then trims):
//     the same micro-batch size again, no shrink.
// Prints one line of figures. Exit 0 when both hold.
#include <oomguard/oomguard.hpp>
#include <oomguard/cuda_caches.hpp>

#include <cstdio>
#include <vector>

int main() {
    oomguard::CudaRuntime cuda;
    std::size_t free = 0, total = 0;
    if (!cuda.memory_info(0, &free, &total).ok()) {
        std::puts("gpu_async_check: no usable GPU");
        return 2;
    }
    cudaMemPool_t pool = nullptr;
    cudaDeviceGetDefaultMemPool(&pool, 0);
    int off = 0;
    cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowOpportunistic, &off);
    cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &off);
    cudaStream_t a = nullptr, b = nullptr;
    cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking);
    cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking);

    // 1. The cap in front of the real pool.
    oomguard::MemoryBudget<> capped(cuda, 0, oomguard::Limit::bytes(std::size_t{1} << 30));
    bool capped_ok = false;
    try {
        void* p = capped.allocate_async(std::size_t{768} << 20, a);
        try {
            (void)capped.allocate_async(std::size_t{512} << 20, a);
        } catch (oomguard::out_of_memory const& e) {
            capped_ok = e.info().source == oomguard::oom_source::budget;
        }
        capped.deallocate_async(p, std::size_t{768} << 20, a);
        cudaStreamSynchronize(a);
    } catch (std::exception const& e) {
        std::printf("gpu_async_check: the capped pool failed: %s\n", e.what());
        return 1;
    }

    // 2. Fill most of the card on stream a, free it on a, and run a step on b.
    cuda.memory_info(0, &free, &total);
    std::size_t const chunk = std::size_t{1} << 30;
    oomguard::MemoryBudget<> budget(cuda, 0, oomguard::Limit::unlimited());
    std::vector<void*> held;
    while (free > 3 * chunk) {
        try {
            held.push_back(budget.allocate_async(chunk, a));
        } catch (oomguard::out_of_memory const&) {
            break;
        }
        cuda.memory_info(0, &free, &total);
    }
    for (void* p : held) budget.deallocate_async(p, chunk, a);  // pending on a: no synchronize
    oomguard::CudaDefaultPoolCache cache(cuda, 0);
    auto reg = oomguard::CacheRegistry::global().add("cuda default pool", 0, cache);
    oomguard::BatchOptions o;
    o.global_batch = 8;
    o.micro_batch = 4;
    oomguard::AdaptiveBatch run(o);
    std::size_t const per_sample = (held.size() * chunk) / 8 + (free / 2) / 4;  // needs the pending memory
    try {
        run.run(
            [&](oomguard::MicroBatch const& mb) {
                oomguard::StreamBuffer buf(budget, mb.size * per_sample, b);
                cudaStreamSynchronize(b);
            },
            [] {}, [] {});
    } catch (std::exception const& e) {
        std::printf("gpu_async_check: not recovered: %s\n", e.what());
        return 1;
    }
    auto const& c = run.counters();
    bool recovered = c.ooms >= 1 && c.shrinks == 0 && run.plan().micro_batch == 4;
    std::printf("gpu_async_check: cap in front of the async pool %s; %zu GiB freed on stream a, pending, then a step "
                "on stream b: %zu OOM, %zu same-size retries, %zu shrinks, %.2f GiB released; %s\n",
                capped_ok ? "held" : "FAILED", held.size(), c.ooms, c.retries_same, c.shrinks,
                static_cast<double>(c.bytes_released) / (1 << 30), recovered ? "recovered" : "not recovered");
    cudaStreamDestroy(a);
    cudaStreamDestroy(b);
    return capped_ok && recovered ? 0 : 1;
}
