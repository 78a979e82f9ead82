// nvcc accepts the umbrella header and instantiates the real-GPU backend.
#include <oomguard/oomguard.hpp>

__global__ void fill(float* p, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 1.0f;
}

int main() {
    oomguard::CudaRuntime cuda;
    int count = 0;
    if (!cuda.device_count(&count).ok() || count == 0) return 0;  // built, not run, without a GPU
    oomguard::MemoryBudget<> budget(cuda, 0, oomguard::Limit::fraction(0.5));
    oomguard::DeviceBuffer<> buf(budget, 1024 * sizeof(float));
    fill<<<4, 256>>>(buf.as<float>(), 1024);
    return cuda.synchronize(0).ok() ? 0 : 1;
}
