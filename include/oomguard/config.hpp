// OOMGUARD_CONF: run-time settings from the environment, parsed strictly. A typo
// must not silently turn a guard off, so every unknown key, malformed number or
// out-of-range value is an error that names it and says what is valid.
//
//   OOMGUARD_CONF="budget=0.9,min_batch=1"
//   OOMGUARD_CONF="budget=70GiB, max_attempts=8"
//   OOMGUARD_CONF="headroom=2GiB"
//
// One grammar for every size: digits alone are bytes ("4096"); a unit may
// follow a decimal ("1.5KiB") as long as the result is whole bytes. A fraction
// of the device (budget= only) is spelt with a decimal point ("0.9", "1.0") or
// as a percentage ("90%"), so no text is both a fraction and a size.
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

/// A bad OOMGUARD_CONF entry, or a bad value given to one of the parsers below.
/// key() and value() name what was wrong; what() names where it came from (the
/// variable, or the flag a program passed as the parser's `name`).
class config_error : public std::invalid_argument {
public:
    /// `source` prefixes the message ("OOMGUARD_CONF: ..."); empty for a value
    /// parsed on its own, whose key is already the flag's name.
    config_error(std::string_view key, std::string_view value, detail::Message const& why,
                 std::string_view source = "OOMGUARD_CONF")
        : std::invalid_argument((detail::Message() << "oomguard: " << source << (source.empty() ? "" : ": ")
                                                   << why.view()).c_str()),
          key_(key.data(), key.size()), value_(value.data(), value.size()) {}
    /// The key whose value was refused ("budget"), or the flag's name for a value parsed on its own.
    std::string const& key() const noexcept { return key_; }
    /// The value as it was written.
    std::string const& value() const noexcept { return value_; }

private:
    std::string key_;
    std::string value_;
};

/// Parsed settings; a key that was not given stays empty.
struct Config {
    std::optional<Limit> budget;           ///< budget= (0.9, 90% or a size in bytes) or headroom= (a size)
    std::optional<std::size_t> min_batch;  ///< smallest micro-batch adaptive_batch may use, >= 1
    std::optional<unsigned> max_attempts;  ///< attempts per global batch, in [1, 1000]
    std::optional<ShrinkPolicy> policy;    ///< policy=auto|halve|bisect|predictive|geometric (factor= sets f)
    std::optional<std::size_t> grow_after; ///< clean global batches before growing back, >= 0
    std::vector<Precision> precisions;     ///< precision=fp32>bf16>fp16 (empty: not given)

    /// The cap budget= or headroom= gave, else `fallback`. BatchOptions::apply
    /// takes the other keys; this one is for the MemoryBudget (see make_budget).
    Limit limit_or(Limit fallback) const noexcept { return budget ? *budget : fallback; }
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

inline bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        char x = a[i] >= 'A' && a[i] <= 'Z' ? static_cast<char>(a[i] - 'A' + 'a') : a[i];
        char y = b[i] >= 'A' && b[i] <= 'Z' ? static_cast<char>(b[i] - 'A' + 'a') : b[i];
        if (x != y) return false;
    }
    return true;
}

/// How a size's text fared (parse_bytes).
enum class bytes_parse : unsigned char {
    ok,
    malformed,   ///< not digits with an optional decimal point and unit, or a bare number with a point
    fractional,  ///< well formed, but not a whole number of bytes
    too_large    ///< more than std::size_t holds
};

/// "2GiB", "512 MiB", "1.5GB", "4096", "4096B" -> bytes; units in any case
/// ("1mb" is 1MB: 10^6 bytes, "1mib" 2^20). A bare number (no unit) is bytes
/// and has no decimal point: with one it is a fraction, which only budget=
/// takes (parse_limit). The arithmetic is exact, digit by digit: "1.1KB" is
/// 1100 bytes, and a size that comes to a fraction of a byte ("1.0001KiB",
/// "0.5B") is `fractional`, never truncated. `floor` is the whole bytes below
/// it (for the message); `out` is set only when the answer is `ok`.
inline bytes_parse parse_bytes(std::string_view s, std::size_t& out, std::size_t& floor) noexcept {
    constexpr std::uint64_t max = std::numeric_limits<std::size_t>::max();
    std::size_t i = 0;
    while (i < s.size() && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.')) ++i;
    std::string_view const num = s.substr(0, i), unit = trim(s.substr(i));
    std::size_t const dot = num.find('.');
    std::string_view const whole = num.substr(0, dot);
    std::string_view const frac = dot == std::string_view::npos ? std::string_view() : num.substr(dot + 1);
    if (whole.size() + frac.size() == 0 || frac.find('.') != std::string_view::npos) return bytes_parse::malformed;
    if (unit.empty() && dot != std::string_view::npos) return bytes_parse::malformed;
    struct U { char const* name; std::uint64_t mult; };
    static constexpr U units[] = {{"B", 1},
                                  {"KiB", std::uint64_t{1} << 10}, {"MiB", std::uint64_t{1} << 20},
                                  {"GiB", std::uint64_t{1} << 30}, {"TiB", std::uint64_t{1} << 40},
                                  {"KB", 1000}, {"MB", 1000000}, {"GB", 1000000000}, {"TB", 1000000000000}};
    std::uint64_t mult = unit.empty() ? 1 : 0;
    for (auto const& u : units)
        if (iequals(unit, u.name)) mult = u.mult;
    if (mult == 0) return bytes_parse::malformed;
    std::uint64_t bytes = 0;
    if (!whole.empty() && !parse_unsigned(whole, bytes)) return bytes_parse::too_large;  // digits only: overflow
    if (bytes > max / mult) return bytes_parse::too_large;
    bytes *= mult;
    // 0.d1d2...dk x mult, from the last digit up: the carry out of the first is
    // the whole bytes it adds, and any digit left behind is a fraction of a
    // byte. Each step stays below 10 x mult, far inside 64 bits.
    std::uint64_t carry = 0;
    bool exact = true;
    for (std::size_t k = frac.size(); k-- > 0;) {
        std::uint64_t const t = static_cast<std::uint64_t>(frac[k] - '0') * mult + carry;
        if (t % 10 != 0) exact = false;
        carry = t / 10;
    }
    if (carry > max - bytes) return bytes_parse::too_large;
    bytes += carry;
    floor = static_cast<std::size_t>(bytes);
    if (!exact) return bytes_parse::fractional;
    out = static_cast<std::size_t>(bytes);
    return bytes_parse::ok;
}

[[noreturn]] inline void bad_value(std::string_view key, std::string_view value, char const* valid,
                                   std::string_view source) {
    throw config_error(key, value, Message() << "bad value '" << value << "' for " << key << ": " << valid, source);
}

/// The error for a size parse_bytes refused for a reason of its own
/// (fractional, too_large); `valid` says what would do.
[[noreturn]] inline void bad_size(bytes_parse why, std::size_t floor, std::string_view key, std::string_view value,
                                  char const* valid, std::string_view source) {
    Message m;
    m << "bad value '" << value << "' for " << key << ": ";
    if (why == bytes_parse::fractional)
        m << "not a whole number of bytes (between " << floor << " and " << floor + 1 << "); ";
    else if (why == bytes_parse::too_large)
        m << "more than " << std::numeric_limits<std::size_t>::max() << " bytes, the largest size; ";
    m << valid;
    throw config_error(key, value, m, source);
}

inline Limit parse_limit(std::string_view v, std::string_view key, std::string_view source) {
    static char const* valid = "give a fraction of device memory in (0, 1] with a decimal point (0.9, 1.0), a "
                               "percentage in (0, 100] (90%), or a size in whole bytes (70GiB, 512MiB, or 1048576: "
                               "a bare number is bytes)";
    if (!v.empty() && v.back() == '%') {
        double pct = 0.0;
        bool integral = false;
        if (!parse_decimal(trim(v.substr(0, v.size() - 1)), pct, integral) || !(pct > 0.0 && pct <= 100.0))
            bad_value(key, v, valid, source);
        return Limit::fraction(pct / 100.0);
    }
    // A number with a decimal point and no unit is the fraction; digits alone
    // are bytes, as everywhere else a size is read.
    double f = 0.0;
    bool integral = false;
    if (parse_decimal(v, f, integral) && !integral) {
        if (!(f > 0.0 && f <= 1.0)) bad_value(key, v, valid, source);
        return Limit::fraction(f);
    }
    std::size_t b = 0, floor = 0;
    bytes_parse const r = parse_bytes(v, b, floor);
    if (r == bytes_parse::malformed) bad_value(key, v, valid, source);
    if (r != bytes_parse::ok) bad_size(r, floor, key, v, valid, source);
    if (b == 0)
        bad_value(key, v, "a budget of 0 bytes allows nothing; give at least 1 byte, a fraction (0.9) or a "
                          "percentage (90%)", source);
    return Limit::bytes(b);
}

inline std::size_t parse_size(std::string_view v, std::string_view key, std::string_view source) {
    static char const* valid = "give a size such as 2GiB, 512MiB or 1048576 (whole bytes); a bare number is bytes, a "
                               "decimal point needs a unit (1.5KiB); units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB in any "
                               "case";
    std::size_t b = 0, floor = 0;
    bytes_parse const r = parse_bytes(v, b, floor);
    if (r == bytes_parse::malformed) bad_value(key, v, valid, source);
    if (r != bytes_parse::ok) bad_size(r, floor, key, v, valid, source);
    return b;
}

inline ShrinkPolicy::Kind parse_policy_kind(std::string_view v, std::string_view key, std::string_view source) {
    if (v == "halve") return ShrinkPolicy::Kind::halve;
    if (v == "geometric") return ShrinkPolicy::Kind::geometric;
    if (v == "bisect") return ShrinkPolicy::Kind::bisect;
    if (v == "predictive") return ShrinkPolicy::Kind::predictive;
    if (v == "auto") return ShrinkPolicy::Kind::automatic;
    bad_value(key, v, "give auto, halve, geometric, bisect or predictive", source);
}

inline ShrinkPolicy make_policy(ShrinkPolicy::Kind kind, double factor) {
    switch (kind) {
        case ShrinkPolicy::Kind::halve: return ShrinkPolicy::halve();
        case ShrinkPolicy::Kind::geometric: return ShrinkPolicy::geometric(factor);
        case ShrinkPolicy::Kind::bisect: return ShrinkPolicy::bisect();
        case ShrinkPolicy::Kind::automatic: return ShrinkPolicy::automatic();
        default: return ShrinkPolicy::predictive();
    }
}

inline std::vector<Precision> parse_precisions(std::string_view v, std::string_view key, std::string_view source) {
    std::vector<Precision> ladder;
    std::size_t p = 0;
    while (true) {
        // '>' reads as the ladder; ',' is for a command line, where an unquoted '>'
        // is the shell's redirection (OOMGUARD_CONF's entries are split at ',' first).
        std::size_t gt = v.find_first_of(">,", p);
        std::string_view name = trim(v.substr(p, gt == std::string_view::npos ? gt : gt - p));
        Precision pr = Precision::fp32;
        if (name == "fp32") pr = Precision::fp32;
        else if (name == "tf32") pr = Precision::tf32;
        else if (name == "bf16") pr = Precision::bf16;
        else if (name == "fp16") pr = Precision::fp16;
        else if (name == "fp8") pr = Precision::fp8;
        else bad_value(key, v, "give a ladder of fp32, tf32, bf16, fp16, fp8 joined by '>' or ',', "
                               "for example fp32>bf16>fp16 or fp32,bf16,fp16", source);
        for (Precision q : ladder)
            if (q == pr) bad_value(key, v, "a precision appears twice in the ladder", source);
        if (!ladder.empty() && bytes_per_element(pr) > bytes_per_element(ladder.back()))
            throw config_error(key, v,
                               Message() << "bad value '" << v << "' for " << key << ": " << to_string(pr) << " ("
                                         << bytes_per_element(pr) << " bytes per value) after " << to_string(ladder.back())
                                         << " (" << bytes_per_element(ladder.back())
                                         << ") would go up in memory; order it from the most memory to the least, for example fp32>bf16",
                               source);
        ladder.push_back(pr);
        if (gt == std::string_view::npos) break;
        p = gt + 1;
    }
    return ladder;
}

inline Config parse_config(std::string_view text, std::string_view source) {
    Config c;
    bool seen_budget = false, seen_headroom = false, seen_policy = false, seen_factor = false;
    ShrinkPolicy::Kind policy_kind = ShrinkPolicy::Kind::halve;
    double factor = 0.0;
    if (trim(text).empty()) return c;
    std::size_t pos = 0;
    while (pos <= text.size()) {
        std::size_t comma = text.find(',', pos);
        std::string_view entry =
            trim(text.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos));
        if (entry.empty())
            throw config_error("", "", Message() << "empty entry at offset " << pos << " in '" << text
                                                 << "'; write key=value pairs separated by commas", source);
        std::size_t eq = entry.find('=');
        if (eq == std::string_view::npos) {
            if (entry == "fp32" || entry == "tf32" || entry == "bf16" || entry == "fp16" || entry == "fp8")
                throw config_error(entry, "", Message() << "entry '" << entry << "' has no '=': ',' separates "
                                                        "the entries; join the precision ladder with '>' "
                                                        "(precision=fp32>bf16)", source);
            throw config_error(entry, "", Message() << "entry '" << entry << "' has no '='; write key=value (keys: "
                                                    << config_keys << ")", source);
        }
        std::string_view key = trim(entry.substr(0, eq));
        std::string_view value = trim(entry.substr(eq + 1));
        auto once = [&](bool present) {
            if (present) throw config_error(key, value, Message() << "key '" << key << "' is given twice", source);
        };
        if (key == "budget") {
            once(seen_budget);
            seen_budget = true;
            c.budget = parse_limit(value, key, source);
        } else if (key == "headroom") {
            once(seen_headroom);
            seen_headroom = true;
            c.budget = Limit::headroom(parse_size(value, key, source));
        } else if (key == "min_batch") {
            once(c.min_batch.has_value());
            std::uint64_t n = 0;
            if (!parse_unsigned(value, n) || n == 0 || n > std::numeric_limits<std::size_t>::max())
                bad_value(key, value, "give a whole number >= 1", source);
            c.min_batch = static_cast<std::size_t>(n);
        } else if (key == "max_attempts") {
            once(c.max_attempts.has_value());
            std::uint64_t n = 0;
            if (!parse_unsigned(value, n) || n == 0 || n > 1000)
                bad_value(key, value, "give a whole number in [1, 1000]", source);
            c.max_attempts = static_cast<unsigned>(n);
        } else if (key == "policy") {
            once(seen_policy);
            seen_policy = true;
            policy_kind = parse_policy_kind(value, key, source);
        } else if (key == "factor") {
            once(seen_factor);
            seen_factor = true;
            bool integral = false;
            if (!parse_decimal(value, factor, integral) || !(factor > 0.0 && factor < 1.0))
                bad_value(key, value, "give the geometric policy's factor in (0, 1), for example 0.9", source);
        } else if (key == "grow_after") {
            once(c.grow_after.has_value());
            std::uint64_t n = 0;
            if (!parse_unsigned(value, n) || n > 1000000)
                bad_value(key, value, "give a whole number of global batches in [0, 1000000] (0: never)", source);
            c.grow_after = static_cast<std::size_t>(n);
        } else if (key == "precision") {
            once(!c.precisions.empty());
            c.precisions = parse_precisions(value, key, source);
        } else {
            throw config_error(key, value, Message() << "unknown key '" << key << "'; valid keys: " << config_keys,
                               source);
        }
        if (seen_budget && seen_headroom)
            throw config_error(key, value,
                               Message() << "budget and headroom are both given; they set the same cap, give one",
                               source);
        if (comma == std::string_view::npos) break;
        pos = comma + 1;
    }
    if (seen_factor && (!seen_policy || policy_kind != ShrinkPolicy::Kind::geometric))
        throw config_error("factor", "", Message() << "factor is only for policy=geometric; "
                                                      "add policy=geometric or drop factor", source);
    if (seen_policy) c.policy = make_policy(policy_kind, seen_factor ? factor : 0.9);
    return c;
}

}  // namespace detail

/// Parses "key=value,key=value". Empty text gives an empty Config. Throws
/// config_error naming the key or value at fault; its message starts with `source`.
inline Config parse_config(std::string_view text, std::string_view source = "OOMGUARD_CONF") {
    return detail::parse_config(text, source);
}

/// Reads and parses the environment variable (OOMGUARD_CONF by default); unset
/// gives an empty Config. Errors name the variable.
inline Config config_from_env(char const* variable = "OOMGUARD_CONF") {
    char const* v = std::getenv(variable);
    return v == nullptr ? Config{} : detail::parse_config(v, variable);
}

// One value each, by the rules of the OOMGUARD_CONF key of the same meaning,
// for a program's own flags. `name` is what errors call the value ("--budget").

/// A cap, as budget= reads it: a fraction of the device with a decimal point
/// in (0, 1] (0.9, 1.0), a percentage in (0, 100] (90%), or a size of at
/// least one whole byte (70GiB, 1.5KiB, 4096: a bare number is bytes).
/// Throws config_error naming `name` and the value otherwise (a fraction out
/// of range, 0 bytes, a fraction of a byte, more than size_t holds).
inline Limit parse_limit(std::string_view text, std::string_view name = "budget") {
    return detail::parse_limit(detail::trim(text), name, "");
}
/// A size in bytes: 4096, 512MiB, 1.5GB (units in any case). Digits alone are
/// bytes; a decimal point needs a unit, and the result must be whole bytes.
/// Throws config_error naming `name` and the value otherwise ("1.5", "1.5B",
/// "1.0001KiB", more than size_t holds).
inline std::size_t parse_size(std::string_view text, std::string_view name = "size") {
    return detail::parse_size(detail::trim(text), name, "");
}
/// auto (predictive with a meter, bisect without), halve, geometric (factor 0.9), bisect or predictive.
inline ShrinkPolicy parse_policy(std::string_view text, std::string_view name = "policy") {
    return detail::make_policy(detail::parse_policy_kind(detail::trim(text), name, ""), 0.9);
}
/// A precision ladder, fp32>bf16>fp16 or fp32,bf16,fp16 (a shell leaves ',' alone): no repeats, never more bytes per value than the rung before.
inline std::vector<Precision> parse_precisions(std::string_view text, std::string_view name = "precision") {
    return detail::parse_precisions(detail::trim(text), name, "");
}

/// A budget on `device` of `backend` capped by the Config's budget= or
/// headroom=, else by `fallback`: the one call that honours OOMGUARD_CONF's cap.
///   auto budget = oomguard::make_budget(cuda, 0, oomguard::config_from_env(), oomguard::Limit::fraction(0.9));
template <class Backend>
MemoryBudget<Backend> make_budget(Backend& backend, int device, Config const& config, Limit fallback) {
    return MemoryBudget<Backend>(backend, device, config.limit_or(fallback));
}

}  // namespace oomguard
