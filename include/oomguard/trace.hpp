// A Chrome trace-event timeline (opens in Perfetto or chrome://tracing):
// - a duration slice per global batch and per micro-batch, one thread track per
//   attached workload (an OOM ends its micro-batch's slice, marked "OOM");
// - counter tracks per budget: the bytes held, sampled at every micro-batch's
//   end, at every decision and whenever you call sample(); and each
//   micro-batch's peak, with the demand of one that ran out of memory (held +
//   the failed request: the spike that caused the OOM);
// - an instant event for every OOM, release, shrink, precision change,
//   failover and grow-back.
// Opt-in; not in the umbrella header.
//
//   oomguard::Trace trace("run.trace.json");   // opened now: a bad path fails here
//   trace.track("GPU 0", budget);
//   trace.attach(train, "train");
//   ... train ...
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

/// A Chrome trace (JSON trace events; open it in ui.perfetto.dev or chrome://tracing) of a
/// run: a track per attached workload with a slice for every global batch and micro-batch,
/// counters of the bytes held under each tracked budget and of each micro-batch's peak, and
/// an instant event for every OOM, release and plan change. The file is opened when the
/// Trace is made (a path that cannot be written throws then, before the run) and written by
/// write() or when it is destroyed. Detaches itself when destroyed.
class Trace {
public:
    /// Events kept; past it, events are dropped (events() says how many were kept).
    static constexpr std::size_t max_events = 1000000;

    /// Opens (creates or truncates) the file now, so that a path that cannot be
    /// written fails before the work it would record (std::runtime_error naming
    /// it); the events are written by write() or on destruction. An empty path
    /// keeps the trace in memory only (see json()).
    explicit Trace(std::string path) : path_(std::move(path)), start_(std::chrono::steady_clock::now()) {
        if (!path_.empty()) {
            file_ = std::fopen(path_.c_str(), "wb");
            if (file_ == nullptr) throw std::runtime_error("oomguard: Trace: cannot open '" + path_ + "' for writing");
        }
    }
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
        if (file_ != nullptr) std::fclose(file_);
    }

    /// Counter tracks of the bytes held under `budget` (which must outlive the trace's use).
    template <class B>
    void track(std::string label, MemoryBudget<B>& budget) {
        budgets_.push_back(Budget{std::move(label), budget.device(), &budget, [](void const* o) -> std::size_t {
                                      return static_cast<MemoryBudget<B> const*>(o)->used();
                                  }});
    }

    /// Slices and instant events for `batch`, until the trace is destroyed (the
    /// batch may be destroyed first). Throws std::bad_alloc.
    void attach(AdaptiveBatch& batch, std::string label) {
        workloads_.reserve(workloads_.size() + 1);
        observing_.reserve(observing_.size() + 1);
        auto w = std::unique_ptr<Workload>(new Workload{this, std::move(label), workloads_.size() + 2, 0, 0, 0, false});
        push("{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": 1, \"tid\": " + std::to_string(w->tid) +
             ", \"args\": {\"name\": " + detail::json_string(w->label) + "}}");
        ObserverRegistration r = batch.observe([p = w.get()](BatchEvent const& e) { on_event(e, p); });
        workloads_.push_back(std::move(w));
        observing_.push_back(std::move(r));  // reserved: neither push throws
    }

    /// Records the bytes held under every tracked budget now.
    void sample() {
        double ts = now_us();
        for (auto const& b : budgets_) counter(b.label + " held", ts, b.used(b.object));
    }

    /// An instant event of your own.
    void instant(std::string const& name, std::string const& detail_text = "") {
        push("{\"name\": " + detail::json_string(name) + ", \"ph\": \"i\", \"s\": \"g\", \"ts\": " + number(now_us()) +
             ", \"pid\": 1, \"tid\": 1, \"args\": {\"detail\": " + detail::json_string(detail_text) + "}}");
    }

    /// Events recorded so far (at most max_events).
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
        std::FILE* f = file_;
        file_ = nullptr;
        if (f == nullptr) f = std::fopen(path_.c_str(), "wb");  // written before: write it afresh
        if (f == nullptr) throw std::runtime_error("oomguard: Trace: cannot open '" + path_ + "' for writing");
        std::string j = json();
        bool ok = std::fwrite(j.data(), 1, j.size(), f) == j.size();
        ok = std::fclose(f) == 0 && ok;
        if (!ok) throw std::runtime_error("oomguard: Trace: writing '" + path_ + "' failed");
    }

private:
    struct Budget {
        std::string label;
        int device;
        void const* object;
        std::size_t (*used)(void const*);
    };
    struct Workload {
        Trace* trace;
        std::string label;
        std::size_t tid;
        double batch_begin, mb_begin;
        std::size_t batches;
        bool in_mb;
    };

    void push(std::string e) {
        if (events_.size() < max_events) events_.push_back(std::move(e));
    }
    void counter(std::string const& name, double ts, std::size_t bytes) {
        push("{\"name\": " + detail::json_string(name) + ", \"ph\": \"C\", \"ts\": " + number(ts) +
             ", \"pid\": 1, \"tid\": 1, \"args\": {\"bytes\": " + std::to_string(bytes) + "}}");
    }
    void slice(Workload const& w, std::string const& name, double begin, double end, std::string const& args) {
        push("{\"name\": " + detail::json_string(name) + ", \"ph\": \"X\", \"ts\": " + number(begin) +
             ", \"dur\": " + number(end - begin) + ", \"pid\": 1, \"tid\": " + std::to_string(w.tid) +
             ", \"args\": {" + args + "}}");
    }
    // The peak track of the budget on `device`, if one is tracked.
    void peak(int device, double ts, std::size_t bytes) {
        for (auto const& b : budgets_)
            if (b.device == device) counter(b.label + " micro-batch peak", ts, bytes);
    }

    double now_us() const {
        return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start_).count();
    }
    static std::string number(double v) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.3f", v);
        return buf;
    }

    static void on_event(BatchEvent const& e, Workload* w) {
        Trace* t = w->trace;
        double ts = t->now_us();
        bool const known = e.held != oom_info::unknown;
        switch (e.kind) {
            case BatchEventKind::batch_begin: w->batch_begin = ts; return;
            case BatchEventKind::micro_batch_begin:
                w->mb_begin = ts;
                w->in_mb = true;
                return;
            case BatchEventKind::micro_batch_end: {
                w->in_mb = false;
                char name[96];
                std::snprintf(name, sizeof name, "micro-batch %zu %s", e.size, to_string(e.to.precision));
                t->slice(*w, name, w->mb_begin, ts,
                         "\"offset\": " + std::to_string(e.offset) + ", \"size\": " + std::to_string(e.size) +
                             ", \"attempt\": " + std::to_string(e.attempt) +
                             (known ? ", \"peak_bytes\": " + std::to_string(e.held + e.bytes) : std::string()));
                if (known) t->peak(e.to.device, ts, e.held + e.bytes);
                t->sample();
                return;
            }
            case BatchEventKind::commit:
            case BatchEventKind::give_up: {
                ++w->batches;
                t->slice(*w, (e.kind == BatchEventKind::commit ? "global batch " : "global batch (gave up) ") +
                                 std::to_string(w->batches),
                         w->batch_begin, ts, "\"attempts\": " + std::to_string(e.attempt));
                if (e.kind == BatchEventKind::commit) {
                    t->sample();
                    return;
                }
                break;
            }
            case BatchEventKind::oom_caught: {
                if (w->in_mb) {
                    w->in_mb = false;
                    char name[96];
                    std::snprintf(name, sizeof name, "micro-batch %zu %s: OOM", e.size, to_string(e.to.precision));
                    t->slice(*w, name, w->mb_begin, ts,
                             "\"offset\": " + std::to_string(e.offset) + ", \"size\": " + std::to_string(e.size) +
                                 ", \"attempt\": " + std::to_string(e.attempt));
                }
                detail::Message d = detail::plan_text(e.to);
                if (e.size != 0)
                    d << ", samples [" << e.offset << ", " << e.offset + e.size << ")";
                else
                    d << ", in the commit";
                d << ", attempt " << e.attempt << ": asked for " << e.bytes << " bytes";
                if (known) d << " holding " << e.held;
                t->instant(w->label + ": oom_caught", d.c_str());
                // The demand that failed: the spike the samples between steps never see.
                if (known && e.bytes != oom_info::unknown) t->peak(e.to.device, ts, e.held + e.bytes);
                t->sample();
                return;
            }
            default: break;
        }
        detail::Message d = detail::plan_text(e.from);
        d << " -> " << detail::plan_text(e.to).view() << ", " << e.bytes << " bytes, attempt " << e.attempt;
        t->instant(w->label + ": " + to_string(e.kind), d.c_str());
        t->sample();
    }

    std::string path_;
    std::chrono::steady_clock::time_point start_;
    std::FILE* file_ = nullptr;
    std::vector<Budget> budgets_;
    std::vector<std::unique_ptr<Workload>> workloads_;
    std::vector<std::string> events_;
    bool written_ = false;
    // Last: destroyed first, so that no event reaches a trace being destroyed.
    std::vector<ObserverRegistration> observing_;
};

}  // namespace oomguard
