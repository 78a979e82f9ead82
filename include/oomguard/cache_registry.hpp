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
    CacheName name;              ///< the name it was registered under
    int priority = 0;            ///< its priority (lower ran first)
    std::size_t bytes = 0;       ///< bytes the cache says it freed
    bool failed = false;         ///< its release() threw
    /// Another call was releasing this cache already: this one did not run its
    /// release() again and counts 0 bytes for it (it waited for that release to
    /// finish first, unless it was itself called from inside a cache's release()).
    bool concurrent = false;
    CacheErrorText error;        ///< what() of that exception
    std::exception_ptr exception;  ///< that exception, to rethrow unchanged
};

/// What a release of the registry did, cache by cache, in the order they ran.
struct ReleaseReport {
    std::vector<CacheRelease> caches;  ///< one entry per registered cache, in the order they ran
    bool skipped = false;  ///< a pressure-only release found no pressure and did nothing

    /// Bytes every cache says it freed, summed.
    std::size_t bytes() const noexcept {
        std::size_t s = 0;
        for (auto const& c : caches) s += c.bytes;
        return s;
    }
    /// Caches whose release() threw.
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
    std::atomic<int> busy{0};           // who is inside the cache: 0 nobody, or a CacheCall
    std::atomic<unsigned> releases{0};  // releases that have ended: a waiter waits for the next
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

// Which call of the registry is inside a cache: the registry enters each cache
// on one thread at a time (most caches are not thread-safe: a workspace, a
// Thrust unsynchronized pool), for a release or an estimate.
enum CacheCall : int { cache_idle = 0, cache_releasing = 1, cache_estimating = 2 };

// How deep this thread is in calls into caches. A call of the registry made
// from inside a cache (a release that releases the registry again) never waits
// for another cache: two such waits on two threads could wait for each other.
// A call from outside waits holding no cache, so waits never form a cycle.
inline int& cache_call_depth() noexcept {
    static thread_local int depth = 0;
    return depth;
}
struct CacheCallScope {
    CacheCallScope() noexcept { ++cache_call_depth(); }
    ~CacheCallScope() { --cache_call_depth(); }
    CacheCallScope(CacheCallScope const&) = delete;
    CacheCallScope& operator=(CacheCallScope const&) = delete;
};

// A registry's state, shared by the registry and its registrations: whichever
// of them goes last frees it. So a registration destroyed after its registry
// (one in an object with static storage built before CacheRegistry::global(),
// a local registry declared after its registrations) finds the registry gone
// instead of touching freed memory.
struct CacheRegistryState {
    SpinMutex mutex;
    std::vector<CacheEntry*> entries;  // sorted by (priority, order)
    std::uint64_t next_order = 0;
    std::atomic<bool> gone{false};     // the registry was destroyed (set under `mutex`)
    std::atomic<std::size_t> refs{1};  // the registry + one per registration

    void unref() noexcept {
        if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
    }
};
}  // namespace detail

class CacheRegistry;

/// RAII registration: unregisters on destruction. Unregistering waits for a
/// release of this cache running on another thread to finish, so the cache object
/// may be destroyed right after. Move-only.
///
/// A registration may outlive its registry (one in an object with static
/// storage built before CacheRegistry::global() was first used, which is
/// destroyed after it at exit): the registry let go of the cache when it was
/// destroyed, and the registration is then inert.
class CacheRegistration {
public:
    /// Holds no registration.
    CacheRegistration() noexcept = default;
    /// Takes `o`'s registration; `o` holds none after.
    CacheRegistration(CacheRegistration&& o) noexcept : state_(o.state_), entry_(o.entry_) {
        o.state_ = nullptr;
        o.entry_ = nullptr;
    }
    /// Unregisters what this holds, then takes `o`'s registration.
    CacheRegistration& operator=(CacheRegistration&& o) noexcept {
        if (this != &o) {
            reset();
            state_ = o.state_;
            entry_ = o.entry_;
            o.state_ = nullptr;
            o.entry_ = nullptr;
        }
        return *this;
    }
    CacheRegistration(CacheRegistration const&) = delete;
    CacheRegistration& operator=(CacheRegistration const&) = delete;
    /// Unregisters (see reset()).
    ~CacheRegistration() { reset(); }

    /// Whether the cache is registered: false after reset() or a move, and
    /// once its registry has been destroyed.
    explicit operator bool() const noexcept {
        return entry_ != nullptr && !state_->gone.load(std::memory_order_acquire);
    }
    /// Unregisters now (waits for an in-flight release of this cache; so a cache
    /// must not unregister itself from inside its own release()). Does nothing
    /// more when the registry is already gone.
    inline void reset() noexcept;

private:
    friend class CacheRegistry;
    CacheRegistration(detail::CacheRegistryState* s, detail::CacheEntry* e) noexcept : state_(s), entry_(e) {}
    detail::CacheRegistryState* state_ = nullptr;  // one reference, held while entry_ is set
    detail::CacheEntry* entry_ = nullptr;          // owned by the state's list while both live
};

/// The registry. Usually the process-wide `CacheRegistry::global()`; tests and
/// libraries may keep their own. Thread-safe.
class CacheRegistry {
public:
    /// An empty registry. Throws std::bad_alloc.
    CacheRegistry() : state_(new detail::CacheRegistryState()) {}
    CacheRegistry(CacheRegistry const&) = delete;
    CacheRegistry& operator=(CacheRegistry const&) = delete;
    /// Lets go of every cache still registered (and destroys the callables it
    /// owns); their registrations become inert. No release may be running.
    ~CacheRegistry() {
        std::vector<detail::CacheEntry*> left;
        {
            detail::SpinLock lock(state_->mutex);
            state_->gone.store(true, std::memory_order_release);
            left.swap(state_->entries);
        }
        for (auto* e : left) e->unref();
        state_->unref();
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
    /// `name` names it in reports: 1 to 63 characters (std::invalid_argument otherwise).
    ///
    /// Neither member needs to be thread-safe: the registry enters a cache on
    /// one thread at a time. When threads release the registry together (ranks
    /// that ran out of memory in the same attempt), a cache's release() runs
    /// once; the others wait for it and count 0 bytes for that cache. A member
    /// may call the registry again on its own thread, but must not wait for
    /// another thread that does (that thread would wait for it).
    template <class Cache>
    [[nodiscard]] CacheRegistration add(std::string_view name, int priority, Cache& cache) {
        auto* e = make_entry(name, priority);
        e->object = &cache;
        e->releasable = [](void* o) -> std::size_t { return static_cast<Cache*>(o)->releasable_bytes(); };
        e->release = [](void* o) -> std::size_t { return static_cast<Cache*>(o)->release(); };
        return insert(e);
    }

    /// Registers a cache given as two callables, `std::size_t()` each, which the
    /// registry owns (and destroys when the registration or the registry ends).
    /// The same rules as the other add().
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
        detail::SpinLock lock(state_->mutex);
        return state_->entries.size();
    }

    /// Sum of every cache's estimate, in bytes. A cache whose estimate throws
    /// counts 0; so does one that another thread is releasing or estimating
    /// now (an estimate never waits).
    std::size_t releasable_bytes() const {
        auto snap = snapshot();
        std::size_t s = 0;
        for (auto* e : snap) {
            if (enter(e)) {
                if (claim(e, detail::cache_estimating) == detail::cache_idle) {
                    try {
                        detail::CacheCallScope inside;
                        s += e->releasable(e->object);
                    } catch (...) {
                    }
                    e->busy.store(detail::cache_idle, std::memory_order_release);
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
    /// while this runs is skipped if it has not started. A cache that another
    /// thread is releasing now is not released again: this call waits for that
    /// release and reports the cache as `concurrent`, with 0 bytes. Called from
    /// inside a cache's release(), it waits for no other cache (it reports the
    /// busy ones as `concurrent`), so that it can never deadlock.
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
            if (claim(e, detail::cache_releasing) != detail::cache_idle) {
                leave(e);
                r.concurrent = true;
                report.caches.push_back(std::move(r));
                continue;
            }
            try {
                detail::CacheCallScope inside;
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
            e->releases.fetch_add(1, std::memory_order_release);
            e->busy.store(detail::cache_idle, std::memory_order_release);
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
        auto& st = *state_;
        try {
            detail::SpinLock lock(st.mutex);
            e->order = st.next_order++;
            // Keep the list sorted by (priority, order): a release walks it as is.
            auto it = st.entries.begin();
            while (it != st.entries.end() && (*it)->priority <= e->priority) ++it;
            st.entries.insert(it, e);
        } catch (...) {
            e->unref();
            throw;
        }
        st.refs.fetch_add(1, std::memory_order_relaxed);
        return CacheRegistration(&st, e);
    }

    std::vector<detail::CacheEntry*> snapshot() const {
        detail::SpinLock lock(state_->mutex);
        std::vector<detail::CacheEntry*> v(state_->entries);
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

    // Enters `e` for `call` (a release or an estimate): cache_idle when this
    // call now has it (set busy back to cache_idle after), else what kept it
    // out. A release waits out an estimate (short) and then takes its turn; it
    // waits for a release in progress to end and then does not run it again.
    // An estimate counts a busy cache as 0 rather than wait for it. From inside
    // a cache (see cache_call_depth), nothing waits. What no registry can see:
    // a cache's release() that waits for another thread which itself releases
    // through the registry -- don't: do that work on the calling thread.
    static int claim(detail::CacheEntry* e, int call) noexcept {
        bool const nested = detail::cache_call_depth() > 0;
        for (unsigned spins = 0;; ++spins) {
            int seen = detail::cache_idle;
            if (e->busy.compare_exchange_strong(seen, call, std::memory_order_acquire, std::memory_order_relaxed))
                return detail::cache_idle;
            // An estimate never waits: a cache busy elsewhere counts 0, so an
            // estimate that calls into the registry from another thread (a
            // worker it joins) cannot wait on itself.
            if (nested || call == detail::cache_estimating) return seen;
            if (seen == detail::cache_releasing) {
                unsigned const ended = e->releases.load(std::memory_order_acquire);
                while (e->busy.load(std::memory_order_acquire) == detail::cache_releasing &&
                       e->releases.load(std::memory_order_acquire) == ended)
                    detail::yield_cpu();
                return seen;
            }
            if (spins >= 64) {  // an estimate: short, try again
                detail::yield_cpu();
                spins = 0;
            }
        }
    }

    // Unregisters `e`, unless the registry is gone (it let go of `e` then).
    static void remove(detail::CacheRegistryState& st, detail::CacheEntry* e) noexcept {
        {
            detail::SpinLock lock(st.mutex);
            if (st.gone.load(std::memory_order_relaxed)) return;
            // Marked under the lock, so that the registry's destructor and this
            // never both let go of it.
            e->removed.store(true, std::memory_order_seq_cst);
            for (auto it = st.entries.begin(); it != st.entries.end(); ++it) {
                if (*it == e) {
                    st.entries.erase(it);
                    break;
                }
            }
        }
        while (e->in_use.load(std::memory_order_seq_cst) != 0) detail::yield_cpu();
        e->unref();
    }

    detail::CacheRegistryState* state_;  // one reference
};

inline void CacheRegistration::reset() noexcept {
    if (entry_ != nullptr) {
        CacheRegistry::remove(*state_, entry_);
        state_->unref();
    }
    state_ = nullptr;
    entry_ = nullptr;
}

}  // namespace oomguard
