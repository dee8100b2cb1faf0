# libFuzzer target for the safetensors reader and the case layer
# (common/safetensors_fuzz.cpp). Built only when the compiler takes
# -fsanitize=fuzzer (clang; GCC has no libFuzzer), e.g.
#   CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DPARITRON_CUDA=OFF -DPARITRON_BENCH=OFF
#   cmake --build build/fuzz --target fuzz_safetensors
# The two sources under test are compiled into the target itself, so they get
# libFuzzer's coverage instrumentation; the rest comes from paritron_common.
include(CheckCXXSourceCompiles)

set(CMAKE_REQUIRED_FLAGS -fsanitize=fuzzer)
set(CMAKE_REQUIRED_LINK_OPTIONS -fsanitize=fuzzer)
check_cxx_source_compiles([[
#include <cstddef>
#include <cstdint>
extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }
]] PARITRON_HAVE_LIBFUZZER)
unset(CMAKE_REQUIRED_FLAGS)
unset(CMAKE_REQUIRED_LINK_OPTIONS)

if(PARITRON_HAVE_LIBFUZZER)
  # Without ASan/UBSan a fuzzer only finds crashes; PARITRON_SANITIZE already
  # adds them to everything.
  set(PARITRON_FUZZ_SANITIZERS fuzzer)
  if(NOT PARITRON_SANITIZE)
    set(PARITRON_FUZZ_SANITIZERS fuzzer,address,undefined)
  endif()
  add_executable(fuzz_safetensors
    ${PROJECT_SOURCE_DIR}/common/safetensors_fuzz.cpp
    ${PROJECT_SOURCE_DIR}/common/safetensors.cpp
    ${PROJECT_SOURCE_DIR}/common/case_file.cpp)
  paritron_target_flags(fuzz_safetensors)
  target_compile_features(fuzz_safetensors PRIVATE cxx_std_20)
  target_compile_options(fuzz_safetensors PRIVATE -fsanitize=${PARITRON_FUZZ_SANITIZERS} -fno-omit-frame-pointer)
  target_link_options(fuzz_safetensors PRIVATE -fsanitize=${PARITRON_FUZZ_SANITIZERS})
  target_link_libraries(fuzz_safetensors PRIVATE paritron_common nlohmann_json::nlohmann_json)
  if(PARITRON_TESTS)
    # Not fuzzing: runs the committed fixtures once through the entry point,
    # so the target keeps building and its properties hold on valid files.
    file(GLOB PARITRON_FUZZ_SEEDS ${PROJECT_SOURCE_DIR}/fixtures/safetensors/*.safetensors)
    add_test(NAME fuzz_safetensors_seeds COMMAND fuzz_safetensors ${PARITRON_FUZZ_SEEDS})
    set_tests_properties(fuzz_safetensors_seeds PROPERTIES LABELS common)
  endif()
endif()
