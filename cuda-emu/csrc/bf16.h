// bf16.h: bf16 <-> f32 for the stand-in cuBLAS and NCCL, the same conversions as the kernels'
// (common.cuh) and the `half` crate's: widening is exact, narrowing rounds to nearest even and
// keeps a NaN a (quiet) NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace ftemu {

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

} // namespace ftemu
