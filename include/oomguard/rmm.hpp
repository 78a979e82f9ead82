// oomguard in an RMM program (RAPIDS RMM >= 26.06, whose resources are CCCL
// cuda::mr resources). Opt-in. With this header:
// - rmm::out_of_memory is a device OOM by its type (rmm::bad_alloc alone is
//   not: RMM throws it for a failed host allocation too);
// - <oomguard/resource.hpp>'s BudgetResource and BudgetAdaptor plug into
//   RMM: rmm::mr::set_current_device_resource(adaptor), RMM's adaptors over
//   them, and a failure callback that releases oomguard's caches
//   (release_caches_and_retry) for rmm::mr::failure_callback_resource_adaptor.
#pragma once

#include <oomguard/cache_registry.hpp>
#include <oomguard/classify.hpp>
#include <oomguard/resource.hpp>

#include <rmm/error.hpp>

#include <cstddef>
#include <exception>

namespace oomguard {

/// True when `e` is an rmm::out_of_memory.
inline bool is_rmm_oom(std::exception const& e) noexcept {
    return dynamic_cast<rmm::out_of_memory const*>(&e) != nullptr;
}

namespace detail {
inline OomRuleRegistration const rmm_oom_rule{&is_rmm_oom};
}  // namespace detail

/// A callback for rmm::mr::failure_callback_resource_adaptor: on a failed
/// allocation it releases every cache of the CacheRegistry passed as `arg`
/// (nullptr: CacheRegistry::global()) and asks for a retry when that freed
/// something -- RMM's "release, then retry", with oomguard's caches. Key the
/// adaptor on oomguard's out_of_memory, which BudgetResource and BudgetAdaptor
/// throw for a device OOM and a refusal of the cap alike, so that a host
/// std::bad_alloc or a sticky error (rmm::bad_alloc) is never retried:
///   rmm::mr::failure_callback_resource_adaptor<oomguard::out_of_memory> mr(capped, oomguard::release_caches_and_retry, nullptr);
/// RMM never tells a callback whether its retry succeeded, nor where a request
/// ends, so the bound is per thread: at most `max_retries` (3) retries between
/// two requests that an oomguard resource (BudgetResource, BudgetAdaptor) ends
/// on the thread with memory or with an error that is no OOM. Each request
/// through an oomguard resource that succeeds therefore leaves the next its
/// own three; nested failure adaptors share them; a request that ends in an OOM
/// leaves what is left of them to the next, and over a resource that is not
/// oomguard's the count never starts again. What a cache throws that is no
/// device OOM (a sticky error, say) reaches the caller unchanged; a cache that
/// runs out of memory as it releases counts as having freed nothing.
inline bool release_caches_and_retry(std::size_t, void* arg) {
    constexpr int max_retries = 3;
    detail::RetryCount& count = detail::retry_count();
    if (count.asked >= max_retries) return false;
    CacheRegistry& reg = arg != nullptr ? *static_cast<CacheRegistry*>(arg) : CacheRegistry::global();
    if (detail::release_for_retry(reg) == 0) return false;
    if (count.asked++ == 0) detail::threads_retrying.fetch_add(1, std::memory_order_relaxed);
    return true;
}

}  // namespace oomguard
