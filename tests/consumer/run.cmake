# ctest driver: a user's project gets oomguard by each route the README shows,
# builds the consumer and runs it:
#   find_package    the package installed with `cmake --install <build> --prefix P`,
#                   P chosen at install time (configure said another prefix), and
#                   then moved elsewhere: nothing installed may name P
#   add_subdirectory  the source tree
#   FetchContent    a git repository of the sources, by its version tag (file://, no network)
#   pkg-config      the moved prefix's .pc alone on pkg-config's path (PKG_CONFIG_LIBDIR)
# In: SOURCE, WORK, GENERATOR, GIT, PKG_CONFIG, CXX (the C++ compiler).
file(REMOVE_RECURSE ${WORK})
function(run)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
    if(NOT rc EQUAL 0)
        string(REPLACE ";" " " cmd "${ARGN}")
        message(FATAL_ERROR "failed (${rc}): ${cmd}\n${o}\n${e}")
    endif()
    set(OUT "${o}${e}" PARENT_SCOPE)
endfunction()
foreach(tool GIT PKG_CONFIG CXX)
    if(NOT ${tool} OR NOT EXISTS "${${tool}}")
        message(FATAL_ERROR "the package test needs ${tool} (found: '${${tool}}'): apt-get install git pkg-config g++")
    endif()
endforeach()
file(STRINGS ${SOURCE}/include/oomguard/version.hpp line REGEX "#define OOMGUARD_VERSION_STRING")
string(REGEX MATCH "[0-9]+\\.[0-9]+\\.[0-9]+" version "${line}")
# The consumer prints the version it was compiled against: proof of which headers it got.
function(consume route)
    run(${ARGN})
    if(NOT OUT MATCHES "consumer: oomguard ${version}, caught as expected")
        message(FATAL_ERROR "${route}: the consumer did not print what was expected:\n${OUT}")
    endif()
    message(STATUS "${route}: built and ran the consumer")
endfunction()

# Install: the prefix given at install time wins over the configure-time one.
set(configured ${WORK}/configured-prefix)  # never written
set(installed ${WORK}/installed)
set(prefix ${WORK}/moved)
run(${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/lib -G ${GENERATOR} -DCMAKE_INSTALL_PREFIX=${configured}
    -DOOMGUARD_BUILD_TESTS=OFF -DOOMGUARD_BUILD_EXAMPLES=OFF -DOOMGUARD_BUILD_BENCHMARKS=OFF
    -DOOMGUARD_INSTALL=ON)
run(${CMAKE_COMMAND} --install ${WORK}/lib --prefix ${installed})
if(EXISTS ${configured})
    message(FATAL_ERROR "cmake --install --prefix ${installed} wrote into the configure-time prefix ${configured}")
endif()
foreach(f include/oomguard/oomguard.hpp share/cmake/oomguard/oomguardConfig.cmake share/pkgconfig/oomguard.pc)
    if(NOT EXISTS ${installed}/${f})
        message(FATAL_ERROR "cmake --install --prefix ${installed} installed no ${f}")
    endif()
endforeach()
# Relocatable: no installed file names either prefix, and a moved tree still works.
file(GLOB_RECURSE files ${installed}/share/*)
foreach(f IN LISTS files)
    file(READ ${f} text)
    foreach(p ${installed} ${configured})
        string(FIND "${text}" "${p}" at)
        if(NOT at EQUAL -1)
            message(FATAL_ERROR "${f} names the prefix ${p}: it breaks when the tree is installed elsewhere or moved\n${text}")
        endif()
    endforeach()
endforeach()
file(RENAME ${installed} ${prefix})

# 1. find_package, from the moved prefix.
run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer -B ${WORK}/by-package -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${prefix})
if(NOT OUT MATCHES "consumer: oomguard ${version} from ${prefix}/share/cmake/oomguard")
    message(FATAL_ERROR "find_package did not find the package under ${prefix}:\n${OUT}")
endif()
run(${CMAKE_COMMAND} --build ${WORK}/by-package)
consume(find_package ${WORK}/by-package/consumer)

# 2. add_subdirectory of the source tree.
run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer -B ${WORK}/by-subdirectory -G ${GENERATOR}
    -DOOMGUARD_SOURCE_DIR=${SOURCE})
run(${CMAKE_COMMAND} --build ${WORK}/by-subdirectory)
consume(add_subdirectory ${WORK}/by-subdirectory/consumer)

# 3. FetchContent by tag, from a git repository of what a release holds (the
# working tree's files, so that uncommitted changes are what is tested).
set(repo ${WORK}/oomguard-git)
file(MAKE_DIRECTORY ${repo})
foreach(item CMakeLists.txt LICENSE cmake include)
    file(COPY ${SOURCE}/${item} DESTINATION ${repo})
endforeach()
set(git ${GIT} -C ${repo} -c user.name=oomguard-test -c user.email=test@oomguard.invalid -c init.defaultBranch=main
    -c commit.gpgsign=false -c tag.gpgsign=false)
run(${git} init -q)
run(${git} add -A)
run(${git} commit -q -m "oomguard ${version}")
run(${git} tag v${version})
run(${git} commit -q --allow-empty -m "after the release")  # the tag, not the branch's head, is what is fetched
run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumer -B ${WORK}/by-fetchcontent -G ${GENERATOR}
    -DOOMGUARD_GIT_REPOSITORY=file://${repo} -DOOMGUARD_GIT_TAG=v${version})
run(${GIT} -C ${WORK}/by-fetchcontent/_deps/oomguard-src describe --tags --exact-match)
if(NOT OUT MATCHES "^v${version}")
    message(FATAL_ERROR "FetchContent checked out '${OUT}', not the tag v${version}")
endif()
run(${CMAKE_COMMAND} --build ${WORK}/by-fetchcontent)
consume(FetchContent ${WORK}/by-fetchcontent/consumer)

# 4. pkg-config: only the moved prefix's .pc on its path, none of the system's.
unset(ENV{PKG_CONFIG_PATH})
set(ENV{PKG_CONFIG_LIBDIR} ${prefix}/share/pkgconfig)
run(${PKG_CONFIG} --cflags --libs oomguard)
string(STRIP "${OUT}" flags)
run(${PKG_CONFIG} --modversion oomguard)
if(NOT OUT MATCHES "^${version}")
    message(FATAL_ERROR "pkg-config says oomguard ${OUT}, the sources ${version}")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
# The .pc leaves -std to the user (clang < 16 defaults to C++14), as the README says.
run(${CXX} -std=c++17 -MD -MF ${WORK}/by-pkg-config.d ${SOURCE}/tests/consumer/main.cpp ${flags} -o ${WORK}/by-pkg-config)
file(READ ${WORK}/by-pkg-config.d deps)
if(NOT deps MATCHES "${prefix}/[^ ]*oomguard/oomguard\\.hpp")
    message(FATAL_ERROR "pkg-config's flags (${flags}) did not take the headers from ${prefix}:\n${deps}")
endif()
consume(pkg-config ${WORK}/by-pkg-config)
message(STATUS "installed with --prefix ${installed} (configured for ${configured}), moved to ${prefix}: "
               "find_package, add_subdirectory, FetchContent v${version} and pkg-config all built and ran the consumer")
