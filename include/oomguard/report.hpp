// The end-of-run report: devices, budgets and peaks, OOMs caught, bytes
// released per cache, every plan change -- as a table for people and as JSON
// for tools. Opt-in; not in the umbrella header.
//
//   oomguard::Report report;
//   report.track("GPU 0", budget);
//   report.attach(train, "train");
//   ... train ...
//   std::fputs(report.table().c_str(), stdout);
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/detail/json.hpp>
#include <oomguard/memory_budget.hpp>

#include <cstddef>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace oomguard {

class Report {
public:
    /// Rows of plan changes kept (the JSON and the table show the first ones).
    static constexpr std::size_t max_plan_changes = 10000;

    Report() = default;
    Report(Report const&) = delete;
    Report& operator=(Report const&) = delete;

    /// Reports `budget` (which must outlive the report) under `label`.
    template <class B>
    void track(std::string label, MemoryBudget<B>& budget) {
        Budget b;
        b.label = std::move(label);
        b.object = &budget;
        b.device = budget.device();
        b.backend = B::backend_name;
        b.read = [](void const* o, Figures& f) {
            auto const* mb = static_cast<MemoryBudget<B> const*>(o);
            f.used = mb->used();
            f.peak = mb->peak();
            f.limit = mb->limit() == MemoryBudget<B>::max_limit ? 0 : mb->limit();
            f.allocations = mb->allocations();
            f.denials = mb->denials();
            f.device_ooms = mb->device_ooms();
        };
        budgets_.push_back(std::move(b));
    }

    /// Listens to `batch` (which must outlive the report) under `label`.
    void attach(AdaptiveBatch& batch, std::string label) {
        auto w = std::unique_ptr<Workload>(new Workload{this, std::move(label), &batch});
        batch.observe(&Report::on_event, w.get());
        workloads_.push_back(std::move(w));
    }

    /// Counts a release done outside adaptive_batch (a ScopedCacheRelease of yours).
    void note_release(ReleaseReport const& r) {
        for (auto const& c : r.caches) {
            CacheTotal* t = nullptr;
            for (auto& x : caches_)
                if (x.name == c.name) t = &x;
            if (t == nullptr) {
                caches_.push_back(CacheTotal{std::string(c.name.view()), 0, 0, 0});
                t = &caches_.back();
            }
            ++t->releases;
            t->bytes += c.bytes;
            t->failures += c.failed ? 1 : 0;
        }
    }

    std::size_t plan_changes() const noexcept { return changes_.size(); }

    std::string table() const {
        std::string t = "oomguard report\n";
        char line[512];
        t += "devices and budgets\n";
        std::snprintf(line, sizeof line, "  %-10s %-10s %5s %12s %12s %12s %12s %8s %8s\n", "budget", "backend", "GPU",
                      "limit", "used now", "peak", "allocs", "denied", "dev OOMs");
        t += line;
        for (auto const& b : budgets_) {
            Figures f;
            b.read(b.object, f);
            std::snprintf(line, sizeof line, "  %-10.10s %-10.10s %5d %12s %12s %12s %12zu %8zu %8zu\n", b.label.c_str(),
                          b.backend, b.device, f.limit ? detail::format_bytes(f.limit).c_str() : "none",
                          detail::format_bytes(f.used).c_str(), detail::format_bytes(f.peak).c_str(), f.allocations,
                          f.denials, f.device_ooms);
            t += line;
        }
        t += "workloads\n";
        std::snprintf(line, sizeof line, "  %-8s %8s %8s %6s %7s %7s %9s %9s %7s %8s  %s\n", "name", "batches", "micro",
                      "OOMs", "retries", "shrinks", "precision", "failovers", "grows", "give-ups", "plan now");
        t += line;
        for (auto const& w : workloads_) {
            auto const& c = w->batch->counters();
            std::snprintf(line, sizeof line, "  %-8.8s %8zu %8zu %6zu %7zu %7zu %9zu %9zu %7zu %8zu  %s\n",
                          w->label.c_str(), c.global_batches, c.micro_batches, c.ooms, c.retries_same, c.shrinks,
                          c.precision_changes, c.failovers, c.grow_backs, c.give_ups,
                          plan_text(w->batch->plan()).c_str());
            t += line;
        }
        t += "caches released\n";
        if (caches_.empty()) t += "  (none)\n";
        for (auto const& c : caches_) {
            std::snprintf(line, sizeof line, "  %-24.24s %6zu releases %12s %4zu failures\n", c.name.c_str(), c.releases,
                          detail::format_bytes(c.bytes).c_str(), c.failures);
            t += line;
        }
        t += "plan changes\n";
        if (changes_.empty()) t += "  (none)\n";
        std::size_t shown = 0;
        for (auto const& ch : changes_) {
            if (++shown > 40) {
                std::snprintf(line, sizeof line, "  ... %zu more in the JSON report\n", changes_.size() - 40);
                t += line;
                break;
            }
            std::snprintf(line, sizeof line, "  %-8.8s batch %-6zu attempt %-3u %-16s %s -> %s\n", ch.workload.c_str(),
                          ch.batch, ch.attempt, to_string(ch.kind), plan_text(ch.from).c_str(),
                          plan_text(ch.to).c_str());
            t += line;
        }
        return t;
    }

    std::string json() const {
        std::string j = "{\n  \"budgets\": [";
        bool first = true;
        for (auto const& b : budgets_) {
            Figures f;
            b.read(b.object, f);
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += "{\"label\": " + detail::json_string(b.label) + ", \"backend\": " + detail::json_string(b.backend) +
                 ", \"device\": " + std::to_string(b.device) + ", \"limit\": " + std::to_string(f.limit) +
                 ", \"used\": " + std::to_string(f.used) + ", \"peak\": " + std::to_string(f.peak) +
                 ", \"allocations\": " + std::to_string(f.allocations) + ", \"denials\": " + std::to_string(f.denials) +
                 ", \"device_ooms\": " + std::to_string(f.device_ooms) + "}";
        }
        j += "\n  ],\n  \"workloads\": [";
        first = true;
        for (auto const& w : workloads_) {
            auto const& c = w->batch->counters();
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += "{\"name\": " + detail::json_string(w->label) +
                 ", \"global_batches\": " + std::to_string(c.global_batches) +
                 ", \"micro_batches\": " + std::to_string(c.micro_batches) + ", \"ooms\": " + std::to_string(c.ooms) +
                 ", \"retries_same\": " + std::to_string(c.retries_same) + ", \"shrinks\": " + std::to_string(c.shrinks) +
                 ", \"precision_changes\": " + std::to_string(c.precision_changes) +
                 ", \"failovers\": " + std::to_string(c.failovers) + ", \"grow_backs\": " + std::to_string(c.grow_backs) +
                 ", \"calibrations\": " + std::to_string(c.calibrations) +
                 ", \"give_ups\": " + std::to_string(c.give_ups) +
                 ", \"commit_ooms\": " + std::to_string(c.commit_ooms) +
                 ", \"peer_aborts\": " + std::to_string(c.peer_aborts) +
                 ", \"observer_errors\": " + std::to_string(c.observer_errors) +
                 ", \"bytes_released\": " + std::to_string(c.bytes_released) +
                 ", \"wasted_samples\": " + std::to_string(c.wasted_samples) + ", \"plan\": " +
                 plan_json(w->batch->plan()) + "}";
        }
        j += "\n  ],\n  \"caches\": [";
        first = true;
        for (auto const& c : caches_) {
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += "{\"name\": " + detail::json_string(c.name) + ", \"releases\": " + std::to_string(c.releases) +
                 ", \"bytes\": " + std::to_string(c.bytes) + ", \"failures\": " + std::to_string(c.failures) + "}";
        }
        j += "\n  ],\n  \"plan_changes\": [";
        first = true;
        for (auto const& ch : changes_) {
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += "{\"workload\": " + detail::json_string(ch.workload) + ", \"batch\": " + std::to_string(ch.batch) +
                 ", \"attempt\": " + std::to_string(ch.attempt) + ", \"event\": " + detail::json_string(to_string(ch.kind)) +
                 ", \"from\": " + plan_json(ch.from) + ", \"to\": " + plan_json(ch.to) + "}";
        }
        j += "\n  ]\n}\n";
        return j;
    }

private:
    struct Figures {
        std::size_t used = 0, peak = 0, limit = 0, allocations = 0, denials = 0, device_ooms = 0;
    };
    struct Budget {
        std::string label;
        void const* object = nullptr;
        int device = 0;
        char const* backend = "";
        void (*read)(void const*, Figures&) = nullptr;
    };
    struct Workload {
        Report* report;
        std::string label;
        AdaptiveBatch* batch;
    };
    struct Change {
        std::string workload;
        std::size_t batch;
        unsigned attempt;
        BatchEventKind kind;
        Plan from, to;
    };
    struct CacheTotal {
        std::string name;
        std::size_t bytes, releases, failures;
    };

    static std::string plan_text(Plan const& p) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "m=%zu %s GPU %d", p.micro_batch, to_string(p.precision), p.device);
        return buf;
    }
    static std::string plan_json(Plan const& p) {
        return "{\"micro_batch\": " + std::to_string(p.micro_batch) + ", \"precision\": \"" + to_string(p.precision) +
               "\", \"device\": " + std::to_string(p.device) + "}";
    }

    static void on_event(BatchEvent const& e, void* user) {
        auto* w = static_cast<Workload*>(user);
        Report* r = w->report;
        if (e.kind == BatchEventKind::released && e.release != nullptr) r->note_release(*e.release);
        bool change = e.kind == BatchEventKind::shrink || e.kind == BatchEventKind::precision_change ||
                      e.kind == BatchEventKind::failover || e.kind == BatchEventKind::grow_back ||
                      e.kind == BatchEventKind::jump ||
                      e.kind == BatchEventKind::give_up;
        if (change && r->changes_.size() < max_plan_changes)
            r->changes_.push_back(Change{w->label, w->batch->counters().global_batches, e.attempt, e.kind, e.from, e.to});
    }

    std::vector<Budget> budgets_;
    std::vector<std::unique_ptr<Workload>> workloads_;
    std::vector<Change> changes_;
    std::vector<CacheTotal> caches_;
};

}  // namespace oomguard
