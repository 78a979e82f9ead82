// One answer to "is this exception a device out-of-memory?", used by every
// recovery path in oomguard. Only a device OOM is ever retried; everything else
// (sticky CUDA errors, a missing driver, host std::bad_alloc, the user's own
// exceptions) passes through unchanged.
#pragma once

#include <oomguard/errors.hpp>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <exception>
#include <new>

namespace oomguard {

/// A user rule: returns true when `e` is a device OOM raised by a library
/// oomguard does not know (libtorch's c10::OutOfMemoryError, a cuBLAS or cuDNN
/// *_ALLOC_FAILED wrapper, ...). A captureless lambda converts to it.
using oom_rule = bool (*)(std::exception const& e);

namespace detail {
constexpr std::size_t max_oom_rules = 16;

inline std::atomic<oom_rule>* oom_rule_slots() noexcept {
    // Fixed slots with atomic stores: readers take no lock, and a rule that is
    // unregistered while another thread runs it is still valid code to finish.
    static std::atomic<oom_rule> slots[max_oom_rules] = {};
    return slots;
}

inline bool contains(char const* haystack, char const* needle) noexcept {
    return haystack != nullptr && std::strstr(haystack, needle) != nullptr;
}
}  // namespace detail

/// RAII registration of an `oom_rule`; unregisters on destruction. Move-only.
class OomRuleRegistration {
public:
    explicit OomRuleRegistration(oom_rule rule) {
        if (rule == nullptr)
            detail::throw_invalid("oomguard: register_oom_rule: the rule is a null pointer");
        auto* slots = detail::oom_rule_slots();
        for (std::size_t i = 0; i < detail::max_oom_rules; ++i) {
            oom_rule expected = nullptr;
            if (slots[i].compare_exchange_strong(expected, rule)) {
                slot_ = static_cast<int>(i);
                return;
            }
        }
        detail::throw_length("oomguard: register_oom_rule: all 16 rule slots are taken; "
                             "unregister a rule first");
    }
    OomRuleRegistration(OomRuleRegistration&& o) noexcept : slot_(o.slot_) { o.slot_ = -1; }
    OomRuleRegistration& operator=(OomRuleRegistration&& o) noexcept {
        if (this != &o) {
            reset();
            slot_ = o.slot_;
            o.slot_ = -1;
        }
        return *this;
    }
    OomRuleRegistration(OomRuleRegistration const&) = delete;
    OomRuleRegistration& operator=(OomRuleRegistration const&) = delete;
    ~OomRuleRegistration() { reset(); }

    /// Unregisters now.
    void reset() noexcept {
        if (slot_ >= 0) detail::oom_rule_slots()[slot_].store(nullptr);
        slot_ = -1;
    }

private:
    int slot_ = -1;
};

/// Registers a rule for exceptions oomguard cannot recognise on its own.
/// Keep the returned handle alive as long as the rule should apply.
[[nodiscard]] inline OomRuleRegistration register_oom_rule(oom_rule rule) {
    return OomRuleRegistration(rule);
}

namespace detail {
/// The texts that name a device OOM: CUDA's own error names (the runtime's, which
/// Thrust's bad_alloc and system_error keep, and the driver API's), libtorch's
/// c10::OutOfMemoryError ("CUDA out of memory. Tried to allocate ..."), and
/// oomguard's own message when another library passes it on as text. Never
/// "out of memory" alone: a host loader or cudaHostAlloc says that too.
constexpr char const* device_oom_texts[] = {"cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY",
                                            "CUDA out of memory", "oomguard: out of memory"};
}  // namespace detail

/// True when `e` reports a device out-of-memory:
///  - oomguard::out_of_memory;
///  - never an oomguard::cuda_error (sticky errors, no driver, bad arguments);
///  - a registered user rule says so;
///  - any other exception whose text holds one of detail::device_oom_texts.
///    A host `new` failure says only "std::bad_alloc" and is not a device OOM.
inline bool is_device_oom(std::exception const& e) noexcept {
    if (dynamic_cast<out_of_memory const*>(&e) != nullptr) return true;
    if (dynamic_cast<cuda_error const*>(&e) != nullptr) return false;
    auto* slots = detail::oom_rule_slots();
    for (std::size_t i = 0; i < detail::max_oom_rules; ++i) {
        oom_rule r = slots[i].load(std::memory_order_acquire);
        if (r != nullptr) {
            try {
                if (r(e)) return true;
            } catch (...) {
                // A rule that throws has not recognised the exception.
            }
        }
    }
    char const* w = e.what();
    for (char const* t : detail::device_oom_texts)
        if (detail::contains(w, t)) return true;
    return false;
}

/// Same question for an exception_ptr (for example one kept from another thread).
inline bool is_device_oom(std::exception_ptr const& p) noexcept {
    if (!p) return false;
    try {
        std::rethrow_exception(p);
    } catch (std::exception const& e) {
        return is_device_oom(e);
    } catch (...) {
        return false;
    }
}

/// Same question for a backend status.
constexpr bool is_device_oom(status s) noexcept { return s.kind == status_kind::out_of_memory; }

}  // namespace oomguard
