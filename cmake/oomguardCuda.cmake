# Wires the CUDA toolkit into the oomguard target when it is present, both in
# the build tree and in an installed package, so the consumer's machine decides.
# Without the toolkit everything but the CudaRuntime backend works.
#
# In: _oomguard_target (the target), _oomguard_build_tree (TRUE in the build
# tree, where the wiring must stay out of the exported target).
if(NOT TARGET CUDA::cudart)
    find_package(CUDAToolkit QUIET)
endif()
set(_oomguard_pre "")
set(_oomguard_post "")
if(_oomguard_build_tree)
    set(_oomguard_pre "$<BUILD_INTERFACE:")
    set(_oomguard_post ">")
endif()
if(TARGET CUDA::cudart)
    target_link_libraries(${_oomguard_target} INTERFACE ${_oomguard_pre}CUDA::cudart${_oomguard_post})
    # Thrust, CUB and libcu++ live in include/cccl; nvcc adds it itself, a host
    # compiler needs it spelled out.
    foreach(_oomguard_dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
        if(EXISTS "${_oomguard_dir}/cccl")
            target_include_directories(${_oomguard_target} SYSTEM INTERFACE
                "${_oomguard_pre}${_oomguard_dir}/cccl${_oomguard_post}")
        endif()
    endforeach()
else()
    target_compile_definitions(${_oomguard_target} INTERFACE
        ${_oomguard_pre}OOMGUARD_HAS_CUDA=0${_oomguard_post})
endif()
