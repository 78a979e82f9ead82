// nvcc accepts the umbrella header and the CUDA-facing opt-in headers, and
// instantiates them against the real runtime and the real CUB allocator.
#include <oomguard/oomguard.hpp>
#include <oomguard/cuda_caches.hpp>
#include <oomguard/scoped_cache_release.hpp>
#include <oomguard/thrust.hpp>

#include <cub/util_allocator.cuh>

__global__ void fill(float* p, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 1.0f;
}

int main() {
    oomguard::CudaRuntime cuda;
    cub::CachingDeviceAllocator cub_allocator;
    oomguard::CubCachingAllocatorCache<cub::CachingDeviceAllocator> cub_cache(cub_allocator);
    oomguard::CudaDefaultPoolCache pool(cuda, 0);
    int count = 0;
    if (!cuda.device_count(&count).ok() || count == 0) return 0;  // built, not run, without a GPU
    auto r1 = oomguard::CacheRegistry::global().add("cub", 0, cub_cache);
    auto r2 = oomguard::CacheRegistry::global().add("cuda default pool", 1, pool);
    oomguard::MemoryBudget<> budget(cuda, 0, oomguard::Limit::fraction(0.5));
    {
        oomguard::DeviceBuffer<> buf(budget, 1024 * sizeof(float));
        fill<<<4, 256>>>(buf.as<float>(), 1024);
        oomguard::ScopedCacheRelease release;
        release.synchronize_first(cuda, 0);
    }
    return cuda.synchronize(0).ok() ? 0 : 1;
}
