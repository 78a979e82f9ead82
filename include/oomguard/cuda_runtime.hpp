// CudaRuntime: the backend over cudart. The only oomguard header that includes
// <cuda_runtime_api.h>; link CUDA::cudart (oomguard::oomguard does).
#pragma once

#include <oomguard/backend.hpp>
#include <oomguard/memory_budget.hpp>  // OOMGUARD_HAS_CUDA

#if !OOMGUARD_HAS_CUDA
#error "oomguard: <oomguard/cuda_runtime.hpp> needs the CUDA toolkit, and this build has OOMGUARD_HAS_CUDA=0: install the toolkit and add its include directory (find_package(oomguard) does), or use <oomguard/simulated_devices.hpp>"
#endif

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace oomguard {

/// A backend (see backend.hpp) over the CUDA runtime API. Copies are free and
/// all refer to the process's one runtime; the only state is the memory pool
/// the stream-ordered calls use (each device's default pool, unless one is given).
class CudaRuntime {
public:
    CudaRuntime() noexcept = default;
    /// Stream-ordered allocations come from `pool` (cudaMemPoolCreate's, with its
    /// own release threshold and limits) instead of the device's default pool.
    /// `pool` belongs to one device: give this backend's budgets that device.
    explicit CudaRuntime(cudaMemPool_t pool) noexcept : pool_(pool) {}
    /// The pool the stream-ordered calls use (null: each device's default pool).
    cudaMemPool_t pool() const noexcept { return pool_; }

    /// The backend's name in messages and reports.
    static constexpr char const* backend_name = "cuda";
    /// A CUDA stream; nullptr is the legacy default stream.
    using stream_type = cudaStream_t;
    /// What a budget counts for a stream-ordered request: the pool hands out
    /// blocks in multiples of this (RMM and cuDF count 512 too; counting 256
    /// under-counts a pool that rounds to 512).
    static constexpr std::size_t async_granularity = 512;

    /// Classifies a cudart code. Sticky errors are exactly those of which CUDA
    /// 13's driver_types.h says "to continue using CUDA, the process must be
    /// terminated and relaunched" (test_cuda_runtime checks every enumerator of
    /// the header against this table).
    static status classify(cudaError_t e) noexcept {
        status s;
        s.code = static_cast<int>(e);
        s.name = cudaGetErrorName(e);
        if (s.name == nullptr) s.name = "cudaErrorUnknown";
        switch (e) {
            case cudaSuccess: s.kind = status_kind::ok; break;
            case cudaErrorMemoryAllocation: s.kind = status_kind::out_of_memory; break;
            case cudaErrorInsufficientDriver:
            case cudaErrorNoDevice:
            case cudaErrorStubLibrary:
            case cudaErrorInitializationError:
            case cudaErrorSystemDriverMismatch:
            case cudaErrorCompatNotSupportedOnDevice:
            case cudaErrorDevicesUnavailable: s.kind = status_kind::no_device; break;
            case cudaErrorInvalidValue:
            case cudaErrorInvalidDevice:
            case cudaErrorInvalidDevicePointer: s.kind = status_kind::invalid_argument; break;
            case cudaErrorContained:
            case cudaErrorIllegalAddress:
            case cudaErrorLaunchTimeout:
            case cudaErrorAssert:
            case cudaErrorHardwareStackError:
            case cudaErrorIllegalInstruction:
            case cudaErrorMisalignedAddress:
            case cudaErrorInvalidAddressSpace:
            case cudaErrorInvalidPc:
            case cudaErrorLaunchFailure:
            case cudaErrorTensorMemoryLeak:
            case cudaErrorMpsClientTerminated:
            case cudaErrorExternalDevice: s.kind = status_kind::sticky; break;
            default: s.kind = status_kind::other; break;
        }
        return s;
    }

    /// cudaMalloc on `device`, then back to the caller's device. Never throws: a failure is the
    /// status (out_of_memory for cudaErrorMemoryAllocation, whose last error is cleared).
    status allocate(void** out, std::size_t bytes, int device) noexcept {
        status s = on_device(device, [&] { return cudaMalloc(out, bytes); }, [&] {
            (void)cudaFree(*out);  // the caller's device could not be restored: undo, report that
            *out = nullptr;
        });
        return s;
    }

    /// cudaFree on `device` (null: nothing to do); a sticky error comes back as its status.
    status deallocate(void* p, std::size_t /*bytes*/, int device) noexcept {
        if (p == nullptr) return status::success();
        return on_device(device, [&] { return cudaFree(p); });
    }

    /// Stream-ordered: cudaMallocFromPoolAsync, ordered on `stream`, from the pool
    /// given at construction or else `device`'s default pool.
    status allocate_async(void** out, std::size_t bytes, int device, cudaStream_t stream) noexcept {
        return on_device(
            device,
            [&] {
                cudaMemPool_t pool = pool_;
                cudaError_t e = pool != nullptr ? cudaSuccess : cudaDeviceGetDefaultMemPool(&pool, device);
                return e != cudaSuccess ? e : cudaMallocFromPoolAsync(out, bytes, pool, stream);
            },
            [&] {
                (void)cudaFreeAsync(*out, stream);
                *out = nullptr;
            });
    }

    /// cudaFreeAsync: the memory returns to the pool once `stream` reaches the free.
    status deallocate_async(void* p, std::size_t /*bytes*/, int device, cudaStream_t stream) noexcept {
        if (p == nullptr) return status::success();
        return on_device(device, [&] { return cudaFreeAsync(p, stream); });
    }

    /// Waits for `stream` (on `device`): its pending frees are back in the pool.
    status synchronize_stream(int device, cudaStream_t stream) noexcept {
        return on_device(device, [&] { return cudaStreamSynchronize(stream); });
    }

    /// Note: cudaMemGetInfo creates a CUDA context on `device` if it has none
    /// (hundreds of MiB). DeviceSelector reads NVML first to avoid that.
    status memory_info(int device, std::size_t* free, std::size_t* total) noexcept {
        return on_device(device, [&] { return cudaMemGetInfo(free, total); });
    }

    /// cudaGetDeviceCount: the devices CUDA_VISIBLE_DEVICES lets this process see.
    status device_count(int* count) noexcept { return checked(cudaGetDeviceCount(count)); }
    /// cudaGetDevice: the calling thread's current device.
    status current_device(int* device) noexcept { return checked(cudaGetDevice(device)); }
    /// cudaSetDevice: makes `device` current on the calling thread.
    status set_device(int device) noexcept { return checked(cudaSetDevice(device)); }

    /// cudaDeviceSynchronize on `device`: waits for its work and its pending stream-ordered frees.
    status synchronize(int device) noexcept {
        return on_device(device, [] { return cudaDeviceSynchronize(); });
    }

    /// Returns the unused memory of the pool the stream-ordered calls use (the
    /// one given at construction, else the device's default pool) to the
    /// driver, keeping at most `keep_bytes` reserved. (The *_default_pool names
    /// predate pools of one's own: they act on that same pool.)
    status trim_default_pool(int device, std::size_t keep_bytes) noexcept {
        return on_device(device, [&] {
            cudaMemPool_t pool = pool_;
            cudaError_t e = pool != nullptr ? cudaSuccess : cudaDeviceGetDefaultMemPool(&pool, device);
            return e != cudaSuccess ? e : cudaMemPoolTrimTo(pool, keep_bytes);
        });
    }

    /// Bytes the default pool holds from the driver, and how many of them are in use.
    status default_pool_usage(int device, std::size_t* reserved, std::size_t* used) noexcept {
        return on_device(device, [&] {
            cudaMemPool_t pool = pool_;
            cudaError_t e = pool != nullptr ? cudaSuccess : cudaDeviceGetDefaultMemPool(&pool, device);
            std::uint64_t r = 0, u = 0;
            if (e == cudaSuccess) e = cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &r);
            if (e == cudaSuccess) e = cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &u);
            *reserved = static_cast<std::size_t>(r);
            *used = static_cast<std::size_t>(u);
            return e;
        });
    }

    /// How much freed memory the default pool keeps at a synchronization instead
    /// of returning it to the driver (cudaMemPoolAttrReleaseThreshold).
    status set_default_pool_release_threshold(int device, std::size_t bytes) noexcept {
        return on_device(device, [&] {
            cudaMemPool_t pool = pool_;
            cudaError_t e = pool != nullptr ? cudaSuccess : cudaDeviceGetDefaultMemPool(&pool, device);
            std::uint64_t v = bytes;
            return e != cudaSuccess ? e : cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &v);
        });
    }

    /// The status of a cudart call's result. A failed call leaves its code as the
    /// thread's last error; this takes it off so a recovered OOM is not reported
    /// again by an unrelated later check. Sticky errors stay: cudart keeps them.
    static status checked(cudaError_t e) noexcept {
        if (e == cudaSuccess) return status::success();
        (void)cudaGetLastError();
        return classify(e);
    }

private:
    cudaMemPool_t pool_ = nullptr;

    /// Runs `f` with `device` current, restoring the caller's device after. When
    /// the restore fails (the caller's device went to another process in
    /// exclusive mode, say), that failure is the answer: `undo` takes back what
    /// `f` did, and the error is cleared from the thread, as the backend contract
    /// asks. (Restoring creates the caller's device's primary context if the
    /// thread had none yet; see the README.)
    template <class F, class Undo = void (*)()>
    static status on_device(int device, F&& f, Undo&& undo = [] {}) noexcept {
        int previous = 0;
        cudaError_t e = cudaGetDevice(&previous);
        if (e != cudaSuccess) return checked(e);
        if (previous != device) {
            e = cudaSetDevice(device);
            if (e != cudaSuccess) return checked(e);
        }
        e = f();
        if (previous != device) {
            cudaError_t r = cudaSetDevice(previous);
            if (r != cudaSuccess) {
                if (e == cudaSuccess) undo();
                return checked(r);
            }
        }
        return checked(e);
    }
};

}  // namespace oomguard
