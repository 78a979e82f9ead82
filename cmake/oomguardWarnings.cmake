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

# Thrust's CPP system trips UBSan's null check inside CCCL (tests/ubsan.supp):
# such targets make that one check recoverable so the suppression file applies;
# halt_on_error keeps every unsuppressed report fatal.
set(OOMGUARD_UBSAN_ENV "UBSAN_OPTIONS=suppressions=${PROJECT_SOURCE_DIR}/tests/ubsan.supp:halt_on_error=1:print_stacktrace=1")
function(oomguard_uses_thrust target)
    if(OOMGUARD_SANITIZE MATCHES "undefined")
        target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize-recover=null>)
    endif()
endfunction()
