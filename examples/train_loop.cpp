// A training loop that survives running out of GPU memory.
//
// A one-hidden-layer MLP trained on synthetic data, written once with Thrust:
// g++ builds it on Thrust's CPP system over a simulated GPU (no GPU needed),
// nvcc builds the same source on CUDA. Every device buffer -- data,
// parameters, activations, Thrust's temporaries -- goes through a
// MemoryBudget, and each global batch runs under oomguard::AdaptiveBatch: when
// the batch does not fit, training goes on with smaller micro-batches (or bf16
// activations) and reaches the same weights.
//
//   train_loop --bs 1024 --device-memory 1MiB --plot run.svg     (scripts/demo)
//   train_loop --help
#include "flags.hpp"  // the command line: demo::parse
#include "mlp.hpp"    // the model: mlp::Model

#include <oomguard/oomguard.hpp>
#include <oomguard/config.hpp>
#include <oomguard/plot.hpp>
#include <oomguard/report.hpp>
#include <oomguard/thrust.hpp>
#include <oomguard/trace.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
using Backend = oomguard::CudaRuntime;
constexpr bool on_gpu = true;
#else
#include <oomguard/simulated_devices.hpp>
using Backend = oomguard::SimulatedDevices;
constexpr bool on_gpu = false;
#endif

namespace {

// An output file, opened before training so that a bad path costs nothing.
struct Output {
    std::FILE* file = nullptr;
    Output(std::string const& path, char const* flag) {
        if (path.empty()) return;
        file = std::fopen(path.c_str(), "wb");
        if (file == nullptr) {
            std::fprintf(stderr, "train_loop: cannot write %s %s: %s\n", flag, path.c_str(), std::strerror(errno));
            std::exit(1);
        }
    }
    void write(std::string const& text) {
        if (file == nullptr) return;
        bool ok = std::fwrite(text.data(), 1, text.size(), file) == text.size();
        if (std::fclose(file) != 0 || !ok) throw std::runtime_error("writing an output file failed");
        file = nullptr;
    }
    ~Output() {
        if (file != nullptr) std::fclose(file);
    }
};

}  // namespace

int main(int argc, char** argv) {
    demo::Args const args = demo::parse(argc, argv);  // exits 2 on a bad flag or OOMGUARD_CONF
    std::unique_ptr<oomguard::Trace> trace;
    try {
        if (!args.trace.empty()) trace.reset(new oomguard::Trace(args.trace));
    } catch (std::runtime_error const& e) {
        std::fprintf(stderr, "train_loop: --trace: %s\n", e.what());
        return 1;
    }
    Output report_json(args.report_json, "--report-json"), plot(args.plot, "--plot");

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    if (args.fault_rate > 0 || args.device_memory_given)
        demo::fail("--fault-rate and --device-memory drive the simulated GPU; this build runs on a real one");
    oomguard::CudaRuntime backend;
#else
    oomguard::SimulatedDevices backend({{args.device_memory, 0, "oomguard simulated GPU"}});
    if (args.conf.budget->type() == oomguard::Limit::kind::bytes && args.conf.budget->amount() > args.device_memory)
        demo::fail(std::string("the budget's ") + oomguard::format_bytes(args.conf.budget->amount()).c_str() +
                   " is more than the simulated GPU's " + oomguard::format_bytes(args.device_memory).c_str() +
                   ": give less, or a larger --device-memory");
#endif
    // The cap: --budget, else OOMGUARD_CONF's budget= or headroom=, else 90 %.
    auto budget = oomguard::make_budget(backend, 0, args.conf, oomguard::Limit::fraction(0.9));
    std::size_t free = 0, capacity = 0;
    (void)backend.memory_info(0, &free, &capacity);
    std::size_t const N = args.samples, NE = N / 8 > 0 ? N / 8 : 1;
    mlp::Data data(N + NE, 16, static_cast<int>(args.hidden), args.seed);  // the first N train, the rest evaluate

    try {
        mlp::Model<Backend> model(budget, data);
        // The model's activation workspace is a cache: adaptive_batch empties it before a retry.
        auto workspace = oomguard::CacheRegistry::global().add(
            "activation workspace", 0, [&] { return model.workspace_bytes(); },
            [&] { return model.release_workspace(); });
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
        if (args.fault_rate > 0) {  // transient OOMs while training (the model is set up)
            oomguard::FaultPlan faults;
            faults.probability = args.fault_rate;
            faults.seed = args.seed;
            backend.set_faults(0, faults);
        }
#endif
        // One plan per workload. Evaluation steps only return their loss (nothing to
        // undo), so they always resume after an OOM.
        auto options = [&](std::size_t global_batch, bool resume) {
            oomguard::BatchOptions o;
            o.global_batch = global_batch;
            o.max_attempts = 1000;
            o.resume = resume;
            o.apply(args.conf);  // policy, precision ladder, min_batch, ... from OOMGUARD_CONF and the flags
            return o;
        };
        std::size_t const tail_size = N % args.bs;  // a short last batch keeps a plan of its own
        oomguard::AdaptiveBatch train(options(args.bs, args.resume));
        oomguard::AdaptiveBatch tail(options(tail_size != 0 ? tail_size : 1, args.resume));
        oomguard::AdaptiveBatch eval(options(args.eval_bs < NE ? args.eval_bs : NE, true));
        oomguard::AdaptiveBatch final_pass(options(N, true));  // the final loss over the training set

        oomguard::Report report;
        report.track("GPU 0", budget);
        if (trace) trace->track("GPU 0", budget);
        struct Named {
            oomguard::AdaptiveBatch& batch;
            char const* name;
        };
        for (Named w : {Named{train, "train"}, Named{tail, "tail"}, Named{eval, "eval"}, Named{final_pass, "final"}}) {
            if (&w.batch == &tail && tail_size == 0) continue;  // --samples is a multiple of --bs
            w.batch.measure_with(budget);  // peaks for the predictive policy, the report and the plot
            report.attach(w.batch, w.name);
            if (trace) trace->attach(w.batch, w.name);
        }
        std::string first_oom;  // the first OOM survived, as oomguard reported it
        train.observe(
            [](oomguard::BatchEvent const& e, void* out) {
                auto& text = *static_cast<std::string*>(out);
                if (e.kind == oomguard::BatchEventKind::oom_caught && text.empty()) text = e.what;
            },
            &first_oom);

        std::printf("train_loop on %s: %zu samples, MLP 16-%zu-1, --bs %zu, budget %s of %s\n",
                    on_gpu ? "the GPU" : "a simulated GPU", N, args.hidden, args.bs,
                    oomguard::format_bytes(budget.limit()).c_str(),
                    oomguard::format_bytes(capacity).c_str());
        auto train_step = [&](std::size_t first) {
            return [&model, first](oomguard::MicroBatch const& mb) { return model.step(first, mb, true); };
        };
        auto sum = [](double a, double b) { return a + b; };
        for (std::size_t epoch = 1; epoch <= args.epochs; ++epoch) {
            double loss_sum = 0;
            for (std::size_t first = 0; first < N; first += args.bs) {
                oomguard::AdaptiveBatch& runner = N - first < args.bs ? tail : train;
                // reduce() sums the losses of the micro-batches the committed attempt
                // kept: a failed attempt's losses never count.
                loss_sum += runner
                                .reduce(train_step(first), 0.0, sum,
                                        [&] { model.commit(static_cast<float>(args.lr)); },  // optimizer step
                                        [&] { model.rollback(); })                            // zero_grad
                                .value;
            }
            double eval_loss = eval.run([&](oomguard::MicroBatch const& mb) { return model.step(N, mb, false); }).value;
            oomguard::Plan const& plan = train.plan();
            std::printf("epoch %zu/%zu  loss %.6f  eval %.6f  plan m=%zu %s  OOMs survived %zu\n", epoch, args.epochs,
                        loss_sum / static_cast<double>(N), eval_loss / static_cast<double>(eval.options().global_batch),
                        plan.micro_batch, oomguard::to_string(plan.precision),
                        train.counters().ooms + tail.counters().ooms + eval.counters().ooms);
        }
        double final_loss = final_pass.run([&](oomguard::MicroBatch const& mb) { return model.step(0, mb, false); }).value;

        if (!first_oom.empty()) std::printf("survived: %s\n", first_oom.c_str());
        std::printf("%s", report.table().c_str());
        std::printf("final loss %.9g\n", final_loss / static_cast<double>(N));
        report_json.write(report.json());
        plot.write(oomguard::plot_svg(report, "train_loop --bs " + std::to_string(args.bs) + " on " +
                                                  oomguard::format_bytes(capacity).c_str()));
        if (!args.plot.empty()) std::printf("plot: %s\n", args.plot.c_str());
        if (trace) {
            trace->write();
            std::printf("trace: %s (open it in https://ui.perfetto.dev)\n", args.trace.c_str());
        }
    } catch (oomguard::out_of_memory const& e) {  // recovery_failed too: nothing fit
        std::fprintf(stderr, "train_loop: %s\n", e.what());
        return 1;
    } catch (std::exception const& e) {
        std::fprintf(stderr, "train_loop: %s\n", e.what());
        return 1;
    }
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
    if (backend.live_bytes() != 0 || budget.used() != 0) {  // the simulator counts every byte
        std::fprintf(stderr, "train_loop: %zu bytes still held on the simulated GPU\n", backend.live_bytes());
        return 1;
    }
#endif
    return 0;
}
