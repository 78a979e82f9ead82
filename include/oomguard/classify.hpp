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
    /// Registers `rule`; throws std::invalid_argument for a null rule, std::length_error when all
    /// 16 slots are taken.
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
    /// Takes over `o`'s rule; `o` then holds none.
    OomRuleRegistration(OomRuleRegistration&& o) noexcept : slot_(o.slot_) { o.slot_ = -1; }
    /// Unregisters this one's rule, then takes over `o`'s.
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
/// What MicroBatch::sync() says on a rank whose peer ran out of memory
/// (peer_out_of_memory). One constant for the thrower and the classifier, so a
/// step that passes it on as text is still recognised after any rewording.
constexpr char const* peer_oom_text =
    "oomguard: another rank ran out of device memory in this attempt; every rank leaves the step and retries "
    "together";

/// The texts that name a device OOM anywhere in a message: CUDA's own error
/// names (the runtime's, which Thrust's bad_alloc and system_error keep, and
/// the driver API's), libtorch's c10::OutOfMemoryError ("CUDA out of memory.
/// Tried to allocate ..."), and oomguard's own messages (out_of_memory's and
/// peer_out_of_memory's) when another library passes them on as text. Never
/// "out of memory" alone: a host loader or cudaHostAlloc says that too.
constexpr char const* device_oom_texts[] = {"cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY",
                                            "CUDA out of memory", "oomguard: out of memory", peer_oom_text};

/// What a CUDA_CHECK macro built on cudaGetErrorString writes first, PyTorch's
/// c10 CUDA_CHECK included.
constexpr char const* cuda_check_prefix = "CUDA error: ";

/// cudaGetErrorString's text for each code oomguard treats as a device OOM
/// (CudaRuntime::classify: cudaErrorMemoryAllocation alone; CUDA 13's
/// libcudart says "out of memory", as cuGetErrorString does for the driver's
/// CUDA_ERROR_OUT_OF_MEMORY).
constexpr char const* cudart_oom_strings[] = {"out of memory"};

/// True when `w` starts with cuda_check_prefix and one of cudart_oom_strings,
/// followed by the end of the text or a newline: c10 appends its help, its
/// "CUDA kernel errors might be asynchronously reported" suffix and its
/// device-assertion note each after a '\n'. Anything else after the string
/// ("out of memory on the host", a '.') is not cudart's text, and the match is
/// anchored at the start because "... CUDA error: out of memory" inside another
/// message may be anyone's words.
inline bool is_cuda_check_oom_text(char const* w) noexcept {
    if (w == nullptr) return false;
    std::size_t const n = std::strlen(cuda_check_prefix);
    if (std::strncmp(w, cuda_check_prefix, n) != 0) return false;
    for (char const* s : cudart_oom_strings) {
        std::size_t const m = std::strlen(s);
        if (std::strncmp(w + n, s, m) == 0 && (w[n + m] == '\0' || w[n + m] == '\n')) return true;
    }
    return false;
}
}  // namespace detail

/// True when `e` reports a device out-of-memory:
///  - oomguard::out_of_memory;
///  - never an oomguard::cuda_error (sticky errors, no driver, bad arguments);
///  - a registered user rule says so;
///  - any other exception whose text holds one of detail::device_oom_texts, or
///    starts with cudart's own OOM text as CUDA_CHECK macros write it
///    ("CUDA error: out of memory", then the end or a newline).
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
    return detail::is_cuda_check_oom_text(w);
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
