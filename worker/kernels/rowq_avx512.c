// The fused op's AVX-512 paths: AMX tiles (Sapphire Rapids and later) or AVX-512 VNNI (Zen 4/5, Ice
// Lake, Cascade Lake). Only rowq_op.c's CPU check leads here, so these instructions never reach a CPU
// without them.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-int8")
#include "rowq.h"
#include "rowq_kernels.h"

int rowq_avx512_run(int amx, int64_t M, const float *x, int64_t K, int64_t N, const int8_t *b,
                    const float *wscale, const int32_t *colsum, const float *bias, int act, int rotate,
                    const rowq_out *out) {
  const int64_t padded = (M + 15) / 16 * 16;  // the AMX path reads whole 16-row tiles
  uint8_t *a = rowq_scratch(0, (uint64_t)padded * K);
  float *rs = rowq_scratch(1, (uint64_t)M * sizeof(float));
  float *rotated = rowq_scratch(2, (uint64_t)K * sizeof(float));
  if (!a || !rs || !rotated) return -1;
  for (int64_t m = 0; m < M; m++) rs[m] = rowq_quantize_row(x + m * K, K, rotate, rotated, a + m * K);
  if (amx) {
    memset(a + M * K, 128, (size_t)((padded - M) * K));  // zero codes: padding rows add nothing
    rowq_gemm_amx(M, a, K, N, b, wscale, colsum, rs, act, bias, out);
  } else {
    rowq_gemm_vnni(M, a, K, N, b, wscale, colsum, rs, act, bias, out);
  }
  return 0;
}
