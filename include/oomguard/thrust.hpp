// Thrust through a MemoryBudget (opt-in; not in the umbrella header).
//
//   oomguard::thrust_vector<float, Backend> v(n, oomguard::ThrustAllocator<float, Backend>(budget));
//   thrust::sort(oomguard::thrust_policy(budget), v.begin(), v.end());   // temporaries too
//
// Storage and algorithm temporaries are allocated through the budget, so an
// over-budget request never reaches the device and every failure is a typed
// oomguard::out_of_memory with the requested size. The same sources build with
// nvcc on CUDA (over CudaRuntime) and with a host compiler on Thrust's CPP device
// system (-DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP, over SimulatedDevices
// with host memory), which is how CI tests them.
#pragma once

#include <oomguard/classify.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>

#if !defined(__CUDACC__) && !defined(THRUST_DEVICE_SYSTEM)
#error "oomguard: <oomguard/thrust.hpp> under a host compiler needs Thrust's device system named: compile with -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP (or _OMP, _TBB), or build the file with nvcc for CUDA"
#endif

#include <thrust/device_ptr.h>
#include <thrust/device_reference.h>
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>
#include <thrust/mr/memory_resource.h>
#include <thrust/system/detail/bad_alloc.h>
#include <thrust/system_error.h>

#if !defined(__CUDACC__) && THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#error "oomguard: <oomguard/thrust.hpp>: Thrust's device system is CUDA, but a host compiler cannot build it (a Thrust header included first picked CUDA by default): define THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP before any Thrust header (on the command line), or build the file with nvcc"
#endif

#include <cstddef>
#include <limits>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace oomguard {

/// A Thrust allocator for `thrust::device_vector` storage through a budget.
template <class T, class Backend = default_backend>
class ThrustAllocator {
public:
    using value_type = T;  ///< the element type
    using pointer = thrust::device_ptr<T>;  ///< a pointer to device memory, as device_vector expects
    using const_pointer = thrust::device_ptr<T const>;  ///< a pointer to constant device memory
    using reference = thrust::device_reference<T>;  ///< a reference to an element in device memory
    using const_reference = thrust::device_reference<T const>;  ///< a reference to a constant element in device memory
    using size_type = std::size_t;  ///< counts of elements
    using difference_type = std::ptrdiff_t;  ///< distances between elements
    template <class U>
    /// The same allocator for elements of type U, on the same backend.
    struct rebind {
        using other = ThrustAllocator<U, Backend>;  ///< ThrustAllocator<U, Backend>
    };
    // The storage goes where its allocator goes: a vector assigned, moved or
    // swapped from one on another budget takes that budget with the storage, so
    // each budget frees exactly what it allocated.
    using propagate_on_container_copy_assignment = std::true_type;  ///< a copied vector takes the source's budget
    using propagate_on_container_move_assignment = std::true_type;  ///< a moved vector keeps its budget
    using propagate_on_container_swap = std::true_type;  ///< swapped vectors swap budgets

    /// Thrust default-constructs allocators in a few places; such a copy cannot
    /// allocate until it is assigned one bound to a budget.
    ThrustAllocator() noexcept = default;
    /// Storage through `budget`, which must outlive every vector using this allocator.
    explicit ThrustAllocator(MemoryBudget<Backend>& budget) noexcept : budget_(&budget) {}
    template <class U>
    /// The allocator for another element type, on `o`'s budget (what rebind makes).
    ThrustAllocator(ThrustAllocator<U, Backend> const& o) noexcept : budget_(o.budget()) {}

    /// `n` elements through the budget; throws out_of_memory when they do not fit (or n * sizeof(T)
    /// overflows), std::logic_error when the allocator is bound to no budget.
    pointer allocate(size_type n) {
        if (budget_ == nullptr)
            throw std::logic_error("oomguard: ThrustAllocator::allocate: this allocator is not bound to a "
                                   "MemoryBudget; construct it with ThrustAllocator(budget)");
        if (n > std::numeric_limits<size_type>::max() / sizeof(T))
            throw out_of_memory(budget_->denial(std::numeric_limits<size_type>::max(), oom_source::budget, status{}));
        return pointer(static_cast<T*>(budget_->allocate(n * sizeof(T))));
    }
    /// Frees `n` elements at `p` and gives their bytes back to the budget.
    void deallocate(pointer p, size_type n) noexcept {
        if (budget_ != nullptr) budget_->deallocate(thrust::raw_pointer_cast(p), n * sizeof(T));
    }

    /// The budget the storage goes through (null for a default-constructed allocator).
    MemoryBudget<Backend>* budget() const noexcept { return budget_; }
    /// Equal when bound to the same budget: either may free what the other allocated.
    friend bool operator==(ThrustAllocator const& a, ThrustAllocator const& b) noexcept {
        return a.budget_ == b.budget_;
    }
    /// Not operator==.
    friend bool operator!=(ThrustAllocator const& a, ThrustAllocator const& b) noexcept { return !(a == b); }

private:
    MemoryBudget<Backend>* budget_ = nullptr;
};

/// A device_vector whose storage goes through a budget.
template <class T, class Backend = default_backend>
using thrust_vector = thrust::device_vector<T, ThrustAllocator<T, Backend>>;

/// The allocator Thrust uses for algorithm temporaries (`thrust::sort`'s
/// buffers, CUB's temp storage) when given `thrust_policy(budget)`.
template <class Backend = default_backend>
class ThrustTemporaryAllocator {
public:
    /// Thrust asks for temporaries in bytes.
    using value_type = char;

    /// Temporaries through `budget`, which must outlive the algorithms using it.
    explicit ThrustTemporaryAllocator(MemoryBudget<Backend>& budget) noexcept : budget_(&budget) {}

    /// Thrust asks in bytes, as a size_t: a request too large for any device is
    /// an out_of_memory like any other, never a bad argument.
    char* allocate(std::size_t n) { return static_cast<char*>(budget_->allocate(n)); }
    /// Frees a temporary of `n` bytes and gives them back to the budget.
    void deallocate(char* p, std::size_t n) noexcept { budget_->deallocate(p, n); }

    /// The budget temporaries go through.
    MemoryBudget<Backend>& budget() const noexcept { return *budget_; }

private:
    MemoryBudget<Backend>* budget_;
};

/// An execution policy whose temporaries are allocated through `budget`:
/// `thrust::sort(oomguard::thrust_policy(budget), first, last)`. On a stream:
/// thrust_policy(budget, stream), below.
template <class Backend>
auto thrust_policy(MemoryBudget<Backend>& budget) {
    return thrust::device(ThrustTemporaryAllocator<Backend>(budget));
}

/// Algorithm temporaries through the budget's stream-ordered path: allocated and
/// freed on `stream` (MemoryBudget::allocate_async), so they are ordered with
/// the algorithm's own work. Used by thrust_policy(budget, stream).
template <class Backend>
class ThrustStreamAllocator {
public:
    static_assert(is_stream_ordered_v<Backend>, "oomguard: ThrustStreamAllocator needs a stream-ordered backend");
    /// Thrust asks for temporaries in bytes.
    using value_type = char;
    /// The backend's stream (cudaStream_t for CudaRuntime).
    using stream_type = typename Backend::stream_type;

    /// Temporaries through `budget`'s stream-ordered path on `stream`.
    ThrustStreamAllocator(MemoryBudget<Backend>& budget, stream_type stream) noexcept
        : budget_(&budget), stream_(stream) {}
    /// `n` bytes from the pool, ordered on the stream; throws out_of_memory when they do not fit.
    char* allocate(std::size_t n) { return static_cast<char*>(budget_->allocate_async(n, stream_)); }
    /// Frees a temporary of `n` bytes, ordered on the stream.
    void deallocate(char* p, std::size_t n) noexcept { budget_->deallocate_async(p, n, stream_); }

    /// The budget temporaries go through.
    MemoryBudget<Backend>& budget() const noexcept { return *budget_; }
    /// The stream temporaries are allocated and freed on.
    stream_type stream() const noexcept { return stream_; }

private:
    MemoryBudget<Backend>* budget_;
    stream_type stream_;
};

/// An execution policy on `stream` whose temporaries come from the budget's
/// stream-ordered pool on that stream: `thrust::sort(oomguard::thrust_policy(budget, s), ...)`.
/// On CUDA the algorithm runs on `stream` (thrust::cuda::par.on); on Thrust's
/// host systems, which have no streams, it runs as thrust::device does.
template <class Backend, std::enable_if_t<is_stream_ordered_v<Backend>, int> = 0>
auto thrust_policy(MemoryBudget<Backend>& budget, typename Backend::stream_type stream) {
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
    static_assert(std::is_same<typename Backend::stream_type, cudaStream_t>::value,
                  "oomguard: on Thrust's CUDA system the budget's backend must be CudaRuntime");
    return thrust::cuda::par(ThrustStreamAllocator<Backend>(budget, stream)).on(stream);
#else
    return thrust::device(ThrustStreamAllocator<Backend>(budget, stream));
#endif
}

/// A Thrust memory resource over a budget: the upstream of a Thrust `mr` pool
/// (`thrust::mr::unsynchronized_pool_resource<ThrustBudgetResource<B>>`).
template <class Backend = default_backend>
class ThrustBudgetResource : public thrust::mr::memory_resource<thrust::device_ptr<void>> {
public:
    /// What the pool is handed: untyped device memory.
    using pointer = thrust::device_ptr<void>;
    /// A resource over `budget`, which must outlive it and every pool on it.
    explicit ThrustBudgetResource(MemoryBudget<Backend>& budget) noexcept : budget_(&budget) {}

    /// `bytes` through the budget (256-byte aligned, more than any pool asks); throws out_of_memory
    /// when they do not fit.
    pointer do_allocate(std::size_t bytes, std::size_t /*alignment*/) override {
        // Device allocations are 256-byte aligned, more than any pool asks for.
        return pointer(budget_->allocate(bytes));
    }
    /// Frees `bytes` at `p` and gives them back to the budget.
    void do_deallocate(pointer p, std::size_t bytes, std::size_t /*alignment*/) override {
        budget_->deallocate(thrust::raw_pointer_cast(p), bytes);
    }
    /// The budget the pool's blocks come from.
    MemoryBudget<Backend>& budget() const noexcept { return *budget_; }

private:
    MemoryBudget<Backend>* budget_;
};

/// A Thrust `mr` pool as a releasable cache: release() returns its cached
/// blocks to the budget and reports the bytes the budget got back.
template <class Pool, class Backend = default_backend>
class ThrustPoolCache {
public:
    /// The cache of `pool`, whose upstream allocates through `upstream_budget`; both must outlive it.
    ThrustPoolCache(Pool& pool, MemoryBudget<Backend>& upstream_budget) noexcept
        : pool_(&pool), budget_(&upstream_budget) {}
    /// A Thrust pool does not say what it caches; the registry's estimate is 0.
    std::size_t releasable_bytes() const noexcept { return 0; }
    /// Returns the pool's cached blocks upstream; answers the bytes the budget got back.
    std::size_t release() {
        std::size_t before = budget_->used();
        pool_->release();
        std::size_t after = budget_->used();
        return before > after ? before - after : 0;
    }

private:
    Pool* pool_;
    MemoryBudget<Backend>* budget_;
};

/// Runs `f` and turns Thrust's own OOM errors (thrust::system::detail::bad_alloc
/// and a system_error carrying cudaErrorMemoryAllocation, which keep nothing but
/// text) into oomguard::out_of_memory with the budget's and device's figures.
/// Thrust does not say how much it asked for: `requested_known` is false.
/// Every other exception passes through unchanged.
template <class Backend, class F>
decltype(auto) translate_thrust_oom(MemoryBudget<Backend>& budget, F&& f) {
    auto rethrow = [&](char const* what) {
        oom_info i = budget.denial(0, oom_source::device,
                                   status{status_kind::out_of_memory, 2, "cudaErrorMemoryAllocation"});
        i.requested_known = false;
        detail::Message m = detail::describe(i);
        m << " Thrust said: " << what;
        throw out_of_memory(i, m);
    };
    try {
        return std::forward<F>(f)();
    } catch (out_of_memory const&) {
        throw;
    } catch (thrust::system::detail::bad_alloc const& e) {
        rethrow(e.what());
    } catch (thrust::system_error const& e) {
        if (!is_device_oom(e)) throw;
        rethrow(e.what());
    }
    throw std::logic_error("oomguard: translate_thrust_oom: unreachable");
}

}  // namespace oomguard
