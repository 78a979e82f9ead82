# Shared by the example checks (demo_check, demo_policies, torch_check):
#   run(<out> <command...>)            runs it without OOMGUARD_CONF; fails on a nonzero exit
#   final_loss(<out> <text>)           the "final loss X" a run printed; fails when missing
#   same_loss(<label> <loss> <reference> [limit])   loss_compare (${CHECK}), 1e-5 by default
function(run out)
    execute_process(COMMAND ${CMAKE_COMMAND} -E env --unset=OOMGUARD_CONF ${ARGN}
                    RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${o}\n${e}")
    endif()
    set(${out} "${o}" PARENT_SCOPE)
endfunction()
function(final_loss out text)
    string(REGEX MATCH "final loss ([0-9.eE+-]+)" _ "${text}")
    if(CMAKE_MATCH_1 STREQUAL "")
        message(FATAL_ERROR "no final loss printed:\n${text}")
    endif()
    set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
endfunction()
function(same_loss label loss reference)
    set(limit 1e-5)
    if(ARGC GREATER 3)
        set(limit ${ARGV3})
    endif()
    execute_process(COMMAND ${CHECK} --demo-loss=${loss} --reference-loss=${reference} --limit=${limit}
                    RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${label}: ${o}${e}")
    endif()
    message("${label}: ${o}")
endfunction()
