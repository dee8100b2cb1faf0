# CUDA is AUTO by default: found nvcc -> the CUDA parts are built, so CUDA code
# is compiled on every machine with the toolkit (CI included) even without a GPU.
# Architectures default to 80 and 90; override with -DCMAKE_CUDA_ARCHITECTURES=...
set(PARITRON_HAVE_CUDA OFF)
if(NOT PARITRON_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 80 90)   # must be set before enable_language(CUDA)
    endif()
    enable_language(CUDA)
    # CMake 3.25 has no C++20 dialect flag for nvcc (shared/toolchain.md, pitfall 1).
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    find_package(CUDAToolkit REQUIRED)
    # One CUDA runtime per process: nvcc-linked targets default to the static
    # cudart, the libraries link the shared one (CUDA::cudart); two copies
    # would not share streams or allocations.
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
    # NCCL ships no CMake config (shared/toolchain.md): an imported target by hand.
    find_path(NCCL_INCLUDE_DIR nccl.h HINTS ENV NCCL_HOME ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
    find_library(NCCL_LIBRARY NAMES nccl HINTS ENV NCCL_HOME ${CUDAToolkit_LIBRARY_DIR} PATH_SUFFIXES lib lib64)
    if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
      add_library(NCCL::nccl UNKNOWN IMPORTED)
      set_target_properties(NCCL::nccl PROPERTIES IMPORTED_LOCATION "${NCCL_LIBRARY}"
                            INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
      set(PARITRON_HAVE_NCCL ON)
    else()
      set(PARITRON_HAVE_NCCL OFF)
      message(STATUS "NCCL not found: the NCCL comm is not built (set NCCL_HOME)")
    endif()
    set(PARITRON_HAVE_CUDA ON)
  elseif(PARITRON_CUDA STREQUAL "ON")
    message(FATAL_ERROR "PARITRON_CUDA=ON but no CUDA compiler (nvcc) was found")
  else()
    message(STATUS "nvcc not found: building without the CUDA parts")
  endif()
endif()
