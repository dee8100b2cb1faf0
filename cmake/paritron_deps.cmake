# Third-party dependencies, all from Debian packages (installed by ci/setup).
# Package names and these lines are verified in shared/toolchain.md.
find_package(Eigen3 3.4 REQUIRED NO_MODULE)   # Eigen3::Eigen (reference/ and tests only)
find_package(OpenMP REQUIRED)                 # OpenMP::OpenMP_CXX
find_package(nlohmann_json 3 REQUIRED)        # nlohmann_json::nlohmann_json
find_package(CLI11 REQUIRED)                  # CLI11::CLI11
find_package(fmt REQUIRED)                    # fmt::fmt
find_package(MPI COMPONENTS CXX)              # MPI::MPI_CXX (the MPI comm backend; built when found)
find_package(PkgConfig REQUIRED)
pkg_check_modules(OPENBLAS REQUIRED IMPORTED_TARGET openblas)  # PkgConfig::OPENBLAS (cblas.h)
if(PARITRON_TESTS)
  find_package(GTest REQUIRED)                # GTest::gtest GTest::gtest_main
  find_package(rapidcheck REQUIRED)           # rapidcheck rapidcheck_gtest (no version file)
endif()
if(PARITRON_BENCH)
  find_package(benchmark REQUIRED)            # benchmark::benchmark
endif()

find_program(CCACHE_PROGRAM ccache)
if(CCACHE_PROGRAM)
  set(CMAKE_CXX_COMPILER_LAUNCHER ${CCACHE_PROGRAM})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${CCACHE_PROGRAM})
endif()
