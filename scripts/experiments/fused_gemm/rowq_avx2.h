// Experiment (not shipped): the fused op's AVX2 path (rowq_avx2.c), callable from code compiled for
// AVX-512. Same packed weights, same activation codes, same output bits as rowq_kernels.h.
#ifndef ROWQ_AVX2_H
#define ROWQ_AVX2_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

enum { ROWQ_AVX2_NONE = 0, ROWQ_AVX2_BIAS = 1, ROWQ_AVX2_BIAS_GELU = 2 };  // = enum rowq_activation

// One row's u8 codes (zero point 128) into a[K]; returns amax, as rowq_quantize_row.
float rowq_avx2_quantize_row(const float *x, int64_t K, int rotate, float *scratch, uint8_t *a);

// M rows of codes -> out[M][N], as rowq_gemm_vnni (no column sums: the signed codes need none).
void rowq_avx2_gemm(int64_t M, const uint8_t *a, int64_t K, int64_t N, const int8_t *b, const float *wscale,
                    const float *rs, int act, const float *bias, float *out);

#ifdef __cplusplus
}
#endif
#endif  // ROWQ_AVX2_H
