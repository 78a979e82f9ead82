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
#include <oomguard/plan_cache.hpp>
#include <oomguard/plot.hpp>
#include <oomguard/report.hpp>
#include <oomguard/thrust.hpp>
#include <oomguard/trace.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
using Backend = oomguard::CudaRuntime;
constexpr bool on_gpu = true;
#else
#include <oomguard/simulated_devices.hpp>
using Backend = oomguard::SimulatedDevices;
constexpr bool on_gpu = false;
#endif

namespace {

// An output file, opened once every setting has been checked and before
// training, so that a bad path costs no training and a bad flag no old file.
struct Output {
    std::string path;
    char const* flag;
    std::FILE* file = nullptr;
    Output(std::string p, char const* f) : path(std::move(p)), flag(f) {
        if (path.empty()) return;
        file = std::fopen(path.c_str(), "wb");
        if (file == nullptr) {
            std::fprintf(stderr, "train_loop: cannot write %s %s: %s\n", flag, path.c_str(), std::strerror(errno));
            std::exit(1);
        }
    }
    Output(Output const&) = delete;
    Output& operator=(Output const&) = delete;
    // Writes `text` and closes the file; false (with a message naming it) if that failed.
    bool write(std::string const& text) {
        if (file == nullptr) return true;
        std::FILE* f = file;
        file = nullptr;
        bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
        ok = std::fclose(f) == 0 && ok;
        if (!ok) std::fprintf(stderr, "train_loop: writing %s %s failed: %s\n", flag, path.c_str(), std::strerror(errno));
        return ok;
    }
    ~Output() {
        if (file != nullptr) std::fclose(file);
    }
};

}  // namespace

int main(int argc, char** argv) {
    demo::Args const args = demo::parse(argc, argv);  // exits 2 on a bad flag or OOMGUARD_CONF

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    if (args.fault_rate > 0 || args.device_memory_given)
        demo::fail("--fault-rate and --device-memory drive the simulated GPU; this build runs on a real one");
    oomguard::CudaRuntime backend;
#else
    oomguard::SimulatedDevices backend({{args.device_memory, 0, "oomguard simulated GPU"}});
    if (args.conf.budget->type() == oomguard::Limit::kind::bytes && args.conf.budget->amount() > args.device_memory)
        demo::fail(args.budget_from + " of " + std::to_string(args.conf.budget->amount()) +
                   " bytes is more than the simulated GPU's " + std::to_string(args.device_memory) +
                   ": give less, or a larger --device-memory");
#endif
    // The cap: --budget, else OOMGUARD_CONF's budget= or headroom=, else 90 %.
    std::optional<oomguard::MemoryBudget<Backend>> budget;
    try {
        budget.emplace(backend, 0, args.conf.limit_or(oomguard::Limit::fraction(0.9)));
    } catch (std::invalid_argument const& e) {  // headroom above what is free, say
        demo::fail(args.budget_from + ": " + e.what());
    } catch (std::exception const& e) {  // no usable GPU: say so
        std::fprintf(stderr, "train_loop: %s\n", e.what());
        return 1;
    }
    std::size_t free = 0, capacity = 0;
    (void)backend.memory_info(0, &free, &capacity);
    std::size_t const N = args.samples, NE = N / 8 > 0 ? N / 8 : 1;  // the first N samples train, the next NE evaluate
    if (args.eval_bs > NE)
        demo::fail("--eval-bs " + std::to_string(args.eval_bs) + " is above the " + std::to_string(NE) +
                   " samples that evaluate (--samples / 8)");
    std::size_t const eval_bs = args.eval_bs != 0 ? args.eval_bs : NE;

    // One plan per workload; a short last batch (of training or evaluation) keeps a plan of its own.
    // Evaluation steps only return their loss (nothing to undo), so they always resume after an OOM.
    auto options = [&](std::size_t global_batch, bool resume) {
        oomguard::BatchOptions o;
        o.global_batch = global_batch;
        o.max_attempts = 1000;
        o.resume = resume;
        if (args.calibrate) o.start = oomguard::BatchOptions::Start::calibrate;  // measure before the first OOM
        o.apply(args.conf);  // policy, precision ladder, min_batch, ... from OOMGUARD_CONF and the flags
        return o;
    };
    struct Workload {
        char const* name;
        std::size_t global_batch;
        bool resume;
        std::unique_ptr<oomguard::AdaptiveBatch> batch;
    };
    // An epoch's last, shorter batch runs under its workload's object and plan
    // (GlobalBatch below), not a second object that would learn from scratch.
    Workload workloads[] = {{"train", args.bs, args.resume, nullptr},
                            {"eval", eval_bs, true, nullptr},
                            {"final", N, true, nullptr}};
    for (auto& w : workloads) {
        try {
            w.batch = std::make_unique<oomguard::AdaptiveBatch>(options(w.global_batch, w.resume));
        } catch (std::invalid_argument const& e) {  // min_batch=600 above an evaluation batch of 500, say
            demo::fail(std::string("the ") + w.name + " batch of " + std::to_string(w.global_batch) +
                       " samples: " + e.what() + " (from OOMGUARD_CONF or the flags)");
        }
    }
    oomguard::AdaptiveBatch &train = *workloads[0].batch, &eval = *workloads[1].batch, &final_pass = *workloads[2].batch;

    std::unique_ptr<oomguard::Trace> trace;
    try {
        if (!args.trace.empty()) trace = std::make_unique<oomguard::Trace>(args.trace);
    } catch (std::runtime_error const& e) {
        std::fprintf(stderr, "train_loop: --trace: %s\n", e.what());
        return 1;
    }
    Output report_json(args.report_json, "--report-json"), plot(args.plot, "--plot");
    oomguard::Report report;
    // The run's settings the report cannot see for itself (the workloads' options and the
    // budget's cap it records on its own).
    report.set_parameter("program", "train_loop");
    report.set_parameter("bs", args.bs);
    report.set_parameter("eval_bs", eval_bs);
    report.set_parameter("epochs", args.epochs);
    report.set_parameter("samples", args.samples);
    report.set_parameter("hidden", args.hidden);
    report.set_parameter("lr", args.lr);
    report.set_parameter("seed", args.seed);
    {
        oomguard::Limit const& cap = *args.conf.budget;  // the budget's bytes are in the report's budgets
        using K = oomguard::Limit::kind;
        if (cap.type() == K::fraction) report.set_parameter("budget_fraction", cap.ratio());
        if (cap.type() == K::bytes) report.set_parameter("budget_bytes", cap.amount());
        if (cap.type() == K::headroom) report.set_parameter("budget_headroom", cap.amount());
        report.set_parameter("budget_from", args.budget_from);
        std::string ladder;
        for (oomguard::Precision p : args.conf.precisions) ladder += (ladder.empty() ? "" : ",") + std::string(to_string(p));
        report.set_parameter("precision", ladder);
    }
    report.set_parameter("policy", args.conf.policy->name());
    if (char const* conf = std::getenv("OOMGUARD_CONF")) report.set_parameter("OOMGUARD_CONF", conf);
    report.set_parameter("resume", args.resume);
    report.set_parameter("on_gpu", on_gpu);
    if (!on_gpu) {
        report.set_parameter("device_memory", args.device_memory);
        report.set_parameter("fault_rate", args.fault_rate);
    }
    report.track("GPU 0", *budget);
    if (trace) trace->track("GPU 0", *budget);
    for (auto& w : workloads) {
        if (!w.batch) continue;
        w.batch->measure_with(*budget);  // peaks for the predictive policy, the report and the plot
        report.attach(*w.batch, w.name);
        if (trace) trace->attach(*w.batch, w.name);
    }
    // --plan-cache: each workload starts at what the last run with the same device, model and
    // settings learned, and saves what this one learns. A file that cannot be read or written
    // is a warning in the report, never a stop.
    std::optional<oomguard::PlanCache> plan_cache;
    std::vector<oomguard::ObserverRegistration> remembering;
    if (!args.plan_cache.empty()) {
        plan_cache.emplace(args.plan_cache);
        report.set_parameter("plan_cache", args.plan_cache);
        // What changes the step's memory beyond the device, the ladder and G: the model and the cap.
        std::string const fingerprint = "train_loop mlp 16-" + std::to_string(args.hidden) + "-1, budget " +
                                        std::to_string(budget->limit()) + ", resume " + (args.resume ? "on" : "off");
        oomguard::DeviceIdentity const device =
            oomguard::device_identity(*budget, on_gpu ? "CUDA device 0" : "oomguard simulated GPU");
        for (auto& w : workloads)
            if (w.batch) remembering.push_back(plan_cache->attach(*w.batch, {w.name, device, fingerprint}));
    }
    report.set_parameter("start", args.calibrate ? "calibrate" : "requested");
    std::string first_oom;  // the first OOM survived, as oomguard reported it
    auto watching = train.observe([&first_oom](oomguard::BatchEvent const& e) {  // listens while `watching` lives
        if (e.kind == oomguard::BatchEventKind::oom_caught && first_oom.empty()) first_oom = e.what;
    });

    int status = 0;
    std::string report_text;  // the JSON, read when the table is: the same figures ("used" is "used now")
    char const* outside = "setup";  // where an OOM no adaptive_batch step saw happened, for the report
    mlp::Data data(N + NE, 16, static_cast<int>(args.hidden), args.seed);
    try {
        mlp::Model<Backend> model(*budget, data);  // the weights and the data: no smaller batch helps here
        outside = "training";
        // The model's activation workspace is a cache: adaptive_batch empties it before a retry.
        auto workspace = oomguard::CacheRegistry::global().add(
            "activation workspace", 0, [&] { return model.workspace_bytes(); },
            [&] { return model.release_workspace(); });
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
        if (args.fault_rate > 0) {  // transient OOMs from here on (the model is set up)
            oomguard::FaultPlan faults;
            faults.probability = args.fault_rate;
            faults.seed = args.seed;
            backend.set_faults(0, faults);
        }
#endif
        std::printf("train_loop on %s: %zu samples, MLP 16-%zu-1, --bs %zu, budget %s of %s\n",
                    on_gpu ? "the GPU" : "a simulated GPU", N, args.hidden, args.bs,
                    oomguard::format_bytes(budget->limit()).c_str(), oomguard::format_bytes(capacity).c_str());
        auto sum = [](double a, double b) { return a + b; };
        auto pass = [&](std::size_t begin, std::size_t count, std::size_t batch, oomguard::AdaptiveBatch& runner,
                        bool learn) {
            double loss = 0;
            for (std::size_t first = begin; first < begin + count; first += batch) {
                // The last batch of the pass may be shorter: the same object, its size given.
                oomguard::GlobalBatch const n{begin + count - first < batch ? begin + count - first : batch};
                auto step = [&model, first, learn](oomguard::MicroBatch const& mb) { return model.step(first, mb, learn); };
                // reduce() sums the losses of the micro-batches the committed attempt kept:
                // a failed attempt's losses never count.
                if (learn)
                    loss += runner
                                .reduce(n, step, 0.0, sum, [&] { model.commit(static_cast<float>(args.lr)); },  // optimizer step
                                        [&] { model.rollback(); })                                              // zero_grad
                                .value;
                else
                    loss += runner.run(n, step).value;
            }
            return loss / static_cast<double>(count);
        };
        for (std::size_t epoch = 1; epoch <= args.epochs; ++epoch) {
            double loss = pass(0, N, args.bs, train, true);
            double eval_loss = pass(N, NE, eval_bs, eval, false);
            oomguard::Plan const& plan = train.plan();
            std::size_t ooms = 0;
            for (auto& w : workloads) ooms += w.batch ? w.batch->counters().ooms : 0;
            std::printf("epoch %zu/%zu  loss %.6f  eval %.6f  plan m=%zu %s  OOMs survived %zu\n", epoch, args.epochs,
                        loss, eval_loss, plan.micro_batch, oomguard::to_string(plan.precision), ooms);
            if (epoch == 1 && plan_cache)
                std::printf("plan from %s\n", report.plan_source("train").c_str());
        }
        double final_loss = final_pass.run([&](oomguard::MicroBatch const& mb) { return model.step(0, mb, false); }).value /
                            static_cast<double>(N);
        if (!first_oom.empty()) std::printf("survived: %s\n", first_oom.c_str());
        std::printf("%s", report.table().c_str());
        report_text = report.json();
        std::printf("final loss %.9g\n", final_loss);
        if (!std::isfinite(final_loss)) {
            std::fprintf(stderr, "train_loop: training diverged (final loss %g): lower --lr or raise --bs\n", final_loss);
            status = 1;
        }
    } catch (oomguard::out_of_memory const& e) {  // recovery_failed too: nothing fit
        // An OOM at setup reached no adaptive_batch: without this the report and the
        // plot would show a run that never ran out of memory. (A give-up is counted
        // by its workload already, and note_oom leaves it.)
        report.note_oom(e, outside);
        std::fprintf(stderr, "train_loop: %s\n", e.what());
        status = 1;
    } catch (std::exception const& e) {
        std::fprintf(stderr, "train_loop: %s\n", e.what());
        status = 1;
    }
    // An observer (the report, the trace) that failed: its exception, never dropped.
    for (auto& w : workloads)
        if (w.batch && w.batch->observer_error()) {
            try {
                std::rethrow_exception(w.batch->observer_error());
            } catch (std::exception const& e) {
                std::fprintf(stderr, "train_loop: an observer of %s failed: %s\n", w.name, e.what());
            }
            status = 1;
        }
    // What happened, written even when training failed: that is when it is needed.
    if (report_text.empty()) report_text = report.json();  // training failed: what it reached
    if (!report_json.write(report_text)) status = 1;
    if (!plot.write(oomguard::plot_svg(report, "train_loop --bs " + std::to_string(args.bs) + " on " +
                                                   oomguard::format_bytes(capacity).c_str())))
        status = 1;
    if (!args.report_json.empty() && status == 0) std::printf("report: %s\n", args.report_json.c_str());
    if (!args.plot.empty() && status == 0) std::printf("plot: %s\n", args.plot.c_str());
    if (trace) {
        try {
            trace->write();
            if (status == 0) std::printf("trace: %s (open it in https://ui.perfetto.dev)\n", args.trace.c_str());
        } catch (std::exception const& e) {
            std::fprintf(stderr, "train_loop: --trace: %s\n", e.what());
            status = 1;
        }
    }
#if THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA
    if (status == 0 && (backend.live_bytes() != 0 || budget->used() != 0)) {  // the simulator counts every byte
        std::fprintf(stderr, "train_loop: %zu bytes still held on the simulated GPU\n", backend.live_bytes());
        status = 1;
    }
#endif
    return status;
}
