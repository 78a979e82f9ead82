# Warnings and sanitizers for oomguard's own tests, examples and benchmarks.
function(oomguard_strict target)
    get_target_property(_type ${target} TYPE)
    target_compile_options(${target} PRIVATE
        $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>
        $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Wall,-Wextra>)
    if(OOMGUARD_SANITIZE)
        target_compile_options(${target} PRIVATE
            $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${OOMGUARD_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all>)
        if(NOT _type STREQUAL "OBJECT_LIBRARY" AND NOT _type STREQUAL "STATIC_LIBRARY")
            target_link_options(${target} PRIVATE -fsanitize=${OOMGUARD_SANITIZE})
        endif()
    endif()
endfunction()
