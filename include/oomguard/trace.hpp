// A Chrome trace-event timeline (opens in Perfetto or chrome://tracing): the
// bytes held under each budget as counter tracks, and every OOM, release,
// shrink, precision change, failover and grow-back as an instant event.
// Opt-in; not in the umbrella header.
//
//   oomguard::Trace trace("run.trace.json");
//   trace.track("GPU 0", budget);
//   trace.attach(train, "train");
//   ... call trace.sample() after each step ...
//   trace.write();   // also on destruction
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/detail/json.hpp>
#include <oomguard/memory_budget.hpp>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace oomguard {

class Trace {
public:
    /// Events kept before the oldest counter samples are thinned out.
    static constexpr std::size_t max_events = 1000000;

    /// The file is written by write() or on destruction; an empty path keeps
    /// the trace in memory only (see json()).
    explicit Trace(std::string path) : path_(std::move(path)), start_(std::chrono::steady_clock::now()) {}
    Trace(Trace const&) = delete;
    Trace& operator=(Trace const&) = delete;
    ~Trace() {
        if (!written_ && !path_.empty()) {
            try {
                write();
            } catch (...) {
                // A destructor may not throw; call write() to see the error.
            }
        }
    }

    /// A counter track of the bytes held under `budget`.
    template <class B>
    void track(std::string label, MemoryBudget<B>& budget) {
        budgets_.push_back(Budget{std::move(label), &budget, [](void const* o) -> std::size_t {
                                      return static_cast<MemoryBudget<B> const*>(o)->used();
                                  }});
    }

    /// Instant events for `batch`'s decisions; `batch` must outlive the trace's use.
    void attach(AdaptiveBatch& batch, std::string label) {
        auto w = std::unique_ptr<Workload>(new Workload{this, std::move(label)});
        batch.observe(&Trace::on_event, w.get());
        workloads_.push_back(std::move(w));
    }

    /// Records the bytes of every tracked budget now.
    void sample() {
        double ts = now_us();
        for (auto const& b : budgets_) {
            if (events_.size() >= max_events) return;
            events_.push_back("{\"name\": " + detail::json_string(b.label + " bytes") +
                              ", \"ph\": \"C\", \"ts\": " + number(ts) + ", \"pid\": 1, \"tid\": 1, \"args\": {\"bytes\": " +
                              std::to_string(b.used(b.object)) + "}}");
        }
    }

    /// An instant event of your own.
    void instant(std::string const& name, std::string const& detail_text = "") {
        if (events_.size() >= max_events) return;
        events_.push_back("{\"name\": " + detail::json_string(name) + ", \"ph\": \"i\", \"s\": \"g\", \"ts\": " +
                          number(now_us()) + ", \"pid\": 1, \"tid\": 1, \"args\": {\"detail\": " +
                          detail::json_string(detail_text) + "}}");
    }

    std::size_t events() const noexcept { return events_.size(); }

    /// The whole trace as JSON.
    std::string json() const {
        std::string j = "{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n";
        j += "{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": 1, \"args\": {\"name\": \"oomguard\"}}";
        for (auto const& e : events_) {
            j += ",\n";
            j += e;
        }
        j += "\n]}\n";
        return j;
    }

    /// Writes the file; throws std::runtime_error naming the path if it cannot.
    void write() {
        written_ = true;
        std::FILE* f = std::fopen(path_.c_str(), "wb");
        if (f == nullptr) throw std::runtime_error("oomguard: Trace: cannot open '" + path_ + "' for writing");
        std::string j = json();
        bool ok = std::fwrite(j.data(), 1, j.size(), f) == j.size();
        ok = std::fclose(f) == 0 && ok;
        if (!ok) throw std::runtime_error("oomguard: Trace: writing '" + path_ + "' failed");
    }

private:
    struct Budget {
        std::string label;
        void const* object;
        std::size_t (*used)(void const*);
    };
    struct Workload {
        Trace* trace;
        std::string label;
    };

    double now_us() const {
        return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start_).count();
    }
    static std::string number(double v) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.3f", v);
        return buf;
    }

    static void on_event(BatchEvent const& e, void* user) {
        auto* w = static_cast<Workload*>(user);
        if (e.kind == BatchEventKind::commit) return;  // the counters show steady progress
        char buf[160];
        std::snprintf(buf, sizeof buf, "m=%zu %s GPU %d -> m=%zu %s GPU %d, %zu bytes, attempt %u", e.from.micro_batch,
                      to_string(e.from.precision), e.from.device, e.to.micro_batch, to_string(e.to.precision),
                      e.to.device, e.bytes, e.attempt);
        w->trace->instant(w->label + ": " + to_string(e.kind), buf);
        w->trace->sample();
    }

    std::string path_;
    std::chrono::steady_clock::time_point start_;
    std::vector<Budget> budgets_;
    std::vector<std::unique_ptr<Workload>> workloads_;
    std::vector<std::string> events_;
    bool written_ = false;
};

}  // namespace oomguard
