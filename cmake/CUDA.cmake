# Decide whether to build the CUDA kernels and find the pieces they need.
#
# FLEXTRON_CUDA: auto (build when nvcc and a CUDA build of torch are present),
#                1 (required: fail loudly otherwise), 0 (never).
# FLEXTRON_CUDA_ARCHS: ';'-separated compute capabilities, e.g. "80;90a".
#
# Sets FLEXTRON_WITH_CUDA and, when on, FLEXTRON_CUDA_GENCODE (nvcc flags),
# FLEXTRON_WITH_SM90 (90a is in the list: build the sm90a-only kernels),
# FLEXTRON_CUDA_ARCHS_LABEL (the archs comma-separated: a ';' would split the
# compile definition in two) and FLEXTRON_CUDA_EXTRA_INCLUDES (the
# cuBLAS/cuSPARSE headers shipped in torch's nvidia-* wheels, which ATen/cuda
# headers include).

set(FLEXTRON_WITH_CUDA OFF)
if(FLEXTRON_CUDA STREQUAL "0")
  message(STATUS "FLEXTRON_CUDA=0: CUDA kernels not built")
  return()
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch; print(torch.version.cuda or '')"
  OUTPUT_VARIABLE FLEXTRON_TORCH_CUDA OUTPUT_STRIP_TRAILING_WHITESPACE)

# The toolkit root is the directory holding both bin/nvcc and include/cuda_runtime.h;
# `which nvcc` may be a wrapper script outside it.
set(_flextron_cuda_roots $ENV{CUDA_HOME} $ENV{CUDA_PATH} $ENV{CUDAToolkit_ROOT} /usr/local/cuda)
find_program(_flextron_nvcc_on_path nvcc)
if(_flextron_nvcc_on_path)
  get_filename_component(_flextron_nvcc_real "${_flextron_nvcc_on_path}" REALPATH)
  get_filename_component(_flextron_nvcc_root "${_flextron_nvcc_real}" DIRECTORY)
  get_filename_component(_flextron_nvcc_root "${_flextron_nvcc_root}" DIRECTORY)
  list(APPEND _flextron_cuda_roots "${_flextron_nvcc_root}")
endif()
set(FLEXTRON_CUDA_ROOT "")
foreach(_root ${_flextron_cuda_roots})
  if(EXISTS "${_root}/bin/nvcc" AND EXISTS "${_root}/include/cuda_runtime.h")
    set(FLEXTRON_CUDA_ROOT "${_root}")
    break()
  endif()
endforeach()

set(_flextron_why "")
if(NOT FLEXTRON_TORCH_CUDA)
  set(_flextron_why "torch is a CPU-only build")
elseif(NOT FLEXTRON_CUDA_ROOT)
  set(_flextron_why "no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found; set CUDA_HOME")
endif()
if(_flextron_why)
  if(FLEXTRON_CUDA STREQUAL "1")
    message(FATAL_ERROR "FLEXTRON_CUDA=1 but ${_flextron_why}")
  endif()
  message(STATUS "CUDA kernels not built: ${_flextron_why}")
  return()
endif()

set(CMAKE_CUDA_COMPILER "${FLEXTRON_CUDA_ROOT}/bin/nvcc")
set(CUDAToolkit_ROOT "${FLEXTRON_CUDA_ROOT}")
# Architectures are given as explicit -gencode flags below (CMake's own list
# spelling of "90a" varies between versions).
set(CMAKE_CUDA_ARCHITECTURES OFF)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

set(FLEXTRON_CUDA_GENCODE "")
foreach(_arch ${FLEXTRON_CUDA_ARCHS})
  list(APPEND FLEXTRON_CUDA_GENCODE "-gencode=arch=compute_${_arch},code=sm_${_arch}")
endforeach()

# The sm90a-only kernels (CUTLASS 3.x wgmma/TMA) are built when 90a is in the list.
set(FLEXTRON_WITH_SM90 OFF)
if("90a" IN_LIST FLEXTRON_CUDA_ARCHS)
  set(FLEXTRON_WITH_SM90 ON)
endif()

string(REPLACE ";" "," FLEXTRON_CUDA_ARCHS_LABEL "${FLEXTRON_CUDA_ARCHS}")

set(FLEXTRON_CUDA_EXTRA_INCLUDES "")
if(EXISTS "${TORCH_SITE_PACKAGES}/nvidia/cu13/include")
  list(APPEND FLEXTRON_CUDA_EXTRA_INCLUDES "${TORCH_SITE_PACKAGES}/nvidia/cu13/include")
endif()
foreach(_sub cublas cusparse cuda_runtime)
  if(EXISTS "${TORCH_SITE_PACKAGES}/nvidia/${_sub}/include")
    list(APPEND FLEXTRON_CUDA_EXTRA_INCLUDES "${TORCH_SITE_PACKAGES}/nvidia/${_sub}/include")
  endif()
endforeach()

set(FLEXTRON_WITH_CUDA ON)
message(STATUS "CUDA kernels: nvcc ${CMAKE_CUDA_COMPILER_VERSION} at ${FLEXTRON_CUDA_ROOT}, archs ${FLEXTRON_CUDA_ARCHS}")
