// cuda_fp16.h -- CPU-emulator stand-in for the CUDA header of the same name (host compilers only;
// nvcc finds the real one). Everything lives in the emulator headers.
#pragma once
#include "../cuda_emu.h"
