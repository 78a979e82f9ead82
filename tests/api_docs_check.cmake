# The API reference builds and every public name has a doc comment: Doxygen
# over docs/Doxyfile (WARN_IF_UNDOCUMENTED, WARN_AS_ERROR), any warning fails.
# -DDOXYGEN=<doxygen> -DSOURCE=<project root> -DWORK=<scratch dir>
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
file(READ "${SOURCE}/docs/Doxyfile" config)
string(APPEND config "\nOUTPUT_DIRECTORY = ${WORK}\nWARN_LOGFILE = ${WORK}/warnings.txt\n")
file(WRITE "${WORK}/Doxyfile" "${config}")
execute_process(COMMAND "${DOXYGEN}" "${WORK}/Doxyfile" WORKING_DIRECTORY "${SOURCE}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(warnings "")
if(EXISTS "${WORK}/warnings.txt")
    file(READ "${WORK}/warnings.txt" warnings)
endif()
if(NOT rc EQUAL 0 OR NOT warnings STREQUAL "" OR NOT err STREQUAL "")
    message(FATAL_ERROR "doxygen exited ${rc}; every public name needs a doc comment:\n${warnings}${err}")
endif()
if(NOT EXISTS "${WORK}/html/classoomguard_1_1AdaptiveBatch.html")
    message(FATAL_ERROR "doxygen wrote no page for oomguard::AdaptiveBatch in ${WORK}/html")
endif()
# The namespace's page: without a doc comment on the namespace, Doxygen neither lists
# nor checks the free functions, enums and variables (make_budget, is_device_oom, ...).
if(NOT EXISTS "${WORK}/html/namespaceoomguard.html")
    message(FATAL_ERROR "doxygen wrote no page for namespace oomguard: its free functions go unchecked")
endif()
file(READ "${WORK}/html/namespaceoomguard.html" ns)
foreach(name make_budget is_device_oom adaptive_batch BatchEventKind)
    string(FIND "${ns}" "${name}" at)
    if(at EQUAL -1)
        message(FATAL_ERROR "the namespace page does not list oomguard::${name}")
    endif()
endforeach()
message(STATUS "api docs: ${WORK}/html/index.html, every public name documented")
