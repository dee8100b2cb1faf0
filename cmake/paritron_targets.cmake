# Flags for project code and helpers that define libraries and tests.

# Project code compiles warning-free; third-party headers come in as SYSTEM.
# -ffp-contract=off: the reference emulates one rounding per operation and the
# single-source math must give the same bits on CPU and GPU, so the host
# compiler may not fuse a*b+c into an FMA behind our back (GCC does by default
# in GNU mode and with -march flags). Kernels that want FMA call std::fma.
set(PARITRON_CXX_FLAGS -Wall -Wextra -Werror -ffp-contract=off)
# --fmad=false: the same rule for device code (nvcc contracts by default).
set(PARITRON_CUDA_FLAGS -Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror,-ffp-contract=off
    --fmad=false --expt-relaxed-constexpr)

if(PARITRON_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=address,undefined)
endif()

function(paritron_target_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${PARITRON_CXX_FLAGS}>
    $<$<COMPILE_LANGUAGE:CUDA>:${PARITRON_CUDA_FLAGS}>)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
endfunction()

# paritron_add_test(NAME <name> SOURCES <files...> [LIBS <libs...>] [LABELS <labels...>]
#                   [WHOLE] [PROPERTIES <ctest properties...>])
# One executable per test file keeps a broken test from hiding the others and
# lets ctest run them in parallel. Tests are GoogleTest (+ RapidCheck).
# WHOLE: one ctest test running the whole executable (its tests share one
# process, e.g. for a report over all of them) instead of one per GoogleTest
# test; PROPERTIES (only with WHOLE) are set on it.
function(paritron_add_test)
  cmake_parse_arguments(T "WHOLE" "NAME" "SOURCES;LIBS;LABELS;PROPERTIES" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  paritron_target_flags(${T_NAME})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} rapidcheck_gtest rapidcheck GTest::gtest GTest::gtest_main)
  target_compile_definitions(${T_NAME} PRIVATE PARITRON_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  if(T_WHOLE)
    add_test(NAME ${T_NAME} COMMAND ${T_NAME})
    set_tests_properties(${T_NAME} PROPERTIES LABELS "${T_LABELS}" ${T_PROPERTIES})
  else()
    # The labels are set by a script of our own that ctest includes after the
    # discovered tests (CMake 3.25's gtest_discover_tests PROPERTIES would
    # split a label list such as "optimized;gpu" into property names).
    gtest_discover_tests(${T_NAME} DISCOVERY_MODE PRE_TEST TEST_LIST ${T_NAME}_TESTS)
    set(labels_script "${CMAKE_CURRENT_BINARY_DIR}/${T_NAME}_labels.cmake")
    file(WRITE "${labels_script}"
         "if(DEFINED ${T_NAME}_TESTS)\n  set_tests_properties(\${${T_NAME}_TESTS} PROPERTIES LABELS \"${T_LABELS}\")\nendif()\n")
    set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${labels_script}")
  endif()
endfunction()
