// OOMGUARD_CONF: run-time settings from the environment, parsed strictly. A typo
// must not silently turn a guard off, so every unknown key, malformed number or
// out-of-range value is an error that names it and says what is valid.
//
//   OOMGUARD_CONF="budget=0.9,min_batch=1"
//   OOMGUARD_CONF="budget=70GiB, max_attempts=8"
//   OOMGUARD_CONF="headroom=2GiB"
#pragma once

#include <oomguard/memory_budget.hpp>
#include <oomguard/precision.hpp>
#include <oomguard/shrink_policy.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace oomguard {

/// A bad OOMGUARD_CONF entry. key() and value() name what was wrong.
class config_error : public std::invalid_argument {
public:
    config_error(std::string_view key, std::string_view value, detail::Message const& why)
        : std::invalid_argument((detail::Message() << "oomguard: OOMGUARD_CONF: " << why.view()).c_str()),
          key_(key.data(), key.size()), value_(value.data(), value.size()) {}
    std::string const& key() const noexcept { return key_; }
    std::string const& value() const noexcept { return value_; }

private:
    std::string key_;
    std::string value_;
};

/// Parsed settings; a key that was not given stays empty.
struct Config {
    std::optional<Limit> budget;           ///< budget= (fraction, percent or bytes) or headroom=
    std::optional<std::size_t> min_batch;  ///< smallest micro-batch adaptive_batch may use, >= 1
    std::optional<unsigned> max_attempts;  ///< attempts per global batch, in [1, 1000]
    std::optional<ShrinkPolicy> policy;    ///< policy=halve|bisect|predictive|geometric (factor= sets f)
    std::optional<std::size_t> grow_after; ///< clean global batches before growing back, >= 0
    std::vector<Precision> precisions;     ///< precision=fp32>bf16>fp16 (empty: not given)
};

/// The keys parse_config accepts, for error messages and documentation.
inline constexpr char const* config_keys =
    "budget, headroom, min_batch, max_attempts, policy, factor, grow_after, precision";

namespace detail {

/// Parses "123" or "12.5" (no sign, exponent, hex, inf or nan). Sets `digits_only`.
inline bool parse_decimal(std::string_view s, double& out, bool& digits_only) noexcept {
    if (s.empty()) return false;
    double v = 0.0, scale = 1.0;
    bool seen_digit = false, seen_dot = false;
    for (char c : s) {
        if (c >= '0' && c <= '9') {
            seen_digit = true;
            if (seen_dot) {
                scale /= 10.0;
                v += (c - '0') * scale;
            } else {
                v = v * 10.0 + (c - '0');
            }
        } else if (c == '.' && !seen_dot) {
            seen_dot = true;
        } else {
            return false;
        }
    }
    out = v;
    digits_only = !seen_dot;
    return seen_digit;
}

inline bool parse_unsigned(std::string_view s, std::uint64_t& out) noexcept {
    if (s.empty()) return false;
    std::uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        std::uint64_t d = static_cast<std::uint64_t>(c - '0');
        if (v > (std::numeric_limits<std::uint64_t>::max() - d) / 10) return false;
        v = v * 10 + d;
    }
    out = v;
    return true;
}

/// "2GiB", "512 MiB", "1.5GB", "4096", "4096B" -> bytes. False on anything else.
inline bool parse_bytes(std::string_view s, std::size_t& out, bool& had_unit) noexcept {
    std::size_t i = 0;
    while (i < s.size() && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.')) ++i;
    std::string_view num = s.substr(0, i), unit = trim(s.substr(i));
    double mult = 1.0;
    had_unit = !unit.empty();
    struct U { char const* name; double mult; };
    static constexpr U units[] = {{"B", 1.0},
                                  {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0},
                                  {"TiB", 1099511627776.0},
                                  {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}};
    if (had_unit) {
        bool found = false;
        for (auto const& u : units) {
            if (unit == u.name) {
                mult = u.mult;
                found = true;
            }
        }
        if (!found) return false;
    }
    double v = 0.0;
    bool integral = false;
    if (!parse_decimal(num, v, integral)) return false;
    if (integral && !had_unit) {
        std::uint64_t n = 0;
        if (!parse_unsigned(num, n) || n > std::numeric_limits<std::size_t>::max()) return false;
        out = static_cast<std::size_t>(n);
        return true;
    }
    double bytes = v * mult;
    // 2^64 is the first double above every size_t.
    if (!(bytes < 18446744073709551616.0)) return false;
    out = static_cast<std::size_t>(bytes);
    return true;
}

[[noreturn]] inline void bad_value(std::string_view key, std::string_view value, char const* valid) {
    throw config_error(key, value, Message() << "bad value '" << value << "' for " << key << ": " << valid);
}

inline Limit parse_budget(std::string_view v) {
    static char const* valid = "give a fraction of device memory in (0, 1] (0.9), a percentage "
                               "in (0, 100] (90%), or a size with a unit (70GiB, 512MiB)";
    if (!v.empty() && v.back() == '%') {
        double pct = 0.0;
        bool integral = false;
        if (!parse_decimal(trim(v.substr(0, v.size() - 1)), pct, integral) || !(pct > 0.0 && pct <= 100.0))
            bad_value("budget", v, valid);
        return Limit::fraction(pct / 100.0);
    }
    double f = 0.0;
    bool integral = false;
    if (parse_decimal(v, f, integral)) {
        if (!(f > 0.0 && f <= 1.0)) bad_value("budget", v, valid);
        return Limit::fraction(f);
    }
    std::size_t b = 0;
    bool had_unit = false;
    if (!parse_bytes(v, b, had_unit) || b == 0) bad_value("budget", v, valid);
    return Limit::bytes(b);
}

}  // namespace detail

/// Parses "key=value,key=value". Empty text gives an empty Config.
/// Throws config_error naming the key or value at fault.
inline Config parse_config(std::string_view text) {
    Config c;
    bool seen_budget = false, seen_headroom = false, seen_policy = false, seen_factor = false;
    ShrinkPolicy::Kind policy_kind = ShrinkPolicy::Kind::halve;
    double factor = 0.0;
    if (detail::trim(text).empty()) return c;
    std::size_t pos = 0;
    while (pos <= text.size()) {
        std::size_t comma = text.find(',', pos);
        std::string_view entry =
            detail::trim(text.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos));
        if (entry.empty())
            throw config_error("", "", detail::Message() << "empty entry at offset " << pos << " in '" << text
                                                         << "'; write key=value pairs separated by commas");
        std::size_t eq = entry.find('=');
        if (eq == std::string_view::npos)
            throw config_error(entry, "", detail::Message() << "entry '" << entry
                                                            << "' has no '='; write key=value (keys: "
                                                            << config_keys << ")");
        std::string_view key = detail::trim(entry.substr(0, eq));
        std::string_view value = detail::trim(entry.substr(eq + 1));
        auto once = [&](bool present) {
            if (present)
                throw config_error(key, value, detail::Message() << "key '" << key << "' is given twice");
        };
        if (key == "budget") {
            once(seen_budget);
            seen_budget = true;
            c.budget = detail::parse_budget(value);
        } else if (key == "headroom") {
            once(seen_headroom);
            seen_headroom = true;
            std::size_t b = 0;
            bool had_unit = false;
            if (!detail::parse_bytes(value, b, had_unit))
                detail::bad_value(key, value, "give a size such as 2GiB, 512MiB or 1048576");
            c.budget = Limit::headroom(b);
        } else if (key == "min_batch") {
            once(c.min_batch.has_value());
            std::uint64_t n = 0;
            if (!detail::parse_unsigned(value, n) || n == 0 || n > std::numeric_limits<std::size_t>::max())
                detail::bad_value(key, value, "give a whole number >= 1");
            c.min_batch = static_cast<std::size_t>(n);
        } else if (key == "max_attempts") {
            once(c.max_attempts.has_value());
            std::uint64_t n = 0;
            if (!detail::parse_unsigned(value, n) || n == 0 || n > 1000)
                detail::bad_value(key, value, "give a whole number in [1, 1000]");
            c.max_attempts = static_cast<unsigned>(n);
        } else if (key == "policy") {
            once(seen_policy);
            seen_policy = true;
            if (value == "halve") policy_kind = ShrinkPolicy::Kind::halve;
            else if (value == "geometric") policy_kind = ShrinkPolicy::Kind::geometric;
            else if (value == "bisect") policy_kind = ShrinkPolicy::Kind::bisect;
            else if (value == "predictive") policy_kind = ShrinkPolicy::Kind::predictive;
            else detail::bad_value(key, value, "give halve, geometric, bisect or predictive");
        } else if (key == "factor") {
            once(seen_factor);
            seen_factor = true;
            bool integral = false;
            if (!detail::parse_decimal(value, factor, integral) || !(factor > 0.0 && factor < 1.0))
                detail::bad_value(key, value, "give the geometric policy's factor in (0, 1), for example 0.9");
        } else if (key == "grow_after") {
            once(c.grow_after.has_value());
            std::uint64_t n = 0;
            if (!detail::parse_unsigned(value, n) || n > 1000000)
                detail::bad_value(key, value, "give a whole number of global batches in [0, 1000000] (0: never)");
            c.grow_after = static_cast<std::size_t>(n);
        } else if (key == "precision") {
            once(!c.precisions.empty());
            std::size_t p = 0;
            while (true) {
                std::size_t gt = value.find('>', p);
                std::string_view name = detail::trim(value.substr(p, gt == std::string_view::npos ? gt : gt - p));
                Precision pr = Precision::fp32;
                if (name == "fp32") pr = Precision::fp32;
                else if (name == "tf32") pr = Precision::tf32;
                else if (name == "bf16") pr = Precision::bf16;
                else if (name == "fp16") pr = Precision::fp16;
                else if (name == "fp8") pr = Precision::fp8;
                else detail::bad_value(key, value, "give a ladder of fp32, tf32, bf16, fp16, fp8 joined by '>', "
                                                   "for example fp32>bf16>fp16");
                for (Precision q : c.precisions)
                    if (q == pr) detail::bad_value(key, value, "a precision appears twice in the ladder");
                c.precisions.push_back(pr);
                if (gt == std::string_view::npos) break;
                p = gt + 1;
            }
        } else {
            throw config_error(key, value, detail::Message() << "unknown key '" << key
                                                             << "'; valid keys: " << config_keys);
        }
        if (seen_budget && seen_headroom)
            throw config_error(key, value,
                               detail::Message() << "budget and headroom are both given; they set the same "
                                                    "cap, give one");
        if (comma == std::string_view::npos) break;
        pos = comma + 1;
    }
    if (seen_factor && (!seen_policy || policy_kind != ShrinkPolicy::Kind::geometric))
        throw config_error("factor", "", detail::Message() << "factor is only for policy=geometric; "
                                                              "add policy=geometric or drop factor");
    if (seen_policy) {
        switch (policy_kind) {
            case ShrinkPolicy::Kind::halve: c.policy = ShrinkPolicy::halve(); break;
            case ShrinkPolicy::Kind::geometric: c.policy = ShrinkPolicy::geometric(seen_factor ? factor : 0.9); break;
            case ShrinkPolicy::Kind::bisect: c.policy = ShrinkPolicy::bisect(); break;
            default: c.policy = ShrinkPolicy::predictive(); break;
        }
    }
    return c;
}

/// Reads and parses the environment variable (OOMGUARD_CONF by default); unset
/// gives an empty Config.
inline Config config_from_env(char const* variable = "OOMGUARD_CONF") {
    char const* v = std::getenv(variable);
    return v == nullptr ? Config{} : parse_config(v);
}

}  // namespace oomguard
