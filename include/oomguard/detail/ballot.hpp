// The one message ranks exchange to agree: a fixed array of unsigned 64-bit
// integers, every one reduced by its minimum over all ranks, so that a single
// MPI_Allreduce(MIN) or ncclAllReduce(ncclMin) carries the whole agreement. A
// maximum travels complemented, an "any" as a complemented 0/1 and an "all" as a
// plain 0/1; a field a rank has nothing to say about holds the neutral UINT64_MAX.
#pragma once

#include <cstddef>
#include <cstdint>

namespace oomguard {
namespace detail {

class Ballot {
public:
    enum Field : std::size_t {
        serial_min, serial_max,  // the attempt, counted from the object's first: equal on every rank
        phase_min, phase_max,    // where in the attempt each rank stands (see AdaptiveBatch)
        global_min, global_max,  // the global batch's samples: equal on every rank
        all_metered,             // every rank has a meter for its plan's device (the policy's choice)
        any_oom,                 // a micro-batch ran out of device memory
        any_aborted,             // a step left a sync point because another rank had failed
        any_error,               // oomguard's failure path threw (rollback, release, policy, failover hook)
        any_commit_oom, all_commit_oom,
        // What the failed ranks saw, by the kind of micro-batch that failed (a
        // failure group: the calibration or a full-size one, each whole or a short
        // remainder), so the agreed failure takes its figures from its own group.
        failed_group,            // 4 of them (any): a rank failed in this group
        room_group = failed_group + 4,  // 4 (all): every rank that failed in it had room for its request
        need_group = room_group + 4,    // 4 (largest): what it needed at least
        samples_group = need_group + 4, // 4 (smallest): the failed micro-batch's own samples
        failed_size = samples_group + 4,  // the planned size of the micro-batch that failed (smallest)
        calibration_done,        // the calibration micro-batches completed (all)
        full_later,              // a completed full-size micro-batch ran after the batch's first (all)
        full_done,               // full-size micro-batches completed (fewest)
        done_min, done_max,      // samples of the global batch completed, where each rank stands
        calibration_peak, full_peak,  // bytes measured (largest)
        available,               // bytes a step could use (least)
        limit,                   // held + available when the attempt began (least)
        first_base,              // held when the global batch's first micro-batch began (largest, + 1)
        released,                // bytes the release freed on a rank that failed (least)
        all_failover,            // every rank got another device
        after_commit,            // held after the commit returned (largest, + 1)
        commit_growth,           // what the commit added that stays held (largest, + 1)
        // Before the first global batch: where every rank starts (a PlanCache's plan).
        all_restored,            // every rank restored a plan (all)
        restored_micro,          // the smallest restored micro-batch
        restored_precision,      // the lowest restored precision: the largest rung index
        model_hash_min, model_hash_max,  // the restored plans and models are the same on every rank
        count
    };
    static constexpr std::uint64_t neutral = ~std::uint64_t{0};

    /// The failure group of a micro-batch: calibration or full size, whole or a short remainder.
    static constexpr std::size_t group(bool calibration, bool short_remainder) noexcept {
        return (calibration ? 0u : 2u) + (short_remainder ? 1u : 0u);
    }
    static constexpr Field in_group(Field first, std::size_t g) noexcept { return static_cast<Field>(first + g); }

    Ballot(std::uint64_t serial, std::uint64_t phase) noexcept {
        for (auto& x : v_) x = neutral;
        set_min(serial_min, serial);
        set_max(serial_max, serial);
        set_min(phase_min, phase);
        set_max(phase_max, phase);
    }

    void set_min(Field f, std::uint64_t x) noexcept { v_[f] = x; }
    void set_max(Field f, std::uint64_t x) noexcept { v_[f] = ~x; }
    void set_any(Field f, bool b) noexcept { v_[f] = ~std::uint64_t{b ? 1u : 0u}; }
    void set_all(Field f, bool b) noexcept { v_[f] = b ? 1 : 0; }

    /// After the reduction: the minimum (neutral: nobody said), the maximum, any, all.
    std::uint64_t min(Field f) const noexcept { return v_[f]; }
    std::uint64_t max(Field f) const noexcept { return ~v_[f]; }
    bool any(Field f) const noexcept { return ~v_[f] != 0; }
    bool all(Field f) const noexcept { return v_[f] != 0; }
    /// A held figure, which may be 0 bytes: travels as bytes + 1, so that 0 is "not measured".
    void set_held(Field f, std::size_t bytes, bool measured) noexcept {
        if (measured) set_max(f, static_cast<std::uint64_t>(bytes) + 1);
    }
    /// The largest held figure, or `unknown` when no rank measured one.
    std::size_t held(Field f, std::size_t unknown) const noexcept {
        std::uint64_t const v = max(f);
        return v == 0 ? unknown : static_cast<std::size_t>(v - 1);
    }
    /// A minimum where "nobody said" reads as 0.
    std::uint64_t min_or_zero(Field f) const noexcept { return v_[f] == neutral ? 0 : v_[f]; }

    std::uint64_t* data() noexcept { return v_; }

private:
    std::uint64_t v_[count];
};

}  // namespace detail
}  // namespace oomguard
