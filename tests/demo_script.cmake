# ctest: scripts/demo passes its arguments through, and they win over its own
# settings: each of --bs, --device-memory (--budget on a GPU), --trace and
# --plot is added only when the user's arguments do not give it. The GPU and
# simulated paths are pinned with OOMGUARD_DEMO_GPU, so the test reads the same
# on a machine with a GPU. It names what
# it runs on stderr, leaving stdout to the example. A stub cmake and a stub
# train_loop (which prints its arguments, one a line) stand in for the build.
set(dir ${WORK}/demo-script)
file(REMOVE_RECURSE ${dir})
file(MAKE_DIRECTORY ${dir}/build/examples)
file(WRITE ${dir}/cmake "#!/bin/sh\nexit 0\n")
file(WRITE ${dir}/build/examples/train_loop "#!/bin/sh\nfor a in \"$@\"; do echo \"arg: $a\"; done\n")
file(COPY_FILE ${dir}/build/examples/train_loop ${dir}/build/examples/train_loop_cuda)
foreach(f cmake build/examples/train_loop build/examples/train_loop_cuda)
    file(CHMOD ${dir}/${f} PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE)
endforeach()
# demo(<expected argument lines> <script args...>)
function(demo expected)
    if(NOT DEFINED demo_gpu)
        set(demo_gpu 0)
    endif()
    execute_process(COMMAND ${CMAKE_COMMAND} -E env CMAKE=${dir}/cmake OOMGUARD_DEMO_BUILD_DIR=${dir}/build
                            OOMGUARD_DEMO_GPU=${demo_gpu} ${SCRIPT} ${ARGN}
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    set(where "scripts/demo ${ARGN}")
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${where}: exit ${rc}\n${out}\n${err}")
    endif()
    string(REGEX REPLACE "\n$" "" out "${out}")
    string(REPLACE "\n" ";" got "${out}")
    list(TRANSFORM got REPLACE "^arg: " "")
    if(NOT got STREQUAL expected)
        message(FATAL_ERROR "${where}: train_loop got\n  ${got}\nexpected\n  ${expected}\nstderr:\n${err}")
    endif()
    if(NOT err MATCHES "scripts/demo: running ${dir}/build/examples/${demo_binary} ")
        message(FATAL_ERROR "${where}: does not say on stderr what it runs:\n${err}")
    endif()
endfunction()
set(demo_binary train_loop)
set(trace --trace ${dir}/build.trace.json)
set(plot --plot ${dir}/build.svg)
demo("--bs;1024;--device-memory;1MiB;${trace};${plot}")
demo("--device-memory;1MiB;${trace};${plot};--bs;512" --bs 512)
demo("--device-memory;1MiB;${trace};${plot};--bs=512" --bs=512)
demo("--bs;1024;--device-memory;1MiB;${trace};--plot;x.svg;--epochs;2" --plot x.svg --epochs 2)
demo("--bs;1024;${trace};${plot};--device-memory=4MiB;--policy;bisect" --device-memory=4MiB --policy bisect)
demo("--bs;1024;--device-memory;1MiB;${plot};--trace;t.json" --trace t.json)
demo("--bs;1024;--device-memory;1MiB;${trace};${plot};--precision;fp32>bf16" --precision "fp32>bf16")
# On a GPU (pinned: OOMGUARD_DEMO_GPU=1): the CUDA build under a 1 MiB budget.
set(demo_gpu 1)
set(demo_binary train_loop_cuda)
demo("--bs;1024;--budget;1MiB;${trace};${plot}")
demo("--bs;1024;${trace};${plot};--budget;4MiB" --budget 4MiB)
message("scripts/demo: the user's flags win over its settings; it names what it runs on stderr")
