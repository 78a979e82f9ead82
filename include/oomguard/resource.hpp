// The budget as a CCCL `cuda::mr` memory resource -- what RMM 26 and CCCL code
// plug in (rmm::mr::set_current_device_resource takes any such resource).
// Opt-in; needs the CUDA toolkit's headers (CCCL). Two forms:
//
// - BudgetResource<Backend>: allocates through a MemoryBudget on a backend
//   (cudaMalloc / cudaMallocFromPoolAsync on CudaRuntime; the simulator on CPU).
// - BudgetAdaptor<Upstream>: a budget in front of any upstream resource (RMM's
//   cuda_async_memory_resource or pool_memory_resource, CCCL's pools): every
//   request of at least one byte takes the cap first, with one compare-and-swap
//   and no lock.
//
// Both are synchronous and stream-ordered resources with the device_accessible
// property, copyable (copies share the budget), equal when they share it, and
// throw oomguard's typed out_of_memory -- a std::bad_alloc, so code that catches
// bad_alloc keeps working, and RMM's failure_callback_resource_adaptor keyed on
// oomguard::out_of_memory retries device OOMs and nothing else. Both spellings
// of the interface are provided, chosen by CCCL_VERSION: CCCL 3.0 as shipped
// with CUDA 13.0 (experimental: allocate(bytes, alignment),
// allocate_async(bytes, alignment, stream)) and CCCL >= 3.1
// (allocate_sync(bytes, alignment), allocate(stream, bytes, alignment)).
// Alignments up to 256 bytes (what cudaMalloc and the pools guarantee) are honoured.
#pragma once

#include <oomguard/cache_registry.hpp>
#include <oomguard/classify.hpp>
#include <oomguard/cuda_runtime.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>

#if !defined(LIBCUDACXX_ENABLE_EXPERIMENTAL_MEMORY_RESOURCE)
#if defined(_CUDA_MEMORY_RESOURCE)
#error "oomguard: <cuda/memory_resource> was included before <oomguard/resource.hpp> without LIBCUDACXX_ENABLE_EXPERIMENTAL_MEMORY_RESOURCE, so CCCL 3.0 left cuda::mr out: include oomguard's header first, or define the macro on the command line"
#endif
#define LIBCUDACXX_ENABLE_EXPERIMENTAL_MEMORY_RESOURCE  // CCCL 3.0 keeps cuda::mr behind it; later ones ignore it
#endif
#include <cuda/memory_resource>
#include <cuda/stream_ref>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#if !defined(CCCL_VERSION)
#error "oomguard: <oomguard/resource.hpp> needs CCCL (the CUDA toolkit's include/cccl, or RMM's bundled copy)"
#endif
#if CCCL_VERSION >= 3001000
#define OOMGUARD_CCCL_MR_STREAM_FIRST 1  // CCCL >= 3.1: allocate(stream, bytes, alignment), allocate_sync
#else
#define OOMGUARD_CCCL_MR_STREAM_FIRST 0  // CCCL 3.0: allocate(bytes, alignment), allocate_async
#endif

namespace oomguard {

namespace detail {
constexpr std::size_t resource_alignment = 256;

inline void check_alignment(std::size_t alignment, char const* who) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > resource_alignment)
        throw_invalid(Message() << "oomguard: " << who << ": alignment " << alignment
                                << " is not a power of two up to 256 (what cudaMalloc and the pools give)");
}

// A CCCL cuda::cuda_error whose status is cudaErrorMemoryAllocation (2). CCCL
// >= 3.1 says so by status(); CCCL 3.0 only in its fixed text, "cudaError 2: ...".
inline bool is_cccl_oom(std::exception const& e) noexcept {
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    if (auto const* c = dynamic_cast<::cuda::cuda_error const*>(&e)) return static_cast<int>(c->status()) == 2;
    return false;
#else
    if (dynamic_cast<::cuda::cuda_error const*>(&e) == nullptr) return false;
    char const* w = e.what();
    static constexpr char prefix[] = "cudaError 2:";
    for (std::size_t i = 0; i + 1 < sizeof prefix; ++i)
        if (w == nullptr || w[i] != prefix[i]) return false;
    return true;
#endif
}
// Registered once per program by the first translation unit that includes this header.
inline OomRuleRegistration const cccl_oom_rule{&is_cccl_oom};

template <class Backend>
typename Backend::stream_type to_backend_stream(::cuda::stream_ref s) noexcept {
    if constexpr (std::is_pointer<typename Backend::stream_type>::value) {
        return reinterpret_cast<typename Backend::stream_type>(s.get());
    } else {  // the simulator's streams are numbers: the stream's handle is its number,
        // and cudaStreamLegacy (1) is the default stream (0), as in CUDA
        auto n = reinterpret_cast<std::uintptr_t>(s.get());
        return static_cast<typename Backend::stream_type>(n == 1 ? 0 : n);
    }
}

// RMM's failure_callback_resource_adaptor calls its callback after each failure
// of a request and retries while the callback says so; it never says whether a
// retry succeeded, nor where one request ends and the next begins, and adaptors
// nest. So release_caches_and_retry (rmm.hpp) counts the retries it asks for on
// a thread, and only an oomguard resource ending a request on that thread -- with
// memory, or with an error that is no OOM -- starts the count again: at most
// three retries between two such ends, however the adaptors nest, and a
// request that ends in an OOM leaves the count to the next. Allocations made by
// a cache while it is released for a retry end nothing. The success path pays
// one load of a word written only when a retry is asked for.
inline std::atomic<int> threads_retrying{0};
struct RetryCount {
    int asked = 0;           // retries asked since an oomguard resource last ended a request here
    bool releasing = false;  // a release for a retry is running on this thread
    ~RetryCount() {
        if (asked != 0) threads_retrying.fetch_sub(1, std::memory_order_relaxed);
    }
};
inline RetryCount& retry_count() noexcept {
    static thread_local RetryCount count;
    return count;
}
inline void request_ended() noexcept {
    if (threads_retrying.load(std::memory_order_relaxed) == 0) return;
    RetryCount& c = retry_count();
    if (c.asked != 0 && !c.releasing) {
        c.asked = 0;
        threads_retrying.fetch_sub(1, std::memory_order_relaxed);
    }
}
// While a cache is released for a retry, on this thread.
class ReleasingForRetry {
public:
    ReleasingForRetry() noexcept : c_(retry_count()), was_(c_.releasing) { c_.releasing = true; }
    ReleasingForRetry(ReleasingForRetry const&) = delete;
    ReleasingForRetry& operator=(ReleasingForRetry const&) = delete;
    ~ReleasingForRetry() { c_.releasing = was_; }

private:
    RetryCount& c_;
    bool was_;
};
// Releases `registry` for a retry and returns the bytes it freed; what a cache
// threw that is no device OOM (a sticky error, say) is rethrown unchanged, and
// a cache that ran out of memory as it released counts as having freed nothing.
inline std::size_t release_for_retry(CacheRegistry& registry) {
    ReleaseReport r;
    {
        ReleasingForRetry releasing;
        r = registry.release_all();
    }
    r.rethrow_failure(&is_device_oom);
    return r.bytes();
}
}  // namespace detail

/// A cuda::mr resource that allocates through `budget` (which must outlive it):
/// synchronously through MemoryBudget::allocate, stream-ordered through
/// allocate_async on the backend's pool.
template <class Backend>
class BudgetResource {
public:
    static_assert(is_stream_ordered_v<Backend>, "oomguard: BudgetResource needs a stream-ordered backend "
                                                "(CudaRuntime, SimulatedDevices; see backend.hpp)");
    /// A resource allocating through `budget`, which must outlive it and its copies.
    explicit BudgetResource(MemoryBudget<Backend>& budget) noexcept : budget_(&budget) {}

    /// The budget every allocation goes through.
    MemoryBudget<Backend>& budget() const noexcept { return *budget_; }

#if OOMGUARD_CCCL_MR_STREAM_FIRST
    /// CCCL >= 3.1: `bytes` through the budget (cudaMalloc); throws out_of_memory when the cap or the
    /// device refuses, std::invalid_argument for an alignment over 256 or not a power of two.
    void* allocate_sync(std::size_t bytes, std::size_t alignment = detail::resource_alignment) {
        return sync_allocate(bytes, alignment);
    }
    /// CCCL >= 3.1: frees `p` of `bytes` and gives them back to the budget.
    void deallocate_sync(void* p, std::size_t bytes, std::size_t = detail::resource_alignment) noexcept {
        budget_->deallocate(p, bytes);
    }
    /// CCCL >= 3.1: `bytes` through the budget from the stream-ordered pool, ordered on `stream`;
    /// throws as allocate_sync does.
    void* allocate(::cuda::stream_ref stream, std::size_t bytes, std::size_t alignment = detail::resource_alignment) {
        return stream_allocate(stream, bytes, alignment);
    }
    /// CCCL >= 3.1: frees `p` ordered on `stream`; the budget counts the bytes back at once.
    void deallocate(::cuda::stream_ref stream, void* p, std::size_t bytes,
                    std::size_t = detail::resource_alignment) noexcept {
        budget_->deallocate_async(p, bytes, detail::to_backend_stream<Backend>(stream));
    }
#else
    /// CCCL 3.0 (CUDA 13.0): `bytes` through the budget (cudaMalloc); throws out_of_memory when the cap
    /// or the device refuses, std::invalid_argument for an alignment over 256 or not a power of two.
    void* allocate(std::size_t bytes, std::size_t alignment = detail::resource_alignment) {
        return sync_allocate(bytes, alignment);
    }
    /// CCCL 3.0: frees `p` of `bytes` and gives them back to the budget.
    void deallocate(void* p, std::size_t bytes, std::size_t = detail::resource_alignment) noexcept {
        budget_->deallocate(p, bytes);
    }
    /// CCCL 3.0: `bytes` through the budget from the stream-ordered pool, ordered on `stream`; throws
    /// as allocate does.
    void* allocate_async(std::size_t bytes, std::size_t alignment, ::cuda::stream_ref stream) {
        return stream_allocate(stream, bytes, alignment);
    }
    /// CCCL 3.0: frees `p` ordered on `stream`; the budget counts the bytes back at once.
    void deallocate_async(void* p, std::size_t bytes, std::size_t, ::cuda::stream_ref stream) noexcept {
        budget_->deallocate_async(p, bytes, detail::to_backend_stream<Backend>(stream));
    }
#endif

    /// Equal when both allocate through the same budget (memory from one may be freed by the other).
    bool operator==(BudgetResource const& o) const noexcept { return budget_ == o.budget_; }
    /// Not operator==.
    bool operator!=(BudgetResource const& o) const noexcept { return budget_ != o.budget_; }
    /// The memory is device memory: what CCCL's `resource_ref<device_accessible>` asks.
    friend constexpr void get_property(BudgetResource const&, ::cuda::mr::device_accessible) noexcept {}

private:
    void* sync_allocate(std::size_t bytes, std::size_t alignment) {
        detail::check_alignment(alignment, "BudgetResource");
        return ended([&] { return budget_->allocate(bytes); });
    }
    void* stream_allocate(::cuda::stream_ref stream, std::size_t bytes, std::size_t alignment) {
        detail::check_alignment(alignment, "BudgetResource");
        return ended([&] { return budget_->allocate_async(bytes, detail::to_backend_stream<Backend>(stream)); });
    }
    // Runs the allocation; on memory or an error that is no OOM, the request has
    // ended (see detail::request_ended); an OOM may be retried.
    template <class F>
    static void* ended(F&& allocate) {
        void* p = nullptr;
        try {
            p = allocate();
        } catch (out_of_memory const&) {
            throw;
        } catch (...) {
            detail::request_ended();
            throw;
        }
        detail::request_ended();
        return p;
    }

    MemoryBudget<Backend>* budget_;
};

/// The backend a BudgetAdaptor's budget counts against: it allocates nothing
/// itself (the upstream does), and knows the device only by the capacity it
/// is given (0: unknown -- only a byte cap can be resolved, and OOM messages
/// leave the device's figures out). Free is the capacity less what the budget holds.
class UpstreamAccounting {
public:
    /// The backend's name in messages and reports.
    static constexpr char const* backend_name = "upstream resource";
    /// A device of `capacity` bytes (0: unknown, so only a byte cap can be resolved).
    explicit UpstreamAccounting(std::size_t capacity = 0) noexcept : capacity_(capacity) {}
    /// Free memory is `capacity` less `held(budget)`: the adaptor points it at its budget.
    void watch(std::size_t (*held)(void const*), void const* budget) noexcept {
        held_ = held;
        budget_ = budget;
    }
    /// Never called (the upstream allocates): cudaErrorNotSupported.
    status allocate(void**, std::size_t, int) noexcept { return no_call(); }
    /// Never called (the upstream frees): cudaErrorNotSupported.
    status deallocate(void*, std::size_t, int) noexcept { return no_call(); }
    /// Total is the capacity, free the capacity less what the budget holds; cudaErrorNotSupported
    /// when the capacity is unknown.
    status memory_info(int, std::size_t* free, std::size_t* total) noexcept {
        if (capacity_ == 0) return no_call();
        std::size_t held = held_ != nullptr ? held_(budget_) : 0;
        *free = held < capacity_ ? capacity_ - held : 0;
        *total = capacity_;
        return status::success();
    }
    /// One device: the upstream's.
    status device_count(int* n) noexcept {
        *n = 1;
        return status::success();
    }
    /// Always device 0.
    status current_device(int* d) noexcept {
        *d = 0;
        return status::success();
    }
    /// Nothing to switch: succeeds.
    status set_device(int) noexcept { return status::success(); }
    /// Nothing to wait for here (the upstream orders its own work): succeeds.
    status synchronize(int) noexcept { return status::success(); }

private:
    static status no_call() noexcept { return {status_kind::other, 801, "cudaErrorNotSupported"}; }
    std::size_t capacity_;
    std::size_t (*held_)(void const*) = nullptr;
    void const* budget_ = nullptr;
};

/// A budget in front of any upstream cuda::mr resource (held by value: give a
/// resource_ref or a shared handle for one that must not be copied). Each
/// request takes `bytes` rounded up to `granularity` from the cap first -- one
/// CAS, no lock -- and a refusal is an out_of_memory naming the cap and what is
/// held. An upstream failure that is a device OOM (rmm::out_of_memory, a
/// cuda::cuda_error of status 2, CUDA's error names: is_device_oom) becomes an
/// out_of_memory with the budget's figures; one that is already oomguard's
/// passes as it is; any other exception -- a sticky CUDA error, a host
/// std::bad_alloc, rmm::bad_alloc -- passes through unchanged. Copies share the
/// budget; two adaptors are equal when they share it and their upstreams are equal.
/// A request of 0 bytes goes to the upstream and takes nothing from the cap.
template <class Upstream>
class BudgetAdaptor {
public:
    /// `cap` in bytes (Limit::bytes), or a fraction/headroom of `capacity`, which
    /// it then needs. `granularity` (a power of two): what the upstream takes for
    /// any request; 512 for CUDA's stream-ordered pool, whose blocks are that
    /// large, 256 for cudaMalloc.
    BudgetAdaptor(Upstream upstream, Limit cap, std::size_t capacity = 0, std::size_t granularity = 512)
        : upstream_(std::move(upstream)), granularity_(granularity) {
        if (granularity == 0 || (granularity & (granularity - 1)) != 0 || granularity > (std::size_t{1} << 30))
            detail::throw_invalid(detail::Message() << "oomguard: BudgetAdaptor: granularity " << granularity
                                                    << " is not a power of two up to 1 GiB (512 for CUDA's pool)");
        if (cap.type() != Limit::kind::bytes && cap.type() != Limit::kind::unlimited && capacity == 0)
            detail::throw_invalid("oomguard: BudgetAdaptor: a fraction or headroom cap needs the device's "
                                  "capacity (the third argument); or give Limit::bytes");
        state_ = std::make_shared<State>(cap, capacity);
    }

    /// The budget: used(), peak(), denials(), for a Report, for measure_with.
    MemoryBudget<UpstreamAccounting>& budget() const noexcept { return state_->budget; }
    /// The resource the memory comes from.
    Upstream& upstream() noexcept { return upstream_; }
    /// What the budget rounds each request up to (512 by default: the async pool's block).
    std::size_t granularity() const noexcept { return granularity_; }

    /// What the budget counts for a request of `bytes`.
    std::size_t counted(std::size_t bytes) const noexcept {
        return (bytes + granularity_ - 1) / granularity_ * granularity_;
    }

    /// "Release, then retry" for every request through this adaptor and its
    /// copies: when the upstream runs out of memory, the caches of `registry` are
    /// released and the upstream asked again -- while a release frees something,
    /// and at most `max_retries` times for one request (0 turns it off). Each
    /// refusal of the upstream counts in budget().device_ooms(); what a cache
    /// throws that is no device OOM (a sticky error, say) reaches the caller
    /// unchanged, with the cap's bytes given back, while a cache that runs out of
    /// memory as it releases counts as having freed nothing. Unlike a callback
    /// of RMM's failure_callback_resource_adaptor, which cannot tell one
    /// request's retries from the next request's, the bound is per request.
    /// Throws std::invalid_argument for `max_retries` outside 0..64.
    void release_caches_on_oom(CacheRegistry& registry, int max_retries = 2) {
        if (max_retries < 0 || max_retries > 64)
            detail::throw_invalid(detail::Message() << "oomguard: BudgetAdaptor::release_caches_on_oom: max_retries "
                                                    << max_retries << " is outside 0..64");
        state_->max_retries.store(max_retries, std::memory_order_relaxed);
        state_->registry.store(&registry, std::memory_order_release);
    }

#if OOMGUARD_CCCL_MR_STREAM_FIRST
    /// CCCL >= 3.1: takes the cap, then asks the upstream; throws out_of_memory when the cap refuses or
    /// the upstream runs out of memory (after the cache releases of release_caches_on_oom), and passes
    /// every other exception through with the cap's bytes given back.
    void* allocate_sync(std::size_t bytes, std::size_t alignment = detail::resource_alignment) {
        return guarded(bytes, alignment, [&] { return upstream_.allocate_sync(bytes, alignment); });
    }
    /// CCCL >= 3.1: the upstream frees `p`; the budget counts the bytes back.
    void deallocate_sync(void* p, std::size_t bytes, std::size_t alignment = detail::resource_alignment) noexcept {
        upstream_.deallocate_sync(p, bytes, alignment);
        state_->budget.release(counted(bytes));
    }
    /// CCCL >= 3.1: as allocate_sync, from the upstream's stream-ordered allocate on `stream`.
    void* allocate(::cuda::stream_ref stream, std::size_t bytes, std::size_t alignment = detail::resource_alignment) {
        return guarded(bytes, alignment, [&] { return upstream_.allocate(stream, bytes, alignment); });
    }
    /// CCCL >= 3.1: the upstream frees `p` on `stream`; the budget counts the bytes back at once.
    void deallocate(::cuda::stream_ref stream, void* p, std::size_t bytes,
                    std::size_t alignment = detail::resource_alignment) noexcept {
        upstream_.deallocate(stream, p, bytes, alignment);
        state_->budget.release(counted(bytes));
    }
#else
    /// CCCL 3.0: takes the cap, then asks the upstream; throws out_of_memory when the cap refuses or
    /// the upstream runs out of memory (after the cache releases of release_caches_on_oom), and passes
    /// every other exception through with the cap's bytes given back.
    void* allocate(std::size_t bytes, std::size_t alignment = detail::resource_alignment) {
        return guarded(bytes, alignment, [&] { return upstream_.allocate(bytes, alignment); });
    }
    /// CCCL 3.0: the upstream frees `p`; the budget counts the bytes back.
    void deallocate(void* p, std::size_t bytes, std::size_t alignment = detail::resource_alignment) noexcept {
        upstream_.deallocate(p, bytes, alignment);
        state_->budget.release(counted(bytes));
    }
    /// CCCL 3.0: as allocate, from the upstream's allocate_async on `stream`.
    void* allocate_async(std::size_t bytes, std::size_t alignment, ::cuda::stream_ref stream) {
        return guarded(bytes, alignment, [&] { return upstream_.allocate_async(bytes, alignment, stream); });
    }
    /// CCCL 3.0: the upstream frees `p` on `stream`; the budget counts the bytes back at once.
    void deallocate_async(void* p, std::size_t bytes, std::size_t alignment, ::cuda::stream_ref stream) noexcept {
        upstream_.deallocate_async(p, bytes, alignment, stream);
        state_->budget.release(counted(bytes));
    }
#endif

    /// Equal when they share the budget (copies of one adaptor) and their upstreams are equal.
    bool operator==(BudgetAdaptor const& o) const noexcept {
        return state_ == o.state_ && upstream_ == o.upstream_;
    }
    /// Not operator==.
    bool operator!=(BudgetAdaptor const& o) const noexcept { return !(*this == o); }
    /// The memory is device memory: what CCCL's `resource_ref<device_accessible>` asks.
    friend constexpr void get_property(BudgetAdaptor const&, ::cuda::mr::device_accessible) noexcept {}

private:
    struct State {
        UpstreamAccounting accounting;
        MemoryBudget<UpstreamAccounting> budget;
        std::atomic<CacheRegistry*> registry{nullptr};  // release_caches_on_oom
        std::atomic<int> max_retries{0};
        State(Limit cap, std::size_t capacity) : accounting(capacity), budget(accounting, 0, cap) {
            accounting.watch([](void const* b) { return static_cast<MemoryBudget<UpstreamAccounting> const*>(b)->used(); },
                             &budget);
        }
    };

    template <class F>
    void* guarded(std::size_t bytes, std::size_t alignment, F&& upstream_allocate) {
        detail::check_alignment(alignment, "BudgetAdaptor");
        MemoryBudget<UpstreamAccounting>& b = state_->budget;
        if (bytes == 0) return upstream_allocate();  // takes nothing: the upstream's answer, uncounted
        if (bytes > MemoryBudget<UpstreamAccounting>::max_limit / granularity_ * granularity_) {  // rounds past any cap
            b.note_denial();
            throw out_of_memory(b.denial(bytes, oom_source::budget, status{}));
        }
        std::size_t const c = counted(bytes);
        std::size_t held = 0;
        if (!b.try_account(c, held)) throw out_of_memory(b.denial(bytes, oom_source::budget, status{}));
        for (int attempt = 0;; ++attempt) {
            std::exception_ptr oom;  // the upstream's device OOM, as it was thrown
            bool ours = false;       // already oomguard's out_of_memory
            try {
                void* p = upstream_allocate();
                b.raise_peak(held);
                detail::request_ended();
                return p;
            } catch (out_of_memory const&) {  // oomguard's own, from a budget upstream
                oom = std::current_exception();
                ours = true;
            } catch (std::exception const& e) {
                if (!is_device_oom(e)) {  // a sticky error, a host bad_alloc: not ours to type
                    b.cancel_account(c);
                    detail::request_ended();
                    throw;
                }
                oom = std::current_exception();
            } catch (...) {
                b.cancel_account(c);
                detail::request_ended();
                throw;
            }
            // Out of the handler: a release that throws leaves no bytes held.
            b.note_device_oom();
            bool again = false;
            try {
                again = released_for_retry(attempt);
            } catch (...) {
                b.cancel_account(c);
                detail::request_ended();
                throw;
            }
            if (again) continue;
            b.cancel_account(c);
            if (ours) std::rethrow_exception(oom);
            try {
                std::rethrow_exception(oom);
            } catch (std::exception const& e) {
                oom_info i = b.denial(bytes, oom_source::device, status{status_kind::out_of_memory, 2,
                                                                       "cudaErrorMemoryAllocation"});
                detail::Message m = detail::describe(i);
                m << " The upstream resource said: " << e.what();
                throw out_of_memory(i, m);
            }
        }
    }

    // After the upstream's `attempt`-th OOM of one request: releases the caches
    // and says whether to ask again (a registry is set, retries are left, and
    // the release freed something); rethrows what a cache that failed threw.
    bool released_for_retry(int attempt) {
        CacheRegistry* reg = state_->registry.load(std::memory_order_acquire);
        if (reg == nullptr || attempt >= state_->max_retries.load(std::memory_order_relaxed)) return false;
        return detail::release_for_retry(*reg) > 0;
    }

    Upstream upstream_;
    std::size_t granularity_;
    std::shared_ptr<State> state_;
};

}  // namespace oomguard
