// detail/std_throw.hpp: the core throws the standard library's own types without
// parsing <stdexcept>. Built twice: with libstdc++'s out-of-line throwers (the
// default under g++ and clang++ here) and with OOMGUARD_PORTABLE_THROW=1 (what
// every other standard library gets). Both must throw the same types and texts.
#include <oomguard/detail/std_throw.hpp>

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>

using namespace oomguard;

#ifndef OOMGUARD_EXPECT_PORTABLE
#error "the build sets OOMGUARD_EXPECT_PORTABLE to the path this executable must take"
#endif

TEST_CASE("the expected path is compiled") {
    CHECK(OOMGUARD_PORTABLE_THROW == OOMGUARD_EXPECT_PORTABLE);
}

TEST_CASE("each helper throws its standard type with the given text") {
    CHECK_THROWS_WITH_AS(detail::throw_invalid("bad value 7"), "bad value 7", std::invalid_argument);
    CHECK_THROWS_WITH_AS(detail::throw_invalid(detail::Message() << "bad value " << 8 << "; give 1 to 4"),
                         "bad value 8; give 1 to 4", std::invalid_argument);
    CHECK_THROWS_WITH_AS(detail::throw_length(detail::Message() << "size " << 9ull << " overflows"),
                         "size 9 overflows", std::length_error);
    CHECK_THROWS_WITH_AS(detail::throw_logic("callback broke its contract"), "callback broke its contract",
                         std::logic_error);
    // The standard hierarchy holds: all three are logic errors, none a runtime error.
    CHECK_THROWS_AS(detail::throw_invalid("x"), std::logic_error);
    CHECK_THROWS_AS(detail::throw_length("x"), std::logic_error);
    bool runtime = false;
    try {
        detail::throw_invalid("x");
    } catch (std::runtime_error const&) {
        runtime = true;
    } catch (std::exception const&) {
    }
    CHECK_FALSE(runtime);
}

TEST_CASE("a long message arrives whole up to Message's bound") {
    std::string const text(900, 'z');
    try {
        detail::throw_invalid(detail::Message() << text);
        FAIL("no throw");
    } catch (std::invalid_argument const& e) {
        CHECK(std::string(e.what()) == text);
    }
}
