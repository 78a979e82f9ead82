// The cost one adaptor adds to a stream-ordered allocate+free, side by side in
// one run, over the same upstream: oomguard's BudgetAdaptor (a
// MemoryBudget: one compare-and-swap in, one fetch-sub out), RMM's
// limiting_resource_adaptor, and RMM's statistics_resource_adaptor (a lock).
// The upstream shares nothing between threads and does no work (each thread
// gets its own address back), so what is measured is the adaptor. RMM's
// adaptors live in librmm.so and hold their upstream type-erased (an indirect
// call each way); BudgetAdaptor is a header template that inlines a concrete
// upstream, so it runs both ways: over the upstream itself, and over the same
// upstream type-erased as RMM holds it. One and two threads. Built with RMM by the rmm leg (needs no GPU); scripts/bench-rmm runs it.
#include <oomguard/resource.hpp>

#include <rmm/mr/limiting_resource_adaptor.hpp>
#include <rmm/mr/statistics_resource_adaptor.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>

namespace bench {  // named: clang calls the friends of an unnamed namespace's types unused

// A CCCL resource that does no work and shares nothing between threads.
struct NullUpstream {
    static void* slot() noexcept {
        alignas(256) thread_local unsigned char s[256];
        return s;
    }
    void* allocate_sync(std::size_t, std::size_t) { return slot(); }
    void deallocate_sync(void*, std::size_t, std::size_t) noexcept {}
    void* allocate(cuda::stream_ref, std::size_t, std::size_t) { return slot(); }
    void deallocate(cuda::stream_ref, void*, std::size_t, std::size_t) noexcept {}
    bool operator==(NullUpstream const&) const noexcept { return true; }
    bool operator!=(NullUpstream const&) const noexcept { return false; }
    friend constexpr void get_property(NullUpstream const&, cuda::mr::device_accessible) noexcept {}
};

cuda::stream_ref stream() { return cuda::stream_ref(reinterpret_cast<cudaStream_t>(std::uintptr_t{7})); }

// What a thread of a real program does: it holds a model's memory throughout (1
// GiB), keeps eight blocks of mixed, odd sizes alive, and each iteration frees
// the oldest and allocates the next -- one free and one allocate, with the
// budget's count never at zero. The same sequence for every adaptor.
constexpr std::size_t kSizes[8] = {4096, 1000, 65543, 512, 3u << 20, 4096, 200001, 256};

template <class R>
void churn(benchmark::State& state, R& r) {
    void* model = r.allocate(stream(), std::size_t{1} << 30, 256);
    struct Block {
        void* p = nullptr;
        std::size_t n = 0;
    };
    Block live[8];
    std::size_t i = 0;
    for (auto _ : state) {
        Block& b = live[i % 8];
        if (b.p != nullptr) r.deallocate(stream(), b.p, b.n, 256);
        b.n = kSizes[i % 8];
        // DoNotOptimize on a local: GCC 12 at -O3, given the block's member
        // itself (an in-out "+m,r" operand), dropped every free of the ring.
        void* p = r.allocate(stream(), b.n, 256);
        benchmark::DoNotOptimize(p);
        b.p = p;
        ++i;
    }
    for (Block& b : live)
        if (b.p != nullptr) r.deallocate(stream(), b.p, b.n, 256);
    r.deallocate(stream(), model, std::size_t{1} << 30, 256);
}

void bare_upstream(benchmark::State& state) {
    static NullUpstream up;
    churn(state, up);
}
void oomguard_budget_adaptor(benchmark::State& state) {
    static oomguard::BudgetAdaptor<NullUpstream> a(NullUpstream{}, oomguard::Limit::bytes(std::size_t{1} << 40));
    churn(state, a);
}
void oomguard_budget_adaptor_type_erased(benchmark::State& state) {
    using Erased = cuda::mr::any_resource<cuda::mr::device_accessible>;
    static oomguard::BudgetAdaptor<Erased> a(Erased(NullUpstream{}), oomguard::Limit::bytes(std::size_t{1} << 40));
    churn(state, a);
}
void rmm_limiting_adaptor(benchmark::State& state) {
    static rmm::mr::limiting_resource_adaptor a(NullUpstream{}, std::size_t{1} << 40);
    churn(state, a);
}
void rmm_statistics_adaptor(benchmark::State& state) {
    static rmm::mr::statistics_resource_adaptor a(NullUpstream{});
    churn(state, a);
}

}  // namespace bench
using namespace bench;

BENCHMARK(bare_upstream)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(oomguard_budget_adaptor)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(oomguard_budget_adaptor_type_erased)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(rmm_limiting_adaptor)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(rmm_statistics_adaptor)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK_MAIN();
