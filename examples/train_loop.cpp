// A one-hidden-layer MLP trained on synthetic data, written once with Thrust:
// g++ builds it on Thrust's CPP system over SimulatedDevices (no GPU needed),
// nvcc builds the same source on CUDA over CudaRuntime. Every device buffer --
// data, parameters, activations, Thrust's temporaries -- goes through a
// MemoryBudget, and each global batch runs under adaptive_batch, so when the
// requested batch does not fit, training continues with smaller micro-batches
// (or bf16 activations) and the same result.
//
//   train_loop --bs 1024 --device-memory 1MiB      (scripts/demo)
//   train_loop --help
#include "mlp.hpp"

#include <oomguard/oomguard.hpp>
#include <oomguard/config.hpp>
#include <oomguard/report.hpp>
#include <oomguard/thrust.hpp>
#include <oomguard/trace.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
using Backend = oomguard::CudaRuntime;
constexpr bool on_gpu = true;
#else
#include <oomguard/simulated_devices.hpp>
using Backend = oomguard::SimulatedDevices;
constexpr bool on_gpu = false;
#endif

using namespace oomguard;
using Budget = MemoryBudget<Backend>;

namespace {

struct Args {
    std::size_t bs = 1024, eval_bs = 1024, epochs = 5, samples = 4096, hidden = 256, seed = 7;
    std::size_t device_memory = std::size_t{1} << 30;
    bool device_memory_given = false;
    std::string budget = "0.9", precision = "fp32>bf16", policy = "predictive", trace, report_json;
    bool resume = true;  // the model's step adds its gradient only once it has fit
    double fault_rate = 0.0, lr = 0.05;
};

[[noreturn]] void usage_error(std::string const& msg) {
    std::fprintf(stderr,
                 "train_loop: %s\n"
                 "flags: --bs N  --eval-bs N  --epochs N  --samples N  --hidden N  --seed N\n"
                 "       --device-memory SIZE (simulated capacity, e.g. 1MiB; a bare number is MiB)\n"
                 "       --budget 0.9|90%%|SIZE  --precision fp32>bf16  --policy halve|geometric|bisect|predictive\n"
                 "       --fault-rate P (random injected OOMs while training, simulated device)  --lr X\n"
                 "       --resume on|off (keep the micro-batches before an OOM; default on)\n"
                 "       --trace FILE (Chrome trace JSON)  --report-json FILE\n",
                 msg.c_str());
    std::exit(2);
}

std::size_t parse_count(std::string const& flag, std::string const& v, std::size_t lo, std::size_t hi) {
    std::uint64_t n = 0;
    if (!detail::parse_unsigned(v, n) || n < lo || n > hi)
        usage_error(flag + " " + v + ": give a whole number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return static_cast<std::size_t>(n);
}

double parse_real(std::string const& flag, std::string const& v, double lo, double hi) {
    double x = 0;
    bool integral = false;
    if (!detail::parse_decimal(v, x, integral) || x < lo || x > hi)
        usage_error(flag + " " + v + ": give a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return x;
}

Args parse(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string f = argv[i];
        if (f == "--help" || f == "-h") usage_error("usage");
        if (i + 1 >= argc) usage_error("flag " + f + " needs a value");
        std::string v = argv[++i];
        if (f == "--bs") a.bs = parse_count(f, v, 1, 1 << 24);
        else if (f == "--eval-bs") a.eval_bs = parse_count(f, v, 1, 1 << 24);
        else if (f == "--epochs") a.epochs = parse_count(f, v, 1, 100000);
        else if (f == "--samples") a.samples = parse_count(f, v, 1, 1 << 24);
        else if (f == "--hidden") a.hidden = parse_count(f, v, 1, 1 << 16);
        else if (f == "--seed") a.seed = parse_count(f, v, 0, ~std::uint32_t{0});
        else if (f == "--lr") a.lr = parse_real(f, v, 1e-9, 10.0);
        else if (f == "--fault-rate") a.fault_rate = parse_real(f, v, 0.0, 0.5);
        else if (f == "--budget") a.budget = v;
        else if (f == "--precision") a.precision = v;
        else if (f == "--policy") a.policy = v;
        else if (f == "--trace") a.trace = v;
        else if (f == "--report-json") a.report_json = v;
        else if (f == "--resume") {
            if (v != "on" && v != "off") usage_error("--resume " + v + ": give on or off");
            a.resume = v == "on";
        }
        else if (f == "--device-memory") {
            std::size_t b = 0;
            bool unit = false;
            if (!detail::parse_bytes(v, b, unit) || b == 0) usage_error("--device-memory " + v + ": give a size such as 1MiB");
            a.device_memory = unit ? b : b << 20;
            a.device_memory_given = true;
        } else {
            usage_error("unknown flag " + f);
        }
    }
    if (a.bs > a.samples) usage_error("--bs " + std::to_string(a.bs) + " is above --samples " + std::to_string(a.samples));
    return a;
}

}  // namespace

int main(int argc, char** argv) {
    Args args = parse(argc, argv);
    Config conf;
    try {
        conf = parse_config("budget=" + args.budget + ",policy=" + args.policy + ",precision=" + args.precision);
    } catch (config_error const& e) {
        usage_error(e.what());
    }
    for (Precision p : conf.precisions)
        if (p != Precision::fp32 && p != Precision::bf16)
            usage_error(std::string("--precision: this example stores activations as fp32 or bf16, not ") + to_string(p));

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    if (args.fault_rate > 0 || args.device_memory_given)
        usage_error("--fault-rate and --device-memory drive the simulated device; this build runs on the GPU");
    CudaRuntime backend;
#else
    SimulatedDevices backend({{args.device_memory, 0, "oomguard simulated GPU"}});
#endif
    Budget budget(backend, 0, *conf.budget);
    std::size_t const N = args.samples, NE = N / 8 > 0 ? N / 8 : 1;
    // Synthetic data: the first N samples train, the next NE evaluate.
    mlp::Data data(N + NE, 16, static_cast<int>(args.hidden), args.seed);

    int status_code = 0;
    try {
        mlp::Model<Backend> model(budget, data);
        auto step = [&](std::size_t first, MicroBatch const& mb, bool train) { return model.step(first, mb, train); };
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
        // Transient faults hit training, not the model's setup above.
        if (args.fault_rate > 0) {
            FaultPlan f;
            f.probability = args.fault_rate;
            f.seed = args.seed;
            backend.set_faults(0, f);
        }
#endif

        auto options = [&](std::size_t bs, bool resume) {
            BatchOptions o;
            o.global_batch = bs;
            o.max_attempts = 1000;
            o.resume = resume;
            o.apply(conf);
            return o;
        };
        AdaptiveBatch train(options(args.bs, args.resume));
        // Evaluation steps only return their loss: nothing to undo, so they always resume.
        AdaptiveBatch eval(options(args.eval_bs < NE ? args.eval_bs : NE, true));
        train.measure_with(budget);
        eval.measure_with(budget);
        // A short last batch (--samples not a multiple of --bs) keeps a plan of its own.
        std::unique_ptr<AdaptiveBatch> tail;
        if (N % args.bs != 0) {
            tail.reset(new AdaptiveBatch(options(N % args.bs, args.resume)));
            tail->measure_with(budget);
        }
        Report report;
        report.track("GPU 0", budget);
        report.attach(train, "train");
        report.attach(eval, "eval");
        std::unique_ptr<Trace> trace;
        if (!args.trace.empty()) {
            trace.reset(new Trace(args.trace));
            trace->track("GPU 0", budget);
            trace->attach(train, "train");
            trace->attach(eval, "eval");
        }
        bool tty = false;
#if defined(__unix__) || defined(__APPLE__)
        tty = isatty(1) != 0;
#endif
        std::printf("oomguard train_loop on %s: %zu samples, MLP 16-%zu-1, --bs %zu, budget %s of %s\n",
                    on_gpu ? "the GPU (CudaRuntime)" : "a simulated GPU (SimulatedDevices)", N, args.hidden, args.bs,
                    detail::format_bytes(budget.limit()).c_str(),
                    detail::format_bytes(on_gpu ? budget.limit() : args.device_memory).c_str());
        double epoch_loss = 0, eval_loss = 0;
        for (std::size_t epoch = 1; epoch <= args.epochs; ++epoch) {
            double loss_sum = 0;
            for (std::size_t first = 0; first < N; first += args.bs) {
                std::size_t G = N - first < args.bs ? N - first : args.bs;
                AdaptiveBatch* runner = G == args.bs ? &train : tail.get();
                // The step returns its micro-batch's loss; reduce() sums the micro-batches
                // the committed attempt kept, so a failed attempt's losses never count.
                loss_sum += runner
                                ->reduce([&](MicroBatch const& mb) { return step(first, mb, true); }, 0.0,
                                         [](double a, double b) { return a + b; },
                                         [&] { model.commit(static_cast<float>(args.lr)); },
                                         [&] { model.rollback(); })
                                .value;
                if (trace) trace->sample();
                if (tty) {
                    Plan const& pl = train.plan();
                    std::printf("\repoch %zu/%zu  samples %zu/%zu  loss %.6f  plan m=%zu %s  OOMs survived %zu   ",
                                epoch, args.epochs, first + G, N, loss_sum / static_cast<double>(first + G),
                                pl.micro_batch, to_string(pl.precision), train.counters().ooms);
                    std::fflush(stdout);
                }
            }
            epoch_loss = loss_sum / static_cast<double>(N);
            eval_loss = eval.run([&](MicroBatch const& mb) { return step(N, mb, false); }).value /
                        static_cast<double>(eval.options().global_batch);
            Plan const& pl = train.plan();
            std::printf("%sepoch %zu/%zu  samples %zu  loss %.6f  eval %.6f  plan m=%zu %s GPU %d  OOMs survived %zu\n",
                        tty ? "\r" : "", epoch, args.epochs, N, epoch_loss, eval_loss, pl.micro_batch,
                        to_string(pl.precision), pl.device, train.counters().ooms + eval.counters().ooms);
        }
        // The loss of the final parameters over the whole training set, for comparing runs.
        AdaptiveBatch final_pass(options(N, true));
        double final_loss = final_pass.run([&](MicroBatch const& mb) { return step(0, mb, false); }).value;
        std::printf("%s", report.table().c_str());
        std::printf("final loss %.9g\n", final_loss / static_cast<double>(N));
        if (!args.report_json.empty()) {
            std::FILE* f = std::fopen(args.report_json.c_str(), "wb");
            if (f == nullptr) throw std::runtime_error("cannot write " + args.report_json);
            std::string j = report.json();
            std::fwrite(j.data(), 1, j.size(), f);
            std::fclose(f);
        }
        if (trace) {
            trace->write();
            std::printf("trace: %s (%zu events; open it in https://ui.perfetto.dev)\n", args.trace.c_str(),
                        trace->events());
        }
    } catch (recovery_failed const& e) {
        std::fprintf(stderr, "train_loop: %s\n", e.what());
        status_code = 1;
    } catch (out_of_memory const& e) {
        std::fprintf(stderr, "train_loop: the data and parameters do not fit: %s\n", e.what());
        status_code = 1;
    }
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
    if (status_code == 0 && (backend.live_bytes() != 0 || budget.used() != 0)) {
        std::fprintf(stderr, "train_loop: %zu bytes still held on the simulated device\n", backend.live_bytes());
        status_code = 1;
    }
#endif
    return status_code;
}
