// <oomguard/c10d.hpp> against libtorch's real c10d: Gloo process groups over a
// FileStore, ranks as forked processes (each builds its own group after the
// fork), and fake backends for the failures a CPU cannot produce. Each forked
// run has a deadline: a hang kills its ranks and fails the test.
#include <oomguard/c10d.hpp>
#include <oomguard/errors.hpp>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <doctest/doctest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using oomguard::C10dConsensus;
using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

namespace {

constexpr std::uint64_t top = std::uint64_t{1} << 63;
constexpr std::uint64_t all_ones = std::numeric_limits<std::uint64_t>::max();

std::string fresh_store() {
    char const* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/test_c10d.XXXXXX";
    std::vector<char> dir(templ.begin(), templ.end());
    dir.push_back('\0');
    REQUIRE(::mkdtemp(dir.data()) != nullptr);
    return std::string(dir.data()) + "/store";
}

// A Gloo process group as torch.distributed builds one, on 127.0.0.1.
Group gloo_group(std::string const& store_path, int rank, int size, std::chrono::milliseconds timeout) {
    auto store = c10::make_intrusive<c10d::FileStore>(store_path, size);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
    group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    return group;
}

void remove_store(std::string const& store) {
    ::unlink(store.c_str());
    ::rmdir(store.substr(0, store.rfind('/')).c_str());
}

// Kills the ranks still running (codes[r] == -1) and reaps them.
void kill_and_reap(std::vector<pid_t> const& pids, std::vector<int>& codes) {
    for (std::size_t r = 0; r < pids.size(); ++r)
        if (codes[r] == -1) ::kill(pids[r], SIGKILL);
    for (std::size_t r = 0; r < pids.size(); ++r) {
        int st = 0;
        if (codes[r] == -1 && ::waitpid(pids[r], &st, 0) == pids[r])
            codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
}

// Runs body(rank, group) in `size` forked processes; returns their exit codes
// (body's result; 90 when it threw; 128 + the signal when one ended it). After
// `deadline` every rank still running is killed and reaped, the store removed,
// and the test fails; a failed fork kills and reaps the ranks already forked.
// The ranks ignore SIGPIPE: a write to a peer that left is an error Gloo
// raises, not a signal that ends the rank.
template <class Body>
std::vector<int> run_ranks(int size, std::chrono::milliseconds group_timeout, Body body,
                           std::chrono::seconds deadline = 60s) {
    std::string const store = fresh_store();
    std::fflush(stdout);
    std::fflush(stderr);
    std::vector<pid_t> pids;
    for (int r = 0; r < size; ++r) {
        pid_t pid = ::fork();
        if (pid < 0) {
            std::vector<int> codes(pids.size(), -1);
            kill_and_reap(pids, codes);
            remove_store(store);
            FAIL("fork failed for rank " << r << " of " << size);
        }
        if (pid == 0) {
            ::signal(SIGPIPE, SIG_IGN);
            int code = 90;
            try {
                code = body(r, gloo_group(store, r, size, group_timeout));
            } catch (std::exception const& e) {
                std::fprintf(stderr, "rank %d: %s\n", r, e.what());
            }
            std::fflush(stdout);
            std::fflush(stderr);
            std::_Exit(code);
        }
        pids.push_back(pid);
    }
    std::vector<int> codes(pids.size(), -1);
    auto const end = std::chrono::steady_clock::now() + deadline;
    std::size_t running = pids.size();
    while (running > 0) {
        for (std::size_t r = 0; r < pids.size(); ++r) {
            int st = 0;
            if (codes[r] == -1 && ::waitpid(pids[r], &st, WNOHANG) == pids[r]) {
                codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                --running;
            }
        }
        if (running > 0 && std::chrono::steady_clock::now() > end) {
            kill_and_reap(pids, codes);
            remove_store(store);
            FAIL("the ranks hung: killed after the deadline");
        }
        std::this_thread::sleep_for(10ms);
    }
    remove_store(store);
    return codes;
}

// What all_min threw, for a rank to judge: 0 when it threw an exception that is
// not a device OOM (and said so), else a code naming what went wrong.
int leaves_with_a_non_oom_error(C10dConsensus& consensus, std::chrono::seconds within) {
    std::vector<std::uint64_t> v(8, 1);
    auto const t0 = std::chrono::steady_clock::now();
    try {
        consensus.all_min(v.data(), v.size());
    } catch (oomguard::out_of_memory const&) {
        return 11;  // the group's error turned into an OOM
    } catch (std::exception const& e) {
        auto const took = std::chrono::steady_clock::now() - t0;
        std::printf("  the group's error, as it is (device OOM: %s, after %.1f s): %.120s\n",
                    oomguard::is_device_oom(e) ? "yes" : "no", std::chrono::duration<double>(took).count(),
                    e.what());
        if (oomguard::is_device_oom(e)) return 12;
        return took < within ? 0 : 13;
    }
    return 14;  // it returned: the peer was not missed
}

// Fake backends for what a CPU cannot produce.
class ThrowingBackend final : public c10d::Backend {
public:
    ThrowingBackend(int size, bool oom, std::string name = "fake") : Backend(0, size), oom_(oom), name_(std::move(name)) {}
    const std::string getBackendName() const override { return name_; }
    c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>&, const c10d::AllreduceOptions&) override {
        if (oom_)  // what a communicator that ran out of device memory might raise
            TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. Tried to allocate 2.00 MiB");
        C10_THROW_ERROR(DistBackendError, "fake backend: the communicator is broken");
    }

private:
    bool oom_;
    std::string name_;
};

}  // namespace

TEST_CASE("one rank: the consensus agrees with itself on the CPU, every value as it was") {
    std::string const store = fresh_store();
    Group group = gloo_group(store, 0, 1, 10s);
    C10dConsensus consensus(group);
    CHECK(consensus.device().is_cpu());
    CHECK(consensus.rank() == 0);
    CHECK(consensus.size() == 1);
    std::vector<std::uint64_t> v{0, 1, top - 1, top, top + 1, all_ones};
    auto const expected = v;
    consensus.all_min(v.data(), v.size());
    CHECK(v == expected);
    std::vector<std::uint64_t> full(C10dConsensus::capacity, 7);
    consensus.all_min(full.data(), full.size());
    CHECK(full == std::vector<std::uint64_t>(C10dConsensus::capacity, 7));
    std::vector<std::uint64_t> over(C10dConsensus::capacity + 1, 7);
    CHECK_THROWS_AS(consensus.all_min(over.data(), over.size()), std::length_error);

    // And through the hook, as AdaptiveBatch calls it.
    oomguard::Consensus hook = consensus.hook();
    std::uint64_t one[1] = {top + 5};
    hook.all_min(hook.context, one, 1);
    CHECK(one[0] == top + 5);
    remove_store(store);
}

TEST_CASE("three ranks: each value's minimum as an unsigned integer, on both sides of 2^63") {
    auto codes = run_ranks(3, 30s, [](int rank, Group const& group) {
        C10dConsensus consensus(group);
        auto const r = static_cast<std::uint64_t>(rank);
        std::vector<std::uint64_t> v{
            r,                               // 0
            top + r,                         // 2^63
            top - 1 - r,                     // 2^63 - 3
            all_ones - r,                    // 2^64 - 3
            rank == 1 ? 0 : all_ones,        // 0
            rank == 2 ? top : top - 1,       // 2^63 - 1 (a MIN over int64 unflipped: 2^63, the negative one)
            rank == 0 ? top + 9 : all_ones,  // 2^63 + 9
        };
        std::vector<std::uint64_t> const want{0, top, top - 3, all_ones - 2, 0, top - 1, top + 9};
        consensus.all_min(v.data(), v.size());
        for (std::size_t i = 0; i < v.size(); ++i)
            if (v[i] != want[i]) return 10 + static_cast<int>(i);
        return 0;
    });
    CHECK(codes == std::vector<int>{0, 0, 0});
}

TEST_CASE("a peer that left: the agreement fails with Gloo's own error, not an OOM") {
    auto codes = run_ranks(2, 60s, [](int rank, Group const& group) {
        C10dConsensus consensus(group);
        // One agreement together first: every connection of the mesh is up
        // before rank 1 leaves (else rank 0 may fail connecting, not agreeing).
        std::vector<std::uint64_t> v(8, static_cast<std::uint64_t>(rank));
        consensus.all_min(v.data(), v.size());
        if (v != std::vector<std::uint64_t>(8, 0)) return 20;
        if (rank == 1) return 0;  // leaves without its part of the next collective
        return leaves_with_a_non_oom_error(consensus, 30s);  // well before the group's 60 s timeout
    });
    CHECK(codes == std::vector<int>{0, 0});
}

TEST_CASE("a peer that does not answer: the consensus's own short timeout ends the agreement, not as an OOM") {
    auto codes = run_ranks(2, 60s, [](int rank, Group const& group) {
        C10dConsensus consensus(group, 500ms);  // the group's is 60 s
        if (rank == 1) {
            std::this_thread::sleep_for(3s);
            return 0;
        }
        return leaves_with_a_non_oom_error(consensus, 2s);
    });
    CHECK(codes == std::vector<int>{0, 0});
}

TEST_CASE("a collective's error passes through as it is; one that would pass for an OOM becomes collective_error") {
    C10dConsensus broken(c10::make_intrusive<ThrowingBackend>(2, false));
    CHECK(broken.device().is_cpu());
    std::uint64_t v[2] = {1, 2};
    CHECK_THROWS_AS(broken.all_min(v, 2), c10::DistBackendError);

    C10dConsensus oom(c10::make_intrusive<ThrowingBackend>(2, true));
    bool nested_oom = false;
    try {
        oom.all_min(v, 2);
        FAIL("it returned");
    } catch (oomguard::collective_error const& e) {
        CHECK_FALSE(oomguard::is_device_oom(e));
        CHECK(std::string(e.what()).find("not an OOM this rank can retry alone") != std::string::npos);
        CHECK(std::string(e.what()).find("CUDA out of memory") == std::string::npos);
        try {
            std::rethrow_if_nested(e);
        } catch (c10::OutOfMemoryError const&) {
            nested_oom = true;
        }
    }
    CHECK(nested_oom);
}

TEST_CASE("bad arguments: a null group or backend, no ranks, a timeout of 0 ms or below") {
    CHECK_THROWS_WITH_AS(C10dConsensus{Group()}, "oomguard: C10dConsensus: the process group is null",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(C10dConsensus{c10::intrusive_ptr<c10d::Backend>()},
                         "oomguard: C10dConsensus: the backend is null", std::invalid_argument);
    CHECK_THROWS_WITH_AS(C10dConsensus(c10::make_intrusive<ThrowingBackend>(0, false)),
                         "oomguard: C10dConsensus: the group has 0 ranks; a group needs at least 1",
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(C10dConsensus(c10::make_intrusive<ThrowingBackend>(2, false), -5ms),
                         "oomguard: C10dConsensus: timeout -5 ms; give a duration above 0 ms, or "
                         "c10d::kUnsetTimeout for the group's own",
                         std::invalid_argument);
    // 0 ms: Work::wait reads it as "no timeout", and a collective given it fails at once.
    CHECK_THROWS_WITH_AS(C10dConsensus(c10::make_intrusive<ThrowingBackend>(2, false), 0ms),
                         "oomguard: C10dConsensus: timeout 0 ms; give a duration above 0 ms, or "
                         "c10d::kUnsetTimeout for the group's own",
                         std::invalid_argument);
    CHECK_NOTHROW(C10dConsensus(c10::make_intrusive<ThrowingBackend>(2, false), 1ms));
    CHECK_NOTHROW(C10dConsensus(c10::make_intrusive<ThrowingBackend>(2, false), c10d::kUnsetTimeout));
}

TEST_CASE("a process group with no backend for the agreement's device is refused when the consensus is built") {
    auto store = c10::make_intrusive<c10d::HashStore>();
    // No backend at all: the agreement would run on the CPU, where none serves it.
    auto bare = c10::make_intrusive<c10d::ProcessGroup>(store, 0, 2);
    CHECK_THROWS_WITH_AS(C10dConsensus{bare},
                         "oomguard: C10dConsensus: the process group has no backend for cpu tensors, where the "
                         "agreement's tensor would live; give a group with one (setBackend), or a device it has a "
                         "backend for",
                         std::invalid_argument);
    // A CPU backend only, and a CUDA device asked for: refused before any CUDA call.
    auto cpu_only = c10::make_intrusive<c10d::ProcessGroup>(store, 0, 2);
    cpu_only->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM,
                         c10::make_intrusive<ThrowingBackend>(2, false));
    cpu_only->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
    CHECK_THROWS_WITH_AS(C10dConsensus(cpu_only, c10d::kUnsetTimeout, c10::Device(c10::DeviceType::CUDA, 0)),
                         "oomguard: C10dConsensus: the process group has no backend for cuda:0 tensors, where the "
                         "agreement's tensor would live; give a group with one (setBackend), or a device it has a "
                         "backend for",
                         std::invalid_argument);
    // And on the CPU, which it serves, it is built (and its backend's error passes through).
    C10dConsensus on_cpu(cpu_only);
    CHECK(on_cpu.device().is_cpu());
    std::uint64_t v[2] = {1, 2};
    CHECK_THROWS_AS(on_cpu.all_min(v, 2), c10::DistBackendError);
}

TEST_CASE("a backend named nccl agrees on the GPU: here, with none, building it fails with libtorch's error") {
    // With libtorch's CUDA hooks absent or no device, asking for the current
    // CUDA device throws c10::Error -- before any recovery, and not an OOM.
    try {
        C10dConsensus on_gpu(c10::make_intrusive<ThrowingBackend>(2, false, "nccl"));
        MESSAGE("a CUDA device answered: the agreement's tensor is on " << on_gpu.device().str());
        CHECK(on_gpu.device().is_cuda());
    } catch (c10::Error const& e) {
        CHECK_FALSE(oomguard::is_device_oom(e));
    }
    // The device given wins over the backend's.
    C10dConsensus on_cpu(c10::make_intrusive<ThrowingBackend>(2, false, "nccl"), c10d::kUnsetTimeout,
                         c10::Device(c10::DeviceType::CPU));
    CHECK(on_cpu.device().is_cpu());
}
