# Torch and pybind11 locations, asked of the Python interpreter that builds us.
#
# Why not find_package(Torch): with a CUDA build of torch its config always
# searches for a complete CUDA toolkit (nvrtc, cuDNN, ...) even for a CPU-only
# build of ours, and fails on machines with a partial toolkit. The include and
# library paths that torch.utils.cpp_extension reports are all we need.
#
# Sets: TORCH_INCLUDE_DIRS, TORCH_LIBRARY_DIR, TORCH_VERSION, TORCH_CXX11_ABI,
#       TORCH_SITE_PACKAGES, and imports pybind11.

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
  "import os, torch, torch.utils.cpp_extension as c; print(','.join(c.include_paths())); print(c.library_paths()[0]); print(torch.__version__); print(int(torch.compiled_with_cxx11_abi())); print(os.path.dirname(os.path.dirname(torch.__file__)))"
  OUTPUT_VARIABLE _flextron_torch_out
  ERROR_VARIABLE _flextron_torch_err
  RESULT_VARIABLE _flextron_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _flextron_torch_rc EQUAL 0)
  message(FATAL_ERROR "Could not import torch with ${Python_EXECUTABLE}: ${_flextron_torch_err}")
endif()
string(REPLACE "\n" ";" _flextron_torch_lines "${_flextron_torch_out}")
list(GET _flextron_torch_lines -5 TORCH_INCLUDE_DIRS_STR)
list(GET _flextron_torch_lines -4 TORCH_LIBRARY_DIR)
list(GET _flextron_torch_lines -3 TORCH_VERSION)
list(GET _flextron_torch_lines -2 TORCH_CXX11_ABI)
list(GET _flextron_torch_lines -1 TORCH_SITE_PACKAGES)
string(REPLACE "," ";" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS_STR}")
message(STATUS "torch ${TORCH_VERSION} at ${TORCH_LIBRARY_DIR}")

execute_process(
  COMMAND "${Python_EXECUTABLE}" -m pybind11 --cmakedir
  OUTPUT_VARIABLE pybind11_DIR
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _flextron_pybind_rc)
if(NOT _flextron_pybind_rc EQUAL 0)
  message(FATAL_ERROR "pybind11 is not installed for ${Python_EXECUTABLE} (pip install pybind11)")
endif()
find_package(pybind11 CONFIG REQUIRED)

# Link a target against torch's CPU libraries (always) and CUDA libraries (when asked).
function(flextron_link_torch target with_cuda)
  target_include_directories(${target} SYSTEM PRIVATE ${TORCH_INCLUDE_DIRS})
  target_compile_definitions(${target} PRIVATE
    _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI}
    FLEXTRON_TORCH_VERSION="${TORCH_VERSION}")
  set(_libs c10 torch torch_cpu)
  if(with_cuda)
    list(APPEND _libs c10_cuda torch_cuda)
  endif()
  foreach(_lib ${_libs})
    find_library(_flextron_lib_${_lib} NAMES ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(${target} PRIVATE "${_flextron_lib_${_lib}}")
  endforeach()
endfunction()
