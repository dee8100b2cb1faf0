// Whole-file reads with errors that name the file and the reason.
#pragma once

#include <filesystem>
#include <string>

namespace paritron {

// Throws Error("cannot read 'path': <reason>") when the file cannot be read.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace paritron
