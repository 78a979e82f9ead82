// The planner on its own: a pure state machine, so every action is pinned by a
// table of (options, the observations so far) -> the decision and the plan.
#include <oomguard/recovery_planner.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

using namespace oomguard;
using Outcome = Observation::Outcome;

namespace {
Observation done(std::size_t full = 1, std::size_t peak = 0) {  // a whole batch: one ran after its first
    Observation o;
    o.full_done = full;
    o.full_peak = peak;
    o.full_later = true;
    return o;
}
Observation oom(std::size_t planned, std::size_t full_done = 0) {
    Observation o;
    o.outcome = Outcome::step_oom;
    o.failed_size = planned;
    o.full_done = full_done;
    return o;
}
Observation released(Observation o, std::size_t bytes) {
    o.released = bytes;
    return o;
}
Observation short_remainder(Observation o) {  // the planned size's last micro-batch, 2 samples
    o.failed_short = true;
    o.failed_samples = 2;
    return o;
}
Observation within_reach(Observation o) {  // held + asked below what was available, and the device had room
    o.need = 100;
    o.available = 1000;
    o.device_had_room = true;
    return o;
}
Observation commit_oom() {
    Observation o;
    o.outcome = Outcome::commit_oom;
    o.full_done = 4;
    return o;
}
// A global batch of two micro-batches of 32, measured: the batch began over
// nothing held, and the most a micro-batch reached over that was 420 (the
// second, over the gradients the first left); the step may reach 1000 in all.
void metered_batch_of_32(RecoveryPlanner& p) {
    p.begin_batch();
    Observation o;
    o.full_done = 2;
    o.full_peak = 420;
    o.limit = 1000;
    o.first_base = 0;
    o.after_commit = 0;
    REQUIRE(p.on_attempt(o).action == PlanAction::commit);
    p.begin_batch();
}
// A metered failure of `planned` after `full_done` micro-batches, in a global
// batch that began with `base` held, needing at least `need` over it (the
// device had room).
Observation metered_oom(std::size_t planned, std::size_t full_done, std::size_t base, std::size_t need) {
    Observation o = oom(planned, full_done);
    o.first_base = base;
    o.need = need;
    o.available = 1000;
    o.limit = 1000;
    o.device_had_room = true;
    return o;
}
BatchOptions options(std::size_t G, std::size_t m = 0, std::size_t min = 1) {
    BatchOptions o;
    o.policy = ShrinkPolicy::halve();  // the table's rows are written for halving (rows set others)
    o.global_batch = G;
    o.micro_batch = m;
    o.min_micro_batch = min;
    return o;
}
BatchOptions resumed(BatchOptions o) {
    o.resume = true;
    return o;
}
BatchOptions with_precisions(BatchOptions o) {
    o.precisions = {Precision::fp32, Precision::bf16};
    return o;
}

// One row: a planner built from `opts`, prepared by `before` (which may feed it
// earlier batches), then one observation of the batch under test.
struct Row {
    char const* name;
    BatchOptions opts;
    std::function<void(RecoveryPlanner&)> before;
    Observation seen;
    PlanAction action;
    std::size_t micro_batch;
    Precision precision;
};

// Runs a global batch at the planner's plan that completes.
void clean_batch(RecoveryPlanner& p) {
    p.begin_batch();
    p.on_attempt(done());
}
}  // namespace

TEST_CASE("planner table: every action for every kind of observation") {
    auto nothing = [](RecoveryPlanner& p) { p.begin_batch(); };
    auto proven_64 = [](RecoveryPlanner& p) {  // 64 completed once, then the batch under test begins
        clean_batch(p);
        p.begin_batch();
    };
    BatchOptions const bisect_64 = [] {
        BatchOptions o = options(64);
        o.policy = ShrinkPolicy::bisect();
        return o;
    }();
    auto failed_64 = [](RecoveryPlanner& p) {  // under bisect_64: -> 32
        p.begin_batch();
        p.on_attempt(oom(64));
    };
    std::vector<Row> rows = {
        {"completed: commit, same plan", options(64), nothing, done(), PlanAction::commit, 64, Precision::fp32},
        {"OOM above the minimum, never completed: shrink by the policy (halve)", options(64), nothing, oom(64),
         PlanAction::shrink, 32, Precision::fp32},
        {"OOM, but the release freed memory: retry the same size once", options(64), nothing,
         released(oom(64), 4096), PlanAction::retry_same, 64, Precision::fp32},
        {"the release retry is used once per size", options(64),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             p.on_attempt(released(oom(64), 4096));
         },
         released(oom(64), 4096), PlanAction::shrink, 32, Precision::fp32},
        {"metered: the release freed enough for the failed need: retry the same size", options(64), nothing,
         released(metered_oom(64, 0, 100, 1000), 100), PlanAction::retry_same, 64, Precision::fp32},
        {"with resume, the release's retry is once per size and global batch, progress or not", resumed(options(64, 16)),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             REQUIRE(p.on_attempt(released(metered_oom(16, 0, 0, 1050), 100)).action == PlanAction::retry_same);
         },
         released(metered_oom(16, 1, 0, 1050), 100), PlanAction::shrink, 8, Precision::fp32},
        {"metered: the release freed too little for the failed need: no retry, shrink", options(64), nothing,
         released(metered_oom(64, 0, 100, 1000), 99), PlanAction::shrink, 32, Precision::fp32},
        {"OOM at a size that has completed: a transient, retried", options(64), proven_64, oom(64),
         PlanAction::retry_same, 64, Precision::fp32},
        {"a transient retried transient_retries times, then shrink", options(64),
         [](RecoveryPlanner& p) {
             clean_batch(p);
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(oom(64)).action == PlanAction::retry_same);
         },
         oom(64), PlanAction::shrink, 32, Precision::fp32},
        {"a short remainder fails, within reach: a transient, retried at the plan's size", options(10, 8),
         nothing, within_reach(short_remainder(oom(8, 1))), PlanAction::retry_same, 8, Precision::fp32},
        {"the remainder keeps failing within reach: its pieces shrink, the plan's size stays",
         options(10, 8),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             for (int i = 0; i < 3; ++i)
                 REQUIRE(p.on_attempt(within_reach(short_remainder(oom(8, 1)))).action == PlanAction::retry_same);
         },
         within_reach(short_remainder(oom(8, 1))), PlanAction::shrink, 8, Precision::fp32},
        {"a short remainder that fails by its own need, though 8 completed: the plan's size stays",
         options(10, 8), proven_64, short_remainder(oom(8, 1)), PlanAction::shrink, 8, Precision::fp32},
        {"at the minimum, never completed: the next precision", with_precisions(options(8, 1)), nothing, oom(1),
         PlanAction::next_precision, 1, Precision::bf16},
        {"at the minimum after it completed: transient retries, then the next precision",
         with_precisions(options(8, 1)),
         [](RecoveryPlanner& p) {
             clean_batch(p);
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(oom(1)).action == PlanAction::retry_same);
         },
         oom(1), PlanAction::next_precision, 1, Precision::bf16},
        {"ladder exhausted, no failover: give up, back at the last good plan", options(8, 1), nothing, oom(1),
         PlanAction::give_up, 1, Precision::fp32},
        {"ladder exhausted with a failover hook: fail over", options(8, 1),
         [](RecoveryPlanner& p) {
             p.allow_failover(true);
             p.begin_batch();
         },
         oom(1), PlanAction::failover, 1, Precision::fp32},
        {"the attempt limit: give up at the last good plan", [] {
             BatchOptions o = options(64);
             o.max_attempts = 2;
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             REQUIRE(p.on_attempt(oom(64)).action == PlanAction::shrink);
         },
         oom(32), PlanAction::give_up, 64, Precision::fp32},
        {"an OOM in commit at a size that completed: retried as a transient", options(64), nothing, commit_oom(),
         PlanAction::retry_same, 64, Precision::fp32},
        {"commit OOMs past the transient retries: shrink", options(64),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::retry_same);
         },
         commit_oom(), PlanAction::shrink, 32, Precision::fp32},
        {"a grow-back that fails: back to the last good plan", [] {
             BatchOptions o = options(64);
             o.grow_after = 1;
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             p.on_attempt(oom(64));  // -> 32
             p.on_attempt(done());   // commit at 32
             REQUIRE(p.begin_batch().action == PlanAction::grow_back);  // 32 -> 48
         },
         oom(48), PlanAction::shrink, 32, Precision::fp32},
        {"a restored precision that fails: back to the lower one", [] {
             BatchOptions o = with_precisions(options(8, 2, 2));
             o.restore_precision_after = 1;
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             p.on_attempt(oom(2));  // -> bf16
             p.on_attempt(done());
             REQUIRE(p.begin_batch().action == PlanAction::grow_back);  // fp32 again
             REQUIRE(p.plan().precision == Precision::fp32);
         },
         oom(2), PlanAction::shrink, 2, Precision::bf16},
        {"OOM at a size never completed, but asking less than was available: a transient, retried",
         options(64), nothing,
         [] {
             Observation o = oom(64);
             o.need = 1000;
             o.available = 4000;
             o.device_had_room = true;
             return o;
         }(),
         PlanAction::retry_same, 64, Precision::fp32},
        {"asking less than the budget had, but the device itself was full (memory held elsewhere): shrink",
         options(64), nothing,
         [] {
             Observation o = oom(64);
             o.need = 1000;
             o.available = 4000;
             o.device_had_room = false;
             return o;
         }(),
         PlanAction::shrink, 32, Precision::fp32},
        {"OOM asking more than was available: this size's need, shrink", options(64), nothing,
         [] {
             Observation o = oom(64);
             o.need = 5000;
             o.available = 4000;
             return o;
         }(),
         PlanAction::shrink, 32, Precision::fp32},
        {"with resume, a failure after progress is a fresh transient, not a repeat", [] {
             BatchOptions o = options(64, 8);
             o.resume = true;
             return o;
         }(),
         [](RecoveryPlanner& p) {
             clean_batch(p);
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(oom(8, 1)).action == PlanAction::retry_same);
         },
         oom(8, 1), PlanAction::retry_same, 8, Precision::fp32},
        {"without resume, the same failures after rolled-back progress are repeats", options(64, 8),
         [](RecoveryPlanner& p) {
             clean_batch(p);
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(oom(8, 1)).action == PlanAction::retry_same);
         },
         oom(8, 1), PlanAction::shrink, 4, Precision::fp32},
        {"resume: an OOM in commit keeps nothing, so its retries do not restart: shrink after three", [] {
             BatchOptions o = options(64);
             o.resume = true;
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::retry_same);
         },
         commit_oom(), PlanAction::shrink, 32, Precision::fp32},
        {"resume: an OOM in commit counts toward max_attempts", [] {
             BatchOptions o = options(64);
             o.resume = true;
             o.max_attempts = 2;
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::retry_same);
         },
         commit_oom(), PlanAction::give_up, 64, Precision::fp32},
        {"a commit that fails again after its one shrink: the next precision, not a second shrink",
         with_precisions(options(64)),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::retry_same);
             REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::shrink);
         },
         commit_oom(), PlanAction::next_precision, 32, Precision::bf16},
        {"a commit that fails again after its one shrink, nothing below: give up at the last good plan",
         options(64),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::retry_same);
             REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::shrink);
         },
         commit_oom(), PlanAction::give_up, 64, Precision::fp32},
        {"the commit's retries are the global batch's, not the size's: none are left after the shrink",
         options(64),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             for (int i = 0; i < 3; ++i) REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::retry_same);
             REQUIRE(p.on_attempt(commit_oom()).action == PlanAction::shrink);
             REQUIRE(p.on_attempt(oom(32, 1)).action == PlanAction::retry_same);  // 32 completed: a transient
         },
         commit_oom(), PlanAction::give_up, 64, Precision::fp32},
        {"metered: 32 completed, and fails after the first commit added an optimizer's state (the batch "
         "begins over 100 more) beyond the limit: a data point, not a transient -- shrink",
         options(64, 32), metered_batch_of_32, metered_oom(32, 1, 100, 920), PlanAction::shrink, 16,
         Precision::fp32},
        {"metered: 32 fails as a later micro-batch over gradients the first left, beyond the limit: "
         "a data point, not a transient",
         options(64, 32), metered_batch_of_32, metered_oom(32, 1, 0, 1001), PlanAction::shrink, 16,
         Precision::fp32},
        {"metered: the same size fails and its request was within the limit with room on the device: "
         "a transient (another process's burst), retried",
         options(64, 32), metered_batch_of_32, metered_oom(32, 1, 200, 420), PlanAction::retry_same, 32,
         Precision::fp32},
        {"metered: a size that never completed fails within the limit with room: a transient too",
         options(64, 32), nothing, metered_oom(32, 0, 0, 420), PlanAction::retry_same, 32, Precision::fp32},
        {"halving an odd size rounds down: 7 -> 3", options(7), nothing, oom(7), PlanAction::shrink, 3,
         Precision::fp32},
        {"halving an odd size rounds down: 63 -> 31", options(63), nothing, oom(63), PlanAction::shrink, 31,
         Precision::fp32},
        {"bisect: a success probes upward at the next batch", bisect_64, failed_64, done(), PlanAction::commit, 48,
         Precision::fp32},
        {"bisect: no probe right after a commit that added what stays (an optimizer's first step)", bisect_64,
         failed_64,
         [] {
             Observation o = done();
             o.commit_growth = 1;
             return o;
         }(),
         PlanAction::commit, 32, Precision::fp32},
        {"bisect, metered: a probe that fails by its own need goes back to the size that held, no release "
         "retry",
         [] {
             BatchOptions o = options(64);
             o.policy = ShrinkPolicy::bisect();
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             p.on_attempt(oom(64));  // -> 32 (unmeasured: no scaled ceiling)
             p.on_attempt(done());   // commit, probe 48
             p.begin_batch();
         },
         released(metered_oom(48, 1, 0, 1100), 300), PlanAction::shrink, 32, Precision::fp32},
        {"bisect, metered: a success probes no higher than the failure scaled by how far it went over",
         [] {
             BatchOptions o = options(64);
             o.policy = ShrinkPolicy::bisect();
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             p.on_attempt(metered_oom(64, 0, 0, 1280));  // -> 32; 64 * 1000 / 1280 = 50
         },
         [] {
             Observation o = done(2, 400);
             o.limit = 1000;
             o.first_base = 0;
             return o;
         }(),
         PlanAction::commit, 41, Precision::fp32},
        {"predictive: the calibration's first size held twice: the second, chosen from what it measured, runs next",
         [] {
             BatchOptions o = options(256);
             o.policy = ShrinkPolicy::predictive();
             return o;
         }(),
         [](RecoveryPlanner& p) {
             p.begin_batch();
             Observation o = metered_oom(256, 0, 0, 2660);  // calibrates at 12 (twice), floor 24
             o.limit = 1000;
             REQUIRE(p.on_attempt(o).action == PlanAction::shrink);
         },
         [] {
             Observation o = done(0);
             o.outcome = Outcome::segment_done;
             o.calibration_done = true;
             o.calibration_peak = 220;  // 12 * 1000 / 220 = 54.5, and 0.75 of it
             o.limit = 1000;
             o.first_base = 0;
             return o;
         }(),
         PlanAction::continue_batch, 40, Precision::fp32},
    };
    for (auto const& row : rows) {
        CAPTURE(std::string(row.name));
        RecoveryPlanner p(row.opts);
        row.before(p);
        Decision d = p.on_attempt(row.seen);
        CHECK(to_string(d.action) == std::string(to_string(row.action)));
        CHECK(d.to.micro_batch == row.micro_batch);
        CHECK(d.to.precision == row.precision);
        CHECK(p.plan().micro_batch == row.micro_batch);
        if (d.action == PlanAction::give_up) CHECK(p.plan() == p.last_good_plan());
    }
}

TEST_CASE("planner: failover moves to the requested plan on the new device, or gives up") {
    RecoveryPlanner p(options(32, 0, 16));
    p.allow_failover(true);
    p.begin_batch();
    REQUIRE(p.on_attempt(oom(32)).action == PlanAction::shrink);
    REQUIRE(p.on_attempt(oom(16)).action == PlanAction::failover);
    Decision d = p.failed_over(3);
    CHECK(d.action == PlanAction::failover);
    CHECK(d.to.device == 3);
    CHECK(d.to.micro_batch == 32);
    CHECK(p.attempt().number == 3);
    CHECK(p.on_attempt(done()).action == PlanAction::commit);
    CHECK(p.last_good_plan().device == 3);

    CHECK_THROWS_WITH_AS(p.failed_over(1), doctest::Contains("none is pending"), std::logic_error);
    CHECK_THROWS_AS(p.no_failover(), std::logic_error);

    RecoveryPlanner q(options(32, 16, 16));
    q.allow_failover(true);
    q.begin_batch();
    REQUIRE(q.on_attempt(oom(16)).action == PlanAction::failover);
    CHECK_THROWS_WITH_AS(q.failed_over(-7), doctest::Contains("failed_over(-7)"), std::invalid_argument);
    Decision g = q.no_failover();
    CHECK(g.action == PlanAction::give_up);
    CHECK(std::string(g.why).find("no other device") != std::string::npos);
    CHECK(q.plan().device == 0);
}

TEST_CASE("planner: a failed size that is not a planned size of the attempt is a bad input") {
    RecoveryPlanner p(options(10, 8));
    p.begin_batch();
    CHECK_THROWS_WITH_AS(p.on_attempt(oom(2)), doctest::Contains("failed size 2 is not a planned size"),
                         std::invalid_argument);
    CHECK_THROWS_AS(p.on_attempt(oom(0)), std::invalid_argument);
}

// The calibration cases' step: 100 KiB + 10 KiB a sample over what the batch
// began with, 1000 KiB in all (the best size is 90), under predictive(0.02).
std::size_t line_kib(std::size_t m) { return (100 + 10 * m) * 1024; }
BatchOptions predictive_256() {
    BatchOptions o = options(256);
    o.policy = ShrinkPolicy::predictive(0.02);
    return o;
}
Observation over_nothing(Observation o) {  // measured over nothing held, all 1000 KiB a step's
    o.limit = 1000 * 1024;
    o.first_base = 0;
    return o;
}
Observation oom_at_256() {  // needing at least line_kib(256) with 1000 KiB available: calibrates at 12
    Observation o = oom(256);
    o.need = line_kib(256);
    o.available = 1000 * 1024;
    return o;
}
Observation c1_held() {  // the calibration's first size, 12, ran twice
    Observation o = done(0);
    o.outcome = Outcome::segment_done;
    o.calibration_done = true;
    o.calibration_peak = line_kib(12);
    return over_nothing(o);
}
Observation c2_held() {  // its second, 40, ran once
    Observation o = done(1, line_kib(40));
    o.outcome = Outcome::segment_done;
    return over_nothing(o);
}

TEST_CASE("planner: a calibration size that held twice is proven: a failure below it with no figure is transient") {
    // c1 = 12 peaks at 700 KiB of the 1000 a step can reach: the second size
    // goes below it, to 6. An OOM there with no need measured (libtorch's own
    // OOMs carry none) is no ceiling under a size that just held twice.
    RecoveryPlanner p(predictive_256());
    p.begin_batch();
    REQUIRE(p.on_attempt(oom_at_256()).to.micro_batch == 24);
    Observation c1 = c1_held();
    c1.calibration_peak = 700 * 1024;
    Decision d = p.on_attempt(c1);
    REQUIRE(d.to.micro_batch == 6);
    CHECK(p.proven() == 12);
    d = p.on_attempt(oom(6));
    CHECK(d.action == PlanAction::retry_same);
    CHECK(d.to.micro_batch == 6);
    CHECK(p.model().high != 6);
}

TEST_CASE("planner: predictive calibrates inside the retried batch, then jumps at the next") {
    RecoveryPlanner p(predictive_256());
    p.begin_batch();
    Decision d = p.on_attempt(oom_at_256());
    REQUIRE(d.action == PlanAction::shrink);
    // A quarter of what the failure's bound allows, 256 * 1000 / (4 * 2660) = 24,
    // and half of it: small enough to fit when 256 was far too big.
    CHECK(p.attempt().calibration == 12);
    CHECK(p.attempt().plan.micro_batch == 24);
    CHECK(p.attempt().segment == 2);  // 12 twice (first, and over what the first left), then look again
    CHECK(p.attempt().planned(0) == 12);
    CHECK(p.attempt().planned(1) == 12);
    d = p.on_attempt(c1_held());
    CHECK(d.action == PlanAction::continue_batch);
    CHECK(d.from.micro_batch == 24);
    // The second size from what 12 measured: 12's 220 KiB scaled through the
    // origin to 1000 KiB allows 54 (its fixed 100 KiB makes that an under-
    // estimate of the 90 that fit); 0.75 of it, under half of what the
    // failure's bound allows (256 * 1000 / 2660 / 2 = 48).
    CHECK(d.to.micro_batch == 40);
    CHECK(p.attempt().number == 2);   // the same attempt goes on: nothing failed
    CHECK(p.attempt().segment == 1);  // one micro-batch at 40, then look again
    CHECK(p.attempt().calibration == 0);
    d = p.on_attempt(c2_held());
    CHECK(d.action == PlanAction::continue_batch);
    CHECK(d.from.micro_batch == 40);
    // (1000 * 0.98 - 100) / (10 * (1 + 2 * 4 %)): two points cannot tell their
    // scatter, so the fit assumes real steps' 4 % until a third point does.
    CHECK(d.to.micro_batch == 81);
    CHECK(p.attempt().number == 2);
    CHECK(p.attempt().segment == 0);  // to the end of the global batch
    CHECK(p.attempt().calibration == 0);
    d = p.on_attempt(done(2, line_kib(81)));
    CHECK(d.action == PlanAction::commit);
    CHECK(p.last_good_plan().micro_batch == 81);
    // Three points on one line: no scatter left, so the next batch starts at
    // (1000 * 0.98 - 100) / 10 = 88.
    CHECK(d.to.micro_batch == 88);
}

TEST_CASE("predictive: the calibration's second size comes from what the first measured, within its caps") {
    ShrinkPolicy const pol = ShrinkPolicy::predictive(0.02);
    StepModel m;
    m.observe(12, 220 * 1024);  // c1 = 12 measured: 100 KiB fixed + 10 KiB a sample
    ShrinkContext ctx;
    ctx.failed = 256;
    ctx.minimum = 1;
    ctx.available_bytes = 1000 * 1024;
    // 12 * 1000 / 220 = 54.5 through the origin (90 fit: the fixed cost makes it
    // an under-estimate); 0.75 of it.
    CHECK(pol.second_calibration(ctx, m, 12, 24) == 40);
    SUBCASE("at most half the failed (or requested) size") {
        ctx.failed = 61;
        CHECK(pol.second_calibration(ctx, m, 12, 24) == 30);
        ctx.failed = 81;
        CHECK(pol.second_calibration(ctx, m, 12, 24) == 40);  // 40.5: the scaled size is the smaller
    }
    SUBCASE("at most half of what the failed size's own bound allows") {
        m.bound(256, 4000 * 1024);  // 256 needed at least 4000 KiB: no more than 64 fit
        CHECK(pol.second_calibration(ctx, m, 12, 24) == 32);
        StepModel other;
        other.observe(12, 220 * 1024);
        other.bound(300, 4000 * 1024);  // another size's bound says nothing of this failure
        CHECK(pol.second_calibration(ctx, other, 12, 24) == 40);
    }
    SUBCASE("not below the floor, which is all there is without a measurement") {
        CHECK(pol.second_calibration(ctx, m, 12, 41) == 41);
        CHECK(pol.second_calibration(ctx, m, 12, 54) == 54);
        CHECK(pol.second_calibration(ctx, m, 13, 24) == 24);  // 13 was not measured
        ctx.available_bytes = 0;
        CHECK(pol.second_calibration(ctx, m, 12, 24) == 24);
        CHECK(pol.second_calibration(ctx, StepModel{}, 0, 24) == 24);
    }
    SUBCASE("a floor past where c1's peak scaled to the reach fits: that estimate instead") {
        CHECK(pol.second_calibration(ctx, m, 12, 55) == 54);  // 54.5
        CHECK(pol.second_calibration(ctx, m, 12, 200) == 54);
    }
    SUBCASE("under 1.5 c1 (c1 fills two thirds of the reach): c1 / 2, a point below it") {
        StepModel near;
        near.observe(12, 600 * 1024);  // scaled to the reach: 20; 0.75 of it 15
        CHECK(pol.second_calibration(ctx, near, 12, 18) == 18);  // 1.5 c1 exactly: kept
        CHECK(pol.second_calibration(ctx, near, 12, 17) == 6);
        CHECK(pol.second_calibration(ctx, near, 12, 1) == 6);  // 15
        ctx.minimum = 6;
        CHECK(pol.second_calibration(ctx, near, 12, 17) == 6);
        ctx.minimum = 7;  // no room below c1: the larger point, though close
        CHECK(pol.second_calibration(ctx, near, 12, 17) == 17);
        CHECK(pol.second_calibration(ctx, near, 12, 1) == 15);
        StepModel full;
        full.observe(12, 1000 * 1024);  // c1 fills the reach: nothing above it is measured to fit
        CHECK(pol.second_calibration(ctx, full, 12, 17) == 13);  // the nearest size above, not the floor
    }
}

TEST_CASE("planner: a transient OOM at the calibration's first size runs it again, then still chooses the second") {
    BatchOptions const o = predictive_256();
    RecoveryPlanner p(o);
    p.begin_batch();
    Observation const first = oom_at_256();
    REQUIRE(p.on_attempt(first).action == PlanAction::shrink);
    REQUIRE(p.attempt().calibration == 12);
    REQUIRE(p.attempt().segment == 2);
    // The second micro-batch at 12 fails with what it held and asked for well
    // within reach: a transient, retried as the same segment.
    Observation blip = over_nothing(oom(12));
    blip.need = 300 * 1024;
    Decision d = p.on_attempt(blip);
    CHECK(d.action == PlanAction::retry_same);
    CHECK(p.attempt().calibration == 12);
    CHECK(p.attempt().segment == 2);
    CHECK(p.attempt().plan.micro_batch == 24);  // the floor of the second size, until 12 is measured
    d = p.on_attempt(c1_held());
    CHECK(d.action == PlanAction::continue_batch);
    CHECK(d.to.micro_batch == 40);
    CHECK(p.attempt().segment == 1);
    // A short remainder as c2's one micro-batch ends the batch: c2 stays the
    // plan, so the next batch measures it (at 12 there would be one point).
    RecoveryPlanner r(o);
    r.begin_batch(60);
    REQUIRE(r.on_attempt(first).action == PlanAction::shrink);
    REQUIRE(r.on_attempt(c1_held()).to.micro_batch == 40);
    d = r.on_attempt(over_nothing(done(0)));
    CHECK(d.action == PlanAction::commit);
    CHECK(d.to.micro_batch == 40);
    // A short global batch that the calibration's first size ended: that size is the plan.
    RecoveryPlanner q(o);
    q.begin_batch(20);
    REQUIRE(q.on_attempt(first).action == PlanAction::shrink);
    Observation ended = done(0);
    ended.calibration_done = true;
    ended.calibration_peak = line_kib(12);
    d = q.on_attempt(ended);
    CHECK(d.action == PlanAction::commit);
    CHECK(d.to.micro_batch == 12);
}

// A predictive planner that calibrated after an OOM at 256 and committed its
// first batch at 81, with the commit's observation `c`; the step needs
// 100 KiB + 10 KiB a sample over what the batch began with, 1000 KiB in all.
Decision first_commit(Observation c, StepModel* model = nullptr) {
    RecoveryPlanner p(predictive_256());
    p.begin_batch();
    REQUIRE(p.on_attempt(oom_at_256()).action == PlanAction::shrink);
    REQUIRE(p.on_attempt(c1_held()).to.micro_batch == 40);
    REQUIRE(p.on_attempt(c2_held()).to.micro_batch == 81);
    c.full_done = 2;
    c.full_peak = line_kib(81);
    c.full_later = true;
    Decision const d = p.on_attempt(over_nothing(c));
    if (model != nullptr) *model = p.model();
    return d;
}

TEST_CASE("planner: the first commit that adds optimizer state plans the next batch over it, not into an OOM") {
    // Without growth, three points on one line: (1000 * 0.98 - 100) / 10 = 88.
    CHECK(first_commit(Observation{}).to.micro_batch == 88);
    Observation c;
    c.commit_growth = 0;
    CHECK(first_commit(c).to.micro_batch == 88);
    SUBCASE("the commit added 100 KiB (Adam's moments): the next batch is planned over them") {
        c.commit_growth = 100 * 1024;
        c.after_commit = 100 * 1024;
        Decision d = first_commit(c);
        CHECK(d.action == PlanAction::commit);
        CHECK(d.to.micro_batch == 78);  // (980 - 100 - 100) / 10
        CHECK(d.from.micro_batch == 81);
    }
    SUBCASE("gradients kept across the commit count once: over the commit's growth, not all it left held") {
        c.commit_growth = 100 * 1024;
        c.after_commit = 400 * 1024;  // 300 KiB of them were held before the commit too
        CHECK(first_commit(c).to.micro_batch == 78);  // not (980 - 100 - 400) / 10 = 48
    }
    SUBCASE("a size the line still puts within the limit itself is not planned down for a margin") {
        // (Any growth makes the raise to 88 wait a batch: 81 has not run over it yet.)
        c.commit_growth = 20 * 1024;  // 20 + 100 + 880 = 1000 KiB at 88: the raise waits, 81 stays
        StepModel after;
        CHECK(first_commit(c, &after).to.micro_batch == 81);
        CHECK(after.predicted == 0);  // 81 has run: no prediction is pending
        CHECK(first_commit(Observation{}, &after).to.micro_batch == 88);
        CHECK(after.predicted == 88);
        c.commit_growth = 90 * 1024;  // 90 + 100 + 810 = 1000 KiB at 81: exactly the limit
        CHECK(first_commit(c).to.micro_batch == 81);
        c.commit_growth = 91 * 1024;  // 1 KiB over at 81: planned down under the margin, (980 - 100 - 91) / 10
        CHECK(first_commit(c).to.micro_batch == 78);
    }
    SUBCASE("a size the line puts over the limit without any growth is not planned down for one") {
        // A concave step, 100 + 12 m - 0.02 m^2 KiB, measured at 12, 40, 60
        // and 81; 81 runs at 940.8 KiB under 942, where the line through the
        // four points (which overshoots at its ends) puts it over 942: the
        // line's misfit at an edge size, not the growth, is what says so.
        BatchOptions o = options(256);
        o.policy = ShrinkPolicy::bisect();
        RecoveryPlanner p(o);
        LearnedPlan l;
        l.plan = p.plan();
        l.plan.micro_batch = 81;
        auto concave = [](double m) { return static_cast<std::size_t>((100 + 12 * m - 0.02 * m * m) * 1024); };
        for (double m : {12.0, 40.0, 60.0}) l.model.observe(static_cast<std::size_t>(m), concave(m));
        l.model.limit = 942 * 1024;
        l.model.has_base = true;
        p.restore(l);
        p.begin_batch();
        Observation held = done(2, concave(81));
        held.limit = 942 * 1024;
        held.first_base = 0;
        held.commit_growth = 1024;
        StepModel line = p.model();
        line.observe(81, concave(81));
        StepModel::Line const f = line.fit();
        REQUIRE(f.a + f.b * 81 > 942.0 * 1024);  // the line's misfit: over the limit before any growth
        CHECK(p.on_attempt(held).to.micro_batch == 81);
    }
    SUBCASE("never below the size that held scaled by what the growth leaves of the reach") {
        // 500 KiB: the line allows (980 - 500 - 100) / 10 = 38. The floor is
        // 81, the size that held, scaled by what the growth leaves of the
        // reach: 81 * 500 / 1000 = 40 (88, a raise that never held, scales
        // nothing: not 44). No line plans below it before a failure says so.
        c.commit_growth = 500 * 1024;
        CHECK(first_commit(c).to.micro_batch == 40);
        c.commit_growth = 1000 * 1024;  // all of the reach: the line cannot plan it; the failure will
        CHECK(first_commit(c).to.micro_batch == 81);  // (and the raise to 88 waits a batch)
    }
}

TEST_CASE("planner: a give-up or an abandoned batch leaves no half-made recovery state") {
    BatchOptions o = options(64);
    o.max_attempts = 3;
    RecoveryPlanner p(o);
    clean_batch(p);  // 64 proven
    p.begin_batch();
    REQUIRE(p.on_attempt(oom(64)).action == PlanAction::retry_same);
    REQUIRE(p.on_attempt(oom(64)).action == PlanAction::retry_same);
    REQUIRE(p.on_attempt(oom(64)).action == PlanAction::give_up);
    CHECK(p.plan().micro_batch == 64);
    // The next batch starts afresh: attempt 1, all three transient retries available.
    p.begin_batch();
    CHECK(p.attempt().number == 1);
    for (int i = 0; i < 2; ++i) CHECK(p.on_attempt(oom(64)).action == PlanAction::retry_same);
    CHECK(p.on_attempt(done()).action == PlanAction::commit);

    RecoveryPlanner q(options(64));
    q.begin_batch();
    REQUIRE(q.on_attempt(oom(64)).action == PlanAction::shrink);
    CHECK(q.plan().micro_batch == 32);
    q.abandon();
    CHECK(q.plan().micro_batch == 64);
    CHECK(q.attempt().number == 1);
}

TEST_CASE("planner: the grow-back ceiling expires once reached, so one transient failure cannot cap growth") {
    BatchOptions o = options(64);
    o.grow_after = 1;
    RecoveryPlanner p(o);
    p.begin_batch();
    p.on_attempt(oom(64));  // -> 32
    p.on_attempt(done());
    REQUIRE(p.begin_batch().action == PlanAction::grow_back);  // 48
    p.on_attempt(oom(48));                                     // a transient: back to 32, ceiling 48
    p.on_attempt(done());
    CHECK(p.grow_ceiling() == 48);
    std::size_t largest = 0;
    for (int i = 0; i < 40; ++i) {
        p.begin_batch();
        p.on_attempt(done());
        if (p.last_good_plan().micro_batch > largest) largest = p.last_good_plan().micro_batch;
    }
    CHECK(largest == 64);
    CHECK(p.plan().micro_batch == 64);
}

TEST_CASE("planner: the precision comes back after clean batches even with grow_after = 0") {
    BatchOptions o = with_precisions(options(8, 4, 4));
    o.restore_precision_after = 5;
    RecoveryPlanner p(o);
    p.begin_batch();
    REQUIRE(p.on_attempt(oom(4)).action == PlanAction::next_precision);
    p.on_attempt(done());
    for (int i = 0; i < 4; ++i) {
        CHECK(p.begin_batch().action == PlanAction::keep);
        p.on_attempt(done());
    }
    Decision d = p.begin_batch();
    CHECK(d.action == PlanAction::grow_back);
    CHECK(d.to.precision == Precision::fp32);
    CHECK(d.to.micro_batch == 4);  // 4 bf16 samples' bytes hold 2 fp32 ones, but never below the minimum
    p.on_attempt(done());
    CHECK(p.last_good_plan().precision == Precision::fp32);

    o.restore_precision_after = 0;  // never
    RecoveryPlanner q(o);
    q.begin_batch();
    q.on_attempt(oom(4));
    q.on_attempt(done());
    for (int i = 0; i < 50; ++i) {
        CHECK(q.begin_batch().action == PlanAction::keep);
        q.on_attempt(done());
    }
    CHECK(q.plan().precision == Precision::bf16);
}

TEST_CASE("planner: a calibration segment cut short by the remainder leaves the measured calibration size") {
    BatchOptions o = options(40);
    o.policy = ShrinkPolicy::predictive(0.02);
    RecoveryPlanner p(o);
    p.begin_batch();
    Observation first = oom(40);
    first.available = 1000;
    REQUIRE(p.on_attempt(first).action == PlanAction::shrink);
    REQUIRE(p.attempt().calibration == 2);  // 40 / 16 and 40 / 8 -> 2 and 5
    REQUIRE(p.attempt().plan.micro_batch == 5);
    // Only the calibration micro-batch and short ones completed: 5 was never measured.
    Observation cut;
    cut.calibration_done = true;
    cut.calibration_peak = 200;
    cut.available = 1000;
    Decision d = p.on_attempt(cut);
    CHECK(d.action == PlanAction::commit);
    CHECK(d.to.micro_batch == 2);
}

TEST_CASE("a grow-back after a failed one aims at the midpoint below the failed ceiling") {
    BatchOptions o = options(65);
    o.grow_after = 1;
    RecoveryPlanner p(o);
    p.begin_batch();
    REQUIRE(p.on_attempt(oom(65)).action == PlanAction::shrink);  // 65 -> 32
    REQUIRE(p.on_attempt(done()).action == PlanAction::commit);
    Decision g = p.begin_batch();
    REQUIRE(g.action == PlanAction::grow_back);
    CHECK(g.to.micro_batch == 49);  // 32 + (65 - 32 + 1) / 2
    REQUIRE(p.on_attempt(oom(49)).action == PlanAction::shrink);
    CHECK(p.plan().micro_batch == 32);
    CHECK(p.grow_ceiling() == 49);
    // The wait doubles (plus one): 3 clean batches before the next grow-back.
    for (int i = 0; i < 3; ++i) {
        REQUIRE(p.begin_batch().action == PlanAction::keep);
        REQUIRE(p.on_attempt(done()).action == PlanAction::commit);
    }
    g = p.begin_batch();
    REQUIRE(g.action == PlanAction::grow_back);
    CHECK(g.to.micro_batch == 40);  // 32 + (48 - 32 + 1) / 2: below the ceiling, rounded down
}

TEST_CASE("predictive: points that are no line (scatter past max_scatter) leave the search to bisection") {
    // 10, 20 and 30 samples at 10 bytes each; 40 at 480 (the line through the
    // four strays 19 % at 10) or at 520 (32 %: a caching allocator's segment
    // in one peak, not the step). Past StepModel::max_scatter, 25 %, the fit
    // cannot tell, and the policy bisects instead of planning from it.
    for (std::size_t y : {480u, 520u}) {
        CAPTURE(y);
        StepModel m;
        m.observe(10, 100);
        m.observe(20, 200);
        m.observe(30, 300);
        m.observe(40, y);
        m.limit = 1000;
        m.has_base = true;
        StepModel::Line const l = m.fit();
        bool const line = y == 480;
        CHECK(l.ok == line);
        CHECK(l.scatter == doctest::Approx(line ? 0.1905 : 0.3158).epsilon(1e-3));
        std::size_t out = 0;
        CHECK(m.largest_fitting(0, 1000, 1, 0.02, false, out) == line);
        ShrinkContext ctx;
        ctx.failed = 100;
        ctx.minimum = 1;
        ctx.available_bytes = 1000;
        ShrinkPolicy::Next const n = ShrinkPolicy::predictive(0.02).after_failure(ctx, m);
        CHECK(n.predicted == line);
        if (!line) CHECK(n.size == 50);  // nothing held since the search began: halve
    }
}

TEST_CASE("predictive: the fitted line is raised above what a failed size was seen to need") {
    StepModel model;
    model.observe(10, 200);  // a + b*m = 100 + 10*m
    model.observe(20, 300);
    model.bound(40, 1200);   // 40 needed at least 1200: the slope is at least (1200 - 100) / 40
    model.has_base = true;
    model.base = 0;
    model.limit = 1000;
    ShrinkContext ctx;
    ctx.failed = 40;
    ctx.minimum = 1;
    ctx.requested = 64;
    ctx.available_bytes = 1000;
    ctx.global_batch = 64;
    ShrinkPolicy::Next next = ShrinkPolicy::predictive(0.0).after_failure(ctx, model);
    CHECK(next.predicted);
    CHECK(next.size >= 1);
    CHECK(next.size <= 32);  // (1000 - 100) / 27.5 = 32.7; the unraised line would allow 39
}

TEST_CASE("planner: a short remainder that fails runs in halves; the plan's size stays, with or without a meter") {
    RecoveryPlanner p(options(10, 8));
    p.begin_batch();
    Decision d = p.on_attempt(short_remainder(oom(8, 1)));  // 8 completed, the 2-sample tail failed
    CHECK(d.action == PlanAction::shrink);
    CHECK(d.to.micro_batch == 8);
    CHECK(p.attempt().plan.micro_batch == 8);
    CHECK(p.attempt().tail == 1);
    // The pieces hold: the next global batch runs at 8 again, its remainder in
    // the same pieces (every batch of this plan ends with the same remainder:
    // it is not failed again in each), until the plan changes.
    d = p.on_attempt(done(1));
    CHECK(d.action == PlanAction::commit);
    CHECK(d.to.micro_batch == 8);
    p.begin_batch();
    CHECK(p.attempt().tail == 1);
    p.reset();
    p.begin_batch();
    CHECK(p.attempt().tail == 0);
    // A one-sample remainder cannot be split: the ladder goes below the sizes.
    RecoveryPlanner q(options(9, 8));
    q.begin_batch();
    Observation one = oom(8, 1);
    one.failed_short = true;
    one.failed_samples = 1;
    CHECK(q.on_attempt(one).action == PlanAction::give_up);
    CHECK(q.plan().micro_batch == 8);
}

TEST_CASE("planner: with resume, bisection's failed search steps inside the batch are not charged to max_attempts") {
    // A step that fits up to 20 samples; G = 64; max_attempts = 3. Bisection
    // searches inside the batch: 64 fails (charged), then search steps that fail
    // by their own need narrow the range for free, and the batch commits.
    BatchOptions o = options(64);
    o.policy = ShrinkPolicy::bisect();
    o.resume = true;
    o.max_attempts = 3;
    RecoveryPlanner p(o);
    std::size_t const fits = 20;
    for (int batch = 0; batch < 3; ++batch) {
        CAPTURE(batch);
        p.begin_batch();
        std::size_t done = 0;
        PlanAction last = PlanAction::keep;
        for (int guard = 0; guard < 100 && last != PlanAction::commit && last != PlanAction::give_up; ++guard) {
            Attempt const at = p.attempt();
            Observation ob;
            std::size_t off = done, idx = 0;
            bool failed = false;
            while (off < 64 && (at.segment == 0 || idx < at.segment)) {
                std::size_t const planned = at.planned(idx), n = planned < 64 - off ? planned : 64 - off;
                if (n > fits) {
                    failed = true;
                    ob.failed_size = planned;
                    ob.failed_short = n < planned;
                    ob.failed_samples = n;
                    break;
                }
                if (n == planned) ++ob.full_done;
                off += n;
                ++idx;
            }
            ob.outcome = failed ? Outcome::step_oom : off >= 64 ? Outcome::completed : Outcome::segment_done;
            done = off;
            last = p.on_attempt(ob).action;
        }
        REQUIRE(last == PlanAction::commit);
        CHECK(p.last_good_plan().micro_batch <= fits);
    }
    CHECK(p.plan().micro_batch >= 16);
}

namespace {
// Bisection over a global batch of 64 whose first size, 64, failed: the plan is 32.
RecoveryPlanner bisect_after_64_failed() {
    BatchOptions o = options(64);
    o.policy = ShrinkPolicy::bisect();
    RecoveryPlanner p(o);
    p.begin_batch();
    REQUIRE(p.on_attempt(oom(64)).to.micro_batch == 32);
    return p;
}
}  // namespace

TEST_CASE("planner: a probe waits one batch after a commit that added what stays, then goes ahead") {
    // 64 fails, 32 commits adding state (Adam's moments): 32 has not run over
    // them yet, so the next batch runs 32 again; after that commit (nothing
    // added) the probe to 48 comes. An unmeasured growth changes nothing.
    RecoveryPlanner p = bisect_after_64_failed();
    Observation grew = done();
    grew.commit_growth = 4096;
    Decision d = p.on_attempt(grew);
    REQUIRE(d.action == PlanAction::commit);
    CHECK(d.to.micro_batch == 32);
    p.begin_batch();
    Observation still = done();
    still.commit_growth = 0;
    d = p.on_attempt(still);
    CHECK(d.to.micro_batch == 48);
    // A commit that adds a little every batch (a loss kept for logging): the
    // probe waits one batch, never two in a row.
    RecoveryPlanner g = bisect_after_64_failed();
    CHECK(g.on_attempt(grew).to.micro_batch == 32);
    g.begin_batch();
    CHECK(g.on_attempt(grew).to.micro_batch == 48);
    g.begin_batch();
    CHECK(g.on_attempt(grew).to.micro_batch == 48);  // 48 held: its probe waits once
    g.begin_batch();
    CHECK(g.on_attempt(grew).to.micro_batch == 56);  // and then goes ahead
    RecoveryPlanner q = bisect_after_64_failed();
    Observation unknown = done();
    unknown.commit_growth = Observation::unknown;
    CHECK(q.on_attempt(unknown).to.micro_batch == 48);
}

TEST_CASE("planner: a size raised above one that held (a probe) fails by its own need: back to the size that held") {
    // Bisection: 64 fails, 32 commits and the next batch probes 48. When 48
    // fails, the plan goes back to 32 (one failure per raise), not down
    // through the gap to 40, 36, ... each of which fails when 32 was the best.
    RecoveryPlanner p = bisect_after_64_failed();
    Decision d = p.on_attempt(done());
    REQUIRE(d.action == PlanAction::commit);
    REQUIRE(d.to.micro_batch == 48);  // the probe, at the next batch's start
    p.begin_batch();
    d = p.on_attempt(oom(48));
    CHECK(d.action == PlanAction::shrink);
    CHECK(d.to.micro_batch == 32);
    CHECK(p.model().high == 48);
    // 32 holds; the next probe bisects the gap that is left: 40.
    d = p.on_attempt(done());
    CHECK(d.to.micro_batch == 40);
    // A size that was not raised (the first failure of the search) still bisects.
    RecoveryPlanner q = bisect_after_64_failed();
    CHECK(q.on_attempt(oom(32)).to.micro_batch == 16);
}

TEST_CASE("planner: a short batch's lone micro-batch at the plan's size is a bound, not the size's point") {
    // G = 64 at 32: the full batches' point for 32 holds what the first
    // micro-batch left (620). A GlobalBatch{32} runs 32 alone (320): it must
    // not replace that point, or the fit under-predicts the full batches.
    BatchOptions o = options(64, 32);
    RecoveryPlanner p(o);
    p.begin_batch();
    Observation full;
    full.full_done = 2;
    full.full_peak = 620;
    full.full_later = true;
    full.limit = 1000;
    full.first_base = 0;
    REQUIRE(p.on_attempt(full).action == PlanAction::commit);
    REQUIRE(p.model().n_points == 1);
    p.begin_batch(32);
    Observation lone;
    lone.full_done = 1;
    lone.full_peak = 320;
    lone.limit = 1000;
    lone.first_base = 0;
    REQUIRE(p.on_attempt(lone).action == PlanAction::commit);
    REQUIRE(p.model().n_points == 1);
    CHECK(p.model().points[0].m == 32);
    CHECK(p.model().points[0].bytes == 620);
    // The whole global batch in one micro-batch is a point: nothing is held over it.
    RecoveryPlanner q(options(32, 32));
    q.begin_batch();
    REQUIRE(q.on_attempt(lone).action == PlanAction::commit);
    CHECK(q.model().n_points == 1);
}

TEST_CASE("planner: a raised size that fails by its own need goes back at once, with no retry after a release") {
    // Bisection, metered (limit 1000, nothing held under the batch): 64 fails
    // needing 1100, 32 commits, the next batch probes 45 (bisecting up to
    // 64 * 1000 / 1100 = 58, where that failure scaled puts the limit). The
    // probe fails needing 1100 while the release freed 300 (1100 - 300 would
    // fit): the size that held needs no release, so the probe costs one OOM, not two.
    BatchOptions o = options(64);
    o.policy = ShrinkPolicy::bisect();
    RecoveryPlanner p(o);
    p.begin_batch();
    REQUIRE(p.on_attempt(metered_oom(64, 0, 0, 1100)).to.micro_batch == 32);
    Observation good = done(2, 420);
    good.limit = 1000;
    good.first_base = 0;
    Decision d = p.on_attempt(good);
    REQUIRE(d.action == PlanAction::commit);
    REQUIRE(d.to.micro_batch == 45);
    p.begin_batch();
    d = p.on_attempt(released(metered_oom(45, 1, 0, 1100), 300));
    CHECK(d.action == PlanAction::shrink);
    CHECK(d.to.micro_batch == 32);
    CHECK(p.model().high == 45);
    // The size that held, failing by its own need, still gets its retry after a release.
    d = p.on_attempt(released(metered_oom(32, 1, 0, 1100), 300));
    CHECK(d.action == PlanAction::retry_same);
    CHECK(d.to.micro_batch == 32);
}

namespace {
// A predictive planner restored at 64 with a line of 12.5 bytes a sample
// (16 -> 200, 32 -> 400) under a limit of 1000 over nothing held.
RecoveryPlanner restored_at_64(ShrinkPolicy policy) {
    BatchOptions o = options(256, 128);
    o.policy = policy;
    RecoveryPlanner p(o);
    LearnedPlan l;
    l.plan = p.plan();
    l.plan.micro_batch = 64;
    l.model.observe(16, 200);
    l.model.observe(32, 400);
    l.model.limit = 1000;
    l.model.base = 0;
    l.model.has_base = true;
    p.restore(l);
    return p;
}
// A global batch at 64 whose third micro-batch fails needing 1010 (> 1000),
// holds after the release (500 freed) at a peak of 800, and commits.
Decision rescued_batch(RecoveryPlanner& p) {
    p.begin_batch();
    Decision d = p.on_attempt(released(metered_oom(64, 2, 0, 1010), 500));
    REQUIRE(d.action == PlanAction::retry_same);
    Observation good = done(4, 800);
    good.limit = 1000;
    good.first_base = 0;
    good.after_commit = 0;
    d = p.on_attempt(good);
    REQUIRE(d.action == PlanAction::commit);
    return d;
}
}  // namespace

TEST_CASE("planner: a size that holds only after a release in two batches in a row is a ceiling") {
    // A caching allocator's reserve that fragments at 64: each batch's third
    // micro-batch fails by its own need and holds after empty_cache. Once is
    // a one-off (frees pending on another stream); twice in a row, the size
    // would cost an OOM in every batch.
    for (auto policy : {ShrinkPolicy::predictive(), ShrinkPolicy::bisect(), ShrinkPolicy::halve()}) {
        CAPTURE(std::string(policy.name()));
        // By as much as it went over: 64 * 1000 / 1010 = 63.
        RecoveryPlanner p = restored_at_64(policy);
        Decision d = rescued_batch(p);
        CHECK(d.to.micro_batch == 64);  // once: kept
        CHECK(p.model().high == 65);    // (the restored plan's ceiling)
        d = rescued_batch(p);
        CHECK(d.to.micro_batch == 63);  // twice: below it
        CHECK(p.model().high == 64);
        CHECK(p.last_good_plan().micro_batch == 64);
    }
    SUBCASE("back at the size after the cut (an abandoned batch): cut again at its next such commit") {
        RecoveryPlanner p = restored_at_64(ShrinkPolicy::predictive());
        rescued_batch(p);
        REQUIRE(rescued_batch(p).to.micro_batch == 63);
        p.begin_batch();
        p.abandon();  // a user's exception: back at the last good plan, 64
        REQUIRE(p.plan().micro_batch == 64);
        CHECK(rescued_batch(p).to.micro_batch == 63);
    }
    SUBCASE("a clean batch between the two: a one-off each time") {
        RecoveryPlanner p = restored_at_64(ShrinkPolicy::predictive());
        rescued_batch(p);
        p.begin_batch();
        Observation good = done(4, 800);
        good.limit = 1000;
        good.first_base = 0;
        REQUIRE(p.on_attempt(good).to.micro_batch == 64);
        Decision d = rescued_batch(p);
        CHECK(d.to.micro_batch == 64);
        CHECK(p.model().high == 65);
    }
    SUBCASE("a transient failure held after the release is no evidence") {
        RecoveryPlanner p = restored_at_64(ShrinkPolicy::predictive());
        for (int i = 0; i < 3; ++i) {
            p.begin_batch();
            // needing 900 (within the limit): another process's burst
            REQUIRE(p.on_attempt(released(metered_oom(64, 2, 0, 900), 500)).action == PlanAction::retry_same);
            Observation good = done(4, 800);
            good.limit = 1000;
            good.first_base = 0;
            CHECK(p.on_attempt(good).to.micro_batch == 64);
        }
    }
}

namespace {
// What a policy is told after `failed` failed (G and the requested size 256, minimum 1).
ShrinkContext failed_at(std::size_t failed) {
    ShrinkContext ctx;
    ctx.failed = failed;
    ctx.minimum = 1;
    ctx.requested = 256;
    ctx.global_batch = 256;
    return ctx;
}
}  // namespace

TEST_CASE("predictive: no probe past where a failure, scaled by how far it went over, puts the limit") {
    // 12.5 bytes a sample over nothing held, a limit of 1000; 80 failed
    // needing 1100: scaled, the limit is at 80 * 1000 / 1100 = 72. The lucky
    // side of the fit alone would probe up to 80.
    StepModel m;
    m.observe(16, 200);
    m.observe(32, 400);
    m.bound(80, 1100);
    m.limit = 1000;
    m.base = 0;
    m.has_base = true;
    m.high = 80;
    CHECK(m.scaled_ceiling() == 72);
    ShrinkPolicy::Next n = ShrinkPolicy::predictive().after_success(68, 256, 256, m);
    CHECK(n.size > 68);
    CHECK(n.size <= 72);
    // Bisection too: up from 40, toward 72 + 1, not 80; after 80 fails with
    // 40 holding, the midpoint of [40, 73), not of [40, 80).
    m.low = 40;
    CHECK(ShrinkPolicy::bisect().after_success(40, 256, 256, m).size == 56);
    CHECK(ShrinkPolicy::bisect().after_failure(failed_at(80), m).size == 56);
    // At or above the scaled ceiling, a size held: the estimate was low (a
    // need measured over an older base counts twice what is held now), and
    // it expires -- bisection goes on toward the failure itself.
    CHECK(ShrinkPolicy::bisect().after_success(72, 256, 256, m).size == 76);
    CHECK(ShrinkPolicy::bisect().after_success(74, 256, 256, m).size == 77);
    // A failure that scales below one sample is a ceiling of 1, not none,
    // whatever order the bounds came in.
    StepModel tiny = m;
    tiny.limit = 250;
    tiny.bound(2, 600);
    CHECK(tiny.scaled_ceiling() == 1);
    StepModel tiny2;
    tiny2.limit = 250;
    tiny2.base = 0;
    tiny2.has_base = true;
    tiny2.bound(2, 600);
    tiny2.bound(80, 1100);
    CHECK(tiny2.scaled_ceiling() == 1);
    // Nothing beyond the reach: no scaled ceiling.
    StepModel within = m;
    within.n_bounds = 0;
    within.bound(80, 900);
    CHECK(within.scaled_ceiling() == 0);
    within.has_base = false;
    CHECK(within.scaled_ceiling() == 0);
}

TEST_CASE("bisect: a scaled ceiling at or below the size that held has expired, after a failure too") {
    // 40 held at or above the failure-scaled estimate (40): after 58 fails,
    // bisection goes on in [40, 58), not pinned at [40, 41).
    StepModel m;
    m.observe(16, 200);
    m.observe(32, 400);
    m.bound(80, 2000);  // 80 * 1000 / 2000 = 40
    m.limit = 1000;
    m.base = 0;
    m.has_base = true;
    m.low = 40;
    m.high = 70;
    REQUIRE(m.scaled_ceiling() == 40);
    CHECK(ShrinkPolicy::bisect().after_failure(failed_at(58), m).size == 49);
    CHECK(ShrinkPolicy::bisect().after_success(40, 256, 256, m).size == 55);
}
