// The simulator's pointer map keeps every live entry when growing it fails:
// the leak check exists for exactly that failure path.
#include <oomguard/detail/pointer_map.hpp>

#include <doctest/doctest.h>

#include <cstdlib>
#include <new>

namespace {
bool fail_next_new = false;
}  // namespace

// This test program's allocation functions: the next `new` can be made to fail.
void* operator new(std::size_t n) {
    if (fail_next_new) {
        fail_next_new = false;
        throw std::bad_alloc();
    }
    if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

TEST_CASE("a pointer map whose growth fails keeps every entry") {
    oomguard::detail::PointerMap map;
    char keys[9];
    for (int i = 0; i < 8; ++i) map.insert(&keys[i], static_cast<std::size_t>(i) + 1);  // 16 slots, half full
    fail_next_new = true;
    CHECK_THROWS_AS(map.insert(&keys[8], 9), std::bad_alloc);  // the 9th needs 32 slots
    CHECK(map.size() == 8);
    for (int i = 0; i < 8; ++i) {
        std::size_t v = 0;
        CHECK(map.erase(&keys[i], v));
        CHECK(v == static_cast<std::size_t>(i) + 1);
    }
    CHECK(map.size() == 0);
    map.insert(&keys[8], 9);  // and it still grows when memory is there
    CHECK(map.size() == 1);
}
