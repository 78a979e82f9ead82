// What every README snippet may use: it is compiled inside a function after this.
#pragma once

#include <oomguard/oomguard.hpp>
#include <oomguard/cuda_caches.hpp>
#include <oomguard/device_selector.hpp>
#include <oomguard/report.hpp>
#include <oomguard/simulated_devices.hpp>
#include <oomguard/thread_consensus.hpp>
#include <oomguard/trace.hpp>

#include <oomguard/config.hpp>

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
