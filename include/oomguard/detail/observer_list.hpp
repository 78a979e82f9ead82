// The observers of an AdaptiveBatch, shared by the batch and the registrations
// that detach them: whichever of them goes last frees the list. So a
// registration (a Report, a Trace) may die before the batch or after it, and
// the batch may be moved, without anything dangling. Event-agnostic (events
// pass as void const*), so that it needs nothing from adaptive_batch.hpp.
//
// Not thread-safe, as AdaptiveBatch is not: the batch's owner adds, emits and
// detaches on one thread at a time.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace oomguard {
namespace detail {

class ObserverList {
public:
    using Call = void (*)(void* object, void const* event);
    using Destroy = void (*)(void* object) noexcept;

    ObserverList() = default;
    ObserverList(ObserverList const&) = delete;
    ObserverList& operator=(ObserverList const&) = delete;

    // Takes `object` (destroyed by `destroy`) whatever happens; returns its id.
    std::uint64_t add(void* object, Call call, Destroy destroy) {
        try {
            slots_.push_back(Slot{object, call, destroy, next_id_, true});
        } catch (...) {
            destroy(object);
            throw;
        }
        ++live_;
        return next_id_++;
    }

    bool empty() const noexcept { return live_ == 0; }
    bool attached(std::uint64_t id) const noexcept {
        for (auto const& s : slots_)
            if (s.id == id) return s.live;
        return false;
    }

    // Calls every observer attached when it starts, in the order they were
    // added. An observer may detach itself or another from inside its call (it
    // is then skipped, and destroyed once no emit runs) or add one (heard from
    // the next event on). `on_error` runs inside the catch of an observer that threw.
    template <class OnError>
    void emit(void const* event, OnError& on_error) noexcept {
        ++emitting_;
        std::size_t const n = slots_.size();
        for (std::size_t i = 0; i < n; ++i) {
            // By index, fresh each time: an observer that adds one may move the slots.
            if (!slots_[i].live) continue;
            void* const object = slots_[i].object;
            Call const call = slots_[i].call;
            try {
                call(object, event);
            } catch (...) {
                on_error();
            }
        }
        if (--emitting_ == 0 && slots_.size() != live_) sweep();
    }

    // Detaches observer `id`, if the batch still has it.
    void detach(std::uint64_t id) noexcept {
        for (std::size_t i = 0; i < slots_.size(); ++i) {
            Slot& s = slots_[i];
            if (s.id != id || !s.live) continue;
            s.live = false;
            --live_;
            if (emitting_ == 0) sweep();  // else the emit sweeps: the object may be running now
            return;
        }
    }

    // The batch is gone: every observer is dropped, and registrations find nothing.
    void clear() noexcept {
        for (auto& s : slots_) s.live = false;
        live_ = 0;
        sweep();
    }

    void ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
    void unref() noexcept {
        if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            clear();
            delete this;
        }
    }

private:
    struct Slot {
        void* object;
        Call call;
        Destroy destroy;
        std::uint64_t id;
        bool live;
    };

    // Destroys and drops the detached observers. Destroying one may detach
    // another of this list (an observer that owns a Report of the same batch),
    // which re-enters here: the outer sweep goes on until none is left, and a
    // slot leaves the list before its object is destroyed, so no object is
    // destroyed twice.
    void sweep() noexcept {
        if (sweeping_) return;
        sweeping_ = true;
        for (;;) {
            std::size_t i = 0;
            while (i < slots_.size() && slots_[i].live) ++i;
            if (i == slots_.size()) break;
            Slot const dead = slots_[i];
            slots_.erase(slots_.begin() + static_cast<std::ptrdiff_t>(i));  // a trivial type: never throws
            dead.destroy(dead.object);
        }
        sweeping_ = false;
    }

    std::vector<Slot> slots_;
    std::size_t live_ = 0;
    std::uint64_t next_id_ = 1;
    unsigned emitting_ = 0;                // emits running (an observer may cause another)
    bool sweeping_ = false;                // a sweep is destroying observers
    std::atomic<std::size_t> refs_{1};     // the batch's + one per registration
};

// The batch's end of the list: made on the first observe(), moved with the
// batch, cleared when the batch goes.
class Observers {
public:
    Observers() noexcept = default;
    Observers(Observers&& o) noexcept : list_(o.list_) { o.list_ = nullptr; }
    Observers& operator=(Observers&& o) noexcept {
        if (this != &o) {
            drop();
            list_ = o.list_;
            o.list_ = nullptr;
        }
        return *this;
    }
    Observers(Observers const&) = delete;
    Observers& operator=(Observers const&) = delete;
    ~Observers() { drop(); }

    bool empty() const noexcept { return list_ == nullptr || list_->empty(); }

    // Adds an observer; returns the list with a reference for the registration.
    ObserverList* add(void* object, ObserverList::Call call, ObserverList::Destroy destroy, std::uint64_t& id) {
        if (list_ == nullptr) {
            try {
                list_ = new ObserverList();
            } catch (...) {
                destroy(object);
                throw;
            }
        }
        id = list_->add(object, call, destroy);
        list_->ref();
        return list_;
    }

    template <class OnError>
    void emit(void const* event, OnError& on_error) noexcept {
        if (list_ != nullptr) list_->emit(event, on_error);
    }

private:
    void drop() noexcept {
        if (list_ == nullptr) return;
        list_->clear();
        list_->unref();
        list_ = nullptr;
    }

    ObserverList* list_ = nullptr;
};

}  // namespace detail
}  // namespace oomguard
