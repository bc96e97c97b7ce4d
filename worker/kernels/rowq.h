// The fused op's kernel paths, as the ONNX Runtime glue (rowq_op.c, baseline x86-64 code) calls them.
// Each path lives in its own translation unit with its own target pragma, so the glue never executes
// an instruction the CPU lacks: rowq_avx512.c (AMX tiles or AVX-512 VNNI), rowq_avx2.c (AVX2 + FMA).
// All read the same packed weights and give the same output bits (tests/test_kernels.py).
#ifndef ROWQ_H
#define ROWQ_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

// Where each 64-column panel of the output goes: row r of panel p starts at panel[p] + r * ld[p]. One
// output tensor [M, N] is panel[p] = out + 64 p, ld[p] = N; the "Split" ops give each part of a merged
// GEMM (q / k / v, gate / up: widths multiples of 64) its own tensor instead of a Split node's copy.
typedef struct {
  float *const *panel;
  const int64_t *ld;
} rowq_out;

static inline float *rowq_out_at(const rowq_out *out, int64_t panel, int64_t row) {
  return out->panel[panel] + row * out->ld[panel];
}

// What follows the GEMM in the graph, folded into the epilogue of every path: nothing, + bias, or the
// exact-erf GELU of (y + bias) = 0.5 y (1 + erf(y / sqrt 2)), ONNX's Gelu and ONNX Runtime's BiasGelu.
enum rowq_activation { ROWQ_NONE = 0, ROWQ_BIAS = 1, ROWQ_BIAS_GELU = 2 };

// One call of the op: rows x[M][K] (fp32) -> out[M][N] (fp32), the weights b packed by
// convert/fuse.py (pack_weights), wscale[N] the column steps (1/127 included), colsum[N] the weight
// column sums (the u8 zero point's correction), bias[N] read only when act != 0. rotate: first
// multiply each row by the block-32 Hadamard matrix. Returns 0, or -1 when scratch memory ran out.
int rowq_avx512_run(int amx, int64_t M, const float *x, int64_t K, int64_t N, const int8_t *b,
                    const float *wscale, const int32_t *colsum, const float *bias, int act, int rotate,
                    const rowq_out *out);
int rowq_avx2_run(int64_t M, const float *x, int64_t K, int64_t N, const int8_t *b, const float *wscale,
                  const float *bias, int act, int rotate, const rowq_out *out);

// The AVX2 path's two halves (also the probe's reference for its `same` check).
// One row's u8 codes (zero point 128) into a[K]; returns amax, as rowq_quantize_row.
float rowq_avx2_quantize_row(const float *x, int64_t K, int rotate, float *scratch, uint8_t *a);
// M rows of codes -> out[M][N], as rowq_gemm_vnni (no column sums: the signed codes need none).
void rowq_avx2_gemm(int64_t M, const uint8_t *a, int64_t K, int64_t N, const int8_t *b, const float *wscale,
                    const float *rs, int act, const float *bias, const rowq_out *out);

// Per-thread scratch that only grows (slots 0-4) (one session = one thread in the worker; no free per call).
// Returns NULL when the allocation fails.
void *rowq_scratch(int slot, uint64_t bytes);

#ifdef __cplusplus
}
#endif
#endif  // ROWQ_H
