// A first training loop over a budget: each step needs bytes(m) = a + b*m for a
// micro-batch of m samples; when the device says no, the loop halves m and keeps
// the global batch by accumulation. (adaptive_batch will do this for you.)
#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

using namespace oomguard;

int main(int argc, char** argv) {
    std::size_t global_batch = 256;
    std::size_t device_mib = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string flag = argv[i];
        if (flag == "--bs") global_batch = std::strtoull(argv[i + 1], nullptr, 10);
        else if (flag == "--device-memory") device_mib = std::strtoull(argv[i + 1], nullptr, 10);
        else {
            std::fprintf(stderr, "unknown flag %s (valid: --bs N, --device-memory MiB)\n", flag.c_str());
            return 2;
        }
    }
    SimulatedDevices gpus(1, device_mib << 20);
    MemoryBudget<SimulatedDevices> budget(gpus, 0, Limit::fraction(0.9));
    std::size_t const fixed = 8u << 20, per_sample = 512u << 10;
    std::size_t micro = global_batch;
    int ooms = 0;
    double loss = 1.0;
    for (int step = 0; step < 20; ++step) {
        std::size_t done = 0;
        while (done < global_batch) {
            std::size_t m = micro < global_batch - done ? micro : global_batch - done;
            try {
                DeviceBuffer<SimulatedDevices> activations(budget, fixed + per_sample * m);
                loss *= 0.999;
                done += m;
            } catch (out_of_memory const& e) {
                ++ooms;
                std::printf("step %d: %s\n  -> micro-batch %zu -> %zu\n", step, e.what(), micro, micro / 2);
                if (micro == 1) return 1;
                micro /= 2;
            }
        }
    }
    std::printf("done: 20 steps of %zu samples as micro-batches of %zu, %d OOMs survived, loss %.6f, "
                "peak %s of budget %s\n",
                global_batch, micro, ooms, loss, detail::format_bytes(budget.peak()).c_str(),
                detail::format_bytes(budget.limit()).c_str());
    return gpus.live_bytes() == 0 ? 0 : 1;
}
