// Message building for error paths. Error texts are built with snprintf into a
// fixed buffer rather than with std::string concatenation: every inline function
// that concatenates strings instantiates templates in each translation unit that
// includes oomguard, which cost more compile time than the whole of the core.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <string_view>

namespace oomguard {
namespace detail {

/// "80.00 MiB", "79.35 GiB", "512 B": binary units, two decimals, like PyTorch.
struct ByteText {
    char text[32];
    char const* c_str() const noexcept { return text; }
};

inline ByteText format_bytes(std::size_t bytes) noexcept {
    static char const* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    ByteText t;
    if (bytes < 1024) {
        std::snprintf(t.text, sizeof t.text, "%zu B", bytes);
        return t;
    }
    double v = static_cast<double>(bytes);
    int u = 0;
    while (v >= 1024.0 && u < 6) {
        v /= 1024.0;
        ++u;
    }
    std::snprintf(t.text, sizeof t.text, "%.2f %s", v, units[u]);
    return t;
}

/// `s` without the spaces and tabs around it.
inline std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
}

/// Appends `s` to the text of `len` characters in `buf` (room for `size - 1` and
/// the terminator), cutting what does not fit and marking the cut with "...".
/// The cut falls on a code point boundary: a UTF-8 sequence is kept whole or
/// dropped whole, so a valid text stays valid (JSON, XML and terminals reject
/// half a sequence). `cut` is set by the cut, and once set nothing more is
/// appended: the text may then end short of the room, and a later short piece
/// must not land after the "...".
inline void append_cut(char* buf, std::size_t size, std::size_t& len, bool& cut, std::string_view s) noexcept {
    if (cut) return;
    std::size_t const room = size - 1 - len;
    std::size_t const n = s.size() < room ? s.size() : room;
    if (n != 0) std::memcpy(buf + len, s.data(), n);  // an empty view's data() may be null
    len += n;
    buf[len] = '\0';
    if (n == s.size() || len < 3) return;
    cut = true;
    // buf[end] is the first byte the "..." covers. A continuation byte there
    // belongs to a sequence that began before it: drop that sequence from its
    // lead byte (at most 3 back). Bytes that are not UTF-8 are left as they are.
    auto continuation = [&](std::size_t k) { return (static_cast<unsigned char>(buf[k]) & 0xC0) == 0x80; };
    std::size_t end = len - 3;
    if (continuation(end))
        for (std::size_t k = 1; k <= 3 && k <= end; ++k)
            if (!continuation(end - k)) {
                if (static_cast<unsigned char>(buf[end - k]) >= 0xC0) end -= k;
                break;
            }
    std::memcpy(buf + end, "...", 3);
    len = end + 3;
    buf[len] = '\0';
}

/// A bounded text builder: `Message() << "device " << 3 << " has " << bytes_of(n)`.
/// Truncates (with "...", on a UTF-8 boundary) rather than fail: it runs while an
/// error is being reported.
class Message {
public:
    Message& operator<<(std::string_view s) noexcept {
        append_cut(buf_, sizeof buf_, len_, cut_, s);
        return *this;
    }
    Message& operator<<(char const* s) noexcept { return *this << std::string_view(s ? s : "(null)"); }
    Message& operator<<(char c) noexcept { return *this << std::string_view(&c, 1); }
    Message& operator<<(ByteText const& b) noexcept { return *this << std::string_view(b.text); }
    Message& operator<<(int v) noexcept { return printf("%d", v); }
    Message& operator<<(long v) noexcept { return printf("%ld", v); }
    Message& operator<<(long long v) noexcept { return printf("%lld", v); }
    Message& operator<<(unsigned v) noexcept { return printf("%u", v); }
    Message& operator<<(unsigned long v) noexcept { return printf("%lu", v); }
    Message& operator<<(unsigned long long v) noexcept { return printf("%llu", v); }
    Message& operator<<(double v) noexcept { return printf("%g", v); }

    char const* c_str() const noexcept { return buf_; }
    std::string_view view() const noexcept { return std::string_view(buf_, len_); }

private:
    template <class T>
    Message& printf(char const* fmt, T v) noexcept {
        char tmp[48];
        int n = std::snprintf(tmp, sizeof tmp, fmt, v);
        return *this << std::string_view(tmp, n > 0 ? static_cast<std::size_t>(n) : 0);
    }
    char buf_[1024] = {};
    std::size_t len_ = 0;
    bool cut_ = false;  // the text was cut: nothing more goes after its "..."
};

/// Text of at most N - 1 characters kept inside the object: no heap, no <string>.
/// Compares with and converts to std::string_view.
template <std::size_t N>
class FixedText {
    static_assert(N >= 4, "room for at least \"...\"");

public:
    static constexpr std::size_t capacity = N - 1;

    FixedText() noexcept = default;
    /// A copy of `s`, cut to at most `capacity` characters ending in "..." when
    /// longer, on a UTF-8 boundary (callers that must not cut check `fits` first).
    explicit FixedText(std::string_view s) noexcept {
        bool cut = false;
        append_cut(buf_, N, len_, cut, s);
    }
    static constexpr bool fits(std::string_view s) noexcept { return s.size() <= capacity; }

    char const* c_str() const noexcept { return buf_; }
    std::string_view view() const noexcept { return std::string_view(buf_, len_); }
    operator std::string_view() const noexcept { return view(); }
    std::size_t size() const noexcept { return len_; }
    bool empty() const noexcept { return len_ == 0; }

    friend bool operator==(FixedText const& a, std::string_view b) noexcept { return a.view() == b; }
    friend bool operator==(std::string_view a, FixedText const& b) noexcept { return a == b.view(); }
    friend bool operator!=(FixedText const& a, std::string_view b) noexcept { return a.view() != b; }
    friend bool operator!=(std::string_view a, FixedText const& b) noexcept { return a != b.view(); }

private:
    char buf_[N] = {};
    std::size_t len_ = 0;
};

}  // namespace detail
}  // namespace oomguard
