# rex::cuda: the CUDA kernels in kernels/, compiled by nvcc into a static library.
# REX_CUDA=AUTO builds it when a CUDA compiler is found, ON requires one, OFF skips it. The device
# code is built for Hopper (sm_90 SASS plus compute_90 PTX) unless CMAKE_CUDA_ARCHITECTURES says
# otherwise; compiling needs no GPU, so CI always builds it where the toolkit is installed.
if(REX_CUDA STREQUAL "OFF")
  return()
endif()

include(CheckLanguage)
if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
endif()
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(REX_CUDA STREQUAL "ON")
    message(FATAL_ERROR "REX_CUDA=ON but no CUDA compiler was found: install the CUDA toolkit or set "
                        "CMAKE_CUDA_COMPILER to nvcc")
  endif()
  message(STATUS "rex: no CUDA compiler found, rex::cuda is not built (CPU only)")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 90)
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

file(GLOB REX_CUDA_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/kernels/*.cu)
add_library(rex_cuda STATIC ${REX_CUDA_SOURCES})
add_library(rex::cuda ALIAS rex_cuda)
set_target_properties(rex_cuda PROPERTIES EXPORT_NAME cuda POSITION_INDEPENDENT_CODE ON)
# CMake 3.25 has no CUDA20 dialect flag for nvcc, so the standard is passed directly.
target_compile_options(rex_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
target_link_libraries(rex_cuda PUBLIC rex::rex CUDA::cudart CUDA::cublas)
target_compile_definitions(rex_cuda PUBLIC REX_WITH_CUDA=1)
install(TARGETS rex_cuda EXPORT rexTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
message(STATUS "rex: building rex::cuda for CUDA architectures ${CMAKE_CUDA_ARCHITECTURES}")
