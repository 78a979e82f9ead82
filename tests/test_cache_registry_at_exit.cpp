// A registration in an object with static storage built before
// CacheRegistry::global() is first used (a global trainer, a singleton): it is
// destroyed after the global registry at exit, and must find it gone rather
// than touch freed memory. A program of its own: the defect is in the order of
// static destructors, after main() returns. ASan reports a use after free here.
#include <oomguard/cache_registry.hpp>

#include <cstddef>
#include <cstdio>

namespace {
struct Trainer {
    std::size_t cached = 4096;
    oomguard::CacheRegistration workspace;  // registered in main(), after this object was built
    oomguard::CacheRegistration owned;
    std::size_t releasable_bytes() const { return cached; }
    std::size_t release() {
        std::size_t b = cached;
        cached = 0;
        return b;
    }
};
Trainer trainer;  // built before main(), so before the global registry
}  // namespace

int main() {
    oomguard::CacheRegistry& reg = oomguard::CacheRegistry::global();  // first use: built now
    trainer.workspace = reg.add("workspace", 0, trainer);
    trainer.owned = reg.add("owned", 1, [] { return std::size_t{1}; }, [] { return std::size_t{1}; });
    if (reg.release_all().bytes() != 4097) {
        std::fputs("test_cache_registry_at_exit: the release freed the wrong bytes\n", stderr);
        return 1;
    }
    return 0;  // the registry is destroyed first, then `trainer` and its registrations
}
