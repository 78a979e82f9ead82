// <oomguard/resource.hpp> against the CCCL it is compiled with: the toolkit's
// CCCL 3.0 here, RMM's CCCL 3.5 in the rmm leg. The concept checks, then the
// resource and the adaptor over stream-ordered simulated devices.
#include <oomguard/resource.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

using namespace oomguard;
using Sim = SimulatedDevices;
constexpr std::size_t KiB = 1024;

#if OOMGUARD_CCCL_MR_STREAM_FIRST
static_assert(cuda::mr::synchronous_resource_with<BudgetResource<Sim>, cuda::mr::device_accessible>, "sync");
static_assert(cuda::mr::resource_with<BudgetResource<Sim>, cuda::mr::device_accessible>, "stream-ordered");
static_assert(cuda::mr::resource_with<BudgetAdaptor<BudgetResource<Sim>>, cuda::mr::device_accessible>, "adaptor");
#else
static_assert(cuda::mr::resource_with<BudgetResource<Sim>, cuda::mr::device_accessible>, "sync");
static_assert(cuda::mr::async_resource_with<BudgetResource<Sim>, cuda::mr::device_accessible>, "stream-ordered");
static_assert(cuda::mr::async_resource_with<BudgetAdaptor<BudgetResource<Sim>>, cuda::mr::device_accessible>,
              "adaptor");
#endif
static_assert(cuda::has_property<BudgetResource<CudaRuntime>, cuda::mr::device_accessible>, "over the GPU too");
static_assert(!(cuda::has_property<BudgetResource<Sim>, cuda::mr::host_accessible>), "device memory only");

// A named namespace: clang would call the friends of an unnamed one's types unused.
namespace resource_test {
cuda::stream_ref stream(std::uintptr_t n) { return cuda::stream_ref(reinterpret_cast<cudaStream_t>(n)); }

// The two spellings behind one call, so each test reads the same on either CCCL.
template <class R>
void* sync_alloc(R& r, std::size_t bytes, std::size_t alignment = 256) {
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    return r.allocate_sync(bytes, alignment);
#else
    return r.allocate(bytes, alignment);
#endif
}
template <class R>
void sync_free(R& r, void* p, std::size_t bytes) {
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    r.deallocate_sync(p, bytes, 256);
#else
    r.deallocate(p, bytes, 256);
#endif
}
template <class R>
void* stream_alloc(R& r, cuda::stream_ref s, std::size_t bytes) {
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    return r.allocate(s, bytes, 256);
#else
    return r.allocate_async(bytes, 256, s);
#endif
}
template <class R>
void stream_free(R& r, cuda::stream_ref s, void* p, std::size_t bytes) {
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    r.deallocate(s, p, bytes, 256);
#else
    r.deallocate_async(p, bytes, 256, s);
#endif
}

// An upstream whose failures the test picks.
struct Flaky {
    BudgetResource<Sim> inner;
    int* mode;  // 0: pass, 1: a host std::bad_alloc, 2: a logic_error, 3: cuda::cuda_error status 2,
                // 4: a sticky cuda::cuda_error, 5: oomguard's own out_of_memory (a budget upstream)
    void* go(std::size_t bytes) {
        if (*mode == 1) throw std::bad_alloc();
        if (*mode == 2) throw std::logic_error("upstream bug");
        if (*mode == 3) throw cuda::cuda_error(cudaErrorMemoryAllocation, "pool exhausted");
        if (*mode == 4) throw cuda::cuda_error(cudaErrorIllegalAddress, "an illegal address");
        if (*mode == 5) {
            oom_info i;
            i.requested = bytes;
            throw out_of_memory(i);
        }
        return sync_alloc(inner, bytes);
    }
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    void* allocate_sync(std::size_t b, std::size_t) { return go(b); }
    void deallocate_sync(void* p, std::size_t b, std::size_t) noexcept { sync_free(inner, p, b); }
    void* allocate(cuda::stream_ref, std::size_t b, std::size_t) { return go(b); }
    void deallocate(cuda::stream_ref, void* p, std::size_t b, std::size_t) noexcept { sync_free(inner, p, b); }
#else
    void* allocate(std::size_t b, std::size_t) { return go(b); }
    void deallocate(void* p, std::size_t b, std::size_t) noexcept { sync_free(inner, p, b); }
    void* allocate_async(std::size_t b, std::size_t, cuda::stream_ref) { return go(b); }
    void deallocate_async(void* p, std::size_t b, std::size_t, cuda::stream_ref) noexcept { sync_free(inner, p, b); }
#endif
    bool operator==(Flaky const& o) const noexcept { return inner == o.inner; }
    bool operator!=(Flaky const& o) const noexcept { return inner != o.inner; }
    friend constexpr void get_property(Flaky const&, cuda::mr::device_accessible) noexcept {}
};
}  // namespace resource_test
using namespace resource_test;

TEST_CASE("BudgetResource: the budget's accounting and typed errors behind cuda::mr, both ways of allocating") {
    Sim sim(1, 64 * KiB);
    MemoryBudget<Sim> budget(sim, 0, Limit::bytes(32 * KiB));
    BudgetResource<Sim> res(budget), copy = res;
    CHECK(res == copy);
    MemoryBudget<Sim> other(sim, 0);
    CHECK(res != BudgetResource<Sim>(other));

    void* a = sync_alloc(res, 1000);
    CHECK(budget.used() == 1000);  // cudaMalloc's path counts the bytes asked
    void* b = stream_alloc(res, stream(5), 1000);
    CHECK(budget.used() == 1000 + 1024);  // the pool's: 512-byte blocks
    CHECK(reinterpret_cast<std::uintptr_t>(b) % 256 == 0);
    try {
        (void)stream_alloc(res, stream(5), 40 * KiB);
        FAIL("expected out_of_memory");
    } catch (std::bad_alloc const& e) {  // what RMM-style code catches
        auto const* oom = dynamic_cast<out_of_memory const*>(&e);
        REQUIRE(oom != nullptr);
        CHECK(oom->info().source == oom_source::budget);
    }
    CHECK_THROWS_WITH_AS(sync_alloc(res, 64, 512), doctest::Contains("alignment 512 is not a power of two up to 256"),
                         std::invalid_argument);
    CHECK_THROWS_AS(sync_alloc(res, 64, 3), std::invalid_argument);
    stream_free(res, stream(5), b, 1000);
    sync_free(res, a, 1000);
    CHECK(budget.used() == 0);
    CHECK(sim.pending_bytes(0, 5) == 1024);  // freed on its stream, pending until it synchronizes

    // Through a type-erased reference, as CCCL and RMM code hold resources.
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    cuda::mr::resource_ref<cuda::mr::device_accessible> ref{res};
    void* c = ref.allocate(stream(6), 2048, 256);
    ref.deallocate(stream(6), c, 2048, 256);
#else
    cuda::mr::async_resource_ref<cuda::mr::device_accessible> ref{res};
    void* c = ref.allocate_async(2048, 256, stream(6));
    ref.deallocate_async(c, 2048, 256, stream(6));
#endif
    CHECK(budget.used() == 0);
    CHECK(budget.allocations() == 3);
    REQUIRE(sim.synchronize(0).ok());
    CHECK(sim.live_bytes() == 0);
}

TEST_CASE("BudgetResource over pending frees: the device OOM, then a synchronize, then it fits") {
    Sim sim(1, 8 * KiB);
    MemoryBudget<Sim> budget(sim, 0);
    BudgetResource<Sim> res(budget);
    void* a = stream_alloc(res, stream(1), 6 * KiB);  // cudaStreamLegacy: the simulator's default stream, 0
    stream_free(res, stream(1), a, 6 * KiB);
    CHECK(sim.pending_bytes(0, 0) == 6 * KiB);
    try {
        (void)stream_alloc(res, stream(4), 4 * KiB);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::device);
    }
    void* c = stream_alloc(res, stream(0), 4 * KiB);  // the same stream as cudaStreamLegacy: reuses it at once
    stream_free(res, stream(0), c, 4 * KiB);
    REQUIRE(sim.synchronize_stream(0, 0).ok());
    void* b = stream_alloc(res, stream(4), 4 * KiB);
    stream_free(res, stream(4), b, 4 * KiB);
    REQUIRE(sim.synchronize(0).ok());
    CHECK(sim.live_bytes() == 0);
}

TEST_CASE("BudgetAdaptor: a cap in front of any upstream; the upstream's OOMs typed, its other errors untouched") {
    Sim sim(1, 1024 * KiB);
    MemoryBudget<Sim> unlimited(sim, 0);
    int mode = 0;
    BudgetAdaptor<Flaky> capped(Flaky{BudgetResource<Sim>(unlimited), &mode}, Limit::bytes(8 * KiB), 64 * KiB,
                                /*granularity=*/256);
    BudgetAdaptor<Flaky> same = capped;
    CHECK(capped == same);
    CHECK(BudgetAdaptor<Flaky>(Flaky{BudgetResource<Sim>(unlimited), &mode}, Limit::bytes(1)).granularity() == 512);
    void* a = sync_alloc(capped, 1);  // counted as 256
    CHECK(capped.budget().used() == 256);
    void* b = stream_alloc(same, stream(3), 7 * KiB + 700);  // 7936 counted: exactly at the cap, through a copy
    CHECK(capped.budget().used() == 8 * KiB);
    CHECK(capped.budget().allocations() == 2);
    try {
        (void)sync_alloc(capped, 1);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::budget);
        CHECK(std::string(e.what()).find("held under this budget of 8.00 KiB") != std::string::npos);
        CHECK(e.info().free == 56 * KiB);  // the capacity given, less what the budget holds
    }
    CHECK(capped.budget().denials() == 1);
    stream_free(same, stream(3), b, 7 * KiB + 700);
    CHECK(capped.budget().peak() == 8 * KiB);

    mode = 3;  // the upstream is out of memory (CCCL's cuda_error, status 2): typed, the cap's bytes back
    try {
        (void)stream_alloc(capped, stream(3), 4096);
        FAIL("expected out_of_memory");
    } catch (out_of_memory const& e) {
        CHECK(e.info().source == oom_source::device);
        std::string w = e.what();
        CHECK(w.find("The upstream resource said: ") != std::string::npos);
        CHECK(w.find("pool exhausted") != std::string::npos);
    }
    mode = 5;  // oomguard's own, from a budget behind: passes as it is
    CHECK_THROWS_AS(sync_alloc(capped, 4096), out_of_memory);
    CHECK(capped.budget().device_ooms() == 2);
    mode = 1;  // a host std::bad_alloc is no device OOM: passes through unchanged
    try {
        (void)sync_alloc(capped, 4096);
        FAIL("expected std::bad_alloc");
    } catch (out_of_memory const&) {
        FAIL("a host bad_alloc was typed as a device OOM");
    } catch (std::bad_alloc const&) {
    }
    mode = 4;  // a sticky CUDA error: unchanged, never an OOM to retry
    CHECK_THROWS_AS(sync_alloc(capped, 4096), cuda::cuda_error);
    mode = 2;  // not an OOM: passes through as it was thrown
    CHECK_THROWS_WITH_AS(sync_alloc(capped, 4096), "upstream bug", std::logic_error);
    CHECK(capped.budget().device_ooms() == 2);
    CHECK(capped.budget().used() == 256);
    CHECK(capped.budget().allocations() == 2);  // the failed requests left no count behind
    CHECK(capped.budget().peak() == 8 * KiB);   // nor a peak: they were never held
    // A request no cap could hold is a counted refusal, not a wrap.
    std::size_t const denials = capped.budget().denials();
    CHECK_THROWS_AS(sync_alloc(capped, std::numeric_limits<std::size_t>::max() - 100), out_of_memory);
    CHECK(capped.budget().denials() == denials + 1);
    mode = 0;
    sync_free(capped, a, 1);
    CHECK(capped.budget().used() == 0);
    CHECK(unlimited.used() == 0);
    // A fraction needs the capacity it is a fraction of; the granularity is a power of two.
    CHECK_THROWS_WITH_AS(BudgetAdaptor<Flaky>(Flaky{BudgetResource<Sim>(unlimited), &mode}, Limit::fraction(0.5)),
                         doctest::Contains("needs the device's capacity"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(BudgetAdaptor<Flaky>(Flaky{BudgetResource<Sim>(unlimited), &mode}, Limit::bytes(1), 0, 384),
                         doctest::Contains("granularity 384 is not a power of two"), std::invalid_argument);
    BudgetAdaptor<Flaky> half(Flaky{BudgetResource<Sim>(unlimited), &mode}, Limit::fraction(0.5), 64 * KiB);
    CHECK(half.budget().limit() == 32 * KiB);
}

namespace resource_test {
// An upstream that hands out one address and counts its calls.
struct Counting {
    int* calls;
    void* go() {
        ++*calls;
        static unsigned char slot[512];
        return slot;
    }
#if OOMGUARD_CCCL_MR_STREAM_FIRST
    void* allocate_sync(std::size_t, std::size_t) { return go(); }
    void deallocate_sync(void*, std::size_t, std::size_t) noexcept {}
    void* allocate(cuda::stream_ref, std::size_t, std::size_t) { return go(); }
    void deallocate(cuda::stream_ref, void*, std::size_t, std::size_t) noexcept {}
#else
    void* allocate(std::size_t, std::size_t) { return go(); }
    void deallocate(void*, std::size_t, std::size_t) noexcept {}
    void* allocate_async(std::size_t, std::size_t, cuda::stream_ref) { return go(); }
    void deallocate_async(void*, std::size_t, std::size_t, cuda::stream_ref) noexcept {}
#endif
    bool operator==(Counting const& o) const noexcept { return calls == o.calls; }
    bool operator!=(Counting const& o) const noexcept { return calls != o.calls; }
    friend constexpr void get_property(Counting const&, cuda::mr::device_accessible) noexcept {}
};
}  // namespace resource_test

TEST_CASE("BudgetAdaptor at the edges: the largest request a budget counts, and zero bytes") {
    using Accounted = MemoryBudget<UpstreamAccounting>;
    int calls = 0;
    std::size_t const gib = std::size_t{1} << 30;
    BudgetAdaptor<Counting> a(Counting{&calls}, Limit::unlimited(), 0, gib);
    std::size_t const top = Accounted::max_limit / gib * gib;  // 2^48 - 1 GiB: rounds to itself
    void* p = stream_alloc(a, stream(1), top);
    CHECK(a.budget().used() == top);
    stream_free(a, stream(1), p, top);
    CHECK_THROWS_AS(stream_alloc(a, stream(1), top + 1), out_of_memory);  // rounds to 2^48: no budget counts it
    CHECK(calls == 1);
    CHECK(a.budget().denials() == 1);

    // Zero bytes take nothing from the cap, even one already below what is held:
    // the upstream answers, as a resource without a budget would.
    BudgetAdaptor<Counting> small(Counting{&calls}, Limit::bytes(4 * KiB), 0, 512);
    void* held = sync_alloc(small, 4 * KiB);
    small.budget().set_limit(Limit::bytes(KiB));  // lowered below what is held
    void* none = sync_alloc(small, 0);
    void* none_too = stream_alloc(small, stream(2), 0);
    CHECK(calls == 4);
    CHECK(small.budget().allocations() == 1);
    CHECK(small.budget().denials() == 0);
    sync_free(small, none, 0);
    stream_free(small, stream(2), none_too, 0);
    sync_free(small, held, 4 * KiB);
    CHECK(small.budget().used() == 0);
    CHECK(small.budget().accounting_errors() == 0);
}

namespace resource_test {
// A cache that always has something to give back (one that others refill), counting its releases.
struct Bottomless {
    int* releases;
    std::size_t give = KiB;
    std::size_t releasable_bytes() const { return give; }
    std::size_t release() {
        ++*releases;
        return give;
    }
};
}  // namespace resource_test

TEST_CASE("BudgetAdaptor's release, then retry: every OOM of a run recovered, bounded per request") {
    Sim sim(1, 16 * KiB);
    MemoryBudget<Sim> inner(sim, 0);
    BudgetAdaptor<BudgetResource<Sim>> a(BudgetResource<Sim>{inner}, Limit::bytes(64 * KiB));
    CacheRegistry reg;
    SimulatedPendingFrees pending(sim, 0);
    auto r = reg.add("stream-ordered pool", 0, pending);
    BudgetAdaptor<BudgetResource<Sim>> copy = a;
    copy.release_caches_on_oom(reg, 1);  // copies share it
    for (int step = 0; step < 6; ++step) {  // the same request, step after step: each one recovered
        CAPTURE(step);
        void* x = stream_alloc(a, stream(1), 12 * KiB);
        stream_free(a, stream(1), x, 12 * KiB);  // pending on stream 1
        void* y = stream_alloc(a, stream(2), 12 * KiB);  // the pool's OOM, the release synchronizes, the retry fits
        stream_free(a, stream(2), y, 12 * KiB);
        REQUIRE(sim.synchronize(0).ok());
    }
    CHECK(a.budget().device_ooms() == 6);
    CHECK(a.budget().used() == 0);
    CHECK(inner.used() == 0);
    // Nothing pending: the release frees nothing, so no retry; the typed OOM reaches the caller.
    void* big = stream_alloc(a, stream(1), 12 * KiB);
    CHECK_THROWS_AS(stream_alloc(a, stream(2), 12 * KiB), out_of_memory);
    CHECK(a.budget().device_ooms() == 7);
    CHECK(a.budget().used() == 12 * KiB);
    stream_free(a, stream(1), big, 12 * KiB);

    // A cache that is never empty: at most max_retries releases for one request, then the typed OOM.
    int mode = 3, releases = 0;
    Bottomless bottomless{&releases};
    CacheRegistry refilled;
    auto r2 = refilled.add("refilled", 0, bottomless);
    MemoryBudget<Sim> plenty(sim, 0);
    BudgetAdaptor<Flaky> flaky(Flaky{BudgetResource<Sim>(plenty), &mode}, Limit::bytes(64 * KiB), 0, 256);
    flaky.release_caches_on_oom(refilled, 3);
    CHECK_THROWS_AS(stream_alloc(flaky, stream(1), 4 * KiB), out_of_memory);
    CHECK(releases == 3);
    CHECK(flaky.budget().device_ooms() == 4);  // each refusal of the upstream
    CHECK(flaky.budget().used() == 0);
    mode = 1;  // a host bad_alloc is no device OOM: nothing released, nothing retried
    CHECK_THROWS_AS(stream_alloc(flaky, stream(1), 4 * KiB), std::bad_alloc);
    mode = 4;  // nor a sticky CUDA error
    CHECK_THROWS_AS(stream_alloc(flaky, stream(1), 4 * KiB), cuda::cuda_error);
    CHECK(releases == 3);
    mode = 0;
    void* fine = sync_alloc(flaky, 4 * KiB);
    CHECK(releases == 3);  // a success releases nothing
    sync_free(flaky, fine, 4 * KiB);
    flaky.release_caches_on_oom(refilled, 0);  // off
    mode = 3;
    CHECK_THROWS_AS(stream_alloc(flaky, stream(1), 4 * KiB), out_of_memory);
    CHECK(releases == 3);
    CHECK(flaky.budget().used() == 0);
    // A cache that fails to release: what it threw reaches the caller unchanged
    // (a sticky error is no OOM to shrink for), and the cap's bytes come back.
    struct Poisoned {
        bool sticky;
        std::size_t releasable_bytes() const { return KiB; }
        std::size_t release() {
            if (sticky) throw cuda::cuda_error(cudaErrorIllegalAddress, "the context is gone");
            throw std::runtime_error("the cache's own bug");
        }
    } poisoned{true};
    CacheRegistry broken;
    auto r3 = broken.add("poisoned", 0, poisoned);
    flaky.release_caches_on_oom(broken, 2);
    std::size_t const ooms = flaky.budget().device_ooms();
    CHECK_THROWS_AS(stream_alloc(flaky, stream(1), 4 * KiB), cuda::cuda_error);
    poisoned.sticky = false;
    CHECK_THROWS_WITH_AS(stream_alloc(flaky, stream(1), 4 * KiB), "the cache's own bug", std::runtime_error);
    CHECK(flaky.budget().device_ooms() == ooms + 2);  // the upstream's refusals, once each
    CHECK(flaky.budget().used() == 0);
    CHECK(flaky.budget().allocations() == 1);  // the one success above
    CHECK(flaky.budget().accounting_errors() == 0);
    CHECK_THROWS_WITH_AS(flaky.release_caches_on_oom(refilled, -1), doctest::Contains("max_retries -1 is outside 0..64"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(flaky.release_caches_on_oom(refilled, 65), doctest::Contains("max_retries 65"),
                         std::invalid_argument);
}

TEST_CASE("CCCL's cuda::cuda_error is a device OOM only with cudaErrorMemoryAllocation") {
    CHECK(is_device_oom(cuda::cuda_error(cudaErrorMemoryAllocation, "out of memory")));
    CHECK_FALSE(is_device_oom(cuda::cuda_error(cudaErrorIllegalAddress, "an illegal address")));
    CHECK_FALSE(is_device_oom(cuda::cuda_error(cudaErrorInvalidValue, "invalid value: cudaError 2: not really")));
}
