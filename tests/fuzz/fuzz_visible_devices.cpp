// libFuzzer target: CUDA_VISIBLE_DEVICES. Any input maps to distinct, existing
// physical devices with ordinals 0..n-1, a dropped entry always says why, and at
// most one warning ends the list.
#include <oomguard/visible_devices.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
    static std::vector<oomguard::PhysicalDevice> const machine = {
        {0, "GPU-aaaa1111-0000", "00000000:3B:00.0", "a", {}},
        {1, "GPU-aaaa2222-0000", "00000000:18:00.0", "b", {}},
        {2, "GPU-bbbb3333-0000", "00000000:86:00.0", "c", {"MIG-cccc1111", "MIG-cccc2222"}},
    };
    std::string text(reinterpret_cast<char const*>(data), size);
    if (text.find('\0') != std::string::npos) return 0;  // an environment variable cannot hold one
    for (auto order : {oomguard::DeviceOrder::fastest_first, oomguard::DeviceOrder::pci_bus_id}) {
        oomguard::VisibleDevices v = oomguard::parse_visible_devices(text.c_str(), machine, order);
        if (v.devices.size() > machine.size() * 3) std::abort();
        for (std::size_t i = 0; i < v.devices.size(); ++i) {
            auto const& d = v.devices[i];
            if (d.ordinal != static_cast<int>(i) || d.physical < 0 || d.physical >= 3) std::abort();
            for (std::size_t j = 0; j < i; ++j)
                if (v.devices[j].physical == d.physical && v.devices[j].mig == d.mig) std::abort();
        }
        // One warning at most ends the list (or empties the set); the others only
        // say how an index was read ("1gpu2" reads as 1).
        std::size_t enders = 0;
        for (auto const& w : v.warnings)
            if (w.find("reads as index") == std::string::npos) ++enders;
        if (enders > 1) std::abort();
    }
    return 0;
}
