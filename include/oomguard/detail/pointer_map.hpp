// An open-addressing map from a device pointer to its size, for the simulator's
// leak and bad-free checks. Linear probing with backward-shift deletion: no
// tombstones, so a long soak of allocate/free pairs never degrades it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace oomguard {
namespace detail {

class PointerMap {
public:
    std::size_t size() const noexcept { return size_; }

    /// Inserts or overwrites. May throw std::bad_alloc when it grows; the map
    /// is then as it was.
    void insert(void* key, std::size_t value) {
        if ((size_ + 1) * 2 > slots_.size()) grow();
        place(key, value);
    }

    /// Removes `key`; false when it is not there. Writes its value to `value`.
    bool erase(void* key, std::size_t& value) noexcept {
        if (slots_.empty()) return false;
        std::size_t i = home(key);
        while (slots_[i].key != key) {
            if (slots_[i].key == nullptr) return false;
            i = (i + 1) & mask();
        }
        value = slots_[i].value;
        // Shift later members of the probe run back so lookups need no tombstones.
        std::size_t j = i;
        for (;;) {
            j = (j + 1) & mask();
            if (slots_[j].key == nullptr) break;
            std::size_t h = home(slots_[j].key);
            bool movable = (i <= j) ? (h <= i || h > j) : (h <= i && h > j);
            if (movable) {
                slots_[i] = slots_[j];
                i = j;
            }
        }
        slots_[i] = Slot{};
        --size_;
        return true;
    }

    template <class F>
    void for_each(F&& f) const {
        for (auto const& s : slots_)
            if (s.key != nullptr) f(s.key, s.value);
    }

private:
    struct Slot {
        void* key = nullptr;
        std::size_t value = 0;
    };
    std::size_t mask() const noexcept { return slots_.size() - 1; }
    std::size_t home(void* p) const noexcept {
        std::uint64_t x = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p));
        x ^= x >> 33;
        x *= 0xff51afd7ed558ccdULL;
        x ^= x >> 33;
        return static_cast<std::size_t>(x) & mask();
    }
    // With room assured: never allocates.
    void place(void* key, std::size_t value) noexcept {
        std::size_t i = home(key);
        while (slots_[i].key != nullptr && slots_[i].key != key) i = (i + 1) & mask();
        if (slots_[i].key == nullptr) ++size_;
        slots_[i] = Slot{key, value};
    }
    // The bigger table is allocated before the old one is touched: if that
    // fails, every live entry is still there (the leak check depends on it).
    void grow() {
        std::vector<Slot> table(slots_.empty() ? 16 : slots_.size() * 2);
        table.swap(slots_);
        size_ = 0;
        for (auto const& s : table)
            if (s.key != nullptr) place(s.key, s.value);
    }
    std::vector<Slot> slots_;
    std::size_t size_ = 0;
};

}  // namespace detail
}  // namespace oomguard
