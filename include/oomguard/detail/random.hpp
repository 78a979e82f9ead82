// A tiny seeded generator (SplitMix64): the same stream from the same seed on
// every standard library, which std::uniform_real_distribution does not promise,
// and without the compile cost of <random>.
#pragma once

#include <cstdint>

namespace oomguard {
namespace detail {

class SplitMix64 {
public:
    explicit SplitMix64(std::uint64_t seed = 0) noexcept : state_(seed) {}
    void seed(std::uint64_t s) noexcept { state_ = s; }
    std::uint64_t next() noexcept {
        std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    /// Uniform in [0, 1) with 53 random bits.
    double uniform() noexcept { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }

private:
    std::uint64_t state_;
};

}  // namespace detail
}  // namespace oomguard
