// libFuzzer target: OOMGUARD_CONF. Any input either parses into values within
// their documented ranges or is rejected with config_error; nothing else.
#include <oomguard/config.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
    std::string_view text(reinterpret_cast<char const*>(data), size);
    try {
        oomguard::Config c = oomguard::parse_config(text);
        if (c.min_batch && *c.min_batch == 0) std::abort();
        if (c.max_attempts && (*c.max_attempts == 0 || *c.max_attempts > 1000)) std::abort();
        if (c.budget && c.budget->type() == oomguard::Limit::kind::fraction &&
            !(c.budget->ratio() > 0.0 && c.budget->ratio() <= 1.0))
            std::abort();
        if (c.policy && c.policy->kind() == oomguard::ShrinkPolicy::Kind::geometric &&
            !(c.policy->factor() > 0.0 && c.policy->factor() < 1.0))
            std::abort();
    } catch (oomguard::config_error const&) {
    }
    return 0;
}
