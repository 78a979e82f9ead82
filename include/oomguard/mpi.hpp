// Consensus over MPI for data-parallel jobs (opt-in; needs <mpi.h> and MPI
// linked). Every rank of the communicator calls AdaptiveBatch::run once per
// global batch; the ranks agree on what each attempt observed, so an OOM on any
// rank moves every rank to the same plan, and no rank waits on one that failed:
// the agreement runs after each attempt on every rank, failed or not, and at
// each MicroBatch::sync() the step calls before a collective of its own.
//
//   oomguard::MpiConsensus mpi(MPI_COMM_WORLD);
//   adaptive.consensus(mpi.hook());
#pragma once

#include <oomguard/adaptive_batch.hpp>

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace oomguard {

/// The consensus hook over MPI: every rank of `comm` runs one AdaptiveBatch per
/// workload and they agree on the planner's inputs with MPI_Allreduce(MIN), so
/// they recover from an OOM on any rank together (docs/data_parallel.md).
class MpiConsensus {
public:
    /// The ranks of `comm` (MPI must be initialised, and `comm` outlive this object).
    explicit MpiConsensus(MPI_Comm comm = MPI_COMM_WORLD) noexcept : comm_(comm) {}

    /// The hook for AdaptiveBatch::consensus: one MPI_Allreduce(MIN) over the
    /// agreement's integers per round. This object must outlive its use.
    Consensus hook() noexcept {
        Consensus c;
        c.context = this;
        c.all_min = [](void* ctx, std::uint64_t* values, std::size_t count) {
            if (count > static_cast<std::size_t>(std::numeric_limits<int>::max()))
                throw std::length_error("oomguard: MpiConsensus: too many values for one MPI_Allreduce");
            check(MPI_Allreduce(MPI_IN_PLACE, values, static_cast<int>(count), MPI_UINT64_T, MPI_MIN,
                                static_cast<MpiConsensus*>(ctx)->comm_),
                  "MPI_Allreduce(all_min)");
        };
        return c;
    }

    /// The communicator the ranks agree over.
    MPI_Comm communicator() const noexcept { return comm_; }

private:
    static void check(int rc, char const* what) {
        if (rc != MPI_SUCCESS)
            throw std::runtime_error((detail::Message() << "oomguard: " << what << " failed with MPI error " << rc)
                                         .c_str());
    }
    MPI_Comm comm_;
};

}  // namespace oomguard
