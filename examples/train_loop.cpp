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
#include <oomguard/oomguard.hpp>
#include <oomguard/report.hpp>
#include <oomguard/thrust.hpp>
#include <oomguard/trace.hpp>

#include <thrust/copy.h>
#include <thrust/fill.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/transform.h>
#include <thrust/transform_reduce.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#define HD __host__ __device__
using Backend = oomguard::CudaRuntime;
constexpr bool on_gpu = true;
#else
#define HD
#include <oomguard/simulated_devices.hpp>
using Backend = oomguard::SimulatedDevices;
constexpr bool on_gpu = false;
#endif

using namespace oomguard;
using Budget = MemoryBudget<Backend>;
template <class T>
using dvec = thrust_vector<T, Backend>;

namespace {

struct Args {
    std::size_t bs = 1024, eval_bs = 1024, epochs = 5, samples = 4096, hidden = 256, seed = 7;
    std::size_t device_memory = std::size_t{1} << 30;
    bool device_memory_given = false;
    std::string budget = "0.9", precision = "fp32>bf16", policy = "predictive", trace, report_json;
    double fault_rate = 0.0, lr = 0.05;
};

[[noreturn]] void usage_error(std::string const& msg) {
    std::fprintf(stderr,
                 "train_loop: %s\n"
                 "flags: --bs N  --eval-bs N  --epochs N  --samples N  --hidden N  --seed N\n"
                 "       --device-memory SIZE (simulated capacity, e.g. 1MiB; a bare number is MiB)\n"
                 "       --budget 0.9|90%%|SIZE  --precision fp32>bf16  --policy halve|geometric|bisect|predictive\n"
                 "       --fault-rate P (random injected OOMs, simulated device)  --lr X\n"
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

// bf16 storage: the upper half of an IEEE float, rounded to nearest even.
HD inline std::uint16_t to_bf16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>(u >> 16);
}
HD inline float from_bf16(std::uint16_t h) {
    std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct Dims {
    int D, H;
    int P() const { return H * D + 2 * H + 1; }  // W1[H*D] b1[H] W2[H] b2
};

// hidden[s*H + h] = tanh(b1[h] + W1[h] . x[s]), stored at fp32 or bf16.
struct Forward {
    float const* X;
    float const* p;
    float* h32;
    std::uint16_t* h16;
    std::size_t first;
    int D, H;
    HD void operator()(std::size_t k) const {
        std::size_t s = k / static_cast<std::size_t>(H);
        int h = static_cast<int>(k % static_cast<std::size_t>(H));
        float acc = p[H * D + h];
        for (int d = 0; d < D; ++d) acc += p[h * D + d] * X[(first + s) * static_cast<std::size_t>(D) + d];
        float v = tanhf(acc);
        if (h32 != nullptr) h32[k] = v; else h16[k] = to_bf16(v);
    }
};

struct Hidden {
    float const* h32;
    std::uint16_t const* h16;
    HD float operator()(std::size_t k) const { return h32 != nullptr ? h32[k] : from_bf16(h16[k]); }
};

// err[s] = prediction - target.
struct Error {
    Hidden hid;
    float const* p;
    float const* y;
    std::size_t first;
    int D, H;
    HD float operator()(std::size_t s) const {
        float out = p[H * D + 2 * H];
        for (int h = 0; h < H; ++h) out += p[H * D + H + h] * hid(s * static_cast<std::size_t>(H) + h);
        return out - y[first + s];
    }
};

struct Square {
    HD float operator()(float e) const { return e * e; }
};

// grad[j] += scale * d(sum of squared errors)/d(param j) over the micro-batch.
struct Gradient {
    Hidden hid;
    float const* X;
    float const* err;
    float const* p;
    float* grad;
    std::size_t first, size;
    int D, H;
    float scale;
    HD void operator()(int j) const {
        float g = 0;
        if (j < H * D + H) {  // W1[h, d] or b1[h]
            int h = j < H * D ? j / D : j - H * D;
            int d = j < H * D ? j % D : -1;
            float w2 = p[H * D + H + h];
            for (std::size_t s = 0; s < size; ++s) {
                float a = hid(s * static_cast<std::size_t>(H) + h);
                float back = err[s] * w2 * (1.0f - a * a);
                g += d >= 0 ? back * X[(first + s) * static_cast<std::size_t>(D) + d] : back;
            }
        } else if (j < H * D + 2 * H) {  // W2[h]
            int h = j - H * D - H;
            for (std::size_t s = 0; s < size; ++s) g += err[s] * hid(s * static_cast<std::size_t>(H) + h);
        } else {  // b2
            for (std::size_t s = 0; s < size; ++s) g += err[s];
        }
        grad[j] += scale * g;
    }
};

struct SgdUpdate {
    float lr;
    HD float operator()(float w, float g) const { return w - lr * g; }
};

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
    if (args.fault_rate > 0) {
        FaultPlan f;
        f.probability = args.fault_rate;
        f.seed = args.seed;
        backend.set_faults(0, f);
    }
#endif
    Budget budget(backend, 0, *conf.budget);
    Dims dims{16, static_cast<int>(args.hidden)};
    std::size_t const N = args.samples, NE = N / 8 > 0 ? N / 8 : 1;

    // Synthetic regression data: y = sin(w . x) + noise, from the seed.
    std::vector<float> hx((N + NE) * static_cast<std::size_t>(dims.D)), hy(N + NE), hp(static_cast<std::size_t>(dims.P()));
    std::uint64_t s = args.seed * 0x9e3779b97f4a7c15ULL + 1;
    auto rnd = [&] {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        return static_cast<float>((s >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
    };
    std::vector<float> truth(static_cast<std::size_t>(dims.D));
    for (float& t : truth) t = rnd();
    for (std::size_t i = 0; i < N + NE; ++i) {
        float dot = 0;
        for (int d = 0; d < dims.D; ++d) {
            hx[i * static_cast<std::size_t>(dims.D) + d] = rnd();
            dot += truth[static_cast<std::size_t>(d)] * hx[i * static_cast<std::size_t>(dims.D) + d];
        }
        hy[i] = std::sin(dot) + 0.01f * rnd();
    }
    for (float& p : hp) p = 0.3f * rnd();

    int status_code = 0;
    try {
        ThrustAllocator<float, Backend> falloc(budget);
        dvec<float> X(hx.begin(), hx.end(), falloc), Y(hy.begin(), hy.end(), falloc);
        dvec<float> params(hp.begin(), hp.end(), falloc), grad(hp.size(), 0.0f, falloc);
        auto policy = thrust_policy(budget);
        float const* Xp = thrust::raw_pointer_cast(X.data());
        float const* Yp = thrust::raw_pointer_cast(Y.data());

        // One micro-batch of the samples starting at `first`: forward, loss, and
        // (when training) the weighted gradient into `grad`.
        double pending_loss = 0;
        auto step = [&](std::size_t first, MicroBatch const& mb, bool train) {
            std::size_t n = mb.size, cells = n * static_cast<std::size_t>(dims.H);
            dvec<float> h32(mb.precision == Precision::fp32 ? cells : 0, falloc);
            dvec<std::uint16_t> h16(mb.precision == Precision::fp32 ? 0 : cells,
                                    ThrustAllocator<std::uint16_t, Backend>(budget));
            dvec<float> err(n, falloc);
            float* h32p = h32.empty() ? nullptr : thrust::raw_pointer_cast(h32.data());
            std::uint16_t* h16p = h16.empty() ? nullptr : thrust::raw_pointer_cast(h16.data());
            float const* pp = thrust::raw_pointer_cast(params.data());
            thrust::for_each(policy, thrust::counting_iterator<std::size_t>(0), thrust::counting_iterator<std::size_t>(cells),
                             Forward{Xp, pp, h32p, h16p, first + mb.offset, dims.D, dims.H});
            Hidden hid{h32p, h16p};
            thrust::transform(policy, thrust::counting_iterator<std::size_t>(0), thrust::counting_iterator<std::size_t>(n),
                              err.begin(), Error{hid, pp, Yp, first + mb.offset, dims.D, dims.H});
            pending_loss += static_cast<double>(thrust::transform_reduce(policy, err.begin(), err.end(), Square{}, 0.0f,
                                                                         thrust::plus<float>()));
            if (train)
                thrust::for_each(policy, thrust::counting_iterator<int>(0), thrust::counting_iterator<int>(dims.P()),
                                 Gradient{hid, Xp, thrust::raw_pointer_cast(err.data()), pp,
                                          thrust::raw_pointer_cast(grad.data()), first + mb.offset, n, dims.D, dims.H,
                                          2.0f * static_cast<float>(mb.weight) / static_cast<float>(n)});
        };

        auto options = [&](std::size_t bs) {
            BatchOptions o;
            o.global_batch = bs;
            o.max_attempts = 1000;
            o.apply(conf);
            return o;
        };
        AdaptiveBatch train(options(args.bs));
        AdaptiveBatch eval(options(args.eval_bs < NE ? args.eval_bs : NE));
        train.measure_with(budget);
        eval.measure_with(budget);
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
                BatchOptions o = train.options();
                AdaptiveBatch* runner = &train;
                AdaptiveBatch tail(options(G));  // a short last batch keeps its own plan
                if (G != o.global_batch) {
                    tail.measure_with(budget);
                    runner = &tail;
                }
                pending_loss = 0;
                runner->run([&](MicroBatch const& mb) { step(first, mb, true); },
                            [&] {
                                thrust::transform(policy, params.begin(), params.end(), grad.begin(), params.begin(),
                                                  SgdUpdate{static_cast<float>(args.lr)});
                                thrust::fill(grad.begin(), grad.end(), 0.0f);
                                loss_sum += pending_loss;
                            },
                            [&] {
                                thrust::fill(grad.begin(), grad.end(), 0.0f);
                                pending_loss = 0;
                            });
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
            pending_loss = 0;
            eval.run([&](MicroBatch const& mb) { step(N, mb, false); }, [] {}, [&] { pending_loss = 0; });
            eval_loss = pending_loss / static_cast<double>(eval.options().global_batch);
            Plan const& pl = train.plan();
            std::printf("%sepoch %zu/%zu  samples %zu  loss %.6f  eval %.6f  plan m=%zu %s GPU %d  OOMs survived %zu\n",
                        tty ? "\r" : "", epoch, args.epochs, N, epoch_loss, eval_loss, pl.micro_batch,
                        to_string(pl.precision), pl.device, train.counters().ooms + eval.counters().ooms);
        }
        // The loss of the final parameters over the whole training set, for comparing runs.
        pending_loss = 0;
        AdaptiveBatch final_pass(options(N));
        final_pass.run([&](MicroBatch const& mb) { step(0, mb, false); });
        std::printf("%s", report.table().c_str());
        std::printf("final loss %.9g\n", pending_loss / static_cast<double>(N));
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
