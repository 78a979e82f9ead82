#include <oomguard/config.hpp>
#include <oomguard/recovery_planner.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <cstdlib>
#include <limits>
#include <string>

using namespace oomguard;

TEST_CASE("valid settings") {
    Config c = parse_config("budget=0.9,min_batch=1");
    REQUIRE(c.budget);
    CHECK(c.budget->type() == Limit::kind::fraction);
    CHECK(c.budget->ratio() == doctest::Approx(0.9));
    CHECK(*c.min_batch == 1);
    CHECK_FALSE(c.max_attempts);

    c = parse_config("  budget = 70GiB ,\tmax_attempts=8 ");
    CHECK(c.budget->type() == Limit::kind::bytes);
    CHECK(c.budget->amount() == (70ull << 30));
    CHECK(*c.max_attempts == 8);

    CHECK(parse_config("budget=90%").budget->ratio() == doctest::Approx(0.9));
    CHECK(parse_config("budget=1.0").budget->ratio() == doctest::Approx(1.0));
    CHECK(parse_config("budget=1.5GB").budget->amount() == 1500000000ull);
    CHECK(parse_config("budget=512 MiB").budget->amount() == (512ull << 20));
    CHECK(parse_config("headroom=2GiB").budget->type() == Limit::kind::headroom);
    CHECK(parse_config("headroom=0").budget->amount() == 0);
    CHECK(parse_config("headroom=4096").budget->amount() == 4096);
    CHECK_FALSE(parse_config("").budget);
    CHECK_FALSE(parse_config("   ").min_batch);
}

TEST_CASE("every bad entry names itself and what is valid") {
    struct Case {
        char const* text;
        char const* key;
        char const* says;
    };
    Case const cases[] = {
        {"budgt=0.9", "budgt", "unknown key 'budgt'; valid keys: budget, headroom, min_batch, max_attempts, policy"},
        {"budget=0", "budget", "bad value '0' for budget"},
        {"budget=1.2", "budget", "fraction of device memory in (0, 1]"},
        {"budget=5.0", "budget", "bad value '5.0'"},
        {"budget=-0.5", "budget", "bad value '-0.5'"},
        {"budget=nan", "budget", "bad value 'nan'"},
        {"budget=1e9", "budget", "bad value '1e9'"},
        {"budget=150%", "budget", "bad value '150%'"},
        {"budget=0%", "budget", "bad value '0%'"},
        {"budget=10XB", "budget", "bad value '10XB'"},
        {"budget=0GiB", "budget", "bad value '0GiB'"},
        {"budget=99999999999TiB", "budget", "bad value '99999999999TiB'"},
        {"budget=", "budget", "bad value ''"},
        {"headroom=lots", "headroom", "bad value 'lots' for headroom"},
        {"min_batch=0", "min_batch", "bad value '0' for min_batch: give a whole number >= 1"},
        {"min_batch=2.5", "min_batch", "bad value '2.5'"},
        {"min_batch=-1", "min_batch", "bad value '-1'"},
        {"min_batch=99999999999999999999999", "min_batch", "bad value '99999999999999999999999'"},
        {"max_attempts=0", "max_attempts", "[1, 1000]"},
        {"max_attempts=1001", "max_attempts", "bad value '1001'"},
        {"min_batch=1,min_batch=2", "min_batch", "given twice"},
        {"budget=0.5,headroom=1GiB", "headroom", "both given"},
        {"budget", "budget", "has no '='"},
        {"budget=0.9,", "", "empty entry"},
        {",budget=0.9", "", "empty entry"},
        {"budget=0.9,,min_batch=1", "", "empty entry"},
    };
    for (auto const& c : cases) {
        CAPTURE(c.text);
        try {
            parse_config(c.text);
            FAIL("expected config_error");
        } catch (config_error const& e) {
            CHECK(e.key() == c.key);
            CHECK(std::string(e.what()).find(c.says) != std::string::npos);
        }
    }
}

TEST_CASE("config_from_env reads OOMGUARD_CONF") {
    ::setenv("OOMGUARD_TEST_CONF", "min_batch=4", 1);
    CHECK(*config_from_env("OOMGUARD_TEST_CONF").min_batch == 4);
    ::setenv("OOMGUARD_TEST_CONF", "min_batch=x", 1);
    CHECK_THROWS_AS(config_from_env("OOMGUARD_TEST_CONF"), config_error);
    ::unsetenv("OOMGUARD_TEST_CONF");
    CHECK_FALSE(config_from_env("OOMGUARD_TEST_CONF").min_batch);
}

TEST_CASE("adaptive_batch keys") {
    Config c = parse_config("policy=geometric, factor=0.8, grow_after=10, precision=fp32>bf16>fp16, min_batch=4");
    REQUIRE(c.policy);
    CHECK(c.policy->kind() == ShrinkPolicy::Kind::geometric);
    CHECK(c.policy->factor() == doctest::Approx(0.8));
    CHECK(*c.grow_after == 10);
    CHECK(c.precisions == std::vector<Precision>{Precision::fp32, Precision::bf16, Precision::fp16});
    CHECK(parse_config("policy=predictive").policy->kind() == ShrinkPolicy::Kind::predictive);
    CHECK(parse_config("policy=geometric").policy->factor() == doctest::Approx(0.9));

    struct Case {
        char const* text;
        char const* says;
    };
    Case const bad[] = {
        {"policy=shrink", "give auto, halve, geometric, bisect or predictive"},
        {"factor=0.9", "factor is only for policy=geometric"},
        {"policy=halve,factor=0.5", "factor is only for policy=geometric"},
        {"policy=geometric,factor=1", "bad value '1' for factor"},
        {"policy=geometric,factor=0", "bad value '0' for factor"},
        {"grow_after=-1", "bad value '-1' for grow_after"},
        {"precision=fp32>fp64", "bad value 'fp32>fp64' for precision"},
        {"precision=fp32>>bf16", "bad value 'fp32>>bf16'"},
        {"precision=fp16>fp16", "appears twice"},
        {"precision=", "bad value ''"},
    };
    for (auto const& b : bad) {
        CAPTURE(b.text);
        CHECK_THROWS_WITH_AS(parse_config(b.text), doctest::Contains(b.says), config_error);
    }
}

TEST_CASE("a precision ladder goes down in memory, never up") {
    CHECK_THROWS_WITH_AS(parse_config("precision=bf16>fp32"),
                         doctest::Contains("fp32 (4 bytes per value) after bf16 (2)"), config_error);
    CHECK_THROWS_WITH_AS(parse_config("precision=fp32>fp8>fp16"), doctest::Contains("fp16 (2 bytes per value) after fp8 (1)"),
                         config_error);
    // Equal sizes are a rung: tf32 computes faster in fp32's bytes; fp16 has bf16's bytes and less range.
    CHECK(parse_config("precision=fp32>tf32>bf16>fp16>fp8").precisions.size() == 5);
    BatchOptions o;
    o.global_batch = 8;
    o.precisions = {Precision::fp16, Precision::fp32};
    CHECK_THROWS_WITH_AS(RecoveryPlanner{o}, doctest::Contains("fp32 (4 bytes per value) after fp16 (2)"),
                         std::invalid_argument);
}

TEST_CASE("units are read whatever their case; a size without one is bytes") {
    CHECK(parse_size("1mb") == 1000000u);
    CHECK(parse_size("1MB") == 1000000u);
    CHECK(parse_size("1mib") == (1u << 20));
    CHECK(parse_size("2 GiB") == (2ull << 30));
    CHECK(parse_size("4096") == 4096u);
    CHECK(parse_size("3b") == 3u);
    CHECK_THROWS_WITH_AS(parse_size("1m", "--device-memory"),
                         doctest::Contains("bad value '1m' for --device-memory: give a size"), config_error);
    CHECK(parse_config("budget=512mib").budget->amount() == (512ull << 20));
    CHECK(parse_size("1.5KiB") == 1536u);
    for (char const* fractional_bytes : {"1.5", "1.5B", "0.5", "1000.9"})
        CHECK_THROWS_WITH_AS(parse_size(fractional_bytes, "--device-memory"), doctest::Contains("whole bytes"),
                             config_error);
}

TEST_CASE("one value parsed on its own names its flag, not OOMGUARD_CONF") {
    try {
        parse_limit("1.5", "--budget");
        FAIL("expected config_error");
    } catch (config_error const& e) {
        std::string w = e.what();
        CHECK(w.find("OOMGUARD_CONF") == std::string::npos);
        CHECK(w.find("bad value '1.5' for --budget: give a fraction") != std::string::npos);
        CHECK(e.key() == "--budget");
        CHECK(e.value() == "1.5");
    }
    CHECK(parse_limit("90%").ratio() == doctest::Approx(0.9));
    CHECK(parse_policy("bisect").kind() == ShrinkPolicy::Kind::bisect);
    CHECK_THROWS_WITH_AS(parse_policy("fast", "--policy"), doctest::Contains("bad value 'fast' for --policy"),
                         config_error);
    CHECK(parse_precisions("fp32>bf16") == std::vector<Precision>{Precision::fp32, Precision::bf16});
    CHECK_THROWS_WITH_AS(parse_precisions("bf16>fp32", "--precision"),
                         doctest::Contains("bad value 'bf16>fp32' for --precision"), config_error);
    // ',' too: an unquoted '>' on a command line is the shell's redirection.
    CHECK(parse_precisions("fp32,bf16") == std::vector<Precision>{Precision::fp32, Precision::bf16});
    CHECK(parse_precisions(" fp32 , bf16>fp16 ") ==
          std::vector<Precision>{Precision::fp32, Precision::bf16, Precision::fp16});
    for (char const* bad : {"fp32,", ",bf16", "fp32,,bf16", "fp32>,bf16"})
        CHECK_THROWS_WITH_AS(parse_precisions(bad, "--precision"),
                             doctest::Contains("joined by '>' or ',', for example fp32>bf16>fp16 or fp32,bf16,fp16"),
                             config_error);
    CHECK_THROWS_WITH_AS(parse_precisions("bf16,fp32", "--precision"),
                         doctest::Contains("bad value 'bf16,fp32' for --precision: fp32 (4 bytes per value) after bf16"),
                         config_error);
    // In OOMGUARD_CONF ',' separates the entries: the error says to join the ladder with '>'.
    CHECK_THROWS_WITH_AS(parse_config("precision=fp32,bf16"),
                         doctest::Contains("entry 'bf16' has no '=': ',' separates the entries; join the precision "
                                           "ladder with '>' (precision=fp32>bf16)"),
                         config_error);
}

TEST_CASE("config_from_env names the variable it read") {
    ::setenv("OOMGUARD_TEST_CONF", "nonsense=1", 1);
    CHECK_THROWS_WITH_AS(config_from_env("OOMGUARD_TEST_CONF"),
                         doctest::Contains("oomguard: OOMGUARD_TEST_CONF: unknown key 'nonsense'"), config_error);
    ::unsetenv("OOMGUARD_TEST_CONF");
}

TEST_CASE("a budget built from a Config in one call, its cap from budget= or headroom=, else the fallback") {
    SimulatedDevices sim(1, 1000);
    auto a = make_budget(sim, 0, parse_config("budget=0.5"), Limit::fraction(0.9));
    CHECK(a.limit() == 500);
    auto b = make_budget(sim, 0, parse_config("headroom=100"), Limit::fraction(0.9));
    CHECK(b.limit() == 900);
    auto c = make_budget(sim, 0, parse_config("min_batch=2"), Limit::fraction(0.9));
    CHECK(c.limit() == 900);
    CHECK(parse_config("min_batch=2").limit_or(Limit::bytes(7)).amount() == 7);
    CHECK(parse_config("budget=3KiB").limit_or(Limit::bytes(7)).amount() == 3072);
}

TEST_CASE("a size is whole bytes: a fraction of a byte is refused, never truncated") {
    CHECK(parse_size("1.5KiB") == 1536u);
    CHECK(parse_size("0.5KiB") == 512u);
    CHECK(parse_size("1.00KiB") == 1024u);           // trailing zeros are still whole
    CHECK(parse_size("0.0009765625KiB") == 1u);      // 2^-10 KiB: one byte exactly
    CHECK(parse_size("0.001KB") == 1u);
    CHECK(parse_size("1.1KB") == 1100u);             // exact, where a double gives 1100.0000000000002
    CHECK(parse_size("0.3MB") == 300000u);
    CHECK(parse_size("1.0B") == 1u);
    CHECK(parse_size("1TiB") == (std::size_t{1} << 40));
    struct Case {
        char const* text;
        char const* says;
    };
    Case const bad[] = {
        {"1.0001KiB", "bad value '1.0001KiB' for --headroom: not a whole number of bytes (between 1024 and 1025)"},
        {"0.0001KiB", "not a whole number of bytes (between 0 and 1)"},
        {"0.00097656KiB", "not a whole number of bytes (between 0 and 1)"},
        {"1.5B", "not a whole number of bytes (between 1 and 2)"},
        {"0.0000001MB", "not a whole number of bytes (between 0 and 1)"},
        {"1.5", "whole bytes"},                      // no unit: a bare number is whole bytes
        {"1.0", "whole bytes"},
        {"20000000TiB", "more than 18446744073709551615 bytes"},
        {"18446744073709551616", "more than 18446744073709551615 bytes"},
    };
    for (auto const& b : bad) {
        std::string text = b.text;
        CAPTURE(text);
        CHECK_THROWS_WITH_AS(parse_size(b.text, "--headroom"), doctest::Contains(b.says), config_error);
    }
    CHECK(parse_size("18446744073709551615") == std::numeric_limits<std::size_t>::max());
    // headroom= and budget= take the same rule, and name the variable.
    CHECK_THROWS_WITH_AS(parse_config("headroom=0.0001KiB"),
                         doctest::Contains("OOMGUARD_CONF: bad value '0.0001KiB' for headroom: not a whole number"),
                         config_error);
    CHECK_THROWS_WITH_AS(parse_config("budget=1.0001KiB"),
                         doctest::Contains("OOMGUARD_CONF: bad value '1.0001KiB' for budget: not a whole number"),
                         config_error);
    CHECK(parse_config("budget=0.5KiB").budget->amount() == 512u);
}

TEST_CASE("budget=: a bare number is bytes, a fraction has a decimal point, a percentage a '%'") {
    // Bytes: digits alone, or a unit.
    Limit l = parse_limit("1024");
    CHECK(l.type() == Limit::kind::bytes);
    CHECK(l.amount() == 1024u);
    CHECK(parse_limit("1").type() == Limit::kind::bytes);
    CHECK(parse_limit("1").amount() == 1u);
    CHECK(parse_config("budget=4096").budget->amount() == 4096u);
    CHECK(parse_limit("281474976710655").amount() == 281474976710655u);
    // A fraction: a decimal point, in (0, 1].
    CHECK(parse_limit("1.0").type() == Limit::kind::fraction);
    CHECK(parse_limit("1.0").ratio() == doctest::Approx(1.0));
    CHECK(parse_limit("0.9").ratio() == doctest::Approx(0.9));
    CHECK(parse_limit("0.0001").ratio() == doctest::Approx(0.0001));
    CHECK(parse_limit(".5").ratio() == doctest::Approx(0.5));
    // A percentage, in (0, 100].
    CHECK(parse_limit("100%").ratio() == doctest::Approx(1.0));
    CHECK(parse_limit("0.5%").ratio() == doctest::Approx(0.005));
    struct Case {
        char const* text;
        char const* says;
    };
    Case const bad[] = {
        {"0", "bad value '0' for --budget: a budget of 0 bytes allows nothing"},
        {"0B", "a budget of 0 bytes allows nothing"},
        {"0.0", "bad value '0.0' for --budget: give a fraction"},
        {"1.00001", "bad value '1.00001' for --budget: give a fraction"},
        {"2.0", "give a fraction of device memory in (0, 1] with a decimal point"},
        {"100.5%", "bad value '100.5%'"},
        {"18446744073709551616", "more than 18446744073709551615 bytes"},
        {"1.5B", "not a whole number of bytes (between 1 and 2)"},
        {".", "bad value '.' for --budget: give a fraction"},
        {"%", "bad value '%' for --budget"},
    };
    for (auto const& b : bad) {
        std::string text = b.text;
        CAPTURE(text);
        CHECK_THROWS_WITH_AS(parse_limit(b.text, "--budget"), doctest::Contains(b.says), config_error);
    }
}
