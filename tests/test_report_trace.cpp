#include <oomguard/device_buffer.hpp>
#include <oomguard/report.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/trace.hpp>

#include "mini_json.hpp"

#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

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
    std::size_t counters = 0, instants = 0, ooms = 0;
    for (auto const& e : j["traceEvents"].items) {
        if (e["ph"].s == "C") ++counters;
        if (e["ph"].s == "i") {
            ++instants;
            if (e["name"].s == "train: oom_caught") ++ooms;
            CHECK(e.has("ts"));
        }
    }
    CHECK(counters >= 2);
    CHECK(instants >= 5);
    CHECK(ooms == 3);
    std::remove(path.c_str());
    Trace bad("/nonexistent-dir/x.json");
    CHECK_THROWS_WITH_AS(bad.write(), doctest::Contains("/nonexistent-dir/x.json"), std::runtime_error);
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
