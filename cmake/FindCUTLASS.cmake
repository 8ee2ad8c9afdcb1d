# Find the CUTLASS headers and make the imported target CUTLASS::CUTLASS.
#
# Looks in CUTLASS_DIR (a CUTLASS checkout: include/ and tools/util/include/),
# else in the nvidia-cutlass wheel of the building Python
# (cutlass_library/source/include and source/tools/util/include).
# Sets CUTLASS_FOUND, CUTLASS_INCLUDE_DIRS, CUTLASS_VERSION.

set(_cutlass_candidates "")
if(DEFINED ENV{CUTLASS_DIR})
  list(APPEND _cutlass_candidates "$ENV{CUTLASS_DIR}")
endif()
if(CUTLASS_DIR)
  list(APPEND _cutlass_candidates "${CUTLASS_DIR}")
endif()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
  "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(os.path.dirname(s.origin), 'source') if s else '')"
  OUTPUT_VARIABLE _cutlass_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(_cutlass_wheel)
  list(APPEND _cutlass_candidates "${_cutlass_wheel}")
endif()

foreach(_root ${_cutlass_candidates})
  if(EXISTS "${_root}/include/cutlass/cutlass.h")
    set(CUTLASS_INCLUDE_DIRS "${_root}/include" "${_root}/tools/util/include")
    break()
  endif()
endforeach()

if(CUTLASS_INCLUDE_DIRS)
  list(GET CUTLASS_INCLUDE_DIRS 0 _cutlass_inc)
  file(STRINGS "${_cutlass_inc}/cutlass/version.h" _cutlass_ver REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
  string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*CUTLASS_MINOR ([0-9]+).*CUTLASS_PATCH ([0-9]+).*" "\\1.\\2.\\3"
         CUTLASS_VERSION "${_cutlass_ver}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(CUTLASS REQUIRED_VARS CUTLASS_INCLUDE_DIRS VERSION_VAR CUTLASS_VERSION)

if(CUTLASS_FOUND AND NOT TARGET CUTLASS::CUTLASS)
  add_library(CUTLASS::CUTLASS INTERFACE IMPORTED)
  set_target_properties(CUTLASS::CUTLASS PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CUTLASS_INCLUDE_DIRS}")
endif()
