// oomguard in a libtorch training loop (C++20, as libtorch requires).
//
// A torch::nn MLP learns a synthetic regression. Each global batch runs under
// oomguard::AdaptiveBatch: micro-batches are cut with narrow(), each loss is
// scaled by mb.weight so the accumulated gradients equal the whole batch's,
// the optimizer steps in commit and zero_grad undoes a failed attempt. When
// fp32 does not fit even at the smallest size, bf16 autocast is the next rung.
//
// On a CPU machine every tensor is allocated through a MemoryBudget over a
// simulated GPU (oomguard::ScopedTorchCpuAllocator), so the OOMs and the
// recovery are libtorch's own: a c10::OutOfMemoryError out of the allocator.
// With CUDA (a libtorch build with it, and a GPU) the same loop runs on the GPU,
// with the caching allocator as a registered cache and as the meter.
//
//   torch_train_loop --bs 1024 --device-memory 3MiB        (a batch that does not fit)
//   torch_train_loop --bs 1024 --device-memory 1GiB        (the same run, unpressured)
#include <oomguard/oomguard.hpp>
#include <oomguard/config.hpp>
#include <oomguard/plan_cache.hpp>
#include <oomguard/report.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/torch.hpp>

#include <torch/torch.h>

#include "torch_model.hpp"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

using torch_example::Autocast;
using torch_example::Net;

struct Args {
    std::size_t bs = 1024, epochs = 3, samples = 4096, hidden = 128, min_batch = 64;
    std::size_t device_memory = std::size_t{1} << 30;
    std::optional<oomguard::Limit> cap;  // on CUDA: cap the caching allocator (set_torch_memory_fraction)
    oomguard::ShrinkPolicy policy = oomguard::ShrinkPolicy::predictive();
    bool adam = false;  // Adam's two moments appear at its first step: what is held grows after the first commit
    std::string plan_cache;  // keep the learned plans here across runs ("": nowhere)
    std::optional<bool> calibrate;  // --start: measure first (default: with --plan-cache)
};

constexpr char const* flag_list =
    "flags: --bs N (1024)  --epochs N (3)  --samples N (4096)  --hidden N (128)  --min-batch N (64)\n"
    "       --device-memory SIZE (CPU: the simulated GPU, 1GiB)  --cap 0.5|2GiB (CUDA: the caching allocator's cap)\n"
    "       --policy halve|geometric|bisect|predictive (predictive)  --optimizer sgd|adam (sgd)\n"
    "       --plan-cache FILE (none)  --start calibrate|requested (calibrate with --plan-cache)\n";

[[noreturn]] void fail(std::string const& why) {
    std::fprintf(stderr, "torch_train_loop: %s\n%s", why.c_str(), flag_list);
    std::exit(2);
}

Args parse(int argc, char** argv) {
    Args a;
    std::vector<std::string> seen;
    for (int i = 1; i < argc; ++i) {
        std::string f = argv[i];
        if (f == "--help" || f == "-h") {
            std::printf("usage: torch_train_loop [flags]\n%s", flag_list);
            std::exit(0);
        }
        for (auto const& g : seen)
            if (g == f) fail(f + " is given twice");
        seen.push_back(f);
        if (i + 1 >= argc) fail(f + " needs a value");
        std::string v = argv[++i];
        try {
            auto count = [&](std::size_t hi) {
                bool digits = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos;
                std::size_t n = digits && v.size() < 10 ? oomguard::parse_size(v, f) : 0;
                if (n == 0 || n > hi)
                    fail("bad value '" + v + "' for " + f + ": give a whole number in [1, " + std::to_string(hi) + "]");
                return n;
            };
            if (f == "--bs") a.bs = count(1 << 24);
            else if (f == "--epochs") a.epochs = count(100000);
            else if (f == "--samples") a.samples = count(1 << 24);
            else if (f == "--hidden") a.hidden = count(1 << 16);
            else if (f == "--min-batch") a.min_batch = count(1 << 24);
            else if (f == "--device-memory") {
                a.device_memory = oomguard::parse_size(v, f);
                if (a.device_memory == 0) fail("bad value '" + v + "' for --device-memory: give a size above 0");
            } else if (f == "--policy") a.policy = oomguard::parse_policy(v, f);
            else if (f == "--cap") a.cap = oomguard::parse_limit(v, f);
            else if (f == "--optimizer") {
                if (v != "sgd" && v != "adam") fail("bad value '" + v + "' for --optimizer: give sgd or adam");
                a.adam = v == "adam";
            }
            else if (f == "--plan-cache") {
                if (v.empty()) fail("--plan-cache needs a file name");
                a.plan_cache = v;
            } else if (f == "--start") {
                if (v != "calibrate" && v != "requested") fail("bad value '" + v + "' for --start: give calibrate or requested");
                a.calibrate = v == "calibrate";
            }
            else fail("unknown flag '" + f + "'");
        } catch (oomguard::config_error const& e) {
            fail(e.what());
        }
    }
    if (a.bs > a.samples) fail("--bs " + std::to_string(a.bs) + " is above --samples " + std::to_string(a.samples));
    if (a.min_batch > a.bs) fail("--min-batch " + std::to_string(a.min_batch) + " is above --bs " + std::to_string(a.bs));
    return a;
}

}  // namespace

int main(int argc, char** argv) {
    Args const args = parse(argc, argv);
    torch::manual_seed(1);
    at::set_num_threads(1);  // the same reduction order in every run
    bool const on_gpu = torch::cuda::is_available();
    torch::Device const device = on_gpu ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
    if (!on_gpu && args.cap) fail("--cap caps the CUDA caching allocator; on the CPU give --device-memory");

    // CPU: a simulated GPU of --device-memory, and libtorch's CPU allocator through a budget on it.
    oomguard::SimulatedDevices sim({{args.device_memory, 0, "simulated GPU"}});
    oomguard::MemoryBudget<oomguard::SimulatedDevices> budget(sim, 0);
    std::unique_ptr<oomguard::ScopedTorchCpuAllocator<oomguard::SimulatedDevices>> cpu;
    if (!on_gpu) cpu = std::make_unique<oomguard::ScopedTorchCpuAllocator<oomguard::SimulatedDevices>>(budget);

    int status = 0;
    try {
        int const inputs = torch_example::inputs;
        auto const N = static_cast<std::int64_t>(args.samples);
        torch_example::Data const data(N, device);  // synthetic, held on the device like a dataset that fits
        torch::Tensor const& X = data.X;
        torch::Tensor const& Y = data.Y;
        Net model(inputs, static_cast<int>(args.hidden));
        model->to(device);
        std::unique_ptr<torch::optim::Optimizer> optimizer;
        if (args.adam)
            optimizer = std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.005));
        else
            optimizer = std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05));

        oomguard::BatchOptions opts;
        opts.global_batch = args.bs;
        opts.precisions = {oomguard::Precision::fp32, oomguard::Precision::bf16};
        opts.policy = args.policy;
        opts.max_attempts = 100;
        // bf16 autocast keeps bf16 copies of the weights: it saves memory only where the
        // activations outweigh them, so the ladder turns to it at a size that still has some.
        opts.min_micro_batch = args.min_batch;
        bool const calibrate = args.calibrate.value_or(!args.plan_cache.empty());
        if (calibrate) opts.start = oomguard::BatchOptions::Start::calibrate;  // measure before the first OOM
        oomguard::AdaptiveBatch train(opts);
        oomguard::Report report;
        // --plan-cache: the workloads start at what the last run like this one learned.
        std::optional<oomguard::PlanCache> plan_cache;
        std::vector<oomguard::ObserverRegistration> remembering;
        std::string const fingerprint = "torch_train_loop MLP 32-" + std::to_string(args.hidden) + "-" +
                                        std::to_string(args.hidden) + "-1 " + (args.adam ? "adam" : "sgd") +
                                        " samples " + std::to_string(args.samples);
        oomguard::DeviceIdentity device_id{on_gpu ? "CUDA device 0" : "simulated GPU", args.device_memory, ""};
        if (!args.plan_cache.empty()) plan_cache.emplace(args.plan_cache);
#if OOMGUARD_TORCH_CUDA
        oomguard::TorchCudaCache cache(0);
        oomguard::TorchCudaMeter meter(0);
        oomguard::CacheRegistration registered;
        if (on_gpu) {
            registered = oomguard::CacheRegistry::global().add("libtorch caching allocator", 10, cache);
            train.measure_with(meter);
            if (args.cap) {
                (void)torch::empty({1}, torch::Device(torch::kCUDA, 0));  // the allocator initialised first
                oomguard::set_torch_memory_fraction(*args.cap, 0);
            }
        }
#else
        if (on_gpu) fail("this build has no libtorch CUDA headers: the caching allocator cannot be measured");
#endif
        if (!on_gpu) {
            train.measure_with(budget);
            report.track("sim GPU", budget);
        }
        report.attach(train, "train");
        if (plan_cache) remembering.push_back(plan_cache->attach(train, {"train", device_id, fingerprint}));

        std::printf("torch_train_loop on %s: %zu samples, MLP %d-%zu-%zu-1, --bs %zu, %s\n",
                    on_gpu ? "CUDA" : "the CPU over a simulated GPU", args.samples, inputs, args.hidden,
                    args.hidden, args.bs, args.adam ? "Adam" : "SGD");
        auto const G = static_cast<std::int64_t>(args.bs);
        for (std::size_t epoch = 1; epoch <= args.epochs; ++epoch) {
            double loss_sum = 0;
            model->train();
            for (std::int64_t first = 0; first + G <= N; first += G) {
                loss_sum += train
                                .reduce(
                                    [&](oomguard::MicroBatch const& mb) {
                                        auto off = first + static_cast<std::int64_t>(mb.offset);
                                        auto n = static_cast<std::int64_t>(mb.size);
                                        Autocast bf16(device.type(), mb.precision == oomguard::Precision::bf16);
                                        torch::Tensor pred = model->forward(X.narrow(0, off, n)).to(torch::kFloat);
                                        torch::Tensor loss = torch::mse_loss(pred, Y.narrow(0, off, n));
                                        (loss * mb.weight).backward();  // accumulates: sum = the batch's gradient
                                        return loss.item<double>() * static_cast<double>(n);
                                    },
                                    0.0, [](double a, double b) { return a + b; },
                                    [&] { optimizer->step(), optimizer->zero_grad(); },  // commit
                                    [&] { optimizer->zero_grad(); })                     // rollback
                                .value;
            }
            std::printf("epoch %zu  loss %.6f  plan m=%zu %s  OOMs survived %zu\n", epoch,
                        loss_sum / static_cast<double>(N / G * G), train.plan().micro_batch,
                        oomguard::to_string(train.plan().precision), train.counters().ooms);
        }
        // The final loss over the whole set, evaluated in chunks that fit.
        torch::NoGradGuard no_grad;
        model->eval();
        oomguard::BatchOptions eval_opts;
        eval_opts.global_batch = args.samples;
        eval_opts.resume = true;  // evaluation applies nothing: it keeps what completed
        eval_opts.policy = args.policy;  // it learns as training does
        if (calibrate) eval_opts.start = oomguard::BatchOptions::Start::calibrate;
        oomguard::AdaptiveBatch eval(eval_opts);
#if OOMGUARD_TORCH_CUDA
        if (on_gpu) eval.measure_with(meter);
#endif
        if (!on_gpu) eval.measure_with(budget);
        report.attach(eval, "eval");
        if (plan_cache) remembering.push_back(plan_cache->attach(eval, {"eval", device_id, fingerprint}));
        double total = eval.run([&](oomguard::MicroBatch const& mb) {
                               auto off = static_cast<std::int64_t>(mb.offset);
                               auto n = static_cast<std::int64_t>(mb.size);
                               torch::Tensor pred = model->forward(X.narrow(0, off, n));
                               return torch::mse_loss(pred, Y.narrow(0, off, n)).item<double>() *
                                      static_cast<double>(n);
                           }).value;
        std::fputs(report.table().c_str(), stdout);
        std::printf("final loss %.9g\n", total / static_cast<double>(N));
        std::printf("torch_train_loop: %zu OOMs survived (train %zu, eval %zu), caches released %s, final m=%zu %s\n",
                    train.counters().ooms + eval.counters().ooms, train.counters().ooms, eval.counters().ooms,
                    oomguard::format_bytes(train.counters().bytes_released).c_str(), train.plan().micro_batch,
                    oomguard::to_string(train.plan().precision));
        if (plan_cache)
            std::printf("torch_train_loop: plans from %s (train), %s (eval); plan cache warnings %zu\n",
                        report.plan_source("train").c_str(), report.plan_source("eval").c_str(),
                        plan_cache->warnings().size());
    } catch (oomguard::recovery_failed const& e) {
        std::fprintf(stderr, "torch_train_loop: %s\n", e.what());
        status = 1;
    } catch (c10::Error const& e) {  // libtorch's own: its message without the C++ backtrace
        std::fprintf(stderr, "torch_train_loop: %s\n", e.what_without_backtrace());
        status = 1;
    } catch (std::exception const& e) {
        std::fprintf(stderr, "torch_train_loop: %s\n", e.what());
        status = 1;
    }
    return status;
}
