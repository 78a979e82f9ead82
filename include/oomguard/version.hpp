// The library version; the CMake package's version file is generated from the same numbers.
#pragma once

#define OOMGUARD_VERSION_MAJOR 0
#define OOMGUARD_VERSION_MINOR 1
#define OOMGUARD_VERSION_PATCH 0
#define OOMGUARD_VERSION_STRING "0.1.0"
