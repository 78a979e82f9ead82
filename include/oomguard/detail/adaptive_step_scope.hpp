// Whether this thread is inside an adaptive_batch step: an out-of-memory's
// advice depends on it. Inside a step a smaller batch is the remedy (and
// adaptive_batch applies it); outside one -- model weights, optimizer state,
// anything allocated before run() -- a smaller batch changes nothing, and
// advice to lower it sends a person the wrong way.
#pragma once

namespace oomguard {
namespace detail {

/// How many adaptive_batch steps this thread is inside (nested runs of
/// different AdaptiveBatch objects each count).
inline int& adaptive_step_depth() noexcept {
    static thread_local int depth = 0;
    return depth;
}

/// True while this thread runs an adaptive_batch step. A step's work that runs
/// on other threads is not marked: their OOMs get the setup advice.
inline bool in_adaptive_step() noexcept { return adaptive_step_depth() > 0; }

/// Marks the calling thread as inside an adaptive_batch step for the scope's
/// life. Neither copyable nor movable: it belongs to the frame that runs the step.
class AdaptiveStepScope {
public:
    AdaptiveStepScope() noexcept { ++adaptive_step_depth(); }
    ~AdaptiveStepScope() { --adaptive_step_depth(); }
    AdaptiveStepScope(AdaptiveStepScope const&) = delete;
    AdaptiveStepScope& operator=(AdaptiveStepScope const&) = delete;
};

}  // namespace detail
}  // namespace oomguard
