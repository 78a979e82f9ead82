// Numeric precisions for the fallback ladder of adaptive_batch (FP32 -> BF16 ->
// FP16 is the usual "switch to half precision" step of the OOM checklist).
#pragma once

#include <cstddef>

namespace oomguard {

/// A buffer precision a step can run at. The step decides what it means for its
/// buffers; oomguard only walks the ladder the user gives.
enum class Precision : unsigned char { fp32, tf32, bf16, fp16, fp8 };

/// The precision's name: "fp32", "tf32", "bf16", "fp16" or "fp8".
constexpr char const* to_string(Precision p) noexcept {
    switch (p) {
        case Precision::fp32: return "fp32";
        case Precision::tf32: return "tf32";
        case Precision::bf16: return "bf16";
        case Precision::fp16: return "fp16";
        case Precision::fp8: return "fp8";
    }
    return "unknown";
}

/// Bytes per element of a buffer stored at this precision.
constexpr std::size_t bytes_per_element(Precision p) noexcept {
    switch (p) {
        case Precision::fp32:
        case Precision::tf32: return 4;
        case Precision::bf16:
        case Precision::fp16: return 2;
        case Precision::fp8: return 1;
    }
    return 4;
}

}  // namespace oomguard
