// Calibrate-first and the plan cache (issue 24): a workload that measures
// before its first OOM, a restart that starts at what the last run learned,
// and a cache file that survives every fault -- truncated at each byte,
// garbage, a directory, unwritable, two writers at once, SIGKILL while saving
// -- ending with a valid file or a warning, never a crash, never a lost entry
// of another workload.
#include <oomguard/adaptive_batch.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/plan_cache.hpp>
#include <oomguard/report.hpp>
#include <oomguard/simulated_devices.hpp>

#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace oomguard;
using Budget = MemoryBudget<SimulatedDevices>;
using Buffer = DeviceBuffer<SimulatedDevices>;
constexpr std::size_t KiB = 1024;

namespace {

// A scratch directory of its own, removed with everything in it.
struct Scratch {
    std::string dir;
    Scratch() {
        char tmpl[] = "/tmp/oomguard_plan_cache_XXXXXX";
        char* d = ::mkdtemp(tmpl);
        REQUIRE(d != nullptr);
        dir = d;
    }
    ~Scratch() { std::system(("rm -rf '" + dir + "'").c_str()); }
    std::string file(char const* name) const { return dir + "/" + name; }
};

std::string read_text(std::string const& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}
void write_text(std::string const& path, std::string const& text) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << text;
}

// The file parses as a plan cache; its entries' workload names.
bool valid_file(std::string const& path, std::vector<std::string>* names = nullptr) {
    std::vector<PlanCacheEntry> entries;
    std::string error;
    if (!PlanCache::from_json(read_text(path), entries, error)) return false;
    if (names != nullptr)
        for (auto const& e : entries) names->push_back(e.workload);
    return true;
}
bool has(std::vector<std::string> const& v, std::string const& x) {
    for (auto const& s : v)
        if (s == x) return true;
    return false;
}

// A step of 48 KiB fixed and 3 KiB per sample, gradients of 1 KiB per sample
// held until the commit; the result is the sum of the samples' indices (each
// counted once: the exact answer is G(G-1)/2).
struct Workload {
    SimulatedDevices gpus;
    Budget budget;
    std::size_t calls = 0;
    std::vector<std::size_t> sizes;
    std::vector<Buffer> grads;
    explicit Workload(std::size_t capacity) : gpus(1, capacity), budget(gpus, 0, Limit::unlimited()) {}

    BatchOptions options(std::size_t G) const {
        BatchOptions o;
        o.global_batch = G;
        o.policy = ShrinkPolicy::predictive();
        o.precisions = {Precision::fp32, Precision::bf16};
        o.max_attempts = 1000;
        return o;
    }
    // Runs `batches` global batches; returns the last batch's sum.
    double run(AdaptiveBatch& a, int batches) {
        double sum = 0;
        for (int b = 0; b < batches; ++b) {
            sum = a.reduce(
                       [&](MicroBatch const& mb) {
                           sizes.push_back(mb.size);
                           Buffer act(budget, 48 * KiB + 3 * KiB * mb.size);
                           grads.emplace_back(budget, KiB * mb.size);
                           double s = 0;
                           for (std::size_t i = mb.offset; i < mb.offset + mb.size; ++i) s += static_cast<double>(i);
                           return s;
                       },
                       0.0, [](double x, double y) { return x + y; }, [&] { grads.clear(); },
                       [&] { grads.clear(); })
                      .value;
        }
        return sum;
    }
};

PlanKey key(std::string workload, std::size_t memory, std::string fingerprint = "mlp v1") {
    return PlanKey{std::move(workload), DeviceIdentity{"simulated", memory, ""}, std::move(fingerprint)};
}

}  // namespace

TEST_CASE("calibrate first: measured micro-batches before any OOM, then the fitted size, the same result") {
    std::size_t const G = 1024;
    Workload w(2048 * KiB);  // the whole batch needs 48 + 4 * 1024 KiB: it does not fit
    BatchOptions o = w.options(G);
    o.start = BatchOptions::Start::calibrate;
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    CHECK(a.planner().calibration_pending());
    double const sum = w.run(a, 3);
    CHECK(sum == doctest::Approx(static_cast<double>(G) * (G - 1) / 2).epsilon(1e-12));
    CHECK(a.counters().ooms <= 1);
    CHECK(a.counters().calibrations == 2);
    REQUIRE(w.sizes.size() >= 4);
    CHECK(w.sizes[0] == 32);  // c1 = c2 / 2, twice
    CHECK(w.sizes[1] == 32);
    // c2 from what c1 measured: its peak over the batch's start, 208 KiB (the
    // second c1 holds the first's gradients: 32 + 144 + 32), scaled to the
    // 2048 KiB a step may reach, is 315; 0.75 of it (G / 16 = 64 before c1 ran).
    CHECK(w.sizes[2] == 236);
    CHECK(a.plan().micro_batch > 200);  // the fit, near what fits (~ (2048 - 48) / 4 samples, less margins)
    MESSAGE("calibrate-first: " << a.counters().ooms << " OOMs, plan m=" << a.plan().micro_batch);

    // The same with the requested start: the first OOM is how it learns.
    Workload v(2048 * KiB);
    AdaptiveBatch b(v.options(G));
    b.measure_with(v.budget);
    CHECK(v.run(b, 3) == doctest::Approx(static_cast<double>(G) * (G - 1) / 2).epsilon(1e-12));
    CHECK(b.counters().ooms >= 1);
}

TEST_CASE("calibrate first without a meter is an invalid_argument naming measure_with") {
    BatchOptions o;
    o.global_batch = 64;
    o.start = BatchOptions::Start::calibrate;
    AdaptiveBatch a(o);
    try {
        a.run([](MicroBatch const& mb) { return static_cast<double>(mb.size); });
        FAIL("no exception");
    } catch (std::invalid_argument const& e) {
        CHECK(std::string(e.what()).find("measure_with") != std::string::npos);
        CHECK(std::string(e.what()).find("calibrate") != std::string::npos);
    }
}

TEST_CASE("a too small batch to calibrate apart starts at its size; a small G still calibrates") {
    Workload w(4096 * KiB);
    BatchOptions o = w.options(16);
    o.start = BatchOptions::Start::calibrate;
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    CHECK(w.run(a, 1) == doctest::Approx(16.0 * 15 / 2));
    CHECK(w.sizes.size() == 4);  // 1, 1, 8, then the fitted size for the other 6
    CHECK(w.sizes[0] == 1);
    CHECK(w.sizes[1] == 1);
    CHECK(w.sizes[2] == 8);  // what 1 measured allows far more: half of (G + 1) at most
    Workload v(4096 * KiB);
    BatchOptions p = v.options(2);
    p.start = BatchOptions::Start::calibrate;
    AdaptiveBatch b(p);
    b.measure_with(v.budget);
    CHECK(v.run(b, 1) == doctest::Approx(1.0));
    CHECK(v.sizes == std::vector<std::size_t>{2});
}

TEST_CASE("the cache: a restart starts at the learned plan with no OOM, and the same result") {
    Scratch s;
    std::string const path = s.file("plans.json");
    std::size_t const G = 1024, memory = 2048 * KiB;
    Plan learned;
    double first_sum = 0;
    {
        Workload w(memory);
        BatchOptions o = w.options(G);
        o.start = BatchOptions::Start::calibrate;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        PlanCache cache(path);
        Report report;
        report.attach(a, "train");
        auto saving = cache.attach(a, key("train", memory));
        CHECK(report.plan_source("train") == "requested");
        first_sum = w.run(a, 4);
        learned = a.last_good_plan();
        CHECK(cache.warnings().empty());
        std::string const source = report.plan_source("train");
        CHECK((source == "calibration" || source == "recovery"));  // a probe above the fit may fail once
        CHECK(a.counters().ooms <= 1);
        CHECK(report.table().find("plans from") != std::string::npos);
    }
    std::vector<std::string> names;
    REQUIRE(valid_file(path, &names));
    CHECK(names == std::vector<std::string>{"train"});
    {
        Workload w(memory);
        BatchOptions o = w.options(G);
        o.start = BatchOptions::Start::calibrate;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        PlanCache cache(path);
        Report report;
        report.attach(a, "train");
        auto saving = cache.attach(a, key("train", memory));
        CHECK(a.restored());
        CHECK(a.plan() == learned);
        CHECK_FALSE(a.planner().calibration_pending());
        CHECK(report.plan_source("train") == "cache");
        CHECK(w.run(a, 4) == first_sum);
        CHECK(a.counters().ooms == 0);
        CHECK(a.counters().calibrations == 0);
        CHECK(report.json().find("\"plan_source\": \"cache\"") != std::string::npos);
    }
    // Another device (a different total memory), fingerprint or G: no entry, the normal start.
    for (PlanKey k : {key("train", memory * 2), key("train", memory, "mlp v2")}) {
        Workload w(memory);
        AdaptiveBatch a(w.options(G));
        a.measure_with(w.budget);
        PlanCache cache(path);
        auto saving = cache.attach(a, k);
        CHECK_FALSE(a.restored());
        CHECK(a.plan().micro_batch == G);
    }
    {
        Workload w(memory);
        AdaptiveBatch a(w.options(512));
        PlanCache cache(path);
        auto saving = cache.attach(a, key("train", memory));
        CHECK_FALSE(a.restored());
    }
}

TEST_CASE("an entry that no longer holds: an OOM at the cached plan goes down the ladder, and the entry is rewritten") {
    Scratch s;
    std::string const path = s.file("plans.json");
    std::size_t const G = 512, memory = 2048 * KiB;
    Plan first;
    {
        Workload w(memory);
        BatchOptions o = w.options(G);
        o.start = BatchOptions::Start::calibrate;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        PlanCache cache(path);
        auto saving = cache.attach(a, key("train", memory));
        w.run(a, 2);
        first = a.last_good_plan();
    }
    Workload w(memory);
    w.gpus.set_used_by_others(0, 900 * KiB);  // another process now holds part of the card
    AdaptiveBatch a(w.options(G));
    a.measure_with(w.budget);
    PlanCache cache(path);
    auto saving = cache.attach(a, key("train", memory));
    REQUIRE(a.plan() == first);
    CHECK(w.run(a, 3) == doctest::Approx(512.0 * 511 / 2));
    CHECK(a.counters().ooms >= 1);
    CHECK(a.last_good_plan().micro_batch < first.micro_batch);
    PlanCacheEntry e;
    REQUIRE(cache.find(key("train", memory), a.options(), e));
    CHECK(e.learned.plan == a.last_good_plan());
}

TEST_CASE("an entry that does not fit the options is a warning, and the batch starts as asked") {
    Scratch s;
    std::string const path = s.file("plans.json");
    Workload w(2048 * KiB);
    BatchOptions o = w.options(256);
    PlanCache cache(path);
    LearnedPlan l;
    l.plan.micro_batch = 300;  // above G
    REQUIRE(cache.save(PlanCache::make_entry(key("train", 2048 * KiB), o, l)));
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    std::vector<std::string> heard;
    auto listen = a.observe([&](BatchEvent const& e) {
        if (e.kind == BatchEventKind::plan_cache_warning) heard.push_back(e.what);
    });
    auto saving = cache.attach(a, key("train", 2048 * KiB));
    CHECK_FALSE(a.restored());
    REQUIRE(heard.size() == 1);
    CHECK(heard[0].find("300") != std::string::npos);
}

TEST_CASE("bad arguments: an empty path, an empty workload name") {
    CHECK_THROWS_AS(PlanCache(""), std::invalid_argument);
    PlanCache cache("/tmp/x.json");
    BatchOptions o;
    o.global_batch = 8;
    AdaptiveBatch a(o);
    CHECK_THROWS_AS((void)cache.attach(a, PlanKey{}), std::invalid_argument);
}

namespace {
// Two entries, "train" and "eval", as a valid file.
std::string two_entries(std::string const& path) {
    PlanCache cache(path);
    BatchOptions o;
    o.global_batch = 100;
    LearnedPlan l;
    l.plan.micro_batch = 50;
    l.model.observe(10, 1000);
    l.model.observe(20, 1800);
    l.model.bound(60, 99999);
    l.model.has_base = true;
    l.model.base = 123;
    l.model.limit = 1 << 20;
    l.model.high = 60;
    REQUIRE(cache.save(PlanCache::make_entry(key("train", 1 << 20), o, l)));
    REQUIRE(cache.save(PlanCache::make_entry(key("eval", 1 << 20), o, l)));
    return read_text(path);
}

// After a fault: the cache warns (once) or reads; a save then leaves a valid
// file holding the saved entry; nothing throws.
void survives(std::string const& path, bool expect_warning) {
    PlanCache cache(path);
    BatchOptions o;
    o.global_batch = 100;
    PlanCacheEntry e;
    bool const found = cache.find(key("train", 1 << 20), o, e);
    if (expect_warning) {
        CHECK_FALSE(found);
        CHECK(cache.warnings().size() == 1);
    }
    (void)cache.find(key("train", 1 << 20), o, e);
    CHECK(cache.warnings().size() <= 1);  // reported once
    LearnedPlan l;
    l.plan.micro_batch = 7;
    CHECK(cache.save(PlanCache::make_entry(key("other", 1 << 20), o, l)));
    std::vector<std::string> names;
    CHECK(valid_file(path, &names));
    CHECK(has(names, "other"));
}
}  // namespace

TEST_CASE("the file round-trips exactly: plan, model, ceilings") {
    Scratch s;
    std::string const path = s.file("plans.json");
    std::string const text = two_entries(path);
    std::vector<PlanCacheEntry> entries;
    std::string error;
    REQUIRE(PlanCache::from_json(text, entries, error));
    REQUIRE(entries.size() == 2);
    StepModel const& m = entries[0].learned.model;
    CHECK(entries[0].learned.plan.micro_batch == 50);
    CHECK(m.n_points == 2);
    CHECK(m.points[1].m == 20);
    CHECK(m.points[1].bytes == 1800);
    CHECK(m.n_bounds == 1);
    CHECK(m.high == 60);
    CHECK(m.base == 123);
    CHECK(m.has_base);
    CHECK(PlanCache::to_json(entries) == text);
}

TEST_CASE("faults: truncated at every byte offset, garbage, a foreign version") {
    Scratch s;
    std::string const path = s.file("plans.json");
    std::string const text = two_entries(path);
    for (std::size_t k = 0; k < text.size(); ++k) {
        CAPTURE(k);
        write_text(path, text.substr(0, k));
        // Only a cut inside the trailing white space still reads.
        bool const readable = text.find_first_not_of(" \n", k) == std::string::npos && k > 0;
        survives(path, !readable);
    }
    std::mt19937 rng(24);
    for (int trial = 0; trial < 50; ++trial) {
        std::string junk(static_cast<std::size_t>(rng() % 400), '\0');
        for (char& c : junk) c = static_cast<char>(rng());
        write_text(path, junk);
        survives(path, true);
    }
    std::string v2 = text;
    v2.replace(v2.find("\"version\": 1"), 12, "\"version\": 2");
    write_text(path, v2);
    PlanCache cache(path);
    PlanCacheEntry e;
    BatchOptions o;
    o.global_batch = 100;
    CHECK_FALSE(cache.find(key("train", 1 << 20), o, e));
    REQUIRE(cache.warnings().size() == 1);
    CHECK(cache.warnings()[0].find("version 2") != std::string::npos);
}

TEST_CASE("faults: a directory instead of the file, an unwritable place; training goes on, warned once") {
    Scratch s;
    std::string const dir_path = s.file("plans.json");
    REQUIRE(::mkdir(dir_path.c_str(), 0755) == 0);
    std::string const file = s.file("a_file");
    write_text(file, "x");
    for (std::string const& path : {dir_path, file + "/plans.json"}) {
        CAPTURE(path);
        Workload w(2048 * KiB);
        BatchOptions o = w.options(256);
        o.start = BatchOptions::Start::calibrate;
        AdaptiveBatch a(o);
        a.measure_with(w.budget);
        Report report;
        report.attach(a, "train");
        PlanCache cache(path);
        std::size_t warned = 0;
        auto count = a.observe([&](BatchEvent const& e) { warned += e.kind == BatchEventKind::plan_cache_warning; });
        auto saving = cache.attach(a, key("train", 2048 * KiB));
        CHECK(w.run(a, 4) == doctest::Approx(256.0 * 255 / 2));
        CHECK(a.counters().global_batches == 4);
        CHECK(!a.observer_error());
        CHECK(warned >= 1);
        CHECK(warned <= 2);  // the read, the write: each once
        CHECK(cache.warnings().size() == warned);
        CHECK(report.warnings().size() == warned);
        CHECK(report.json().find("plan_cache_warnings") != std::string::npos);
    }
    if (::geteuid() != 0) {  // root writes anywhere
        std::string const ro = s.file("ro");
        REQUIRE(::mkdir(ro.c_str(), 0555) == 0);
        PlanCache cache(ro + "/plans.json");
        BatchOptions o;
        o.global_batch = 8;
        CHECK_FALSE(cache.save(PlanCache::make_entry(key("x", 1), o, LearnedPlan{})));
        CHECK(cache.warnings().size() == 1);
    }
}

TEST_CASE("faults: two processes writing the same file lose no entry of each other's") {
    Scratch s;
    std::string const path = s.file("plans.json");
    pid_t kids[2];
    for (int p = 0; p < 2; ++p) {
        kids[p] = ::fork();
        REQUIRE(kids[p] >= 0);
        if (kids[p] == 0) {
            PlanCache cache(path);
            BatchOptions o;
            o.global_batch = 1000;
            bool ok = true;
            for (int i = 0; i < 150; ++i) {
                LearnedPlan l;
                l.plan.micro_batch = static_cast<std::size_t>(i + 1);
                for (int w = 0; w < 3; ++w)
                    ok = cache.save(PlanCache::make_entry(
                             key("p" + std::to_string(p) + "w" + std::to_string(w), 1 << 20), o, l)) && ok;
                // A training loop saves between batches, not back to back: a
                // process that only saves would win the lock between the
                // other's polls, and that one gives up after 2 s.
                ::usleep(1000);
            }
            std::_Exit(ok && cache.warnings().empty() ? 0 : 1);
        }
    }
    for (pid_t k : kids) {
        int status = 0;
        REQUIRE(::waitpid(k, &status, 0) == k);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
    }
    std::vector<std::string> names;
    REQUIRE(valid_file(path, &names));
    CHECK(names.size() == 6);
    for (char const* n : {"p0w0", "p0w1", "p0w2", "p1w0", "p1w1", "p1w2"}) CHECK(has(names, n));
}

TEST_CASE("faults: SIGKILL at random moments while saving, 200 runs: the old file or the new one, never less") {
    Scratch s;
    std::string const path = s.file("plans.json");
    {
        PlanCache cache(path);
        BatchOptions o;
        o.global_batch = 1000;
        LearnedPlan l;
        l.plan.micro_batch = 99;
        REQUIRE(cache.save(PlanCache::make_entry(key("other workload", 1 << 20), o, l)));
    }
    std::mt19937 rng(200);
    int killed_mid_run = 0;
    for (int run = 0; run < 200; ++run) {
        CAPTURE(run);
        pid_t kid = ::fork();
        REQUIRE(kid >= 0);
        if (kid == 0) {  // the program that saves in a loop
            PlanCache cache(path);
            BatchOptions o;
            o.global_batch = 1000;
            for (std::size_t i = 1;; ++i) {
                LearnedPlan l;
                l.plan.micro_batch = i % 1000 + 1;
                l.model.observe(i % 1000 + 1, i * 1000);
                (void)cache.save(PlanCache::make_entry(key("mine " + std::to_string(i % 4), 1 << 20), o, l));
            }
        }
        ::usleep(static_cast<useconds_t>(rng() % 3000));
        ::kill(kid, SIGKILL);
        int status = 0;
        REQUIRE(::waitpid(kid, &status, 0) == kid);
        killed_mid_run += WIFSIGNALED(status) ? 1 : 0;
        std::vector<std::string> names;
        REQUIRE(valid_file(path, &names));
        CHECK(has(names, "other workload"));
    }
    CHECK(killed_mid_run == 200);
    // And a reader after all that: one valid file, the entries it holds.
    PlanCache cache(path);
    PlanCacheEntry e;
    BatchOptions o;
    o.global_batch = 1000;
    CHECK(cache.find(key("other workload", 1 << 20), o, e));
    CHECK(e.learned.plan.micro_batch == 99);
    CHECK(cache.warnings().empty());
}

TEST_CASE("review: a plan cached for another device is ignored with a warning, and training goes on") {
    Scratch s;
    std::string const path = s.file("plans.json");
    Workload w(2048 * KiB);
    BatchOptions o = w.options(256);
    PlanCache cache(path);
    LearnedPlan l;
    l.plan.micro_batch = 64;
    l.plan.device = 7;  // a device the workload failed over to, say
    REQUIRE(cache.save(PlanCache::make_entry(key("train", 2048 * KiB), o, l)));
    AdaptiveBatch a(o);
    a.measure_with(w.budget);
    auto saving = cache.attach(a, key("train", 2048 * KiB));
    CHECK_FALSE(a.restored());
    CHECK(a.plan().device == 0);
    REQUIRE(cache.warnings().size() == 1);
    CHECK(cache.warnings()[0].find("GPU 7") != std::string::npos);
    CHECK(w.run(a, 2) == doctest::Approx(256.0 * 255.0 / 2.0));  // trains, and is rewritten for GPU 0
    PlanCacheEntry e;
    REQUIRE(cache.find(key("train", 2048 * KiB), o, e));
    CHECK(e.learned.plan.device == 0);
}

TEST_CASE("review: another version's file is left as it is; a save gives up on a lock held over 2 s") {
    Scratch s;
    std::string const path = s.file("plans.json");
    std::string v2 = two_entries(path);
    v2.replace(v2.find("\"version\": 1"), 12, "\"version\": 2");
    write_text(path, v2);
    PlanCache cache(path);
    BatchOptions o;
    o.global_batch = 100;
    LearnedPlan l;
    l.plan.micro_batch = 10;
    CHECK_FALSE(cache.save(PlanCache::make_entry(key("other", 1 << 20), o, l)));
    CHECK(read_text(path) == v2);  // a newer oomguard's cache survives an older one's save
    REQUIRE_FALSE(cache.warnings().empty());
    CHECK(cache.warnings().back().find("version 2") != std::string::npos);
    // A lock held by another open file (another process, stopped): the save gives up, warned.
    std::remove(path.c_str());
    int const held = ::open((path + ".lock").c_str(), O_RDWR | O_CREAT, 0644);
    REQUIRE(held >= 0);
    REQUIRE(::flock(held, LOCK_EX) == 0);
    PlanCache other(path);
    CHECK_FALSE(other.save(PlanCache::make_entry(key("train", 1 << 20), o, l)));
    REQUIRE_FALSE(other.warnings().empty());
    CHECK(other.warnings().back().find("cannot lock") != std::string::npos);
    ::close(held);
    CHECK(other.save(PlanCache::make_entry(key("train", 1 << 20), o, l)));  // free again: saved
}

TEST_CASE("the learned cache release: saved when it turns on, restored, and optional in the file") {
    // A cache that always holds 1 KiB and frees it: an OOM of a step that
    // began with it turns release_before_batches on at the same plan (the
    // release earns a retry at the same size), and the entry is saved again.
    Scratch s;
    std::string const path = s.file("plans.json");
    CacheRegistry reg;
    auto r = reg.add("pool", 0, [] { return KiB; }, [] { return KiB; });
    BatchOptions o;
    o.global_batch = 64;
    o.micro_batch = 32;
    o.policy = ShrinkPolicy::bisect();
    o.caches = &reg;
    bool fail = false;
    auto step = [&](MicroBatch const&) {
        if (std::exchange(fail, false)) throw out_of_memory(oom_info{});
    };
    auto entry = [&] {
        std::vector<PlanCacheEntry> entries;
        std::string error;
        REQUIRE(PlanCache::from_json(read_text(path), entries, error));
        REQUIRE(entries.size() == 1);
        return entries[0].learned;
    };
    int saves = 0;
    auto count_saves = [&saves](BatchEvent const& e) { saves += e.kind == BatchEventKind::plan_saved ? 1 : 0; };
    {
        AdaptiveBatch a(o);
        PlanCache cache(path);
        auto saving = cache.attach(a, key("train", 1 << 20));
        auto counting = a.observe(count_saves);
        a.run(step, [] {}, [] {});
        CHECK_FALSE(entry().release_before_batches);
        CHECK(saves == 1);
        fail = true;
        a.run(step, [] {}, [] {});
        CHECK(a.counters().retries_same == 1);
        CHECK(a.plan().micro_batch == 32);
        CHECK(entry().release_before_batches);
        CHECK(entry().plan.micro_batch == 32);
        CHECK(saves == 2);
        a.run(step, [] {}, [] {});
        CHECK(saves == 2);  // nothing changed: not saved again
    }
    std::string const text = read_text(path);
    {
        AdaptiveBatch a(o);
        CHECK_FALSE(a.release_before_batches());
        PlanCache cache(path);
        auto saving = cache.attach(a, key("train", 1 << 20));
        CHECK(a.restored());
        CHECK(a.release_before_batches());
        std::size_t const releases = a.counters().releases;
        saves = 0;
        auto counting = a.observe(count_saves);
        a.run(step, [] {}, [] {});
        CHECK(a.counters().releases == releases + 1);  // before the batch, with no OOM
        CHECK(a.counters().ooms == 0);
        a.run(step, [] {}, [] {});
        CHECK(saves == 0);  // what was loaded is what is learned
    }
    std::vector<PlanCacheEntry> entries;
    std::string error;
    std::string const field = ", \"release_before_batches\": true";
    REQUIRE(text.find(field) != std::string::npos);
    std::string without = text;
    without.erase(without.find(field), field.size());
    REQUIRE(PlanCache::from_json(without, entries, error));  // files written before it existed
    CHECK_FALSE(entries[0].learned.release_before_batches);
    std::string wrong = text;
    wrong.replace(wrong.find(field), field.size(), ", \"release_before_batches\": 1");
    CHECK_FALSE(PlanCache::from_json(wrong, entries, error));
    CHECK(error.find("release_before_batches is not true or false") != std::string::npos);
}
