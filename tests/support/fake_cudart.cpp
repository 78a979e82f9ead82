// See fake_cudart.hpp. Implements the cudart entry points oomguard uses with
// the same C signatures as <cuda_runtime_api.h>, so CudaRuntime compiles
// unchanged and links here instead of libcudart.
#include "fake_cudart.hpp"

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

namespace {

struct State {
    std::mutex m;
    std::vector<std::size_t> capacity;
    std::vector<std::size_t> used;
    std::map<void*, std::pair<int, std::size_t>> live;
    cudaError_t driver_error = cudaSuccess;
    cudaError_t sticky = cudaSuccess;
    int fail_mallocs = 0;
    cudaError_t fail_code = cudaErrorMemoryAllocation;
    int refuse_device = -1;  // cudaSetDevice to it fails (another process owns it)
    cudaError_t refuse_code = cudaSuccess;
    int set_device_calls = 0, malloc_calls = 0, mem_get_info_calls = 0, trim_calls = 0;
    int pool_tag[64] = {};
    std::size_t pool_reserved[64] = {}, pool_used[64] = {}, pool_threshold[64] = {};
};

State& state() {
    static State s;
    return s;
}

thread_local int current_device = 0;
thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t e) {
    last_error = e;
    return e;
}

// The checks every call makes first, in cudart's order: driver, then sticky.
cudaError_t gate(State& s) {
    if (s.driver_error != cudaSuccess) return fail(s.driver_error);
    if (s.sticky != cudaSuccess) return fail(s.sticky);
    if (s.capacity.empty()) return fail(cudaErrorNoDevice);
    return cudaSuccess;
}

}  // namespace

namespace fake_cudart {

void reset(std::vector<std::size_t> const& capacities) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    for (auto& kv : s.live) std::free(kv.first);
    s.live.clear();
    s.capacity = capacities;
    s.used.assign(capacities.size(), 0);
    s.driver_error = cudaSuccess;
    s.sticky = cudaSuccess;
    s.fail_mallocs = 0;
    s.refuse_device = -1;
    s.set_device_calls = s.malloc_calls = s.mem_get_info_calls = s.trim_calls = 0;
    for (int i = 0; i < 64; ++i) s.pool_reserved[i] = s.pool_used[i] = s.pool_threshold[i] = 0;
    current_device = 0;
    last_error = cudaSuccess;
}
void set_driver_error(cudaError_t e) {
    std::lock_guard<std::mutex> lock(state().m);
    state().driver_error = e;
}
void fail_next_mallocs(int n, cudaError_t e) {
    std::lock_guard<std::mutex> lock(state().m);
    state().fail_mallocs = n;
    state().fail_code = e;
}
void refuse_set_device(int device, cudaError_t e) {
    std::lock_guard<std::mutex> lock(state().m);
    state().refuse_device = device;
    state().refuse_code = e;
}
void set_sticky(cudaError_t e) {
    std::lock_guard<std::mutex> lock(state().m);
    state().sticky = e;
}
void set_pool(int device, std::size_t reserved, std::size_t used) {
    std::lock_guard<std::mutex> lock(state().m);
    state().pool_reserved[device] = reserved;
    state().pool_used[device] = used;
}
std::size_t pool_reserved(int device) {
    std::lock_guard<std::mutex> lock(state().m);
    return state().pool_reserved[device];
}
std::size_t pool_release_threshold(int device) {
    std::lock_guard<std::mutex> lock(state().m);
    return state().pool_threshold[device];
}
std::size_t peek_free(int device) {
    std::lock_guard<std::mutex> lock(state().m);
    auto d = static_cast<std::size_t>(device);
    return state().capacity.at(d) - state().used.at(d);
}
std::size_t live_bytes(int device) {
    std::lock_guard<std::mutex> lock(state().m);
    return state().used.at(static_cast<std::size_t>(device));
}
std::size_t live_allocations() {
    std::lock_guard<std::mutex> lock(state().m);
    return state().live.size();
}
int set_device_calls() { return state().set_device_calls; }
int malloc_calls() { return state().malloc_calls; }
int mem_get_info_calls() { return state().mem_get_info_calls; }
int trim_calls() { return state().trim_calls; }
cudaError_t pending_error() { return last_error; }

}  // namespace fake_cudart

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (count == nullptr) return fail(cudaErrorInvalidValue);
    *count = 0;
    if (cudaError_t e = gate(s)) return e;
    *count = static_cast<int>(s.capacity.size());
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    if (device == nullptr) return fail(cudaErrorInvalidValue);
    *device = current_device;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    ++s.set_device_calls;
    if (cudaError_t e = gate(s)) return e;
    if (device < 0 || static_cast<std::size_t>(device) >= s.capacity.size())
        return fail(cudaErrorInvalidDevice);
    if (device == s.refuse_device) return fail(s.refuse_code);
    current_device = device;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMalloc(void** p, size_t size) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    ++s.malloc_calls;
    if (cudaError_t e = gate(s)) return e;
    if (p == nullptr) return fail(cudaErrorInvalidValue);
    *p = nullptr;
    if (s.fail_mallocs > 0) {
        --s.fail_mallocs;
        return fail(s.fail_code);
    }
    auto d = static_cast<std::size_t>(current_device);
    if (size > s.capacity[d] - s.used[d]) return fail(cudaErrorMemoryAllocation);
    void* q = std::malloc(size == 0 ? 1 : size);
    if (q == nullptr) return fail(cudaErrorMemoryAllocation);
    s.used[d] += size;
    s.live[q] = {current_device, size};
    *p = q;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFree(void* p) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    if (p == nullptr) return cudaSuccess;
    auto it = s.live.find(p);
    if (it == s.live.end()) return fail(cudaErrorInvalidValue);
    s.used[static_cast<std::size_t>(it->second.first)] -= it->second.second;
    std::free(p);
    s.live.erase(it);
    return cudaSuccess;
}

// The stream-ordered pool, as the real one accounts it: allocations reserve
// from the device and count as the pool's used bytes; a free on a stream gives
// its bytes back to the pool (reserved, not used) until a trim. Streams are
// not modelled beyond that (SimulatedDevices models pending frees).
cudaError_t CUDARTAPI cudaMallocFromPoolAsync(void** p, size_t size, cudaMemPool_t pool, cudaStream_t) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    ++s.malloc_calls;
    if (cudaError_t e = gate(s)) return e;
    if (p == nullptr || pool == nullptr) return fail(cudaErrorInvalidValue);
    *p = nullptr;
    if (s.fail_mallocs > 0) {
        --s.fail_mallocs;
        return fail(s.fail_code);
    }
    auto d = static_cast<std::size_t>(static_cast<int>(reinterpret_cast<int*>(pool) - s.pool_tag));
    std::size_t spare = s.pool_reserved[d] - s.pool_used[d], need = size > spare ? size - spare : 0;
    if (need > s.capacity[d] - s.used[d]) return fail(cudaErrorMemoryAllocation);
    void* q = std::malloc(size == 0 ? 1 : size);
    if (q == nullptr) return fail(cudaErrorMemoryAllocation);
    s.used[d] += need;
    s.pool_reserved[d] += need;
    s.pool_used[d] += size;
    s.live[q] = {static_cast<int>(d) + 1000, size};  // 1000+: the pool's, freed by cudaFreeAsync
    *p = q;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFreeAsync(void* p, cudaStream_t) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    if (p == nullptr) return cudaSuccess;
    auto it = s.live.find(p);
    if (it == s.live.end() || it->second.first < 1000) return fail(cudaErrorInvalidValue);
    s.pool_used[static_cast<std::size_t>(it->second.first - 1000)] -= it->second.second;
    std::free(p);
    s.live.erase(it);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    return gate(s);
}

cudaError_t CUDARTAPI cudaMemGetInfo(size_t* free, size_t* total) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    ++s.mem_get_info_calls;
    if (cudaError_t e = gate(s)) return e;
    if (free == nullptr || total == nullptr) return fail(cudaErrorInvalidValue);
    auto d = static_cast<std::size_t>(current_device);
    *total = s.capacity[d];
    *free = s.capacity[d] - s.used[d];
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceSynchronize(void) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    // As CUDA's pool does at a synchronization: what it holds unused above its
    // release threshold goes back to the driver (all of it at CUDA's default, 0).
    auto d = static_cast<std::size_t>(current_device);
    std::size_t keep = s.pool_used[d] > s.pool_threshold[d] ? s.pool_used[d] : s.pool_threshold[d];
    if (s.pool_reserved[d] > keep) s.pool_reserved[d] = keep;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetLastError(void) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (s.sticky != cudaSuccess) return s.sticky;
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    return s.sticky != cudaSuccess ? s.sticky : last_error;
}

cudaError_t CUDARTAPI cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    if (pool == nullptr) return fail(cudaErrorInvalidValue);
    if (device < 0 || static_cast<std::size_t>(device) >= s.capacity.size() || device >= 64)
        return fail(cudaErrorInvalidDevice);
    *pool = reinterpret_cast<cudaMemPool_t>(&s.pool_tag[device]);
    return cudaSuccess;
}

namespace {
int pool_device(State& s, cudaMemPool_t pool) {
    return static_cast<int>(reinterpret_cast<int*>(pool) - s.pool_tag);
}
}  // namespace

cudaError_t CUDARTAPI cudaMemPoolTrimTo(cudaMemPool_t pool, size_t keep) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    ++s.trim_calls;
    if (cudaError_t e = gate(s)) return e;
    int d = pool_device(s, pool);
    std::size_t floor = s.pool_used[d] > keep ? s.pool_used[d] : keep;
    if (s.pool_reserved[d] > floor) s.pool_reserved[d] = floor;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemPoolGetAttribute(cudaMemPool_t pool, enum cudaMemPoolAttr attr, void* value) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    int d = pool_device(s, pool);
    auto* out = static_cast<std::uint64_t*>(value);
    switch (attr) {
        case cudaMemPoolAttrReservedMemCurrent: *out = s.pool_reserved[d]; return cudaSuccess;
        case cudaMemPoolAttrUsedMemCurrent: *out = s.pool_used[d]; return cudaSuccess;
        case cudaMemPoolAttrReleaseThreshold: *out = s.pool_threshold[d]; return cudaSuccess;
        default: return fail(cudaErrorInvalidValue);
    }
}

cudaError_t CUDARTAPI cudaMemPoolSetAttribute(cudaMemPool_t pool, enum cudaMemPoolAttr attr, void* value) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.m);
    if (cudaError_t e = gate(s)) return e;
    if (attr != cudaMemPoolAttrReleaseThreshold) return fail(cudaErrorInvalidValue);
    s.pool_threshold[pool_device(s, pool)] = static_cast<std::size_t>(*static_cast<std::uint64_t*>(value));
    return cudaSuccess;
}

const char* CUDARTAPI cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaErrorUnknown";
    }
}

const char* CUDARTAPI cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

}  // extern "C"
