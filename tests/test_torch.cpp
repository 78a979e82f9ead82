// <oomguard/torch.hpp> against a real libtorch (the PyPI wheel, CPU): the typed
// rule, CPU tensors through a budget over a simulated GPU, and adaptive_batch
// recovering a real torch::nn model's training from libtorch's own OOMs.
#include <oomguard/oomguard.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/torch.hpp>

#include <torch/torch.h>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

using Sim = oomguard::SimulatedDevices;
constexpr std::size_t KiB = 1024;

TEST_CASE("c10::OutOfMemoryError is a device OOM by its type, whatever it says; a c10::Error is not") {
    try {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "XPU out of memory. Tried to allocate 2 GiB");
        FAIL("expected c10::OutOfMemoryError");
    } catch (std::exception const& e) {
        CHECK(oomguard::is_torch_oom(e));
        CHECK(oomguard::is_device_oom(e));
    }
    try {
        TORCH_CHECK(false, "XPU out of memory. Tried to allocate 2 GiB");
        FAIL("expected c10::Error");
    } catch (std::exception const& e) {
        CHECK_FALSE(oomguard::is_torch_oom(e));
        CHECK_FALSE(oomguard::is_device_oom(e));  // the text alone names no device OOM oomguard knows
    }
    try {
        TORCH_CHECK_VALUE(false, "a bad shape");
        FAIL("expected c10::ValueError");
    } catch (std::exception const& e) {
        CHECK_FALSE(oomguard::is_device_oom(e));
    }
}

TEST_CASE("CPU tensors through a budget: counted, aligned, freed, and an OOM as libtorch raises it") {
    Sim sim({{1u << 20, 0, "simulated GPU"}});
    oomguard::MemoryBudget<Sim> budget(sim, 0);
    c10::Allocator* const before = c10::GetCPUAllocator();
    {
        oomguard::ScopedTorchCpuAllocator<Sim> cpu(budget);
        CHECK(c10::GetCPUAllocator() == &cpu.allocator());
        CHECK(cpu.allocator().live_blocks() == 0);
        torch::Tensor a = torch::zeros({1000}, torch::kFloat);
        CHECK(reinterpret_cast<std::uintptr_t>(a.data_ptr()) % 64 == 0);
        CHECK(budget.used() >= 4000);
        CHECK(budget.used() < 4000 + 200);  // the alignment slack and the block's header
        std::size_t with_a = budget.used();
        torch::Tensor b = a + 1;  // a kernel's output through the budget too
        CHECK(budget.used() > with_a);
        CHECK(b.sum().item<float>() == 1000.0f);
        try {
            torch::Tensor big = torch::empty({1 << 20}, torch::kFloat);  // 4 MiB on a 1 MiB device
            FAIL("expected an OOM");
        } catch (c10::OutOfMemoryError const& e) {
            std::string w = e.what();
            CHECK(w.find("oomguard: out of memory: tried to allocate 4.00 MiB") != std::string::npos);
            CHECK(oomguard::is_device_oom(e));
        }
        torch::Tensor none = torch::empty({0}, torch::kFloat);
        CHECK(none.numel() == 0);
        CHECK(cpu.allocator().live_blocks() == 2);  // a and b; the OOM left nothing, the empty one takes no block
    }
    CHECK(budget.used() == 0);
    CHECK(sim.live_bytes() == 0);
    CHECK(c10::GetCPUAllocator() == before);  // libtorch's own allocator is back
    // Phantom addresses are no memory a CPU kernel may touch.
    Sim phantom({{1u << 20, 0, "phantom"}}, oomguard::SimulatedMemory::phantom);
    oomguard::MemoryBudget<Sim> phantom_budget(phantom, 0);
    CHECK_THROWS_WITH_AS(oomguard::ScopedTorchCpuAllocator<Sim>{phantom_budget}, doctest::Contains("phantom"),
                         std::invalid_argument);
    CHECK(c10::GetCPUAllocator() == before);
}

namespace {
struct NetImpl : torch::nn::Module {
    torch::nn::Linear fc1{nullptr}, fc2{nullptr};
    NetImpl() : fc1(register_module("fc1", torch::nn::Linear(16, 64))), fc2(register_module("fc2", torch::nn::Linear(64, 1))) {}
    torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
};
TORCH_MODULE(Net);

struct Trained {
    double loss = 0;
    std::size_t ooms = 0, micro_batches = 0, samples = 0, final_micro_batch = 0;
    std::size_t held = 0, peak = 0;  // bytes held by the data, model and optimizer; the run's peak
};

// Trains the same model on the same data under a `capacity` simulated GPU.
Trained train(std::size_t capacity) {
    Sim sim({{capacity, 0, "simulated GPU"}});
    oomguard::MemoryBudget<Sim> budget(sim, 0);
    Trained out;
    {
        oomguard::ScopedTorchCpuAllocator<Sim> cpu(budget);
        torch::manual_seed(3);
        at::set_num_threads(1);
        torch::Tensor X = torch::randn({512, 16});
        torch::Tensor Y = torch::sin(X.sum(1, true) / 4);
        Net net;
        torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
        oomguard::BatchOptions o;
        o.global_batch = 256;
        o.policy = oomguard::ShrinkPolicy::predictive();
        oomguard::AdaptiveBatch a(o);
        a.measure_with(budget);
        out.held = budget.used();
        for (int epoch = 0; epoch < 3; ++epoch)
            for (std::int64_t first = 0; first < 512; first += 256) {
                std::size_t samples = 0;
                a.run(
                    [&](oomguard::MicroBatch const& mb) {
                        auto x = X.narrow(0, first + static_cast<std::int64_t>(mb.offset), static_cast<std::int64_t>(mb.size));
                        auto y = Y.narrow(0, first + static_cast<std::int64_t>(mb.offset), static_cast<std::int64_t>(mb.size));
                        (torch::mse_loss(net->forward(x), y) * mb.weight).backward();
                        samples += mb.size;
                    },
                    [&] {
                        out.samples += samples;  // the global batch, whole, once
                        opt.step();
                        opt.zero_grad();
                    },
                    [&] {
                        samples = 0;
                        opt.zero_grad();
                    });
            }
        torch::NoGradGuard no_grad;  // the loss over the set, in chunks any of the devices holds
        for (std::int64_t first = 0; first < 512; first += 16)
            out.loss += torch::mse_loss(net->forward(X.narrow(0, first, 16)), Y.narrow(0, first, 16)).item<double>() / 32;
        out.ooms = a.counters().ooms;
        out.micro_batches = a.counters().micro_batches;
        out.final_micro_batch = a.plan().micro_batch;
        out.peak = budget.peak();
    }
    CHECK(sim.live_bytes() == 0);
    return out;
}
}  // namespace

TEST_CASE("adaptive_batch over a real torch::nn model: libtorch's OOMs recovered, the same samples, the same loss") {
    Trained free_run = train(std::size_t{1} << 30);
    // A device with room for the data, the model and 40 % of what a whole batch adds to them.
    std::size_t const capacity = free_run.held + (free_run.peak - free_run.held) * 2 / 5;
    Trained pressed = train(capacity);
    std::printf("torch: unpressured loss %.9g (peak %zu KiB); under %zu KiB %.9g after %zu OOMs, plan m=%zu\n",
                free_run.loss, free_run.peak / KiB, capacity / KiB, pressed.loss, pressed.ooms,
                pressed.final_micro_batch);
    CHECK(free_run.ooms == 0);
    CHECK(pressed.ooms >= 1);
    CHECK(pressed.final_micro_batch < 256);
    CHECK(pressed.micro_batches > free_run.micro_batches);
    CHECK(pressed.samples == 3 * 512);  // every global batch committed whole, once
    CHECK(free_run.samples == 3 * 512);
    CHECK(std::fabs(pressed.loss - free_run.loss) <= 1e-5 * std::fabs(free_run.loss));
}

#if OOMGUARD_TORCH_CUDA
// The CUDA parts compile and link against libtorch's CUDA headers and libc10_cuda;
// they run on a GPU only (scripts/gpu-check), so here they are only taken apart.
OOMGUARD_TORCH_FREE_MEMORY_CALLBACK();

TEST_CASE("the caching allocator's cache, meter, cap and callback compile against libtorch's CUDA headers") {
    static_assert(oomguard::detail::is_meter<oomguard::TorchCudaMeter>::value, "a meter for measure_with");
    oomguard::TorchCudaCache cache(0);
    oomguard::TorchCudaMeter meter(0);
    oomguard::AdaptiveBatch a([] {
        oomguard::BatchOptions o;
        o.global_batch = 8;
        return o;
    }());
    a.measure_with(meter);  // reads nothing until a step runs
    double (*cap)(oomguard::Limit, int) = &oomguard::set_torch_memory_fraction;
    std::size_t (oomguard::TorchCudaCache::*release)() = &oomguard::TorchCudaCache::release;
    CHECK((cap != nullptr && release != nullptr));
    oomguard::TorchFreeMemoryCallback callback;
    (void)cache;
    (void)callback;
}
#endif
