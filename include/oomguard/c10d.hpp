// Consensus over libtorch's c10d: the process group a data-parallel libtorch job
// already has (Gloo on CPUs, NCCL on GPUs, or any c10d backend). Opt-in, and
// C++20 as libtorch's headers require; not included by <oomguard/oomguard.hpp>.
// The same protocol as MpiConsensus and NcclConsensus: one all-reduce with MIN
// over the agreement's integers per round, on the group the job's own
// collectives run on. Every rank of the group calls AdaptiveBatch::run once per
// global batch, and MicroBatch::sync() before each collective of its own.
//
//   auto pg = ...;                                  // c10::intrusive_ptr<c10d::ProcessGroup>
//   oomguard::C10dConsensus consensus(pg);
//   train.consensus(consensus.hook());
//
// The agreement's tensor (a few hundred bytes of int64) is allocated when the
// consensus is built, on the device its collective runs on, not during an OOM
// recovery. What the collective throws reaches the caller as the process group
// raised it (c10::DistBackendError and friends), never as a device OOM, so it is
// not retried. What a CPU (Gloo) group throws when a peer left or its timeout
// passed does reach the caller. On a GPU (NCCL) group the wait is
// Work::wait(timeout), which blocks this thread and throws on timeout; but
// NCCL's own watchdog may abort the process first when the group's timeout
// passes (TORCH_NCCL_ASYNC_ERROR_HANDLING), so the caller sees the exception
// only with a consensus timeout below the group's, or with
// TORCH_NCCL_BLOCKING_WAIT=1, or on a "cpu:gloo,cuda:nccl" group, whose
// agreement runs on the CPU over Gloo.
//
// ProcessGroupNCCL builds its communicator lazily, at its first collective, and
// that allocates device memory: initialise the group eagerly (a bound device,
// or a barrier or one agreement right after building the consensus, before
// training), or the first mb.sync() of the first step does it on a device that
// may be full (a DistBackendError, not an OOM).
#pragma once

#if __cplusplus < 202002L
#error "oomguard: <oomguard/c10d.hpp> needs C++20, as libtorch's headers do: compile with -std=c++20 (the rest of oomguard needs C++17)"
#endif

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/classify.hpp>

#include <ATen/ops/empty.h>
#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace oomguard {

/// Thrown by C10dConsensus when its collective failed with an exception that
/// oomguard's classifier would take for a device OOM (an NCCL call whose text
/// quotes CUDA's "out of memory", say). An agreement that failed cannot be
/// retried in step with the other ranks, so it must not look like an OOM: its
/// text does not quote the original, which is nested (std::rethrow_if_nested).
/// Every other failure of the collective passes through unchanged.
class collective_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {
// MIN over int64 orders as MIN over uint64 once the sign bit is flipped: the
// ballot holds values on both sides of 2^63 (complements carry its maxima).
constexpr std::int64_t to_ordered(std::uint64_t v) noexcept {
    return static_cast<std::int64_t>(v ^ (std::uint64_t{1} << 63));
}
constexpr std::uint64_t from_ordered(std::int64_t v) noexcept {
    return static_cast<std::uint64_t>(v) ^ (std::uint64_t{1} << 63);
}
}  // namespace detail

/// The consensus hook over a c10d::ProcessGroup or a single c10d::Backend. Its
/// all-reduce runs over an int64 tensor of the ballot's size on `device()`:
///  - a ProcessGroup with a backend for CPU tensors (Gloo, alone or beside NCCL
///    as torch.distributed's "cpu:gloo,cuda:nccl"): a CPU tensor, so the
///    agreement touches no device memory while a device is out of it;
///  - otherwise the group's default backend's device: NCCL's CUDA device (the
///    group's bound device, else the current one);
///  - a Backend: CUDA when its name is "nccl", the CPU otherwise;
///  - or the device you give.
/// Neither copyable nor movable: the hook points at it, so it must outlive
/// every run() of the AdaptiveBatch it is given to.
class C10dConsensus {
public:
    /// Over a process group (as torch.distributed's init_process_group builds
    /// it): a pointer to c10d::ProcessGroup or to a class derived from it.
    /// `timeout`: each agreement's limit, passed to the collective
    /// (AllreduceOptions::timeout) and, on a device, to Work::wait; the default,
    /// c10d::kUnsetTimeout, keeps the group's own. At MicroBatch::sync() it
    /// covers the slowest rank's whole micro-batch, or its OOM recovery, since
    /// the others wait there for it: a limit of a few hundred ms breaks a healthy
    /// job; give minutes, as the group's own. On NCCL, only a limit below the
    /// group's reliably reaches the caller as an exception (NCCL's watchdog
    /// aborts the process at the group's). `device`: where the agreement's
    /// tensor lives, when not the one chosen as above. Throws
    /// std::invalid_argument for a null group, a group of fewer than one rank, a
    /// timeout of 0 ms or below other than kUnsetTimeout, a process group with
    /// no backend for the device's type, and whatever libtorch throws allocating
    /// the tensor (c10::Error; an OOM here is before any recovery, and yours to
    /// handle).
    template <class Group>
        requires std::is_base_of_v<c10d::ProcessGroup, Group>
    explicit C10dConsensus(c10::intrusive_ptr<Group> group, std::chrono::milliseconds timeout = c10d::kUnsetTimeout,
                           std::optional<c10::Device> device = std::nullopt)
        : group_(std::move(group)), timeout_(timeout) {
        if (!group_) detail::throw_invalid("oomguard: C10dConsensus: the process group is null");
        check_size(group_->getSize());
        check_timeout(timeout);
        c10::Device const on = device ? *device : device_of(*group_);
        if (!group_->hasBackendForDeviceType(on.type()))
            detail::throw_invalid(detail::Message()
                                  << "oomguard: C10dConsensus: the process group has no backend for "
                                  << on.str() << " tensors, where the agreement's tensor would live; give a group "
                                  << "with one (setBackend), or a device it has a backend for");
        allocate(on);
        wait_timeout_ = wait_timeout([&] { return group_->getBackend(on.type()); });
    }

    /// Over one backend (a c10d::ProcessGroupGloo or ProcessGroupNCCL used
    /// without a ProcessGroup around it), or any class derived from Backend.
    /// Same arguments and errors, less the check for a backend of the device's
    /// type: a lone backend is taken to serve the device chosen.
    template <class Backend>
        requires std::is_base_of_v<c10d::Backend, Backend>
    explicit C10dConsensus(c10::intrusive_ptr<Backend> backend,
                           std::chrono::milliseconds timeout = c10d::kUnsetTimeout,
                           std::optional<c10::Device> device = std::nullopt)
        : backend_(std::move(backend)), timeout_(timeout) {
        if (!backend_) detail::throw_invalid("oomguard: C10dConsensus: the backend is null");
        check_size(backend_->getSize());
        check_timeout(timeout);
        allocate(device ? *device : device_of(*backend_));
        wait_timeout_ = wait_timeout([&] { return backend_; });
    }

    C10dConsensus(C10dConsensus const&) = delete;
    C10dConsensus& operator=(C10dConsensus const&) = delete;

    /// The hook for AdaptiveBatch::consensus: one allreduce(MIN) per round.
    /// This object must outlive its use.
    Consensus hook() noexcept {
        Consensus c;
        c.context = this;
        c.all_min = [](void* ctx, std::uint64_t* values, std::size_t count) {
            static_cast<C10dConsensus*>(ctx)->all_min(values, count);
        };
        return c;
    }

    /// The collective itself: every rank of the group calls it with the same
    /// `count` (at most `capacity`), and each of values[0..count) becomes its
    /// minimum over the ranks. Throws std::length_error above `capacity`; the
    /// process group's exception when the collective fails, unchanged, or
    /// collective_error when that exception would pass for a device OOM. On the
    /// CPU it waits with Work::wait(), which Gloo ends with an exception when a
    /// peer left or the timeout passed. On a device it waits with
    /// Work::wait(timeout) (the consensus's timeout, else the backend's), which
    /// for NCCL blocks this thread and throws on timeout -- unless NCCL's
    /// watchdog, at the group's timeout, tears the process down first.
    void all_min(std::uint64_t* values, std::size_t count) {
        if (count > capacity)
            throw std::length_error((detail::Message() << "oomguard: C10dConsensus: " << count
                                                       << " values in one agreement, above the " << capacity
                                                       << " its tensor holds")
                                        .c_str());
        if (count == 0) return;
        auto* host = host_.data_ptr<std::int64_t>();
        for (std::size_t i = 0; i < count; ++i) host[i] = detail::to_ordered(values[i]);
        try {
            if (!on_host_) buffer_.copy_(host_);  // synchronous: pageable host memory
            std::vector<at::Tensor> tensors{buffer_.narrow(0, 0, static_cast<std::int64_t>(count))};
            c10d::AllreduceOptions opts;
            opts.reduceOp = c10d::ReduceOp::MIN;
            opts.timeout = timeout_;
            c10::intrusive_ptr<c10d::Work> work =
                group_ ? group_->allreduce(tensors, opts) : backend_->allreduce(tensors, opts);
            if (on_host_) {
                work->wait();
            } else {
                // A bare wait() would only make the current stream wait for
                // NCCL's; the copy below would then block inside CUDA where no
                // timeout reaches it. With a timeout, NCCL's wait blocks this
                // thread until the collective completes, or throws.
                work->wait(wait_timeout_);
                host_.copy_(buffer_);  // the collective is complete
            }
        } catch (std::exception const& e) {
            if (!is_device_oom(e)) throw;
            // Its text stays out of ours: the classifier reads texts, and this is no OOM.
            std::throw_with_nested(collective_error(
                "oomguard: C10dConsensus: the agreement's all-reduce failed with an exception that reads as a device "
                "OOM; a failed agreement is not an OOM this rank can retry alone (the exception is nested: "
                "std::rethrow_if_nested)"));
        }
        for (std::size_t i = 0; i < count; ++i) values[i] = detail::from_ordered(host[i]);
    }

    /// The device the agreement's tensor lives on (the CPU for Gloo).
    c10::Device device() const noexcept { return buffer_.device(); }
    /// This process's rank in the group, in [0, size()).
    int rank() const { return group_ ? group_->getRank() : backend_->getRank(); }
    /// The number of ranks in the group (>= 1).
    int size() const { return group_ ? group_->getSize() : backend_->getSize(); }

    /// The most values one agreement carries (the ballot's size).
    static constexpr std::size_t capacity = detail::Ballot::count;

private:
    static void check_size(int size) {
        if (size < 1)
            detail::throw_invalid(detail::Message() << "oomguard: C10dConsensus: the group has " << size
                                                    << " ranks; a group needs at least 1");
    }
    static void check_timeout(std::chrono::milliseconds t) {
        if (t <= std::chrono::milliseconds(0) && t != c10d::kUnsetTimeout)
            detail::throw_invalid(detail::Message()
                                  << "oomguard: C10dConsensus: timeout " << static_cast<long long>(t.count())
                                  << " ms; give a duration above 0 ms, or c10d::kUnsetTimeout for the group's own");
    }
    static c10::Device current(c10::DeviceType type) {
        return c10::impl::getDeviceGuardImpl(type)->getDevice();
    }
    static c10::Device device_of(c10d::ProcessGroup& g) {
        if (g.hasBackendForDeviceType(c10::DeviceType::CPU)) return c10::Device(c10::DeviceType::CPU);
        if (g.getBackendType() == c10d::ProcessGroup::BackendType::NCCL) {
            if (auto bound = g.getBoundDeviceId()) return *bound;
            return current(c10::DeviceType::CUDA);
        }
        if (g.hasBackendForDeviceType(c10::DeviceType::CUDA)) return current(c10::DeviceType::CUDA);
        return c10::Device(c10::DeviceType::CPU);
    }
    static c10::Device device_of(c10d::Backend const& b) {
        if (b.getBackendName() != "nccl") return c10::Device(c10::DeviceType::CPU);
        if (auto bound = b.getBoundDeviceId()) return *bound;
        return current(c10::DeviceType::CUDA);
    }
    // The limit Work::wait gets on a device: the consensus's, else the backend's
    // own (its options' timeout), else c10d's default for backends. Never 0,
    // which Work::wait reads as "no timeout".
    template <class GetBackend>
    std::chrono::milliseconds wait_timeout(GetBackend get) const {
        if (timeout_ != c10d::kUnsetTimeout) return timeout_;
        try {
            if (c10::intrusive_ptr<c10d::Backend> b = get()) {
                auto const t = b->getBackendOptions()->timeout;
                if (t > std::chrono::milliseconds(0)) return t;
            }
        } catch (std::exception const&) {  // no backend yet, or one without options: c10d's default
        }
        return ::kBackendDefaultTimeout;
    }
    void allocate(c10::Device device) {
        auto const n = static_cast<std::int64_t>(capacity);
        host_ = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(c10::DeviceType::CPU));
        on_host_ = device.is_cpu();
        buffer_ = on_host_ ? host_ : at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
    }

    c10::intrusive_ptr<c10d::ProcessGroup> group_;
    c10::intrusive_ptr<c10d::Backend> backend_;
    std::chrono::milliseconds timeout_;
    std::chrono::milliseconds wait_timeout_ = ::kBackendDefaultTimeout;  // Work::wait's, on a device
    at::Tensor host_, buffer_;  // the same tensor when the collective runs on the CPU
    bool on_host_ = true;
};

}  // namespace oomguard
