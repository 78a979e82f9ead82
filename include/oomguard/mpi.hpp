// Consensus over MPI for data-parallel jobs (opt-in; needs <mpi.h> and MPI
// linked). Every rank of the communicator calls AdaptiveBatch::run once per
// global batch; an OOM on any rank moves every rank to the same plan, and no
// rank waits on one that failed, since the collectives run after each attempt
// on every rank, failed or not.
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

class MpiConsensus {
public:
    explicit MpiConsensus(MPI_Comm comm = MPI_COMM_WORLD) noexcept : comm_(comm) {}

    /// The hook for AdaptiveBatch::consensus. This object must outlive its use.
    Consensus hook() noexcept {
        Consensus c;
        c.context = this;
        c.any_failed = [](void* ctx, bool mine) -> bool {
            int in = mine ? 1 : 0, out = 0;
            check(MPI_Allreduce(&in, &out, 1, MPI_INT, MPI_LOR, static_cast<MpiConsensus*>(ctx)->comm_),
                  "MPI_Allreduce(any_failed)");
            return out != 0;
        };
        c.agree = [](void* ctx, std::size_t* micro_batch, std::size_t* precision_index) {
            // One collective: the smallest micro-batch and, through the
            // complement, the largest (lowest-precision) ladder index.
            unsigned long long in[2] = {*micro_batch,
                                        std::numeric_limits<unsigned long long>::max() - *precision_index};
            unsigned long long out[2] = {0, 0};
            check(MPI_Allreduce(in, out, 2, MPI_UNSIGNED_LONG_LONG, MPI_MIN, static_cast<MpiConsensus*>(ctx)->comm_),
                  "MPI_Allreduce(agree)");
            *micro_batch = static_cast<std::size_t>(out[0]);
            *precision_index = static_cast<std::size_t>(std::numeric_limits<unsigned long long>::max() - out[1]);
        };
        return c;
    }

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
