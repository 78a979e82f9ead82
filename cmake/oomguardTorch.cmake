# libtorch from a PyPI `torch` wheel (scripts/test installs it, --no-deps, in a
# virtual environment under build/): -DOOMGUARD_TORCH_DIR=<site-packages>/torch.
# Defines oomguard_libtorch, an interface target with the wheel's headers and
# CPU libraries (and its CUDA allocator library where the CUDA toolkit is
# found, for the parts of <oomguard/torch.hpp> that need it). Only oomguard's
# own torch tests and example use it; the library itself needs nothing.
set(OOMGUARD_TORCH_DIR "" CACHE PATH "A libtorch tree (the torch package of a PyPI wheel) for the torch tests")
set(OOMGUARD_HAVE_TORCH OFF)
if(NOT OOMGUARD_TORCH_DIR)
    return()
endif()
foreach(_f include/torch/csrc/api/include/torch/torch.h include/c10/core/Allocator.h lib/libtorch_cpu.so lib/libc10.so)
    if(NOT EXISTS "${OOMGUARD_TORCH_DIR}/${_f}")
        message(FATAL_ERROR "OOMGUARD_TORCH_DIR=${OOMGUARD_TORCH_DIR} has no ${_f}: give the torch package "
                            "directory of a PyPI wheel (<venv>/lib/python3.X/site-packages/torch)")
    endif()
endforeach()
add_library(oomguard_libtorch INTERFACE)
target_include_directories(oomguard_libtorch SYSTEM INTERFACE
    "${OOMGUARD_TORCH_DIR}/include" "${OOMGUARD_TORCH_DIR}/include/torch/csrc/api/include")
target_link_libraries(oomguard_libtorch INTERFACE
    "${OOMGUARD_TORCH_DIR}/lib/libtorch_cpu.so" "${OOMGUARD_TORCH_DIR}/lib/libc10.so")
target_link_options(oomguard_libtorch INTERFACE "-Wl,-rpath,${OOMGUARD_TORCH_DIR}/lib")
if(CUDAToolkit_LIBRARY_DIR)  # the wheel's CPU library loads libcudart.so.13 and libcupti.so.13
    target_link_options(oomguard_libtorch INTERFACE "-Wl,-rpath,${CUDAToolkit_LIBRARY_DIR}")
endif()
target_compile_features(oomguard_libtorch INTERFACE cxx_std_20)
# Link libtorch_cuda too, so that torch runs on the GPU: needs the wheel's CUDA
# dependencies (a full `pip install torch`, as scripts/gpu-check uses).
option(OOMGUARD_TORCH_CUDA_RUNTIME "Link libtorch_cuda (torch on the GPU; needs torch's CUDA wheels)" OFF)
if(TARGET CUDA::cudart AND EXISTS "${OOMGUARD_TORCH_DIR}/lib/libc10_cuda.so")
    target_link_libraries(oomguard_libtorch INTERFACE "${OOMGUARD_TORCH_DIR}/lib/libc10_cuda.so" CUDA::cudart)
    target_compile_definitions(oomguard_libtorch INTERFACE OOMGUARD_TORCH_CUDA=1)
    if(OOMGUARD_TORCH_CUDA_RUNTIME)
        # Nothing names a libtorch_cuda symbol: keep it linked, so its CUDA hooks register.
        target_link_libraries(oomguard_libtorch INTERFACE
            "-Wl,--no-as-needed" "${OOMGUARD_TORCH_DIR}/lib/libtorch_cuda.so" "-Wl,--as-needed")
    endif()
else()
    target_compile_definitions(oomguard_libtorch INTERFACE OOMGUARD_TORCH_CUDA=0)
endif()
set(_oomguard_torch_version "")
foreach(_h include/torch/headeronly/version.h include/torch/version.h)
    if(NOT _oomguard_torch_version AND EXISTS "${OOMGUARD_TORCH_DIR}/${_h}")
        file(STRINGS "${OOMGUARD_TORCH_DIR}/${_h}" _lines REGEX "#define TORCH_VERSION_(MAJOR|MINOR|PATCH) ")
        string(REGEX REPLACE "[^;]*TORCH_VERSION_[A-Z]+ ([0-9]+)" "\\1" _parts "${_lines}")
        string(REPLACE ";" "." _oomguard_torch_version "${_parts}")
    endif()
endforeach()
set(OOMGUARD_HAVE_TORCH ON)
message(STATUS "oomguard: libtorch ${_oomguard_torch_version} from ${OOMGUARD_TORCH_DIR}: the torch tests and example are built")
# c10d's Gloo backend is in libtorch_cpu, but the wheel ships its header
# (ProcessGroupGloo.hpp) without Gloo's own headers, which it includes; only
# shared_ptrs to Gloo's types are in its layout, so any Gloo headers that
# compile with it will do (Debian's libgloo-dev; nothing of libgloo is linked).
# oomguard_libtorch_gloo: oomguard_libtorch plus those headers, for the
# data-parallel example and its test. <oomguard/c10d.hpp> itself needs none of them.
find_path(OOMGUARD_GLOO_INCLUDE_DIR gloo/algorithm.h HINTS "${OOMGUARD_TORCH_DIR}/include"
          DOC "Gloo's headers, for c10d's ProcessGroupGloo.hpp (apt-get install libgloo-dev)")
set(OOMGUARD_HAVE_GLOO OFF)
if(OOMGUARD_GLOO_INCLUDE_DIR)
    add_library(oomguard_libtorch_gloo INTERFACE)
    target_link_libraries(oomguard_libtorch_gloo INTERFACE oomguard_libtorch)
    target_include_directories(oomguard_libtorch_gloo SYSTEM INTERFACE "${OOMGUARD_GLOO_INCLUDE_DIR}")
    target_compile_definitions(oomguard_libtorch_gloo INTERFACE USE_C10D_GLOO)
    set(OOMGUARD_HAVE_GLOO ON)
    message(STATUS "oomguard: Gloo headers in ${OOMGUARD_GLOO_INCLUDE_DIR}: the c10d example and test are built")
else()
    message(STATUS "oomguard: Gloo's headers not found: the c10d example and its test are not built "
                   "(apt-get install libgloo-dev, or set OOMGUARD_GLOO_INCLUDE_DIR)")
endif()
# The data-parallel example's NCCL variant (--backend nccl) needs NCCL's header
# (the toolkit's, or the nvidia-nccl wheel's beside torch) and CUDA: it is
# compiled wherever they are, linked and run only with OOMGUARD_TORCH_CUDA_RUNTIME.
set(OOMGUARD_HAVE_TORCH_NCCL OFF)
if(OOMGUARD_HAVE_GLOO AND TARGET CUDA::cudart)
    find_path(OOMGUARD_NCCL_INCLUDE_DIR nccl.h
              HINTS ${CUDAToolkit_INCLUDE_DIRS} "${OOMGUARD_TORCH_DIR}/../nvidia/nccl/include"
              DOC "NCCL's header, for c10d's ProcessGroupNCCL.hpp")
    if(OOMGUARD_NCCL_INCLUDE_DIR)
        set(OOMGUARD_HAVE_TORCH_NCCL ON)
    endif()
endif()
