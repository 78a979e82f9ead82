// The end-of-run report: devices, budgets and peaks, OOMs caught, bytes
// released per cache, every plan change, the OOMs outside any step that you
// note (setup) -- as a table for people and as JSON for tools -- and the
// timeline a plot draws (<oomguard/plot.hpp>: held and peak memory against
// the cap and the device's capacity, OOMs, the plan).
// Opt-in; not in the umbrella header.
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

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace oomguard {

/// What a Report saw over time, for plots; times in seconds since the Report was made.
struct Timeline {
    /// The memory at the end of a micro-batch.
    struct Memory {
        double t;            ///< seconds since the Report was made
        int device;          ///< the device of the budget it was measured under
        std::size_t held;    ///< bytes held under the device's tracked budget (between steps)
        std::size_t peak;    ///< the micro-batch's peak (held when it began + its own peak)
        std::size_t workload;  ///< index into workloads
        Plan plan;           ///< the plan it ran under
    };
    /// The workload of an OOM outside any step (Report::note_oom).
    static constexpr std::size_t outside = static_cast<std::size_t>(-1);
    /// An OOM, where it struck and what it asked for.
    struct Oom {
        double t;            ///< seconds since the Report was made
        int device;          ///< the device that ran out of memory
        std::size_t demand;  ///< held when it failed + the failed request (0: not known)
        std::size_t workload;  ///< index into workloads, or `outside`
    };
    /// The plan from time t on (the first of a workload: the plan it started with).
    struct PlanChange {
        double t;            ///< seconds since the Report was made
        std::size_t workload;  ///< index into workloads
        Plan plan;           ///< the plan in effect from t on
    };
    /// A tracked budget and its device.
    struct Device {
        std::string label;   ///< the label given to Report::track
        int device;          ///< the budget's device
        std::size_t limit;     ///< the budget's cap (0: none)
        std::size_t capacity;  ///< the device's total memory (0: not known)
    };
    std::vector<Memory> memory;  ///< thinned to every 2nd, 4th, ... point past max_points
    std::vector<Oom> ooms;              ///< every OOM caught or noted, in order
    std::vector<PlanChange> plans;      ///< every plan change, in order
    std::vector<Device> devices;        ///< the tracked budgets, in the order tracked
    std::vector<std::string> workloads; ///< the attached workloads' labels, in the order attached
    double end = 0;              ///< when timeline() was called
    std::size_t stride = 1;      ///< micro-batches per kept memory point
};

namespace detail {
// What the report calls a plan change. A commit that changes the size is a
// probe when it goes up (bisect's, predictive's) and a step down otherwise
// (a probe is upward by definition: 513 -> 512 is not one).
inline char const* plan_change_name(BatchEventKind k, Plan const& from, Plan const& to) noexcept {
    if (k != BatchEventKind::commit) return to_string(k);
    return to.micro_batch > from.micro_batch ? "probe" : "step down";
}
}  // namespace detail

/// What a run went through, for people and for tools: the tracked budgets
/// (cap, used, peak, denials), the OOMs each attached workload caught and how it
/// recovered, cache releases, plan changes, and the OOMs noted outside any step.
/// Attach it to AdaptiveBatch workloads (attach) and track budgets (track); read it
/// as a table, JSON or a Timeline for plot_svg. Detaches itself when destroyed.
class Report {
public:
    /// The version of json()'s layout, its "schema" key: raised when a key
    /// changes meaning or goes away (keys may be added within a version).
    static constexpr int json_schema = 1;
    /// Rows of plan changes kept (the JSON and the table show the first ones).
    static constexpr std::size_t max_plan_changes = 10000;
    /// Memory points kept for the timeline before it is thinned.
    static constexpr std::size_t max_points = 20000;

    Report() : start_(std::chrono::steady_clock::now()) {}
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
        std::size_t free = 0, total = 0;
        b.capacity = budget.backend().memory_info(budget.device(), &free, &total).ok() ? total : 0;
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

    /// Listens to `batch` under `label` until the report is destroyed. table()
    /// and json() show the batch's counters and plan as of its last event: the
    /// batch may be moved or destroyed before the report is read. Throws
    /// std::bad_alloc.
    void attach(AdaptiveBatch& batch, std::string label) {
        workloads_.reserve(workloads_.size() + 1);
        observing_.reserve(observing_.size() + 1);
        auto w = std::unique_ptr<Workload>(new Workload{this, std::move(label), batch.counters(), batch.plan(),
                                                        workloads_.size(), false, options_json(batch.options())});
        ObserverRegistration r = batch.observe([p = w.get()](BatchEvent const& e) { on_event(e, p); });
        workloads_.push_back(std::move(w));
        observing_.push_back(std::move(r));  // reserved: neither push throws
    }

    /// Records a setting of the run that the report cannot see for itself (the
    /// dataset, the model's size, a seed, the command line's flags), shown under
    /// "parameters" in json(). Setting a name again replaces its value. A string
    /// is a JSON string; a number (not bool) a JSON number, null when not finite;
    /// a bool true or false. Throws std::bad_alloc.
    void set_parameter(std::string name, std::string_view value) { put_parameter(std::move(name), detail::json_string(value)); }
    /// set_parameter for a C string (a JSON string). Throws std::bad_alloc.
    void set_parameter(std::string name, char const* value) { set_parameter(std::move(name), std::string_view(value)); }
    /// set_parameter for a std::string (a JSON string). Throws std::bad_alloc.
    void set_parameter(std::string name, std::string const& value) { set_parameter(std::move(name), std::string_view(value)); }
    /// set_parameter for a bool (JSON true or false). Throws std::bad_alloc.
    void set_parameter(std::string name, bool value) { put_parameter(std::move(name), value ? "true" : "false"); }
    /// set_parameter for a number other than bool (a JSON number; null when
    /// not finite). Throws std::bad_alloc.
    template <class T, std::enable_if_t<std::is_arithmetic<T>::value && !std::is_same<T, bool>::value, int> = 0>
    void set_parameter(std::string name, T value) {
        put_parameter(std::move(name), number_json(value));
    }

    /// Counts a release done outside adaptive_batch (a ScopedCacheRelease of yours).
    /// A cache another thread was releasing (CacheRelease::concurrent) is not
    /// counted again.
    void note_release(ReleaseReport const& r) {
        for (auto const& c : r.caches) {
            if (c.concurrent) continue;
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

    /// Records an out-of-memory that happened outside any adaptive_batch step,
    /// which no attached batch hears of: setup (model weights, optimizer state),
    /// loading a checkpoint, a pass of your own. `where` names it ("setup").
    /// The timeline gets an OOM at the demand that failed, in bytes: held under
    /// the budget + the request, from `e.info()` (0 when either is unknown: the
    /// plot marks it on the top edge), as an OOM in a step; the table lists it
    /// under "OOMs outside steps", the JSON under "ooms_outside_steps".
    /// A recovery_failed is not recorded again: the workload that gave up
    /// counts it (its OOMs, its give-up), when it is attached to this report.
    /// Throws std::bad_alloc.
    void note_oom(out_of_memory const& e, std::string where = "setup") {
        if (dynamic_cast<recovery_failed const*>(&e) != nullptr) return;
        if (outside_.size() >= max_points) return;
        oom_info const& i = e.info();
        std::size_t const requested = i.requested_known ? i.requested : oom_info::unknown;
        std::size_t const demand =
            requested != oom_info::unknown && i.budget_used != oom_info::unknown ? i.budget_used + requested : 0;
        bool const drawn = timeline_.ooms.size() < max_points;
        if (drawn) timeline_.ooms.reserve(timeline_.ooms.size() + 1);
        outside_.push_back(Outside{std::move(where), e.what(), i, requested});
        if (drawn) timeline_.ooms.push_back(Timeline::Oom{seconds(), i.device, demand, Timeline::outside});  // reserved
    }

    /// Where the plan of the workload attached as `label` came from:
    /// "requested" (BatchOptions::micro_batch, nothing changed it), "cache" (a
    /// PlanCache's entry), "calibration" (measured before any OOM,
    /// BatchOptions::start), "recovery" (the ladder, after an OOM); "" for no
    /// such workload. A probe or a grow-back keeps the source it started from.
    std::string plan_source(std::string const& label) const {
        for (auto const& w : workloads_)
            if (w->label == label) return w->source;
        return "";
    }

    /// The plan cache warnings heard (plan_cache_warning), each text once, as
    /// "workload: text".
    std::vector<std::string> const& warnings() const noexcept { return warnings_; }

    /// Plan changes recorded so far, over every workload.
    std::size_t plan_changes() const noexcept { return changes_.size(); }

    /// The run so far, over time: what <oomguard/plot.hpp> draws.
    Timeline timeline() const {
        Timeline t = timeline_;
        t.end = seconds();
        t.stride = stride_;
        for (auto const& b : budgets_) {
            Figures f;
            b.read(b.object, f);
            t.devices.push_back(Timeline::Device{b.label, b.device, f.limit, b.capacity});
        }
        for (auto const& w : workloads_) t.workloads.push_back(w->label);
        return t;
    }

    /// The report as a plain-text table (devices and budgets, OOMs per workload, cache releases,
    /// plan changes), as the demo prints it; throws std::bad_alloc only if the string cannot grow.
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
            auto const& c = w->counters;
            std::snprintf(line, sizeof line, "  %-8.8s %8zu %8zu %6zu %7zu %7zu %9zu %9zu %7zu %8zu  %.63s\n",
                          w->label.c_str(), c.global_batches, c.micro_batches, c.ooms, c.retries_same, c.shrinks,
                          c.precision_changes, c.failovers, c.grow_backs, c.give_ups,
                          detail::plan_text(w->plan).c_str());
            t += line;
        }
        bool const sourced = !warnings_.empty() || [this] {
            for (auto const& w : workloads_)
                if (std::string_view(w->source) != "requested") return true;
            return false;
        }();
        if (sourced) {  // only when a plan came from elsewhere than the options: the usual table stays as it was
            t += "plans from\n";
            for (auto const& w : workloads_) {
                std::snprintf(line, sizeof line, "  %-8.8s %-12s %.63s\n", w->label.c_str(), w->source,
                              detail::plan_text(w->plan).c_str());
                t += line;
            }
            for (auto const& x : warnings_) {
                std::snprintf(line, sizeof line, "  warning: %.400s\n", x.c_str());
                t += line;
            }
        }
        if (!outside_.empty()) t += "OOMs outside steps\n";  // only when there were: a rare event
        for (auto const& o : outside_) {
            std::snprintf(line, sizeof line, "  %-8.8s GPU %-3d asked for %12s holding %12s  %s\n", o.where.c_str(),
                          o.info.device, figure(o.requested).c_str(), figure(o.info.budget_used).c_str(),
                          o.info.source == oom_source::budget ? "denied by the budget" : "refused by the device");
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
            std::snprintf(line, sizeof line, "  %-8.8s batch %-6zu attempt %-3u %-16s %.63s -> %.63s\n", ch.workload.c_str(),
                          ch.batch, ch.attempt, change_name(ch), detail::plan_text(ch.from).c_str(),
                          detail::plan_text(ch.to).c_str());
            t += line;
        }
        return t;
    }

    /// The report as JSON: "schema" (json_schema), "parameters" (set_parameter),
    /// the budgets (each one's cap and device capacity, and its figures when
    /// json() is called: "used" is the "used now" of a table() made then), the
    /// workloads (counters, plan, and "options": the BatchOptions each started
    /// with), the OOMs outside steps, the caches released, the plan changes.
    std::string json() const {
        std::string j = "{\n  \"schema\": " + std::to_string(json_schema) + ",\n  \"parameters\": {";
        bool first = true;
        for (auto const& p : parameters_) {
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += detail::json_string(p.name) + ": " + p.json;
        }
        j += parameters_.empty() ? "},\n  \"budgets\": [" : "\n  },\n  \"budgets\": [";
        first = true;
        for (auto const& b : budgets_) {
            Figures f;
            b.read(b.object, f);
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += "{\"label\": " + detail::json_string(b.label) + ", \"backend\": " + detail::json_string(b.backend) +
                 ", \"device\": " + std::to_string(b.device) + ", \"limit\": " + std::to_string(f.limit) +
                 ", \"capacity\": " + std::to_string(b.capacity) + ", \"used\": " + std::to_string(f.used) + ", \"peak\": " + std::to_string(f.peak) +
                 ", \"allocations\": " + std::to_string(f.allocations) + ", \"denials\": " + std::to_string(f.denials) +
                 ", \"device_ooms\": " + std::to_string(f.device_ooms) + "}";
        }
        j += "\n  ],\n  \"workloads\": [";
        first = true;
        for (auto const& w : workloads_) {
            auto const& c = w->counters;
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
                 plan_json(w->plan) + ", \"plan_source\": " + detail::json_string(w->source) +
                 ", \"options\": " + w->options + "}";
        }
        j += "\n  ],\n  \"plan_cache_warnings\": [";
        first = true;
        for (auto const& x : warnings_) {
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += detail::json_string(x);
        }
        j += "\n  ],\n  \"ooms_outside_steps\": [";
        first = true;
        for (auto const& o : outside_) {
            j += first ? "\n    " : ",\n    ";
            first = false;
            j += "{\"where\": " + detail::json_string(o.where) + ", \"device\": " + std::to_string(o.info.device) +
                 ", \"requested\": " + number(o.requested) + ", \"held\": " + number(o.info.budget_used) +
                 ", \"limit\": " + number(o.info.budget_limit) + ", \"source\": \"" +
                 (o.info.source == oom_source::budget ? "budget" : "device") +
                 "\", \"message\": " + detail::json_string(o.message) + "}";
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
                 ", \"attempt\": " + std::to_string(ch.attempt) + ", \"event\": " + detail::json_string(change_name(ch)) +
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
        std::size_t capacity = 0;
        void (*read)(void const*, Figures&) = nullptr;
    };
    struct Workload {
        Report* report;
        std::string label;
        BatchCounters counters;  // the batch's, as of its last event
        Plan plan;               // the same
        std::size_t index;
        bool started;
        std::string options;  // the BatchOptions it was attached with, as JSON
        char const* source = "requested";  // where the plan now came from (plan_source)
        std::size_t ooms_at_begin = 0;     // its OOMs when its current global batch began
    };
    struct Parameter {
        std::string name, json;
    };
    struct Change {
        std::string workload;
        std::size_t batch;
        unsigned attempt;
        BatchEventKind kind;
        Plan from, to;
    };
    struct Outside {  // an OOM noted by note_oom
        std::string where, message;
        oom_info info;
        std::size_t requested;  // oom_info::unknown when the failing library did not say
    };
    struct CacheTotal {
        std::string name;
        std::size_t bytes, releases, failures;
    };

    void note_warning(std::string const& workload, char const* what) noexcept {
        try {
            std::string text = workload + ": " + (what != nullptr ? what : "");
            for (auto const& x : warnings_)
                if (x == text) return;
            warnings_.push_back(std::move(text));
        } catch (...) {  // no memory for the text: the cache keeps it in its own warnings()
        }
    }
    static char const* change_name(Change const& c) noexcept { return detail::plan_change_name(c.kind, c.from, c.to); }
    void put_parameter(std::string name, std::string json) {
        for (auto& p : parameters_)
            if (p.name == name) {
                p.json = std::move(json);
                return;
            }
        parameters_.push_back(Parameter{std::move(name), std::move(json)});
    }
    template <class T>
    static std::string number_json(T v) {
        if constexpr (std::is_integral<T>::value) {
            return std::to_string(v);
        } else {
            double const d = static_cast<double>(v);
            if (!std::isfinite(d)) return "null";
            char b[40];
            std::snprintf(b, sizeof b, "%.15g", d);  // the shortest of these that reads back the same
            if (std::strtod(b, nullptr) != d) std::snprintf(b, sizeof b, "%.17g", d);
            return b;
        }
    }
    static std::string options_json(BatchOptions const& o) {
        std::string p = "[";
        for (std::size_t i = 0; i < o.precisions.size(); ++i)
            p += std::string(i ? ", \"" : "\"") + to_string(o.precisions[i]) + "\"";
        p += "]";
        std::string policy = "{\"name\": " + detail::json_string(o.policy.name());
        if (o.policy.kind() == ShrinkPolicy::Kind::geometric) policy += ", \"factor\": " + number_json(o.policy.factor());
        if (o.policy.kind() == ShrinkPolicy::Kind::predictive) policy += ", \"margin\": " + number_json(o.policy.margin());
        policy += "}";
        return "{\"global_batch\": " + std::to_string(o.global_batch) +
               ", \"micro_batch\": " + std::to_string(o.micro_batch != 0 ? o.micro_batch : o.global_batch) +
               ", \"min_micro_batch\": " + std::to_string(o.min_micro_batch) + ", \"precisions\": " + p +
               ", \"policy\": " + policy + ", \"resume\": " + (o.resume ? "true" : "false") +
               ", \"max_attempts\": " + std::to_string(o.max_attempts) +
               ", \"grow_after\": " + std::to_string(o.grow_after) +
               ", \"restore_precision_after\": " + std::to_string(o.restore_precision_after) +
               ", \"transient_retries\": " + std::to_string(o.transient_retries) +
               ", \"release_caches\": " + (o.release_caches ? "true" : "false") + "}";
    }
    // A figure that may be unknown: bytes, or "unknown"; a number, or null.
    static detail::ByteText figure(std::size_t b) noexcept {
        if (b != oom_info::unknown) return detail::format_bytes(b);
        detail::ByteText t;
        std::snprintf(t.text, sizeof t.text, "unknown");
        return t;
    }
    static std::string number(std::size_t b) { return b == oom_info::unknown ? "null" : std::to_string(b); }
    static std::string plan_json(Plan const& p) {
        return "{\"micro_batch\": " + std::to_string(p.micro_batch) + ", \"precision\": \"" + to_string(p.precision) +
               "\", \"device\": " + std::to_string(p.device) + "}";
    }

    double seconds() const {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    }
    // Bytes held now under the tracked budget of `device` (0: none tracked).
    std::size_t held_on(int device) const {
        for (auto const& b : budgets_)
            if (b.device == device) {
                Figures f;
                b.read(b.object, f);
                return f.used;
            }
        return 0;
    }
    void note_memory(BatchEvent const& e, std::size_t workload) {
        if (++since_point_ < stride_) return;
        since_point_ = 0;
        std::size_t held = held_on(e.to.device);
        std::size_t peak = e.held != oom_info::unknown ? e.held + e.bytes : held;
        timeline_.memory.push_back(
            Timeline::Memory{seconds(), e.to.device, held, peak < held ? held : peak, workload, e.to});
        if (timeline_.memory.size() >= max_points) {  // keep every other point: the shape stays
            std::size_t k = 0;
            for (std::size_t i = 0; i < timeline_.memory.size(); i += 2) timeline_.memory[k++] = timeline_.memory[i];
            timeline_.memory.resize(k);
            stride_ *= 2;
        }
    }

    static void on_event(BatchEvent const& e, Workload* w) {
        Report* r = w->report;
        if (e.batch != nullptr) {  // read now: the batch may be moved or gone when the report is read
            w->counters = e.batch->counters();
            w->plan = e.batch->plan();
        }
        switch (e.kind) {
            case BatchEventKind::micro_batch_end: r->note_memory(e, w->index); return;
            case BatchEventKind::micro_batch_begin: return;
            case BatchEventKind::batch_begin:
                w->ooms_at_begin = w->counters.ooms;
                if (!w->started) {
                    w->started = true;
                    r->timeline_.plans.push_back(Timeline::PlanChange{r->seconds(), w->index, e.to});
                }
                return;
            case BatchEventKind::plan_loaded: w->source = "cache"; return;
            case BatchEventKind::plan_saved: return;
            case BatchEventKind::plan_cache_warning: r->note_warning(w->label, e.what); return;
            case BatchEventKind::jump:
                // The calibration held: a measured start (attempt 1) or a recovery's.
                w->source = e.attempt == 1 && w->counters.ooms == w->ooms_at_begin ? "calibration" : "recovery";
                break;
            case BatchEventKind::shrink:
            case BatchEventKind::precision_change:
            case BatchEventKind::failover: w->source = "recovery"; break;
            case BatchEventKind::oom_caught:
                if (r->timeline_.ooms.size() < max_points) {
                    std::size_t demand = e.held != oom_info::unknown && e.bytes != oom_info::unknown
                                             ? e.held + e.bytes
                                             : 0;
                    r->timeline_.ooms.push_back(Timeline::Oom{r->seconds(), e.to.device, demand, w->index});
                }
                break;
            default: break;
        }
        if (e.kind == BatchEventKind::released && e.release != nullptr) r->note_release(*e.release);
        // A commit that changes the size: a probe upward (bisect's, predictive's) or a step down.
        bool const probe = e.kind == BatchEventKind::commit && e.to.micro_batch != e.from.micro_batch;
        bool change = e.kind == BatchEventKind::shrink || e.kind == BatchEventKind::precision_change ||
                      e.kind == BatchEventKind::failover || e.kind == BatchEventKind::grow_back ||
                      e.kind == BatchEventKind::jump || e.kind == BatchEventKind::give_up || probe;
        if (change && r->changes_.size() < max_plan_changes)
            // A commit is counted before it is announced: its batch is the one before the count.
            r->changes_.push_back(Change{w->label, w->counters.global_batches - (probe ? 1 : 0), e.attempt,
                                         e.kind, e.from, e.to});
        if (change && r->timeline_.plans.size() < max_points &&
            (e.to.micro_batch != e.from.micro_batch || e.to.precision != e.from.precision ||
             e.to.device != e.from.device))
            r->timeline_.plans.push_back(Timeline::PlanChange{r->seconds(), w->index, e.to});
    }

    std::vector<Budget> budgets_;
    std::vector<std::unique_ptr<Workload>> workloads_;
    std::vector<Change> changes_;
    std::vector<CacheTotal> caches_;
    std::vector<Outside> outside_;
    std::vector<Parameter> parameters_;
    std::vector<std::string> warnings_;  // plan cache warnings, "workload: text", each once
    std::chrono::steady_clock::time_point start_;
    Timeline timeline_;
    std::size_t stride_ = 1, since_point_ = 0;
    // Last: destroyed first, so that no event reaches a report being destroyed.
    std::vector<ObserverRegistration> observing_;
};

}  // namespace oomguard
