// Data-parallel recovery over MPI, as a DDP job runs it: two ranks with
// different simulated capacities, a step that allocates and then all-reduces
// its gradients with MPI_Allreduce after MicroBatch::sync(). ctest starts it
// with mpiexec -n 2. A hang fails it (alarm), a collective paired with the
// wrong one fails it (MPI aborts on a truncated or mismatched message, and the
// step checks that both ranks all-reduce the same micro-batch).
#include <oomguard/device_buffer.hpp>
#include <oomguard/mpi.hpp>
#include <oomguard/simulated_devices.hpp>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "policies.hpp"

#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;
constexpr std::size_t KiB = 1024;

namespace {
int rank_of() {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}

// Every step() call on this rank, folded into a count and a hash.
struct Calls {
    std::uint64_t count = 0, hash = 1469598103934665603ULL;
    void add(MicroBatch const& mb) {
        for (std::uint64_t v : {std::uint64_t{mb.offset}, std::uint64_t{mb.size},
                                static_cast<std::uint64_t>(mb.precision), std::uint64_t{mb.calibration}}) {
            hash = (hash ^ v) * 1099511628211ULL;
        }
        ++count;
    }
    // Whether every rank made exactly the same calls.
    bool same_on_every_rank() const {
        std::uint64_t mine[4] = {count, ~count, hash, ~hash}, all[4];
        MPI_Allreduce(mine, all, 4, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
        return all[0] == ~all[1] && all[2] == ~all[3];
    }
};

// The DDP step: activations, the sync point, the gradient all-reduce.
void ddp_step(Budget& budget, MicroBatch const& mb, std::size_t fixed, std::size_t per_sample, Calls& calls) {
    calls.add(mb);
    DeviceBuffer<SimulatedDevices> act(budget, fixed + per_sample * mb.size * bytes_per_element(mb.precision) / 4);
    mb.sync();
    std::uint64_t grad[4] = {mb.offset, ~std::uint64_t{mb.offset}, mb.size, ~std::uint64_t{mb.size}}, sum[4];
    MPI_Allreduce(grad, sum, 4, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
    if (sum[0] != ~sum[1] || sum[2] != ~sum[3]) {
        std::fprintf(stderr, "rank %d: the gradient all-reduce paired different micro-batches\n", rank_of());
        MPI_Abort(MPI_COMM_WORLD, 4);
    }
}

using test_support::every_policy;
}  // namespace

TEST_CASE("two ranks, one with half the memory, end on the same plan") {
    int const rank = rank_of();
    SimulatedDevices gpus(1, rank == 0 ? 2048 * KiB : 1024 * KiB);  // rank 0 fits the whole batch
    Budget budget(gpus, 0, Limit::unlimited());
    BatchOptions o;
    o.global_batch = 128;
    o.policy = ShrinkPolicy::predictive();
    AdaptiveBatch a(o);
    a.measure_with(budget);
    MpiConsensus mpi(MPI_COMM_WORLD);
    a.consensus(mpi.hook());
    int commits = 0;
    Calls calls;
    for (int i = 0; i < 6; ++i)
        a.run([&](MicroBatch const& mb) { ddp_step(budget, mb, 16 * KiB, 8 * KiB, calls); }, [&] { ++commits; },
              [] {});
    CHECK(commits == 6);
    CHECK(calls.same_on_every_rank());
    unsigned long long mine[2] = {a.plan().micro_batch, a.plan().precision_index};
    unsigned long long lo[2], hi[2];
    MPI_Allreduce(mine, lo, 2, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(mine, hi, 2, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    CHECK(lo[0] == hi[0]);
    CHECK(lo[1] == hi[1]);
    CHECK(a.plan().micro_batch * 8 * KiB + 16 * KiB <= 1024 * KiB);  // fits the smaller rank
    CHECK(a.plan().micro_batch < 128);
    if (rank == 1) CHECK(a.counters().ooms >= 1);
    if (rank == 0) CHECK(a.counters().ooms == 0);  // it never ran out itself
    MESSAGE("rank " << rank << ": plan m=" << a.plan().micro_batch << ", OOMs caught " << a.counters().ooms);
}

TEST_CASE("every policy, grow-back on, faults and a neighbour on rank 1: identical step() calls, every batch") {
    int const rank = rank_of();
    for (ShrinkPolicy policy : every_policy()) {
        CAPTURE(std::string(policy.name()));
        SimulatedDevices gpus(1, rank == 0 ? 4096 * KiB : 1400 * KiB);
        if (rank == 1) {
            FaultPlan f;
            f.probability = 0.03;
            f.seed = 11;
            gpus.set_faults(0, f);
        }
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 100;
        o.grow_after = 1;
        o.max_attempts = 1000;
        o.precisions = {Precision::fp32, Precision::bf16};
        o.policy = policy;
        AdaptiveBatch a(o);
        a.measure_with(budget);
        MpiConsensus mpi(MPI_COMM_WORLD);
        a.consensus(mpi.hook());
        Calls calls;
        int commits = 0;
        for (int batch = 0; batch < 24; ++batch) {
            if (rank == 1) gpus.set_used_by_others(0, batch % 8 < 4 ? 0 : 600 * KiB);
            a.run([&](MicroBatch const& mb) { ddp_step(budget, mb, 64 * KiB, 12 * KiB, calls); },
                  [&] { ++commits; }, [] {});
        }
        CHECK(commits == 24);
        CHECK(calls.same_on_every_rank());
        if (rank == 1) CHECK(a.counters().ooms > 0);
        if (rank == 0) CHECK(a.counters().ooms == 0);
        CHECK(gpus.live_bytes() == 0);
        MESSAGE("rank " << rank << " " << std::string(policy.name()) << ": " << static_cast<unsigned long long>(calls.count)
                        << " step calls, OOMs " << a.counters().ooms << ", peer aborts "
                        << a.counters().peer_aborts);
    }
}

TEST_CASE("a give-up forced on rank 1: both ranks throw recovery_failed together, every policy") {
    int const rank = rank_of();
    for (ShrinkPolicy policy : every_policy()) {
        CAPTURE(std::string(policy.name()));
        SimulatedDevices gpus(1, rank == 0 ? 4096 * KiB : 256 * KiB);
        Budget budget(gpus, 0, Limit::unlimited());
        BatchOptions o;
        o.global_batch = 64;
        o.min_micro_batch = 8;
        o.policy = policy;
        AdaptiveBatch a(o);
        a.measure_with(budget);
        MpiConsensus mpi(MPI_COMM_WORLD);
        a.consensus(mpi.hook());
        Calls calls;
        a.run([&](MicroBatch const& mb) { ddp_step(budget, mb, 0, KiB, calls); }, [] {}, [] {});
        if (rank == 1) gpus.set_used_by_others(0, 200 * KiB);  // 8 samples need 64 KiB: nothing fits
        std::string outcome = "returned";
        try {
            a.run([&](MicroBatch const& mb) { ddp_step(budget, mb, 0, 8 * KiB, calls); }, [] {}, [] {});
        } catch (recovery_failed const&) {
            outcome = "recovery_failed";
        }
        CHECK(outcome == "recovery_failed");
        CHECK(a.plan() == a.last_good_plan());
        CHECK(calls.same_on_every_rank());
        // Both ranks are still in step: one more batch that fits everywhere.
        gpus.set_used_by_others(0, 0);
        int commits = 0;
        a.run([&](MicroBatch const& mb) { ddp_step(budget, mb, 0, KiB, calls); }, [&] { ++commits; }, [] {});
        CHECK(commits == 1);
        CHECK(calls.same_on_every_rank());
    }
}

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    alarm(240);  // a hang ends the test (SIGALRM), it never waits for ctest's limit
    int size = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != 2) {
        std::fprintf(stderr, "test_mpi: run it with mpiexec -n 2 (got %d ranks)\n", size);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    doctest::Context ctx(argc, argv);
    int failed = ctx.run();
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
    MPI_Finalize();
    return any;
}
