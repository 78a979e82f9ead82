// oomguard in a data-parallel libtorch job over c10d (C++20, as libtorch requires).
//
// The model, data and optimizer of torch_train_loop, trained by N ranks -- N
// processes -- that meet at a c10d FileStore and talk over a Gloo process group.
// Each global batch of --bs samples is split into N shards of --bs/N; each rank
// runs its shard under oomguard::AdaptiveBatch, whose consensus is
// oomguard::C10dConsensus over the same process group. Every micro-batch calls
// mb.sync() after its backward; the last one flattens the gradients first (every
// allocation before the sync point), then all-reduces them over the group and
// averages. The optimizer steps in commit, on identical gradients on every rank.
//
// Every rank may have its own simulated GPU (--device-memory 1GiB,2MiB) and one
// rank a fault rate, so one rank recovers while the others wait at the sync
// point; the planner's inputs are agreed on, so every rank runs the same
// micro-batches and ends with the same weights. Each rank prints a hash of its
// weights and of the micro-batches it ran, and the final loss over the whole set.
//
//   torch_ddp --launch 2 --device-memory 1GiB,2MiB          (forks 2 ranks, waits, a watchdog)
//   torch_ddp --world-size 2 --rank 0 --store /tmp/s &  torch_ddp --world-size 2 --rank 1 --store /tmp/s
//
// --store: a fresh path for every job (--launch makes one): a FileStore left by
// a crashed run holds its keys, and the new ranks can hang on them.
//
// Drills for the tests: --give-up-rank R (rank R's device fills before global
// batch --at-batch: every rank throws recovery_failed together), --exit-rank R
// (rank R dies there: the others get the process group's error, not an OOM),
// --hang-rank R (rank R stops there: the others time out after --timeout, and
// the launcher's --watchdog kills every rank and fails).
//
// A rank exits 0, 2 on a bad flag, 3 on recovery_failed, 4 on any other error
// (the process group's among them: it prints its type and that it is not a
// device OOM), 1 on a device OOM outside adaptive_batch, 5 in the exit drill.
// The launcher exits 0 when every rank did, 124 when its watchdog fired, else 1.
#include <oomguard/oomguard.hpp>
#include <oomguard/c10d.hpp>
#include <oomguard/config.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/torch.hpp>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/torch.h>

// --backend nccl: the group on the GPUs (one rank per GPU). Built where NCCL's
// header and libtorch's CUDA runtime are (scripts/gpu-check); the torch leg
// compiles it without running it.
#if !defined(OOMGUARD_DDP_NCCL)
#define OOMGUARD_DDP_NCCL 0
#endif
#if OOMGUARD_DDP_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "torch_model.hpp"

#include <cxxabi.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

namespace {

struct Args {
    long launch = 0;       // > 0: fork this many ranks and wait for them
    long world = 0;        // --world-size (0: not given)
    long rank = -1;        // --rank (-1: not given)
    std::string store;     // --store: the FileStore's file
    long watchdog_s = 300;
    long timeout_ms = 60000;  // the process group's timeout
    bool nccl = false;        // --backend nccl: the group on the GPUs; gloo (the default): on the CPUs
    std::size_t bs = 1024, epochs = 3, samples = 4096, hidden = 128, min_batch = 64;
    std::vector<std::size_t> device_memory{std::size_t{1} << 30};  // one for every rank, or one each
    double fault_rate = 0;
    long fault_rank = 0;
    oomguard::ShrinkPolicy policy = oomguard::ShrinkPolicy::predictive();
    long give_up_rank = -1, exit_rank = -1, hang_rank = -1;
    std::size_t at_batch = 2;  // the global batch (from 1, across epochs) the drills happen at
    std::vector<std::string> forwarded;  // what --launch passes on to each rank
};

constexpr char const* flag_list =
    "flags: --launch N (fork N ranks)  --watchdog SECONDS (300: the launcher kills every rank after it)\n"
    "       --world-size N  --rank R  --store PATH (one rank, started by you; the FileStore, new for each job)\n"
    "       --bs N (1024: the global batch, split evenly over the ranks)  --epochs N (3)  --samples N (4096)\n"
    "       --hidden N (128)  --min-batch N (64)  --policy halve|geometric|bisect|predictive (predictive)\n"
    "       --device-memory SIZE[,SIZE...] (1GiB: every rank's simulated GPU, or one per rank)\n"
    "       --fault-rate P (0)  --fault-rank R (0)  --timeout MS (60000: the process group's)\n"
    "       --backend gloo|nccl (gloo; nccl: one rank per GPU, the consensus and gradients on it)\n"
    "       --give-up-rank R  --exit-rank R  --hang-rank R  --at-batch K (2): failure drills\n";

[[noreturn]] void fail(std::string const& why) {
    std::fprintf(stderr, "torch_ddp: %s\n%s", why.c_str(), flag_list);
    std::exit(2);
}

long whole(std::string const& flag, std::string const& v, long lo, long hi) {
    bool digits = !v.empty() && v.size() < 10 && v.find_first_not_of("0123456789") == std::string::npos;
    long n = digits ? std::stol(v) : -1;
    if (!digits || n < lo || n > hi)
        fail("bad value '" + v + "' for " + flag + ": give a whole number in [" + std::to_string(lo) + ", " +
             std::to_string(hi) + "]");
    return n;
}

Args parse(int argc, char** argv) {
    Args a;
    std::vector<std::string> seen;
    for (int i = 1; i < argc; ++i) {
        std::string f = argv[i];
        if (f == "--help" || f == "-h") {
            std::printf("usage: torch_ddp [flags]\n%s", flag_list);
            std::exit(0);
        }
        for (auto const& g : seen)
            if (g == f) fail(f + " is given twice");
        seen.push_back(f);
        if (i + 1 >= argc) fail(f + " needs a value");
        std::string v = argv[++i];
        bool forward = true;
        try {
            if (f == "--launch") a.launch = whole(f, v, 1, 64), forward = false;
            else if (f == "--watchdog") a.watchdog_s = whole(f, v, 1, 86400), forward = false;
            else if (f == "--world-size") a.world = whole(f, v, 1, 1024), forward = false;
            else if (f == "--rank") a.rank = whole(f, v, 0, 1 << 20), forward = false;
            else if (f == "--store") {
                if (v.empty()) fail("--store needs a path, not an empty one");
                a.store = v, forward = false;
            }
            else if (f == "--timeout") a.timeout_ms = whole(f, v, 1, 86400000);
            else if (f == "--backend") {
                if (v != "gloo" && v != "nccl") fail("bad value '" + v + "' for --backend: give gloo or nccl");
                if (v == "nccl" && !OOMGUARD_DDP_NCCL)
                    fail("--backend nccl: this build has no NCCL process group (it needs NCCL's header and "
                         "libtorch's CUDA runtime: -DOOMGUARD_TORCH_CUDA_RUNTIME=ON, as scripts/gpu-check builds)");
                a.nccl = v == "nccl";
            }
            else if (f == "--bs") a.bs = static_cast<std::size_t>(whole(f, v, 1, 1 << 24));
            else if (f == "--epochs") a.epochs = static_cast<std::size_t>(whole(f, v, 1, 100000));
            else if (f == "--samples") a.samples = static_cast<std::size_t>(whole(f, v, 1, 1 << 24));
            else if (f == "--hidden") a.hidden = static_cast<std::size_t>(whole(f, v, 1, 1 << 16));
            else if (f == "--min-batch") a.min_batch = static_cast<std::size_t>(whole(f, v, 1, 1 << 24));
            else if (f == "--policy") a.policy = oomguard::parse_policy(v, f);
            else if (f == "--device-memory") {
                a.device_memory.clear();
                std::size_t from = 0;
                while (true) {
                    std::size_t comma = v.find(',', from);
                    std::string one = v.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
                    std::size_t bytes = oomguard::parse_size(one, f);
                    if (bytes == 0) fail("bad value '" + one + "' in --device-memory: give a size above 0");
                    a.device_memory.push_back(bytes);
                    if (comma == std::string::npos) break;
                    from = comma + 1;
                }
            } else if (f == "--fault-rate") {
                char* end = nullptr;
                a.fault_rate = std::strtod(v.c_str(), &end);
                if (v.empty() || *end != '\0' || !(a.fault_rate >= 0 && a.fault_rate <= 0.5))
                    fail("bad value '" + v + "' for --fault-rate: give a number in [0, 0.5]");
            }
            else if (f == "--fault-rank") a.fault_rank = whole(f, v, 0, 1 << 20);
            else if (f == "--give-up-rank") a.give_up_rank = whole(f, v, 0, 1 << 20);
            else if (f == "--exit-rank") a.exit_rank = whole(f, v, 0, 1 << 20);
            else if (f == "--hang-rank") a.hang_rank = whole(f, v, 0, 1 << 20);
            else if (f == "--at-batch") a.at_batch = static_cast<std::size_t>(whole(f, v, 1, 1 << 24));
            else fail("unknown flag '" + f + "'");
        } catch (oomguard::config_error const& e) {
            fail(e.what());
        }
        if (forward) a.forwarded.insert(a.forwarded.end(), {f, v});
    }
    // Launched, or one rank: each needs its own flags.
    bool const one_rank = a.world != 0 || a.rank >= 0 || !a.store.empty();
    if (a.launch > 0 && one_rank)
        fail("give --launch N, or --world-size, --rank and --store for one rank started by you, not both");
    if (a.launch == 0 && !one_rank) fail("give --launch N, or --world-size N --rank R --store PATH");
    if (a.launch > 0) a.world = a.launch;
    if (a.launch == 0) {
        if (a.world == 0) fail("--world-size N is missing: give the number of ranks, 1 or more");
        if (a.rank < 0) fail("--rank R is missing: give this process's rank, 0 to " + std::to_string(a.world - 1));
        if (a.rank >= a.world)
            fail("--rank " + std::to_string(a.rank) + " is out of range for --world-size " + std::to_string(a.world) +
                 ": give 0 to " + std::to_string(a.world - 1));
        if (a.store.empty())
            fail("--store PATH is missing: give the file the ranks' c10d FileStore meets at (the same on every rank)");
        std::string dir = a.store.find('/') == std::string::npos ? "." : a.store.substr(0, a.store.rfind('/'));
        struct stat st {};
        if (!dir.empty() && (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)))
            fail("--store " + a.store + ": its directory '" + dir + "' does not exist: give a path in an existing one");
    }
    auto const world = static_cast<std::size_t>(a.world);
    if (a.device_memory.size() != 1 && a.device_memory.size() != world)
        fail("--device-memory gives " + std::to_string(a.device_memory.size()) + " sizes for " +
             std::to_string(world) + " ranks: give one for all of them, or one per rank");
    for (auto [name, r] : {std::pair{"--fault-rank", a.fault_rank}, std::pair{"--give-up-rank", a.give_up_rank},
                           std::pair{"--exit-rank", a.exit_rank}, std::pair{"--hang-rank", a.hang_rank}})
        if (r >= a.world)
            fail(std::string(name) + " " + std::to_string(r) + " is out of range for " + std::to_string(a.world) +
                 " ranks: give 0 to " + std::to_string(a.world - 1));
    if (a.bs > a.samples) fail("--bs " + std::to_string(a.bs) + " is above --samples " + std::to_string(a.samples));
    if (a.bs % world != 0)
        fail("--bs " + std::to_string(a.bs) + " does not split evenly over " + std::to_string(world) +
             " ranks: give a multiple of " + std::to_string(world));
    if (a.min_batch > a.bs / world)
        fail("--min-batch " + std::to_string(a.min_batch) + " is above a rank's share of --bs, " +
             std::to_string(a.bs / world));
    return a;
}

// --launch: fork a rank per process, each running this program with its own
// --world-size/--rank/--store, and wait for all of them; after --watchdog
// seconds, kill every rank still running and fail.
int launch(Args const& a, char const* self) {
    char const* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/torch_ddp.XXXXXX";
    std::vector<char> dir(templ.begin(), templ.end());
    dir.push_back('\0');
    if (::mkdtemp(dir.data()) == nullptr) {
        std::fprintf(stderr, "torch_ddp: cannot create a directory for the store (%s): %s\n", templ.c_str(),
                     std::strerror(errno));
        return 2;
    }
    std::string const store = std::string(dir.data()) + "/store";
    std::fflush(stdout);
    std::vector<pid_t> pids;
    pid_t const launcher = ::getpid();
    for (long r = 0; r < a.launch; ++r) {
        std::vector<std::string> args{self, "--world-size", std::to_string(a.launch), "--rank", std::to_string(r),
                                      "--store", store};
        args.insert(args.end(), a.forwarded.begin(), a.forwarded.end());
        pid_t pid = ::fork();
        if (pid == 0) {
            (void)::prctl(PR_SET_PDEATHSIG, SIGKILL);  // a launcher that dies takes its ranks along
            if (::getppid() != launcher) std::_Exit(127);  // it died before the line above: nobody would reap us
            std::vector<char*> argv;
            for (auto& s : args) argv.push_back(s.data());
            argv.push_back(nullptr);
            ::execv("/proc/self/exe", argv.data());
            std::fprintf(stderr, "torch_ddp: exec failed: %s\n", std::strerror(errno));
            std::_Exit(127);
        }
        if (pid < 0) {
            std::fprintf(stderr, "torch_ddp: fork failed: %s\n", std::strerror(errno));
            for (pid_t p : pids) ::kill(p, SIGKILL);
            return 2;
        }
        pids.push_back(pid);
    }
    auto const start = std::chrono::steady_clock::now();
    std::vector<int> status(pids.size(), -1);
    std::size_t running = pids.size();
    auto const deadline = std::chrono::steady_clock::now() + std::chrono::seconds(a.watchdog_s);
    bool killed = false;
    while (running > 0) {
        for (std::size_t r = 0; r < pids.size(); ++r) {
            if (status[r] != -1) continue;
            int st = 0;
            pid_t const got = ::waitpid(pids[r], &st, WNOHANG);
            if (got == pids[r]) {
                status[r] = st, --running;
            } else if (got < 0 && errno != EINTR) {  // not ours to wait for any more: say so, count it failed
                std::fprintf(stderr, "torch_ddp: waiting for rank %zu: %s\n", r, std::strerror(errno));
                status[r] = 0x7f00, --running;  // reads as exit status 127
            }
        }
        if (running == 0) break;
        if (!killed && std::chrono::steady_clock::now() > deadline) {
            std::fprintf(stderr, "torch_ddp: watchdog: %zu of %zu ranks still running after %ld s: killing every rank\n",
                         running, pids.size(), a.watchdog_s);
            for (std::size_t r = 0; r < pids.size(); ++r)
                if (status[r] == -1) ::kill(pids[r], SIGKILL);
            killed = true;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    bool all_ok = true;
    for (std::size_t r = 0; r < pids.size(); ++r) {
        int st = status[r];
        if (WIFEXITED(st)) std::printf("torch_ddp: rank %zu exited with status %d\n", r, WEXITSTATUS(st));
        else std::printf("torch_ddp: rank %zu ended by signal %d\n", r, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        all_ok = all_ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    }
    std::printf("torch_ddp: %zu ranks in %.2f s\n", pids.size(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    ::unlink(store.c_str());  // the FileStore removes it when the last rank leaves cleanly
    ::rmdir(dir.data());
    if (killed) {
        std::printf("torch_ddp: watchdog fired: the job hung\n");
        return 124;
    }
    return all_ok ? 0 : 1;
}

// FNV-1a over bytes, for the hashes the ranks print.
struct Hash {
    std::uint64_t h = 1469598103934665603ULL;
    void add(void const* p, std::size_t n) {
        auto const* b = static_cast<unsigned char const*>(p);
        for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
    }
    void add(std::uint64_t v) { add(&v, sizeof v); }
};

// What a rank's error is, for its last line: its first line, without libtorch's backtrace.
std::string describe(std::exception const& e) {
    auto const* c = dynamic_cast<c10::Error const*>(&e);
    std::string m = c != nullptr ? c->what_without_backtrace() : e.what();
    return m.substr(0, m.find('\n'));
}

// The exception's dynamic type, demangled: the test shows the process group's
// errors arrive as what they are.
std::string type_of(std::exception const& e) {
    int rc = 0;
    char* name = abi::__cxa_demangle(typeid(e).name(), nullptr, nullptr, &rc);
    std::string t = rc == 0 && name != nullptr ? name : typeid(e).name();
    std::free(name);
    return t;
}

int run_rank(Args const& a) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one write per line: the ranks share the launcher's stdout
    int const rank = static_cast<int>(a.rank), world = static_cast<int>(a.world);
    torch::manual_seed(1);   // the same data and initial weights on every rank, and as torch_train_loop
    at::set_num_threads(1);  // the same reduction order in every run
    torch::Device const device(torch::kCPU);
    std::size_t const capacity = a.device_memory[a.device_memory.size() == 1 ? 0 : a.rank];
    oomguard::SimulatedDevices sim({{capacity, 0, "simulated GPU"}});
    oomguard::MemoryBudget<oomguard::SimulatedDevices> budget(sim, 0);
    oomguard::ScopedTorchCpuAllocator<oomguard::SimulatedDevices> on_budget(budget);  // outlives every tensor

    int status = 0;
    std::size_t batch = 0;  // the global batch running, from 1 across epochs
    try {
        // The process group over a FileStore, as torch.distributed builds it:
        // Gloo on the CPUs, or NCCL on this rank's GPU.
        auto store = c10::make_intrusive<c10d::FileStore>(a.store, world);
        auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
        std::optional<torch::Device> wire;  // where the gradient all-reduce runs, when not on the CPU
        if (!a.nccl) {
            auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(a.timeout_ms));
            options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
            auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
            group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
            group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
        } else {
#if OOMGUARD_DDP_NCCL
            int const gpus = c10::cuda::device_count();
            if (gpus < world)
                throw std::runtime_error("--backend nccl runs one rank per GPU: " + std::to_string(world) +
                                         " ranks, " + std::to_string(gpus) + " GPUs");
            auto const index = static_cast<c10::DeviceIndex>(rank);
            c10::cuda::set_device(index);
            wire = torch::Device(torch::kCUDA, index);
            auto options = c10d::ProcessGroupNCCL::Options::create();
            options->timeout = std::chrono::milliseconds(a.timeout_ms);
            group->setBoundDeviceId(*wire);  // the group's device, before its backend: handed on to it
            auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
            group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
            group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
            // NCCL builds its communicator lazily, at the first collective, and that
            // allocates device memory: now, while the device has room, not at the
            // first mb.sync() of a step on a full device (a DistBackendError, no OOM).
            nccl->eagerConnectSingleDevice(*wire);
#endif
        }
        oomguard::C10dConsensus consensus(group);  // Gloo: a CPU tensor; NCCL: one on this rank's GPU
        {
            // A warm-up agreement on every rank, before training: every connection
            // (and NCCL's communicator) is up before the first step's mb.sync(), and
            // a rank that cannot join fails here, outside any recovery.
            std::uint64_t ready = 1;
            consensus.all_min(&ready, 1);
        }

        auto const N = static_cast<std::int64_t>(a.samples);
        torch_example::Data const data(N, device);
        torch_example::Net model(torch_example::inputs, static_cast<int>(a.hidden));
        torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05));
        std::vector<torch::Tensor> params = model->parameters();
        torch::Tensor on_wire;  // NCCL: the flat gradient's copy on the GPU, allocated once, here
        if (wire) {
            std::int64_t count = 0;
            for (auto const& p : params) count += p.numel();
            on_wire = torch::empty({count}, torch::TensorOptions().dtype(torch::kFloat).device(*wire));
        }

        oomguard::BatchOptions opts;
        auto const share = a.bs / static_cast<std::size_t>(world);
        opts.global_batch = share;  // this rank's shard of each global batch
        opts.precisions = {oomguard::Precision::fp32, oomguard::Precision::bf16};
        opts.policy = a.policy;
        opts.max_attempts = 100;
        opts.min_micro_batch = a.min_batch;
        oomguard::AdaptiveBatch train(opts);
        train.measure_with(budget);
        train.consensus(consensus.hook());
        if (a.fault_rate > 0 && a.fault_rank == rank) {  // transient OOMs from here on (the model is set up)
            oomguard::FaultPlan faults;
            faults.probability = a.fault_rate;
            faults.seed = 7;
            sim.set_faults(0, faults);
        }
        std::printf("rank %d of %d: torch_ddp over c10d (%s, FileStore), shard %zu of --bs %zu, %s simulated GPU\n",
                    rank, world, a.nccl ? "NCCL" : "Gloo", share, a.bs, oomguard::format_bytes(capacity).c_str());

        Hash steps;
        std::uint64_t calls = 0;
        auto const G = static_cast<std::int64_t>(a.bs);
        for (std::size_t epoch = 1; epoch <= a.epochs; ++epoch) {
            model->train();
            for (std::int64_t first = 0; first + G <= N; first += G) {
                ++batch;
                bool const drill = batch == a.at_batch;
                if (drill && a.give_up_rank == rank)  // nothing fits any more: not even the smallest micro-batch
                    sim.set_used_by_others(0, capacity - budget.used());
                std::int64_t const shard = first + static_cast<std::int64_t>(share) * rank;
                train.run(
                    [&](oomguard::MicroBatch const& mb) {
                        for (std::uint64_t v : {std::uint64_t{mb.offset}, std::uint64_t{mb.size},
                                                static_cast<std::uint64_t>(mb.precision),
                                                std::uint64_t{mb.calibration}})
                            steps.add(v);
                        ++calls;
                        if (drill && a.exit_rank == rank) {
                            std::printf("rank %d: exits now (drill)\n", rank);
                            std::_Exit(5);
                        }
                        if (drill && a.hang_rank == rank) {
                            std::printf("rank %d: hangs now (drill)\n", rank);
                            while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
                        }
                        auto off = shard + static_cast<std::int64_t>(mb.offset);
                        auto n = static_cast<std::int64_t>(mb.size);
                        torch::Tensor flat;
                        {
                            torch_example::Autocast bf16(device.type(), mb.precision == oomguard::Precision::bf16);
                            torch::Tensor pred = model->forward(data.X.narrow(0, off, n)).to(torch::kFloat);
                            torch::Tensor loss = torch::mse_loss(pred, data.Y.narrow(0, off, n));
                            (loss * mb.weight).backward();  // accumulates: the sum is this shard's gradient
                        }
                        bool const last = mb.offset + mb.size == share;
                        if (last) {  // every allocation before the sync point: the flat gradient too
                            std::vector<torch::Tensor> grads;
                            for (auto const& p : params) grads.push_back(p.grad().reshape({-1}));
                            flat = torch::cat(grads);
                        }
                        mb.sync();  // every rank is here, or this throws peer_out_of_memory on all of them
                        if (last) {  // the gradient all-reduce, in place: allocates nothing
                            if (on_wire.defined()) on_wire.copy_(flat);
                            std::vector<torch::Tensor> tensors{on_wire.defined() ? on_wire : flat};
                            group->allreduce(tensors)->wait();
                            if (on_wire.defined()) flat.copy_(on_wire);  // waits for the all-reduce
                            flat.div_(static_cast<double>(world));
                            std::int64_t at = 0;
                            for (auto& p : params) {
                                auto g = p.grad();
                                g.copy_(flat.narrow(0, at, g.numel()).view_as(g));
                                at += g.numel();
                            }
                        }
                    },
                    [&] { optimizer.step(), optimizer.zero_grad(); },  // commit: the same gradients on every rank
                    [&] { optimizer.zero_grad(); });                   // rollback: the batch is retried
            }
        }
        Hash weights;
        for (auto const& p : params) {
            torch::Tensor c = p.detach().contiguous();
            weights.add(c.data_ptr(), static_cast<std::size_t>(c.numel()) * c.element_size());
        }
        steps.add(calls);
        std::printf("rank %d: steps %llu hash %016llx\n", rank, static_cast<unsigned long long>(calls),
                    static_cast<unsigned long long>(steps.h));
        std::printf("rank %d: weights hash %016llx\n", rank, static_cast<unsigned long long>(weights.h));

        // The final loss over the whole set, on this rank alone (the weights are every rank's).
        torch::NoGradGuard no_grad;
        model->eval();
        oomguard::BatchOptions eval_opts;
        eval_opts.global_batch = a.samples;
        eval_opts.resume = true;
        eval_opts.policy = a.policy;
        oomguard::AdaptiveBatch eval(eval_opts);
        eval.measure_with(budget);
        double total = eval.run([&](oomguard::MicroBatch const& mb) {
                               auto off = static_cast<std::int64_t>(mb.offset);
                               auto n = static_cast<std::int64_t>(mb.size);
                               torch::Tensor pred = model->forward(data.X.narrow(0, off, n));
                               return torch::mse_loss(pred, data.Y.narrow(0, off, n)).item<double>() *
                                      static_cast<double>(n);
                           }).value;
        std::printf("rank %d: final loss %.9g\n", rank, total / static_cast<double>(N));
        std::printf("rank %d: %zu OOMs survived (train %zu, eval %zu), final m=%zu %s\n", rank,
                    train.counters().ooms + eval.counters().ooms, train.counters().ooms, eval.counters().ooms,
                    train.plan().micro_batch, oomguard::to_string(train.plan().precision));
    } catch (oomguard::recovery_failed const& e) {
        std::printf("rank %d: recovery_failed at global batch %zu: %s\n", rank, batch, describe(e).c_str());
        status = 3;
    } catch (std::exception const& e) {
        // The process group's errors (a peer gone, a timeout) arrive here as
        // what they are; a device OOM here would be one oomguard did not guard.
        bool const oom = oomguard::is_device_oom(e);
        std::printf("rank %d: error at global batch %zu (device OOM: %s; %s): %s\n", rank, batch, oom ? "yes" : "no",
                    type_of(e).c_str(), describe(e).c_str());
        status = oom ? 1 : 4;
    }
    return status;
}

}  // namespace

int main(int argc, char** argv) {
    Args const args = parse(argc, argv);
    if (args.launch > 0) return launch(args, argv[0]);
    return run_rank(args);
}
