// Consensus over NCCL for GPU data-parallel jobs (opt-in; needs <nccl.h>,
// libnccl and cudart). The same protocol as MpiConsensus, as one tiny
// all-reduce per round on a stream. The device buffer they use is allocated when the
// consensus is built, not during an OOM recovery.
//
//   oomguard::NcclConsensus nccl(comm, stream);
//   adaptive.consensus(nccl.hook());
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/cuda_runtime.hpp>
#include <oomguard/errors.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace oomguard {

/// The consensus hook over NCCL: ranks agree on the planner's inputs with an
/// ncclAllReduce(MIN) on `stream`, for jobs whose ranks talk only through NCCL
/// (docs/data_parallel.md).
class NcclConsensus {
public:
    /// Allocates the agreement's buffer (a few hundred bytes) on the current
    /// device; throws cuda_error if it cannot.
    NcclConsensus(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
        cuda(cudaMalloc(reinterpret_cast<void**>(&buffer_), capacity * sizeof(std::uint64_t)), "cudaMalloc");
    }
    NcclConsensus(NcclConsensus const&) = delete;
    NcclConsensus& operator=(NcclConsensus const&) = delete;
    ~NcclConsensus() { (void)cudaFree(buffer_); }

    /// The hook for AdaptiveBatch::consensus: one ncclAllReduce(ncclMin) per
    /// round. This object must outlive its use.
    Consensus hook() noexcept {
        Consensus c;
        c.context = this;
        c.all_min = [](void* ctx, std::uint64_t* values, std::size_t count) {
            static_cast<NcclConsensus*>(ctx)->reduce(values, count);
        };
        return c;
    }

private:
    static constexpr std::size_t capacity = detail::Ballot::count;

    void reduce(std::uint64_t* host, std::size_t n) {
        if (n > capacity)
            throw std::length_error("oomguard: NcclConsensus: more values than its device buffer holds");
        cuda(cudaMemcpyAsync(buffer_, host, n * sizeof(std::uint64_t), cudaMemcpyHostToDevice, stream_),
             "cudaMemcpyAsync");
        ncclResult_t r = ncclAllReduce(buffer_, buffer_, n, ncclUint64, ncclMin, comm_, stream_);
        if (r != ncclSuccess)
            throw std::runtime_error((detail::Message() << "oomguard: ncclAllReduce failed: " << ncclGetErrorString(r))
                                         .c_str());
        cuda(cudaMemcpyAsync(host, buffer_, n * sizeof(std::uint64_t), cudaMemcpyDeviceToHost, stream_),
             "cudaMemcpyAsync");
        cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }
    static void cuda(cudaError_t e, char const* what) {
        status s = CudaRuntime::checked(e);
        if (!s.ok()) detail::throw_status(s, (detail::Message() << "NcclConsensus: " << what).c_str());
    }
    ncclComm_t comm_;
    cudaStream_t stream_;
    std::uint64_t* buffer_ = nullptr;
};

}  // namespace oomguard
