// The guard's cost per allocation on a real GPU: N pairs of allocate + free of
// 4 KiB, raw and through a MemoryBudget, with cudaMalloc and cudaMallocAsync,
// interleaved; median of 7 runs each. Prints one line per pair for gpu-check.
#include <oomguard/oomguard.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {
constexpr int kPairs = 20000;
constexpr std::size_t kBytes = 4096;

// A backend over cudaMallocAsync on one stream (the budget's upstream).
struct AsyncRuntime : oomguard::CudaRuntime {
    cudaStream_t stream = nullptr;
    oomguard::status allocate(void** p, std::size_t n, int) noexcept {
        cudaError_t e = cudaMallocAsync(p, n, stream);
        if (e != cudaSuccess) (void)cudaGetLastError();
        return classify(e);
    }
    oomguard::status deallocate(void* p, std::size_t, int) noexcept { return classify(cudaFreeAsync(p, stream)); }
};

template <class F>
double ns_per_pair(F&& f) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kPairs; ++i) f();
    cudaDeviceSynchronize();
    return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / kPairs;
}
double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}
}  // namespace

int main() {
    oomguard::CudaRuntime cuda;
    AsyncRuntime async;
    cudaStreamCreate(&async.stream);
    oomguard::MemoryBudget<> budget(cuda, 0, oomguard::Limit::fraction(0.9));
    oomguard::MemoryBudget<AsyncRuntime> abudget(async, 0, oomguard::Limit::fraction(0.9));
    std::vector<double> raw, guarded, araw, aguarded, pooled;
    cudaStream_t const stream = async.stream;
    for (int r = 0; r < 7; ++r) {
        raw.push_back(ns_per_pair([] {
            void* p = nullptr;
            cudaMalloc(&p, kBytes);
            cudaFree(p);
        }));
        guarded.push_back(ns_per_pair([&] { budget.deallocate(budget.allocate(kBytes), kBytes); }));
        araw.push_back(ns_per_pair([&] {
            void* p = nullptr;
            cudaMallocAsync(&p, kBytes, async.stream);
            cudaFreeAsync(p, async.stream);
        }));
        aguarded.push_back(ns_per_pair([&] { abudget.deallocate(abudget.allocate(kBytes), kBytes); }));
        // The stream-ordered path itself: cudaMallocFromPoolAsync on the default pool, through the budget.
        pooled.push_back(ns_per_pair([&] { budget.deallocate_async(budget.allocate_async(kBytes, stream), kBytes, stream); }));
    }
    std::printf("gpu_overhead: cudaMalloc+cudaFree %.0f ns, through MemoryBudget %.0f ns (+%.1f ns)\n", median(raw),
                median(guarded), median(guarded) - median(raw));
    std::printf("gpu_overhead: cudaMallocAsync+cudaFreeAsync %.0f ns, through MemoryBudget %.0f ns (+%.1f ns)\n",
                median(araw), median(aguarded), median(aguarded) - median(araw));
    std::printf("gpu_overhead: MemoryBudget::allocate_async+deallocate_async %.0f ns against cudaMallocAsync+cudaFreeAsync "
                "%.0f ns (%+.1f %%, target <= +2 %%)\n",
                median(pooled), median(araw), 100.0 * (median(pooled) - median(araw)) / median(araw));
    cudaStreamDestroy(async.stream);
    return 0;
}
