// How adaptive_batch picks the next micro-batch size after an OOM, and where it
// probes after a success: stateless rules over one model of the step.
//
//   halve       m -> m/2: few failures, lands near 0.75 of the best size
//   geometric   m -> floor(m*f): accelerate's x0.9; close to the best, many failures
//   bisect      search between the largest success and the smallest failure,
//               probing upward on successes: the best size, after ~log2 failures
//   predictive  fit each micro-batch's peak over what was held when its global
//               batch began, peak(m) = a + b*m, to what the meter measured
//               (calibration micro-batches when nothing is known) -- so
//               a later micro-batch's point holds what the earlier ones left
//               (libtorch's .grad, kept until the commit) -- never below what a
//               failed size was seen to need, worst per size; take the largest
//               m that fits over what the next batch begins with (an optimizer's
//               state after its first step) under the limit less a margin that
//               follows the measured scatter; bisect if a predicted size fails
//   custom      your function
//   automatic   the default: predictive when the batch has a meter
//               (AdaptiveBatch::measure_with), bisect otherwise
//
// An observation goes down once: the runner measures an attempt, the planner
// (RecoveryPlanner) records it in its StepModel -- plain data, the only copy --
// and asks the rule for a size; the rule reads the plan and the model and keeps
// nothing:
//
//   AdaptiveBatch --Observation--> RecoveryPlanner --(plan, StepModel)--> ShrinkPolicy
//                                   owns StepModel <------- a size --------'
#pragma once

#include <oomguard/detail/format.hpp>
#include <oomguard/detail/std_throw.hpp>

#include <cstddef>

namespace oomguard {

/// What a policy knows when a micro-batch of `failed` samples ran out of memory.
struct ShrinkContext {
    std::size_t failed = 0;           ///< the size that just failed
    std::size_t minimum = 1;          ///< the smallest size allowed (>= 1)
    std::size_t requested = 0;        ///< the size the user asked for
    std::size_t last_good = 0;        ///< the largest size known to fit (0: none)
    unsigned attempt = 0;             ///< failed attempts so far in this global batch
    std::size_t peak_bytes = 0;       ///< peak the budget measured in the failed attempt (0: unknown)
    std::size_t available_bytes = 0;  ///< bytes a step may use (0: unknown)
    std::size_t global_batch = 0;     ///< G: the samples of the global batch (0: unknown)
};

/// What the planner knows of the step, as plain data: RecoveryPlanner owns the
/// one copy, records every observation in it once, and the policies read it.
/// All bytes are as the meter (AdaptiveBatch::measure_with) counts them.
struct StepModel {
    /// A size and a byte count.
    struct Point {
        std::size_t m = 0,      ///< the micro-batch size, in samples
                    bytes = 0;  ///< bytes it needed, as the meter counts them
    };
    static constexpr std::size_t max_points = 32;  ///< sizes measured, the oldest forgotten first
    static constexpr std::size_t max_bounds = 8;   ///< failed sizes' lower bounds kept
    static constexpr double assumed_scatter = 0.04;  ///< until a third point tells the real one
    /// Past this scatter the points are no line (a caching allocator's
    /// segments in the peaks, a step whose algorithm changes with the size):
    /// the fit cannot tell, and the policies search without it.
    static constexpr double max_scatter = 0.25;

    Point points[max_points] = {};  ///< a micro-batch's peak over what was held when its global batch
                                    ///< began (its first micro-batch), the worst per size
    std::size_t n_points = 0;       ///< how many of `points` hold a size
    Point bounds[max_bounds] = {};  ///< held + requested, over the same, when a size failed: it needs at least this
    std::size_t n_bounds = 0;       ///< how many of `bounds` hold a size
    std::size_t low = 0;            ///< the largest size that completed since the search began (0: none)
    std::size_t high = 0;           ///< the smallest size that failed by its own need (0: none)
    bool has_base = false;          ///< `base` was measured
    std::size_t base = 0;           ///< bytes held when a global batch begins: the current one's, or after
                                    ///< a commit, what the commit left (an optimizer's state appears there)
    std::size_t limit = 0;          ///< bytes held plus bytes available: all a step may reach (0: unknown)
    std::size_t predicted = 0;      ///< the size the last prediction chose, until it completes or fails (0: none)
    bool prediction_failed = false; ///< a predicted size failed in this search: bisect from here on

    /// Records that a micro-batch of `m` samples peaked at `bytes` over what was
    /// held when its global batch began: the latest measurement of a size
    /// replaces the one before (a size first measured while the sizes were
    /// changing -- a cache grown for a larger one still held -- reads high once).
    void observe(std::size_t m, std::size_t bytes) noexcept { keep(points, n_points, max_points, m, bytes, false); }
    /// Records that `m` needs at least `bytes` over the same (held + requested when it failed).
    void bound(std::size_t m, std::size_t bytes) noexcept { keep(bounds, n_bounds, max_bounds, m, bytes, true); }
    /// The number of sizes measured.
    std::size_t distinct_sizes() const noexcept { return n_points; }

    /// A fitted line and how far the points stray from it.
    struct Line {
        bool ok = false;      ///< true when the fit holds: at least two sizes, a rising slope, and
                              ///< no point further than max_scatter from their least-squares line
        double a = 0,         ///< the intercept, bytes: what a step holds whatever its size
               b = 0;         ///< the slope, bytes per sample: bytes = a + b*m
        double scatter = 0;   ///< the largest relative distance of a point from the line (assumed until 3 points)
    };
    /// Least squares over the points, the slope raised so that the line passes
    /// above every bound; not ok with fewer than two sizes, no rising slope, or
    /// a point further than max_scatter from the least-squares line (before
    /// the bounds raise it: they are lower bounds, not points).
    Line fit() const noexcept {
        Line l;
        if (n_points < 2) return l;
        double n = static_cast<double>(n_points), sx = 0, sy = 0, sxx = 0, sxy = 0;
        for (std::size_t i = 0; i < n_points; ++i) {
            double x = static_cast<double>(points[i].m), y = static_cast<double>(points[i].bytes);
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        double den = n * sxx - sx * sx;
        if (den <= 0.0) return l;
        l.b = (n * sxy - sx * sy) / den;
        l.a = (sy - l.b * sx) / n;
        if (!(l.b > 0.0)) return l;
        // Points that are no line: their own least-squares line, before any
        // bound raises it, leaves one of them past max_scatter.
        double stray = 0.0;
        for (std::size_t i = 0; i < n_points; ++i) {
            double x = static_cast<double>(points[i].m), y = static_cast<double>(points[i].bytes);
            double f = l.a + l.b * x;
            double r = f > 0.0 ? (y > f ? y - f : f - y) / f : 2.0 * max_scatter;  // (a line below 0 at a point: none)
            if (r > stray) stray = r;
        }
        // The line must not pass below what a failed size was seen to need.
        for (std::size_t i = 0; i < n_bounds; ++i) {
            double x = static_cast<double>(bounds[i].m), y = static_cast<double>(bounds[i].bytes);
            if (x > 0.0 && l.a + l.b * x < y) l.b = (y - l.a) / x;
        }
        // Two points always lie on their line: until a third tells, assume the
        // scatter of real steps (allocator rounding, kernels changing algorithm).
        l.scatter = n_points < 3 ? assumed_scatter : 0.0;
        for (std::size_t i = 0; i < n_points; ++i) {
            double x = static_cast<double>(points[i].m), y = static_cast<double>(points[i].bytes);
            double f = l.a + l.b * x;
            if (f > 0.0) {
                double r = (y > f ? y - f : f - y) / f;
                if (r > l.scatter) l.scatter = r;
            }
        }
        l.ok = stray <= max_scatter;
        return l;
    }

    /// The largest size below `below` (and no larger than `G`) whose
    /// micro-batches fit over `base` under the limit less `margin` of it, at
    /// the fitted line stretched by twice the scatter (`lucky`: shrunk by it,
    /// the most a size may turn out to allow). False when the model cannot
    /// tell (fewer than two sizes measured, no base or limit measured).
    bool largest_fitting(std::size_t G, std::size_t below, std::size_t minimum, double margin, bool lucky,
                         std::size_t& out) const noexcept {
        Line const l = fit();
        if (!l.ok || !has_base || limit == 0 || below <= minimum) return false;
        double const spread = lucky ? 1.0 - 2.0 * l.scatter : 1.0 + 2.0 * l.scatter;
        if (!(spread > 0.0)) return false;
        double const room = static_cast<double>(limit) * (1.0 - margin) - static_cast<double>(base) - l.a;
        std::size_t pick = minimum;
        if (room > 0.0) {
            double m = room / (l.b * spread);
            pick = m >= static_cast<double>(below) ? below - 1 : static_cast<std::size_t>(m);
        }
        if (pick >= below) pick = below - 1;
        if (G != 0 && pick > G) pick = G;
        out = pick < minimum ? minimum : pick;
        return true;
    }

    /// Where the failures went over: the smallest of m * (limit - base) / need
    /// over the failed sizes whose need (`bounds`) is beyond what a step can
    /// reach now -- the size at which a need growing in proportion to the size
    /// meets the limit (at least 1). An estimate, not a law: a need measured
    /// over an older base may count what is held now twice, so the policies
    /// treat it as a hint that expires once a size at or above it has held.
    /// 0 when no failure is measured beyond the reach.
    std::size_t scaled_ceiling() const noexcept {
        if (!has_base || limit <= base) return 0;
        double const reach = static_cast<double>(limit - base);
        std::size_t best = 0;
        for (std::size_t i = 0; i < n_bounds; ++i) {
            double const need = static_cast<double>(bounds[i].bytes);
            if (!(need > reach)) continue;
            auto m = static_cast<std::size_t>(static_cast<double>(bounds[i].m) * reach / need);
            if (m == 0) m = 1;
            if (best == 0 || m < best) best = m;
        }
        return best;
    }

    /// Forgets the search (memory conditions changed: a grow-back, a new device).
    void forget_search() noexcept {
        low = high = predicted = 0;
        prediction_failed = false;
    }
    /// Forgets everything, measurements too.
    void reset() noexcept { *this = StepModel(); }

private:
    // Records (m, bytes) in a ring of `cap`: per size the worst seen (`worst`)
    // or the latest, the oldest size forgotten when it is full. (A fixed ring
    // rather than a std::vector: this header is in the umbrella, and a vector
    // costs every includer.)
    static void keep(Point* ring, std::size_t& n, std::size_t cap, std::size_t m, std::size_t bytes,
                     bool worst) noexcept {
        for (std::size_t i = 0; i < n; ++i) {
            if (ring[i].m == m) {
                if (!worst || bytes > ring[i].bytes) ring[i].bytes = bytes;
                return;
            }
        }
        if (n == cap) {
            for (std::size_t i = 1; i < n; ++i) ring[i - 1] = ring[i];
            --n;
        }
        ring[n++] = Point{m, bytes};
    }
};

/// A shrink policy: a rule, (plan, model) -> size. It keeps no state: the
/// planner's StepModel holds all that was measured and searched.
class ShrinkPolicy {
public:
    /// Which rule the policy is (automatic: the default, resolved by AdaptiveBatch to predictive
    /// or bisect; a RecoveryPlanner on its own, which knows of no meter, bisects).
    enum class Kind : unsigned char { halve, geometric, bisect, predictive, custom, automatic };
    /// A custom rule: given what the failure told, the next size in samples; `user` is what
    /// ShrinkPolicy::custom was given.
    using CustomFn = std::size_t (*)(ShrinkContext const&, void* user);

    /// A size a rule chose, and whether it came from the model's fit.
    struct Next {
        std::size_t size = 0;    ///< samples
        bool predicted = false;  ///< from the model's fit (a failure of it stops predicting for this search)
    };

    /// m -> m/2.
    static ShrinkPolicy halve() { return ShrinkPolicy(Kind::halve); }

    /// m -> floor(m*f), strictly decreasing. Throws std::invalid_argument unless `f` is in (0, 1).
    static ShrinkPolicy geometric(double f) {
        if (!(f > 0.0 && f < 1.0))
            detail::throw_invalid(detail::Message() << "oomguard: ShrinkPolicy::geometric(" << f
                                                    << "): the factor must be in (0, 1), for example 0.9");
        ShrinkPolicy p(Kind::geometric);
        p.factor_ = f;
        return p;
    }

    /// Bisection between the largest success and the smallest failure.
    static ShrinkPolicy bisect() { return ShrinkPolicy(Kind::bisect); }

    /// The default: the best rule the batch's options allow -- predictive()
    /// when AdaptiveBatch has a meter for the plan's device (measure_with),
    /// bisect() otherwise. resolve() says which.
    static ShrinkPolicy automatic() { return ShrinkPolicy(Kind::automatic); }

    /// The rule this one runs as: automatic() as predictive() when `metered`,
    /// else bisect(); any other rule as itself.
    ShrinkPolicy resolve(bool metered) const {
        if (kind_ != Kind::automatic) return *this;
        return metered ? predictive() : bisect();
    }

    /// Fit-and-jump; `margin` (in [0, 0.5)) is the share of the limit kept free
    /// to absorb what the linear model misses. It needs a meter
    /// (AdaptiveBatch::measure_with): run() refuses it without one. Throws
    /// std::invalid_argument for a margin outside [0, 0.5).
    static ShrinkPolicy predictive(double margin = 0.01) {
        if (!(margin >= 0.0 && margin < 0.5))
            detail::throw_invalid(detail::Message() << "oomguard: ShrinkPolicy::predictive(" << margin
                                                    << "): the safety margin must be in [0, 0.5)");
        ShrinkPolicy p(Kind::predictive);
        p.margin_ = margin;
        return p;
    }

    /// Your function; it must return a size in [ctx.minimum, ctx.failed) (the
    /// planner throws std::logic_error naming it otherwise). Throws
    /// std::invalid_argument for a null function.
    static ShrinkPolicy custom(CustomFn fn, void* user = nullptr, char const* name = "custom") {
        if (fn == nullptr)
            detail::throw_invalid("oomguard: ShrinkPolicy::custom: the function is a null pointer");
        ShrinkPolicy p(Kind::custom);
        p.fn_ = fn;
        p.user_ = user;
        p.name_ = name;
        return p;
    }

    /// Which rule this is.
    Kind kind() const noexcept { return kind_; }
    /// The rule's name, as reports write it.
    char const* name() const noexcept {
        switch (kind_) {
            case Kind::halve: return "halve";
            case Kind::geometric: return "geometric";
            case Kind::bisect: return "bisect";
            case Kind::predictive: return "predictive";
            case Kind::custom: return name_;
            case Kind::automatic: return "auto";
        }
        return "unknown";
    }
    /// geometric's factor.
    double factor() const noexcept { return factor_; }
    /// predictive's margin, a share of the limit.
    double margin() const noexcept { return margin_; }
    /// Whether the rule searches upward after a success (bisect, predictive).
    bool searches() const noexcept {
        return kind_ == Kind::bisect || kind_ == Kind::predictive || kind_ == Kind::automatic;
    }

    /// The next size after `ctx.failed` failed, in [ctx.minimum, ctx.failed),
    /// from the model as the planner has recorded that failure. Requires
    /// ctx.failed > ctx.minimum. Throws std::logic_error when a custom function
    /// returns a size out of range.
    Next after_failure(ShrinkContext const& ctx, StepModel const& model) const {
        Next next;
        switch (kind_) {
            case Kind::halve: next.size = ctx.failed / 2; break;
            case Kind::geometric: {
                next.size = static_cast<std::size_t>(static_cast<double>(ctx.failed) * factor_);
                if (next.size >= ctx.failed) next.size = ctx.failed - 1;
                break;
            }
            case Kind::bisect:
            case Kind::automatic: next.size = bisect_point(ctx, model); break;
            case Kind::predictive: {
                std::size_t predicted = 0;
                if (!model.prediction_failed &&
                    model.largest_fitting(ctx.global_batch, ctx.failed, ctx.minimum, margin_, false, predicted)) {
                    // Never below a size that completed under these conditions.
                    if (model.low != 0 && predicted < model.low && model.low < ctx.failed) predicted = model.low;
                    next = Next{predicted, true};
                } else {
                    next.size = bisect_point(ctx, model);
                }
                break;
            }
            case Kind::custom: {
                std::size_t n = fn_(ctx, user_);
                if (n < ctx.minimum || n >= ctx.failed)
                    detail::throw_logic(detail::Message() << "oomguard: shrink policy '" << name_ << "' returned " << n
                                                          << " after " << ctx.failed
                                                          << " failed; it must return a size in [" << ctx.minimum
                                                          << ", " << ctx.failed << ")");
                return Next{n, false};
            }
        }
        if (next.size < ctx.minimum) next.size = ctx.minimum;
        return next;
    }

    /// After micro-batches of `m` completed, with the model holding what they
    /// measured: the size to run next (>= m, at most `requested`). Bisection
    /// probes upward while the gap to the smallest failure is open; predictive
    /// jumps again when a refit promises more than half a percent, then probes
    /// up to the size the fit allows if the scatter goes the lucky way, while
    /// the gap is over 4 %; both, measured, no higher than
    /// StepModel::scaled_ceiling while `m` is below it; the others keep `m`.
    Next after_success(std::size_t m, std::size_t G, std::size_t requested, StepModel const& model) const {
        std::size_t const below = model.high != 0 ? model.high : requested + 1;  // what the fit may choose under
        // A refit that promises more than half a percent: jump to it (a
        // prediction, not a blind probe) -- after any success, since each
        // measured size sharpens the line.
        if (kind_ == Kind::predictive && model.distinct_sizes() >= 2 && !model.prediction_failed) {
            std::size_t again = 0;
            if (model.largest_fitting(G, below, m, margin_, false, again) && again > m + m / 200 &&
                again <= requested)
                return Next{again, true};
        }
        if (!searches()) return Next{m, false};
        std::size_t upper = model.high;
        // Measured, no probe past where a failure, scaled by how far its need
        // went over all a step could reach, puts the limit
        // (StepModel::scaled_ceiling) -- until a size at or above it holds:
        // the estimate was low, and bisection goes on above it.
        std::size_t const scaled = model.scaled_ceiling();
        if (scaled > m && (upper == 0 || scaled + 1 < upper)) upper = scaled + 1;
        if (kind_ == Kind::predictive) {
            // Past what the line can tell, a size fits or not by its own few
            // percent: probe by bisection, up to the smallest failure or, when
            // the fit knows better, the size it allows if the scatter goes the
            // lucky way.
            std::size_t lucky = 0;
            if (model.largest_fitting(G, below, m, margin_, true, lucky) && (upper == 0 || lucky + 1 < upper))
                upper = lucky + 1;
        }
        // A probe may fail: bisect only while the gap is worth it (bisect: any
        // gap; predictive: more than 4 %, twice the few percent a size's own
        // non-linearity moves its need by, past which a probe is a coin toss).
        std::size_t const worth = kind_ == Kind::predictive ? m / 25 : 0;
        if (upper > m + 1 && upper - m > worth) {
            std::size_t mid = m + (upper - m) / 2;
            return Next{mid < requested ? mid : requested, false};
        }
        return Next{m, false};
    }

    /// Whether the policy wants calibration micro-batches before it can decide,
    /// and at which sizes (predictive with fewer than two measured sizes).
    bool wants_calibration(ShrinkContext const& ctx, StepModel const& model, std::size_t& c1,
                           std::size_t& c2) const noexcept {
        if (kind_ != Kind::predictive || model.distinct_sizes() >= 2 || ctx.available_bytes == 0) return false;
        // Small enough to fit even when the first size was far too big: an
        // eighth of it; with a lower bound of the failure's need, a quarter of
        // what it allows (a size that needed at least L bytes where A were
        // available cannot fit above failed * A / L samples, if its need grows
        // with it), up to half the failed size: points nearer the size that
        // will be chosen fit it better -- a step's fixed costs bend the line
        // at small sizes.
        std::size_t top = ctx.failed / 8;
        bool bounded = false;
        for (std::size_t i = 0; i < model.n_bounds; ++i) {
            if (model.bounds[i].m != ctx.failed || model.bounds[i].bytes == 0) continue;
            double cap = static_cast<double>(ctx.failed) * static_cast<double>(ctx.available_bytes) /
                         (4.0 * static_cast<double>(model.bounds[i].bytes));
            if (cap > static_cast<double>(ctx.failed / 2)) cap = static_cast<double>(ctx.failed / 2);
            if (!bounded || cap < static_cast<double>(top)) top = static_cast<std::size_t>(cap);
            bounded = true;
        }
        c2 = top > ctx.minimum + 1 ? top : ctx.minimum + 1;
        c1 = c2 / 2 > ctx.minimum ? c2 / 2 : ctx.minimum;
        return c2 < ctx.failed;
    }

    /// The calibration's second size, chosen once its first size `c1` has run
    /// (twice) and is a point of `model`: the line's slope is read off two
    /// points, and the farther apart they are, the less a few percent of
    /// scatter at each tilts where the line reaches the limit. `c1`'s peak over
    /// what the batch began with, scaled through the origin to all a step may
    /// reach (`ctx.available_bytes`), under-estimates the largest size that
    /// fits (a step's fixed costs weigh most at small sizes): the second size
    /// is 0.75 of that, and no more than half the size whose failure (or
    /// request) asked for the calibration, nor than half of what that
    /// failure's own lower bound allows. Not below `floor` (the size
    /// wants_calibration chose before anything was measured) unless `floor`
    /// is past that estimate itself (c1's peak scaled to the reach), which
    /// then takes its place. When the result is under 1.5 c1 (c1 fills two
    /// thirds of the reach or more) the second size is c1 / 2 instead, if
    /// that is at least `ctx.minimum` (else the result, or c1 + 1 when the
    /// result is not above c1): two close points give a line with no slope
    /// to speak of. Returns `floor` when `c1` was not measured or nothing is
    /// known of the reach.
    std::size_t second_calibration(ShrinkContext const& ctx, StepModel const& model, std::size_t c1,
                                   std::size_t floor) const noexcept {
        std::size_t peak = 0;
        for (std::size_t i = 0; i < model.n_points; ++i)
            if (model.points[i].m == c1) peak = model.points[i].bytes;
        if (peak == 0 || ctx.available_bytes == 0 || c1 == 0) return floor;
        double const reach = static_cast<double>(ctx.available_bytes);
        double cap = static_cast<double>(ctx.failed / 2);
        for (std::size_t i = 0; i < model.n_bounds; ++i) {
            if (model.bounds[i].m != ctx.failed || model.bounds[i].bytes == 0) continue;
            double const allowed = static_cast<double>(ctx.failed) * reach / static_cast<double>(model.bounds[i].bytes);
            if (allowed / 2 < cap) cap = allowed / 2;
        }
        double const edge = static_cast<double>(c1) * reach / static_cast<double>(peak);
        double c2 = 0.75 * edge;
        if (c2 > cap) c2 = cap;
        // The size planned before the measurement stays the least, but only up
        // to the edge: past it, c1's own peak says it would not fit.
        double const kept = static_cast<double>(floor) < edge ? static_cast<double>(floor) : edge;
        if (c2 < kept) c2 = kept;
        auto const chosen = static_cast<std::size_t>(c2);
        if (chosen > c1 && c2 >= 1.5 * static_cast<double>(c1)) return chosen;
        // Closer to c1 than that (c1 already fills two thirds of the reach),
        // the two points would give the line no slope to speak of: the second
        // one goes below c1 instead, where it fits.
        if (c1 / 2 >= ctx.minimum && c1 / 2 != 0) return c1 / 2;
        return chosen > c1 ? chosen : c1 + 1;  // no room below: the nearest size above
    }

private:
    explicit ShrinkPolicy(Kind k) : kind_(k) {}

    static std::size_t bisect_point(ShrinkContext const& ctx, StepModel const& model) noexcept {
        std::size_t lo = model.low != 0 && model.low < ctx.failed ? model.low : 0;
        if (lo == 0) return ctx.failed / 2;  // nothing known to fit: halve until something does
        // Between the size that held and the failed one -- or, measured, where
        // a failure scaled by how far it went over puts the limit, when lower.
        std::size_t hi = ctx.failed;
        std::size_t const scaled = model.scaled_ceiling();
        if (scaled > lo && scaled + 1 < hi) hi = scaled + 1;  // (at or below lo: expired, as in after_success)
        std::size_t mid = lo + (hi - lo) / 2;
        return mid > lo ? mid : lo;
    }

    Kind kind_;
    double factor_ = 0.5;
    double margin_ = 0.01;
    CustomFn fn_ = nullptr;
    void* user_ = nullptr;
    char const* name_ = "custom";
};

}  // namespace oomguard
