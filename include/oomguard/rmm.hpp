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
/// RMM retries for as long as the callback says so, and a callback cannot tell
/// one request's retries from the next request's: this one keeps no count and
/// asks again only while a release frees memory, so it stops once the caches
/// are empty. Where other threads keep refilling them, bound it per request
/// with BudgetAdaptor::release_caches_on_oom instead.
inline bool release_caches_and_retry(std::size_t, void* arg) {
    CacheRegistry& reg = arg != nullptr ? *static_cast<CacheRegistry*>(arg) : CacheRegistry::global();
    return reg.release_all().bytes() > 0;
}

}  // namespace oomguard
