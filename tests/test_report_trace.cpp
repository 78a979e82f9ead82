#include <oomguard/device_buffer.hpp>
#include <oomguard/plot.hpp>
#include <oomguard/report.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/trace.hpp>

#include "mini_json.hpp"
#include "valid_utf8.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

using namespace oomguard;
constexpr std::size_t KiB = 1024;

namespace {
// A run with one shrink, one precision change and one cache release.
struct Run {
    SimulatedDevices gpus{1, 100 * KiB};
    MemoryBudget<SimulatedDevices> budget{gpus, 0, Limit::fraction(1.0)};
    CacheRegistry reg;
    std::vector<void*> held;
    CacheRegistration r;
    AdaptiveBatch a;
    static BatchOptions opts(CacheRegistry* reg) {
        BatchOptions o;
        o.global_batch = 64;
        o.micro_batch = 32;
        o.min_micro_batch = 16;
        o.precisions = {Precision::fp32, Precision::bf16};
        o.policy = ShrinkPolicy::halve();
        o.caches = reg;
        return o;
    }
    Run() : a(opts(&reg)) {
        held.push_back(budget.allocate(10 * KiB));
        r = reg.add("kv \"cache\"", 0, [this] { return held.size() * 10 * KiB; }, [this] {
            std::size_t b = held.size() * 10 * KiB;
            for (void* p : held) budget.deallocate(p, 10 * KiB);
            held.clear();
            return b;
        });
    }
    void go() {
        // fp32: 7 KiB per sample: 16 samples need 112 KiB > 100 KiB; bf16 (56 KiB) fits.
        a.run([&](MicroBatch const& mb) {
            DeviceBuffer<SimulatedDevices> act(budget, mb.size * 7 * KiB * bytes_per_element(mb.precision) / 4);
        }, [] {}, [] {});
    }
};
}  // namespace

TEST_CASE("the report: a table for people and JSON for tools") {
    Run run;
    Report report;
    report.track("GPU 0", run.budget);
    report.attach(run.a, "train");
    run.go();
    std::string t = report.table();
    CHECK(t.find("GPU 0      simulated      0   100.00 KiB") != std::string::npos);
    CHECK(t.find("train") != std::string::npos);
    CHECK(t.find("kv \"cache\"") != std::string::npos);
    CHECK(t.find("shrink           m=32 fp32 GPU 0 -> m=16 fp32 GPU 0") != std::string::npos);
    CHECK(t.find("precision_change m=16 fp32 GPU 0 -> m=16 bf16 GPU 0") != std::string::npos);
    mini_json::Value j = mini_json::parse(report.json());
    CHECK(j["budgets"].items.size() == 1);
    CHECK(j["budgets"].items[0]["limit"].n == 100 * KiB);
    CHECK(j["workloads"].items[0]["ooms"].n == 3);
    CHECK(j["workloads"].items[0]["commit_ooms"].n == 0);
    CHECK(j["workloads"].items[0]["peer_aborts"].n == 0);
    CHECK(j["workloads"].items[0]["observer_errors"].n == 0);
    CHECK(j["workloads"].items[0]["plan"]["precision"].s == "bf16");
    CHECK(j["caches"].items[0]["name"].s == "kv \"cache\"");
    CHECK(j["caches"].items[0]["bytes"].n == 10 * KiB);
    CHECK(j["plan_changes"].items.size() == 2);
    CHECK(report.plan_changes() == 2);
}

TEST_CASE("the trace parses as Chrome trace-event JSON with counter and instant events") {
    Run run;
    std::string path = "oomguard_test_trace.json";
    {
        Trace trace(path);
        trace.track("GPU 0", run.budget);
        trace.attach(run.a, "train");
        trace.sample();
        run.go();
        trace.sample();
    }  // written on destruction
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    mini_json::Value j = mini_json::parse(ss.str());
    std::size_t counters = 0, instants = 0, ooms = 0, batches = 0, micro = 0, failed_micro = 0, spikes = 0;
    std::string oom_detail;
    for (auto const& e : j["traceEvents"].items) {
        if (e["ph"].s == "C") {
            ++counters;
            // The failed demands: 32 samples at fp32 (7 KiB each) over the 10 KiB cache, then
            // again once the release emptied it, then 16 samples.
            double b = e["args"]["bytes"].n;
            if (e["name"].s == "GPU 0 micro-batch peak" &&
                (b == (10 + 32 * 7) * KiB || b == 32 * 7 * KiB || b == 16 * 7 * KiB))
                ++spikes;
        }
        if (e["ph"].s == "i") {
            ++instants;
            if (e["name"].s == "train: oom_caught") {
                if (++ooms == 1) oom_detail = e["args"]["detail"].s;
            }
            CHECK(e.has("ts"));
        }
        if (e["ph"].s == "X") {
            CHECK(e["tid"].n == 2);
            CHECK(e["dur"].n >= 0);
            if (e["name"].s == "global batch 1") ++batches;
            if (e["name"].s == "micro-batch 16 bf16") ++micro;
            if (e["name"].s.find(": OOM") != std::string::npos) ++failed_micro;
        }
    }
    CHECK(counters >= 2);
    CHECK(instants >= 5);
    CHECK(ooms == 3);
    CHECK(batches == 1);
    CHECK(micro == 4);  // 64 samples at m=16 bf16
    CHECK(failed_micro == 3);
    CHECK(spikes == 3);
    CHECK(oom_detail == "m=32 fp32 GPU 0, samples [0, 32), attempt 1: asked for 229376 bytes holding 10240");
    std::remove(path.c_str());
    // A path that cannot be written fails when the trace is made, before the run.
    CHECK_THROWS_WITH_AS(Trace("/nonexistent-dir/x.json"), doctest::Contains("/nonexistent-dir/x.json"),
                         std::runtime_error);
}

namespace {
std::size_t count(std::string const& s, std::string const& what) {
    std::size_t n = 0;
    for (std::size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
    return n;
}
}  // namespace

TEST_CASE("the report's timeline: a memory point per micro-batch, every OOM at its demand, every plan") {
    Run run;
    run.a.measure_with(run.budget);  // the peaks come from the budget adaptive_batch measures with
    Report report;
    report.track("GPU 0", run.budget);
    report.attach(run.a, "train");
    run.go();
    Timeline t = report.timeline();
    REQUIRE(t.devices.size() == 1);
    CHECK(t.devices[0].capacity == 100 * KiB);
    CHECK(t.devices[0].limit == 100 * KiB);
    // With the meter, 32 is not retried after the release: the 10 KiB it freed
    // could not make 234 KiB fit in 100 (without one, the retry tells: 3 OOMs).
    REQUIRE(t.ooms.size() == 2);
    CHECK(t.ooms[0].demand == (10 + 32 * 7) * KiB);
    CHECK(t.ooms[1].demand == 16 * 7 * KiB);
    CHECK(t.memory.size() == 4);  // the four micro-batches of 16 that completed
    for (auto const& m : t.memory) {
        CHECK(m.held == 0);
        CHECK(m.peak == 16 * 7 * KiB / 2);  // bf16
    }
    REQUIRE(t.plans.size() == 3);  // m=32 fp32, m=16 fp32, m=16 bf16
    CHECK(t.plans[0].plan.micro_batch == 32);
    CHECK(t.plans[2].plan.precision == Precision::bf16);
    for (std::size_t i = 1; i < t.memory.size(); ++i) CHECK(t.memory[i].t >= t.memory[i - 1].t);
    CHECK(t.end >= t.memory.back().t);
}

TEST_CASE("the plot: one self-contained SVG with both panels, the OOMs, the precision and escaped labels") {
    Run run;
    Report report;
    report.track("GPU <0> & \"1\"\x01\xff\xc3", run.budget);  // markup, a control character, bytes not UTF-8
    report.attach(run.a, "train");
    run.go();
    std::string svg = plot_svg(report);
    CHECK(svg.rfind("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
    CHECK(svg.size() - svg.rfind("</svg>\n") == 7);
    CHECK(svg.find("budget cap</text>\n<polyline") == std::string::npos);  // cap == capacity: one line
    CHECK(svg.find("GPU &lt;0&gt; &amp; &quot;1&quot;?\xef\xbf\xbd\xef\xbf\xbd capacity") != std::string::npos);
    CHECK(svg.find("OOM (3), at its demand") != std::string::npos);
    CHECK(count(svg, "stroke=\"#d62728\"") == 3 + 1);  // each OOM and the legend's
    CHECK(count(svg, ">bf16</text>") == 1);
    CHECK(count(svg, ">fp32</text>") == 0);  // no fp32 micro-batch completed
    CHECK(count(svg, "stroke-dasharray=\"6 3\"") == 2);  // bf16 is below the fp32 it started at; the legend
    CHECK(svg.find("device memory (KiB)") != std::string::npos);
    CHECK(svg.find("train micro-batch") != std::string::npos);
    CHECK(svg.find("<script") == std::string::npos);
    CHECK(svg.find("href") == std::string::npos);
    // An empty report still draws its axes.
    Report empty;
    std::string e = plot_svg(empty, "a <title>");
    CHECK(e.find("no micro-batch ran yet") != std::string::npos);
    CHECK(e.find("a &lt;title&gt;") != std::string::npos);
    // UTF-8 that is well formed passes whole; one point draws a dot; a sixth workload is counted, not drawn.
    CHECK(detail::xml_text("\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xed\xa0\x80") ==
          "\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    CHECK(test_support::valid_utf8(svg));
    Timeline one;
    one.devices.push_back({"GPU 0", 0, 0, 1000});
    for (int i = 0; i < 7; ++i) one.workloads.push_back("w" + std::to_string(i));
    one.memory.push_back({0.5, 0, 100, 200, 0, Plan{4, Precision::fp32, 0, 0}});
    one.end = 1;
    std::string dot = plot_svg(one);
    CHECK(count(dot, "<circle ") == 2);  // the peak and the held bytes
    CHECK(dot.find("and 2 more workloads") != std::string::npos);
    CHECK(dot.find(">0.5</text>") == std::string::npos);  // whole sizes on the micro-batch axis
    // The demo's plot test (demo_plot.cmake) sets this, and validates the file with xmllint.
    char const* out = std::getenv("OOMGUARD_PLOT_FILE");
    if (out != nullptr) {
        std::ofstream f(out);
        f << svg;
    }
}

TEST_CASE("a give-up shows the plan it gave up at and the plan it returns to") {
    // fp32 only: 16 samples of 7 KiB do not fit 100 KiB, so it shrinks 32 -> 16 and gives up at 16.
    SimulatedDevices gpus{1, 100 * KiB};
    MemoryBudget<SimulatedDevices> budget{gpus, 0, Limit::fraction(1.0)};
    BatchOptions o;
    o.global_batch = 64;
    o.micro_batch = 32;
    o.min_micro_batch = 16;
    o.policy = ShrinkPolicy::halve();
    AdaptiveBatch a(o);
    Report report;
    report.track("GPU 0", budget);
    report.attach(a, "train");
    Trace trace("");
    trace.attach(a, "train");
    CHECK_THROWS_AS(a.run([&](MicroBatch const& mb) { DeviceBuffer<SimulatedDevices> act(budget, mb.size * 7 * KiB); },
                          [] {}, [] {}),
                    recovery_failed);
    std::string const t = report.table();
    CAPTURE(t);
    CHECK(t.find("shrink           m=32 fp32 GPU 0 -> m=16 fp32 GPU 0") != std::string::npos);
    CHECK(t.find("give_up          m=16 fp32 GPU 0 -> m=32 fp32 GPU 0") != std::string::npos);
    mini_json::Value j = mini_json::parse(report.json());
    REQUIRE(j["plan_changes"].items.size() == 2);
    mini_json::Value const& g = j["plan_changes"].items[1];
    CHECK(g["event"].s == "give_up");
    CHECK(g["from"]["micro_batch"].n == 16);
    CHECK(g["to"]["micro_batch"].n == 32);
    // The plot's plan line returns to where the next batch starts.
    Timeline tl = report.timeline();
    REQUIRE(tl.plans.size() == 3);
    CHECK(tl.plans[1].plan.micro_batch == 16);
    CHECK(tl.plans[2].plan.micro_batch == 32);
    std::size_t gave_up = 0;
    mini_json::Value const events = mini_json::parse(trace.json());
    for (auto const& e : events["traceEvents"].items)
        if (e["name"].s == "train: give_up")
            gave_up += e["args"]["detail"].s.rfind("m=16 fp32 GPU 0 -> m=32 fp32 GPU 0, ", 0) == 0;
    CHECK(gave_up == 1);
}

TEST_CASE("the report's and the trace's JSON is valid UTF-8 whatever the labels hold") {
    // Markup, control characters, and each kind of ill-formed UTF-8 between well-formed text.
    std::string const bad = "<b>&\"q\"\\ \x01\x1f\t\n"
                            "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"  // é € 😀: kept
                            "|\xff|\x80|\xc3|\xe2\x82|\xf0\x9f\x98|"  // bad lead, lone continuation, truncated
                            "\xc0\xaf|\xe0\x80\xaf|"                  // overlong
                            "\xed\xa0\x80|\xf4\x90\x80\x80|\xf5\x80|"  // surrogate, past U+10FFFF
                            "\xe2\x82";                               // truncated at the end
    std::string const fffd = "\xef\xbf\xbd";
    // One U+FFFD per maximal subpart (Unicode 3.9, as WHATWG decoders do); mini_json
    // reads each \u escape as '?'.
    std::string const expected = "<b>&\"q\"\\ ??\t\n\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80|" + fffd + "|" + fffd + "|" +
                                 fffd + "|" + fffd + "|" + fffd + "|" + fffd + fffd + "|" + fffd + fffd + fffd + "|" +
                                 fffd + fffd + fffd + "|" + fffd + fffd + fffd + fffd + "|" + fffd + fffd + "|" + fffd;
    Run run;
    Report report;
    report.track(bad, run.budget);
    report.attach(run.a, bad);
    ReleaseReport r;
    r.caches.resize(1);
    r.caches[0].name = CacheName(bad.substr(12, 40));
    r.caches[0].bytes = 1;
    report.note_release(r);
    Trace trace("");
    trace.track(bad, run.budget);
    trace.attach(run.a, bad);
    run.go();
    trace.instant(bad, bad);
    std::string const j = report.json(), tj = trace.json();
    CHECK(test_support::valid_utf8(j));
    CHECK(test_support::valid_utf8(tj));
    mini_json::Value v = mini_json::parse(j);
    CHECK(v["budgets"].items[0]["label"].s == expected);
    CHECK(v["workloads"].items[0]["name"].s == expected);
    CHECK(test_support::valid_utf8(v["caches"].items[0]["name"].s));
    mini_json::Value t = mini_json::parse(tj);
    std::size_t named = 0;
    for (auto const& e : t["traceEvents"].items)
        if (e["ph"].s == "i" && e["name"].s == expected) named += e["args"]["detail"].s == expected;
    CHECK(named == 1);
    // The escapes themselves.
    CHECK(detail::json_string("\x7f\xc2\xa0\xef\xbf\xbf\xf4\x8f\xbf\xbf") == "\"\x7f\xc2\xa0\xef\xbf\xbf\xf4\x8f\xbf\xbf\"");
    CHECK(detail::json_string("\x01\x1f\"\\\r") == "\"\\u0001\\u001f\\\"\\\\\\r\"");
    CHECK(detail::json_string("\xe2\x82x") == "\"" + fffd + "x\"");
    CHECK(detail::json_string("\xc3") == "\"" + fffd + "\"");
}

TEST_CASE("an OOM outside any step (setup: the weights) is in the timeline, the plot, the table and the JSON") {
    SimulatedDevices gpus{1, 100 * KiB};
    MemoryBudget<SimulatedDevices> budget{gpus, 0, Limit::fraction(0.5)};
    AdaptiveBatch a(Run::opts(nullptr));
    Report report;
    report.track("GPU 0", budget);
    report.attach(a, "train");
    {
        DeviceBuffer<SimulatedDevices> embeddings(budget, 10 * KiB);
        try {
            DeviceBuffer<SimulatedDevices> weights(budget, 60 * KiB);  // 70 KiB over a cap of 50
            FAIL("the weights fit");
        } catch (out_of_memory const& e) {
            report.note_oom(e);
        }
    }
    Timeline t = report.timeline();
    REQUIRE(t.ooms.size() == 1);
    CHECK(t.ooms[0].demand == 70 * KiB);  // held + requested, as for an OOM in a step
    CHECK(t.ooms[0].device == 0);
    CHECK(t.ooms[0].workload == Timeline::outside);
    CHECK(t.end >= t.ooms[0].t);
    std::string const svg = plot_svg(report);
    CHECK(svg.find("OOM (1), at its demand") != std::string::npos);
    CHECK(count(svg, "stroke=\"#d62728\"") == 1 + 1);  // the OOM's marker and the legend's
    std::string const table = report.table();
    CAPTURE(table);
    CHECK(table.find("OOMs outside steps\n  setup    GPU 0   asked for    60.00 KiB holding    10.00 KiB  "
                     "denied by the budget\n") != std::string::npos);
    mini_json::Value j = mini_json::parse(report.json());
    REQUIRE(j["ooms_outside_steps"].items.size() == 1);
    mini_json::Value const& o = j["ooms_outside_steps"].items[0];
    CHECK(o["where"].s == "setup");
    CHECK(o["device"].n == 0);
    CHECK(o["requested"].n == 60 * KiB);
    CHECK(o["held"].n == 10 * KiB);
    CHECK(o["limit"].n == 50 * KiB);
    CHECK(o["source"].s == "budget");
    CHECK(o["message"].s.find("tried to allocate 60.00 KiB") != std::string::npos);
    CHECK(j["workloads"].items[0]["ooms"].n == 0);  // no workload ran out of memory

    // Figures the failing library did not give: in the JSON as null, on the plot at the top edge.
    oom_info unknown;
    unknown.device = 0;
    unknown.requested_known = false;
    report.note_oom(out_of_memory(unknown), "load \"ckpt\"");
    j = mini_json::parse(report.json());
    REQUIRE(j["ooms_outside_steps"].items.size() == 2);
    CHECK(j["ooms_outside_steps"].items[1]["where"].s == "load \"ckpt\"");
    CHECK(j["ooms_outside_steps"].items[1]["requested"].kind == mini_json::Value::null);
    CHECK(j["ooms_outside_steps"].items[1]["held"].kind == mini_json::Value::null);
    CHECK(j["ooms_outside_steps"].items[1]["limit"].kind == mini_json::Value::null);
    CHECK(j["ooms_outside_steps"].items[1]["source"].s == "device");
    CHECK(report.timeline().ooms.back().demand == 0);
    CHECK(report.table().find("load \"ck GPU 0   asked for      unknown holding      unknown  refused by the device")
          != std::string::npos);
    CHECK(count(plot_svg(report), "stroke=\"#d62728\"") == 2 + 1);

    // A give-up is the workload's own (its row counts its OOMs): noting it adds nothing.
    try {
        a.run([&](MicroBatch const& mb) { DeviceBuffer<SimulatedDevices> act(budget, mb.size * 7 * KiB); }, [] {},
              [] {});
        FAIL("the batch fit");
    } catch (out_of_memory const& e) {
        CHECK(dynamic_cast<recovery_failed const*>(&e) != nullptr);
        report.note_oom(e);
    }
    CHECK(mini_json::parse(report.json())["ooms_outside_steps"].items.size() == 2);
    CHECK(report.timeline().ooms.size() == 2 + a.counters().ooms);
}

TEST_CASE("a trace file named by OOMGUARD_TRACE_FILE (the demo's) parses, with both kinds of event") {
    char const* path = std::getenv("OOMGUARD_TRACE_FILE");
    if (path == nullptr) return;  // set by the demo check
    std::ifstream in(path);
    REQUIRE(in.good());
    std::stringstream ss;
    ss << in.rdbuf();
    mini_json::Value j = mini_json::parse(ss.str());
    std::size_t counters = 0, instants = 0;
    for (auto const& e : j["traceEvents"].items) {
        counters += e["ph"].s == "C";
        instants += e["ph"].s == "i";
    }
    MESSAGE(path << ": " << counters << " counter and " << instants << " instant events");
    CHECK(counters > 0);
    CHECK(instants > 0);
}

TEST_CASE("a cache another thread was releasing is not counted as released again") {
    Report report;
    ReleaseReport r;
    r.caches.resize(2);
    r.caches[0].name = CacheName("ran");
    r.caches[0].bytes = 10;
    r.caches[1].name = CacheName("waited");
    r.caches[1].concurrent = true;
    report.note_release(r);
    std::string const t = report.table();
    CHECK(t.find("ran") != std::string::npos);
    CHECK(t.find("waited") == std::string::npos);
}

TEST_CASE("a report or a trace destroyed before its batch stops listening (one report per epoch)") {
    Run run;
    for (int epoch = 0; epoch < 3; ++epoch) {
        Report report;
        report.track("GPU 0", run.budget);
        report.attach(run.a, "train");
        Trace trace("");
        trace.attach(run.a, "train");
        run.go();
        CHECK(trace.events() > 0);
        if (epoch == 0) CHECK(report.plan_changes() > 0);
    }
    // Nobody listens now: a batch after every report is gone is a use after free
    // if one still did.
    run.go();
    CHECK(run.a.counters().global_batches == 4);
}

TEST_CASE("a report reads its batch as of the last event: the batch may be moved, then destroyed") {
    BatchOptions o;
    o.global_batch = 4;
    Report report;
    std::vector<AdaptiveBatch> batches;
    {
        AdaptiveBatch b(o);
        report.attach(b, "train");
        batches.push_back(std::move(b));  // the registration follows the batch
    }
    batches.reserve(8);  // and moves again
    batches[0].run([](MicroBatch const&) {}, [] {}, [] {});
    batches[0].run([](MicroBatch const&) {}, [] {}, [] {});
    std::string t = report.table();
    CAPTURE(t);
    CHECK(t.find("train           2        2") != std::string::npos);  // 2 batches, 2 micro-batches
    batches.clear();
    CHECK(report.table() == t);
    CHECK(report.json().find("\"global_batches\": 2") != std::string::npos);
}

TEST_CASE("the report's JSON: a schema version, the run's parameters and each workload's options") {
    Run run;
    Report report;
    report.track("GPU 0", run.budget);
    report.attach(run.a, "train");
    report.set_parameter("model", "mlp \"16-256-1\"");
    report.set_parameter("lr", 0.05);
    report.set_parameter("seed", 7u);
    report.set_parameter("resume", true);
    report.set_parameter("bad", std::nan(""));
    report.set_parameter("seed", std::size_t{8});  // again: replaces
    run.go();
    std::string const text = report.json();
    CHECK(text.rfind("{\n  \"schema\": 1,\n", 0) == 0);  // first, so a tool reads it before the rest
    mini_json::Value j = mini_json::parse(text);
    CHECK(j["schema"].n == Report::json_schema);
    mini_json::Value const& p = j["parameters"];
    CHECK(p.fields.size() == 5);
    CHECK(p["model"].s == "mlp \"16-256-1\"");
    CHECK(p["lr"].n == 0.05);
    CHECK(text.find("\"lr\": 0.05,") != std::string::npos);  // the shortest that reads back
    CHECK(p["seed"].n == 8);
    CHECK(p["resume"].kind == mini_json::Value::boolean);
    CHECK(p["resume"].b);
    CHECK(p["bad"].kind == mini_json::Value::null);
    CHECK(j["budgets"].items[0]["capacity"].n == 100 * KiB);
    mini_json::Value const& o = j["workloads"].items[0]["options"];
    CHECK(o["global_batch"].n == 64);
    CHECK(o["micro_batch"].n == 32);
    CHECK(o["min_micro_batch"].n == 16);
    REQUIRE(o["precisions"].items.size() == 2);
    CHECK(o["precisions"].items[1].s == "bf16");
    CHECK(o["policy"]["name"].s == "halve");
    CHECK(o["resume"].kind == mini_json::Value::boolean);
    CHECK(o["max_attempts"].n == 64);
    // Without parameters, still an object.
    Report empty;
    CHECK(mini_json::parse(empty.json())["parameters"].kind == mini_json::Value::object);
    CHECK(mini_json::parse(empty.json())["parameters"].fields.empty());
}

TEST_CASE("a commit that changes the size is a probe going up and a step down going down") {
    Plan const a{512, Precision::fp32, 0, 0}, b{513, Precision::fp32, 0, 0};
    CHECK(std::string(detail::plan_change_name(BatchEventKind::commit, a, b)) == "probe");
    CHECK(std::string(detail::plan_change_name(BatchEventKind::commit, b, a)) == "step down");
    CHECK(std::string(detail::plan_change_name(BatchEventKind::shrink, b, a)) == "shrink");
}

namespace {
// The numbers of the x and y attributes of the <text> that ends with `label`.
std::pair<double, double> text_at(std::string const& svg, std::string const& label) {
    std::size_t const end = svg.find(">" + label + "</text>");
    REQUIRE(end != std::string::npos);
    std::size_t const start = svg.rfind("<text ", end);
    std::string const tag = svg.substr(start, end - start);
    auto attr = [&](char const* name) { return std::atof(tag.c_str() + tag.find(name) + std::strlen(name)); };
    return {attr(" x=\""), attr(" y=\"")};
}
}  // namespace

TEST_CASE("the plot names the cap and the capacity beside the panel, clear of the curve, each other and the legend") {
    Timeline t;
    t.workloads.push_back("train");
    t.devices.push_back({"GPU 0", 0, 990, 1000});  // a cap a hair below the capacity: the labels would collide
    for (int i = 0; i < 20; ++i) t.memory.push_back({0.05 * i, 0, 500, 985, 0, Plan{4, Precision::fp32, 0, 0}});
    t.end = 1;
    std::string const svg = plot_svg(t);
    auto const cap = text_at(svg, "GPU 0 budget cap"), capacity = text_at(svg, "GPU 0 capacity");
    auto const legend = text_at(svg, "micro-batch peak"), oom_key = text_at(svg, "OOM (0), at its demand");
    double const panel_right = 960 - 220;  // plot_svg's W - R
    CHECK(cap.first > panel_right);        // outside the panel: the peaks run up to the cap
    CHECK(capacity.first > panel_right);
    CHECK(cap.second - capacity.second >= 14);  // the capacity above, a line of text apart
    for (double y : {cap.second, capacity.second})  // the legend's keys go below them
        CHECK((y < legend.second - 12 || y - 12 > oom_key.second));
    CHECK(legend.second > cap.second);
    // Lines low in the panel leave the legend at its top.
    Timeline low = t;
    low.devices[0] = {"GPU 0", 0, 300, 400};
    low.memory.push_back({0.99, 0, 500, 3000, 0, Plan{4, Precision::fp32, 0, 0}});
    std::string const svg2 = plot_svg(low);
    CHECK(text_at(svg2, "micro-batch peak").second < text_at(svg2, "GPU 0 capacity").second);
    CHECK(text_at(svg2, "OOM (0), at its demand").second < text_at(svg2, "GPU 0 capacity").second - 12);
}
