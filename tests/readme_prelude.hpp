// What every README snippet may use: it is compiled inside a function after this.
#pragma once

#include <oomguard/oomguard.hpp>
#include <oomguard/cuda_caches.hpp>
#include <oomguard/device_selector.hpp>
#include <oomguard/report.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/trace.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>

// A stand-in for libtorch's type, so the libtorch rule compiles without libtorch.
namespace c10 {
struct OutOfMemoryError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
}  // namespace c10
