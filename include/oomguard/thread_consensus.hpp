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
#include <vector>

namespace oomguard {

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

    std::size_t ranks() const noexcept { return ranks_; }

    /// The collective itself: blocks until every rank has called it, then each
    /// of values[0..count) holds its minimum over the ranks. Every rank must
    /// pass the same count.
    void all_min(std::uint64_t* values, std::size_t count) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (arrived_ == 0) {
            acc_.assign(values, values + count);
        } else {
            if (count != acc_.size())
                detail::throw_invalid(detail::Message() << "oomguard: ThreadConsensus: a rank passed " << count
                                                        << " values where another passed "
                                                        << static_cast<unsigned long>(acc_.size()));
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
            cv_.wait(lock, [&] { return generation_ != generation; });
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
};

}  // namespace oomguard
