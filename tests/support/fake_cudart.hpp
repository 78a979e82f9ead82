// A fake libcudart for tests: host memory, capacities set by the test. Tests
// that link it instead of libcudart run every cudart call of CudaRuntime —
// error codes, last-error clearing, device switching — on a machine without a GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

namespace fake_cudart {

/// Resets the fake to `capacities.size()` devices (none: cudaErrorNoDevice),
/// frees everything, clears errors and counters. Device 0 becomes current.
void reset(std::vector<std::size_t> const& capacities);
/// Every call answers `e` (for example cudaErrorInsufficientDriver); cudaSuccess undoes it.
void set_driver_error(cudaError_t e);
/// The next `n` cudaMalloc calls fail with `e` (default: out of memory).
void fail_next_mallocs(int n, cudaError_t e = cudaErrorMemoryAllocation);
/// cudaSetDevice(device) fails with `e` from now on (exclusive-process mode, say:
/// another process owns the device); -1 undoes it.
void refuse_set_device(int device, cudaError_t e);
/// Puts a sticky error on the context: every later call returns it.
void set_sticky(cudaError_t e);

/// What the default pool of `device` holds from the driver and uses; trimming
/// lowers `reserved` to max(used, keep), and a synchronization of the device to
/// max(used, release threshold), as CUDA's pool does.
void set_pool(int device, std::size_t reserved, std::size_t used);
std::size_t pool_reserved(int device);
std::size_t pool_release_threshold(int device);

std::size_t live_bytes(int device);
/// Free bytes of a device, read without counting as a cudart call.
std::size_t peek_free(int device);
std::size_t live_allocations();
int set_device_calls();
int malloc_calls();
int mem_get_info_calls();
int trim_calls();
/// The calling thread's pending last error, without clearing it.
cudaError_t pending_error();

}  // namespace fake_cudart
