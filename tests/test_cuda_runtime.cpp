// CudaRuntime's real code, linked against the fake cudart in support/.
#include <oomguard/cuda_runtime.hpp>
#include <oomguard/classify.hpp>
#include <oomguard/device_buffer.hpp>

#include "fake_cudart.hpp"

#include <doctest/doctest.h>

#include <string>

using namespace oomguard;
using Budget = MemoryBudget<CudaRuntime>;
constexpr std::size_t MiB = 1 << 20;

static_assert(is_backend_v<CudaRuntime>, "CudaRuntime models the backend concept");

TEST_CASE("allocate, free and memory info go through cudart") {
    fake_cudart::reset({100 * MiB, 50 * MiB});
    CudaRuntime cuda;
    int n = 0;
    REQUIRE(cuda.device_count(&n).ok());
    CHECK(n == 2);
    void* p = nullptr;
    REQUIRE(cuda.allocate(&p, 10 * MiB, 1).ok());
    CHECK(fake_cudart::live_bytes(1) == 10 * MiB);
    int d = -1;
    cuda.current_device(&d);
    CHECK(d == 0);  // the caller's device was restored
    std::size_t free = 0, total = 0;
    REQUIRE(cuda.memory_info(1, &free, &total).ok());
    CHECK(total == 50 * MiB);
    CHECK(free == 40 * MiB);
    CHECK(cuda.deallocate(p, 10 * MiB, 1).ok());
    CHECK(fake_cudart::live_allocations() == 0);
}

TEST_CASE("no switch when the device is already current") {
    fake_cudart::reset({100 * MiB, 100 * MiB});
    CudaRuntime cuda;
    void* p = nullptr;
    REQUIRE(cuda.allocate(&p, MiB, 0).ok());
    cuda.deallocate(p, MiB, 0);
    CHECK(fake_cudart::set_device_calls() == 0);
    REQUIRE(cuda.allocate(&p, MiB, 1).ok());
    CHECK(fake_cudart::set_device_calls() == 2);  // there and back
    cuda.deallocate(p, MiB, 1);
}

TEST_CASE("a failed cudaMalloc is a typed OOM and the last error is cleared") {
    fake_cudart::reset({100 * MiB});
    CudaRuntime cuda;
    Budget budget(cuda, 0, Limit::unlimited());
    fake_cudart::fail_next_mallocs(1);
    try {
        budget.allocate(80 * MiB);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().code == cudaErrorMemoryAllocation);
        CHECK(std::string(e.info().code_name) == "cudaErrorMemoryAllocation");
        CHECK(e.info().total == 100 * MiB);
        CHECK(std::string(e.what()).find("tried to allocate 80.00 MiB on GPU 0;") != std::string::npos);
        CHECK(is_device_oom(e));
    }
    CHECK(fake_cudart::pending_error() == cudaSuccess);
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(budget.used() == 0);
    // Capacity exhausted for real.
    CHECK_THROWS_AS(budget.allocate(101 * MiB), out_of_memory);
    CHECK(cudaPeekAtLastError() == cudaSuccess);
}

TEST_CASE("no driver: no_device_error, never an OOM") {
    fake_cudart::reset({100 * MiB});
    fake_cudart::set_driver_error(cudaErrorInsufficientDriver);
    CudaRuntime cuda;
    try {
        Budget budget(cuda, 0, MiB);
        FAIL("expected no_device_error");
    } catch (no_device_error const& e) {
        CHECK(std::string(e.what()).find("no usable CUDA device") != std::string::npos);
        CHECK(e.code() == cudaErrorInsufficientDriver);
        CHECK_FALSE(is_device_oom(e));
    }
    fake_cudart::reset({});
    CHECK_THROWS_AS(Budget(cuda, 0, MiB), no_device_error);
}

TEST_CASE("a sticky error passes through untouched") {
    fake_cudart::reset({100 * MiB});
    CudaRuntime cuda;
    Budget budget(cuda, 0, 50 * MiB);
    void* p = budget.allocate(MiB);
    fake_cudart::set_sticky(cudaErrorIllegalAddress);
    try {
        budget.allocate(MiB);
        FAIL("expected cuda_error");
    } catch (cuda_error const& e) {
        CHECK(e.is_sticky());
        CHECK(e.code() == cudaErrorIllegalAddress);
        CHECK_FALSE(is_device_oom(e));
    }
    CHECK(cudaGetLastError() == cudaErrorIllegalAddress);  // sticky: still there
    budget.deallocate(p, MiB);
    CHECK(budget.free_failures() == 1);
    CHECK(budget.used() == 0);
}

TEST_CASE("classify maps cudart codes") {
    CHECK(CudaRuntime::classify(cudaErrorMemoryAllocation).kind == status_kind::out_of_memory);
    CHECK(CudaRuntime::classify(cudaErrorInsufficientDriver).kind == status_kind::no_device);
    CHECK(CudaRuntime::classify(cudaErrorNoDevice).kind == status_kind::no_device);
    CHECK(CudaRuntime::classify(cudaErrorIllegalAddress).kind == status_kind::sticky);
    CHECK(CudaRuntime::classify(cudaErrorLaunchFailure).kind == status_kind::sticky);
    CHECK(CudaRuntime::classify(cudaErrorInvalidDevice).kind == status_kind::invalid_argument);
    CHECK(CudaRuntime::classify(cudaErrorNotReady).kind == status_kind::other);
}

TEST_CASE("trimming the default pool") {
    fake_cudart::reset({100 * MiB});
    CudaRuntime cuda;
    CHECK(cuda.trim_default_pool(0, 0).ok());
    CHECK(fake_cudart::trim_calls() == 1);
    CHECK(cuda.trim_default_pool(3, 0).kind == status_kind::invalid_argument);
}

TEST_CASE("a device buffer over the real backend code") {
    fake_cudart::reset({100 * MiB});
    CudaRuntime cuda;
    Budget budget(cuda, 0, Limit::fraction(0.5));
    CHECK(budget.limit() == 50 * MiB);
    {
        DeviceBuffer<CudaRuntime> b(budget, 30 * MiB);
        CHECK(fake_cudart::live_bytes(0) == 30 * MiB);
        CHECK_THROWS_AS(DeviceBuffer<CudaRuntime>(budget, 30 * MiB), out_of_memory);
    }
    CHECK(fake_cudart::live_allocations() == 0);
}

#ifdef OOMGUARD_DRIVER_TYPES_H
#include <fstream>
#include <regex>
#include <sstream>

// Every cudaError_t enumerator of the toolkit's driver_types.h, with its doc
// comment: sticky exactly when the header says the process must be terminated.
TEST_CASE("the classification table against every enumerator of driver_types.h") {
    std::ifstream in(OOMGUARD_DRIVER_TYPES_H);
    REQUIRE(in.good());
    std::stringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    std::size_t begin = text.find("enum __device_builtin__ cudaError");
    REQUIRE(begin != std::string::npos);
    std::string body = text.substr(begin, text.find("};", begin) - begin);
    std::regex item(R"(/\*\*([\s\S]*?)\*/\s*(cudaError\w+)\s*=\s*(\d+))");
    int enumerators = 0, sticky = 0;
    for (std::sregex_iterator it(body.begin(), body.end(), item), end; it != end; ++it) {
        std::string comment = std::regex_replace((*it)[1].str(), std::regex(R"(\s*\n\s*\*?)"), " ");
        std::string name = (*it)[2].str();
        int code = std::stoi((*it)[3].str());
        bool must_restart = std::regex_search(comment, std::regex(R"(must\s+be\s+terminated)"));
        status s = CudaRuntime::classify(static_cast<cudaError_t>(code));
        CAPTURE(name);
        CAPTURE(code);
        CHECK((s.kind == status_kind::sticky) == must_restart);
        CHECK((s.kind == status_kind::out_of_memory) == (name == "cudaErrorMemoryAllocation"));
        CHECK((s.kind == status_kind::ok) == (code == 0));
        ++enumerators;
        sticky += must_restart ? 1 : 0;
    }
    CHECK(enumerators > 100);
    CHECK(sticky >= 10);
    MESSAGE("driver_types.h: " << enumerators << " enumerators, " << sticky << " sticky");
    // At exit, not a missing driver: a plain cuda_error, without "check the driver" advice.
    CHECK(CudaRuntime::classify(cudaErrorCudartUnloading).kind == status_kind::other);
    CHECK(CudaRuntime::classify(cudaErrorContextIsDestroyed).kind == status_kind::other);
}
#endif

TEST_CASE("a device that cannot be restored is the answer, and the allocation is undone") {
    fake_cudart::reset({100 * MiB, 100 * MiB});
    CudaRuntime cuda;
    fake_cudart::refuse_set_device(0, cudaErrorDevicesUnavailable);  // another process took device 0
    void* p = reinterpret_cast<void*>(1);
    status s = cuda.allocate(&p, MiB, 1);
    CHECK_FALSE(s.ok());
    CHECK(s.code == static_cast<int>(cudaErrorDevicesUnavailable));
    CHECK(p == nullptr);
    CHECK(fake_cudart::live_bytes(1) == 0);           // not leaked
    CHECK(fake_cudart::pending_error() == cudaSuccess);  // and not left pending
    fake_cudart::refuse_set_device(-1, cudaSuccess);
}

TEST_CASE("stream-ordered allocation through cudaMallocFromPoolAsync: counted as the pool takes it, typed OOM") {
    fake_cudart::reset({4 * MiB});
    static_assert(is_stream_ordered_v<CudaRuntime>, "CudaRuntime is a stream-ordered backend");
    CudaRuntime cuda;
    Budget budget(cuda, 0, Limit::unlimited());
    cudaStream_t stream = nullptr;  // the default stream
    void* p = budget.allocate_async(1000, stream);
    CHECK(p != nullptr);
    CHECK(budget.used() == 1024);                       // two 512-byte blocks
    CHECK(fake_cudart::pool_reserved(0) == 1000);       // the pool took what it was asked
    CHECK(fake_cudart::live_bytes(0) == 1000);
    budget.deallocate_async(p, 1000, stream);
    CHECK(budget.used() == 0);
    CHECK(fake_cudart::pool_reserved(0) == 1000);       // freed into the pool, still reserved
    CHECK(cuda.synchronize_stream(0, stream).ok());
    fake_cudart::fail_next_mallocs(1);
    try {
        (void)budget.allocate_async(64, stream);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::device);
        CHECK(std::string(e.info().code_name) == "cudaErrorMemoryAllocation");
    }
    CHECK(fake_cudart::pending_error() == cudaSuccess);  // cleared: a recovered OOM is not reported again
    CHECK(budget.used() == 0);
    CHECK(cuda.allocate_async(&p, 64, 7, stream).kind == status_kind::invalid_argument);  // no device 7
}

TEST_CASE("stream-ordered allocation from a pool the backend is given") {
    fake_cudart::reset({4 * MiB, 4 * MiB});
    cudaMemPool_t pool1 = nullptr;
    REQUIRE(cudaDeviceGetDefaultMemPool(&pool1, 1) == cudaSuccess);
    CudaRuntime cuda(pool1);
    CHECK(cuda.pool() == pool1);
    Budget budget(cuda, 1, Limit::unlimited());
    void* p = budget.allocate_async(4096, nullptr);
    CHECK(fake_cudart::pool_reserved(1) == 4096);  // device 1's pool, the one given
    CHECK(fake_cudart::pool_reserved(0) == 0);
    budget.deallocate_async(p, 4096, nullptr);
    std::size_t reserved = 0, used = 0;
    REQUIRE(cuda.default_pool_usage(0, &reserved, &used).ok());  // the pool given, whatever the device
    CHECK(reserved == 4096);
    CHECK(used == 0);
    REQUIRE(cuda.trim_default_pool(0, 0).ok());  // what CudaDefaultPoolCache's release calls
    CHECK(fake_cudart::pool_reserved(1) == 0);
    CHECK(CudaRuntime().pool() == nullptr);  // by default: each device's default pool
}
