// Consensus for ranks that are threads of one process -- one thread per GPU,
// each with its own AdaptiveBatch -- and for testing data-parallel recovery on
// CPU. Opt-in: it brings <mutex> and <condition_variable>.
//
//   oomguard::ThreadConsensus group(4);          // shared by the four threads
//   adaptive.consensus(group.hook());            // in each thread
#pragma once

#include <oomguard/adaptive_batch.hpp>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace oomguard {

/// The consensus hook for ranks that are threads of one process (one thread per
/// GPU), and for testing data-parallel recovery on a CPU: each thread runs its own
/// AdaptiveBatch with hook(), and they agree through an in-process all-reduce.
class ThreadConsensus {
public:
    /// A group of `ranks` threads (>= 1); each calls every collective once.
    explicit ThreadConsensus(std::size_t ranks) : ranks_(ranks) {
        if (ranks == 0) detail::throw_invalid("oomguard: ThreadConsensus: a group needs at least 1 rank, got 0");
    }
    ThreadConsensus(ThreadConsensus const&) = delete;
    ThreadConsensus& operator=(ThreadConsensus const&) = delete;

    /// The hook for AdaptiveBatch::consensus. This object must outlive its use.
    Consensus hook() noexcept {
        Consensus c;
        c.context = this;
        c.all_min = [](void* ctx, std::uint64_t* values, std::size_t count) {
            static_cast<ThreadConsensus*>(ctx)->all_min(values, count);
        };
        return c;
    }

    /// The number of threads in the group.
    std::size_t ranks() const noexcept { return ranks_; }

    /// The collective itself: blocks until every rank has called it, then each
    /// of values[0..count) holds its minimum over the ranks. Every rank must
    /// pass the same count: when one does not, the group is broken, and every
    /// rank -- those already waiting, the one that differed and every later
    /// call -- throws std::invalid_argument naming both counts, so none is left
    /// waiting for a round that cannot complete.
    void all_min(std::uint64_t* values, std::size_t count) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (!broken_.empty()) detail::throw_invalid(broken_.c_str());
        if (arrived_ == 0) {
            acc_.assign(values, values + count);
        } else {
            if (count != acc_.size()) {
                detail::Message m;
                m << "oomguard: ThreadConsensus: the ranks passed different counts (" << count << " values and "
                  << static_cast<unsigned long>(acc_.size()) << "); every rank must pass the same count";
                broken_ = m.c_str();
                cv_.notify_all();
                detail::throw_invalid(m);
            }
            for (std::size_t i = 0; i < count; ++i)
                if (values[i] < acc_[i]) acc_[i] = values[i];
        }
        std::uint64_t const generation = generation_;
        if (++arrived_ == ranks_) {
            out_.swap(acc_);
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
        } else {
            // The result of this round stays in out_ until every rank has read
            // it: the next round cannot complete without this one arriving.
            cv_.wait(lock, [&] { return generation_ != generation || !broken_.empty(); });
            if (generation_ == generation) detail::throw_invalid(broken_.c_str());
        }
        for (std::size_t i = 0; i < count; ++i) values[i] = out_[i];
    }

private:
    std::size_t ranks_;
    std::mutex mutex_;
    std::condition_variable cv_;
    std::size_t arrived_ = 0;
    std::uint64_t generation_ = 0;
    std::vector<std::uint64_t> acc_, out_;
    std::string broken_;  // why the group can no longer agree (empty: it can)
};

}  // namespace oomguard
