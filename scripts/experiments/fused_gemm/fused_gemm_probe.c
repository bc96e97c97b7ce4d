// The fused kernels alone: per-row int8 quantization, the int8 GEMM and the output scales in ONE pass
// (worker/kernels/rowq_kernels.h, the same code as the shipped deposium.rowq ops), timed on the shapes of
// scripts/int8_gemm_floor.py (72 GEMMs of [rows, 768] x [768, 1152], 64 MB of int8 weights), so the
// two print comparable figures.
//
// A measurement for BENCHMARKS.md, not part of the worker: the int8-rot graph runs these steps as
// separate ONNX Runtime nodes (Abs, ReduceMax, Max, Div, QuantizeLinear, MatMulIntegerToFloat, Mul),
// and this times the kernel that replaces them, beside scripts/int8_gemm_floor.py's ORT GEMM alone. The GEMM runs on
// AMX tiles where the CPU has AMX-INT8 (Linux >= 5.16 grants the tile state on request), else on
// AVX-512 VNNI; ROWQ_PATH=vnni or ROWQ_PATH=avx2 (rowq_avx2.c, for CPUs without VNNI) forces a path.
// "same" as the third argument instead checks that the AVX2 path gives the same bits as the VNNI
// (or AMX) path: codes, row scales and outputs, with and without the rotation, bias and GELU.
//
//   gcc -O3 -ffp-contract=off -c -o /tmp/rowq_avx2.o worker/kernels/rowq_avx2.c
//   gcc -O3 -ffp-contract=off -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mamx-tile -mamx-int8
//       -Iworker/kernels -o /tmp/fused_probe scripts/experiments/fused_gemm/fused_gemm_probe.c /tmp/rowq_avx2.o -lm
//   /tmp/fused_probe 16 [72 [gelu]]   # rows [GEMMs [epilogue]]; prints a check against a scalar
//                                       # reference, then the median CPU time
//   (120 GEMMs = 106 MB, EmbeddingGemma-300m's int8 weights: too many to stay in cache between runs)
//
// Activations are u8 with zero point 128 (as the shipped recipe); the zero point is removed with
// precomputed column sums.
#define _GNU_SOURCE
#include "rowq_kernels.h"
#include "rowq.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

#define K 768
#define N 1152
#define MAX_ROWS 128

static int use_amx, use_avx2;
static int act = ROWQ_NONE;  // "gelu" as the third argument: + bias, then the erf GELU

static double cpu_ms(void) { struct timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); return t.tv_sec * 1e3 + t.tv_nsec / 1e6; }

// For each 16-column block j, for each 64-deep k step: 16 rows (k/4) x 64 bytes (16 cols x 4 k).
static void pack_b(const int8_t *w, int8_t *bp) {
  for (int j = 0; j < N / 16; j++)
    for (int ks = 0; ks < K / 64; ks++)
      for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
          for (int q = 0; q < 4; q++)
            bp[((((size_t)j * (K / 64) + ks) * 16 + r) * 16 + c) * 4 + q] = w[(size_t)(ks * 64 + r * 4 + q) * N + j * 16 + c];
}

static uint8_t a[MAX_ROWS * K] __attribute__((aligned(64)));

// One output tensor [M][N] as the kernels' panel list (rowq.h: rowq_out).
static const rowq_out *as_out(float *y) {
  static float *panels[N / 64];
  static int64_t lds[N / 64];
  static rowq_out out = {panels, lds};
  for (int p = 0; p < N / 64; p++) panels[p] = y + 64 * p, lds[p] = N;
  return &out;
}

// rowq_avx2.c's rowq_avx2_run takes its scratch from the op library (rowq_op.c); the probe calls the
// two halves itself and never runs it, but the object still links to this.
void *rowq_scratch(int slot, uint64_t bytes) { (void)slot; return malloc(bytes); }

// x: [M][K] fp32 -> y: [M][N] fp32, the op's whole body.
static void fused(int M, const float *x, const int8_t *bp, const float *wscale, const int32_t *cs,
                  const float *bias, float *y) {
  float rs[MAX_ROWS];
  if (use_avx2) {
    for (int m = 0; m < M; m++) rs[m] = rowq_avx2_quantize_row(x + (size_t)m * K, K, 0, NULL, a + (size_t)m * K);
    rowq_avx2_gemm(M, a, K, N, bp, wscale, rs, act, bias, as_out(y));
    return;
  }
  for (int m = 0; m < M; m++) rs[m] = rowq_quantize_row(x + (size_t)m * K, K, 0, NULL, a + (size_t)m * K);
#ifdef __AMX_INT8__
  if (use_amx) {
    int padded = (M + 15) / 16 * 16;
    memset(a + (size_t)M * K, 128, (size_t)(padded - M) * K);
    rowq_gemm_amx(M, a, K, N, bp, wscale, cs, rs, act, bias, as_out(y));
    return;
  }
#endif
  rowq_gemm_vnni(M, a, K, N, bp, wscale, cs, rs, act, bias, as_out(y));
}

// The AVX2 path against the AVX-512 one (VNNI, or AMX when granted) on the same rows: every code,
// row scale and output bit. Returns the number of mismatching cases.
static int same_bits(int M, const float *x, const int8_t *bp, const float *wscale, const int32_t *cs, const float *bias) {
  static uint8_t a2[MAX_ROWS * K] __attribute__((aligned(64)));
  static float y1[MAX_ROWS * N], y2[MAX_ROWS * N], scratch[K];
  float rs1[MAX_ROWS], rs2[MAX_ROWS];
  int bad = 0;
  for (int rotate = 0; rotate < 2; rotate++)
    for (int mode = ROWQ_NONE; mode <= ROWQ_BIAS_GELU; mode++) {
      for (int m = 0; m < M; m++) {
        rs1[m] = rowq_quantize_row(x + (size_t)m * K, K, rotate, scratch, a + (size_t)m * K);
        rs2[m] = rowq_avx2_quantize_row(x + (size_t)m * K, K, rotate, scratch, a2 + (size_t)m * K);
      }
      const int codes = !memcmp(a, a2, (size_t)M * K) && !memcmp(rs1, rs2, M * sizeof(float));
#ifdef __AMX_INT8__
      if (use_amx) {
        memset(a + (size_t)M * K, 128, (size_t)((M + 15) / 16 * 16 - M) * K);
        rowq_gemm_amx(M, a, K, N, bp, wscale, cs, rs1, mode, bias, as_out(y1));
      } else
#endif
        rowq_gemm_vnni(M, a, K, N, bp, wscale, cs, rs1, mode, bias, as_out(y1));
      rowq_avx2_gemm(M, a2, K, N, bp, wscale, rs2, mode, bias, as_out(y2));
      const int outputs = !memcmp(y1, y2, (size_t)M * N * sizeof(float));
      printf("rows %3d, rotation %d, epilogue %-9s: codes and row scales %s, outputs %s\n", M, rotate,
             mode == ROWQ_NONE ? "scales" : mode == ROWQ_BIAS ? "+ bias" : "+ GELU", codes ? "identical" : "DIFFER",
             outputs ? "identical" : "DIFFER");
      bad += !codes + !outputs;
    }
  return bad;
}

int main(int argc, char **argv) {
  int M = argc > 1 ? atoi(argv[1]) : 16;
  int L = argc > 2 ? atoi(argv[2]) : 72;
  if (argc > 3 && !strcmp(argv[3], "gelu")) act = ROWQ_BIAS_GELU;
  if (M < 1 || M > MAX_ROWS || L < 1) { fprintf(stderr, "usage: fused_probe ROWS(1-%d) [GEMMS]\n", MAX_ROWS); return 2; }
  const char *path = getenv("ROWQ_PATH");
  const int check_same = argc > 3 && !strcmp(argv[3], "same");
  use_avx2 = !check_same && path && !strcmp(path, "avx2");
#ifdef __AMX_INT8__
  use_amx = !use_avx2 && __builtin_cpu_supports("amx-int8") && !(path && !strcmp(path, "vnni"));
  if (use_amx && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) {
    perror("arch_prctl(ARCH_REQ_XCOMP_PERM)");
    return 2;
  }
#endif
  if (!use_amx && !use_avx2 && !__builtin_cpu_supports("avx512vnni")) { fprintf(stderr, "this CPU has neither AMX-INT8 nor AVX-512 VNNI\n"); return 2; }
  srand(1);
  int8_t *w = malloc((size_t)K * N);
  int8_t **bp = malloc(L * sizeof(*bp));
  int32_t (*colsum)[N] = malloc(sizeof(int32_t[N]) * L);
  float *wscale = malloc(N * sizeof(float));
  float *bias = malloc(N * sizeof(float));
  for (int n = 0; n < N; n++) { wscale[n] = 0.01f / 127.f; bias[n] = 0.5f - (float)(n % 7) / 7.f; }
  float *x = malloc(MAX_ROWS * K * sizeof(float)), *y = malloc(MAX_ROWS * N * sizeof(float));
  for (int i = 0; i < MAX_ROWS * K; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
  for (int l = 0; l < L; l++) {
    for (size_t i = 0; i < (size_t)K * N; i++) w[i] = (int8_t)(rand() % 255 - 127);
    for (int n = 0; n < N; n++) { int32_t s = 0; for (int k = 0; k < K; k++) s += w[(size_t)k * N + n]; colsum[l][n] = s; }
    bp[l] = aligned_alloc(64, (size_t)K * N);
    pack_b(w, bp[l]);
    if (l == 0) {  // check layer 0 against a plain reference
      fused(M, x, bp[0], wscale, colsum[0], bias, y);
      double worst = 0;
      for (int m = 0; m < M; m++) {
        float amax = 0; for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[m * K + k]));
        for (int n = 0; n < N; n += 37) {
          long s = 0; for (int k = 0; k < K; k++) s += (long)lrintf(x[m * K + k] * 127.f / amax) * w[(size_t)k * N + n];
          double ref = s * (amax / 127.f) * 0.01;
          if (act == ROWQ_BIAS_GELU) { ref += bias[n]; ref = 0.5 * ref * (1 + erf(ref / sqrt(2.0))); }
          worst = fmax(worst, fabs(ref - y[m * N + n]));
        }
      }
      printf("check vs reference: max abs diff %.3g\n", worst);
      if (check_same) {
        float *wide = malloc((size_t)MAX_ROWS * K * sizeof(float));  // rows with outliers, as real activations have
        for (int i = 0; i < MAX_ROWS * K; i++) wide[i] = x[i] * (i % 97 == 0 ? 40.f : 1.f);
        int bad = same_bits(M, x, bp[0], wscale, colsum[0], bias) + same_bits(M, wide, bp[0], wscale, colsum[0], bias);
        printf(bad ? "AVX2 path DIFFERS\n" : "AVX2 path: same bits\n");
        return bad ? 1 : 0;
      }
    }
  }
  double best[9]; int nrep = 9;
  for (int r = 0; r < nrep + 1; r++) {
    double t0 = cpu_ms();
    for (int l = 0; l < L; l++) fused(M, x, bp[l], wscale, colsum[l], bias, y);
    if (r) best[r - 1] = cpu_ms() - t0;
  }
  for (int i = 0; i < nrep; i++) for (int j = i + 1; j < nrep; j++) if (best[j] < best[i]) { double t = best[i]; best[i] = best[j]; best[j] = t; }
  printf("rows %3d: %.2f ms median for %d fused quantize + %s GEMM + scale%s of 768x1152 (%.0f MB int8)\n", M,
         best[nrep / 2], L, use_amx ? "AMX" : use_avx2 ? "AVX2" : "AVX-512 VNNI", act ? " + bias + GELU" : "", L * (double)K * N / 1e6);
#ifdef __AMX_INT8__
  if (use_amx) _tile_release();
#endif
  return 0;
}
