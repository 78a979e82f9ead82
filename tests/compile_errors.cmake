# ctest: the mistakes a user makes first fail to compile with a message that
# says what to do -- not "no matching function" or "incomplete type" from deep
# inside a template, nor a static assertion from inside CCCL.
set(_n 0)
# expect(<name> <text the compiler's output must hold> <source> <extra flags...>)
function(expect name text source)
    set(src ${WORK}/compile_error_${name}.cpp)
    file(WRITE ${src} "${source}")
    execute_process(COMMAND ${CXX} -std=c++17 -fsyntax-only -I${INCLUDE} ${ARGN} ${src}
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(rc EQUAL 0)
        message(FATAL_ERROR "${name}: compiled, but must not:\n${source}")
    endif()
    string(FIND "${out}${err}" "${text}" at)
    if(at EQUAL -1)
        message(FATAL_ERROR "${name}: the compiler did not say '${text}':\n${out}${err}")
    endif()
    math(EXPR _n "${_n} + 1")
    set(_n ${_n} PARENT_SCOPE)
endfunction()

if(CUDA_INCLUDE)
# A simulated budget given to DeviceBuffer<>, which is the GPU's when CUDA is found.
expect(device_buffer_backend "DeviceBuffer<oomguard::SimulatedDevices> for a simulated budget" [=[
#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>
int main() {
    oomguard::SimulatedDevices sim(1, 1 << 20);
    oomguard::MemoryBudget<oomguard::SimulatedDevices> budget(sim, 0);
    oomguard::DeviceBuffer<> buf(budget, 64);  // DeviceBuffer<CudaRuntime>
}
]=] -isystem ${CUDA_INCLUDE})
# CudaRuntime in a build without the toolkit's headers.
expect(cuda_runtime_without_cuda "CudaRuntime needs the CUDA toolkit's headers" [=[
#include <oomguard/oomguard.hpp>
int main() { oomguard::CudaRuntime cuda; (void)cuda; }
]=] -DOOMGUARD_HAS_CUDA=0)
expect(cuda_runtime_header_without_cuda "<oomguard/cuda_runtime.hpp> needs the CUDA toolkit" [=[
#include <oomguard/cuda_runtime.hpp>
int main() {}
]=] -DOOMGUARD_HAS_CUDA=0)
# Thrust under a host compiler with no device system named.
expect(thrust_without_device_system "-DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP" [=[
#include <oomguard/thrust.hpp>
int main() {}
]=] -isystem ${CUDA_INCLUDE} -isystem ${CUDA_INCLUDE}/cccl)
# ... also when a Thrust header came first and picked CUDA by default.
expect(thrust_included_first "define THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP before any Thrust header" [=[
#include <thrust/device_vector.h>
#include <oomguard/thrust.hpp>
int main() {}
]=] -isystem ${CUDA_INCLUDE} -isystem ${CUDA_INCLUDE}/cccl)
endif()
# A budget over CudaRuntime where there is no toolkit.
expect(budget_without_cuda "CudaRuntime is one only where the CUDA toolkit's headers are found" [=[
#include <oomguard/oomguard.hpp>
int main() {
    oomguard::CudaRuntime* cuda = nullptr;
    oomguard::MemoryBudget<oomguard::CudaRuntime> budget(*cuda, 0);
}
]=] -DOOMGUARD_HAS_CUDA=0)
# reduce() folding a double step from an int init (std::accumulate's trap).
expect(reduce_narrowing "reduce folds in the type of init" [=[
#include <oomguard/adaptive_batch.hpp>
#include <functional>
int main() {
    oomguard::BatchOptions o;
    o.global_batch = 8;
    oomguard::AdaptiveBatch a(o);
    a.reduce([](oomguard::MicroBatch const& mb) { return 0.5 * static_cast<double>(mb.size); }, 0, std::plus<>{});
}
]=])
# An older standard: the pkg-config file leaves -std to the user.
expect(cplusplus_14 "oomguard needs C++17 or later" [=[
#include <oomguard/backend.hpp>
int main() {}
]=] -std=c++14)
message("${_n} mistakes answered with what to do")
