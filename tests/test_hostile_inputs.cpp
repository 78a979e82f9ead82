// Every public entry point against bad input: each answer is a typed error
// whose message names the bad value; nothing crashes and (under ASan) nothing leaks.
#include <oomguard/oomguard.hpp>
#include <oomguard/config.hpp>
#include <oomguard/device_selector.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/thread_consensus.hpp>
#include <oomguard/trace.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

using namespace oomguard;
using Sim = SimulatedDevices;

namespace {
enum class Kind { invalid_argument, config, oom, no_device, length, out_of_range, runtime, logic };

bool is(Kind k, std::exception const& e) {
    switch (k) {
        case Kind::invalid_argument: return dynamic_cast<std::invalid_argument const*>(&e) != nullptr;
        case Kind::config: return dynamic_cast<config_error const*>(&e) != nullptr;
        case Kind::oom: return dynamic_cast<out_of_memory const*>(&e) != nullptr;
        case Kind::no_device: return dynamic_cast<no_device_error const*>(&e) != nullptr;
        case Kind::length: return dynamic_cast<std::length_error const*>(&e) != nullptr;
        case Kind::out_of_range: return dynamic_cast<std::out_of_range const*>(&e) != nullptr;
        case Kind::runtime: return dynamic_cast<std::runtime_error const*>(&e) != nullptr;
        case Kind::logic: return dynamic_cast<std::logic_error const*>(&e) != nullptr;
    }
    return false;
}

struct Case {
    char const* entry;
    Kind kind;
    char const* names;  // the message must contain this
    std::function<void()> call;
};

BatchOptions batch(std::size_t g) {
    BatchOptions o;
    o.global_batch = g;
    return o;
}
}  // namespace

TEST_CASE("hostile inputs: a typed error naming the value, every time") {
    Sim gpus(2, 1 << 20);
    Sim none(0, 1);
    MemoryBudget<Sim> budget(gpus, 0, std::size_t{1} << 16);
    constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
    std::vector<PhysicalDevice> machine = {{0, "GPU-aa11", "00000000:01:00.0", "x", {}},
                                           {1, "GPU-aa22", "00000000:02:00.0", "x", {}}};
    std::vector<Case> cases = {
        {"Limit::fraction", Kind::invalid_argument, "Limit::fraction(0)", [] { Limit::fraction(0.0); }},
        {"Limit::fraction", Kind::invalid_argument, "Limit::fraction(1.5)", [] { Limit::fraction(1.5); }},
        {"Limit::fraction", Kind::invalid_argument, "nan", [] { Limit::fraction(std::nan("")); }},
        {"Limit::headroom", Kind::invalid_argument, "Limit::headroom(2.00 MiB)",
         [&] { MemoryBudget<Sim> b(gpus, 0, Limit::headroom(2 << 20)); }},
        {"Limit::headroom re-applied", Kind::invalid_argument,
         "Limit::headroom(2.00 MiB) is more than the 768.00 KiB free on the device plus the 256.00 KiB this budget holds",
         [&] {
             MemoryBudget<Sim> b(gpus, 1, Limit::headroom(0));
             DeviceBuffer<Sim> held(b, 256 << 10);
             b.set_limit(Limit::headroom(2 << 20));
         }},
        {"MemoryBudget cap", Kind::invalid_argument, "is more than a budget can hold (281474976710655 bytes",
         [&] { MemoryBudget<Sim> b(gpus, 0, Limit::bytes(std::size_t{1} << 50)); }},
        {"MemoryBudget cap of a huge device", Kind::invalid_argument, "Limit::fraction(1)",
         [] { Sim huge(1, std::size_t{1} << 60); MemoryBudget<Sim> b(huge, 0, Limit::fraction(1.0)); }},
        {"MemoryBudget device", Kind::invalid_argument, "device -1", [&] { MemoryBudget<Sim> b(gpus, -1, 10); }},
        {"MemoryBudget device", Kind::invalid_argument, "device 9", [&] { MemoryBudget<Sim> b(gpus, 9, 10); }},
        {"MemoryBudget no device", Kind::no_device, "cudaErrorNoDevice", [&] { MemoryBudget<Sim> b(none, 0, 10); }},
        {"MemoryBudget::allocate", Kind::oom, "tried to allocate 16.00 EiB", [&] { budget.allocate(max); }},
        {"MemoryBudget::reserve", Kind::oom, "tried to allocate 128.00 KiB", [&] { budget.reserve(128 << 10); }},
        {"DeviceBuffer::as", Kind::invalid_argument, "12 bytes is not a multiple of sizeof(T) = 8",
         [&] { DeviceBuffer<Sim>(budget, 12).as<double>(); }},
        {"make_device_buffer", Kind::length, "overflow size_t",
         [&] { make_device_buffer<double>(budget, max / 4); }},
        {"SimulatedDevices capacity", Kind::invalid_argument, "capacity 0", [] { Sim s({{0}}); }},
        {"SimulatedDevices used_by_others", Kind::invalid_argument, "used_by_others 200", [] { Sim s({{100, 200}}); }},
        {"SimulatedDevices count", Kind::invalid_argument, "device count -3", [] { Sim s(-3, 100); }},
        {"FaultPlan.probability", Kind::invalid_argument, "probability 2",
         [&] { gpus.set_faults(0, FaultPlan{0, 2.0}); }},
        {"set_used_by_others", Kind::invalid_argument, "2000000 bytes", [&] { gpus.set_used_by_others(0, 2000000); }},
        {"simulated device ordinal", Kind::out_of_range, "simulated device 5", [&] { gpus.fail_next(5); }},
        {"register_oom_rule", Kind::invalid_argument, "null pointer", [] { (void)register_oom_rule(nullptr); }},
        {"CacheRegistry::add", Kind::invalid_argument, "non-empty name",
         [] { CacheRegistry r; (void)r.add("", 0, [] { return std::size_t{0}; }, [] { return std::size_t{0}; }); }},
        {"CacheRegistry::add name length", Kind::invalid_argument, "is 64 characters; give one of 1 to 63",
         [] { CacheRegistry r; (void)r.add(std::string(64, 'n'), 0, [] { return std::size_t{0}; }, [] { return std::size_t{0}; }); }},
        {"BatchOptions.global_batch", Kind::invalid_argument, "global_batch is 0", [] { AdaptiveBatch a(batch(0)); }},
        {"BatchOptions.micro_batch", Kind::invalid_argument, "micro_batch 9 is above global_batch 8",
         [] { auto o = batch(8); o.micro_batch = 9; AdaptiveBatch a(o); }},
        {"BatchOptions.min_micro_batch", Kind::invalid_argument, "min_micro_batch 5 is above the starting micro_batch 4",
         [] { auto o = batch(8); o.micro_batch = 4; o.min_micro_batch = 5; AdaptiveBatch a(o); }},
        {"BatchOptions.precisions", Kind::invalid_argument, "precisions is empty",
         [] { auto o = batch(8); o.precisions.clear(); AdaptiveBatch a(o); }},
        {"BatchOptions.precisions", Kind::invalid_argument, "lists bf16 twice",
         [] { auto o = batch(8); o.precisions = {Precision::bf16, Precision::bf16}; AdaptiveBatch a(o); }},
        {"BatchOptions.max_attempts", Kind::invalid_argument, "max_attempts is 0",
         [] { auto o = batch(8); o.max_attempts = 0; AdaptiveBatch a(o); }},
        {"ShrinkPolicy::geometric", Kind::invalid_argument, "geometric(1)", [] { ShrinkPolicy::geometric(1.0); }},
        {"ShrinkPolicy::predictive", Kind::invalid_argument, "predictive(0.7)", [] { ShrinkPolicy::predictive(0.7); }},
        {"ShrinkPolicy::custom", Kind::invalid_argument, "null pointer", [] { ShrinkPolicy::custom(nullptr); }},
        {"AdaptiveBatch::run", Kind::invalid_argument, "the step is empty",
         [] { AdaptiveBatch a(batch(8)); void (*f)(MicroBatch const&) = nullptr; a.run(f, [] {}, [] {}); }},
        {"AdaptiveBatch::observe", Kind::invalid_argument, "null function", [] { (void)AdaptiveBatch(batch(8)).observe(nullptr); }},
        {"AdaptiveBatch::run", Kind::invalid_argument, "measure_with", [] {
             BatchOptions o = batch(8);
             o.policy = ShrinkPolicy::predictive();  // it fits what a meter measures, and none is attached
             AdaptiveBatch a(o);
             a.run([](MicroBatch const&) {}, [] {}, [] {});
         }},
        {"AdaptiveBatch::observe", Kind::invalid_argument, "null function pointer",
         [] { void (*f)(BatchEvent const&) = nullptr; (void)AdaptiveBatch(batch(8)).observe(f); }},
        {"AdaptiveBatch::observe", Kind::invalid_argument, "empty std::function",
         [] { (void)AdaptiveBatch(batch(8)).observe(std::function<void(BatchEvent const&)>()); }},
        {"AdaptiveBatch::consensus", Kind::invalid_argument, "all_min collective is a null function",
         [] { AdaptiveBatch(batch(8)).consensus(Consensus{}); }},
        {"OOMGUARD_CONF budget", Kind::config, "bad value '2.0' for budget", [] { parse_config("budget=2.0"); }},
        {"OOMGUARD_CONF budget of 0 bytes", Kind::config, "bad value '0' for budget: a budget of 0 bytes allows nothing",
         [] { parse_config("budget=0"); }},
        {"OOMGUARD_CONF bare-number budget past size_t", Kind::config,
         "bad value '18446744073709551616' for budget: more than 18446744073709551615 bytes",
         [] { parse_config("budget=18446744073709551616"); }},
        {"OOMGUARD_CONF headroom of a fraction of a byte", Kind::config,
         "bad value '0.0001KiB' for headroom: not a whole number of bytes (between 0 and 1)",
         [] { parse_config("headroom=0.0001KiB"); }},
        {"parse_size fraction of a byte", Kind::config,
         "bad value '1.0001KiB' for --device-memory: not a whole number of bytes (between 1024 and 1025)",
         [] { parse_size("1.0001KiB", "--device-memory"); }},
        {"parse_size past size_t", Kind::config, "bad value '20000000TiB' for --device-memory: more than",
         [] { parse_size("20000000TiB", "--device-memory"); }},
        {"OOMGUARD_CONF key", Kind::config, "unknown key 'bugdet'", [] { parse_config("bugdet=0.9"); }},
        {"OOMGUARD_CONF min_batch", Kind::config, "bad value '0' for min_batch", [] { parse_config("min_batch=0"); }},
        {"OOMGUARD_CONF max_attempts", Kind::config, "bad value 'abc'", [] { parse_config("max_attempts=abc"); }},
        {"OOMGUARD_CONF policy", Kind::config, "bad value 'fast' for policy", [] { parse_config("policy=fast"); }},
        {"OOMGUARD_CONF precision", Kind::config, "'fp64'", [] { parse_config("precision=fp64"); }},
        {"OOMGUARD_CONF syntax", Kind::config, "entry 'budget' has no '='", [] { parse_config("budget"); }},
        {"CUDA_VISIBLE_DEVICES", Kind::invalid_argument, "entry 2 'x' is not an index",
         [&] { parse_visible_devices("0,x", machine).require_all_valid(); }},
        {"CUDA_VISIBLE_DEVICES", Kind::invalid_argument, "'GPU-aa' is a prefix of 2 GPUs",
         [&] { parse_visible_devices("GPU-aa", machine).require_all_valid(); }},
        {"CUDA_VISIBLE_DEVICES", Kind::invalid_argument, "'5' is past the last device",
         [&] { parse_visible_devices("1,5", machine).require_all_valid(); }},
        {"DeviceSelector fraction", Kind::invalid_argument, "first_with_free_fraction(-1)",
         [&] { DeviceSelector<Sim>(gpus, Nvml::none(), nullptr, nullptr).first_with_free_fraction(-1); }},
        {"DeviceSelector wait", Kind::invalid_argument, "timeout -5 ms",
         [&] { DeviceSelector<Sim>(gpus, Nvml::none(), nullptr, nullptr).wait_for_free(1, std::chrono::milliseconds(-5)); }},
        {"DeviceSelector none fits", Kind::runtime, "needs 16.00 EiB",
         [&] { DeviceSelector<Sim>(gpus, Nvml::none(), nullptr, nullptr).first_with_free(max); }},
        {"ScopedDevice", Kind::invalid_argument, "device 7 does not exist", [&] { ScopedDevice<Sim> s(gpus, 7); }},
        {"CUDA_VISIBLE_DEVICES repeated", Kind::invalid_argument, "'0' names a device already listed",
         [&] { parse_visible_devices("0,1,0", machine).require_all_valid(); }},
        {"AdaptiveBatch::reduce", Kind::invalid_argument, "the combine is empty",
         [] {
             AdaptiveBatch a(batch(8));
             int (*combine)(int, int) = nullptr;
             a.reduce([](MicroBatch const&) { return 1; }, 0, combine);
         }},
        {"AdaptiveBatch::run nested", Kind::logic, "inside its own step",
         [] {
             AdaptiveBatch a(batch(8));
             a.run([&](MicroBatch const&) { a.run([](MicroBatch const&) {}, [] {}, [] {}); }, [] {}, [] {});
         }},
        {"RecoveryPlanner::failed_over", Kind::invalid_argument, "failed_over(-7)",
         [] {
             BatchOptions o = batch(8);
             o.micro_batch = o.min_micro_batch = 8;
             RecoveryPlanner p(o);
             p.allow_failover(true);
             p.begin_batch();
             Observation oom;
             oom.outcome = Observation::Outcome::step_oom;
             oom.failed_size = 8;
             p.on_attempt(oom);
             p.failed_over(-7);
         }},
        {"RecoveryPlanner::on_attempt", Kind::invalid_argument, "failed size 3 is not a planned size",
         [] {
             RecoveryPlanner p(batch(8));
             p.begin_batch();
             Observation oom;
             oom.outcome = Observation::Outcome::step_oom;
             oom.failed_size = 3;
             p.on_attempt(oom);
         }},
        {"ThreadConsensus", Kind::invalid_argument, "at least 1 rank, got 0", [] { ThreadConsensus t(0); }},
        {"ThreadConsensus::all_min", Kind::invalid_argument, "different counts", [] {
             // Two ranks, two counts: the other rank is not left waiting (it throws too).
             ThreadConsensus t(2);
             std::exception_ptr other;
             std::thread peer([&] {
                 std::uint64_t v[3] = {};
                 try {
                     t.all_min(v, 3);
                 } catch (...) {
                     other = std::current_exception();
                 }
             });
             std::uint64_t v[2] = {};
             try {
                 t.all_min(v, 2);
             } catch (...) {
                 peer.join();
                 REQUIRE(other != nullptr);
                 throw;
             }
             peer.join();
         }},
        {"Trace::write", Kind::runtime, "/no/such/dir/t.json", [] { Trace t("/no/such/dir/t.json"); t.write(); }},
        {"Trace (opened when made)", Kind::runtime, "cannot open '/no/such/dir/u.json'",
         [] { Trace t("/no/such/dir/u.json"); }},
        {"parse_size fractional bytes", Kind::config, "bad value '1.5' for --device-memory",
         [] { parse_size("1.5", "--device-memory"); }},
        {"parse_limit names its flag", Kind::config, "bad value '1.5' for --budget", [] { parse_limit("1.5", "--budget"); }},
        {"parse_precisions upward", Kind::config, "fp32 (4 bytes per value) after bf16 (2)",
         [] { parse_precisions("bf16>fp32", "--precision"); }},
        {"parse_policy", Kind::config, "bad value 'fast' for --policy", [] { parse_policy("fast", "--policy"); }},
        {"BatchOptions.precisions upward", Kind::invalid_argument, "puts fp16 (2 bytes per value) after fp8 (1)",
         [] {
             BatchOptions o = batch(8);
             o.precisions = {Precision::fp32, Precision::fp8, Precision::fp16};
             AdaptiveBatch a(o);
         }},
        {"config_from_env names its variable", Kind::config, "OOMGUARD_HOSTILE_CONF: unknown key 'x'",
         [] {
             ::setenv("OOMGUARD_HOSTILE_CONF", "x=1", 1);
             struct Unset {
                 ~Unset() { ::unsetenv("OOMGUARD_HOSTILE_CONF"); }
             } unset;
             config_from_env("OOMGUARD_HOSTILE_CONF");
         }},
        {"MemoryBudget::allocate_async(SIZE_MAX)", Kind::oom, "tried to allocate",
         [&] { (void)budget.allocate_async(max, 1); }},
        {"StreamBuffer over the cap", Kind::oom, "held under this budget",
         [&] { StreamBuffer<Sim> b(budget, std::size_t{1} << 17, 2); }},
        {"SimulatedPendingFrees", Kind::out_of_range, "simulated device 5 does not exist",
         [&] { SimulatedPendingFrees c(gpus, 5); }},
    };
    int checked = 0;
    for (auto const& c : cases) {
        std::string entry = c.entry, names = c.names;
        CAPTURE(entry);
        CAPTURE(names);
        try {
            c.call();
            FAIL("no error");
        } catch (std::exception const& e) {
            std::string what = e.what();
            CAPTURE(what);
            CHECK(is(c.kind, e));
            CHECK(what.find(c.names) != std::string::npos);
            ++checked;
        }
    }
    CHECK(checked >= 30);
    CHECK(budget.used() == 0);
    CHECK(gpus.live_bytes() == 0);
    MESSAGE(checked << " hostile inputs answered with typed errors");
}
