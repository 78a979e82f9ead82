# ctest: the demo's settings (the batch does not fit) against a device large
# enough, same seed: at least one recovered OOM, the report, and the same final
# loss within 1e-5 relative. Then the demo's trace must parse.
include(${CMAKE_CURRENT_LIST_DIR}/run_and_compare.cmake)
run(small ${TRAIN} --bs 1024 --device-memory 1MiB --trace ${WORK}/demo.trace.json --report-json ${WORK}/demo.report.json)
run(large ${TRAIN} --bs 1024 --device-memory 1GiB)
message("${small}")
final_loss(a "${small}")
final_loss(b "${large}")
if(NOT small MATCHES "OOMs survived [1-9]")
    message(FATAL_ERROR "the demo recovered no OOM")
endif()
if(NOT small MATCHES "oomguard report")
    message(FATAL_ERROR "the demo printed no report")
endif()
# The OOM the demo survived is shown once, as oomguard wrote it.
string(REGEX MATCHALL "survived: oomguard: out of memory: tried to allocate" shown "${small}")
list(LENGTH shown n)
if(NOT n EQUAL 1)
    message(FATAL_ERROR "the demo showed the OOM it survived ${n} times, not once")
endif()
# The report adds up: every request the budget denied is an OOM some workload caught,
# and the model's workspace was released as a cache, with its bytes.
file(READ ${WORK}/demo.report.json report)
string(JSON denied GET "${report}" budgets 0 denials)
string(JSON device_ooms GET "${report}" budgets 0 device_ooms)
string(JSON workloads LENGTH "${report}" workloads)
set(caught 0)
math(EXPR last "${workloads} - 1")
foreach(i RANGE ${last})
    string(JSON o GET "${report}" workloads ${i} ooms)
    math(EXPR caught "${caught} + ${o}")
endforeach()
math(EXPR refused "${denied} + ${device_ooms}")
if(NOT caught EQUAL refused)
    message(FATAL_ERROR "the report does not add up: the budget refused ${refused} requests, the workloads caught ${caught} OOMs")
endif()
# The JSON is read when the table is: its "used" is the table's "used now" (both
# the bytes the model still holds), not the 0 left after the model is gone.
string(JSON used GET "${report}" budgets 0 used)
if(NOT small MATCHES "\n  GPU 0 +simulated +0 +[0-9.]+ KiB +([0-9]+)\\.([0-9][0-9]) KiB")
    message(FATAL_ERROR "no 'used now' in KiB in the report's table:\n${small}")
endif()
math(EXPR table_used "${CMAKE_MATCH_1} * 100 + ${CMAKE_MATCH_2}")  # hundredths of a KiB
math(EXPR json_used "(${used} * 100 + 512) / 1024")
math(EXPR off "${table_used} - ${json_used}")
if(used EQUAL 0 OR off GREATER 1 OR off LESS -1)
    message(FATAL_ERROR "the JSON says ${used} bytes used, the table ${CMAKE_MATCH_1}.${CMAKE_MATCH_2} KiB")
endif()
# A versioned layout, and the run's settings.
string(JSON schema GET "${report}" schema)
string(JSON bs GET "${report}" parameters bs)
string(JSON policy GET "${report}" parameters policy)
string(JSON memory GET "${report}" parameters device_memory)
string(JSON g GET "${report}" workloads 0 options global_batch)
string(JSON capacity GET "${report}" budgets 0 capacity)
if(NOT schema EQUAL 1 OR NOT bs EQUAL 1024 OR NOT policy STREQUAL "predictive" OR NOT memory EQUAL 1048576
   OR NOT g EQUAL 1024 OR NOT capacity EQUAL 1048576)
    message(FATAL_ERROR "the report's schema (${schema}) or run parameters (bs ${bs}, policy ${policy}, "
                        "device memory ${memory}, G ${g}, capacity ${capacity}) are not the run's")
endif()
# The run says where each file it wrote is.
foreach(line "report: ${WORK}/demo.report.json" "trace: ${WORK}/demo.trace.json")
    string(FIND "${small}" "\n${line}" at)
    if(at EQUAL -1)
        message(FATAL_ERROR "the demo does not print '${line}'")
    endif()
endforeach()
string(JSON cache GET "${report}" caches 0 name)
string(JSON cache_bytes GET "${report}" caches 0 bytes)
if(NOT cache STREQUAL "activation workspace" OR cache_bytes EQUAL 0)
    message(FATAL_ERROR "the demo released no cache: ${cache} ${cache_bytes}")
endif()
# Transient faults out of the box (the default seed): the run survives them.
run(faults ${TRAIN} --bs 1024 --device-memory 1MiB --fault-rate 0.05)
# CMake has no floating point: loss_compare does the arithmetic.
run(cmp ${CHECK} --demo-loss=${a} --reference-loss=${b})
execute_process(COMMAND ${CMAKE_COMMAND} -E env OOMGUARD_TRACE_FILE=${WORK}/demo.trace.json ${TRACE_TEST}
                RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
if(NOT rc EQUAL 0)
    message(FATAL_ERROR "the demo's trace does not parse:\n${o}\n${e}")
endif()
message("demo loss ${a}, reference loss ${b}; ${refused} requests refused = ${caught} OOMs caught; ${o}")
