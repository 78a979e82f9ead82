// Two MPI ranks with different simulated capacities (rank 1 has half the
// memory) train with adaptive_batch and MpiConsensus: both end on the same plan,
// having committed every global batch. ctest starts it with mpiexec -n 2.
#include <oomguard/device_buffer.hpp>
#include <oomguard/mpi.hpp>
#include <oomguard/simulated_devices.hpp>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

using namespace oomguard;

TEST_CASE("two ranks, one with half the memory, end on the same plan") {
    int rank = 0, size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    REQUIRE(size == 2);
    std::size_t const KiB = 1024;
    SimulatedDevices gpus(1, rank == 0 ? 2048 * KiB : 1024 * KiB);  // rank 0 fits the whole batch
    MemoryBudget<SimulatedDevices> budget(gpus, 0, Limit::unlimited());
    BatchOptions o;
    o.global_batch = 128;
    o.policy = ShrinkPolicy::predictive();
    AdaptiveBatch a(o);
    a.measure_with(budget);
    MpiConsensus mpi(MPI_COMM_WORLD);
    a.consensus(mpi.hook());
    int commits = 0;
    for (int i = 0; i < 6; ++i)
        a.run([&](MicroBatch const& mb) { DeviceBuffer<SimulatedDevices> act(budget, 16 * KiB + mb.size * 8 * KiB); },
              [&] { ++commits; }, [] {});
    CHECK(commits == 6);
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

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    doctest::Context ctx(argc, argv);
    int failed = ctx.run();
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
    MPI_Finalize();
    return any;
}
