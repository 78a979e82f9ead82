// DeviceSelector and ScopedDevice over CudaRuntime's real code, linked against
// the fake cudart: choosing a device through NVML makes no cudart call that
// would create a context.
#include <oomguard/cuda_runtime.hpp>
#include <oomguard/device_selector.hpp>

#include "fake_cudart.hpp"
#include "fake_nvml.hpp"

#include <doctest/doctest.h>

using namespace oomguard;
constexpr std::size_t GiB = std::size_t{1} << 20;  // the fake cudart backs allocations with host memory

namespace {
void install_nvml() {
    auto& st = fake_nvml::state();
    st.gpus = {{"GPU-0000", "00000000:01:00.0", "H100"},
               {"GPU-1111", "00000000:02:00.0", "H100"},
               {"GPU-2222", "00000000:03:00.0", "H100"}};
    st.memory = [](int i, std::size_t* f, std::size_t* t) {
        *t = 80 * GiB;
        *f = fake_cudart::peek_free(i);
        return true;
    };
}
}  // namespace

TEST_CASE("selecting through NVML creates no context on any device") {
    fake_cudart::reset({80 * GiB, 80 * GiB, 80 * GiB});
    install_nvml();
    CudaRuntime cuda;
    MemoryBudget<CudaRuntime> b0(cuda, 0, Limit::unlimited());
    void* big = b0.allocate(60 * GiB);  // device 0 is busy
    int calls_before = fake_cudart::set_device_calls();
    int info_before = fake_cudart::mem_get_info_calls();
    DeviceSelector<CudaRuntime> sel(cuda, Nvml::from(fake_nvml::api()), nullptr, nullptr);
    int best = sel.first_with_free(30 * GiB);
    CHECK(best == 1);
    (void)sel.facts();
    (void)sel.table();
    CHECK(fake_cudart::set_device_calls() == calls_before);
    CHECK(fake_cudart::mem_get_info_calls() == info_before);
    {
        ScopedDevice<CudaRuntime> on(cuda, best);  // the one switch: to the chosen device
        CHECK(fake_cudart::set_device_calls() == calls_before + 1);
        int d = -1;
        cuda.current_device(&d);
        CHECK(d == 1);
    }
    CHECK(fake_cudart::set_device_calls() == calls_before + 2);  // and back
    b0.deallocate(big, 60 * GiB);
}

TEST_CASE("without NVML the fallback reads every device through cudart (the documented cost)") {
    fake_cudart::reset({80 * GiB, 80 * GiB});
    CudaRuntime cuda;
    DeviceSelector<CudaRuntime> sel(cuda, Nvml::none(), nullptr, nullptr);
    CHECK(sel.most_free() == 0);
    CHECK(fake_cudart::mem_get_info_calls() == 2);
}

TEST_CASE("a failed restore is reported, never thrown") {
    fake_cudart::reset({GiB, GiB});
    CudaRuntime cuda;
    static int reported_device = -1;
    static int reported_code = 0;
    auto old = set_restore_failure_handler([](status s, int device) {
        reported_device = device;
        reported_code = s.code;
    });
    unsigned long failures = restore_failures();
    {
        ScopedDevice<CudaRuntime> on(cuda, 1);
        fake_cudart::set_sticky(cudaErrorIllegalAddress);  // the context dies inside the scope
    }
    set_restore_failure_handler(old);
    CHECK(reported_device == 0);
    CHECK(reported_code == cudaErrorIllegalAddress);
    CHECK(restore_failures() == failures + 1);
}

TEST_CASE("no driver: the selector sees no device and says so") {
    fake_cudart::reset({GiB});
    fake_cudart::set_driver_error(cudaErrorInsufficientDriver);
    CudaRuntime cuda;
    DeviceSelector<CudaRuntime> sel(cuda, Nvml::none(), nullptr, nullptr);
    CHECK(sel.count() == 0);
    CHECK_THROWS_WITH_AS(sel.most_free(), doctest::Contains("no device is visible"), no_fitting_device);
}
