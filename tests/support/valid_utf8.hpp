// A strict UTF-8 check for tests: what oomguard writes for tools (JSON, XML)
// and its cut messages must be well-formed UTF-8.
#pragma once

#include <cstddef>
#include <string_view>

namespace test_support {

// Whether `s` is well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF).
inline bool valid_utf8(std::string_view s) {
    for (std::size_t i = 0; i < s.size();) {
        auto b = [&](std::size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
        auto in = [&](std::size_t k, unsigned lo, unsigned hi) { return b(k) >= lo && b(k) <= hi; };
        unsigned c = b(0);
        std::size_t n = c < 0x80                                                     ? 1
                        : c >= 0xC2 && c <= 0xDF && in(1, 0x80, 0xBF)                ? 2
                        : c == 0xE0 && in(1, 0xA0, 0xBF) && in(2, 0x80, 0xBF)        ? 3
                        : ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) && in(1, 0x80, 0xBF) &&
                                  in(2, 0x80, 0xBF)                                  ? 3
                        : c == 0xED && in(1, 0x80, 0x9F) && in(2, 0x80, 0xBF)        ? 3
                        : c == 0xF0 && in(1, 0x90, 0xBF) && in(2, 0x80, 0xBF) && in(3, 0x80, 0xBF) ? 4
                        : c >= 0xF1 && c <= 0xF3 && in(1, 0x80, 0xBF) && in(2, 0x80, 0xBF) && in(3, 0x80, 0xBF) ? 4
                        : c == 0xF4 && in(1, 0x80, 0x8F) && in(2, 0x80, 0xBF) && in(3, 0x80, 0xBF) ? 4
                                                                                     : 0;
        if (n == 0) return false;
        i += n;
    }
    return true;
}

}  // namespace test_support
