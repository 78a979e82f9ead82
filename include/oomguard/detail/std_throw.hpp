// Throwing the standard library's own error types (std::invalid_argument,
// std::length_error, std::logic_error) without making every includer parse
// <stdexcept>.
//
// Why: <stdexcept> pulls in <string>, and on g++ 12 that alone costs about
// 0.2 s of compile time in every translation unit -- two thirds of what the whole
// umbrella header may cost (scripts/include-cost). oomguard's core never needs the
// class definitions, only to throw them. libstdc++ exports, from the shared
// library, one out-of-line thrower per standard exception type
// (std::__throw_invalid_argument and friends, declared in <bits/functexcept.h>).
// Every inline function of libstdc++'s own headers throws through them, so they
// are part of its stable ABI. With any other standard library, or with
// OOMGUARD_PORTABLE_THROW defined to 1, the plain `throw std::X(what)` is used.
// Either way the caller catches exactly std::invalid_argument & co. with `what`
// as its text.
#pragma once

#include <cstddef>  // defines __GLIBCXX__ when the standard library is libstdc++

#include <oomguard/detail/format.hpp>

#ifndef OOMGUARD_PORTABLE_THROW
#if defined(__GLIBCXX__)
#define OOMGUARD_PORTABLE_THROW 0
#else
#define OOMGUARD_PORTABLE_THROW 1
#endif
#endif

#if OOMGUARD_PORTABLE_THROW
#include <stdexcept>
#else
#include <bits/functexcept.h>
#endif

namespace oomguard {
namespace detail {

/// Throws std::invalid_argument(what).
[[noreturn]] inline void throw_invalid(char const* what) {
#if OOMGUARD_PORTABLE_THROW
    throw std::invalid_argument(what);
#else
    std::__throw_invalid_argument(what);
#endif
}
[[noreturn]] inline void throw_invalid(Message const& m) { throw_invalid(m.c_str()); }

/// Throws std::length_error(what): a size past what can be represented.
[[noreturn]] inline void throw_length(char const* what) {
#if OOMGUARD_PORTABLE_THROW
    throw std::length_error(what);
#else
    std::__throw_length_error(what);
#endif
}
[[noreturn]] inline void throw_length(Message const& m) { throw_length(m.c_str()); }

/// Throws std::logic_error(what): a user-supplied callback broke its contract.
[[noreturn]] inline void throw_logic(char const* what) {
#if OOMGUARD_PORTABLE_THROW
    throw std::logic_error(what);
#else
    std::__throw_logic_error(what);
#endif
}
[[noreturn]] inline void throw_logic(Message const& m) { throw_logic(m.c_str()); }

}  // namespace detail
}  // namespace oomguard
