// UTF-8 for text that tools read (JSON, XML): labels and messages come from
// users and from libraries, and may hold bytes that are not UTF-8; a JSON or
// XML reader rejects the whole document for one such byte. Each ill-formed
// sequence becomes U+FFFD, as browsers and Python's "replace" decode it.
#pragma once

#include <cstddef>
#include <string_view>

namespace oomguard {
namespace detail {

/// U+FFFD REPLACEMENT CHARACTER in UTF-8: what stands for an ill-formed sequence.
constexpr std::string_view utf8_replacement = "\xEF\xBF\xBD";

/// One unit of text: an ASCII byte or a well-formed sequence (`valid`), or the
/// bytes of an ill-formed one that one U+FFFD replaces (not `valid`).
struct Utf8Unit {
    std::size_t length;  ///< bytes, at least 1
    bool valid;
};

/// The unit at `s[i]` (`i < s.size()`), by RFC 3629's table (no overlongs, no
/// surrogates, nothing past U+10FFFF). An ill-formed unit is the "maximal
/// subpart" of Unicode 3.9: the longest start of a well-formed sequence, or one
/// byte. So a sequence cut short is one U+FFFD and a stray byte is one each,
/// as WHATWG's decoder replaces them.
inline Utf8Unit utf8_unit(std::string_view s, std::size_t i) noexcept {
    auto byte = [&](std::size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
    unsigned const c = byte(0);
    if (c < 0x80) return {1, true};
    std::size_t need = 0;              // continuation bytes after the lead
    unsigned lo = 0x80, hi = 0xBF;     // the range of the first of them
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) need = 2, lo = 0xA0;                      // below: overlong
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
    else if (c == 0xED) need = 2, hi = 0x9F;                      // above: surrogates
    else if (c == 0xF0) need = 3, lo = 0x90;                      // below: overlong
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) need = 3, hi = 0x8F;                      // above: past U+10FFFF
    else return {1, false};                                       // C0, C1, F5..FF, a stray continuation
    if (byte(1) < lo || byte(1) > hi) return {1, false};
    for (std::size_t k = 2; k <= need; ++k)
        if (byte(k) < 0x80 || byte(k) > 0xBF) return {k, false};
    return {need + 1, true};
}

/// Walks `s` unit by unit: `ascii(char)` for each byte below 0x80, and
/// `text(std::string_view)` for each well-formed multi-byte sequence and, in
/// place of each ill-formed one, for utf8_replacement. What a writer escapes
/// is its own; what reaches it is always valid UTF-8.
template <class Ascii, class Text>
void for_each_utf8(std::string_view s, Ascii&& ascii, Text&& text) {
    for (std::size_t i = 0; i < s.size();) {
        Utf8Unit const u = utf8_unit(s, i);
        if (u.length == 1 && u.valid)
            ascii(s[i]);
        else
            text(u.valid ? s.substr(i, u.length) : utf8_replacement);
        i += u.length;
    }
}

}  // namespace detail
}  // namespace oomguard
