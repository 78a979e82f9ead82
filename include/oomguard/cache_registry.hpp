// A registry of releasable caches: the one place "empty the cache" reaches every
// cache a program has (the CUDA default pool, CUB and Thrust pools, a KV cache,
// a workspace). Registration is RAII; releases run cheapest-first; a cache that
// throws does not stop the others, and its failure is reported.
#pragma once

#include <oomguard/detail/format.hpp>
#include <oomguard/detail/std_throw.hpp>
#include <oomguard/detail/spin_mutex.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>
#include <string_view>
#include <utility>
#include <vector>

namespace oomguard {

/// A cache's name: 1 to 63 characters, kept inline (CacheRegistry::add refuses others).
using CacheName = detail::FixedText<64>;
/// A failed release's what(), kept inline: cut to 255 characters ending in "...".
using CacheErrorText = detail::FixedText<256>;

/// What one cache gave back in a release.
struct CacheRelease {
    CacheName name;
    int priority = 0;
    std::size_t bytes = 0;       ///< bytes the cache says it freed
    bool failed = false;         ///< its release() threw
    CacheErrorText error;        ///< what() of that exception
    std::exception_ptr exception;  ///< that exception, to rethrow unchanged
};

/// What a release of the registry did, cache by cache, in the order they ran.
struct ReleaseReport {
    std::vector<CacheRelease> caches;
    bool skipped = false;  ///< a pressure-only release found no pressure and did nothing

    std::size_t bytes() const noexcept {
        std::size_t s = 0;
        for (auto const& c : caches) s += c.bytes;
        return s;
    }
    std::size_t failures() const noexcept {
        std::size_t n = 0;
        for (auto const& c : caches) n += c.failed ? 1 : 0;
        return n;
    }
    /// Rethrows, unchanged, what the first cache that failed threw (a sticky
    /// CUDA error, say), passing over failures that `absorb` accepts (give
    /// is_device_oom: a cache that ran out of memory while releasing freed
    /// nothing, and recovery goes on); returns when no other cache failed.
    void rethrow_failure(bool (*absorb)(std::exception_ptr const&) noexcept = nullptr) const {
        for (auto const& c : caches)
            if (c.failed && c.exception && (absorb == nullptr || !absorb(c.exception)))
                std::rethrow_exception(c.exception);
    }
};

namespace detail {
// One registered cache. Type-erased through function pointers (no <functional>).
struct CacheEntry {
    CacheName name;
    int priority = 0;
    void* object = nullptr;
    std::size_t (*releasable)(void*) = nullptr;
    std::size_t (*release)(void*) = nullptr;
    void (*destroy)(void*) = nullptr;   // owns `object` when set
    std::atomic<int> in_use{0};         // releases running on it now
    std::atomic<bool> removed{false};
    std::atomic<int> refs{1};           // the registry's reference + snapshots
    std::uint64_t order = 0;            // registration order breaks priority ties

    void unref() noexcept {
        if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            if (destroy != nullptr) destroy(object);
            delete this;
        }
    }
};
}  // namespace detail

class CacheRegistry;

/// RAII registration: unregisters on destruction. Unregistering waits for a
/// release of this cache running on another thread to finish, so the cache object
/// may be destroyed right after. Move-only.
class CacheRegistration {
public:
    CacheRegistration() noexcept = default;
    CacheRegistration(CacheRegistration&& o) noexcept : registry_(o.registry_), entry_(o.entry_) {
        o.registry_ = nullptr;
        o.entry_ = nullptr;
    }
    CacheRegistration& operator=(CacheRegistration&& o) noexcept {
        if (this != &o) {
            reset();
            registry_ = o.registry_;
            entry_ = o.entry_;
            o.registry_ = nullptr;
            o.entry_ = nullptr;
        }
        return *this;
    }
    CacheRegistration(CacheRegistration const&) = delete;
    CacheRegistration& operator=(CacheRegistration const&) = delete;
    ~CacheRegistration() { reset(); }

    explicit operator bool() const noexcept { return entry_ != nullptr; }
    /// Unregisters now (waits for an in-flight release of this cache; so a cache
    /// must not unregister itself from inside its own release()).
    inline void reset() noexcept;

private:
    friend class CacheRegistry;
    CacheRegistration(CacheRegistry* r, detail::CacheEntry* e) noexcept : registry_(r), entry_(e) {}
    CacheRegistry* registry_ = nullptr;
    detail::CacheEntry* entry_ = nullptr;
};

/// The registry. Usually the process-wide `CacheRegistry::global()`; tests and
/// libraries may keep their own. Thread-safe.
class CacheRegistry {
public:
    CacheRegistry() = default;
    CacheRegistry(CacheRegistry const&) = delete;
    CacheRegistry& operator=(CacheRegistry const&) = delete;
    ~CacheRegistry() {
        for (auto* e : entries_) e->unref();
    }

    /// The process-wide registry that ScopedCacheRelease and adaptive_batch use by default.
    static CacheRegistry& global() {
        static CacheRegistry r;
        return r;
    }

    /// Registers `cache`, an object with `std::size_t releasable_bytes()` (an
    /// estimate of what release() would free) and `std::size_t release()` (frees,
    /// returns the bytes freed). Lower `priority` runs first: give the caches that
    /// are cheapest to rebuild the lowest. `cache` must outlive the registration.
    /// `name` names it in reports: 1 to 63 characters.
    template <class Cache>
    [[nodiscard]] CacheRegistration add(std::string_view name, int priority, Cache& cache) {
        auto* e = make_entry(name, priority);
        e->object = &cache;
        e->releasable = [](void* o) -> std::size_t { return static_cast<Cache*>(o)->releasable_bytes(); };
        e->release = [](void* o) -> std::size_t { return static_cast<Cache*>(o)->release(); };
        return insert(e);
    }

    /// Registers a cache given as two callables, which the registry owns.
    template <class Releasable, class Release>
    [[nodiscard]] CacheRegistration add(std::string_view name, int priority, Releasable releasable,
                                        Release release) {
        struct Holder {
            Releasable a;
            Release b;
        };
        auto* e = make_entry(name, priority);
        try {
            e->object = new Holder{std::move(releasable), std::move(release)};
        } catch (...) {
            delete e;
            throw;
        }
        e->destroy = [](void* o) { delete static_cast<Holder*>(o); };
        e->releasable = [](void* o) -> std::size_t { return static_cast<Holder*>(o)->a(); };
        e->release = [](void* o) -> std::size_t { return static_cast<Holder*>(o)->b(); };
        return insert(e);
    }

    /// Registered caches.
    std::size_t size() const noexcept {
        detail::SpinLock lock(mutex_);
        return entries_.size();
    }

    /// Sum of every cache's estimate. A cache whose estimate throws counts 0.
    std::size_t releasable_bytes() const {
        auto snap = snapshot();
        std::size_t s = 0;
        for (auto* e : snap) {
            if (enter(e)) {
                try {
                    s += e->releasable(e->object);
                } catch (...) {
                }
                leave(e);
            }
            e->unref();
        }
        return s;
    }

    /// Releases every cache, lowest priority first (registration order among
    /// equals), and reports what each gave back. Never stops early: a cache that
    /// throws is recorded as failed and the others still run. A cache unregistered
    /// while this runs is skipped if it has not started.
    ReleaseReport release_all() {
        ReleaseReport report;
        auto snap = snapshot();
        struct Unref {
            std::vector<detail::CacheEntry*>& v;
            ~Unref() {
                for (auto* e : v) e->unref();
            }
        } unref{snap};
        report.caches.reserve(snap.size());
        for (auto* e : snap) {
            if (!enter(e)) continue;
            CacheRelease r;
            r.name = e->name;
            r.priority = e->priority;
            try {
                r.bytes = e->release(e->object);
            } catch (std::exception const& ex) {
                r.failed = true;
                r.error = CacheErrorText(ex.what() != nullptr ? ex.what() : "(null what())");
                r.exception = std::current_exception();
            } catch (...) {
                r.failed = true;
                r.error = CacheErrorText("unknown exception");
                r.exception = std::current_exception();
            }
            leave(e);
            report.caches.push_back(std::move(r));
        }
        return report;
    }

private:
    friend class CacheRegistration;

    detail::CacheEntry* make_entry(std::string_view name, int priority) {
        if (name.empty())
            detail::throw_invalid("oomguard: CacheRegistry::add: a cache needs a non-empty name");
        if (!CacheName::fits(name))
            detail::throw_invalid(detail::Message()
                                  << "oomguard: CacheRegistry::add: the name '" << name << "' is " << name.size()
                                  << " characters; give one of 1 to " << CacheName::capacity);
        auto* e = new detail::CacheEntry();
        e->name = CacheName(name);
        e->priority = priority;
        return e;
    }

    CacheRegistration insert(detail::CacheEntry* e) {
        try {
            detail::SpinLock lock(mutex_);
            e->order = next_order_++;
            // Keep the list sorted by (priority, order): a release walks it as is.
            auto it = entries_.begin();
            while (it != entries_.end() && (*it)->priority <= e->priority) ++it;
            entries_.insert(it, e);
        } catch (...) {
            e->unref();
            throw;
        }
        return CacheRegistration(this, e);
    }

    std::vector<detail::CacheEntry*> snapshot() const {
        detail::SpinLock lock(mutex_);
        std::vector<detail::CacheEntry*> v(entries_);
        for (auto* e : v) e->refs.fetch_add(1, std::memory_order_relaxed);
        return v;
    }

    // A release may start on an entry only while it is registered; unregistering
    // waits for the ones that started.
    // Sequentially consistent on both sides (a store then a load each, Dekker
    // style): either the release sees `removed`, or the remover sees `in_use`.
    static bool enter(detail::CacheEntry* e) noexcept {
        e->in_use.fetch_add(1, std::memory_order_seq_cst);
        if (e->removed.load(std::memory_order_seq_cst)) {
            e->in_use.fetch_sub(1, std::memory_order_acq_rel);
            return false;
        }
        return true;
    }
    static void leave(detail::CacheEntry* e) noexcept { e->in_use.fetch_sub(1, std::memory_order_acq_rel); }

    void remove(detail::CacheEntry* e) noexcept {
        e->removed.store(true, std::memory_order_seq_cst);
        {
            detail::SpinLock lock(mutex_);
            for (auto it = entries_.begin(); it != entries_.end(); ++it) {
                if (*it == e) {
                    entries_.erase(it);
                    break;
                }
            }
        }
        while (e->in_use.load(std::memory_order_seq_cst) != 0) detail::yield_cpu();
        e->unref();
    }

    mutable detail::SpinMutex mutex_;
    std::vector<detail::CacheEntry*> entries_;
    std::uint64_t next_order_ = 0;
};

inline void CacheRegistration::reset() noexcept {
    if (entry_ != nullptr) registry_->remove(entry_);
    registry_ = nullptr;
    entry_ = nullptr;
}

}  // namespace oomguard
