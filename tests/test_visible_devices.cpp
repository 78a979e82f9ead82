#include <oomguard/visible_devices.hpp>

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace oomguard;

namespace {
std::vector<PhysicalDevice> machine() {
    return {
        {0, "GPU-aaaa1111-0000-0000-0000-000000000000", "00000000:3B:00.0", "H100", {}},
        {1, "GPU-aaaa2222-0000-0000-0000-000000000000", "00000000:18:00.0", "H100", {}},
        {2, "GPU-bbbb3333-0000-0000-0000-000000000000", "00000000:86:00.0", "A100",
         {"MIG-cccc1111-0000-0000-0000-000000000000", "MIG-cccc2222-0000-0000-0000-000000000000"}},
        {3, "GPU-bbbb4444-0000-0000-0000-000000000000", "00000000:AF:00.0", "A100", {}},
    };
}
std::vector<int> physical_of(VisibleDevices const& v) {
    std::vector<int> out;
    for (auto const& d : v.devices) out.push_back(d.physical);
    return out;
}
}  // namespace

TEST_CASE("CUDA_VISIBLE_DEVICES by CUDA's rules") {
    struct Case {
        char const* value;  // nullptr: unset
        DeviceOrder order;
        std::vector<int> expect;
        char const* warning;  // "" : none expected
    };
    auto F = DeviceOrder::fastest_first;
    auto P = DeviceOrder::pci_bus_id;
    Case const cases[] = {
        {nullptr, F, {0, 1, 2, 3}, ""},                                        // unset: all
        {"", F, {}, "set but empty"},                                          // empty: none
        {"  ", F, {}, "set but empty"},                                        // blank: none
        {"0,2,-1,1", F, {0, 2}, "entry 3 '-1' is not an index"},               // the guide's example
        {"2,1", F, {2, 1}, ""},                                                // order preserved
        {"3,2,1,0", F, {3, 2, 1, 0}, ""},
        {" 1 , 3 ", F, {1, 3}, ""},                                            // spaces ignored
        {"1,1", F, {}, "'1' names a device already listed: a repeated device makes CUDA show no device"},
        {"0,0", F, {}, "no device at all"},                                    // repeated: the empty set
        {"2,1,2", F, {}, "entry 3 '2' names a device already listed"},
        {"GPU-aaaa1,0", F, {}, "names a device already listed"},              // the same GPU two ways
        {"1gpu2,2", F, {1, 2}, "'1gpu2' reads as index 1"},                    // strtoul: leading digits
        {"+2", F, {2}, ""},
        {"0,7", F, {0}, "'7' is past the last device (the machine has 4)"},
        {"99999999999999999999", F, {}, "is past the last device"},
        {"0,,1", F, {0}, "entry 2 '' is empty"},
        {"0,", F, {0}, "(it was the last entry)"},
        {"abc", F, {}, "'abc' is not an index, a GPU-<uuid>, a MIG-<uuid> or a MIG-GPU-<uuid>/<gi>/<ci>"},
        {"x1,0", F, {}, "and every entry after it ('0')"},
        {"GPU-aaaa2", F, {1}, ""},                                             // unique UUID prefix
        {"GPU-bbbb4444-0000-0000-0000-000000000000,0", F, {3, 0}, ""},         // full UUID, mixed
        {"GPU-aaaa", F, {}, "is a prefix of 2 GPUs' UUIDs (ambiguous)"},
        {"GPU-cafe", F, {}, "matches no GPU's UUID"},
        {"MIG-cccc2", F, {2}, ""},
        {"MIG-cccc", F, {}, "is a prefix of 2 MIG instances (ambiguous)"},
        {"MIG-cccc1,MIG-cccc2", F, {2, 2}, ""},                                // two instances of one GPU: two devices
        {"MIG-cccc1,MIG-cccc1111", F, {}, "entry 2 'MIG-cccc1111' names a device already listed"},  // one, twice
        {nullptr, P, {1, 0, 2, 3}, ""},                                        // PCI order: 18 < 3B < 86 < AF
        {"0,1", P, {1, 0}, ""},                                                // indices follow that order
    };
    int n = 0;
    for (auto const& c : cases) {
        CAPTURE(c.value ? c.value : "(unset)");
        VisibleDevices v = parse_visible_devices(c.value, machine(), c.order);
        CHECK(physical_of(v) == c.expect);
        if (std::string(c.warning).empty()) {
            CHECK(v.warnings.empty());
        } else {
            REQUIRE(v.warnings.size() == 1);
            CHECK(v.warnings[0].find(c.warning) != std::string::npos);
        }
        for (std::size_t i = 0; i < v.devices.size(); ++i) CHECK(v.devices[i].ordinal == static_cast<int>(i));
        ++n;
    }
    CHECK(n >= 15);
}

TEST_CASE("the mapping carries identity, and MIG entries name their instance") {
    VisibleDevices v = parse_visible_devices("3,MIG-cccc1", machine());
    REQUIRE(v.devices.size() == 2);
    CHECK(v.devices[0].uuid == "GPU-bbbb4444-0000-0000-0000-000000000000");
    CHECK(v.devices[0].pci_bus_id == "00000000:AF:00.0");
    CHECK(v.devices[1].mig == "MIG-cccc1111-0000-0000-0000-000000000000");
    CHECK(v.find(1)->physical == 2);
    CHECK(v.find(2) == nullptr);
}

TEST_CASE("CUDA_DEVICE_ORDER") {
    std::vector<std::string> w;
    CHECK(parse_device_order(nullptr, &w) == DeviceOrder::fastest_first);
    CHECK(parse_device_order("PCI_BUS_ID", &w) == DeviceOrder::pci_bus_id);
    CHECK(parse_device_order("FASTEST_FIRST", &w) == DeviceOrder::fastest_first);
    CHECK(w.empty());
    CHECK(parse_device_order("pci", &w) == DeviceOrder::fastest_first);
    REQUIRE(w.size() == 1);
    CHECK(w[0].find("CUDA_DEVICE_ORDER='pci'") != std::string::npos);
}

TEST_CASE("two MIG instances of one GPU are two devices; the same instance twice is the empty set") {
    VisibleDevices two = parse_visible_devices("MIG-cccc2,MIG-cccc1", machine());
    CHECK(two.warnings.empty());
    REQUIRE(two.devices.size() == 2);
    CHECK(two.devices[0].physical == 2);
    CHECK(two.devices[1].physical == 2);
    CHECK(two.devices[0].mig == "MIG-cccc2222-0000-0000-0000-000000000000");
    CHECK(two.devices[1].mig == "MIG-cccc1111-0000-0000-0000-000000000000");
    CHECK(two.find(1)->ordinal == 1);

    // The same instance by its legacy name and its own is a repeat, too.
    std::vector<PhysicalDevice> m = machine();
    m[2].mig_legacy = {"MIG-GPU-bbbb3333-0000-0000-0000-000000000000/1/0",
                       "MIG-GPU-bbbb3333-0000-0000-0000-000000000000/2/0"};
    VisibleDevices same = parse_visible_devices("MIG-cccc1,MIG-GPU-bbbb3333-0000-0000-0000-000000000000/1/0", m);
    CHECK(same.devices.empty());
    REQUIRE(same.warnings.size() == 1);
    CHECK(same.warnings[0].find("a repeated device makes CUDA show no device at all") != std::string::npos);
    VisibleDevices both = parse_visible_devices("MIG-cccc1,MIG-GPU-bbbb3333-0000-0000-0000-000000000000/2/0", m);
    CHECK(both.warnings.empty());
    CHECK(both.devices.size() == 2);
}
