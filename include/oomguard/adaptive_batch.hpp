// adaptive_batch: run a training or evaluation step on a global batch, and when
// the device runs out of memory, recover without losing a sample: leave the
// catch (so the exception and the step's buffers are gone), release caches,
// roll back the half-accumulated gradients, and retry the same samples with a
// smaller micro-batch -- keeping the global batch through accumulation -- then a
// lower precision, then (optionally) another device; give up with the history.
#pragma once

#include <oomguard/cache_registry.hpp>
#include <oomguard/classify.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/memory_budget.hpp>
#include <oomguard/precision.hpp>
#include <oomguard/shrink_policy.hpp>

#include <cstddef>
#include <exception>
#include <type_traits>
#include <utility>
#include <vector>

namespace oomguard {

struct Config;  // <oomguard/config.hpp>

/// What the user asks for. Validated by AdaptiveBatch's constructor.
struct BatchOptions {
    std::size_t global_batch = 0;      ///< G: samples per optimizer step, >= 1
    std::size_t micro_batch = 0;       ///< starting micro-batch m, in [min_micro_batch, G]; 0: G
    std::size_t min_micro_batch = 1;   ///< never shrink below this
    std::vector<Precision> precisions{Precision::fp32};  ///< the ladder, tried in order
    unsigned max_attempts = 64;        ///< attempts per global batch before giving up
    std::size_t grow_after = 0;        ///< grow back after this many clean global batches (0: never)
    bool release_caches = true;        ///< release the cache registry before each retry
    ShrinkPolicy policy = ShrinkPolicy::halve();
    CacheRegistry* caches = nullptr;   ///< nullptr: CacheRegistry::global()

    /// Applies the adaptive_batch settings of an OOMGUARD_CONF (min_batch,
    /// max_attempts, policy, factor, grow_after, precision) over these. Config
    /// comes from <oomguard/config.hpp>; a template only so that this header
    /// need not include it (the parser costs compile time where it is unused).
    template <class C, std::enable_if_t<std::is_same<C, Config>::value, int> = 0>
    BatchOptions& apply(C const& c) {
        if (c.min_batch) min_micro_batch = *c.min_batch;
        if (c.max_attempts) max_attempts = *c.max_attempts;
        if (c.policy) policy = *c.policy;
        if (c.grow_after) grow_after = *c.grow_after;
        if (!c.precisions.empty()) precisions = c.precisions;
        return *this;
    }
};

/// One micro-batch handed to the step.
struct MicroBatch {
    std::size_t offset = 0;     ///< first sample of the global batch in this micro-batch
    std::size_t size = 0;       ///< samples in it
    Precision precision = Precision::fp32;
    double weight = 0.0;        ///< size / G: weighted gradients sum to the full-batch gradient
    int device = 0;             ///< the device the plan runs on (changes only by failover)
    bool calibration = false;   ///< a measuring step whose work is rolled back
};

/// The plan in effect.
struct Plan {
    std::size_t micro_batch = 0;
    Precision precision = Precision::fp32;
    std::size_t precision_index = 0;
    int device = 0;
};

/// What one global batch took.
struct BatchResult {
    Plan plan;                 ///< the plan for the next global batch
    unsigned attempts = 0;     ///< 1 when nothing failed
    std::size_t micro_batches = 0;
};

/// Everything adaptive_batch decided, counted.
struct BatchCounters {
    std::size_t global_batches = 0, micro_batches = 0, ooms = 0, releases = 0, bytes_released = 0,
                retries_same = 0, shrinks = 0, precision_changes = 0, failovers = 0, grow_backs = 0,
                calibrations = 0, give_ups = 0, wasted_samples = 0, rollback_retries = 0;
};

enum class BatchEventKind : unsigned char {
    oom_caught, released, retry_same, shrink, precision_change, failover, grow_back, calibration, give_up, commit
};

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
    }
    return "unknown";
}

/// One decision, for observers (reports, traces, logs).
struct BatchEvent {
    BatchEventKind kind = BatchEventKind::commit;
    Plan from, to;
    std::size_t bytes = 0;          ///< released bytes, or the failed request
    unsigned attempt = 0;
    char const* what = "";          ///< the OOM's message for oom_caught and give_up
    ReleaseReport const* release = nullptr;  ///< per-cache bytes, for `released`
};

/// One failed attempt, kept for the give-up report.
struct AttemptRecord {
    Plan plan;
    std::size_t samples_done = 0;   ///< samples that completed before it failed
    std::size_t failed_size = 0;    ///< the micro-batch that ran out of memory
    std::size_t bytes_released = 0;
};

/// adaptive_batch could not fit the global batch: the last OOM's figures plus
/// every attempt. Still an out_of_memory (and so a std::bad_alloc).
class recovery_failed : public out_of_memory {
public:
    recovery_failed(oom_info info, detail::Message const& message, std::vector<AttemptRecord> attempts)
        : out_of_memory(info, message), attempts_(std::move(attempts)) {}
    std::vector<AttemptRecord> const& attempts() const noexcept { return attempts_; }

private:
    std::vector<AttemptRecord> attempts_;
};

/// The data-parallel hook: every rank calls each function collectively, once
/// per global batch, so all ranks take the same decision. `any_failed` returns
/// whether any rank ran out of memory in this attempt; `agree` replaces the
/// proposal with the one every rank will use (the smallest micro-batch and the
/// lowest precision any rank proposed). See <oomguard/mpi.hpp>, <oomguard/nccl.hpp>.
/// Only device OOMs are agreed on: any other exception leaves its rank at once,
/// and the others wait in the next collective, as with any error in a collective
/// program -- abort the job (MPI_Abort) from your handler.
struct Consensus {
    void* context = nullptr;
    bool (*any_failed)(void* context, bool mine) = nullptr;
    void (*agree)(void* context, std::size_t* micro_batch, std::size_t* precision_index) = nullptr;
};

/// What a failover hook is asked: the plan cannot fit on `plan.device` even at
/// its minimum and lowest precision. Return another device, or -1.
struct FailoverRequest {
    Plan plan;
    oom_info last;
};

/// Runs global batches under an adaptive plan and remembers the last good one
/// across calls. Keep one per workload: training and evaluation (`--bs` and
/// `--eval_bs`) are tuned apart.
class AdaptiveBatch {
public:
    explicit AdaptiveBatch(BatchOptions options) : opt_(std::move(options)) {
        validate(opt_);
        if (opt_.micro_batch == 0) opt_.micro_batch = opt_.global_batch;
        reset();
    }

    /// Measures each micro-batch's peak through `budget` (the predictive policy
    /// needs it; the report uses it). The budget must outlive this object.
    template <class Backend>
    AdaptiveBatch& measure_with(MemoryBudget<Backend>& budget) noexcept {
        meter_.object = &budget;
        meter_.start = [](void* b) -> std::size_t {
            auto* mb = static_cast<MemoryBudget<Backend>*>(b);
            mb->reset_peak();
            return mb->used();
        };
        meter_.peak = [](void* b) -> std::size_t { return static_cast<MemoryBudget<Backend>*>(b)->peak(); };
        meter_.raise = [](void* b, std::size_t v) { static_cast<MemoryBudget<Backend>*>(b)->raise_peak(v); };
        meter_.available = [](void* b) -> std::size_t {
            auto* mb = static_cast<MemoryBudget<Backend>*>(b);
            std::size_t avail = mb->available(), free = 0, total = 0;
            if (mb->backend().memory_info(mb->device(), &free, &total).ok() && free < avail) avail = free;
            return avail;
        };
        return *this;
    }

    /// Adds an observer: `fn(event, user)` is called for every decision, in the
    /// order observers were added (a report and a trace can both listen).
    AdaptiveBatch& observe(void (*fn)(BatchEvent const&, void*), void* user = nullptr) {
        if (fn == nullptr) detail::throw_invalid("oomguard: AdaptiveBatch::observe: the observer is a null function");
        observers_.push_back(Observer{fn, user});
        return *this;
    }

    /// Makes every rank of a data-parallel job take the same decisions.
    AdaptiveBatch& consensus(Consensus c) {
        if (c.any_failed == nullptr || c.agree == nullptr)
            detail::throw_invalid("oomguard: AdaptiveBatch::consensus: both any_failed and agree are needed");
        consensus_ = c;
        return *this;
    }

    /// Asked for another device when nothing fits on the current one.
    AdaptiveBatch& failover(int (*fn)(void*, FailoverRequest const&), void* user = nullptr) noexcept {
        failover_ = fn;
        failover_user_ = user;
        return *this;
    }

    /// Runs one global batch: `step(MicroBatch const&)` for each micro-batch,
    /// then `commit()` once; on a device OOM, `rollback()` and a retry of the
    /// same samples under a new plan. Any other exception from the step passes
    /// through unchanged, at once, without calling rollback; so does a sticky
    /// CUDA error. Throws recovery_failed when nothing fits.
    template <class Step, class Commit, class Rollback>
    BatchResult run(Step&& step, Commit&& commit, Rollback&& rollback) {
        require_callable(step, "step");
        require_callable(commit, "commit");
        require_callable(rollback, "rollback");
        maybe_grow();
        std::vector<AttemptRecord> history;
        std::size_t const G = opt_.global_batch;
        for (unsigned attempt = 1;; ++attempt) {
            Plan const tried = plan_;
            std::size_t m = plan_.micro_batch, offset = 0, failed_size = 0, micro_batches = 0;
            std::size_t available = meter_.object != nullptr ? meter_.available(meter_.object) : 0;
            bool failed = false;
            oom_info info;
            detail::Message what;
            try {
                while (offset < G) {
                    std::size_t n = m < G - offset ? m : G - offset;
                    failed_size = n;
                    std::size_t bytes = measured(step, MicroBatch{offset, n, plan_.precision,
                                                                  static_cast<double>(n) / static_cast<double>(G),
                                                                  plan_.device, false});
                    offset += n;
                    if (n > proven_) proven_ = n;
                    ++micro_batches;
                    ++counters_.micro_batches;
                    if (n == m)
                        m = opt_.policy.on_success(n, bytes, opt_.micro_batch);
                    else if (bytes != 0)
                        opt_.policy.observe(n, bytes);
                }
            } catch (...) {
                // Decide inside the catch, act outside it: leaving the handler
                // destroys the exception before any retry runs.
                if (!is_device_oom(std::current_exception())) throw;
                failed = true;
                capture(std::current_exception(), info, what);
            }
            if (failed) note_failure_bytes(failed_size, info);
            bool any = failed;
            if (consensus_.any_failed != nullptr) any = consensus_.any_failed(consensus_.context, failed);
            if (!any) {
                std::size_t next_m = m, next_p = plan_.precision_index;
                if (consensus_.agree != nullptr) consensus_.agree(consensus_.context, &next_m, &next_p);
                commit();
                plan_.micro_batch = next_m;
                set_precision(next_p);
                if (growing_) grow_wait_ = opt_.grow_after;  // it held: the next grow comes as soon
                last_good_ = plan_;
                growing_ = false;
                retried_same_ = false;
                transient_retries_ = 0;
                ++clean_batches_;
                ++counters_.global_batches;
                emit(BatchEventKind::commit, tried, plan_, 0, attempt, "");
                return BatchResult{plan_, attempt, micro_batches};
            }

            counters_.wasted_samples += offset;
            roll_back(rollback, attempt);
            clean_batches_ = 0;
            if (failed) {
                ++counters_.ooms;
                emit(BatchEventKind::oom_caught, tried, tried, info.requested, attempt, what.c_str());
            }
            std::size_t released = release_caches(attempt);
            history.push_back(AttemptRecord{tried, offset, failed_size, released});
            if (failed) decide(failed_size, released, available, attempt, info, what, history, step, rollback);
            if (consensus_.agree != nullptr) {
                std::size_t mm = plan_.micro_batch, pp = plan_.precision_index;
                consensus_.agree(consensus_.context, &mm, &pp);
                plan_.micro_batch = mm;
                set_precision(pp);
            }
            if (attempt >= opt_.max_attempts) give_up(info, what, history, "the attempt limit was reached");
        }
    }

    /// run() with no commit or rollback hook.
    template <class Step>
    BatchResult run(Step&& step) {
        return run(std::forward<Step>(step), [] {}, [] {});
    }

    Plan const& plan() const noexcept { return plan_; }
    Plan const& last_good_plan() const noexcept { return last_good_; }
    BatchCounters const& counters() const noexcept { return counters_; }
    BatchOptions const& options() const noexcept { return opt_; }
    ShrinkPolicy const& policy() const noexcept { return opt_.policy; }

    /// Back to the requested plan; forgets measurements and counters of clean batches.
    void reset() noexcept {
        plan_ = Plan{opt_.micro_batch, opt_.precisions.front(), 0, plan_.device};
        last_good_ = plan_;
        proven_ = 0;
        opt_.policy.reset();
        clean_batches_ = 0;
        grow_wait_ = opt_.grow_after;
        grow_ceiling_ = 0;
        growing_ = false;
        retried_same_ = false;
        transient_retries_ = 0;
    }

    /// Throws std::invalid_argument naming the first bad option.
    static void validate(BatchOptions const& o) {
        auto bad = [](detail::Message const& m) { detail::throw_invalid(m); };
        if (o.global_batch == 0)
            bad(detail::Message() << "oomguard: BatchOptions.global_batch is 0; give the samples per step, >= 1");
        if (o.micro_batch > o.global_batch)
            bad(detail::Message() << "oomguard: BatchOptions.micro_batch " << o.micro_batch
                                  << " is above global_batch " << o.global_batch << "; give a size in [1, "
                                  << o.global_batch << "] or 0 for the whole batch");
        if (o.min_micro_batch == 0)
            bad(detail::Message() << "oomguard: BatchOptions.min_micro_batch is 0; give a size >= 1");
        std::size_t start = o.micro_batch == 0 ? o.global_batch : o.micro_batch;
        if (o.min_micro_batch > start)
            bad(detail::Message() << "oomguard: BatchOptions.min_micro_batch " << o.min_micro_batch
                                  << " is above the starting micro_batch " << start);
        if (o.precisions.empty())
            bad(detail::Message() << "oomguard: BatchOptions.precisions is empty; give at least one, "
                                     "for example {fp32, bf16, fp16}");
        for (std::size_t i = 0; i < o.precisions.size(); ++i)
            for (std::size_t j = i + 1; j < o.precisions.size(); ++j)
                if (o.precisions[i] == o.precisions[j])
                    bad(detail::Message() << "oomguard: BatchOptions.precisions lists "
                                          << to_string(o.precisions[i]) << " twice");
        if (o.max_attempts == 0)
            bad(detail::Message() << "oomguard: BatchOptions.max_attempts is 0; give at least 1");
    }

private:
    struct Meter {
        void* object = nullptr;
        std::size_t (*start)(void*) = nullptr;
        std::size_t (*peak)(void*) = nullptr;
        void (*raise)(void*, std::size_t) = nullptr;
        std::size_t (*available)(void*) = nullptr;
    };

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

    // Runs the step, measuring its peak over what was held before it.
    template <class Step>
    std::size_t measured(Step& step, MicroBatch const& mb) {
        if (meter_.object == nullptr) {
            step(mb);
            return 0;
        }
        std::size_t outer_peak = meter_.peak(meter_.object);
        std::size_t base = meter_.start(meter_.object);
        last_base_ = base;
        struct Restore {
            Meter& m;
            std::size_t v;
            ~Restore() { m.raise(m.object, v); }
        } restore{meter_, outer_peak};
        step(mb);
        std::size_t pk = meter_.peak(meter_.object);
        return pk > base ? pk - base : 0;
    }

    // What the failed micro-batch needed at least: what it held when the
    // allocation failed, plus that allocation. For a step whose largest buffer
    // fails this is exact, and it anchors the predictive fit at the far end.
    void note_failure_bytes(std::size_t size, oom_info const& info) {
        if (meter_.object == nullptr || !info.requested_known || info.requested == oom_info::unknown ||
            info.budget_used == oom_info::unknown || info.budget_used < last_base_)
            return;
        opt_.policy.observe(size, info.budget_used - last_base_ + info.requested);
    }

    static void capture(std::exception_ptr const& ep, oom_info& info, detail::Message& what) {
        try {
            std::rethrow_exception(ep);
        } catch (out_of_memory const& e) {
            info = e.info();
            what << e.what();
        } catch (std::exception const& e) {
            what << e.what();
        } catch (...) {
            what << "unknown device OOM";
        }
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

    std::size_t release_caches(unsigned attempt) {
        if (!opt_.release_caches) return 0;
        CacheRegistry& reg = opt_.caches != nullptr ? *opt_.caches : CacheRegistry::global();
        if (reg.size() == 0) return 0;
        ReleaseReport r = reg.release_all();
        ++counters_.releases;
        counters_.bytes_released += r.bytes();
        emit(BatchEventKind::released, plan_, plan_, r.bytes(), attempt, "", &r);
        return r.bytes();
    }

    template <class Step, class Rollback>
    void decide(std::size_t failed_size, std::size_t released, std::size_t available, unsigned attempt,
                oom_info const& info, detail::Message const& what, std::vector<AttemptRecord>& history, Step& step,
                Rollback& rollback) {
        Plan const from = plan_;
        if (growing_) {  // a grow-back did not fit: back to the last good plan, wait longer next time
            growing_ = false;
            if (plan_.precision_index == last_good_.precision_index &&
                (grow_ceiling_ == 0 || plan_.micro_batch < grow_ceiling_))
                grow_ceiling_ = plan_.micro_batch;
            plan_ = last_good_;
            grow_wait_ = grow_wait_ * 2 + 1;
            emit(BatchEventKind::shrink, from, plan_, 0, attempt, "");
            return;
        }
        if (released > 0 && !retried_same_) {
            retried_same_ = true;
            ++counters_.retries_same;
            emit(BatchEventKind::retry_same, from, plan_, released, attempt, "");
            return;
        }
        retried_same_ = false;
        // A size that has fit under this plan before failed: most likely a
        // transient OOM (another process's burst, fragmentation), and shrinking
        // would only add micro-batches, each one more chance to fail. Retry it a
        // few times -- at the minimum, as long as attempts remain -- before shrinking.
        if (failed_size <= proven_ && (transient_retries_ < 3 || failed_size <= opt_.min_micro_batch)) {
            ++transient_retries_;
            ++counters_.retries_same;
            emit(BatchEventKind::retry_same, from, plan_, 0, attempt, "");
            return;
        }
        if (transient_retries_ > 0) proven_ = 0;  // it kept failing: conditions changed
        transient_retries_ = 0;
        if (failed_size > opt_.min_micro_batch) {
            ShrinkContext ctx;
            ctx.failed = failed_size;
            ctx.minimum = opt_.min_micro_batch;
            ctx.requested = opt_.micro_batch;
            ctx.last_good = opt_.policy.largest_success();
            ctx.attempt = attempt;
            ctx.available_bytes = available;
            std::size_t c1 = 0, c2 = 0;
            if (meter_.object != nullptr && opt_.policy.wants_calibration(ctx, c1, c2)) {
                calibrate(step, rollback, c1, attempt);
                calibrate(step, rollback, c2, attempt);
            }
            plan_.micro_batch = opt_.policy.on_failure(ctx);
            ++counters_.shrinks;
            emit(BatchEventKind::shrink, from, plan_, 0, attempt, "");
            return;
        }
        if (plan_.precision_index + 1 < opt_.precisions.size()) {
            set_precision(plan_.precision_index + 1);
            opt_.policy.reset();  // bytes per sample changed: old measurements mislead
            grow_ceiling_ = 0;
            proven_ = 0;
            ++counters_.precision_changes;
            emit(BatchEventKind::precision_change, from, plan_, 0, attempt, "");
            return;
        }
        if (failover_ != nullptr) {
            int next = failover_(failover_user_, FailoverRequest{plan_, info});
            if (next >= 0 && next != plan_.device) {
                plan_ = Plan{opt_.micro_batch, opt_.precisions.front(), 0, next};
                opt_.policy.reset();
                proven_ = 0;
                ++counters_.failovers;
                emit(BatchEventKind::failover, from, plan_, 0, attempt, "");
                return;
            }
        }
        give_up(info, what, history, "the micro-batch is at its minimum and the precision ladder is exhausted");
    }

    // A measuring step whose work is thrown away: tells the predictive policy
    // what `size` samples need. An OOM here is a measurement too: it is noted.
    template <class Step, class Rollback>
    void calibrate(Step& step, Rollback& rollback, std::size_t size, unsigned attempt) {
        std::size_t bytes = 0;
        bool oom = false;
        try {
            bytes = measured(step, MicroBatch{0, size, plan_.precision,
                                              static_cast<double>(size) / static_cast<double>(opt_.global_batch),
                                              plan_.device, true});
        } catch (...) {
            if (!is_device_oom(std::current_exception())) throw;
            oom = true;
        }
        roll_back(rollback, attempt);
        ++counters_.calibrations;
        counters_.wasted_samples += size;
        if (!oom && bytes != 0) opt_.policy.observe(size, bytes);
        Plan p = plan_;
        p.micro_batch = size;
        emit(BatchEventKind::calibration, plan_, p, bytes, attempt, oom ? "calibration step ran out of memory" : "");
    }

    void maybe_grow() {
        if (opt_.grow_after == 0 || clean_batches_ < grow_wait_) return;
        Plan const from = plan_;
        // Toward the requested size, bisecting below the smallest grow that failed.
        std::size_t cap = opt_.micro_batch;
        if (grow_ceiling_ != 0 && grow_ceiling_ - 1 < cap) cap = grow_ceiling_ - 1;
        if (plan_.precision_index > 0) {
            set_precision(plan_.precision_index - 1);
            opt_.policy.reset();
            grow_ceiling_ = 0;
            proven_ = 0;
        } else if (plan_.micro_batch < cap) {
            plan_.micro_batch += (cap - plan_.micro_batch + 1) / 2;
            opt_.policy.forget_bounds();
        } else {
            return;
        }
        growing_ = true;
        clean_batches_ = 0;
        ++counters_.grow_backs;
        emit(BatchEventKind::grow_back, from, plan_, 0, 0, "");
    }

    [[noreturn]] void give_up(oom_info const& info, detail::Message const& what,
                              std::vector<AttemptRecord> history, char const* why) {
        ++counters_.give_ups;
        detail::Message m;
        m << "oomguard: adaptive_batch gave up on a global batch of " << opt_.global_batch << " after "
          << static_cast<unsigned long>(history.size()) << " attempts (" << why << "):";
        for (auto const& a : history)
            m << " [m=" << a.plan.micro_batch << ' ' << to_string(a.plan.precision) << " GPU " << a.plan.device
              << ", failed at " << a.failed_size << " after " << a.samples_done << " samples]";
        m << "; last error: " << what.view();
        emit(BatchEventKind::give_up, plan_, plan_, info.requested, static_cast<unsigned>(history.size()), m.c_str());
        throw recovery_failed(info, m, std::move(history));
    }

    void set_precision(std::size_t index) noexcept {
        if (index >= opt_.precisions.size()) index = opt_.precisions.size() - 1;
        plan_.precision_index = index;
        plan_.precision = opt_.precisions[index];
    }

    void emit(BatchEventKind k, Plan const& from, Plan const& to, std::size_t bytes, unsigned attempt,
              char const* what, ReleaseReport const* release = nullptr) {
        if (observers_.empty()) return;
        BatchEvent e{k, from, to, bytes, attempt, what, release};
        for (auto const& o : observers_) o.fn(e, o.user);
    }

    BatchOptions opt_;
    Plan plan_;
    Plan last_good_;
    BatchCounters counters_;
    Meter meter_;
    Consensus consensus_;
    struct Observer {
        void (*fn)(BatchEvent const&, void*);
        void* user;
    };
    std::vector<Observer> observers_;
    int (*failover_)(void*, FailoverRequest const&) = nullptr;
    void* failover_user_ = nullptr;
    std::size_t last_base_ = 0;  // bytes held when the last measured step began
    std::size_t clean_batches_ = 0;
    std::size_t grow_wait_ = 0;
    std::size_t grow_ceiling_ = 0;  // smallest grow-back size that failed (0: none)
    bool growing_ = false;
    bool retried_same_ = false;
    unsigned transient_retries_ = 0;  // same-size retries of a size known to fit, this batch
    std::size_t proven_ = 0;          // largest micro-batch that completed at this precision and device
};

/// One global batch, with no memory of past plans (use AdaptiveBatch for that).
template <class Step, class Commit, class Rollback>
BatchResult adaptive_batch(BatchOptions options, Step&& step, Commit&& commit, Rollback&& rollback) {
    AdaptiveBatch a(std::move(options));
    return a.run(std::forward<Step>(step), std::forward<Commit>(commit), std::forward<Rollback>(rollback));
}

}  // namespace oomguard
