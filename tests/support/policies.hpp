// Every shrink policy, for tests that must hold under each one.
#pragma once

#include <oomguard/shrink_policy.hpp>

#include <vector>

namespace test_support {

inline std::vector<oomguard::ShrinkPolicy> every_policy() {
    using oomguard::ShrinkPolicy;
    return {ShrinkPolicy::halve(), ShrinkPolicy::geometric(0.9), ShrinkPolicy::bisect(), ShrinkPolicy::predictive(),
            ShrinkPolicy::custom(
                [](oomguard::ShrinkContext const& c, void*) { return c.minimum + (c.failed - c.minimum) / 3; },
                nullptr, "third")};
}

}  // namespace test_support
