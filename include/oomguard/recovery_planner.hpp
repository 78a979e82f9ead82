// The recovery planner: every decision adaptive_batch takes, as one pure state
// machine. (the plan, what one attempt observed) -> the next action: commit,
// retry the same size, shrink, the next precision, fail over, give up. No I/O,
// no callbacks of its own (a custom shrink policy is the user's function), no
// clock: the same inputs give the same actions, so ranks that agree on the
// inputs take the same decisions and run the same micro-batch sizes.
//
// The ladder, walked in this order at every size (the minimum too):
//   1. a grow-back or a restored precision that failed: back to the last good plan
//   2. the cache release freed memory: retry the same size, once per size and
//      global batch (measured: when what it freed of what the caches held as
//      the failed micro-batch began could make its need fit; not for a raised
//      size, which goes back at once, see 5). A size that fails by its own
//      need and holds only after this retry in two global batches in a row (a
//      caching allocator fragmenting at it) is cut at the commit to
//      m * reach / need and becomes the search's ceiling. (A retry is once per
//      size: the rungs below that keep the size -- a remainder cut into pieces --
//      allow another.)
//   3. a transient OOM (see is_transient: with a meter, the failed micro-batch's
//      held + requested bytes within all a step could reach; without, a size
//      that completed before, or a request below what was available with room
//      on the device): retry it, up to `transient_retries` times in a row (with
//      resume, an attempt that kept a micro-batch starts the count again)
//   4. a short remainder that failed by its own need: the plan's size stays, and
//      the remainder runs in halves (Attempt::tail), in this global batch and
//      in the next ones while the plan stays
//   5. above the minimum: shrink by the policy (from the plan's size), measuring
//      small sizes first when predictive has fewer than two points (a
//      calibration -- c1 twice, then c2 chosen from what c1 measured -- whose
//      work is kept)
//   (an OOM in the commit: up to `transient_retries` retries over the whole
//    global batch, then one shrink, then on to 6: the commit's own memory
//    hardly follows the micro-batch)
//   6. the next precision of the ladder
//   7. fail over to another device (when the runner has a failover hook)
//   8. give up, back at the last good plan
// and at any step: give up when the global batch has used `max_attempts` (with
// resume, attempts that kept a micro-batch do not count, nor search steps
// inside the batch that failed by their own need; an OOM in the commit keeps
// nothing, so it always counts).
#pragma once

#include <oomguard/detail/format.hpp>
#include <oomguard/detail/std_throw.hpp>
#include <oomguard/precision.hpp>
#include <oomguard/shrink_policy.hpp>

#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace oomguard {

struct Config;  // <oomguard/config.hpp>
class CacheRegistry;

/// What the user asks for. Validated by RecoveryPlanner's (and so AdaptiveBatch's) constructor.
struct BatchOptions {
    std::size_t global_batch = 0;      ///< G: samples per optimizer step, >= 1
    std::size_t micro_batch = 0;       ///< starting micro-batch m, in [min_micro_batch, G]; 0: G
    std::size_t min_micro_batch = 1;   ///< never shrink below this
    std::vector<Precision> precisions{Precision::fp32};  ///< the ladder, tried in order
    unsigned max_attempts = 64;        ///< attempts per global batch before giving up (with resume,
                                       ///< an attempt that kept a micro-batch does not count)
    std::size_t grow_after = 0;        ///< grow the size back after this many clean global batches (0: never)
    std::size_t restore_precision_after = 100;  ///< try the previous precision again after this many
                                                ///< clean global batches (0: never)
    unsigned transient_retries = 3;    ///< retries of a size that has completed before shrinking it
    /// Each micro-batch applies its contribution atomically (a micro-batch that
    /// runs out of memory leaves nothing of itself): an OOM in micro-batch k keeps
    /// micro-batches 1..k-1 and the retry starts at k. Rollback then runs only when
    /// the whole global batch is abandoned (an OOM in commit, a give-up).
    bool resume = false;
    bool release_caches = true;        ///< release the cache registry before each retry, before a micro-batch
                                       ///< larger than any since it was last released, and before global
                                       ///< batches as AdaptiveBatch::release_before_batches() says (AdaptiveBatch)
    /// How to shrink and where to probe: by default predictive when the batch
    /// has a meter (AdaptiveBatch::measure_with), bisect otherwise.
    ShrinkPolicy policy = ShrinkPolicy::automatic();
    CacheRegistry* caches = nullptr;   ///< nullptr: CacheRegistry::global()
    /// Where a workload's first global batch starts (see `start`).
    enum class Start : unsigned char {
        requested,  ///< at `micro_batch`: the first OOM tells what does not fit
        calibrate   ///< measure first: calibration micro-batches, then the fitted size (needs a meter)
    };
    /// Where the first global batch starts. `calibrate` runs, before any OOM,
    /// the calibration micro-batches the predictive policy runs after one (two
    /// at c1 = half a sixteenth of `micro_batch`, at least min_micro_batch;
    /// then one at c2, chosen from what c1 measured by
    /// ShrinkPolicy::second_calibration: at least a sixteenth of `micro_batch`,
    /// twice min_micro_batch and min_micro_batch + 1 where c1's peak says that
    /// fits, else less, and below c1 when c1 already fills two thirds of what
    /// a step can reach; none when that sixteenth is not below `micro_batch`),
    /// fits the step's line to what the meter measured and runs the rest of the batch at the largest size the
    /// fit allows under the predictive margin: the first OOM then comes only
    /// when the fit is wrong. Their work is kept: the result is the same. It
    /// needs a meter: AdaptiveBatch::run() throws std::invalid_argument naming
    /// measure_with without one. A plan restored from a PlanCache starts there
    /// instead.
    Start start = Start::requested;

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

/// The plan in effect.
struct Plan {
    std::size_t micro_batch = 0;            ///< samples per micro-batch
    Precision precision = Precision::fp32;  ///< the precision micro-batches run at
    std::size_t precision_index = 0;        ///< its index in BatchOptions::precisions
    int device = 0;                         ///< the device the plan runs on (changes only by failover)
};

namespace detail {
/// "m=64 bf16 GPU 0": a plan as reports, traces and give-up messages write it.
inline Message plan_text(Plan const& p) noexcept {
    Message m;
    m << "m=" << p.micro_batch << ' ' << to_string(p.precision) << " GPU " << p.device;
    return m;
}
}  // namespace detail

/// What a workload has learned, as a PlanCache stores it: the last plan that
/// committed, the planner's model of the step (points, bounds, base, limit,
/// the search's low and high) and the smallest grow-back that failed.
struct LearnedPlan {
    Plan plan;                     ///< the last plan that committed a global batch
    StepModel model;               ///< what was measured and searched
    std::size_t grow_ceiling = 0;  ///< the smallest grow-back size that failed (0: none)
    /// The pieces a short remainder runs in under `plan` (0: whole): a
    /// remainder that failed by its own need is not failed again after a restart.
    std::size_t tail = 0;
    /// Whether the workload empties its caches before each global batch
    /// (AdaptiveBatch::release_before_batches(): their blocks once cost an
    /// OOM). The runner's, not the planner's: RecoveryPlanner::learned() leaves it false.
    bool release_before_batches = false;
};

/// Two plans are the same when their micro-batch, rung of the precision ladder and device are.
inline bool operator==(Plan const& a, Plan const& b) noexcept {
    return a.micro_batch == b.micro_batch && a.precision_index == b.precision_index && a.device == b.device;
}
/// Not operator==.
inline bool operator!=(Plan const& a, Plan const& b) noexcept { return !(a == b); }

/// What one attempt runs, from where the global batch stands: micro-batches of
/// `plan.micro_batch` samples (the last one shorter when what is left is not a
/// multiple), the first `calibration_runs` of them at `calibration` samples when
/// that is not 0 -- measuring micro-batches whose work is kept -- and, when
/// `segment` is not 0, no more than `segment` micro-batches before the planner
/// looks again.
struct Attempt {
    Plan plan;                    ///< the plan the attempt runs under
    /// When not 0: the first micro-batches (calibration_runs of them) run at this many samples, measuring
    /// ones whose work is kept.
    std::size_t calibration = 0;
    unsigned number = 1;  ///< the attempt's number within its global batch, from 1
    std::size_t segment = 0;  ///< when not 0: at most this many micro-batches run before the planner looks again
    /// When not 0: a short remainder (fewer samples left than the plan's size)
    /// runs in pieces of at most this many samples. The plan's size stays: a
    /// remainder that failed says nothing of the size every other micro-batch runs at.
    std::size_t tail = 0;
    /// How many micro-batches run at `calibration` first: two, so that one of
    /// them runs where later micro-batches do, over what the first left held.
    std::size_t calibration_runs = 2;
    /// A search step inside the global batch (with resume): a failure of it by
    /// its own need narrows the range and is not charged to max_attempts.
    bool search = false;

    /// Whether micro-batch `index` is a calibration micro-batch.
    bool calibrating(std::size_t index) const noexcept { return calibration != 0 && index < calibration_runs; }
    /// The planned size of micro-batch `index` (a short remainder is cut from it).
    std::size_t planned(std::size_t index) const noexcept {
        return calibrating(index) ? calibration : plan.micro_batch;
    }
};

/// What one attempt observed; with a consensus hook, agreed over every rank
/// (the figures below say how), so every rank feeds the planner the same. Bytes
/// are as the meter counts them (AdaptiveBatch::measure_with); "held" figures
/// are absolute; peaks and needs are over `first_base` when it is known, else
/// over the micro-batch's own base (what was held when it began).
struct Observation {
    static constexpr std::size_t unknown = std::numeric_limits<std::size_t>::max();  ///< not measured

    /// How an attempt ended.
    enum class Outcome : unsigned char {
        completed,   ///< every micro-batch and the commit completed
        segment_done,  ///< the attempt's segment completed; the global batch goes on
        step_oom,    ///< a micro-batch ran out of device memory (on some rank)
        commit_oom   ///< the commit ran out of device memory (on every rank)
    };
    Outcome outcome = Outcome::completed;  ///< how the attempt ended (with consensus: as every rank agreed)
    std::size_t failed_size = 0;       ///< the planned size of the micro-batch that failed (the smallest over ranks)
    bool calibration_done = false;     ///< the calibration micro-batches completed (on every rank)
    std::size_t calibration_peak = 0;  ///< their largest peak over what was held before (the largest; 0: not measured)
    std::size_t full_done = 0;         ///< micro-batches of the planned size that completed (the fewest over ranks)
    std::size_t full_peak = 0;         ///< the largest peak of one of them (0: not measured)
    /// One of them ran after the global batch's first micro-batch (on every
    /// rank): its peak holds what earlier micro-batches leave held. Otherwise
    /// the peak is the first micro-batch's alone, a lower bound for the others.
    bool full_later = false;
    std::size_t need = 0;              ///< the failed micro-batch needed at least this: held + requested (0: unknown)
    std::size_t available = 0;         ///< bytes a step could use when the attempt began (the least; 0: unknown)
    std::size_t released = 0;          ///< bytes the cache release freed on every rank that failed (the least)
    bool failed_short = false;         ///< the failed micro-batch was a short remainder (on some rank)
    bool device_had_room = false;      ///< the device had room for the failed request when it failed
                                       ///< (on every rank that failed): the failure was not this size's need
    std::size_t failed_samples = 0;    ///< the failed micro-batch's own samples (below failed_size when short)
    /// Held when the global batch's first micro-batch began (the most): with a
    /// meter, the peaks and the need above are over it, so a later micro-batch's
    /// figure holds what the earlier ones left held (gradients); unknown: each
    /// over its own micro-batch's base.
    std::size_t first_base = unknown;
    std::size_t limit = 0;             ///< held + available when the attempt began (the least; 0: unknown)
    std::size_t after_commit = unknown;  ///< held after the commit returned (the most)
    /// Bytes the commit added that stay held (the most over the ranks;
    /// unknown: not measured): an optimizer's state appearing at its first
    /// step. At least held after it less held when it began; and held after
    /// it over the batch's first base, but no more than its own peak over its
    /// start -- exact when it frees the gradients (set_to_none, libtorch's
    /// default) and when it keeps them and makes no temporaries; gradients
    /// kept across a commit that makes temporaries count up to the smaller of
    /// the two twice (the aggregates cannot tell them apart).
    std::size_t commit_growth = unknown;
};

/// What the planner decided.
enum class PlanAction : unsigned char {
    keep,            ///< begin_batch: run the plan as it is
    continue_batch,  ///< the segment held: go on with the global batch at the new plan
    grow_back,       ///< begin_batch: a larger size or the previous precision is tried
    commit,          ///< the attempt completed: the global batch is done
    retry_same,      ///< retry the same plan (after a release, or a transient OOM)
    shrink,          ///< a smaller micro-batch (or back to the last good plan after a failed grow-back)
    next_precision,  ///< the next precision of the ladder
    failover,        ///< ask for another device (the runner calls failed_over or no_failover)
    give_up          ///< nothing fits: the plan is back at the last good one
};

/// The action's name, as reports write it ("shrink", "retry_same", ...).
constexpr char const* to_string(PlanAction a) noexcept {
    switch (a) {
        case PlanAction::keep: return "keep";
        case PlanAction::continue_batch: return "continue_batch";
        case PlanAction::grow_back: return "grow_back";
        case PlanAction::commit: return "commit";
        case PlanAction::retry_same: return "retry_same";
        case PlanAction::shrink: return "shrink";
        case PlanAction::next_precision: return "next_precision";
        case PlanAction::failover: return "failover";
        case PlanAction::give_up: return "give_up";
    }
    return "unknown";
}

/// What the planner decided, and the plan before and after.
struct Decision {
    PlanAction action = PlanAction::keep;  ///< what the runner does next
    Plan from,            ///< the plan before the decision
         to;              ///< the plan after the decision
    char const* why = "";  ///< for give_up: the reason, in words
};

/// The pure recovery state machine behind AdaptiveBatch (see the top of this header).
class RecoveryPlanner {
public:
    /// A planner for `options`, starting at options.micro_batch (0: the global batch) and the first
    /// precision; throws std::invalid_argument for options validate refuses.
    explicit RecoveryPlanner(BatchOptions options) : opt_(std::move(options)), policy_(opt_.policy.resolve(false)) {
        validate(opt_);
        if (opt_.micro_batch == 0) opt_.micro_batch = opt_.global_batch;
        g_ = opt_.global_batch;
        reset();
    }

    /// Whether the ladder has a failover step (AdaptiveBatch sets it when a hook is installed).
    void allow_failover(bool on) noexcept { failover_ = on; }

    /// Starts a global batch of `global_batch` samples (0: BatchOptions::global_batch;
    /// fewer for an epoch's last, shorter batch, under the same plan): clears
    /// what the last one left, and grows back (the previous precision first,
    /// then the size) when enough clean batches passed. Throws
    /// std::invalid_argument for a size above BatchOptions::global_batch.
    Decision begin_batch(std::size_t global_batch = 0) {
        if (global_batch > opt_.global_batch)
            detail::throw_invalid(detail::Message()
                                  << "oomguard: a global batch of " << global_batch << " samples is above "
                                  << "BatchOptions.global_batch " << opt_.global_batch << "; give [1, "
                                  << opt_.global_batch << "] (or 0 for " << opt_.global_batch << ')');
        g_ = global_batch != 0 ? global_batch : opt_.global_batch;
        clear_batch_state();
        Decision d{PlanAction::keep, plan_, plan_, ""};
        if (plan_.precision_index > 0 && opt_.restore_precision_after != 0 &&
            clean_batches_ >= precision_wait_) {
            // Keep the bytes per sample about the same: a size grown under the
            // lower precision would not fit under the higher one.
            std::size_t const from_bytes = bytes_per_element(plan_.precision);
            set_precision(plan_.precision_index - 1);
            std::size_t m = plan_.micro_batch * from_bytes / bytes_per_element(plan_.precision);
            plan_.micro_batch = m < opt_.min_micro_batch ? opt_.min_micro_batch : m;
            forget_sizes();
            growing_ = Growing::precision;
        } else if (opt_.grow_after != 0 && clean_batches_ >= grow_wait_) {
            // Toward the requested size, bisecting below the smallest grow-back
            // that failed. That ceiling is a hint, not a law: once the plan has
            // reached it, it expires, and the next grow-back tries above it.
            if (grow_ceiling_ != 0 && plan_.micro_batch + 1 >= grow_ceiling_) grow_ceiling_ = 0;
            std::size_t cap = opt_.micro_batch;
            if (grow_ceiling_ != 0 && grow_ceiling_ - 1 < cap) cap = grow_ceiling_ - 1;
            if (plan_.micro_batch < cap) {
                plan_.micro_batch += (cap - plan_.micro_batch + 1) / 2;
                model_.forget_search();
                growing_ = Growing::size;
            }
        }
        if (growing_ != Growing::none) {
            clean_batches_ = 0;
            d.action = PlanAction::grow_back;
            d.to = plan_;
        }
        attempt_ = Attempt{plan_, 0, 1, 0, tail()};
        if (calibrate_pending_ && growing_ == Growing::none) begin_calibration();
        return d;
    }

    /// Whether the next global batch begins with calibration micro-batches
    /// (BatchOptions::start is calibrate and nothing was measured or restored yet).
    bool calibration_pending() const noexcept { return calibrate_pending_; }

    /// What this planner has learned (for a PlanCache): the last good plan, the
    /// model, the grow-back ceiling.
    LearnedPlan learned() const noexcept {
        return LearnedPlan{last_good_, model_, grow_ceiling_, tail_for(last_good_)};
    }

    /// Starts from what an earlier run learned: its plan becomes the plan and
    /// the last good one, its model the model (a prediction pending in it is
    /// dropped), and the plan the search's ceiling: no probe above it, so a
    /// restart sees no OOM the last run already paid for (a grow-back, with
    /// grow_after, still tries larger sizes); no calibration is pending. Throws std::invalid_argument when
    /// the plan does not fit these options (a micro-batch outside
    /// [min_micro_batch, micro_batch], a precision not at its index of the ladder).
    void restore(LearnedPlan const& l) {
        Plan const& p = l.plan;
        if (p.micro_batch < opt_.min_micro_batch || p.micro_batch > opt_.micro_batch)
            detail::throw_invalid(detail::Message() << "oomguard: RecoveryPlanner::restore: the plan's micro-batch "
                                                    << p.micro_batch << " is outside [" << opt_.min_micro_batch
                                                    << ", " << opt_.micro_batch << "]");
        if (p.precision_index >= opt_.precisions.size() || opt_.precisions[p.precision_index] != p.precision)
            detail::throw_invalid(detail::Message()
                                  << "oomguard: RecoveryPlanner::restore: the plan's precision "
                                  << to_string(p.precision) << " is not rung " << p.precision_index
                                  << " of the ladder (it has " << opt_.precisions.size() << " rungs)");
        reset();
        plan_ = p;
        last_good_ = p;
        model_ = l.model;
        model_.predicted = 0;
        model_.prediction_failed = false;
        // Where the last run settled: the search does not probe above it (a
        // probe is an OOM a restart would see again); a grow-back may.
        if (model_.high == 0 || model_.high > p.micro_batch + 1) model_.high = p.micro_batch + 1;
        if (model_.low > p.micro_batch) model_.low = p.micro_batch;
        grow_ceiling_ = l.grow_ceiling;
        if (l.tail != 0 && l.tail < p.micro_batch && l.tail >= opt_.min_micro_batch) {
            tail_ = l.tail;
            tail_plan_ = p;
        }
        calibrate_pending_ = false;
        attempt_ = Attempt{plan_, 0, 1, 0, tail()};
    }

    /// Starts from `p` with nothing learned (no model, no calibration pending):
    /// what ranks that agreed on a plan but hold different models start from.
    /// Throws std::invalid_argument as restore() does.
    void restore_plan(Plan const& p) {
        LearnedPlan l;
        l.plan = p;
        restore(l);
    }

    /// The attempt to run now.
    Attempt const& attempt() const noexcept { return attempt_; }

    /// The attempt ended with `o`: commit, or the next step of the ladder.
    Decision on_attempt(Observation const& o) {
        Plan const ran = attempt_.plan;
        // Measurements first, into the model, once: what completed is true
        // whatever happens next.
        record(o);
        if (o.outcome == Observation::Outcome::completed) return committed(o);
        if (o.outcome == Observation::Outcome::segment_done) return jumped(o);

        clean_batches_ = 0;
        // A commit that ran out of memory keeps nothing, with resume too: the
        // whole global batch is rolled back. It made no progress.
        bool const in_commit = o.outcome == Observation::Outcome::commit_oom;
        bool const progressed = opt_.resume && !in_commit && (o.full_done > 0 || o.calibration_done);
        // Transient retries count failures in a row. With resume, an attempt that
        // completed a micro-batch of this size before failing made progress that
        // is kept, so its failure is a fresh one; without resume the progress is
        // rolled back, and a failure at the same place again is a repeat.
        // The retry after a cache release stays once per size and global batch:
        // a size that fails on a warm cache (a caching allocator's fragmented
        // reserve) and holds only after each release would otherwise cost an
        // OOM per micro-batch.
        if (progressed && o.full_done > 0) same_retries_ = 0;
        std::size_t failed = ran.micro_batch;
        if (o.outcome == Observation::Outcome::step_oom) {
            if (o.failed_size == 0 || (o.failed_size != ran.micro_batch && o.failed_size != attempt_.calibration))
                detail::throw_invalid(detail::Message()
                                      << "oomguard: RecoveryPlanner: the failed size " << o.failed_size
                                      << " is not a planned size of the attempt (" << ran.micro_batch
                                      << (attempt_.calibration != 0 ? " or the calibration size" : "") << ')');
            failed = o.failed_size;
            // What a failed micro-batch held plus what it asked for is a lower
            // bound on what that size needs, never a measurement of it. (Not a
            // short remainder's: the last micro-batch may carry what no other
            // does -- a gradient norm -- and one small size would tilt the line.)
            if (o.need != 0 && !o.failed_short) model_.bound(failed, o.need);
        }
        // With resume, an attempt that kept a micro-batch made progress: only the
        // attempts that did not count toward the limit. Nor does a search step
        // inside the batch that failed by its own need: it narrows the range,
        // so there are at most log2(G) of them.
        bool const transient = is_transient(failed, o);
        bool const searched =
            attempt_.search && o.outcome == Observation::Outcome::step_oom && !o.failed_short && !transient;
        if (!progressed && !searched) ++charged_;
        if (charged_ >= opt_.max_attempts) return give_up(ran, "the attempt limit was reached");
        Decision d = next_rung(ran, failed, transient, o);
        if (d.action != PlanAction::failover && d.action != PlanAction::give_up) {
            attempt_ = Attempt{plan_, calibration_, attempt_.number + 1, segment_, tail()};
            attempt_.search = search_;
        }
        return d;
    }

    /// After a failover decision: every rank got device `device` (>= 0).
    Decision failed_over(int device) {
        require_failover_pending("failed_over");
        if (device < 0)
            detail::throw_invalid(detail::Message() << "oomguard: RecoveryPlanner::failed_over(" << device
                                                    << "): give the device to move to, >= 0, or call no_failover()");
        failover_pending_ = false;
        Plan const from = plan_;
        plan_ = Plan{opt_.micro_batch, opt_.precisions.front(), 0, device};
        forget_sizes();
        same_retries_ = 0;
        release_retried_ = false;
        tail_ = 0;
        attempt_ = Attempt{plan_, 0, attempt_.number + 1, 0, 0};
        return Decision{PlanAction::failover, from, plan_, ""};
    }

    /// After a failover decision: some rank got no other device.
    Decision no_failover() {
        require_failover_pending("no_failover");
        failover_pending_ = false;
        return give_up(attempt_.plan, "the micro-batch is at its minimum, the precision ladder is exhausted and "
                                      "the failover hook offered no other device");
    }

    /// Gives up on the global batch: back at the last good plan.
    Decision give_up(Plan const& from, char const* why) {
        abandon();
        return Decision{PlanAction::give_up, from, plan_, why};
    }

    /// An exception passed through the runner: back at the last good plan, with
    /// no half-made recovery state.
    void abandon() noexcept {
        plan_ = last_good_;
        clear_batch_state();
        growing_ = Growing::none;
        attempt_ = Attempt{plan_, 0, 1, 0, tail()};
    }

    /// Back to the requested plan; forgets measurements and the clean-batch count.
    void reset() noexcept {
        plan_ = Plan{opt_.micro_batch, opt_.precisions.front(), 0, plan_.device};
        last_good_ = plan_;
        tail_ = 0;
        raised_from_ = 0;
        rescue_size_ = 0;
        rescue_streak_ = 0;
        probe_waited_ = false;
        model_.reset();
        proven_ = 0;
        clean_batches_ = 0;
        grow_wait_ = opt_.grow_after;
        precision_wait_ = opt_.restore_precision_after;
        grow_ceiling_ = 0;
        growing_ = Growing::none;
        clear_batch_state();
        calibrate_pending_ = opt_.start == BatchOptions::Start::calibrate;
        first_fit_size_ = 0;
        attempt_ = Attempt{plan_, 0, 1, 0, tail()};
    }

    /// The plan in effect.
    Plan const& plan() const noexcept { return plan_; }
    /// The last plan a global batch committed under.
    Plan const& last_good_plan() const noexcept { return last_good_; }
    /// The options as validated (micro_batch 0 already replaced by global_batch).
    BatchOptions const& options() const noexcept { return opt_; }
    /// The samples of the current global batch (begin_batch's; BatchOptions::global_batch by default).
    std::size_t global_batch() const noexcept { return g_; }
    /// The shrink policy in effect: options().policy, with ShrinkPolicy::automatic()
    /// resolved (by use_meter; bisect until then).
    ShrinkPolicy const& policy() const noexcept { return policy_; }

    /// Whether the runner measures the step (a meter for the plan's device):
    /// ShrinkPolicy::automatic() runs as predictive with one, bisect without.
    void use_meter(bool metered) { policy_ = opt_.policy.resolve(metered); }
    /// What the planner has measured and searched of the step (the one copy).
    StepModel const& model() const noexcept { return model_; }
    /// The largest size that completed at this precision and device (0: none).
    std::size_t proven() const noexcept { return proven_; }
    /// The smallest grow-back size that failed (0: none).
    std::size_t grow_ceiling() const noexcept { return grow_ceiling_; }

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
        for (std::size_t i = 1; i < o.precisions.size(); ++i)
            if (bytes_per_element(o.precisions[i]) > bytes_per_element(o.precisions[i - 1]))
                bad(detail::Message() << "oomguard: BatchOptions.precisions puts " << to_string(o.precisions[i])
                                      << " (" << bytes_per_element(o.precisions[i]) << " bytes per value) after "
                                      << to_string(o.precisions[i - 1]) << " ("
                                      << bytes_per_element(o.precisions[i - 1])
                                      << "): each rung must take no more memory than the one before, "
                                         "for example {fp32, bf16, fp16}");
        if (o.max_attempts == 0)
            bad(detail::Message() << "oomguard: BatchOptions.max_attempts is 0; give at least 1");
    }

private:
    enum class Growing : unsigned char { none, size, precision };

    // Records what an attempt measured, once, into the model.
    void record(Observation const& o) noexcept {
        Plan const ran = attempt_.plan;
        if (o.limit != 0) model_.limit = o.limit;
        if (o.first_base != Observation::unknown) {
            model_.base = o.first_base;
            model_.has_base = true;
        }
        if (attempt_.calibration != 0 && o.calibration_done) {
            if (o.calibration_peak != 0) model_.observe(attempt_.calibration, o.calibration_peak);
            if (attempt_.calibration > model_.low) model_.low = attempt_.calibration;
            // It completed (twice): a failure at or below it later, with no
            // figure saying otherwise, is not its own need (c2 may be c1 / 2).
            if (attempt_.calibration > proven_) proven_ = attempt_.calibration;
        }
        if (o.full_done > 0) {
            if (ran.micro_batch > proven_) proven_ = ran.micro_batch;
            if (o.full_peak != 0) {
                // (The whole global batch in one micro-batch: nothing is held
                // over it. Not a short batch's lone micro-batch, GlobalBatch{n}:
                // later ones of a full batch hold what it left.)
                if (o.full_later || ran.micro_batch >= opt_.global_batch)
                    model_.observe(ran.micro_batch, o.full_peak);
                else
                    model_.bound(ran.micro_batch, o.full_peak);  // the first micro-batch's: a later one needs more
            }
            if (ran.micro_batch > model_.low) model_.low = ran.micro_batch;
        }
    }

    // A size failed by its own need: the search's upper end.
    void note_failure(std::size_t m) noexcept {
        if (model_.high == 0 || m < model_.high) model_.high = m;
        if (model_.low >= model_.high) model_.low = 0;  // conditions changed: the old success no longer holds
        // A calibrated start's fit that failed has one more chance: refitted
        // over this failure's bound (as after any first failure), not bisected.
        if (model_.predicted != 0 && m >= model_.predicted && m != first_fit_size_)
            model_.prediction_failed = true;
        model_.predicted = 0;
        first_fit_size_ = 0;
    }

    // The next size after `ctx.failed` failed, by the policy; the model notes
    // whether it came from the fit.
    std::size_t shrink_to(ShrinkContext const& ctx) {
        ShrinkPolicy::Next n = policy_.after_failure(ctx, model_);
        model_.predicted = n.predicted ? n.size : 0;
        return n.size;
    }

    // When the line through the measured points alone puts `m` within the
    // limit over `base` and over it on top of `growth`: the largest size below
    // it that the fitted line (its bounds, the policy's margin and twice the
    // scatter included) puts under the limit there -- but never below m scaled by
    // what the growth leaves of the reach, m * (reach - growth) / reach, what
    // a need in proportion to the size would allow. Fixed costs make the
    // right size smaller still, but a line that says so before any failure
    // may be a caching allocator's reserve counted in a peak, or a bound over
    // an older base (it planned 752 down to 1 on a bench_real_steps family 4
    // workload); a failure, if one comes, tells. Else `m` (also when the line
    // cannot tell): a size that holds is not planned down for a margin.
    std::size_t fit_over(std::size_t m, std::size_t base, std::size_t growth) const noexcept {
        if (m <= opt_.min_micro_batch || model_.limit <= base || growth >= model_.limit - base) return m;
        StepModel over = model_;
        over.base = base + growth;
        over.has_base = true;
        StepModel points = over;
        points.n_bounds = 0;
        StepModel::Line const central = points.fit();
        if (!central.ok) return m;
        double const room = static_cast<double>(over.limit - over.base);
        double const reach = static_cast<double>(model_.limit - base);
        double const need = central.a + central.b * static_cast<double>(m);
        // (The slack is the fit's rounding.) A size the line already puts over
        // the limit without the growth is one it does not fit there (a size a
        // probe found at the edge): the growth is not what would make it fail.
        if (need <= room * (1.0 + 1e-9) || need > reach * (1.0 + 1e-9)) return m;
        auto const scaled = static_cast<std::size_t>(static_cast<double>(m) * room / reach);
        double const margin = policy_.kind() == ShrinkPolicy::Kind::predictive ? policy_.margin() : 0.01;
        std::size_t fits = 0;
        if (!over.largest_fitting(0, m, opt_.min_micro_batch, margin, false, fits) || fits < scaled) fits = scaled;
        if (fits < opt_.min_micro_batch) fits = opt_.min_micro_batch;
        return fits < m ? fits : m;
    }

    // The next size after a success at the attempt's size, by the policy.
    std::size_t probe_after(std::size_t m) {
        ShrinkPolicy::Next n = policy_.after_success(m, opt_.global_batch, opt_.micro_batch, model_);
        // A workload that calibrates first plans ahead of failures: it takes
        // a refit's jump, never a blind probe (each one an OOM when the size
        // does not fit); a grow-back (grow_after) still tries larger sizes.
        if (opt_.start == BatchOptions::Start::calibrate && !n.predicted) n = ShrinkPolicy::Next{m, false};
        model_.predicted = n.predicted ? n.size : 0;
        return n.size;
    }

    // The calibration segment held: fit and jump from what it measured, toward
    // the size whose failure asked for it.
    std::size_t jump_size(Observation const& o) {
        Plan const ran = attempt_.plan;
        std::size_t next = 0;
        if (first_fit_) {
            // Calibrated before any failure: the fit decides whatever the
            // policy (a later failure goes down the policy's ladder).
            ShrinkPolicy const fit = ShrinkPolicy::predictive(
                policy_.kind() == ShrinkPolicy::Kind::predictive ? policy_.margin() : 0.01);
            ShrinkPolicy::Next n = fit.after_failure(context(pending_failure_, reach(o)), model_);
            model_.predicted = n.predicted ? n.size : 0;
            next = n.size;
            first_fit_ = false;
            first_fit_size_ = n.predicted ? next : 0;
            // The fit, with its margins, is the plan: no probe above it. A probe
            // is an OOM the fit was made to avoid (a calibration's small sizes
            // leave the line's scatter wide, and bisecting toward what a lucky
            // scatter allows fails at each step); a grow-back may still try.
            if (n.predicted && (model_.high == 0 || model_.high > next + 1)) model_.high = next + 1;
        } else {
            next = shrink_to(context(pending_failure_, reach(o)));
        }
        pending_failure_ = 0;
        return next < ran.micro_batch ? ran.micro_batch : next;
    }

    // With resume, a failure costs only the micro-batch that failed: bisection
    // narrows the range inside the global batch, one micro-batch a step.
    // Predictive refits and jumps inside it too (a prediction, segment 1), but
    // probes past its fit only where bisection would: at the next batch's start.
    std::size_t search_segment() const noexcept {
        return opt_.resume && policy_.searches() ? 1 : 0;
    }

    Decision jumped(Observation const& o) {
        Plan const ran = attempt_.plan;
        if (second_pending_ && pending_failure_ != 0 && o.calibration_done) {
            // The calibration's first size held (twice): its second, chosen
            // from what the first measured (no smaller than the one planned
            // before it where the first's peak says that fits), runs as a
            // segment of its own.
            plan_.micro_batch = policy_.second_calibration(context(pending_failure_, reach(o)), model_,
                                                           attempt_.calibration, plan_.micro_batch);
            second_pending_ = false;
            calibration_ = 0;
            segment_ = 1;
            attempt_ = Attempt{plan_, 0, attempt_.number, segment_, tail()};
            return Decision{PlanAction::continue_batch, ran, plan_, ""};
        }
        second_pending_ = false;
        segment_ = 0;
        if (pending_failure_ != 0 && o.full_done > 0) {
            plan_.micro_batch = jump_size(o);
            segment_ = search_segment();
        } else if (o.full_done > 0) {
            std::size_t const next = probe_after(ran.micro_batch);
            bool const blind = model_.predicted != next;  // a probe past what the fit can tell
            if (!(blind && policy_.kind() == ShrinkPolicy::Kind::predictive)) {
                plan_.micro_batch = next;
                if (next != ran.micro_batch) segment_ = search_segment();
                // A raise that a failure sends back to the size that held: a
                // probe at the batch's start, or a refit's jump; not a bisection
                // step inside the batch (with resume), which narrows the range
                // from both ends.
                if (next > ran.micro_batch && (segment_ == 0 || model_.predicted == next))
                    raised_from_ = ran.micro_batch;
            } else {
                model_.predicted = 0;  // the rest of the batch at the size that held; the probe waits
            }
        }
        pending_failure_ = 0;
        calibration_ = 0;
        search_ = segment_ == 1;
        attempt_ = Attempt{plan_, 0, attempt_.number, segment_, tail()};
        attempt_.search = search_;
        return Decision{PlanAction::continue_batch, ran, plan_, ""};
    }

    Decision committed(Observation const& o) {
        Plan const ran = attempt_.plan;
        std::size_t next = ran.micro_batch;
        std::size_t const fitted_base = model_.has_base ? model_.base : 0;  // what this batch's points are over
        // The commit may add what stays (an optimizer's state on its first
        // step): the next global batch begins over what is held now.
        if (o.after_commit != Observation::unknown) {
            model_.base = o.after_commit;
            model_.has_base = true;
        }
        // A size that failed by its own need and held only after the caches
        // were emptied, in two global batches in a row: a caching allocator's
        // reserve that fragments at it, not a one-off (frees pending on another
        // stream, a workspace that stays released), and it would fail again in
        // every batch. It becomes the search's ceiling, and the plan goes
        // below it by as much as the failure went over what a step could
        // reach: m * reach / need. (Only a measured need beyond the reach
        // makes a failure at a size that completed more than a transient.)
        bool const rescued_here = rescued_ == ran.micro_batch && o.full_done > 0;
        rescue_streak_ = rescued_here ? (rescue_size_ == ran.micro_batch ? rescue_streak_ + 1 : 1) : 0;
        rescue_size_ = rescued_here ? ran.micro_batch : 0;
        if (pending_failure_ == 0 && rescued_here && rescue_streak_ >= 2) {
            // (The streak stays: a plan back at this size -- a give-up, an
            // abandoned batch -- is cut again at its next such commit.)
            rescue_streak_ = 1;
            note_failure(ran.micro_batch);
            if (rescued_cut_ != 0 && rescued_cut_ < ran.micro_batch)
                next = rescued_cut_ > opt_.min_micro_batch ? rescued_cut_ : opt_.min_micro_batch;
        } else if (pending_failure_ != 0 && o.full_done > 0) {
            next = jump_size(o);  // the calibration segment ended the batch: jump at the next
        } else if (pending_failure_ != 0) {
            // A short remainder ended the calibration before its second size
            // ran whole: in c1's segment, only c1 is measured and it is the
            // plan; as c2's one micro-batch, c2 stays the plan (chosen under
            // what c1 allows), so the next batch measures it -- at c1, a
            // workload that calibrates first would have one point and no
            // probe to find a second.
            if (attempt_.calibration != 0 && o.calibration_done) next = attempt_.calibration;
            pending_failure_ = 0;
        } else if (o.full_done > 0) {
            // Bisection and predictive probe upward here, at the start of the next
            // global batch, where a failure costs no completed micro-batch --
            // but not right after a commit that added what stays: the size
            // that held has not run over it yet, and a probe would fail on
            // the state rather than on its own size. It waits one batch, never
            // two in a row (a commit that adds a little every batch -- a loss
            // kept for logging -- would hold every probe back for good).
            next = probe_after(ran.micro_batch);
            bool const grew = o.commit_growth != Observation::unknown && o.commit_growth > 0;
            if (next > ran.micro_batch && grew && !probe_waited_) {
                next = ran.micro_batch;
                model_.predicted = 0;
                probe_waited_ = true;
            } else {
                probe_waited_ = false;
            }
        }
        // What the commit added stays through the next batch: a size the line
        // puts over the limit on top of it is planned down now, not failed
        // first (Adam's moments at the first step). Over the base this batch's
        // points were measured on plus the commit's own growth -- not over
        // all that is held after it, which counts gradients the commit kept
        // twice (the points hold them already).
        if (o.commit_growth != Observation::unknown && o.commit_growth > 0 && model_.has_base) {
            std::size_t const over = fit_over(next, fitted_base, o.commit_growth);
            if (over < next) {
                // A raise past the size that held waits while that one still
                // fits over the growth; else the smaller of the two sizes
                // planned over it (a raise that has not held scales nothing).
                std::size_t const kept = fit_over(ran.micro_batch, fitted_base, o.commit_growth);
                next = kept == ran.micro_batch && ran.micro_batch < next ? ran.micro_batch : kept < over ? kept : over;
                model_.predicted = next == ran.micro_batch ? 0 : next;
            }
        }
        if (next > ran.micro_batch)
            raised_from_ = ran.micro_batch;
        else if (o.full_done > 0)
            raised_from_ = 0;  // the raised size held a whole global batch
        if (growing_ == Growing::size) grow_wait_ = opt_.grow_after;  // it held: the next comes as soon
        if (growing_ == Growing::precision) precision_wait_ = opt_.restore_precision_after;
        growing_ = Growing::none;
        last_good_ = ran;
        plan_ = ran;
        plan_.micro_batch = next;
        ++clean_batches_;
        clear_batch_state();
        Decision d{PlanAction::commit, ran, plan_, ""};
        attempt_ = Attempt{plan_, 0, 1, 0, tail()};
        return d;
    }

    Decision next_rung(Plan const& ran, std::size_t failed, bool transient, Observation const& o) {
        first_fit_ = false;
        calibration_ = 0;
        second_pending_ = false;
        segment_ = 0;
        search_ = false;
        if (growing_ != Growing::none) {  // the grow-back did not hold: back to the last good plan, wait longer
            if (growing_ == Growing::size) {
                if (grow_ceiling_ == 0 || ran.micro_batch < grow_ceiling_) grow_ceiling_ = ran.micro_batch;
                grow_wait_ = grow_wait_ * 2 + 1;
            } else {
                precision_wait_ = precision_wait_ * 2 + 1;
                model_.reset();
            }
            growing_ = Growing::none;
            plan_ = last_good_;
            proven_ = last_good_.micro_batch;  // it committed under these conditions
            return Decision{PlanAction::shrink, ran, plan_, ""};
        }
        // A raised size (a probe, a refit's jump) that failed by its own need
        // goes back to the size that held at once (below): that one needs no
        // release, and a retry after one would be a second OOM for the probe.
        bool const raise_failed = raised_from_ != 0 && raised_from_ < failed && failed == ran.micro_batch &&
                                  !transient && o.outcome == Observation::Outcome::step_oom && !o.failed_short;
        if (o.released > 0 && !release_retried_ && !raise_failed && release_may_help(o)) {
            release_retried_ = true;
            // A size that failed by its own need (measured) and may hold only
            // after the release: if the batch commits so, it is no plan to
            // keep (an OOM per global batch), see committed().
            if (!transient && o.outcome == Observation::Outcome::step_oom && !o.failed_short &&
                failed == ran.micro_batch) {
                rescued_ = failed;
                // By how much it went over: the cut if it keeps happening.
                std::size_t const r = reach(o);
                if (o.need > r && r != 0) {
                    double const cut = static_cast<double>(failed) * static_cast<double>(r) / static_cast<double>(o.need);
                    std::size_t const c = static_cast<std::size_t>(cut);
                    if (rescued_cut_ == 0 || c < rescued_cut_) rescued_cut_ = c;
                }
            }
            return retry_same(ran, o);
        }
        if (o.outcome == Observation::Outcome::commit_oom) {
            // The commit's memory (the optimizer's state, its temporaries) hardly
            // follows the micro-batch: transient retries of a commit are counted
            // over the global batch, not per size, and the size is shrunk once
            // for it -- a smaller micro-batch may leave less held at the commit.
            // A commit that still fails after that is helped only further down
            // the ladder (a lower precision, another device) or not at all.
            if (commit_retries_ < opt_.transient_retries) {
                ++commit_retries_;
                return retry_same(ran, o);
            }
            same_retries_ = 0;
            release_retried_ = false;
            pending_failure_ = 0;
            if (!commit_shrunk_ && failed > opt_.min_micro_batch) {
                commit_shrunk_ = true;
                note_failure(failed);
                plan_.micro_batch = shrink_to(context(failed, reach(o)));
                return Decision{PlanAction::shrink, ran, plan_, ""};
            }
            return below_sizes(ran);
        }
        if (transient) {
            if (same_retries_ < opt_.transient_retries) {
                ++same_retries_;
                return retry_same(ran, o);
            }
            proven_ = 0;  // it kept failing: conditions changed
        }
        same_retries_ = 0;
        release_retried_ = false;
        pending_failure_ = 0;
        if (o.failed_short && o.outcome == Observation::Outcome::step_oom) {
            // A short remainder failed by its own need: the plan's size stays
            // (every other micro-batch runs at it), and the remainder
            // runs in halves.
            std::size_t const samples = o.failed_samples != 0 ? o.failed_samples : failed;
            std::size_t const piece = samples / 2;
            if (piece >= opt_.min_micro_batch && piece >= 1) {
                tail_ = piece;
                tail_plan_ = plan_;
                return Decision{PlanAction::shrink, ran, plan_, ""};
            }
            return below_sizes(ran);
        }
        if (raise_failed) {
            // A size raised above one that held (a probe, a refit) failed by its
            // own need: back to the size that held, with this one the search's
            // ceiling; the next probe comes at a later batch's start. One
            // failure per raise -- stepping down through the gap instead fails
            // at each step when the size that held was the best.
            note_failure(failed);
            plan_.micro_batch = raised_from_;
            raised_from_ = 0;
            return Decision{PlanAction::shrink, ran, plan_, ""};
        }
        raised_from_ = 0;
        if (failed > opt_.min_micro_batch) {
            // A size that failed only as transients (retried, and failing again)
            // steps back, but is no ceiling for the search: its need fit.
            if (!transient) {
                note_failure(failed);
                // A size that completed before failed by its own need: what the
                // step runs over changed (an optimizer's state, the gradients
                // held), and the line is refitted over it with this failure's
                // bound: a prediction from it is not the one that failed.
                if (failed <= proven_) model_.prediction_failed = false;
            }
            ShrinkContext ctx = context(failed, reach(o));
            std::size_t c1 = 0, c2 = 0;
            if (policy_.wants_calibration(ctx, model_, c1, c2)) {
                // Measure two small sizes inside the retried batch itself: two
                // micro-batches at c1, then (jumped()) one at c2, chosen from
                // what c1 measured; their work is kept, and the rest of the
                // batch jumps to the fitted size.
                calibration_ = c1;
                calibrated_c1_ = c1;
                segment_ = 2;  // c1 twice (the first micro-batch, and one over what it left), then c2
                second_pending_ = true;
                pending_failure_ = failed;
                plan_.micro_batch = c2;
            } else {
                plan_.micro_batch = shrink_to(ctx);
                segment_ = search_segment();
                search_ = segment_ == 1;
            }
            return Decision{PlanAction::shrink, ran, plan_, ""};
        }
        return below_sizes(ran);
    }

    // The rungs below the sizes: the next precision, another device, give up.
    Decision below_sizes(Plan const& ran) {
        if (plan_.precision_index + 1 < opt_.precisions.size()) {
            set_precision(plan_.precision_index + 1);
            forget_sizes();
            return Decision{PlanAction::next_precision, ran, plan_, ""};
        }
        if (failover_) {
            failover_pending_ = true;
            return Decision{PlanAction::failover, ran, plan_, ""};
        }
        return give_up(ran, "the micro-batch is at its minimum and the precision ladder is exhausted");
    }

    // A transient OOM (another process's burst, fragmentation), not this size's
    // need: shrinking would only add micro-batches, each one more chance to
    // fail, so the size is retried a bounded number of times in a row -- at the
    // minimum too -- before the ladder goes on. With a meter, what the failed
    // micro-batch held plus what it asked for, against all a step could reach
    // when the attempt began, decides: within it, the failure was not this
    // size's need (the device was taken by another, or fragmented); beyond it,
    // it was -- even at a size that completed before, which then ran over less
    // (as the batch's first micro-batch, before the gradients existed; before
    // an optimizer's state): a data point. Without a meter: a size that has
    // completed before (not a short remainder, which is not that size), or a
    // failure that asked for less than was available with room on the device.
    bool is_transient(std::size_t failed, Observation const& o) const noexcept {
        if (o.outcome != Observation::Outcome::step_oom) return false;
        if (o.first_base != Observation::unknown && o.need != 0 && o.limit != 0)
            return o.need <= o.limit && o.first_base <= o.limit - o.need;  // no overflow
        bool const within_reach =
            o.need != 0 && o.available != 0 && o.need <= o.available && o.device_had_room;
        return (failed <= proven_ && !o.failed_short) || within_reach;
    }

    // Whether what the cache release freed could make the failed request fit:
    // with a meter, what the failed micro-batch held plus what it asked for,
    // less what was freed, within all a step could reach. Without one (or for a
    // commit), it may: the retry tells.
    static bool release_may_help(Observation const& o) noexcept {
        if (o.outcome != Observation::Outcome::step_oom || o.first_base == Observation::unknown || o.need == 0 ||
            o.limit == 0)
            return true;
        std::size_t const after = o.need > o.released ? o.need - o.released : 0;
        return after <= o.limit && o.first_base <= o.limit - after;  // no overflow
    }

    // The first global batch measures before it fails: two micro-batches at
    // c1, one at c2 (chosen once c1 is measured, from the sixteenth planned
    // here: see second_calibration), then the rest at the fitted size (as
    // after a failure of a size one above the requested one).
    void begin_calibration() noexcept {
        calibrate_pending_ = false;
        if (model_.distinct_sizes() >= 2) return;
        std::size_t const requested = plan_.micro_batch;
        // Apart enough to give the line a slope: twice the minimum at least.
        std::size_t c2 = requested / 16;
        if (c2 < 2 * opt_.min_micro_batch) c2 = 2 * opt_.min_micro_batch;
        if (c2 < opt_.min_micro_batch + 1) c2 = opt_.min_micro_batch + 1;
        std::size_t const c1 = c2 / 2 > opt_.min_micro_batch ? c2 / 2 : opt_.min_micro_batch;
        if (c2 >= requested) return;  // too small a batch to measure apart
        calibration_ = c1;
        calibrated_c1_ = c1;
        segment_ = 2;
        second_pending_ = true;
        pending_failure_ = requested + 1;
        first_fit_ = true;
        plan_.micro_batch = c2;
        attempt_ = Attempt{plan_, c1, 1, 2, tail()};
    }

    void require_failover_pending(char const* what) const {
        if (!failover_pending_)
            detail::throw_logic(detail::Message() << "oomguard: RecoveryPlanner::" << what
                                                  << "() answers a failover decision, and none is pending");
    }

    // The same plan again. A calibration segment stays one: with resume and its
    // calibration micro-batch kept, only the second micro-batch is left to measure.
    Decision retry_same(Plan const& ran, Observation const& o) {
        segment_ = attempt_.segment;
        search_ = attempt_.search;
        if (pending_failure_ != 0) {
            calibration_ = attempt_.calibration;
            if (opt_.resume && attempt_.calibration != 0 && o.calibration_done) {  // kept: only c2 is left
                calibration_ = 0;
                segment_ = 1;
            }
            // c2's segment retried from the batch's start (no resume, or a
            // commit's OOM, keeps nothing): c1 runs again before it, twice,
            // or c2 would run first and measure only a bound.
            bool const kept = opt_.resume && o.outcome != Observation::Outcome::commit_oom;
            if (calibration_ == 0 && calibrated_c1_ != 0 && !kept) {
                calibration_ = calibrated_c1_;
                segment_ = 2;
            }
            second_pending_ = calibration_ != 0;  // c1 again, then c2 chosen from it
        }
        return Decision{PlanAction::retry_same, ran, plan_, ""};
    }

    // Bytes a step could use: all it could reach over what the global batch
    // began with, when measured -- the registered caches' bytes among them, as
    // a release frees them -- else what was available when the attempt began.
    static std::size_t reach(Observation const& o) noexcept {
        if (o.first_base != Observation::unknown && o.limit > o.first_base) return o.limit - o.first_base;
        return o.available;
    }

    // The pieces a short remainder runs in under the current plan (0: whole).
    std::size_t tail() const noexcept { return tail_for(plan_); }
    std::size_t tail_for(Plan const& p) const noexcept {
        return tail_ != 0 && p == tail_plan_ ? tail_ : 0;
    }

    ShrinkContext context(std::size_t failed, std::size_t available) const noexcept {
        ShrinkContext ctx;
        ctx.failed = failed;
        ctx.minimum = opt_.min_micro_batch;
        ctx.requested = opt_.micro_batch;
        ctx.last_good = model_.low;
        ctx.attempt = attempt_.number;
        ctx.available_bytes = available;
        ctx.global_batch = opt_.global_batch;
        return ctx;
    }

    // Bytes per sample or the device changed: what was measured, proven and
    // bounded about sizes misleads now.
    void forget_sizes() noexcept {
        raised_from_ = 0;
        rescue_size_ = 0;
        rescue_streak_ = 0;
        probe_waited_ = false;
        model_.reset();
        proven_ = 0;
        grow_ceiling_ = 0;
    }

    void clear_batch_state() noexcept {
        charged_ = 0;
        failover_pending_ = false;
        same_retries_ = 0;
        release_retried_ = false;
        pending_failure_ = 0;
        calibration_ = 0;
        second_pending_ = false;
        calibrated_c1_ = 0;
        segment_ = 0;
        commit_retries_ = 0;
        commit_shrunk_ = false;
        search_ = false;
        first_fit_ = false;
        rescued_ = 0;
        rescued_cut_ = 0;
    }

    void set_precision(std::size_t index) noexcept {
        plan_.precision_index = index;
        plan_.precision = opt_.precisions[index];
    }

    BatchOptions opt_;
    std::size_t g_ = 0;    // the current global batch's samples
    ShrinkPolicy policy_;  // opt_.policy, automatic() resolved
    StepModel model_;  // what was measured and searched: the one copy
    Plan plan_;
    Plan last_good_;
    Attempt attempt_;
    bool failover_ = false;
    std::size_t proven_ = 0;          // largest size that completed at this precision and device
    bool probe_waited_ = false;       // the last commit held a probe back for what it added (one batch)
    std::size_t clean_batches_ = 0;   // global batches committed since the last failure or grow-back
    std::size_t grow_wait_ = 0;       // clean batches before the next size grow-back
    std::size_t precision_wait_ = 0;  // clean batches before the previous precision is tried again
    std::size_t grow_ceiling_ = 0;    // smallest grow-back size that failed (0: none)
    Growing growing_ = Growing::none;  // this global batch began with a grow-back
    // This global batch only:
    unsigned same_retries_ = 0;       // transient retries of the current size
    unsigned charged_ = 0;            // attempts that count toward max_attempts
    bool release_retried_ = false;    // the retry after a release was used for this size
    unsigned commit_retries_ = 0;     // transient retries of a commit that ran out of memory
    bool commit_shrunk_ = false;      // the size was shrunk once for a commit that ran out of memory
    std::size_t rescued_ = 0;         // a size that failed by its own need and was retried after a release
    std::size_t rescued_cut_ = 0;     // that size scaled by reach / need (0: not measured)
    // Across global batches: the size whose batches committed only after such a retry, and how many in a row.
    std::size_t rescue_size_ = 0;
    unsigned rescue_streak_ = 0;
    // A short remainder that failed runs in pieces of `tail_` (0: whole) while
    // the plan is `tail_plan_`: every global batch of that plan ends with the
    // same remainder (the last micro-batch carrying what no other does -- a
    // gradient norm), so it is not failed again in each of them.
    std::size_t tail_ = 0;
    Plan tail_plan_;
    std::size_t raised_from_ = 0;     // the plan's size was raised from this one, which held (0: not raised)
    bool search_ = false;             // the next attempt is a search step inside the batch
    bool failover_pending_ = false;   // a failover decision awaits failed_over or no_failover
    std::size_t pending_failure_ = 0; // the size whose failure the calibration attempt answers
    std::size_t calibration_ = 0;     // the next attempt's calibration size
    std::size_t segment_ = 0;         // the next attempt's segment (0: to the end of the batch)
    bool calibrate_pending_ = false;  // the next global batch calibrates first (BatchOptions::start)
    bool second_pending_ = false;     // the calibration's c1 runs now; c2 (from plan_'s size) is chosen after it
    std::size_t calibrated_c1_ = 0;   // the calibration's first size, while pending_failure_ (to run it again)
    bool first_fit_ = false;          // the calibration under way was not asked for by a failure
    std::size_t first_fit_size_ = 0;  // the size a calibrated start's fit chose, until it holds or fails
};

}  // namespace oomguard
