// The real libcudart. Without a driver (CI) every path must end in a clear
// no_device_error; on a GPU the same test allocates for real.
#include <oomguard/oomguard.hpp>

#include <doctest/doctest.h>

#include <string>

using namespace oomguard;

TEST_CASE("the real runtime: no usable device is reported as such, never as OOM") {
    CudaRuntime cuda;
    int n = 0;
    status s = cuda.device_count(&n);
    if (!s.ok()) {
        MESSAGE("no usable GPU here: " << std::string(s.name) << " (" << s.code << ")");
        CHECK(s.kind == status_kind::no_device);
        CHECK_FALSE(is_device_oom(s));
        try {
            MemoryBudget<> budget(cuda, 0, Limit::fraction(0.5));
            FAIL("expected no_device_error");
        } catch (no_device_error const& e) {
            CHECK(std::string(e.what()).find("no usable CUDA device") != std::string::npos);
            CHECK_FALSE(is_device_oom(e));
        }
        void* p = nullptr;
        status a = cuda.allocate(&p, 1024, 0);
        CHECK(a.kind == status_kind::no_device);
        // cudart keeps its initialisation failure for the life of the process: it
        // can never be cleared, and it must never read as cudaErrorMemoryAllocation.
        CHECK(cudaGetLastError() != cudaErrorMemoryAllocation);
        return;
    }
    MESSAGE(n << " GPU(s): running the real path");
    MemoryBudget<> budget(cuda, 0, Limit::fraction(0.5));
    void* p = budget.allocate(1 << 20);
    CHECK(p != nullptr);
    budget.deallocate(p, 1 << 20);
    std::size_t free = 0, total = 0;
    REQUIRE(cuda.memory_info(0, &free, &total).ok());
    // More than the card holds: cudaMalloc itself refuses, and the error is typed.
    MemoryBudget<> unlimited(cuda, 0, Limit::unlimited());
    CHECK_THROWS_AS(unlimited.allocate(total + (std::size_t{1} << 30)), out_of_memory);
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(budget.used() == 0);
}
