// The umbrella header: what a training loop on a GPU needs. Kept cheap to
// compile (scripts/include-cost measures it). Opt-in headers:
//   <oomguard/config.hpp>             OOMGUARD_CONF parsing (parse_config,
//                                     config_from_env, BatchOptions::apply)
//   <oomguard/simulated_devices.hpp>  simulated GPUs and fault plans for tests
//                                     (included here only when there is no CUDA
//                                     toolkit, where it is the default backend)
//   <oomguard/report.hpp>, <oomguard/trace.hpp>, <oomguard/plot.hpp>  what happened
//   Thrust, MPI, NCCL, CCCL cuda::mr (resource.hpp), RMM and libtorch (torch.hpp,
//   C++20) integrations have their own headers.
#pragma once

#include <oomguard/version.hpp>
#include <oomguard/backend.hpp>
#include <oomguard/errors.hpp>
#include <oomguard/classify.hpp>
#include <oomguard/memory_budget.hpp>
#include <oomguard/device_buffer.hpp>
#include <oomguard/precision.hpp>
#include <oomguard/shrink_policy.hpp>
#include <oomguard/cache_registry.hpp>
#include <oomguard/scoped_cache_release.hpp>
#include <oomguard/adaptive_batch.hpp>
#if OOMGUARD_HAS_CUDA
#include <oomguard/cuda_runtime.hpp>
#else
#include <oomguard/simulated_devices.hpp>
#endif
