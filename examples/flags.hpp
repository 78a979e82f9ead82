// The example's command line, kept out of train_loop.cpp so that the training
// loop reads as one. Flags are --name value or --name=value; --help prints
// them with their defaults on stdout and exits 0; a bad flag prints what is
// wrong with it, naming it, and exits 2. OOMGUARD_CONF is read first and the
// flags given override it; what neither sets keeps the defaults shown by --help.
#pragma once

#include <oomguard/config.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#if defined(__linux__)
#include <unistd.h>
#endif

namespace demo {

struct Args {
    std::size_t bs = 1024, eval_bs = 0, epochs = 5, samples = 4096, hidden = 256, seed = 7;  // eval_bs 0: all
    std::size_t device_memory = std::size_t{1} << 30;  // the simulated device's capacity
    bool device_memory_given = false;
    bool resume = true;  // the model's step adds its gradient only once it has fit
    double fault_rate = 0.0, lr = 0.05;
    std::string trace, report_json, plot;
    std::string plan_cache;  // --plan-cache: where the workloads' plans are kept across runs ("": nowhere)
    bool calibrate = false;  // --start calibrate: measure before the first OOM
    bool start_given = false;
    oomguard::Config conf;  // OOMGUARD_CONF, then --budget, --policy, --precision
    // Where the budget and the precision ladder came from, for messages.
    std::string budget_from = "the default budget", precision_from = "the default --precision";
};

[[noreturn]] inline void fail(std::string const& message) {
    std::fprintf(stderr, "train_loop: %s\n(train_loop --help lists the flags)\n", message.c_str());
    std::exit(2);
}

namespace detail {

struct Flag {
    char const* name;
    char const* value;  // what the value looks like
    char const* help;
    std::string fallback;  // the default, as --help shows it
};

inline std::vector<Flag> flags(Args const& d) {
    return {
        {"--bs", "N", "samples per optimizer step (the global batch)", std::to_string(d.bs)},
        {"--eval-bs", "N", "samples per evaluation batch, of the --samples/8 that evaluate",
         d.eval_bs == 0 ? std::string("all of them") : std::to_string(d.eval_bs)},
        {"--epochs", "N", "passes over the training set", std::to_string(d.epochs)},
        {"--samples", "N", "training samples (another eighth evaluates)", std::to_string(d.samples)},
        {"--hidden", "N", "hidden units of the MLP", std::to_string(d.hidden)},
        {"--lr", "X", "learning rate, in [1e-9, 10]", "0.05"},
        {"--seed", "N", "seed of the data, the weights and the faults", std::to_string(d.seed)},
        {"--budget", "CAP", "the MemoryBudget's cap: 0.9, 90% or 512MiB (OOMGUARD_CONF budget=)", "0.9"},
        {"--policy", "P", "how to shrink: auto, halve, geometric, bisect, predictive (OOMGUARD_CONF policy=)",
         "predictive"},
        {"--precision", "LADDER", "precisions to fall back through: fp32,bf16 or fp32 (\"fp32>bf16\" if quoted)",
         "fp32,bf16"},
        {"--resume", "on|off", "keep the micro-batches that completed before an OOM", "on"},
        {"--device-memory", "SIZE", "capacity of the simulated GPU: 1MiB, 64KiB, 1GB (not on a GPU)", "1GiB"},
        {"--fault-rate", "P",
         "chance, in [0, 0.5], that an allocation after setup fails as a transient OOM (simulated GPU)", "0"},
        {"--trace", "FILE", "write a Chrome trace (open it in ui.perfetto.dev)", "none"},
        {"--report-json", "FILE", "write the report as JSON", "none"},
        {"--plot", "FILE.svg", "draw memory, OOMs and the plan over time as SVG (a .svg file)", "none"},
        {"--plan-cache", "FILE", "keep each workload's learned plan in FILE and start from it next time", "none"},
        {"--start", "calibrate|requested",
         "where a workload without a cached plan starts: measure first, or at --bs (calibrate needs a meter)",
         "calibrate with --plan-cache, else requested"},
    };
}

inline void help(Args const& d) {
    std::printf("usage: train_loop [flags]\n"
                "Trains an MLP on synthetic data under oomguard::adaptive_batch; a batch that does not fit\n"
                "runs as smaller micro-batches with the same result. Flags (--flag value or --flag=value):\n");
    for (auto const& f : flags(d)) {
        std::string left = std::string(f.name) + " " + f.value;
        std::printf("  %-22s %s (default %s)\n", left.c_str(), f.help, f.fallback.c_str());
    }
    std::printf("  %-22s %s\n", "--help", "this text");
    std::printf("OOMGUARD_CONF=\"key=value,...\" sets the same as --budget, --policy and --precision, and\n"
                "min_batch, max_attempts, grow_after, factor, headroom; the flags win over it.\n");
}

template <class T, class Parse>
T checked(std::string const& v, Parse parse) {
    try {
        return parse(v);
    } catch (oomguard::config_error const& e) {
        fail(std::string(e.what()).substr(std::string("oomguard: ").size()));
    }
}

inline std::size_t count(std::string const& flag, std::string const& v, std::size_t lo, std::size_t hi) {
    char* end = nullptr;
    bool digits = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos;
    unsigned long long n = digits ? std::strtoull(v.c_str(), &end, 10) : 0;
    if (!digits || n < lo || n > hi)
        fail("bad value '" + v + "' for " + flag + ": give a whole number in [" + std::to_string(lo) + ", " +
             std::to_string(hi) + "]");
    return static_cast<std::size_t>(n);
}

inline double real(std::string const& flag, std::string const& v, double lo, double hi, char const* range) {
    char* end = nullptr;
    // Decimal or with an exponent (1e-3); no sign, hex, inf or nan.
    bool plain = !v.empty() && v.find_first_not_of("0123456789.eE-") == std::string::npos && v[0] != '-';
    double x = plain ? std::strtod(v.c_str(), &end) : -1.0;
    if (!plain || end == nullptr || *end != '\0' || !(x >= lo && x <= hi))
        fail("bad value '" + v + "' for " + flag + ": give a number in " + range);
    return x;
}

// The plot is SVG: a path whose extension says another format (out.png) would
// hold SVG under a name that promises something else. No extension (/dev/stdout)
// is taken as it is.
inline void check_plot_path(std::string const& v) {
    std::size_t const slash = v.rfind('/'), dot = v.rfind('.');
    bool const has_ext = dot != std::string::npos && (slash == std::string::npos || dot > slash + 1);
    if (!has_ext) return;
    std::string ext = v.substr(dot + 1);
    for (char& c : ext) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    if (ext != "svg")
        fail("bad value '" + v + "' for --plot: the plot is SVG; give a path ending in .svg (such as " +
             v.substr(0, dot) + ".svg) and convert it if you need ." + v.substr(dot + 1) +
             " (rsvg-convert --format=png)");
}

// The name of the file stdout goes to ("" when not known): an unquoted
// `--precision fp32>bf16` reaches train_loop as `--precision fp32`, with the
// shell sending stdout to a file named bf16.
inline std::string stdout_file_name() {
#if defined(__linux__)
    char buf[4096];
    ssize_t const n = ::readlink("/proc/self/fd/1", buf, sizeof buf - 1);
    if (n <= 0) return "";
    std::string path(buf, static_cast<std::size_t>(n));
    return path.substr(path.rfind('/') + 1);
#else
    return "";
#endif
}

}  // namespace detail

/// Reads OOMGUARD_CONF, then the flags; exits 0 after --help and 2 on anything bad.
inline Args parse(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {  // --help answers even when OOMGUARD_CONF is wrong
        std::string f = argv[i];
        if (f == "--help" || f == "-h") {
            detail::help(a);  // nothing read yet: the defaults
            std::exit(0);
        }
        if (f.rfind("--help=", 0) == 0) fail("--help takes no value");
    }
    try {
        a.conf = oomguard::config_from_env();
    } catch (oomguard::config_error const& e) {
        fail(e.what());
    }
    if (a.conf.budget) a.budget_from = "OOMGUARD_CONF's budget";
    if (!a.conf.precisions.empty()) a.precision_from = "OOMGUARD_CONF's precision";
    auto const known = detail::flags(a);
    std::vector<std::string> seen;
    for (int i = 1; i < argc; ++i) {
        std::string f = argv[i], v;
        std::size_t eq = f.find('=');
        bool inline_value = f.rfind("--", 0) == 0 && eq != std::string::npos;
        if (inline_value) {
            v = f.substr(eq + 1);
            f = f.substr(0, eq);
        }
        bool found = false;
        for (auto const& k : known) found = found || f == k.name;
        if (!found) fail("unknown flag '" + f + "'");
        for (auto const& g : seen)
            if (g == f) fail(f + " is given twice");
        seen.push_back(f);
        if (!inline_value) {
            if (i + 1 >= argc) fail(f + " needs a value");
            v = argv[++i];
            if (v.rfind("--", 0) == 0 && v.size() > 2) fail(f + " needs a value, not the flag " + v);
        }
        if (v.empty()) fail(f + " needs a value, not an empty one");
        if (f == "--bs") a.bs = detail::count(f, v, 1, 1 << 24);
        else if (f == "--eval-bs") a.eval_bs = detail::count(f, v, 1, 1 << 24);
        else if (f == "--epochs") a.epochs = detail::count(f, v, 1, 100000);
        else if (f == "--samples") a.samples = detail::count(f, v, 1, 1 << 24);
        else if (f == "--hidden") a.hidden = detail::count(f, v, 1, 1 << 16);
        else if (f == "--seed") a.seed = detail::count(f, v, 0, 0xffffffffu);
        else if (f == "--lr") a.lr = detail::real(f, v, 1e-9, 10.0, "[1e-9, 10]");
        else if (f == "--fault-rate") a.fault_rate = detail::real(f, v, 0.0, 0.5, "[0, 0.5]");
        else if (f == "--trace") a.trace = v;
        else if (f == "--report-json") a.report_json = v;
        else if (f == "--plan-cache") a.plan_cache = v;
        else if (f == "--start") {
            if (v != "calibrate" && v != "requested") fail("bad value '" + v + "' for --start: give calibrate or requested");
            a.calibrate = v == "calibrate";
            a.start_given = true;
        }
        else if (f == "--plot") {
            detail::check_plot_path(v);
            a.plot = v;
        }
        else if (f == "--budget") {
            a.conf.budget = detail::checked<oomguard::Limit>(v, [&](std::string const& s) { return oomguard::parse_limit(s, f); });
            a.budget_from = "--budget";
        }
        else if (f == "--policy")
            a.conf.policy = detail::checked<oomguard::ShrinkPolicy>(v, [&](std::string const& s) { return oomguard::parse_policy(s, f); });
        else if (f == "--precision") {
            a.conf.precisions = detail::checked<std::vector<oomguard::Precision>>(v, [&](std::string const& s) { return oomguard::parse_precisions(s, f); });
            a.precision_from = "--precision";
            std::string const out = detail::stdout_file_name();
            if (v.find_first_of(">,") == std::string::npos &&
                (out == "fp32" || out == "tf32" || out == "bf16" || out == "fp16" || out == "fp8"))
                fail("--precision " + v + " with stdout going to a file named '" + out +
                     "': the shell took an unquoted '>' for a redirection; write --precision " + v + "," + out +
                     " (or quote it: \"" + v + ">" + out + "\")");
        }
        else if (f == "--device-memory") {
            a.device_memory = detail::checked<std::size_t>(v, [&](std::string const& s) { return oomguard::parse_size(s, f); });
            if (a.device_memory == 0) fail("bad value '" + v + "' for --device-memory: give a size above 0");
            a.device_memory_given = true;
        } else {  // --resume
            if (v != "on" && v != "off") fail("bad value '" + v + "' for --resume: give on or off");
            a.resume = v == "on";
        }
    }
    if (a.bs > a.samples)
        fail("--bs " + std::to_string(a.bs) + " is above --samples " + std::to_string(a.samples) +
             ": a global batch cannot hold more samples than there are");
    // The example stores activations at fp32 or bf16 only.
    for (oomguard::Precision p : a.conf.precisions)
        if (p != oomguard::Precision::fp32 && p != oomguard::Precision::bf16)
            fail(a.precision_from + ": the precision ladder may hold fp32 and bf16 (this model stores its "
                 "activations in those), not " + oomguard::to_string(p));
    if (!a.start_given) a.calibrate = !a.plan_cache.empty();
    if (!a.conf.budget) a.conf.budget = oomguard::Limit::fraction(0.9);
    if (!a.conf.policy) a.conf.policy = oomguard::ShrinkPolicy::predictive();
    if (a.conf.precisions.empty()) a.conf.precisions = {oomguard::Precision::fp32, oomguard::Precision::bf16};
    return a;
}

}  // namespace demo
