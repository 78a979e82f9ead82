// The device-backend concept: the only layer of oomguard that talks to a device.
//
// A backend is any class with the members below. oomguard's public types are
// templates over it (`MemoryBudget<CudaRuntime>`, `MemoryBudget<SimulatedDevices>`),
// so the call is resolved at compile time: no virtual call sits on the allocation
// path. Backends never throw; they answer with a `status`, and the layers above
// turn a failed status into a typed exception (see errors.hpp).
//
//   status allocate(void** out, std::size_t bytes, int device) noexcept;
//   status deallocate(void* p, std::size_t bytes, int device) noexcept;
//   status memory_info(int device, std::size_t* free, std::size_t* total) noexcept;
//   status device_count(int* count) noexcept;
//   status current_device(int* device) noexcept;
//   status set_device(int device) noexcept;
//   status synchronize(int device) noexcept;
//   static constexpr char const* backend_name;   // "cuda", "simulated", ...
//
// A stream-ordered backend (is_stream_ordered_v) adds the pool behind
// cudaMallocAsync: allocations and frees ordered on a stream.
//
//   using stream_type = ...;                      // cudaStream_t for CudaRuntime
//   static constexpr std::size_t async_granularity;  // the pool's block size
//   status allocate_async(void** out, std::size_t bytes, int device, stream_type s) noexcept;
//   status deallocate_async(void* p, std::size_t bytes, int device, stream_type s) noexcept;
//   status synchronize_stream(int device, stream_type s) noexcept;
//
// `allocate` on a device must leave the calling thread's current device as it
// found it, and must clear any per-thread "last error" that a failed allocation
// leaves behind, so that a recovered OOM is not reported again by an unrelated
// later call (cudart's cudaGetLastError would otherwise return it).
#pragma once

#if __cplusplus < 201703L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 201703L)
#error "oomguard needs C++17 or later: compile with -std=c++17 (or newer)"
#endif

#include <cstddef>
#include <type_traits>
#include <utility>

namespace oomguard {

/// What kind of failure a backend reports. Only `out_of_memory` is ever retried.
enum class status_kind : unsigned char {
    ok = 0,
    out_of_memory,     ///< the device could not satisfy an allocation; recoverable
    no_device,         ///< no usable device: no driver, no GPU, CUDA_VISIBLE_DEVICES empty
    invalid_argument,  ///< a bad device ordinal, pointer or size
    sticky,            ///< the context is corrupted (illegal address, launch failure): never retry
    other              ///< anything else; passed through unchanged
};

/// Human-readable name of a status kind.
constexpr char const* to_string(status_kind k) noexcept {
    switch (k) {
        case status_kind::ok: return "ok";
        case status_kind::out_of_memory: return "out_of_memory";
        case status_kind::no_device: return "no_device";
        case status_kind::invalid_argument: return "invalid_argument";
        case status_kind::sticky: return "sticky";
        case status_kind::other: return "other";
    }
    return "unknown";
}

/// A backend's answer: the kind, the backend's own code (a cudaError_t value for
/// CudaRuntime and, by convention, for SimulatedDevices too) and its name.
/// Trivially copyable; `name` points to a string with static storage duration.
struct status {
    status_kind kind = status_kind::ok;  ///< what happened: ok, out_of_memory (the only kind ever retried), sticky, no_device, invalid_argument, other
    int code = 0;  ///< the backend's own code (0: success)
    char const* name = "cudaSuccess";  ///< the code's name, static storage

    /// True when the call succeeded.
    constexpr bool ok() const noexcept { return kind == status_kind::ok; }
    /// ok(): `if (auto s = backend.allocate(...))`.
    constexpr explicit operator bool() const noexcept { return ok(); }
    /// A success, as a backend returns it.
    static constexpr status success() noexcept { return status{}; }
};

namespace detail {
template <class...>
using void_t = void;

template <class B, class = void>
struct is_backend : std::false_type {};

template <class B>
struct is_backend<
    B, void_t<decltype(std::declval<B&>().allocate(std::declval<void**>(), std::size_t{}, int{})),
              decltype(std::declval<B&>().deallocate(std::declval<void*>(), std::size_t{}, int{})),
              decltype(std::declval<B&>().memory_info(int{}, std::declval<std::size_t*>(),
                                                      std::declval<std::size_t*>())),
              decltype(std::declval<B&>().device_count(std::declval<int*>())),
              decltype(std::declval<B&>().current_device(std::declval<int*>())),
              decltype(std::declval<B&>().set_device(int{})),
              decltype(std::declval<B&>().synchronize(int{})), decltype(B::backend_name)>>
    : std::integral_constant<
          bool, std::is_same<decltype(std::declval<B&>().allocate(std::declval<void**>(),
                                                                  std::size_t{}, int{})),
                             status>::value &&
                    noexcept(std::declval<B&>().allocate(std::declval<void**>(), std::size_t{},
                                                         int{})) &&
                    noexcept(std::declval<B&>().deallocate(std::declval<void*>(), std::size_t{},
                                                           int{}))> {};
}  // namespace detail

/// True when `B` models the backend concept described at the top of this header.
template <class B>
constexpr bool is_backend_v = detail::is_backend<B>::value;

namespace detail {
template <class B, class = void>
struct is_stream_ordered : std::false_type {};
template <class B>
struct is_stream_ordered<
    B, void_t<typename B::stream_type, decltype(B::async_granularity),
              decltype(std::declval<B&>().allocate_async(std::declval<void**>(), std::size_t{}, int{},
                                                         std::declval<typename B::stream_type>())),
              decltype(std::declval<B&>().deallocate_async(std::declval<void*>(), std::size_t{}, int{},
                                                           std::declval<typename B::stream_type>())),
              decltype(std::declval<B&>().synchronize_stream(int{}, std::declval<typename B::stream_type>()))>>
    : std::integral_constant<bool, is_backend<B>::value && (B::async_granularity > 0)> {};
}  // namespace detail

/// True when `B` also has the stream-ordered members (see the top of this header).
template <class B>
constexpr bool is_stream_ordered_v = detail::is_stream_ordered<B>::value;

}  // namespace oomguard
