// Built-in releasable caches for the CUDA runtime: the default memory pool
// behind cudaMallocAsync, and CUB's caching allocator. Register them with a
// CacheRegistry so ScopedCacheRelease and adaptive_batch empty them too.
#pragma once

#include <oomguard/cache_registry.hpp>
#include <oomguard/cuda_runtime.hpp>
#include <oomguard/errors.hpp>

#include <cstddef>

namespace oomguard {

/// The device's default memory pool (what cudaMallocAsync/cudaFreeAsync use).
/// Freed blocks stay reserved in the pool until a trim; release() trims it to
/// `keep_bytes` and returns what went back to the driver.
class CudaDefaultPoolCache {
public:
    /// The default pool of `device` as `cuda` sees it (or the pool `cuda` was given); release()
    /// keeps `keep_bytes` reserved. `cuda` must outlive this object.
    CudaDefaultPoolCache(CudaRuntime& cuda, int device, std::size_t keep_bytes = 0) noexcept
        : cuda_(&cuda), device_(device), keep_(keep_bytes) {}

    /// Reserved but unused bytes (0 when the pool cannot be read).
    std::size_t releasable_bytes() const noexcept {
        std::size_t reserved = 0, used = 0;
        if (!cuda_->default_pool_usage(device_, &reserved, &used).ok()) return 0;
        return reserved > used ? reserved - used : 0;
    }

    /// Synchronizes the device -- so that frees still pending on a stream are
    /// back in the pool -- then trims it, and returns what the pool gave back to
    /// the driver: counted from before the synchronization, which at CUDA's
    /// default release threshold (0) already gives back everything unused.
    /// Throws cuda_error when the runtime fails (a sticky error is reported by
    /// the registry, never taken for "nothing to free").
    std::size_t release() {
        std::size_t before = 0, after = 0, used = 0;
        check(cuda_->default_pool_usage(device_, &before, &used));
        check(cuda_->synchronize(device_));
        check(cuda_->trim_default_pool(device_, keep_));
        check(cuda_->default_pool_usage(device_, &after, &used));
        return before > after ? before - after : 0;
    }

    /// Sets the pool's release threshold: how much freed memory it may keep at
    /// a synchronization. 0 (CUDA's default) returns everything at each sync.
    void set_release_threshold(std::size_t bytes) {
        check(cuda_->set_default_pool_release_threshold(device_, bytes));
    }

private:
    static void check(status s) {
        if (!s.ok()) detail::throw_status(s, "CudaDefaultPoolCache");
    }
    CudaRuntime* cuda_;
    int device_;
    std::size_t keep_;
};

/// A `cub::CachingDeviceAllocator` (or any allocator with its interface:
/// `cached_bytes[device].free` and `cudaError_t FreeAllCached()`). release()
/// frees every cached block on every device and returns the bytes freed.
template <class CachingAllocator>
class CubCachingAllocatorCache {
public:
    /// The cache of `allocator`, which must outlive this object.
    explicit CubCachingAllocatorCache(CachingAllocator& allocator) noexcept : allocator_(&allocator) {}

    /// Bytes cached and unused, over every device.
    std::size_t releasable_bytes() const {
        std::size_t s = 0;
        for (auto const& kv : allocator_->cached_bytes) s += kv.second.free;
        return s;
    }

    /// Frees every cached block (FreeAllCached) and returns the bytes freed; throws cuda_error
    /// when FreeAllCached fails.
    std::size_t release() {
        std::size_t before = releasable_bytes();
        status s = CudaRuntime::checked(allocator_->FreeAllCached());
        if (!s.ok()) detail::throw_status(s, "cub::CachingDeviceAllocator::FreeAllCached");
        std::size_t after = releasable_bytes();
        return before > after ? before - after : 0;
    }

private:
    CachingAllocator* allocator_;
};

}  // namespace oomguard
