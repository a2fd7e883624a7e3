// llmc's CPU kernels as one library per ISA level: setup.py compiles this file once per level, with that
// level's -m flags and ATen's CPU_CAPABILITY (which sets at::vec::Vectorized's width), into llmc/_C_<level>;
// plugins/cpu_kernels.py loads the best one the CPU runs. Each kernel file registers its ops' CPU
// implementations with torch's dispatcher (TORCH_LIBRARY_IMPL; the schemas are defined in Python). A file
// whose code needs more than a level has (quant_linear.cpp: AVX2 or AVX-512 intrinsics) registers nothing there,
// and those ops run their reference.
//
// One translation unit: parsing ATen's headers takes longer than compiling all the kernels, so they are
// included here rather than compiled apart.
#include "activations.cpp"
#include "layer_norm.cpp"
#include "linear.cpp"
#include "moe.cpp"
#include "paged_attention.cpp"
#include "quant_linear.cpp"
#include "rms_norm.cpp"
#include "rotary.cpp"
