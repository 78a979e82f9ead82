#include <oomguard/device_selector.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/simulated_devices.hpp>

#include "fake_nvml.hpp"

#include <doctest/doctest.h>

#include <string>

using namespace oomguard;
using Sel = DeviceSelector<SimulatedDevices>;
constexpr std::size_t GiB = std::size_t{1} << 30;

namespace {
SimulatedDevices* g_sim = nullptr;

// A machine of four simulated GPUs, with NVML reading it without contexts.
struct Machine {
    SimulatedDevices gpus{{{80 * GiB, 70 * GiB, "H100", "GPU-aaaa1111", "00000000:3B:00.0"},
                           {80 * GiB, 10 * GiB, "H100", "GPU-aaaa2222", "00000000:18:00.0"},
                           {40 * GiB, 0, "A100", "GPU-bbbb3333", "00000000:86:00.0"},
                           {80 * GiB, 50 * GiB, "H100", "GPU-bbbb4444", "00000000:AF:00.0"}},
                          SimulatedMemory::phantom};
    Machine() {
        g_sim = &gpus;
        auto& st = fake_nvml::state();
        st.gpus.clear();
        for (int i = 0; i < gpus.count(); ++i)
            st.gpus.push_back({gpus.spec(i).uuid, gpus.spec(i).pci_bus_id, gpus.spec(i).name});
        st.memory = [](int i, std::size_t* f, std::size_t* t) { return g_sim->peek_memory(i, f, t).ok(); };
        st.memory_reads = 0;
        st.fail_handle = -1;
    }
};
}  // namespace

TEST_CASE("selection by free memory, threshold, fraction and exclusion") {
    Machine m;
    Sel sel(m.gpus, Nvml::from(fake_nvml::api()), nullptr, nullptr);
    CHECK(sel.uses_nvml());
    CHECK(sel.most_free() == 1);                        // 70 GiB free
    CHECK(sel.first_with_free(35 * GiB) == 1);
    CHECK(sel.first_with_free(20 * GiB) == 1);
    CHECK(sel.first_with_free(5 * GiB) == 0);           // first in CUDA order
    CHECK(sel.first_with_free_fraction(0.9) == 2);      // 40 of 40 GiB free
    Exclude ex;
    ex.ordinals = {1};
    CHECK(sel.most_free(ex) == 2);
    ex.uuids = {"GPU-bbbb3"};
    CHECK(sel.most_free(ex) == 3);
    CHECK_THROWS_AS(sel.first_with_free_fraction(0.0), std::invalid_argument);
    CHECK_THROWS_AS(sel.first_with_free_fraction(1.5), std::invalid_argument);
    try {
        sel.first_with_free(75 * GiB);
        FAIL("expected no_fitting_device");
    } catch (no_fitting_device const& e) {
        std::string w = e.what();
        CHECK(w.find("GPU 0 (GPU-aaaa1111...): 10.00 GiB free of 80.00 GiB, needs 75.00 GiB") != std::string::npos);
        CHECK(w.find("GPU 2") != std::string::npos);
        CHECK(w.find("GPU 3") != std::string::npos);
    }
    // Nothing above created a context: NVML read every device.
    for (int d = 0; d < 4; ++d) CHECK_FALSE(m.gpus.context_created(d));
    CHECK(m.gpus.set_device_calls() == 0);
    {
        ScopedDevice<SimulatedDevices> on(m.gpus, sel.most_free());
        CHECK(on.switched());
        CHECK(m.gpus.context_created(1));  // only the chosen device
        CHECK_FALSE(m.gpus.context_created(0));
        CHECK_FALSE(m.gpus.context_created(2));
        CHECK_FALSE(m.gpus.context_created(3));
    }
    // Restoring the previous device sets it, which (like cudaSetDevice since
    // CUDA 12) gives it a context: the documented cost of a scoped switch.
    CHECK(m.gpus.context_created(0));
    CHECK_FALSE(m.gpus.context_created(2));
}

TEST_CASE("CUDA_VISIBLE_DEVICES remaps ordinals to physical GPUs") {
    Machine m;
    SimulatedDevices visible({{80 * GiB, 50 * GiB}, {80 * GiB, 10 * GiB}}, SimulatedMemory::phantom);  // what cudart sees
    Sel sel(visible, Nvml::from(fake_nvml::api()), "3,GPU-aaaa2,-1,0", nullptr);
    REQUIRE(sel.visible().devices.size() == 2);
    CHECK(sel.visible().devices[0].physical == 3);
    CHECK(sel.visible().devices[1].physical == 1);
    REQUIRE(sel.warnings().size() == 1);
    CHECK(sel.warnings()[0].find("'-1'") != std::string::npos);
    auto facts = sel.facts();
    CHECK(facts[0].uuid == "GPU-bbbb4444");
    CHECK(facts[0].free == 30 * GiB);   // physical 3, read through NVML
    CHECK(facts[1].free == 70 * GiB);
    CHECK(sel.most_free() == 1);
    std::string t = sel.table();
    CHECK(t.find("   0     3  H100") != std::string::npos);
    CHECK(t.find("warning: CUDA_VISIBLE_DEVICES entry 3") != std::string::npos);
}

TEST_CASE("without NVML the backend is read, and the table says so") {
    Machine m;
    Sel sel(m.gpus, Nvml::none(), nullptr, nullptr);
    CHECK_FALSE(sel.uses_nvml());
    MemoryBudget<SimulatedDevices> budget(m.gpus, 2, Limit::unlimited());
    sel.track(budget);
    DeviceBuffer<SimulatedDevices> held(budget, GiB);
    CHECK(sel.most_free() == 1);
    auto facts = sel.facts();
    CHECK(facts[2].held == GiB);
    CHECK(facts[2].free == 39 * GiB);
    CHECK_FALSE(facts[2].from_nvml);
    CHECK(m.gpus.context_created(0));  // the documented cost of the fallback
    CHECK(sel.table().find("(read through a context)") != std::string::npos);
}

TEST_CASE("wait_for_free polls until a device frees up, or reports the last reading") {
    Machine m;
    Sel sel(m.gpus, Nvml::from(fake_nvml::api()), nullptr, nullptr);
    CHECK_THROWS_AS(sel.wait_for_free(79 * GiB, std::chrono::milliseconds(30), std::chrono::milliseconds(10)),
                    no_fitting_device);
    CHECK(fake_nvml::state().memory_reads >= 8);  // it polled more than once
    std::thread freer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        m.gpus.set_used_by_others(3, 0);
    });
    CHECK(sel.wait_for_free(79 * GiB, std::chrono::milliseconds(2000), std::chrono::milliseconds(5)) == 3);
    freer.join();
    CHECK_THROWS_AS(sel.wait_for_free(GiB, std::chrono::milliseconds(-1)), std::invalid_argument);
    CHECK_THROWS_AS(sel.wait_for_free(GiB, std::chrono::milliseconds(10), std::chrono::milliseconds(0)),
                    std::invalid_argument);
}

TEST_CASE("failover: adaptive_batch moves to the device that can hold the plan") {
    Machine m;
    Sel sel(m.gpus, Nvml::from(fake_nvml::api()), nullptr, nullptr);
    MemoryBudget<SimulatedDevices> b0(m.gpus, 0, Limit::unlimited()), b1(m.gpus, 1, Limit::unlimited()),
        b2(m.gpus, 2, Limit::unlimited()), b3(m.gpus, 3, Limit::unlimited());
    MemoryBudget<SimulatedDevices>* budgets[] = {&b0, &b1, &b2, &b3};
    BatchOptions o;
    o.global_batch = 64;
    o.min_micro_batch = 64;  // cannot shrink: only another device helps
    AdaptiveBatch a(o);
    sel.attach_failover(a);
    BatchResult r = a.run([&](MicroBatch const& mb) {
        DeviceBuffer<SimulatedDevices> act(*budgets[mb.device], mb.size * (GiB / 2));  // 32 GiB
    }, [] {}, [] {});
    CHECK(r.plan.device == 1);  // device 0 has 10 GiB free; 1 has 70
    CHECK(a.counters().failovers == 1);
}

TEST_CASE("ScopedDevice restores on exit and on exception") {
    SimulatedDevices gpus(3, GiB);
    REQUIRE(gpus.set_device(2).ok());
    int d = -1;
    {
        ScopedDevice<SimulatedDevices> on(gpus, 1);
        gpus.current_device(&d);
        CHECK(d == 1);
        CHECK(on.previous() == 2);
    }
    gpus.current_device(&d);
    CHECK(d == 2);
    try {
        ScopedDevice<SimulatedDevices> on(gpus, 0);
        throw std::runtime_error("user error");
    } catch (std::runtime_error const&) {
    }
    gpus.current_device(&d);
    CHECK(d == 2);
    std::uint64_t calls = gpus.set_device_calls();
    { ScopedDevice<SimulatedDevices> same(gpus, 2); }
    CHECK(gpus.set_device_calls() == calls);  // no switch when already current
    CHECK_THROWS_WITH_AS(ScopedDevice<SimulatedDevices>(gpus, 5), doctest::Contains("device 5 does not exist"),
                         std::invalid_argument);
}

TEST_CASE("a GPU whose NVML handle fails keeps its index: no later GPU is read in its place") {
    Machine m;
    fake_nvml::state().fail_handle = 1;
    Sel sel(m.gpus, Nvml::from(fake_nvml::api()), "0,2", nullptr);
    VisibleDevice const* v = sel.visible().find(1);
    REQUIRE(v != nullptr);
    CHECK(v->physical == 2);
    CHECK(v->uuid == "GPU-bbbb3333");  // CUDA 1 is NVML 2, not NVML 3
    std::size_t free = 0, total = 0;
    CHECK_FALSE(Nvml::from(fake_nvml::api()).memory(1, free, total));  // the failing one reads as unreadable
    CHECK(Nvml::from(fake_nvml::api()).memory(2, free, total));
    CHECK(total == 40 * GiB);
}

TEST_CASE("MIG through NVML: instances listed, both spellings valid, memory read from the instance") {
    Machine m;
    auto& a100 = fake_nvml::state().gpus[2];
    a100.migs = {{"MIG-cccc1111-0000-0000-0000-000000000000", 1, 0, 9 * GiB, 10 * GiB},
                 {"", 0, 0, 0, 0},  // an empty slot
                 {"MIG-cccc2222-0000-0000-0000-000000000000", 2, 0, 3 * GiB, 20 * GiB}};
    auto phys = Nvml::from(fake_nvml::api()).physical_devices();
    REQUIRE(phys.size() == 4);
    REQUIRE(phys[2].mig.size() == 2);
    CHECK(phys[2].mig[1] == "MIG-cccc2222-0000-0000-0000-000000000000");
    CHECK(phys[2].mig_legacy[1] == "MIG-GPU-bbbb3333/2/0");
    CHECK(phys[0].mig.empty());

    Sel sel(m.gpus, Nvml::from(fake_nvml::api()), "MIG-cccc2222", nullptr);
    for (auto const& w : sel.visible().warnings) CHECK(w.find("CUDA_VISIBLE_DEVICES entry") == std::string::npos);
    REQUIRE(sel.visible().devices.size() == 1);
    CHECK(sel.visible().devices[0].mig == "MIG-cccc2222-0000-0000-0000-000000000000");
    VisibleDevices legacy = parse_visible_devices("MIG-GPU-bbbb3333/1/0", phys);
    CHECK(legacy.warnings.empty());
    REQUIRE(legacy.devices.size() == 1);
    CHECK(legacy.devices[0].physical == 2);
    CHECK(legacy.devices[0].mig == "MIG-cccc1111-0000-0000-0000-000000000000");
    CHECK(parse_visible_devices("MIG-GPU-bbbb3333/7/0", phys).warnings.size() == 1);
    CHECK_NOTHROW(legacy.require_all_valid());

    std::size_t free = 0, total = 0;
    CHECK(Nvml::from(fake_nvml::api()).mig_memory(2, "MIG-cccc2222-0000-0000-0000-000000000000", free, total));
    CHECK(free == 3 * GiB);
    CHECK(total == 20 * GiB);
    CHECK_FALSE(Nvml::from(fake_nvml::api()).mig_memory(2, "MIG-none", free, total));
    a100.migs.clear();
}

TEST_CASE("failover: one move per device, then a give-up that names every device tried and why") {
    // Both devices have room for the request that failed, but neither holds the
    // step: a hook that excludes only the failing device sent the plan back to
    // the one it had just left (0 1 0 1 ...) until max_attempts.
    SimulatedDevices gpus({{4 * GiB, 0, "H100", "GPU-cccc1111", "00000000:3B:00.0"},
                           {4 * GiB, 0, "H100", "GPU-cccc2222", "00000000:18:00.0"},
                           {4 * GiB, 3 * GiB, "H100", "GPU-cccc3333", "00000000:AF:00.0"}},
                          SimulatedMemory::phantom);
    Sel sel(gpus, Nvml::none(), nullptr, nullptr);
    MemoryBudget<SimulatedDevices> b0(gpus, 0, Limit::unlimited()), b1(gpus, 1, Limit::unlimited()),
        b2(gpus, 2, Limit::unlimited());
    MemoryBudget<SimulatedDevices>* budgets[] = {&b0, &b1, &b2};
    BatchOptions o;
    o.global_batch = 8;
    o.min_micro_batch = 8;  // cannot shrink: only another device could help
    AdaptiveBatch a(o);
    std::vector<std::vector<int>> asked;  // the devices each request said were tried
    struct Ctx {
        Sel* sel;
        std::vector<std::vector<int>>* asked;
    } ctx{&sel, &asked};
    a.failover(
        [](void* u, FailoverRequest const& r) {
            auto* c = static_cast<Ctx*>(u);
            c->asked->push_back(r.tried);
            return Sel::failover(c->sel, r);
        },
        &ctx);
    std::vector<int> ran_on;
    auto step = [&](MicroBatch const& mb) {
        ran_on.push_back(mb.device);
        DeviceBuffer<SimulatedDevices> x(*budgets[mb.device], 3 * GiB);
        DeviceBuffer<SimulatedDevices> y(*budgets[mb.device], 3 * GiB);  // 3 + 3 > 4
    };
    try {
        a.run(step, [] {}, [] {});
        FAIL("expected recovery_failed");
    } catch (recovery_failed const& e) {
        std::string w = e.what();
        CAPTURE(w);
        CHECK(w.find("devices tried: GPU 0 (") != std::string::npos);
        CHECK(w.find(", GPU 1 (") != std::string::npos);
        CHECK(w.find("GPU 2 (") == std::string::npos);  // never run on: 1 GiB free is below the 3 GiB asked
        CHECK(w.find("3.00 GiB") != std::string::npos);  // why: what each one could not give
    }
    CHECK(a.counters().failovers == 1);
    CHECK(ran_on == std::vector<int>{0, 1});
    REQUIRE(asked.size() == 2);
    CHECK(asked[0] == std::vector<int>{0});
    CHECK(asked[1] == std::vector<int>{0, 1});
    CHECK(a.plan().device == 0);  // back at the last good plan
    CHECK(b0.used() == 0);
    CHECK(b1.used() == 0);
}

TEST_CASE("failover: a give-up by the attempt limit on the device moved to names it among the devices tried") {
    SimulatedDevices gpus({{4 * GiB, 0, "H100", "GPU-dddd1111", "00000000:3B:00.0"},
                           {4 * GiB, 0, "H100", "GPU-dddd2222", "00000000:18:00.0"}},
                          SimulatedMemory::phantom);
    Sel sel(gpus, Nvml::none(), nullptr, nullptr);
    MemoryBudget<SimulatedDevices> b0(gpus, 0, Limit::unlimited()), b1(gpus, 1, Limit::unlimited());
    MemoryBudget<SimulatedDevices>* budgets[] = {&b0, &b1};
    BatchOptions o;
    o.global_batch = 8;
    o.min_micro_batch = 8;
    o.max_attempts = 2;  // the second attempt, on GPU 1, is the last
    AdaptiveBatch a(o);
    sel.attach_failover(a);
    try {
        a.run([&](MicroBatch const& mb) {
            DeviceBuffer<SimulatedDevices> x(*budgets[mb.device], 3 * GiB);
            DeviceBuffer<SimulatedDevices> y(*budgets[mb.device], 3 * GiB);
        }, [] {}, [] {});
        FAIL("expected recovery_failed");
    } catch (recovery_failed const& e) {
        std::string w = e.what();
        CAPTURE(w);
        CHECK(w.find("the attempt limit was reached") != std::string::npos);
        CHECK(w.find("devices tried: GPU 0 (could not give 3.00 GiB") != std::string::npos);
        CHECK(w.find(", GPU 1 (could not give 3.00 GiB") != std::string::npos);
    }
}
