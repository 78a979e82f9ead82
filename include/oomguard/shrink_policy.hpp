// How adaptive_batch picks the next micro-batch size after an OOM.
//
//   halve       m -> m/2: few failures, lands near 0.75 of the best size
//   geometric   m -> floor(m*f): accelerate's x0.9; close to the best, many failures
//   bisect      search between the largest success and the smallest failure,
//               probing upward on successes: the best size, after ~log2 failures
//   predictive  fit bytes(m) = a + b*m to the peaks the budget measured (two
//               small calibration micro-batches when nothing is known), never
//               below what a failed size was seen to need, and jump to the
//               largest m that fits under the limit less a margin that follows
//               the measured scatter; bisect if that still fails
//   custom      your function
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
};

/// A shrink policy: a value type with the search state it needs.
class ShrinkPolicy {
public:
    enum class Kind : unsigned char { halve, geometric, bisect, predictive, custom };
    using CustomFn = std::size_t (*)(ShrinkContext const&, void* user);

    /// m -> m/2.
    static ShrinkPolicy halve() { return ShrinkPolicy(Kind::halve); }

    /// m -> floor(m*f), strictly decreasing; `f` must be in (0, 1).
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

    /// Fit-and-jump; `margin` (in [0, 0.5)) is the share of the available bytes
    /// kept free to absorb what the linear model misses.
    static ShrinkPolicy predictive(double margin = 0.01) {
        if (!(margin >= 0.0 && margin < 0.5))
            detail::throw_invalid(detail::Message() << "oomguard: ShrinkPolicy::predictive(" << margin
                                                    << "): the safety margin must be in [0, 0.5)");
        ShrinkPolicy p(Kind::predictive);
        p.margin_ = margin;
        return p;
    }

    /// Your function; it must return a size in [ctx.minimum, ctx.failed).
    static ShrinkPolicy custom(CustomFn fn, void* user = nullptr, char const* name = "custom") {
        if (fn == nullptr)
            detail::throw_invalid("oomguard: ShrinkPolicy::custom: the function is a null pointer");
        ShrinkPolicy p(Kind::custom);
        p.fn_ = fn;
        p.user_ = user;
        p.name_ = name;
        return p;
    }

    Kind kind() const noexcept { return kind_; }
    char const* name() const noexcept {
        switch (kind_) {
            case Kind::halve: return "halve";
            case Kind::geometric: return "geometric";
            case Kind::bisect: return "bisect";
            case Kind::predictive: return "predictive";
            case Kind::custom: return name_;
        }
        return "unknown";
    }
    double factor() const noexcept { return factor_; }
    double margin() const noexcept { return margin_; }

    /// The next size after `ctx.failed` failed: in [ctx.minimum, ctx.failed).
    /// Requires ctx.failed > ctx.minimum.
    std::size_t on_failure(ShrinkContext const& ctx) {
        note_failure(ctx.failed);
        std::size_t next = 0;
        switch (kind_) {
            case Kind::halve: next = ctx.failed / 2; break;
            case Kind::geometric: {
                next = static_cast<std::size_t>(static_cast<double>(ctx.failed) * factor_);
                if (next >= ctx.failed) next = ctx.failed - 1;
                break;
            }
            case Kind::bisect: next = bisect_point(ctx); break;
            case Kind::predictive: {
                std::size_t predicted = 0;
                if (ctx.available_bytes != 0) available_ = ctx.available_bytes;
                if (!predicted_failed_ && predict(ctx, predicted)) {
                    next = predicted;
                    predicted_ = true;
                } else {
                    next = bisect_point(ctx);
                }
                break;
            }
            case Kind::custom: {
                next = fn_(ctx, user_);
                if (next < ctx.minimum || next >= ctx.failed)
                    detail::throw_logic(detail::Message() << "oomguard: shrink policy '" << name_ << "' returned "
                                                          << next << " after " << ctx.failed
                                                          << " failed; it must return a size in ["
                                                          << ctx.minimum << ", " << ctx.failed << ")");
                return next;
            }
        }
        if (next < ctx.minimum) next = ctx.minimum;
        return next;
    }

    /// After a micro-batch of `m` samples fit (needing `bytes`, 0 if unknown):
    /// the size to use for the next micro-batch. Bisection probes upward while
    /// the gap to the smallest known failure is open; the others keep `m`.
    std::size_t on_success(std::size_t m, std::size_t bytes, std::size_t requested) {
        if (m > low_) low_ = m;
        if (bytes != 0) observe(m, bytes);
        if (predicted_) {
            // The jump held, and it measured a point near the answer: refit and
            // jump again while that promises more than half a percent.
            predicted_ = false;
            ShrinkContext ctx;
            ctx.failed = high_ != 0 ? high_ : requested + 1;
            ctx.minimum = m;
            ctx.available_bytes = available_;
            std::size_t again = 0;
            if (bytes != 0 && predict(ctx, again) && again > m + m / 200 && again <= requested) {
                predicted_ = true;
                return again;
            }
        }
        if (kind_ != Kind::bisect && kind_ != Kind::predictive) return m;
        std::size_t upper = high_;
        if (kind_ == Kind::predictive) {
            // Past what the line can tell, a size fits or not by its own few
            // percent: probe by bisection, up to the smallest failure or, when
            // the fit knows better, the size it allows if the scatter goes the
            // lucky way.
            ShrinkContext ctx;
            ctx.failed = high_ != 0 ? high_ : requested + 1;
            ctx.minimum = m;
            ctx.available_bytes = available_;
            std::size_t lucky = 0;
            if (predict(ctx, lucky, true) && (upper == 0 || lucky + 1 < upper)) upper = lucky + 1;
        }
        if (upper > m + 1) {
            std::size_t mid = m + (upper - m) / 2;
            return mid < requested ? mid : requested;
        }
        return m;
    }

    /// Whether the policy wants calibration steps before it can decide, and at
    /// which sizes (predictive with fewer than two measured sizes).
    bool wants_calibration(ShrinkContext const& ctx, std::size_t& c1, std::size_t& c2) const {
        if (kind_ != Kind::predictive || distinct_sizes() >= 2 || ctx.available_bytes == 0) return false;
        // Small enough to fit even when the first size was far too big: an
        // eighth of it, and no more than half of what the failure's lower bound
        // allows (a size that needed at least L bytes where A were available
        // cannot fit above failed * A / L samples, if its need grows with it).
        std::size_t top = ctx.failed / 8;
        for (std::size_t i = 0; i < n_bounds_; ++i) {
            if (bounds_[i].m != ctx.failed || bounds_[i].bytes == 0) continue;
            double cap = static_cast<double>(ctx.failed) * static_cast<double>(ctx.available_bytes) /
                         (2.0 * static_cast<double>(bounds_[i].bytes));
            if (cap < static_cast<double>(top)) top = static_cast<std::size_t>(cap);
        }
        c2 = top > ctx.minimum + 1 ? top : ctx.minimum + 1;
        c1 = c2 / 2 > ctx.minimum ? c2 / 2 : ctx.minimum;
        return c2 < ctx.failed;
    }

    /// Records that size `m` needs at least `bytes`: what a micro-batch that ran
    /// out of memory held plus what it asked for. A lower bound, not a point of
    /// the fit: the fitted line is raised to pass above it.
    void bound(std::size_t m, std::size_t bytes) noexcept { keep_worst(bounds_, n_bounds_, max_bounds, m, bytes); }

    /// Records what a size needed, measured (a micro-batch's peak).
    void observe(std::size_t m, std::size_t bytes) noexcept { keep_worst(obs_, n_obs_, max_observations, m, bytes); }

    /// Forgets the search bounds (memory conditions changed: a grow-back, a new device).
    void forget_bounds() noexcept {
        low_ = 0;
        high_ = 0;
        available_ = 0;
        predicted_ = predicted_failed_ = false;
    }
    /// Forgets everything, measurements too.
    void reset() noexcept {
        forget_bounds();
        n_obs_ = 0;
        n_bounds_ = 0;
    }
    std::size_t smallest_failure() const noexcept { return high_; }
    std::size_t largest_success() const noexcept { return low_; }

private:
    explicit ShrinkPolicy(Kind k) : kind_(k) {}

    void note_failure(std::size_t m) noexcept {
        if (high_ == 0 || m < high_) high_ = m;
        if (low_ >= high_) low_ = 0;  // conditions changed: the old success no longer holds
        if (predicted_) {
            predicted_ = false;
            predicted_failed_ = true;
        }
    }

    std::size_t bisect_point(ShrinkContext const& ctx) const noexcept {
        std::size_t lo = low_ != 0 && low_ < ctx.failed ? low_ : 0;
        if (lo == 0) return ctx.failed / 2;  // nothing known to fit: halve until something does
        std::size_t mid = lo + (ctx.failed - lo) / 2;
        return mid > lo ? mid : lo;
    }

    std::size_t distinct_sizes() const noexcept { return n_obs_; }

    // The largest size the fit allows under the available bytes, less the margin;
    // `lucky`: as if every unmeasured size sat below the line by the scatter.
    bool predict(ShrinkContext const& ctx, std::size_t& out, bool lucky = false) const noexcept {
        if (n_obs_ < 2 || ctx.available_bytes == 0) return false;
        // Least squares for bytes = a + b*m.
        double n = static_cast<double>(n_obs_), sx = 0, sy = 0, sxx = 0, sxy = 0;
        for (std::size_t i = 0; i < n_obs_; ++i) {
            double x = static_cast<double>(obs_[i].m), y = static_cast<double>(obs_[i].bytes);
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        double den = n * sxx - sx * sx;
        if (den <= 0.0) return false;
        double b = (n * sxy - sx * sy) / den;
        double a = (sy - b * sx) / n;
        if (!(b > 0.0)) return false;
        // The line must not pass below what a failed size was seen to need.
        for (std::size_t i = 0; i < n_bounds_; ++i) {
            double x = static_cast<double>(bounds_[i].m), y = static_cast<double>(bounds_[i].bytes);
            if (x > 0.0 && a + b * x < y) b = (y - a) / x;
        }
        // The margin follows the scatter: the largest relative distance of a
        // measured point from the line, taken twice (a size may sit that far
        // above the line where a measured one sat as far below). Two points
        // always lie on their line, so until a third tells, assume the scatter
        // of real steps (allocator rounding, kernels changing algorithm): 4 %.
        double scatter = n_obs_ < 3 ? assumed_scatter : 0.0;
        for (std::size_t i = 0; i < n_obs_; ++i) {
            double x = static_cast<double>(obs_[i].m), y = static_cast<double>(obs_[i].bytes);
            double fit = a + b * x;
            if (fit > 0.0) {
                double r = (y > fit ? y - fit : fit - y) / fit;
                if (r > scatter) scatter = r;
            }
        }
        double room = static_cast<double>(ctx.available_bytes) * (1.0 - margin_) - a;
        if (room <= 0.0) {
            out = ctx.minimum;
            return true;
        }
        double spread = lucky ? 1.0 - 2.0 * scatter : 1.0 + 2.0 * scatter;
        if (!(spread > 0.0)) return false;
        double m = room / (b * spread);
        std::size_t pick = m >= static_cast<double>(ctx.failed) ? ctx.failed - 1 : static_cast<std::size_t>(m);
        if (low_ != 0 && pick < low_ && low_ < ctx.failed) pick = low_;
        out = pick < ctx.minimum ? ctx.minimum : pick;
        return true;
    }

    Kind kind_;
    double factor_ = 0.5;
    double margin_ = 0.02;
    CustomFn fn_ = nullptr;
    void* user_ = nullptr;
    char const* name_ = "custom";
    std::size_t low_ = 0;   // largest size known to fit
    std::size_t high_ = 0;  // smallest size known to fail
    bool predicted_ = false;         // the current size came from a prediction
    bool predicted_failed_ = false;  // a prediction failed: bisect from now on
    std::size_t available_ = 0;      // bytes a step could use at the last failure
    // A fixed ring of measurements rather than a std::vector: this header is in
    // the umbrella, and a vector's instantiation costs every includer compile time.
    static constexpr std::size_t max_observations = 32;
    struct Observation {
        std::size_t m = 0, bytes = 0;
    };
    Observation obs_[max_observations] = {};
    // Records (m, bytes) in a ring of `cap`: the worst seen per size, the oldest
    // size forgotten when it is full.
    static void keep_worst(Observation* ring, std::size_t& n, std::size_t cap, std::size_t m,
                           std::size_t bytes) noexcept {
        for (std::size_t i = 0; i < n; ++i) {
            if (ring[i].m == m) {
                if (bytes > ring[i].bytes) ring[i].bytes = bytes;
                return;
            }
        }
        if (n == cap) {
            for (std::size_t i = 1; i < n; ++i) ring[i - 1] = ring[i];
            --n;
        }
        ring[n++] = Observation{m, bytes};
    }
    std::size_t n_obs_ = 0;
    static constexpr std::size_t max_bounds = 8;
    Observation bounds_[max_bounds] = {};
    std::size_t n_bounds_ = 0;
    static constexpr double assumed_scatter = 0.04;
};

}  // namespace oomguard
