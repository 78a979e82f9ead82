// The CUDA cache adaptors over the fake cudart.
#include <oomguard/cuda_caches.hpp>

#include "fake_cudart.hpp"

#include <doctest/doctest.h>

#include <map>
#include <string>

using namespace oomguard;
constexpr std::size_t MiB = 1 << 20;

TEST_CASE("the default pool: releasable is reserved minus used, release trims to keep") {
    fake_cudart::reset({100 * MiB, 100 * MiB});
    fake_cudart::set_pool(1, 40 * MiB, 10 * MiB);
    CudaRuntime cuda;
    CudaDefaultPoolCache pool(cuda, 1, 5 * MiB);
    CHECK(pool.releasable_bytes() == 30 * MiB);
    CacheRegistry reg;
    auto r = reg.add("cuda default pool", 0, pool);
    ReleaseReport rep = reg.release_all();
    CHECK(rep.bytes() == 30 * MiB);  // keep (5) < used (10): trimmed to used
    CHECK(fake_cudart::pool_reserved(1) == 10 * MiB);
    pool.set_release_threshold(64 * MiB);
    CHECK(fake_cudart::pool_release_threshold(1) == 64 * MiB);
}

TEST_CASE("the default pool at CUDA's default release threshold: what the synchronization gives back counts") {
    // Threshold 0: the synchronize that release() makes so that pending frees
    // come back already returns every unused byte to the driver; the trim then
    // finds nothing. Those bytes were released all the same, and adaptive_batch
    // takes its same-size retry only when release() says it freed something.
    fake_cudart::reset({100 * MiB});
    fake_cudart::set_pool(0, 64 * MiB, 0);  // 64 MiB freed on a stream, not yet synchronized
    CudaRuntime cuda;
    CudaDefaultPoolCache pool(cuda, 0);
    CHECK(pool.release() == 64 * MiB);
    CHECK(fake_cudart::pool_reserved(0) == 0);
    // With a threshold the synchronization keeps it, and the trim gives it back: the same answer.
    fake_cudart::set_pool(0, 64 * MiB, 16 * MiB);
    pool.set_release_threshold(128 * MiB);
    CHECK(pool.release() == 48 * MiB);
    CHECK(fake_cudart::pool_reserved(0) == 16 * MiB);
    CHECK(pool.release() == 0);  // nothing left: nothing claimed
}

TEST_CASE("a sticky error during a trim is reported as a failure, not as zero bytes") {
    fake_cudart::reset({100 * MiB});
    fake_cudart::set_pool(0, 40 * MiB, 0);
    CudaRuntime cuda;
    CudaDefaultPoolCache pool(cuda, 0);
    CacheRegistry reg;
    auto r = reg.add("pool", 0, pool);
    fake_cudart::set_sticky(cudaErrorIllegalAddress);
    CHECK(pool.releasable_bytes() == 0);
    ReleaseReport rep = reg.release_all();
    REQUIRE(rep.caches.size() == 1);
    CHECK(rep.caches[0].failed);
    CHECK(rep.caches[0].error.view().find("cudaErrorIllegalAddress") != std::string_view::npos);
}

namespace {
// The interface of cub::CachingDeviceAllocator that the adaptor uses.
struct FakeCub {
    struct TotalBytes {
        std::size_t free = 0, live = 0;
    };
    std::map<int, TotalBytes> cached_bytes;
    cudaError_t next = cudaSuccess;
    cudaError_t FreeAllCached() {
        if (next != cudaSuccess) return next;
        for (auto& kv : cached_bytes) kv.second.free = 0;
        return cudaSuccess;
    }
};
}  // namespace

TEST_CASE("CUB's caching allocator: every device's cached blocks") {
    fake_cudart::reset({100 * MiB});
    FakeCub cub;
    cub.cached_bytes[0].free = 3 * MiB;
    cub.cached_bytes[1].free = 2 * MiB;
    cub.cached_bytes[1].live = 7 * MiB;
    CubCachingAllocatorCache<FakeCub> cache(cub);
    CHECK(cache.releasable_bytes() == 5 * MiB);
    CHECK(cache.release() == 5 * MiB);
    CHECK(cache.releasable_bytes() == 0);
    cub.next = cudaErrorLaunchFailure;
    CHECK_THROWS_AS(cache.release(), cuda_error);
}
