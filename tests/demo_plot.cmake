# ctest: the demo's --plot draws an SVG that parses as XML (xmllint) and that a
# real renderer (rsvg-convert, librsvg) turns into a PNG that is not blank.
set(svg ${WORK}/demo.plot.svg)
set(png ${WORK}/demo.plot.png)
file(REMOVE ${svg} ${png})
function(run)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${o}\n${e}")
    endif()
    message("${o}")
endfunction()
run(${CMAKE_COMMAND} -E env --unset=OOMGUARD_CONF ${TRAIN} --bs 1024 --device-memory 1MiB --plot ${svg})
run(${XMLLINT} --noout ${svg})
file(READ ${svg} text)
foreach(part "<svg xmlns=\"http://www.w3.org/2000/svg\"" "device memory (" "micro-batch size" "GPU 0 capacity"
             "GPU 0 budget cap" "OOM (" "train micro-batch" "</svg>")
    string(FIND "${text}" "${part}" at)
    if(at EQUAL -1)
        message(FATAL_ERROR "${svg} has no '${part}'")
    endif()
endforeach()
# The data, not only the frame and the legend: both memory series, one marker per OOM.
string(REGEX MATCHALL "<polyline " lines "${text}")
list(LENGTH lines n)
if(n LESS 2)
    message(FATAL_ERROR "${svg}: ${n} memory series drawn, expected the peaks and the held bytes")
endif()
string(REGEX MATCH "OOM \\(([0-9]+)\\)" _ "${text}")
set(ooms ${CMAKE_MATCH_1})
string(REGEX MATCHALL "stroke=\"#d62728\" stroke-width=\"2.5\"" markers "${text}")
list(LENGTH markers m)
math(EXPR drawn "${m} - 1")  # the legend's
if(ooms STREQUAL "" OR ooms EQUAL 0 OR NOT drawn EQUAL ooms)
    message(FATAL_ERROR "${svg}: ${drawn} OOM markers for '${ooms}' OOMs")
endif()
run(${RSVG} --format=png --output=${png} ${svg})
# Blue: the peaks (a line across the run; the legend's key alone is ~60 pixels).
# Red: the OOM markers (each ~30 pixels).
math(EXPR red "${ooms} * 15 + 40")
run(${PYTHON} ${PNG_CHECK} ${png} 0.02 6 1f77b4:600 d62728:${red})
# A run whose weights do not fit the device dies at setup, before any step: its plot
# still shows that OOM (the report hears of it through note_oom), as one marker.
set(setup_svg ${WORK}/demo.setup-oom.svg)
file(REMOVE ${setup_svg})
execute_process(COMMAND ${CMAKE_COMMAND} -E env --unset=OOMGUARD_CONF ${TRAIN} --device-memory 1MiB --hidden 16384
                        --plot ${setup_svg}
                RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
if(NOT rc EQUAL 1 OR NOT EXISTS ${setup_svg})
    message(FATAL_ERROR "the run whose weights do not fit: exit ${rc} (expected 1), or no plot:\n${o}\n${e}")
endif()
run(${XMLLINT} --noout ${setup_svg})
file(READ ${setup_svg} setup_text)
string(REGEX MATCHALL "stroke=\"#d62728\" stroke-width=\"2.5\"" setup_markers "${setup_text}")
list(LENGTH setup_markers sm)
string(FIND "${setup_text}" "OOM (1), at its demand" at)
if(at EQUAL -1 OR NOT sm EQUAL 2)  # the OOM's and the legend's
    message(FATAL_ERROR "${setup_svg}: the setup OOM is not drawn (${sm} markers with the legend's)")
endif()
# The unit test's plot, whose labels hold markup and control characters, parses too.
execute_process(COMMAND ${CMAKE_COMMAND} -E env OOMGUARD_PLOT_FILE=${WORK}/escaped.plot.svg ${REPORT_TEST}
                        --test-case=*plot*
                RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
if(NOT rc EQUAL 0 OR NOT EXISTS ${WORK}/escaped.plot.svg)
    message(FATAL_ERROR "the plot unit test failed or wrote nothing:\n${o}\n${e}")
endif()
run(${XMLLINT} --noout ${WORK}/escaped.plot.svg)
message("${ooms} OOMs, ${drawn} markers, ${n} memory series")
