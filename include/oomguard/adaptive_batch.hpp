// adaptive_batch: run a training or evaluation step on a global batch, and when
// the device runs out of memory, recover without losing a sample: leave the
// catch (so the exception and the step's buffers are gone), release caches,
// roll back the half-accumulated gradients, and retry the same samples with a
// smaller micro-batch -- keeping the global batch through accumulation -- then a
// lower precision, then (optionally) another device; give up with the history.
#pragma once

#include <oomguard/cache_registry.hpp>
#include <oomguard/classify.hpp>
#include <oomguard/detail/ballot.hpp>
#include <oomguard/detail/observer_list.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>
#include <oomguard/precision.hpp>
#include <oomguard/recovery_planner.hpp>
#include <oomguard/shrink_policy.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>
#include <utility>
#include <vector>

namespace oomguard {

namespace detail {
/// How a MicroBatch reaches the runner that handed it out.
struct SyncHook {
    void (*fn)(void*) = nullptr;
    void* context = nullptr;
};
}  // namespace detail

/// One micro-batch handed to the step.
struct MicroBatch {
    std::size_t offset = 0;     ///< first sample of the global batch in this micro-batch
    std::size_t size = 0;       ///< samples in it
    Precision precision = Precision::fp32;  ///< the precision it runs at: the plan's rung of BatchOptions::precisions
    double weight = 0.0;        ///< size / G: weighted gradients sum to the full-batch gradient
    int device = 0;             ///< the device the plan runs on (changes only by failover)
    bool calibration = false;   ///< a measuring micro-batch at a small size (predictive, after an
                                ///< OOM); its work is kept like any other's
    detail::SyncHook sync_hook{};  ///< set by the runner; use sync()

    /// The OOM-safe sync point of a data-parallel step: call it right before
    /// each collective of your own (a gradient all-reduce, a metric), after
    /// every allocation that precedes that collective. It returns when every
    /// rank has reached the same point; when another rank ran out of memory
    /// instead, it throws peer_out_of_memory (a device OOM) on this one, so
    /// every rank leaves the step by the same path and the attempt is retried
    /// together. Without a consensus hook it does nothing.
    void sync() const {
        if (sync_hook.fn != nullptr) sync_hook.fn(sync_hook.context);
    }
};

/// What one global batch took.
struct BatchResult {
    Plan plan;                 ///< the plan for the next global batch
    unsigned attempts = 0;     ///< 1 when nothing failed
    /// Micro-batches whose work the committed global batch kept: the committed attempt's, a calibration
    /// segment's before it, and with resume every micro-batch kept over the attempts.
    std::size_t micro_batches = 0;
    /// The first exception an observer threw during this batch (null: none).
    /// The batch was committed regardless: an observer never changes what
    /// happens to a batch. Rethrow it if an observer's failure must stop you.
    std::exception_ptr observer_error;
};

/// The samples of one global batch, given to run() or reduce() when it is not
/// BatchOptions::global_batch: an epoch's last, shorter batch runs under the
/// same object and the same learned plan. In [1, BatchOptions::global_batch];
/// under consensus every rank must give the same.
struct GlobalBatch {
    std::size_t samples = 0;  ///< samples in this global batch
};

/// A global batch's BatchResult and the value its kept micro-batches combined to.
template <class T>
struct Reduced {
    BatchResult batch;  ///< what the global batch took: its plan, attempts and micro-batches
    T value;            ///< the step's results over the kept micro-batches, folded by the combine function
};

/// Everything adaptive_batch decided, counted (on this rank).
struct BatchCounters {
    std::size_t global_batches = 0,     ///< global batches committed
                micro_batches = 0,      ///< micro-batches that completed (kept or not)
                ooms = 0,               ///< device OOMs this rank caught in a step or a commit, each one
                                        ///< survived or the last before a give-up
                releases = 0,           ///< cache registry releases run: before a retry, ahead of a
                                        ///< calibration or a larger micro-batch the cached memory would crowd,
                                        ///< and before global batches (release_before_batches(), a commit
                                        ///< that added state)
                bytes_released = 0,     ///< bytes those releases freed, as the caches reported them
                retries_same = 0,       ///< retries at the same plan (after a release that freed memory, or a
                                        ///< transient OOM)
                shrinks = 0,            ///< times the micro-batch was made smaller
                precision_changes = 0,  ///< steps down the precision ladder
                failovers = 0,          ///< moves to another device through the failover hook
                grow_backs = 0,         ///< tries of a larger size, or of the previous precision, after clean batches
                calibrations = 0,       ///< calibration micro-batches that completed (predictive policy, after an
                                        ///< OOM, or before any with BatchOptions::Start::calibrate)
                give_ups = 0,           ///< global batches given up (recovery_failed thrown)
                wasted_samples = 0,     ///< samples that completed in a failed attempt and were thrown away (all
                                        ///< of the global batch for an OOM in the commit; with resume, only what
                                        ///< no kept micro-batch holds)
                rollback_retries = 0,   ///< rollbacks that ran out of memory and were retried after a release
                commit_ooms = 0,        ///< attempts whose commit ran out of device memory
                peer_aborts = 0,        ///< attempts this rank left because another rank ran out of memory
                                        ///< (peer_out_of_memory)
                observer_errors = 0;    ///< exceptions observers threw (kept in BatchResult::observer_error;
                                        ///< the batches went on)
};

/// What a BatchEvent reports: a failure caught, a decision of the ladder, or a step boundary.
enum class BatchEventKind : unsigned char {
    oom_caught, released, retry_same, shrink, precision_change, failover, grow_back, calibration, give_up, commit,
    jump,  ///< a segment held and the global batch goes on at another size: the calibration's first size
           ///< (its second runs next), its second (the rest runs at the fitted size), or a search step with resume
    batch_begin,        ///< a global batch starts (its end is commit or give_up)
    micro_batch_begin,  ///< a micro-batch starts: offset, size
    micro_batch_end,    ///< a micro-batch completed: bytes is its peak over `held`, what it held when it began
    plan_loaded,        ///< the plan came from a PlanCache (or the ranks' agreement on one): `to` is it
    plan_saved,         ///< a PlanCache saved the plan `to`
    plan_cache_warning  ///< a PlanCache could not read or write its file: `what` says why; training goes on
};

/// The kind's name, as reports and traces write it ("oom_caught", "shrink", ...).
constexpr char const* to_string(BatchEventKind k) noexcept {
    switch (k) {
        case BatchEventKind::oom_caught: return "oom_caught";
        case BatchEventKind::released: return "released";
        case BatchEventKind::retry_same: return "retry_same";
        case BatchEventKind::shrink: return "shrink";
        case BatchEventKind::precision_change: return "precision_change";
        case BatchEventKind::failover: return "failover";
        case BatchEventKind::grow_back: return "grow_back";
        case BatchEventKind::calibration: return "calibration";
        case BatchEventKind::give_up: return "give_up";
        case BatchEventKind::commit: return "commit";
        case BatchEventKind::jump: return "jump";
        case BatchEventKind::batch_begin: return "batch_begin";
        case BatchEventKind::micro_batch_begin: return "micro_batch_begin";
        case BatchEventKind::micro_batch_end: return "micro_batch_end";
        case BatchEventKind::plan_loaded: return "plan_loaded";
        case BatchEventKind::plan_saved: return "plan_saved";
        case BatchEventKind::plan_cache_warning: return "plan_cache_warning";
    }
    return "unknown";
}

class AdaptiveBatch;

/// One decision or step boundary, for observers (reports, traces, logs, plots).
struct BatchEvent {
    BatchEventKind kind = BatchEventKind::commit;  ///< what happened
    Plan from,  ///< the plan before the event (for a decision), or the plan in effect
         to;    ///< the plan after the event (for a decision), or the plan in effect
    std::size_t bytes = 0;          ///< released bytes, the failed request, a calibration's or a
                                    ///< micro-batch's peak (over `held`)
    unsigned attempt = 0;           ///< the attempt's number within its global batch, from 1
    char const* what = "";          ///< the OOM's message for oom_caught and give_up
    ReleaseReport const* release = nullptr;  ///< per-cache bytes, for `released`
    std::size_t offset = 0,  ///< the micro-batch's first sample within the global batch (micro-batch events,
                             ///< oom_caught)
                size = 0;    ///< the micro-batch's samples (micro-batch events, oom_caught)
    /// Bytes held under the measuring budget (measure_with) when the micro-batch
    /// began (micro_batch_end), or when the allocation failed (oom_caught): the
    /// failed micro-batch wanted held + bytes. oom_info::unknown when not measured.
    std::size_t held = oom_info::unknown;
    /// The batch that sent the event: its counters() and plan() as of this
    /// event. Valid during the observer's call only (the batch may be moved or
    /// destroyed later).
    AdaptiveBatch const* batch = nullptr;
};

/// One failed attempt, kept for the give-up report.
struct AttemptRecord {
    Plan plan;                      ///< the plan the attempt ran under
    std::size_t samples_done = 0;   ///< samples that completed before it failed
    std::size_t failed_size = 0;    ///< the micro-batch that ran out of memory on this rank (0: see below)
    std::size_t bytes_released = 0; ///< bytes the cache release after the attempt freed
    bool in_commit = false;         ///< the commit ran out of memory
    bool peer = false;              ///< another rank ran out of memory; this one did not
};

/// adaptive_batch could not fit the global batch: the last OOM's figures plus
/// every attempt. Still an out_of_memory (and so a std::bad_alloc).
class recovery_failed : public out_of_memory {
public:
    /// The last OOM's figures `info`, the give-up's `message` (it lists every attempt), and the attempts themselves.
    recovery_failed(oom_info info, detail::Message const& message, std::vector<AttemptRecord> attempts)
        : out_of_memory(info, message), attempts_(std::move(attempts)) {}
    /// Every failed attempt of the global batch, in order.
    std::vector<AttemptRecord> const& attempts() const noexcept { return attempts_; }

private:
    std::vector<AttemptRecord> attempts_;
};

/// Thrown by MicroBatch::sync() on a rank that did not fail, when another rank
/// ran out of device memory in the same attempt. A device OOM: let it leave the
/// step (do not swallow it), and the attempt is retried on every rank together.
class peer_out_of_memory : public out_of_memory {
public:
    using out_of_memory::out_of_memory;
};

/// The data-parallel hook. `all_min` is a collective: every rank calls it with
/// the same `count`, and each of `values[0..count)` is replaced by its minimum
/// over all ranks -- an MPI_Allreduce or ncclAllReduce with MIN over unsigned
/// 64-bit integers. See <oomguard/mpi.hpp>, <oomguard/nccl.hpp>,
/// <oomguard/thread_consensus.hpp>.
///
/// Ranks agree on the planner's inputs, once per attempt (whether any rank
/// failed, the smallest failed size, the largest measured peak, the least
/// available bytes, ...), so every rank takes the same decision and runs the
/// same micro-batch sizes; give-up included. Only device OOMs and oomguard's own
/// failure path are agreed on: any other exception from the step or the commit
/// leaves its rank at once, and the others wait in the next collective, as with
/// any error in a collective program -- abort the job (MPI_Abort) from your handler.
struct Consensus {
    void* context = nullptr;  ///< passed back to all_min as its first argument (the object behind the hook)
    /// The collective: replaces each of `values[0..count)` by its minimum over every rank; every
    /// rank calls it with the same `count`. It may throw (a failed MPI call): the exception leaves run().
    void (*all_min)(void* context, std::uint64_t* values, std::size_t count) = nullptr;
};

/// What a failover hook is asked: the plan cannot fit on `plan.device` even at
/// its minimum and lowest precision. Return another device, or -1 (a device in
/// `tried` has already failed this global batch: sending the plan back there
/// would only fail again).
struct FailoverRequest {
    Plan plan;              ///< the plan that cannot fit on plan.device, at its minimum and lowest precision
    oom_info last;          ///< the OOM that ended the ladder on plan.device
    std::vector<int> tried; ///< the devices this global batch has run out of memory on, in order, plan.device last
};

namespace detail {
template <class M, class = void>
struct has_meter_members : std::false_type {};
template <class M>
struct has_meter_members<M, std::void_t<decltype(std::declval<M const&>().used()),
                                        decltype(std::declval<M const&>().peak()),
                                        decltype(std::declval<M&>().reset_peak()),
                                        decltype(std::declval<M&>().raise_peak(std::size_t{})),
                                        decltype(std::declval<M const&>().available()),
                                        decltype(std::declval<M const&>().device())>>
    : std::integral_constant<bool, std::is_convertible<decltype(std::declval<M const&>().used()), std::size_t>::value &&
                                       std::is_convertible<decltype(std::declval<M const&>().peak()), std::size_t>::value &&
                                       std::is_convertible<decltype(std::declval<M const&>().available()), std::size_t>::value &&
                                       std::is_convertible<decltype(std::declval<M const&>().device()), int>::value> {};
// R's value can initialise a T with braces: no narrowing (double into int,
// int into double, size_t into int are narrowing; int into long is not).
template <class R, class T, class = void>
struct converts_without_narrowing : std::false_type {};
template <class R, class T>
struct converts_without_narrowing<R, T, std::void_t<decltype(T{std::declval<R>()})>> : std::true_type {};

template <class B>
std::true_type is_budget_test(MemoryBudget<B> const*);
std::false_type is_budget_test(void const*);
// Whether a meter's used() counts what the registered caches hold: its own
// `bool counts_cached() const` when it has one, else true.
template <class M, class = void>
struct has_counts_cached : std::false_type {};
template <class M>
struct has_counts_cached<M, std::void_t<decltype(static_cast<bool>(std::declval<M const&>().counts_cached()))>>
    : std::true_type {};
template <class M>
bool meter_counts_cached(M const& m) {
    if constexpr (has_counts_cached<M>::value)
        return static_cast<bool>(m.counts_cached());
    else
        return true;
}
// A meter: the members measure_with reads (returning any integer type), and not
// a MemoryBudget (or one derived from it): measure_with(MemoryBudget&) is its own.
template <class M>
struct is_meter
    : std::integral_constant<bool, has_meter_members<M>::value &&
                                       !decltype(is_budget_test(std::declval<M const*>()))::value> {};
}  // namespace detail

/// An observer's place on an AdaptiveBatch (what AdaptiveBatch::observe
/// returns): it detaches the observer when destroyed, or on detach(). Safe in
/// any order: the batch may be destroyed or moved first (the registration
/// follows a moved batch, and does nothing once the batch is gone). Move-only.
/// Not thread-safe, as the batch is not: detach on the thread that runs the
/// batch, or while it is not running.
class [[nodiscard]] ObserverRegistration {
public:
    /// Holds no observer.
    ObserverRegistration() noexcept = default;
    /// Takes `o`'s observer; `o` holds none after.
    ObserverRegistration(ObserverRegistration&& o) noexcept : list_(o.list_), id_(o.id_) { o.list_ = nullptr; }
    /// Detaches what this holds, then takes `o`'s observer.
    ObserverRegistration& operator=(ObserverRegistration&& o) noexcept {
        if (this != &o) {
            detach();
            list_ = o.list_;
            id_ = o.id_;
            o.list_ = nullptr;
        }
        return *this;
    }
    ObserverRegistration(ObserverRegistration const&) = delete;
    ObserverRegistration& operator=(ObserverRegistration const&) = delete;
    /// Detaches (see detach()).
    ~ObserverRegistration() { detach(); }

    /// Stops the observer now: it hears no further event, and it is destroyed
    /// (at once, or when the event being delivered ends if called from inside
    /// an observer). Does nothing when already detached or the batch is gone.
    void detach() noexcept {
        if (list_ == nullptr) return;
        list_->detach(id_);
        list_->unref();
        list_ = nullptr;
    }

    /// Whether the observer still listens: false after detach() or a move, and
    /// once its batch is destroyed.
    explicit operator bool() const noexcept { return list_ != nullptr && list_->attached(id_); }

private:
    friend class AdaptiveBatch;
    ObserverRegistration(detail::ObserverList* list, std::uint64_t id) noexcept : list_(list), id_(id) {}
    detail::ObserverList* list_ = nullptr;  // one reference, while set
    std::uint64_t id_ = 0;
};

namespace detail {
// A callable with an explicit `operator bool` that says it is empty (std::function);
// a lambda converts to a function pointer, and so implicitly to bool, and is never empty.
// (A trait on the conversion, not on &F::operator bool, which nvcc's front end refuses.)
template <class F>
struct has_bool_member
    : std::integral_constant<bool, std::is_constructible<bool, F const&>::value &&
                                       !std::is_convertible<F const&, bool>::value> {};
// What observe() can call as `fn(event)`.
template <class F, class E, class = void>
struct is_observer : std::false_type {};
template <class F, class E>
struct is_observer<F, E, std::void_t<decltype(std::declval<F&>()(std::declval<E const&>()))>> : std::true_type {};
}  // namespace detail

/// Runs global batches under an adaptive plan and remembers the last good one
/// across calls. Keep one per workload: training and evaluation (`--bs` and
/// `--eval_bs`) are tuned apart. The decisions are RecoveryPlanner's; this class
/// runs the step, measures, agrees with the other ranks and acts.
class AdaptiveBatch {
public:
    /// One workload's recovery state (keep one per workload: training, evaluation). Throws
    /// std::invalid_argument for options RecoveryPlanner::validate refuses (global_batch 0, micro_batch
    /// outside [min_micro_batch, G] (0: G), an empty precision ladder, one that lists a precision twice
    /// or whose bytes per value rise, max_attempts 0, ...).
    explicit AdaptiveBatch(BatchOptions options) : planner_(std::move(options)) {}

    /// Measures each micro-batch's peak through `budget` (the predictive policy
    /// needs it; the report uses it) while the plan runs on `budget.device()`.
    /// Call it once for each device a failover may move to; a second budget for
    /// the same device replaces the first. The budget must outlive this object.
    template <class Backend>
    AdaptiveBatch& measure_with(MemoryBudget<Backend>& budget) {
        Meter m;
        m.device = budget.device();
        m.object = &budget;
        m.start = [](void* b) -> std::size_t {
            auto* mb = static_cast<MemoryBudget<Backend>*>(b);
            mb->reset_peak();
            return mb->used();
        };
        m.peak = [](void* b) -> std::size_t { return static_cast<MemoryBudget<Backend>*>(b)->peak(); };
        m.used = [](void* b) -> std::size_t { return static_cast<MemoryBudget<Backend>*>(b)->used(); };
        m.raise = [](void* b, std::size_t v) { static_cast<MemoryBudget<Backend>*>(b)->raise_peak(v); };
        m.available = [](void* b) -> std::size_t {
            auto* mb = static_cast<MemoryBudget<Backend>*>(b);
            std::size_t avail = mb->available(), free = 0, total = 0;
            if (mb->backend().memory_info(mb->device(), &free, &total).ok() && free < avail) avail = free;
            return avail;
        };
        return add_meter(m);
    }

    /// Measures through any other meter: an object with `int device() const`,
    /// `std::size_t used() const` (bytes held now), `std::size_t peak() const`
    /// (the most held since the last reset), `std::size_t reset_peak()` (restarts
    /// the peak at what is held now), `void raise_peak(std::size_t)` (the peak is
    /// at least this) and `std::size_t available() const` (what a step could
    /// still take). libtorch's caching allocator is one (<oomguard/torch.hpp>).
    /// Optionally `bool counts_cached() const`: false when used() leaves out
    /// what the registered caches hold (an allocator's bytes in use, not its
    /// reserve); by default (true) those bytes are taken as the step's to
    /// reuse, and subtracted from what is held under a global batch.
    template <class Meter_, std::enable_if_t<detail::is_meter<Meter_>::value, int> = 0>
    AdaptiveBatch& measure_with(Meter_& meter) {
        Meter m;
        m.device = meter.device();
        m.object = &meter;
        m.start = [](void* o) -> std::size_t {
            auto* x = static_cast<Meter_*>(o);
            x->reset_peak();
            return static_cast<std::size_t>(x->used());
        };
        m.peak = [](void* o) -> std::size_t { return static_cast<std::size_t>(static_cast<Meter_*>(o)->peak()); };
        m.used = [](void* o) -> std::size_t { return static_cast<std::size_t>(static_cast<Meter_*>(o)->used()); };
        m.raise = [](void* o, std::size_t v) { static_cast<Meter_*>(o)->raise_peak(v); };
        m.available = [](void* o) -> std::size_t {
            return static_cast<std::size_t>(static_cast<Meter_*>(o)->available());
        };
        m.counts_cached = detail::meter_counts_cached(meter);
        return add_meter(m);
    }

    /// Adds an observer: `fn(event)`, any callable taking a BatchEvent const&
    /// (a capturing lambda, a std::function), is called for every decision and
    /// step boundary, in the order observers were added (a report and a trace
    /// can both listen). The batch keeps a copy of `fn` until the returned
    /// registration ends: keep it as long as the observer must listen. An
    /// observer that throws changes nothing: its exception is kept in
    /// BatchResult::observer_error and observer_error(). An observer may detach
    /// itself or another from inside its call. Throws std::invalid_argument for
    /// an empty `fn` (a null function pointer, an empty std::function), and
    /// std::bad_alloc.
    template <class F, std::enable_if_t<detail::is_observer<std::decay_t<F>, BatchEvent>::value, int> = 0>
    [[nodiscard]] ObserverRegistration observe(F&& fn) {
        using Fn = std::decay_t<F>;
        if constexpr (std::is_pointer<Fn>::value) {
            if (fn == nullptr)
                detail::throw_invalid("oomguard: AdaptiveBatch::observe: the observer is a null function pointer");
        } else if constexpr (detail::has_bool_member<Fn>::value) {
            if (!static_cast<bool>(fn))
                detail::throw_invalid("oomguard: AdaptiveBatch::observe: the observer is an empty function "
                                      "(an empty std::function?)");
        }
        void* object = new Fn(std::forward<F>(fn));
        std::uint64_t id = 0;
        detail::ObserverList* list = observers_.add(
            object, [](void* o, void const* e) { (*static_cast<Fn*>(o))(*static_cast<BatchEvent const*>(e)); },
            [](void* o) noexcept { delete static_cast<Fn*>(o); }, id);
        return ObserverRegistration(list, id);
    }

    /// observe() for a C callback: `fn(event, user)`. Throws
    /// std::invalid_argument when `fn` is null, and std::bad_alloc.
    [[nodiscard]] ObserverRegistration observe(void (*fn)(BatchEvent const&, void*), void* user = nullptr) {
        if (fn == nullptr) detail::throw_invalid("oomguard: AdaptiveBatch::observe: the observer is a null function");
        return observe([fn, user](BatchEvent const& e) { fn(e, user); });
    }

    /// Makes every rank of a data-parallel job take the same decisions.
    AdaptiveBatch& consensus(Consensus c) {
        if (c.all_min == nullptr)
            detail::throw_invalid("oomguard: AdaptiveBatch::consensus: the all_min collective is a null function");
        consensus_ = c;
        return *this;
    }

    /// Asked for another device when nothing fits on the current one.
    AdaptiveBatch& failover(int (*fn)(void*, FailoverRequest const&), void* user = nullptr) noexcept {
        failover_ = fn;
        failover_user_ = user;
        planner_.allow_failover(fn != nullptr);
        return *this;
    }

    /// Runs one global batch: `step(MicroBatch const&)` for each micro-batch,
    /// then `commit()` once; on a device OOM in a step or in the commit,
    /// `rollback()` and a retry of the same samples under the planner's next
    /// plan. Any other exception from the step or the commit passes through
    /// unchanged, at once, without calling rollback; so does a sticky CUDA
    /// error. Throws recovery_failed when nothing fits. Whatever leaves run()
    /// leaves the object at its last good plan.
    template <class Step, class Commit, class Rollback>
    BatchResult run(Step&& step, Commit&& commit, Rollback&& rollback) {
        require_callable(step, "step");
        require_callable(commit, "commit");
        require_callable(rollback, "rollback");
        if (running_)
            detail::throw_logic("oomguard: AdaptiveBatch::run() was called from inside its own step, commit or "
                                "rollback; use a second AdaptiveBatch for a nested loop");
        struct Running {
            bool& flag;
            explicit Running(bool& f) : flag(f) { flag = true; }
            ~Running() { flag = false; }
        } running{running_};
        observer_error_ = nullptr;
        try {
            return run_batch(step, commit, rollback);
        } catch (...) {
            in_step_ = false;
            planner_.abandon();
            throw;
        }
    }

    /// One global batch whose step returns its micro-batch's result (a loss
    /// sum, a count of correct answers): the value is `combine` folded, from
    /// `init`, over the micro-batches the committed attempt kept, in order.
    /// What a failed attempt computed never reaches it.
    /// The fold is in T, the type of `init`: a step whose result would narrow
    /// into T (a double folded from `0`, an int) does not compile -- write the
    /// init in the step's type (`0.0`).
    template <class T, class Step, class Combine, class Commit, class Rollback>
    Reduced<T> reduce(Step&& step, T init, Combine combine, Commit&& commit, Rollback&& rollback) {
        using R = decltype(step(std::declval<MicroBatch const&>()));
        static_assert(detail::converts_without_narrowing<R, T>::value,
                      "oomguard: reduce folds in the type of init, and the step's result would narrow into it "
                      "(std::accumulate's trap: a double step folded from 0 is an int); give init in the step's "
                      "type, for example 0.0");
        require_callable(step, "step");
        require_callable(combine, "combine");
        require_callable(commit, "commit");
        require_callable(rollback, "rollback");
        std::vector<T> kept;  // one result per kept micro-batch
        T value = init;
        // Folded before commit: a combine that throws leaves the batch uncommitted.
        BatchResult r = run([&](MicroBatch const& mb) { kept.push_back(step(mb)); },
                            [&] {
                                value = init;
                                for (T const& x : kept) value = combine(std::move(value), x);
                                commit();
                            },
                            [&] {
                                rollback();
                                kept.clear();
                            });
        return Reduced<T>{r, std::move(value)};
    }

    /// reduce() with nothing to commit or roll back: evaluation.
    template <class T, class Step, class Combine>
    Reduced<T> reduce(Step&& step, T init, Combine combine) {
        return reduce(std::forward<Step>(step), std::move(init), std::move(combine), [] {}, [] {});
    }

    /// One global batch with no commit or rollback: the step must return its
    /// micro-batch's result, and the sum over the kept micro-batches comes back
    /// (reduce() with +). A step that returns nothing would keep, in your
    /// variables, what a failed attempt accumulated: give it commit and rollback.
    template <class Step>
    auto run(Step&& step) {
        using R = std::decay_t<decltype(step(std::declval<MicroBatch const&>()))>;
        if constexpr (std::is_void<R>::value) {
            static_assert(!std::is_void<R>::value,
                          "oomguard: run(step) without a rollback needs a step that returns its micro-batch's result "
                          "(run returns the sum over the kept micro-batches; see reduce()); a step that returns "
                          "nothing takes run(step, commit, rollback), so that what a failed attempt accumulated is "
                          "undone");
        } else {
            return reduce(std::forward<Step>(step), R{}, [](R a, R b) { return a + b; });
        }
    }

    /// run(step, commit, rollback) over a global batch of `g.samples` (an
    /// epoch's last, shorter batch) under the same plan: each micro-batch's
    /// weight is its size / g.samples. Throws std::invalid_argument for 0 or a
    /// size above BatchOptions::global_batch; under consensus, std::logic_error
    /// on every rank when the ranks give different sizes. Otherwise as run().
    template <class Step, class Commit, class Rollback>
    BatchResult run(GlobalBatch g, Step&& step, Commit&& commit, Rollback&& rollback) {
        CallSize size(*this, g, "run");
        return run(std::forward<Step>(step), std::forward<Commit>(commit), std::forward<Rollback>(rollback));
    }
    /// run(step) over a global batch of `g.samples` (see run(GlobalBatch, step, commit, rollback)).
    template <class Step>
    auto run(GlobalBatch g, Step&& step) {
        CallSize size(*this, g, "run");
        return run(std::forward<Step>(step));
    }
    /// reduce() over a global batch of `g.samples` (see run(GlobalBatch, step, commit, rollback)).
    template <class T, class Step, class Combine, class Commit, class Rollback>
    Reduced<T> reduce(GlobalBatch g, Step&& step, T init, Combine combine, Commit&& commit, Rollback&& rollback) {
        CallSize size(*this, g, "reduce");
        return reduce(std::forward<Step>(step), std::move(init), std::move(combine), std::forward<Commit>(commit),
                      std::forward<Rollback>(rollback));
    }
    /// reduce() with nothing to commit or roll back, over a global batch of `g.samples`.
    template <class T, class Step, class Combine>
    Reduced<T> reduce(GlobalBatch g, Step&& step, T init, Combine combine) {
        CallSize size(*this, g, "reduce");
        return reduce(std::forward<Step>(step), std::move(init), std::move(combine));
    }

    /// The plan the next global batch starts with.
    Plan const& plan() const noexcept { return planner_.plan(); }
    /// The last plan a global batch committed under (where a give-up leaves the object).
    Plan const& last_good_plan() const noexcept { return planner_.last_good_plan(); }
    /// Everything decided so far, counted on this rank.
    BatchCounters const& counters() const noexcept { return counters_; }
    /// The options as validated (micro_batch 0 already replaced by global_batch).
    BatchOptions const& options() const noexcept { return planner_.options(); }
    /// The shrink policy in use: options().policy, with ShrinkPolicy::automatic() resolved by the last
    /// run() to predictive (a meter for the plan's device; with consensus, on every rank) or bisect
    /// (bisect until the first run()).
    ShrinkPolicy const& policy() const noexcept { return planner_.policy(); }
    /// The recovery planner that takes this workload's decisions: its model of the step and its state.
    RecoveryPlanner const& planner() const noexcept { return planner_; }
    /// What the last attempt observed, as the planner was fed it (with a
    /// consensus hook: as every rank agreed on it).
    Observation const& last_observation() const noexcept { return last_observation_; }
    /// The first exception an observer threw since the last run() began (null: none).
    std::exception_ptr observer_error() const noexcept { return observer_error_; }

    /// Back to the requested plan; forgets measurements and counters of clean batches.
    void reset() noexcept {
        planner_.reset();
        restored_ = false;
        release_before_batches_ = false;
        state_grew_ = false;
    }

    /// What this workload has learned (its last good plan, the model, the
    /// failed ceilings), for a PlanCache to save.
    LearnedPlan learned() const noexcept {
        LearnedPlan l = planner_.learned();
        l.release_before_batches = release_before_batches_;
        return l;
    }

    /// Whether the registered caches are emptied before each global batch
    /// (when they hold anything, and BatchOptions::release_caches is on). It
    /// turns on, for the rest of this workload's life (or until reset()), at
    /// the first OOM of a step that began while the caches held bytes, which
    /// the release after it then freed: blocks one batch left cached are
    /// carved for its shapes (a short remainder, a commit's temporaries, an
    /// optimizer's state placed among them) and can fail the next batch where
    /// fresh memory would not.
    /// restore() brings it back from a PlanCache entry, so that a restart does
    /// not pay that OOM again. Each rank decides alone; the steps every rank
    /// runs are the same either way.
    bool release_before_batches() const noexcept { return release_before_batches_; }

    /// Starts from what an earlier run learned (a PlanCache's entry) and tells
    /// the observers (plan_loaded). With a consensus hook the ranks still agree,
    /// at the first run(), on where they all start: the smallest restored
    /// micro-batch at the lowest restored precision, or, when some rank
    /// restored nothing, where BatchOptions::start says. Throws
    /// std::invalid_argument when the plan does not fit the options, and
    /// std::logic_error from inside run().
    void restore(LearnedPlan const& l) {
        if (running_) detail::throw_logic("oomguard: AdaptiveBatch::restore() was called from inside run()");
        Plan const from = planner_.plan();
        planner_.restore(l);
        restored_ = true;
        release_before_batches_ = l.release_before_batches;
        emit(BatchEventKind::plan_loaded, from, planner_.plan(), 0, 0, "");
    }

    /// Whether the plan came from restore() (and, with a consensus hook, the ranks kept it).
    bool restored() const noexcept { return restored_; }

    /// Sends a PlanCache's event to the observers: plan_saved, or
    /// plan_cache_warning with `what` (copied by no one: valid during the
    /// call). From and to are the current plan. Throws std::invalid_argument
    /// for any other kind.
    void announce(BatchEventKind kind, char const* what) {
        if (kind != BatchEventKind::plan_saved && kind != BatchEventKind::plan_cache_warning)
            detail::throw_invalid(detail::Message() << "oomguard: AdaptiveBatch::announce(" << to_string(kind)
                                                    << "): only plan_saved and plan_cache_warning are announced");
        emit(kind, planner_.last_good_plan(), planner_.last_good_plan(), 0, 0, what == nullptr ? "" : what);
    }

    /// Throws std::invalid_argument naming the first bad option.
    static void validate(BatchOptions const& o) { RecoveryPlanner::validate(o); }

private:
    using Ballot = detail::Ballot;

    // The global batch of one run()/reduce() call; the one before it back when
    // the call ends (a nested run() is refused, and must not clear the outer one's).
    struct CallSize {
        AdaptiveBatch& a;
        std::size_t before;
        CallSize(AdaptiveBatch& self, GlobalBatch g, char const* what) : a(self), before(self.call_g_) {
            std::size_t const G = self.planner_.options().global_batch;
            if (g.samples == 0 || g.samples > G)
                detail::throw_invalid(detail::Message() << "oomguard: AdaptiveBatch::" << what << ": GlobalBatch{"
                                                        << g.samples << "}: give the batch's samples, in [1, " << G
                                                        << "] (BatchOptions.global_batch)");
            if (!self.running_) self.call_g_ = g.samples;
        }
        ~CallSize() { a.call_g_ = before; }
        CallSize(CallSize const&) = delete;
        CallSize& operator=(CallSize const&) = delete;
    };

    // Where a rank stands, for the agreement's phase tag: a sync point is
    // (micro-batch index + 1) << 20 | its number within the micro-batch; the
    // rounds after the steps come after every sync point of the attempt.
    static constexpr std::uint64_t phase_end = std::uint64_t{1} << 63;
    static constexpr std::uint64_t phase_commit = phase_end + 1;
    static constexpr std::uint64_t phase_decide = phase_end + 2;
    static constexpr std::uint64_t phase_verdict = phase_end + 3;
    static constexpr std::uint64_t phase_start = phase_end + 4;
    static constexpr std::uint64_t max_syncs = (std::uint64_t{1} << 20) - 1;

    struct Meter {
        int device = 0;
        void* object = nullptr;
        std::size_t (*start)(void*) = nullptr;
        std::size_t (*peak)(void*) = nullptr;
        std::size_t (*used)(void*) = nullptr;
        void (*raise)(void*, std::size_t) = nullptr;
        std::size_t (*available)(void*) = nullptr;
        bool counts_cached = true;  // used() includes what the registered caches hold
    };

    // What this rank saw in one attempt.
    struct Local {
        bool oom = false, aborted = false, commit_oom = false, calibration_done = false, failed_calibration = false;
        bool full_later = false;  // a completed full-size micro-batch ran after the batch's first
        bool failed_short = false, room = false;  // the failed micro-batch: a short remainder; the device had room
        std::size_t start = 0;          // where in the global batch this attempt began
        std::size_t cached_before = 0;  // what the caches could give back when the last micro-batch began
        std::size_t failed_planned = 0, failed_size = 0, failed_offset = 0, samples_done = 0, micro_batches = 0, full_done = 0;
        std::size_t full_peak = 0, calibration_peak = 0, need = 0, available = 0, limit = 0;
        bool available_known = false;
        bool measured = false;  // a meter measured the attempt (limit; the batch's first base)
        oom_info info;
        detail::Message what;
        // A cache release before a larger micro-batch (make_room) threw: the
        // attempt ends there, and every rank learns it at the end's agreement.
        std::exception_ptr release_error;
    };

    template <class Step, class Commit, class Rollback>
    BatchResult run_batch(Step& step, Commit& commit, Rollback& rollback) {
        // Without consensus the rank decides alone, before its first step; with
        // one, at the first agreement, together (agree()).
        if (consensus_.all_min == nullptr) {
            bool const metered = meter_for(plan().device) != nullptr;
            if (!metered && planner_.options().policy.kind() == ShrinkPolicy::Kind::predictive) refuse_unmetered(false);
            planner_.use_meter(metered);
        }
        // Calibrating first measures: without a meter it is refused -- alone,
        // or with consensus on every rank together once they agree on who
        // measures (agree_start), so that no rank is left waiting.
        if (consensus_.all_min == nullptr && planner_.options().start == BatchOptions::Start::calibrate &&
            meter_for(plan().device) == nullptr)
            refuse_uncalibrated();
        if (consensus_.all_min != nullptr && !start_agreed_) agree_start();
        start_agreed_ = true;
        tried_.clear();
        batch_base_known_ = false;
        Decision const begin = planner_.begin_batch(call_g_);
        emit(BatchEventKind::batch_begin, begin.from, begin.from, 0, 0, "");
        // Calibrating before any failure (BatchOptions::start): the caches go
        // first, so that the small sizes measure their own allocations, not a
        // workspace a larger step left to reuse (the line would come out flat).
        // And, for a workload that calibrates first (it plans ahead of any
        // failure), when something else (an evaluation between training
        // batches) changed what the caches hold since its last batch
        // committed: what that left, sized for other steps, would be held
        // while this one allocates -- an OOM the release after it would only
        // answer, and not the fit's.
        std::size_t const cached_now = releasable_now();
        // And before every batch once the caches' blocks have cost an OOM
        // (release_before_batches()), or once after a commit that added state
        // that stays (an optimizer's moments): those were carved out of the
        // blocks the steps left cached, and the next batch's steps would be
        // fitted around them.
        bool const ahead = planner_.options().start == BatchOptions::Start::calibrate;
        std::exception_ptr begin_error;
        if (cached_now != 0 && (planner_.attempt().calibration != 0 || release_before_batches_ || state_grew_ ||
                                (ahead && cached_left_ != unknown_cached && cached_now != cached_left_))) {
            try {
                release_caches(0);
            } catch (...) {
                // Ahead of any failure this release is a courtesy: a device OOM in
                // it (a cache that allocates to let go) leaves the batch to the
                // ladder as usual; anything else passes -- alone at once, with
                // consensus at the first attempt's agreement, so that every rank
                // leaves together instead of waiting for this one in its steps.
                if (!is_device_oom(std::current_exception())) {
                    if (consensus_.all_min == nullptr) throw;
                    begin_error = std::current_exception();
                }
            }
        }
        if (begin.action == PlanAction::grow_back) {
            ++counters_.grow_backs;
            emit(BatchEventKind::grow_back, begin.from, begin.to, 0, 0, "");
        }
        std::vector<AttemptRecord> history;
        std::size_t const G = planner_.global_batch();
        std::size_t done = 0;       // samples of this global batch completed and kept
        std::size_t micro_batches = 0;  // kept micro-batches of this global batch
        for (;;) {
            Attempt const at = planner_.attempt();
            ++serial_;
            Local l;
            l.start = done;
            if (begin_error != nullptr)
                l.release_error = std::exchange(begin_error, nullptr);  // no step runs: every rank leaves
            else
                run_attempt(step, at, l);
            micro_batches += l.micro_batches;
            Ballot t = agree_end(l);
            if (t.any(Ballot::any_error)) {
                // A rank's cache release before the batch or a larger micro-batch threw: what
                // this global batch accumulated is undone (the kept micro-batches
                // too), then every rank leaves together, the one that threw with
                // its own exception.
                roll_back(rollback, at.number);
                history.push_back(AttemptRecord{at.plan, l.samples_done, 0, 0, false, l.release_error == nullptr});
                fail_together(l.release_error, l, history);
            }
            if (!t.any(Ballot::any_oom) && t.any(Ballot::any_aborted))
                protocol_error("a rank left a MicroBatch::sync() because another rank had ended its step without "
                               "failing: the ranks called sync() a different number of times");
            Observation obs = observation(t, at);
            if (!t.any(Ballot::any_oom) && l.samples_done < G) {
                // The segment held (the calibration's first size, its second,
                // a search step with resume): go on at the planner's next size.
                obs.outcome = Observation::Outcome::segment_done;
                last_observation_ = obs;
                Decision d = planner_.on_attempt(obs);
                emit(BatchEventKind::jump, d.from, d.to, 0, at.number, "");
                done = l.samples_done;
                continue;
            }
            if (!t.any(Ballot::any_oom)) {
                // Measured, the commit's own peak too: what it adds that stays
                // (an optimizer's state at its first step) is read from it
                // below, since a commit that frees the gradients as well
                // leaves less held than the state it added.
                std::size_t before = 0, before_raw = 0, commit_peak = 0;
                {
                    Meter const* cm = meter_for(at.plan.device);
                    struct Restore {
                        Meter const* m;
                        std::size_t v;
                        ~Restore() {
                            if (m != nullptr) m->raise(m->object, v);
                        }
                    } restore{cm, cm != nullptr ? cm->peak(cm->object) : 0};
                    if (cm != nullptr) {
                        before_raw = cm->start(cm->object);
                        before = beyond_caches(*cm, before_raw);
                    }
                    try {
                        commit();
                    } catch (...) {
                        if (!is_device_oom(std::current_exception())) throw;
                        l.commit_oom = true;
                        capture(std::current_exception(), l.info, l.what);
                    }
                    if (cm != nullptr) commit_peak = cm->peak(cm->object);
                }
                // What the commit leaves held is where the next batch begins
                // (an optimizer's state appears at its first step).
                Meter const* meter = l.commit_oom ? nullptr : meter_for(at.plan.device);
                std::size_t const after = meter != nullptr ? beyond_caches(*meter, meter->used(meter->object)) : 0;
                obs.after_commit = meter != nullptr ? after : Observation::unknown;
                // What stays: at least what it left held over what it began
                // with; and what it left over the batch's first base (it freed
                // the gradients too: set_to_none, libtorch's default), no more
                // than its own peak over its start -- exact for that default,
                // with or without temporaries. Gradients kept across a commit
                // that also makes temporaries are the one case counted (up to
                // the smaller of the two) twice: from the aggregates alone it
                // looks the same as a larger state made while freeing them.
                std::size_t growth = after > before ? after - before : 0;
                if (meter != nullptr && batch_base_known_) {
                    std::size_t const over_batch = after > batch_base_ ? after - batch_base_ : 0;
                    std::size_t const own_peak = commit_peak > before_raw ? commit_peak - before_raw : 0;
                    std::size_t const stays = over_batch < own_peak ? over_batch : own_peak;
                    if (stays > growth) growth = stays;
                }
                obs.commit_growth = meter != nullptr ? growth : Observation::unknown;
                bool any_commit_oom = l.commit_oom;
                if (consensus_.all_min != nullptr) {
                    Ballot b(serial_, phase_commit);
                    b.set_any(Ballot::any_commit_oom, l.commit_oom);
                    b.set_all(Ballot::all_commit_oom, l.commit_oom);
                    b.set_held(Ballot::after_commit, after, meter != nullptr);
                    b.set_held(Ballot::commit_growth, growth, meter != nullptr);
                    Ballot c = agree(b);
                    obs.after_commit = c.held(Ballot::after_commit, Observation::unknown);
                    obs.commit_growth = c.held(Ballot::commit_growth, Observation::unknown);
                    any_commit_oom = c.any(Ballot::any_commit_oom);
                    if (any_commit_oom && !c.all(Ballot::all_commit_oom)) {
                        if (l.commit_oom) {  // this rank's commit failed: undo what it accumulated, then leave
                            note_oom(at, l);
                            roll_back(rollback, at.number);
                        }
                        history.push_back(AttemptRecord{at.plan, l.samples_done, 0, 0, true, !l.commit_oom});
                        give_up(l, history,
                                l.commit_oom ? "the commit ran out of memory on this rank but not on every rank; "
                                               "the others have applied theirs, so the batch cannot be retried"
                                             : "the commit ran out of memory on another rank after this one "
                                               "applied its own, so the batch cannot be retried");
                    }
                }
                if (!any_commit_oom) {
                    cached_left_ = releasable_now();
                    state_grew_ = obs.commit_growth != Observation::unknown && obs.commit_growth > state_growth_release;
                    last_observation_ = obs;
                    Decision d = planner_.on_attempt(obs);
                    ++counters_.global_batches;
                    emit(BatchEventKind::commit, d.from, d.to, 0, at.number, "");
                    return BatchResult{d.to, at.number, micro_batches, observer_error_};
                }
                obs.outcome = Observation::Outcome::commit_oom;
            } else {
                obs.outcome = Observation::Outcome::step_oom;
            }
            done = recover(at, l, obs, t, history, rollback);
            if (done == 0) micro_batches = 0;  // rolled back: only kept micro-batches count
        }
    }

    // After a failed attempt, on every rank: roll back (unless the completed
    // micro-batches are kept), release what this rank can, agree, decide, agree
    // on the decision's outcome, act. Returns where the retry starts.
    template <class Rollback>
    std::size_t recover(Attempt const& at, Local& l, Observation& obs, Ballot const& t_end,
                        std::vector<AttemptRecord>& history, Rollback& rollback) {
        bool const failed_here = l.oom || l.commit_oom;
        std::size_t const G = planner_.global_batch();
        // Resume: every completed micro-batch is kept, and every rank must keep
        // the same ones -- which sync points in every micro-batch guarantee.
        bool const keep = planner_.options().resume && obs.outcome == Observation::Outcome::step_oom;
        std::size_t const kept = keep ? static_cast<std::size_t>(t_end.min(Ballot::done_min)) : 0;
        if (keep && t_end.min(Ballot::done_min) != t_end.max(Ballot::done_max))
            protocol_error("with BatchOptions::resume, ranks completed different micro-batches before one failed: "
                           "call MicroBatch::sync() in every micro-batch, before its contribution is applied");
        counters_.wasted_samples += obs.outcome == Observation::Outcome::commit_oom ? G : l.samples_done - kept;
        // Leaving without a retry: the kept micro-batches go too.
        auto undo_kept = [&] {
            if (keep && kept > 0) roll_back(rollback, at.number);
        };
        if (failed_here) {
            note_oom(at, l);
        } else if (l.aborted) {
            ++counters_.peer_aborts;
        }
        std::exception_ptr err;
        std::size_t released = 0;
        try {
            if (!keep) roll_back(rollback, at.number);
            if (failed_here) released = release_caches(at.number);
        } catch (...) {
            err = std::current_exception();
        }
        // A step that failed while the caches held bytes, which emptying them
        // then freed: what one batch leaves cached is carved for its own
        // shapes (a remainder, a commit's temporaries, a length that varies),
        // and it can fail the next batch where fresh memory would not. From
        // now on the caches go before each global batch, as users empty them
        // by hand (release_before_batches()).
        if (l.oom && l.cached_before != 0 && released != 0) release_before_batches_ = true;
        history.push_back(AttemptRecord{at.plan, l.samples_done, l.failed_size, released, l.commit_oom,
                                        !failed_here});
        Ballot b(serial_, phase_decide);
        b.set_any(Ballot::any_error, err != nullptr);
        // Measured, what the release freed helps the retry only up to what the
        // caches held when the failed micro-batch began: the rest it freed is
        // what that micro-batch itself left cached as it unwound, which it
        // needs again (its need is over all it held, those bytes among them).
        if (failed_here)
            b.set_min(Ballot::released,
                      l.measured && !l.commit_oom && released > l.cached_before ? l.cached_before : released);
        Ballot t = agree(b);
        if (t.any(Ballot::any_error)) {
            undo_kept();
            fail_together(err, l, history);
        }
        obs.released = t.min_or_zero(Ballot::released);
        last_observation_ = obs;

        Decision d;
        int next_device = -1;
        try {
            d = planner_.on_attempt(obs);
            if (d.action == PlanAction::failover) {
                note_tried(at.plan.device, l.info);
                FailoverRequest req{planner_.plan(), l.info, {}};
                for (auto const& dev : tried_) req.tried.push_back(dev.device);
                next_device = failover_(failover_user_, req);
            }
        } catch (...) {
            err = std::current_exception();
        }
        bool moved = next_device >= 0 && next_device != at.plan.device;
        if (consensus_.all_min != nullptr) {
            Ballot v(serial_, phase_verdict);
            v.set_any(Ballot::any_error, err != nullptr);
            v.set_all(Ballot::all_failover, moved);
            Ballot r = agree(v);
            if (r.any(Ballot::any_error)) {
                undo_kept();
                fail_together(err, l, history);
            }
            moved = r.all(Ballot::all_failover);
        } else if (err) {
            undo_kept();
            std::rethrow_exception(err);
        }
        if (d.action == PlanAction::failover) d = moved ? planner_.failed_over(next_device) : planner_.no_failover();
        if (moved) batch_base_known_ = false;  // measured again on the new device
        switch (d.action) {
            case PlanAction::retry_same:
                ++counters_.retries_same;
                emit(BatchEventKind::retry_same, d.from, d.to, obs.released, at.number, "");
                break;
            case PlanAction::shrink:
                ++counters_.shrinks;
                emit(BatchEventKind::shrink, d.from, d.to, 0, at.number, "");
                break;
            case PlanAction::next_precision:
                ++counters_.precision_changes;
                emit(BatchEventKind::precision_change, d.from, d.to, 0, at.number, "");
                break;
            case PlanAction::failover:
                ++counters_.failovers;
                emit(BatchEventKind::failover, d.from, d.to, 0, at.number, "");
                break;
            case PlanAction::give_up:
                undo_kept();
                give_up(l, history, d.why);
            case PlanAction::continue_batch:
            case PlanAction::keep:
            case PlanAction::grow_back:
            case PlanAction::commit: break;  // not answers to a failure
        }
        return kept;
    }

    // This rank ran out of memory in the attempt (in a step or in the commit).
    void note_oom(Attempt const& at, Local const& l) noexcept {
        ++counters_.ooms;
        if (l.commit_oom) ++counters_.commit_ooms;
        if (observers_.empty()) return;
        BatchEvent e{BatchEventKind::oom_caught, at.plan, at.plan, l.info.requested, at.number, l.what.c_str(), nullptr};
        if (!l.commit_oom) {
            e.offset = l.failed_offset;
            e.size = l.failed_size;
        }
        e.held = l.info.budget_used;
        emit(e);
    }

    // Runs the attempt's micro-batches; a device OOM ends it, anything else passes.
    template <class Step>
    void run_attempt(Step& step, Attempt const& at, Local& l) {
        Meter const* meter = meter_for(at.plan.device);
        if (meter != nullptr) {
            l.available = meter->available(meter->object);
            l.available_known = true;
            std::size_t const used = meter->used(meter->object);
            // A meter that reports no bound (available() = SIZE_MAX) leaves the limit unknown.
            l.limit = l.available <= static_cast<std::size_t>(-1) - used ? used + l.available : 0;
            l.measured = true;
        }
        std::size_t const G = planner_.global_batch();
        std::size_t offset = l.start, index = 0, planned = 0, n = 0;
        sync_aborted_ = false;
        try {
            while (offset < G && (at.segment == 0 || index < at.segment)) {
                planned = at.planned(index);
                n = planned < G - offset ? planned : G - offset;
                if (n < planned && at.tail != 0 && n > at.tail) n = at.tail;  // a failed remainder, in pieces
                bool const calibration = at.calibrating(index);
                try {
                    make_room(n, at.plan.precision, at.number);
                    l.cached_before = releasable_now();
                } catch (...) {
                    l.release_error = std::current_exception();
                    break;
                }
                mb_index_ = index;
                sync_index_ = 0;
                if (!observers_.empty()) emit_step(BatchEventKind::micro_batch_begin, at, offset, n, 0, oom_info::unknown);
                oom_serial_ = detail::last_oom().serial;
                std::size_t bytes = measured(step, meter,
                                             MicroBatch{offset, n, at.plan.precision,
                                                        static_cast<double>(n) / static_cast<double>(G),
                                                        at.plan.device, calibration,
                                                        detail::SyncHook{&sync_thunk, this}});
                if (!observers_.empty())
                    emit_step(BatchEventKind::micro_batch_end, at, offset, n, bytes,
                              meter != nullptr ? last_base_ : oom_info::unknown);

                ++l.micro_batches;
                ++counters_.micro_batches;
                std::size_t const demand = meter != nullptr && bytes != 0 ? over_batch_base(bytes) : 0;
                if (n == planned && calibration) {
                    l.calibration_done = index + 1 >= at.calibration_runs;
                    if (demand > l.calibration_peak) l.calibration_peak = demand;
                    ++counters_.calibrations;
                    Plan p = at.plan;
                    p.micro_batch = n;
                    emit(BatchEventKind::calibration, at.plan, p, bytes, at.number, "");
                } else if (n == planned) {
                    ++l.full_done;
                    if (demand > l.full_peak) l.full_peak = demand;
                    if (offset > 0) l.full_later = true;
                }
                offset += n;
                ++index;
            }
        } catch (...) {
            // Decide inside the catch, act outside it: leaving the handler
            // destroys the exception before any retry runs.
            if (!is_device_oom(std::current_exception())) throw;
            // By the exception's type, not by whether a sync point threw: a step
            // may have caught a peer's OOM and then run out of memory itself.
            bool peer = false;
            try {
                throw;
            } catch (peer_out_of_memory const&) {
                peer = true;
            } catch (std::exception const& e) {
                // A step that rewraps what it catches (runtime_error(e.what()))
                // passes a peer's OOM on as its text: still the peer's.
                peer = sync_aborted_ && std::strstr(e.what(), detail::peer_oom_text) != nullptr;
            } catch (...) {
            }
            if (!peer) {
                l.oom = true;
                l.failed_offset = offset;
                l.failed_planned = planned;
                l.failed_size = n;
                l.failed_calibration = at.calibrating(index);
                l.failed_short = n < planned;
                // Another library's OOM over oomguard's (libtorch's allocator
                // raises its own): the figures of the denial under it.
                if (!capture(std::current_exception(), l.info, l.what) && detail::last_oom().serial != oom_serial_)
                    l.info = detail::last_oom().info;
                l.room = l.info.requested_known && l.info.free != oom_info::unknown && l.info.free >= l.info.requested;
                l.need = failure_need(meter, l.info);

            }
        }
        // A sync point that threw marks the attempt aborted even when the step
        // swallowed the exception and went on: the ranks are no longer in step.
        l.aborted = sync_aborted_ && !l.oom;
        l.samples_done = offset;
    }

    // The end-of-attempt agreement. A rank that failed arrives here while the
    // others may still wait at a sync point of the same attempt: they see it,
    // leave their step by the OOM path and come here too; until every rank
    // stands here, the round is repeated, so no agreement ever pairs with a
    // different one.
    Ballot agree_end(Local const& l) {
        Ballot b(serial_, phase_end);
        b.set_any(Ballot::any_oom, l.oom);
        b.set_any(Ballot::any_aborted, l.aborted);
        b.set_any(Ballot::any_error, l.release_error != nullptr);
        if (l.oom) {
            // The figures of a failure go to its group: one rank's short remainder
            // must not lend its shortness, room or need to another's full-size failure.
            std::size_t const g = Ballot::group(l.failed_calibration, l.failed_short);
            b.set_min(Ballot::failed_size, l.failed_planned);
            b.set_any(Ballot::in_group(Ballot::failed_group, g), true);
            b.set_all(Ballot::in_group(Ballot::room_group, g), l.room);
            b.set_max(Ballot::in_group(Ballot::need_group, g), l.need);
            b.set_min(Ballot::in_group(Ballot::samples_group, g), l.failed_size);
        }
        b.set_held(Ballot::first_base, batch_base_, l.measured && batch_base_known_);
        if (l.measured) b.set_min(Ballot::limit, l.limit);
        b.set_all(Ballot::calibration_done, l.calibration_done);
        b.set_all(Ballot::full_later, l.full_later);
        b.set_min(Ballot::full_done, l.full_done);
        b.set_max(Ballot::calibration_peak, l.calibration_peak);
        b.set_max(Ballot::full_peak, l.full_peak);
        if (l.available_known) b.set_min(Ballot::available, l.available);
        b.set_min(Ballot::done_min, l.samples_done);
        b.set_max(Ballot::done_max, l.samples_done);
        for (;;) {
            Ballot t = agree(b);
            if (t.min(Ballot::phase_min) == phase_end && t.max(Ballot::phase_max) == phase_end) return t;
            if (t.max(Ballot::phase_max) != phase_end) protocol_error("a rank is past the end of this attempt");
        }
    }

    static Observation observation(Ballot const& t, Attempt const& at) noexcept {
        Observation o;
        o.failed_size = t.min_or_zero(Ballot::failed_size);
        // The failure is the smallest planned size's; at that size, a whole
        // micro-batch's failure on any rank outweighs a short remainder's.
        bool const in_calibration = at.calibration != 0 && o.failed_size == at.calibration;
        std::size_t g = Ballot::group(in_calibration, false);
        if (!t.any(Ballot::in_group(Ballot::failed_group, g))) g = Ballot::group(in_calibration, true);
        bool const failed = o.failed_size != 0 && t.any(Ballot::in_group(Ballot::failed_group, g));
        o.failed_short = failed && g == Ballot::group(in_calibration, true);
        o.device_had_room = failed && t.all(Ballot::in_group(Ballot::room_group, g));
        o.need = failed ? t.max(Ballot::in_group(Ballot::need_group, g)) : 0;
        o.failed_samples = failed ? t.min_or_zero(Ballot::in_group(Ballot::samples_group, g)) : 0;
        o.first_base = t.held(Ballot::first_base, Observation::unknown);
        o.limit = t.min_or_zero(Ballot::limit);
        o.calibration_done = t.all(Ballot::calibration_done);
        o.full_later = t.all(Ballot::full_later);
        o.calibration_peak = t.max(Ballot::calibration_peak);
        o.full_done = t.min_or_zero(Ballot::full_done);
        o.full_peak = t.max(Ballot::full_peak);
        o.available = t.min_or_zero(Ballot::available);
        return o;
    }

    // One collective (or, without consensus, this rank's ballot as it is). Every
    // rank must be in the same attempt, and outside the step in the same round.
    Ballot agree(Ballot b) {
        b.set_min(Ballot::global_min, planner_.global_batch());
        b.set_max(Ballot::global_max, planner_.global_batch());
        bool const metered = meter_for(planner_.attempt().plan.device) != nullptr;
        b.set_all(Ballot::all_metered, metered);
        if (consensus_.all_min != nullptr) consensus_.all_min(consensus_.context, b.data(), Ballot::count);
        // The policy every rank plans with: ShrinkPolicy::automatic() is
        // predictive only when every rank measures; predictive chosen by name
        // where some rank has no meter is refused on every rank.
        if (!b.all(Ballot::all_metered) && planner_.options().policy.kind() == ShrinkPolicy::Kind::predictive)
            refuse_unmetered(metered);
        planner_.use_meter(b.all(Ballot::all_metered));
        if (b.min(Ballot::global_min) != b.max(Ballot::global_max)) {
            detail::throw_logic(detail::Message()
                                << "oomguard: adaptive_batch consensus: the ranks run global batches of different "
                                   "sizes ("
                                << static_cast<unsigned long long>(b.min(Ballot::global_min)) << " to "
                                << static_cast<unsigned long long>(b.max(Ballot::global_max))
                                << " samples): give every rank the same GlobalBatch");
        }
        if (b.min(Ballot::serial_min) != b.max(Ballot::serial_max))
            protocol_error("the ranks are in different attempts (did every rank call run() for every global batch?)");
        std::uint64_t const lo = b.min(Ballot::phase_min), hi = b.max(Ballot::phase_max);
        if (lo != hi && lo > phase_end) protocol_error("the ranks are in different rounds after the step");
        return b;
    }

    // Before the first global batch, with a consensus hook: where every rank
    // starts. Each rank may hold a restored plan or none; all restored: the
    // smallest micro-batch at the lowest precision, with the model kept only
    // when every rank restored the same one (else each starts from the plan
    // alone, or their decisions would part); any not: every rank starts where
    // BatchOptions::start says, as if nothing was restored.
    void agree_start() {
        LearnedPlan const mine = planner_.learned();
        std::uint64_t const hash = model_hash(mine);
        Ballot b(serial_, phase_start);
        b.set_all(Ballot::all_restored, restored_);
        if (restored_) {
            b.set_min(Ballot::restored_micro, mine.plan.micro_batch);
            b.set_max(Ballot::restored_precision, mine.plan.precision_index);
            b.set_min(Ballot::model_hash_min, hash);
            b.set_max(Ballot::model_hash_max, hash);
        }
        Ballot t = agree(b);
        if (t.min(Ballot::phase_min) != phase_start || t.max(Ballot::phase_max) != phase_start)
            protocol_error("a rank began its first global batch while another was in a later round");
        if (planner_.options().start == BatchOptions::Start::calibrate && !t.all(Ballot::all_metered))
            refuse_uncalibrated();
        Plan const from = planner_.plan();
        if (!t.all(Ballot::all_restored)) {
            if (restored_) {
                planner_.reset();
                restored_ = false;
                emit(BatchEventKind::plan_loaded, from, planner_.plan(), 0, 0,
                     "another rank has no cached plan: every rank starts without one");
            }
            return;
        }
        Plan p = mine.plan;
        p.micro_batch = static_cast<std::size_t>(t.min(Ballot::restored_micro));
        p.precision_index = static_cast<std::size_t>(t.max(Ballot::restored_precision));
        p.precision = planner_.options().precisions[p.precision_index];
        if (t.min(Ballot::model_hash_min) == t.max(Ballot::model_hash_max) && p == mine.plan) return;
        if (t.min(Ballot::model_hash_min) == t.max(Ballot::model_hash_max)) {
            LearnedPlan l = mine;
            l.plan = p;
            planner_.restore(l);
        } else {
            planner_.restore_plan(p);
        }
        emit(BatchEventKind::plan_loaded, from, planner_.plan(), 0, 0, "the ranks agreed on where to start");
    }

    // A fingerprint of what a restored planner decides from: equal on every
    // rank exactly when their restored plans and models are (FNV-1a).
    static std::uint64_t model_hash(LearnedPlan const& l) noexcept {
        std::uint64_t h = 1469598103934665603ull;
        auto mix = [&h](std::uint64_t v) {
            for (int i = 0; i < 8; ++i) {
                h ^= (v >> (8 * i)) & 0xff;
                h *= 1099511628211ull;
            }
        };
        mix(l.plan.micro_batch);
        mix(l.plan.precision_index);
        mix(l.grow_ceiling);
        mix(l.tail);
        StepModel const& m = l.model;
        mix(m.n_points);
        for (std::size_t i = 0; i < m.n_points; ++i) mix(m.points[i].m), mix(m.points[i].bytes);
        mix(m.n_bounds);
        for (std::size_t i = 0; i < m.n_bounds; ++i) mix(m.bounds[i].m), mix(m.bounds[i].bytes);
        mix(m.low), mix(m.high), mix(m.has_base ? 1 : 0), mix(m.base), mix(m.limit);
        return h == Ballot::neutral ? 0 : h;
    }

    static void sync_thunk(void* self) { static_cast<AdaptiveBatch*>(self)->sync_point(); }

    void sync_point() {
        if (!in_step_) detail::throw_logic("oomguard: MicroBatch::sync() was called outside the step it was given to");
        if (consensus_.all_min == nullptr) return;
        if (sync_index_ == max_syncs)
            detail::throw_logic(detail::Message() << "oomguard: MicroBatch::sync() was called more than "
                                                  << static_cast<unsigned long long>(max_syncs)
                                                  << " times in one micro-batch");
        ++sync_index_;
        Ballot t = agree(Ballot(serial_, (static_cast<std::uint64_t>(mb_index_) + 1) << 20 | sync_index_));
        std::uint64_t const lo = t.min(Ballot::phase_min), hi = t.max(Ballot::phase_max);
        if (lo == hi) return;
        if (hi == phase_end) {
            sync_aborted_ = true;
            oom_info info;
            info.device = planner_.attempt().plan.device;
            info.requested_known = false;
            throw peer_out_of_memory(info, detail::Message() << detail::peer_oom_text);
        }
        detail::Message m;
        m << "oomguard: the ranks called MicroBatch::sync() at different points: micro-batch "
          << static_cast<unsigned long long>((lo >> 20) - 1) << " sync " << static_cast<unsigned long long>(lo & max_syncs)
          << " against micro-batch " << static_cast<unsigned long long>((hi >> 20) - 1) << " sync "
          << static_cast<unsigned long long>(hi & max_syncs);
        detail::throw_logic(m);
    }

    // Predictive without a meter (on this rank, or on another one).
    [[noreturn]] void refuse_unmetered(bool here_metered) const {
        detail::Message m;
        m << "oomguard: AdaptiveBatch: the predictive policy fits what a meter measures, and ";
        if (here_metered)
            m << "another rank has none for its device";
        else
            m << "there is none for GPU " << planner_.attempt().plan.device;
        m << ": call measure_with(budget) (or with a meter such as torch.hpp's TorchCudaMeter) before run(), on "
             "every rank, or choose bisect";
        detail::throw_invalid(m);
    }

    [[noreturn]] static void protocol_error(char const* what) {
        detail::throw_logic(detail::Message() << "oomguard: adaptive_batch consensus: " << what);
    }

    // A rank's failure path threw (or another rank's did): every rank knows it
    // from the same agreement and leaves now; the rank that threw rethrows its
    // own exception, the others give up.
    [[noreturn]] void fail_together(std::exception_ptr err, Local const& l, std::vector<AttemptRecord>& history) {
        if (err) std::rethrow_exception(err);
        give_up(l, history, "another rank's recovery failed (its rollback, cache release, shrink policy or "
                            "failover hook threw); every rank leaves together");
    }

    // A null function pointer or an empty std::function is a bad argument; a
    // lambda or functor is always callable.
    template <class F>
    static void require_callable(F const& f, char const* what) {
        using D = std::decay_t<F>;
        bool empty = false;
        if constexpr (std::is_pointer<D>::value || std::is_member_pointer<D>::value) {
            empty = f == nullptr;
        } else if constexpr (std::is_constructible<bool, F const&>::value &&
                             !std::is_convertible<F const&, bool>::value) {
            empty = !static_cast<bool>(f);
        }
        if (empty)
            detail::throw_invalid(detail::Message() << "oomguard: adaptive_batch: the " << what
                                                    << " is empty (a null function)");
    }

    Meter const* meter_for(int device) const noexcept {
        for (auto const& m : meters_)
            if (m.device == device) return &m;
        return nullptr;
    }

    // Runs the step, measuring its peak over what was held before it.
    template <class Step>
    std::size_t measured(Step& step, Meter const* meter, MicroBatch const& mb) {
        struct InStep {
            bool& flag;
            detail::AdaptiveStepScope marked;  // an OOM in here is advised to lower the batch
            explicit InStep(bool& f) : flag(f) { flag = true; }
            ~InStep() { flag = false; }
        } in_step{in_step_};
        if (meter == nullptr) {
            step(mb);
            return 0;
        }
        std::size_t outer_peak = meter->peak(meter->object);
        std::size_t base = meter->start(meter->object);
        last_base_ = base;
        // The global batch's first micro-batch sets what every peak of the
        // batch is measured over: a later one's then holds what the earlier
        // ones left held (gradients), and the planner fits one line to both.
        // What the registered caches hold is the step's to reuse (a workspace
        // kept between steps, a caching allocator's free blocks): not counted
        // as held under the batch, or a step that reuses it would seem to need
        // nothing.
        if (mb.offset == 0 || !batch_base_known_) {
            batch_base_ = beyond_caches(*meter, base);
            batch_base_known_ = true;
        }
        struct Restore {
            Meter const& m;
            std::size_t v;
            ~Restore() { m.raise(m.object, v); }
        } restore{*meter, outer_peak};
        step(mb);
        std::size_t pk = meter->peak(meter->object);
        return pk > base ? pk - base : 0;
    }

    // `held` less what the cache registry could give back now (nothing when
    // releases are off, or when the meter does not count what the caches
    // hold -- a caching allocator's bytes in use): the caches' bytes are the
    // step's to reuse.
    std::size_t beyond_caches(Meter const& meter, std::size_t held) const {
        if (!meter.counts_cached) return held;
        std::size_t const cached = releasable_now();
        return held > cached ? held - cached : 0;
    }

    // A measured micro-batch's figure over its own base, made over the batch's first base.
    std::size_t over_batch_base(std::size_t over_own) const noexcept {
        return last_base_ > batch_base_ ? over_own + (last_base_ - batch_base_) : over_own;
    }

    // What the failed micro-batch needed at least: what it held when the
    // allocation failed, plus that allocation, over the batch's first base.
    // Held may be below what the micro-batch began with: a caching allocator
    // whose segment allocation fails empties its free segments and tries once
    // more, so the denial comes with less held than there was at the start.
    // That failure is still the size's own need, not an unknown one.
    std::size_t failure_need(Meter const* meter, oom_info const& info) const noexcept {
        if (meter == nullptr || !info.requested_known || info.requested == oom_info::unknown ||
            info.budget_used == oom_info::unknown || !batch_base_known_ ||
            info.requested > static_cast<std::size_t>(-1) - info.budget_used)
            return 0;
        std::size_t const at = info.budget_used + info.requested;
        return at > batch_base_ ? at - batch_base_ : 0;
    }

    // The OOM's text, and its figures when it is oomguard's (true).
    static bool capture(std::exception_ptr const& ep, oom_info& info, detail::Message& what) {
        try {
            std::rethrow_exception(ep);
        } catch (out_of_memory const& e) {
            info = e.info();
            what << e.what();
            return true;
        } catch (std::exception const& e) {
            what << e.what();
        } catch (...) {
            what << "unknown device OOM";
        }
        return false;
    }

    // Rollback must happen for the retry to be exact. If it runs out of memory
    // itself (zeroing through a temporary, say), release caches and try again,
    // a few times; anything else, or a rollback that never fits, propagates.
    template <class Rollback>
    void roll_back(Rollback& rollback, unsigned attempt) {
        for (int tries = 1;; ++tries) {
            bool oom = false;
            try {
                rollback();
            } catch (...) {
                if (tries >= 4 || !is_device_oom(std::current_exception())) throw;
                oom = true;
            }
            if (!oom) return;
            ++counters_.rollback_retries;
            release_caches(attempt);
        }
    }

    // Before an attempt larger than any that ran since the caches were last
    // emptied: empty them first. A cache sized for smaller micro-batches (a
    // workspace kept between steps, a caching allocator's blocks) cannot serve
    // a larger one, and is held while the larger one is allocated -- an OOM the
    // release after it would only answer. (A caching allocator that empties
    // itself before failing does this for its own blocks.) Sizes are compared
    // in bytes per sample of their precision.
    void make_room(std::size_t n, Precision p, unsigned attempt) {
        std::size_t const bytes = n * bytes_per_element(p);
        if (bytes <= grown_to_) return;
        if (grown_to_ != 0 && releasable_now() != 0) release_caches(attempt);
        grown_to_ = bytes;
    }

    [[noreturn]] void refuse_uncalibrated() const {
        detail::throw_invalid(detail::Message()
                              << "oomguard: AdaptiveBatch: BatchOptions::start is calibrate, which measures "
                                 "micro-batches through a meter, and there is none for GPU "
                              << plan().device
                              << (consensus_.all_min != nullptr ? " on some rank" : "")
                              << ": call measure_with(budget) (or with a meter such as torch.hpp's "
                                 "TorchCudaMeter) before run(), or start at requested");
    }

    // What the registered caches could give back now (0 with releases off).
    std::size_t releasable_now() const {
        if (!planner_.options().release_caches) return 0;
        CacheRegistry const& reg = registry();
        return reg.size() != 0 ? reg.releasable_bytes() : 0;
    }

    // The registry adaptive_batch releases: BatchOptions::caches, or the global one.
    CacheRegistry& registry() const {
        CacheRegistry* own = planner_.options().caches;
        return own != nullptr ? *own : CacheRegistry::global();
    }

    std::size_t release_caches(unsigned attempt) {
        if (!planner_.options().release_caches) return 0;
        CacheRegistry& reg = registry();
        if (reg.size() == 0) return 0;
        grown_to_ = 0;
        ReleaseReport r = reg.release_all();
        ++counters_.releases;
        counters_.bytes_released += r.bytes();
        emit(BatchEventKind::released, plan(), plan(), r.bytes(), attempt, "", &r);
        r.rethrow_failure(&is_device_oom);  // a cache that threw no OOM (a sticky error, say): the failure path
        return r.bytes();
    }

    [[noreturn]] void give_up(Local const& l, std::vector<AttemptRecord>& history, char const* why) {
        ++counters_.give_ups;
        // The last error and its advice first: the text has a fixed room, and a
        // long attempt list is elided in the middle rather than cut at the end.
        detail::Message m;
        m << "oomguard: adaptive_batch gave up on a global batch of " << planner_.global_batch()
          << " after " << static_cast<unsigned long>(history.size()) << " attempts (" << why << ')';
        if (!tried_.empty() && !history.empty() && (l.oom || l.commit_oom)) {
            // The device the ladder ended on (by the attempt limit, say) is one tried too.
            try {
                note_tried(history.back().plan.device, l.info);
            } catch (...) {  // no room to note it: the message goes without it
            }
        }
        if (!tried_.empty()) {
            // After a failover, the devices and what each could not give: the
            // attempt list below may elide some of them.
            m << "; devices tried:";
            for (std::size_t k = 0; k < tried_.size(); ++k) {
                oom_info const& i = tried_[k].last;
                m << (k == 0 ? " GPU " : ", GPU ") << tried_[k].device << " (";
                if (i.requested_known && i.requested != oom_info::unknown) {
                    m << "could not give " << detail::format_bytes(i.requested);
                    if (i.free != oom_info::unknown) m << " with " << detail::format_bytes(i.free) << " free";
                } else {
                    m << "ran out of memory";
                }
                m << ')';
            }
        }
        m << "; last error: " << (l.what.view().empty() ? "another rank ran out of device memory" : l.what.view())
          << "; attempts:";
        std::size_t const n = history.size(), head = 2, tail = 3;
        for (std::size_t k = 0; k < n; ++k) {
            if (n > head + tail + 1 && k == head) {
                m << " ... (" << static_cast<unsigned long>(n - head - tail) << " more) ...";
                k = n - tail - 1;
                continue;
            }
            AttemptRecord const& a = history[k];
            m << " [" << detail::plan_text(a.plan).view();
            if (a.in_commit)
                m << ", the commit failed";
            else if (a.peer)
                m << ", another rank failed";
            else
                m << ", failed at " << a.failed_size;
            m << " after " << a.samples_done << " samples]";
        }
        planner_.abandon();
        // From the plan of the attempt it gave up at (the report's row, the trace's
        // event) to the last good plan the next batch starts from.
        emit(BatchEventKind::give_up, history.empty() ? plan() : history.back().plan, plan(), l.info.requested,
             static_cast<unsigned>(history.size()), m.c_str());
        throw recovery_failed(l.info, m, std::move(history));
    }

    // A device the ladder ended on in this global batch, with its last OOM.
    void note_tried(int device, oom_info const& last) {
        for (auto& t : tried_)
            if (t.device == device) {
                t.last = last;
                return;
            }
        tried_.push_back(TriedDevice{device, last});
    }

    void emit(BatchEventKind k, Plan const& from, Plan const& to, std::size_t bytes, unsigned attempt,
              char const* what, ReleaseReport const* release = nullptr) noexcept {
        if (observers_.empty()) return;
        emit(BatchEvent{k, from, to, bytes, attempt, what, release});
    }
    void emit_step(BatchEventKind k, Attempt const& at, std::size_t offset, std::size_t size, std::size_t bytes,
                   std::size_t held) noexcept {
        BatchEvent e{k, at.plan, at.plan, bytes, at.number, "", nullptr};
        e.offset = offset;
        e.size = size;
        e.held = held;
        emit(e);
    }
    AdaptiveBatch& add_meter(Meter const& m) {
        for (auto& existing : meters_)
            if (existing.device == m.device) {
                existing = m;
                return *this;
            }
        meters_.push_back(m);
        return *this;
    }

    // Observers never change what happens to a batch: what one throws is kept.
    void emit(BatchEvent const& e) noexcept {
        auto on_error = [this]() noexcept {
            ++counters_.observer_errors;
            if (!observer_error_) observer_error_ = std::current_exception();
        };
        BatchEvent sent = e;
        sent.batch = this;
        observers_.emit(&sent, on_error);
    }

    RecoveryPlanner planner_;
    BatchCounters counters_;
    std::vector<Meter> meters_;
    Consensus consensus_;
    detail::Observers observers_;     // moves with the batch; registrations follow it
    int (*failover_)(void*, FailoverRequest const&) = nullptr;
    struct TriedDevice {
        int device;
        oom_info last;
    };
    std::vector<TriedDevice> tried_;  // this global batch's devices whose ladder ended (failover)
    void* failover_user_ = nullptr;
    std::exception_ptr observer_error_;
    Observation last_observation_;
    std::uint64_t serial_ = 0;        // attempts run by this object: the same on every rank
    std::size_t mb_index_ = 0;        // the micro-batch running now, within its attempt
    std::uint64_t sync_index_ = 0;    // sync points it has passed
    bool in_step_ = false;
    bool running_ = false;
    bool sync_aborted_ = false;       // the step left by a sync point: another rank failed
    std::size_t last_base_ = 0;       // bytes held when the last measured step began
    std::size_t call_g_ = 0;          // this run()'s global batch (0: BatchOptions::global_batch)
    std::size_t grown_to_ = 0;        // the largest attempt since this runner emptied the caches (bytes per sample x m)
    std::uint64_t oom_serial_ = 0;    // detail::last_oom()'s count when the micro-batch began
    std::size_t batch_base_ = 0;      // bytes held when this global batch's first micro-batch began
    bool batch_base_known_ = false;
    static constexpr std::size_t unknown_cached = static_cast<std::size_t>(-1);
    // A commit's growth (Observation::commit_growth) over this empties the
    // caches before the next batch: more than a caching allocator's small
    // blocks (PyTorch serves up to 1 MiB from small segments of their own),
    // so some of it was carved out of the blocks the steps use.
    static constexpr std::size_t state_growth_release = std::size_t{1} << 20;
    std::size_t cached_left_ = unknown_cached;  // what the caches held when this runner's last batch committed
    bool release_before_batches_ = false;       // learned: the caches go before each global batch
    bool state_grew_ = false;                   // the last commit added state over state_growth_release
    bool restored_ = false;           // the plan came from restore()
    bool start_agreed_ = false;       // the ranks agreed on where to start (consensus)
};

/// One global batch, with no memory of past plans (use AdaptiveBatch for that).
template <class Step, class Commit, class Rollback>
BatchResult adaptive_batch(BatchOptions options, Step&& step, Commit&& commit, Rollback&& rollback) {
    AdaptiveBatch a(std::move(options));
    return a.run(std::forward<Step>(step), std::forward<Commit>(commit), std::forward<Rollback>(rollback));
}

}  // namespace oomguard
