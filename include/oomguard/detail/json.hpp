// Minimal JSON writing for reports and traces.
#pragma once

#include <oomguard/detail/utf8.hpp>

#include <cstddef>
#include <cstdio>
#include <string>
#include <string_view>

namespace oomguard {
namespace detail {

/// `s` as a JSON string literal, quotes included: `"` and `\` escaped, control
/// characters as \uXXXX (or \n, \r, \t), and each ill-formed UTF-8 sequence
/// replaced with U+FFFD, so that the document is valid JSON whatever a label or
/// a library's message held (RFC 8259 requires UTF-8).
inline std::string json_string(std::string_view s) {
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    for_each_utf8(
        s,
        [&](char c) {
            switch (c) {
                case '"': out += "\\\""; break;
                case '\\': out += "\\\\"; break;
                case '\n': out += "\\n"; break;
                case '\r': out += "\\r"; break;
                case '\t': out += "\\t"; break;
                default:
                    if (static_cast<unsigned char>(c) < 0x20) {
                        char buf[8];
                        std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
                        out += buf;
                    } else {
                        out += c;
                    }
            }
        },
        [&](std::string_view t) { out.append(t.data(), t.size()); });
    out += '"';
    return out;
}

}  // namespace detail
}  // namespace oomguard
