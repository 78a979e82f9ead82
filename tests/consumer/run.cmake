# ctest driver: install oomguard into a prefix, then build and run a consumer
# through find_package, through add_subdirectory, and through pkg-config.
file(REMOVE_RECURSE ${WORK})
function(run)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
        string(REPLACE ";" " " cmd "${ARGN}")
        message(FATAL_ERROR "failed (${rc}): ${cmd}")
    endif()
endfunction()

run(${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/lib -G ${GENERATOR} -DCMAKE_INSTALL_PREFIX=${WORK}/prefix
    -DOOMGUARD_BUILD_TESTS=OFF -DOOMGUARD_BUILD_EXAMPLES=OFF -DOOMGUARD_BUILD_BENCHMARKS=OFF
    -DOOMGUARD_INSTALL=ON)
run(${CMAKE_COMMAND} --install ${WORK}/lib)

run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer -B ${WORK}/by-package -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${WORK}/prefix)
run(${CMAKE_COMMAND} --build ${WORK}/by-package)
run(${WORK}/by-package/consumer)

run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer -B ${WORK}/by-subdirectory -G ${GENERATOR}
    -DOOMGUARD_SOURCE_DIR=${SOURCE})
run(${CMAKE_COMMAND} --build ${WORK}/by-subdirectory)
run(${WORK}/by-subdirectory/consumer)

find_program(PKG_CONFIG pkg-config)
find_program(CXX NAMES c++ g++)
if(PKG_CONFIG AND CXX)
    set(ENV{PKG_CONFIG_PATH} ${WORK}/prefix/share/pkgconfig)
    execute_process(COMMAND ${PKG_CONFIG} --cflags --libs oomguard OUTPUT_VARIABLE flags
                    RESULT_VARIABLE rc OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "pkg-config does not know oomguard")
    endif()
    separate_arguments(flags UNIX_COMMAND "${flags}")
    run(${CXX} ${SOURCE}/tests/consumer/main.cpp ${flags} -o ${WORK}/by-pkg-config)
    run(${WORK}/by-pkg-config)
else()
    message(STATUS "pkg-config or a C++ compiler not found: the pkg-config consumer is skipped")
endif()
