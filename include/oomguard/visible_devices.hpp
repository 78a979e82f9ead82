// CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, read by CUDA's own rules, so a
// program can say which physical GPU each CUDA ordinal is -- and what a typo
// in the variable silently hid.
//
// The rules (CUDA C Programming Guide, "CUDA Environment Variables"):
//  - unset: every device, in the driver's order;
//  - set but empty: no device;
//  - a comma-separated list of indices, `GPU-<uuid>` (a unique prefix is
//    enough) or `MIG-<uuid>` entries (or the legacy `MIG-GPU-<uuid>/<gi>/<ci>`);
//    CUDA ordinals follow the list's order;
//  - the list is cut at the first invalid entry: "0,2,-1,1" shows 0 and 2 only;
//  - an index is read as strtoul reads it, by its leading digits: "1gpu2" is 1;
//  - a device listed twice makes the whole set empty (the driver's rule, as
//    PyTorch's own parser documents it: "repeated ordinal results in empty set").
//    A MIG instance is a device of its own: two instances of one GPU are two
//    devices, one instance twice (under either spelling) is a repeat.
// oomguard also cuts at an index past the last device and an ambiguous UUID
// prefix, and says what it did in `warnings`. Spaces and tabs around an entry
// are ignored.
#pragma once

#include <oomguard/detail/format.hpp>

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace oomguard {

/// A GPU as the machine has it, before CUDA_VISIBLE_DEVICES.
struct PhysicalDevice {
    int index = 0;                   ///< NVML / nvidia-smi index (PCI order)
    std::string uuid{};              ///< "GPU-xxxxxxxx-..."
    std::string pci_bus_id{};        ///< "00000000:3B:00.0"
    std::string name{};              ///< the product name ("NVIDIA H100 80GB HBM3")
    std::vector<std::string> mig{};  ///< "MIG-..." UUIDs of its MIG instances
    /// The same instances in the legacy spelling "MIG-GPU-<uuid>/<gi>/<ci>", in
    /// the same order (empty where NVML did not give the instance IDs).
    std::vector<std::string> mig_legacy{};
};

/// CUDA_DEVICE_ORDER.
enum class DeviceOrder : unsigned char { fastest_first, pci_bus_id };

/// One CUDA ordinal and the physical device behind it.
struct VisibleDevice {
    int ordinal = 0;       ///< the CUDA ordinal this process sees it as
    int physical = 0;      ///< index into the physical list (NVML index)
    std::string uuid{};        ///< the physical device's "GPU-..." UUID
    std::string pci_bus_id{};  ///< its PCI bus id
    std::string name{};        ///< its product name
    std::string mig{};     ///< the MIG instance, when the entry named one
};

/// The mapping, and what was dropped and why.
struct VisibleDevices {
    std::vector<VisibleDevice> devices;  ///< by CUDA ordinal: devices[k] is ordinal k
    std::vector<std::string> warnings;   ///< each entry dropped, why, and what was dropped with it
    DeviceOrder order = DeviceOrder::fastest_first;  ///< the CUDA_DEVICE_ORDER the ordinals follow

    /// For programs that want a typo to stop them: throws std::invalid_argument
    /// with the first warning (the entry, why it was dropped, what else went with it).
    void require_all_valid() const {
        if (!warnings.empty()) throw std::invalid_argument("oomguard: " + warnings.front());
    }

    /// The visible device with this CUDA ordinal, or nullptr.
    VisibleDevice const* find(int ordinal) const noexcept {
        for (auto const& d : devices)
            if (d.ordinal == ordinal) return &d;
        return nullptr;
    }
};

namespace detail {
inline bool starts_with_nocase(std::string_view s, std::string_view prefix) noexcept {
    if (prefix.size() > s.size()) return false;
    for (std::size_t i = 0; i < prefix.size(); ++i) {
        char a = s[i], b = prefix[i];
        if (a >= 'A' && a <= 'Z') a = static_cast<char>(a - 'A' + 'a');
        if (b >= 'A' && b <= 'Z') b = static_cast<char>(b - 'A' + 'a');
        if (a != b) return false;
    }
    return true;
}
}  // namespace detail

/// Reads CUDA_DEVICE_ORDER's value (nullptr: unset). An unknown value falls
/// back to FASTEST_FIRST, as CUDA does, with a warning.
inline DeviceOrder parse_device_order(char const* value, std::vector<std::string>* warnings = nullptr) {
    if (value == nullptr || std::string_view(value) == "FASTEST_FIRST") return DeviceOrder::fastest_first;
    if (std::string_view(value) == "PCI_BUS_ID") return DeviceOrder::pci_bus_id;
    if (warnings != nullptr)
        warnings->push_back(std::string("CUDA_DEVICE_ORDER='") + value +
                            "' is not FASTEST_FIRST or PCI_BUS_ID; CUDA uses FASTEST_FIRST");
    return DeviceOrder::fastest_first;
}

/// Maps CUDA ordinals to physical devices. `value` is CUDA_VISIBLE_DEVICES
/// (nullptr: unset). `physical` is the machine's devices in NVML order; with
/// FASTEST_FIRST their order is taken as the driver's (true for identical
/// GPUs; on a mixed machine set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure).
inline VisibleDevices parse_visible_devices(char const* value, std::vector<PhysicalDevice> const& physical,
                                            DeviceOrder order = DeviceOrder::fastest_first) {
    VisibleDevices out;
    out.order = order;
    // The driver's enumeration: PCI order when asked, else the given order.
    std::vector<std::size_t> enumeration(physical.size());
    for (std::size_t i = 0; i < physical.size(); ++i) enumeration[i] = i;
    if (order == DeviceOrder::pci_bus_id)
        std::stable_sort(enumeration.begin(), enumeration.end(), [&](std::size_t a, std::size_t b) {
            return physical[a].pci_bus_id < physical[b].pci_bus_id;
        });
    auto add = [&](std::size_t p, std::string mig) {
        VisibleDevice v;
        v.ordinal = static_cast<int>(out.devices.size());
        v.physical = static_cast<int>(p);
        v.uuid = physical[p].uuid;
        v.pci_bus_id = physical[p].pci_bus_id;
        v.name = physical[p].name;
        v.mig = std::move(mig);
        out.devices.push_back(std::move(v));
    };
    if (value == nullptr) {
        for (std::size_t p : enumeration) add(p, "");
        return out;
    }
    std::string_view text(value);
    if (detail::trim(text).empty()) {
        out.warnings.push_back("CUDA_VISIBLE_DEVICES is set but empty: no device is visible");
        return out;
    }
    std::size_t pos = 0, entry_no = 0;
    while (pos <= text.size()) {
        std::size_t comma = text.find(',', pos);
        std::string_view raw = text.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos);
        std::string_view e = detail::trim(raw);
        ++entry_no;
        std::string why;
        std::size_t hit = physical.size();
        std::string mig;
        std::size_t const sign = !e.empty() && e.front() == '+' ? 1 : 0;
        std::size_t const digits_end = e.find_first_not_of("0123456789", sign);
        std::size_t const digits = (digits_end == std::string_view::npos ? e.size() : digits_end) - sign;
        if (e.empty()) {
            why = "is empty";
        } else if (digits > 0) {
            // Read as strtoul reads it: the leading digits, whatever follows.
            std::size_t idx = 0;
            bool overflow = false;
            for (char c : e.substr(sign, digits)) {
                if (idx > 100000) overflow = true;
                idx = idx * 10 + static_cast<std::size_t>(c - '0');
            }
            if (overflow || idx >= enumeration.size())
                why = "is past the last device (the machine has " + std::to_string(physical.size()) + ")";
            else
                hit = enumeration[idx];
            if (why.empty() && sign + digits < e.size())
                out.warnings.push_back("CUDA_VISIBLE_DEVICES entry " + std::to_string(entry_no) + " '" +
                                       std::string(e) + "' reads as index " + std::to_string(idx) +
                                       ": CUDA reads an index by its leading digits and ignores the rest");
        } else if (detail::starts_with_nocase(e, "GPU-")) {
            std::size_t matches = 0;
            for (std::size_t p = 0; p < physical.size(); ++p)
                if (detail::starts_with_nocase(physical[p].uuid, e)) {
                    ++matches;
                    hit = p;
                }
            if (matches == 0) why = "matches no GPU's UUID";
            if (matches > 1) {
                why = "is a prefix of " + std::to_string(matches) + " GPUs' UUIDs (ambiguous)";
                hit = physical.size();
            }
        } else if (detail::starts_with_nocase(e, "MIG-GPU-")) {
            // The legacy spelling names the GPU and the instance: exact match.
            for (std::size_t p = 0; p < physical.size() && hit == physical.size(); ++p)
                for (std::size_t k = 0; k < physical[p].mig_legacy.size(); ++k)
                    if (physical[p].mig_legacy[k].size() == e.size() &&
                        detail::starts_with_nocase(physical[p].mig_legacy[k], e)) {
                        hit = p;
                        mig = k < physical[p].mig.size() ? physical[p].mig[k] : physical[p].mig_legacy[k];
                    }
            if (hit == physical.size()) why = "matches no MIG instance (MIG-GPU-<uuid>/<gi>/<ci>)";
        } else if (detail::starts_with_nocase(e, "MIG-")) {
            std::size_t matches = 0;
            for (std::size_t p = 0; p < physical.size(); ++p)
                for (auto const& m : physical[p].mig)
                    if (detail::starts_with_nocase(m, e)) {
                        ++matches;
                        hit = p;
                        mig = m;
                    }
            if (matches == 0) why = "matches no MIG instance";
            if (matches > 1) {
                why = "is a prefix of " + std::to_string(matches) + " MIG instances (ambiguous)";
                hit = physical.size();
            }
        } else {
            why = "is not an index, a GPU-<uuid>, a MIG-<uuid> or a MIG-GPU-<uuid>/<gi>/<ci>";
        }
        if (why.empty()) {
            for (auto const& v : out.devices) {
                if (v.physical != static_cast<int>(hit) || v.mig != mig) continue;
                out.warnings.push_back("CUDA_VISIBLE_DEVICES entry " + std::to_string(entry_no) + " '" +
                                       std::string(e) + "' names a device already listed: a repeated device "
                                       "makes CUDA show no device at all");
                out.devices.clear();
                return out;
            }
        }
        if (!why.empty()) {
            std::string rest = comma == std::string_view::npos ? std::string() : std::string(text.substr(comma + 1));
            std::string w = "CUDA_VISIBLE_DEVICES entry " + std::to_string(entry_no) + " '" + std::string(e) + "' " +
                            why + "; CUDA ignores it";
            w += rest.empty() ? std::string(" (it was the last entry)")
                              : " and every entry after it ('" + rest + "')";
            out.warnings.push_back(std::move(w));
            break;
        }
        add(hit, mig);
        if (comma == std::string_view::npos) break;
        pos = comma + 1;
    }
    return out;
}

}  // namespace oomguard
