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
/// (nullptr: CacheRegistry::global()) and asks for one retry when that freed
/// something -- RMM's "release, then retry", with oomguard's caches.
///   rmm::mr::failure_callback_resource_adaptor<std::bad_alloc> mr(upstream, oomguard::release_caches_and_retry, nullptr);
/// RMM retries for as long as the callback says so: this one says so at most
/// `max_retries` (3) times in a row for the same request size on a thread, so a
/// cache that refills itself cannot loop forever.
inline bool release_caches_and_retry(std::size_t bytes, void* arg) {
    constexpr int max_retries = 3;
    thread_local std::size_t last_bytes = 0;
    thread_local int in_a_row = 0;
    in_a_row = bytes == last_bytes ? in_a_row + 1 : 1;
    last_bytes = bytes;
    if (in_a_row > max_retries) {
        in_a_row = 0;
        last_bytes = 0;
        return false;
    }
    CacheRegistry& reg = arg != nullptr ? *static_cast<CacheRegistry*>(arg) : CacheRegistry::global();
    return reg.release_all().bytes() > 0;
}

}  // namespace oomguard
