# ctest: scripts/test says what it will cost before it costs anything: --help
# gives the legs, the time all of them take and that it installs Debian
# packages as root; a leg it does not know is refused (exit 2, naming it and the
# valid ones) before any package is installed or anything built.
execute_process(COMMAND ${SCRIPT} --help RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
foreach(part "Usage: scripts/test [leg ...]" "about 15-25 minutes" "As root it installs the" "apt-get" "release" "rmm")
    string(FIND "${out}" "${part}" at)
    if(NOT rc EQUAL 0 OR at EQUAL -1)
        message(FATAL_ERROR "scripts/test --help: exit ${rc}, or no '${part}':\n${out}\n${err}")
    endif()
endforeach()
execute_process(COMMAND ${SCRIPT} release nonsense RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 2 OR NOT err MATCHES "unknown leg 'nonsense' \\(valid: release asan tsan clang fuzz torch rmm"
   OR "${out}${err}" MATCHES "installing|=== scripts/test: leg")
    message(FATAL_ERROR "scripts/test release nonsense: exit ${rc} (expected 2 before any work)\n${out}\n${err}")
endif()
message("scripts/test: --help tells the cost; an unknown leg is refused before any work")
