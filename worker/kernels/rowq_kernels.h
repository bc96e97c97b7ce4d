// The AVX-512 kernels behind the deposium.rowq ops (rowq_avx512.c), shared with the experiment's probe
// (scripts/experiments/fused_gemm), so the figures of both come from the same code.
//
// One call = per-row absmax quantization of fp32 activations to u8 (zero point 128, as the shipped
// int8-rot recipe), the u8 x s8 GEMM, the zero-point correction (precomputed column sums) and the
// row x column scales, without the fp32 / u8 round trips between ONNX Runtime nodes.
//
// Two GEMM paths here and a third (AVX2) in rowq_avx2.c, over ONE weight layout packed once at
// session start: for each 16-column block and 64-deep k step, 16 rows of (16 columns x 4 k values) =
// AMX's B tile. Read per column block, the same bytes are a contiguous run of 64-byte vectors (16
// columns x 4 k), exactly what AVX-512 VNNI's vpdpbusd wants, so one artifact serves every path.
// Integer accumulation is exact and the float epilogue is the same expression on every path: they
// give bit-identical outputs. ONNX Runtime does not align initializers to 64 bytes, so every weight
// load is unaligned.
//   - AMX-INT8 (Sapphire Rapids and later): 16 rows x 64 columns per tile pass.
//   - AVX-512 VNNI (Zen 4/5, Ice Lake, Cascade Lake): a 6-row x 64-column register block; every row of
//     the call reuses a 64-column panel of the weights while it sits in L2, so the weights stream from
//     memory once per call (one row is bound by that stream; 16 rows, a short query, by vpdpbusd).
// Include it after a target pragma naming avx512f, avx512bw, avx512dq, avx512vl, avx512vnni (+ amx-tile,
// amx-int8 for the AMX path), as rowq_avx512.c does, or compile with those -m flags (the probe); not
// with -march=sapphirerapids, whose other extensions Zen 4 lacks. And with
// -ffp-contract=off: GCC otherwise fuses the epilogue's multiply and add into an FMA where it inlines
// them, so two paths (or two builds) could round differently.
#ifndef ROWQ_KERNELS_H
#define ROWQ_KERNELS_H
#include "rowq.h"
#include "rowq_poly.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROWQ_VNNI_ROWS 6  // register block: 6 rows x 4 column vectors = 24 accumulators of 32
#ifndef ROWQ_PREFETCH
#define ROWQ_PREFETCH 1
#endif

// x H over each 32-wide block, H the orthonormal Sylvester-Hadamard matrix (convert/rotate.py): the
// five butterfly stages of a fast Walsh-Hadamard transform, four inside a 16-lane register
// (partner lane j ^ 2^s: y = x[j ^ 2^s] + sign * x[j]), the last across the block's two halves.
static inline void rowq_rotate32(float *v, int64_t K) {
  const __m512 scale = _mm512_set1_ps(0.17677669529663687f);  // 1 / sqrt(32)
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i idx[4];
  __m512 sg[4];
  for (int s = 0; s < 4; s++) {  // in registers, per call: no shared tables, nothing to race on
    const __m512i bit = _mm512_set1_epi32(1 << s);
    idx[s] = _mm512_xor_si512(lane, bit);
    sg[s] = _mm512_mask_blend_ps(_mm512_test_epi32_mask(lane, bit), _mm512_set1_ps(1.f), _mm512_set1_ps(-1.f));
  }
  for (int64_t k = 0; k < K; k += 32) {
    __m512 lo = _mm512_loadu_ps(v + k), hi = _mm512_loadu_ps(v + k + 16);
    for (int s = 0; s < 4; s++) {
      lo = _mm512_fmadd_ps(sg[s], lo, _mm512_permutexvar_ps(idx[s], lo));
      hi = _mm512_fmadd_ps(sg[s], hi, _mm512_permutexvar_ps(idx[s], hi));
    }
    _mm512_storeu_ps(v + k, _mm512_mul_ps(_mm512_add_ps(lo, hi), scale));
    _mm512_storeu_ps(v + k + 16, _mm512_mul_ps(_mm512_sub_ps(lo, hi), scale));
  }
}

// One row: u8 codes q = round(x * 127 / amax) + 128 into a[K]; returns amax (the row's scale x 127).
// `scratch` (K floats) holds the rotated row when `rotate` is set.
static inline float rowq_quantize_row(const float *x, int64_t K, int rotate, float *scratch, uint8_t *a) {
  if (rotate) {
    memcpy(scratch, x, (size_t)K * sizeof(float));
    rowq_rotate32(scratch, K);
    x = scratch;
  }
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float amax = fmaxf(_mm512_reduce_max_ps(mx), 1e-10f * 127.f);
  const __m512 inv = _mm512_set1_ps(127.f / amax);
  for (int64_t k = 0; k < K; k += 16) {
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv)), _mm512_set1_epi32(128));
    _mm_storeu_si128((__m128i *)(a + k), _mm512_cvtusepi32_epi8(q));
  }
  return amax;
}

// e^x for x <= 0 (erf's tail): x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial (error
// ~5e-9 relative), then 2^n by vscalefps.
static inline __m512 rowq_exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(ROWQ_LOG2E)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ROWQ_LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ROWQ_LN2_LO), r);
  __m512 p = _mm512_set1_ps(rowq_exp_taylor[0]);
  for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(rowq_exp_taylor[i]));
  return _mm512_scalef_ps(p, n);
}

// erf(a) within ~1 ulp (rowq_poly.h), both branches computed and blended per lane.
static inline __m512 rowq_erf(__m512 a) {
  const __m512 t = _mm512_abs_ps(a), s = _mm512_mul_ps(a, a);
  __m512 small = _mm512_set1_ps(rowq_erf_small[0]);
  for (int i = 1; i < 6; i++) small = _mm512_fmadd_ps(small, s, _mm512_set1_ps(rowq_erf_small[i]));
  small = _mm512_fmadd_ps(small, a, a);
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(rowq_erf_big[0]), t, _mm512_set1_ps(rowq_erf_big[1]));
  r = _mm512_fmadd_ps(r, s, _mm512_fmadd_ps(_mm512_set1_ps(rowq_erf_big[2]), t, _mm512_set1_ps(rowq_erf_big[3])));
  for (int i = 4; i < 7; i++) r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(rowq_erf_big[i]));
  r = _mm512_fmadd_ps(r, t, _mm512_sub_ps(_mm512_setzero_ps(), t));
  r = _mm512_sub_ps(_mm512_set1_ps(1.f), rowq_exp_neg(r));
  const __m512 big = _mm512_or_ps(r, _mm512_and_ps(a, _mm512_set1_ps(-0.f)));  // copysign(r, a)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(0.927734375f), _CMP_GT_OQ), small, big);
}

// acc - 128 * colsum, times column scale times row scale, then the activation: the same expression on
// every path.
static inline __m512 rowq_epilogue(__m512i acc, __m512i zs, __m512 ws, float rs, int act, const float *bias) {
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, zs)), _mm512_mul_ps(ws, _mm512_set1_ps(rs)));
  if (act == ROWQ_NONE) return y;
  y = _mm512_add_ps(y, _mm512_loadu_ps(bias));
  if (act == ROWQ_BIAS) return y;
  const __m512 e = rowq_erf(_mm512_mul_ps(y, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), y), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// acc += u8 a . s8 w, in place. Inline assembly, not the intrinsic: GCC 12 models the intrinsic as a
// three-operand instruction and copies (and spills) every accumulator around it (measured 1.7-2.1x
// slower than clang's code for the same source); the "+v" constraint pins each accumulator to its register.
#define ROWQ_DPBUSD(acc, av, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(av), "v"(w))

// R (<= ROWQ_VNNI_ROWS) rows x 64 columns starting at column block j0. The 24 accumulators are named
// variables, not an array, so they live in registers whatever the compiler unrolls.
#define ROWQ_ACC_DECL(r) __m512i acc##r##0 = _mm512_setzero_si512(), acc##r##1 = acc##r##0, acc##r##2 = acc##r##0, acc##r##3 = acc##r##0
#define ROWQ_ACC_STEP(r)                                                         \
  if (R > r) {                                                                   \
    const __m512i av = _mm512_set1_epi32(*(const int32_t *)(a + r * K + 4 * q)); \
    ROWQ_DPBUSD(acc##r##0, av, w0);                          \
    ROWQ_DPBUSD(acc##r##1, av, w1);                          \
    ROWQ_DPBUSD(acc##r##2, av, w2);                          \
    ROWQ_DPBUSD(acc##r##3, av, w3);                          \
  }
#define ROWQ_ACC_SAVE(r) \
  if (R > r) { acc[r][0] = acc##r##0; acc[r][1] = acc##r##1; acc[r][2] = acc##r##2; acc[r][3] = acc##r##3; }

// The epilogue of one block, out of line: inlined into the block, GCC 12 keeps the GELU's constants
// live across the k loop and spills accumulators inside it (measured 1.5x slower at 128 rows).
static __attribute__((noinline)) void rowq_vnni_finish(
    int R, __m512i acc[ROWQ_VNNI_ROWS][4], int64_t ld, int64_t j0, const float *wscale, const int32_t *colsum,
    const float *rs, int act, const float *bias, float *out) {
  for (int j = 0; j < 4; j++) {
    const int64_t col = (j0 + j) * 16;
    const __m512 ws = _mm512_loadu_ps(wscale + col);
    const __m512i zs = _mm512_slli_epi32(_mm512_loadu_si512(colsum + col), 7);
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + r * ld + j * 16, rowq_epilogue(acc[r][j], zs, ws, rs[r], act, bias + col));
  }
}

static inline __attribute__((always_inline)) void rowq_vnni_block(
    const int R, const uint8_t *a, int64_t K, int64_t ld, const int8_t *b, int64_t j0, const float *wscale,
    const int32_t *colsum, const float *rs, int act, const float *bias, const int8_t *next, float *out) {
  const size_t jstride = (size_t)K * 16;
  const int8_t *b0 = b + (size_t)j0 * jstride;
  ROWQ_ACC_DECL(0); ROWQ_ACC_DECL(1); ROWQ_ACC_DECL(2); ROWQ_ACC_DECL(3); ROWQ_ACC_DECL(4); ROWQ_ACC_DECL(5);
  for (int64_t q = 0; q < K / 4; q++) {
    const __m512i w0 = _mm512_loadu_si512(b0 + q * 64), w1 = _mm512_loadu_si512(b0 + jstride + q * 64);
    const __m512i w2 = _mm512_loadu_si512(b0 + 2 * jstride + q * 64), w3 = _mm512_loadu_si512(b0 + 3 * jstride + q * 64);
    if (next) {  // the next panel, one line per column block per step: it arrives while this one computes
      _mm_prefetch((const char *)next + q * 64, _MM_HINT_T1);
      _mm_prefetch((const char *)next + jstride + q * 64, _MM_HINT_T1);
      _mm_prefetch((const char *)next + 2 * jstride + q * 64, _MM_HINT_T1);
      _mm_prefetch((const char *)next + 3 * jstride + q * 64, _MM_HINT_T1);
    }
    ROWQ_ACC_STEP(0) ROWQ_ACC_STEP(1) ROWQ_ACC_STEP(2) ROWQ_ACC_STEP(3) ROWQ_ACC_STEP(4) ROWQ_ACC_STEP(5)
  }
  __m512i acc[ROWQ_VNNI_ROWS][4];
  ROWQ_ACC_SAVE(0) ROWQ_ACC_SAVE(1) ROWQ_ACC_SAVE(2) ROWQ_ACC_SAVE(3) ROWQ_ACC_SAVE(4) ROWQ_ACC_SAVE(5)
  rowq_vnni_finish(R, acc, ld, j0, wscale, colsum, rs, act, bias, out);
}

#define ROWQ_WIDE_CASE(r) \
  case r: rowq_vnni_block(r, am, K, ld, b, j0, wscale, colsum, rs + m0, act, bias, next, om); break

// M quantized rows a[M][K] (row scales rs[M]) -> out[M][N]. Column panels outside, rows inside.
// bias: [N], read only when act != ROWQ_NONE. (A narrower 12 x 32 block for short queries, whose
// weight panel stays in L1, measured no faster at 16 rows on Zen 4: 7.8-8.8 vs 7.3-7.4 ms.)
static inline void rowq_gemm_vnni(int64_t M, const uint8_t *a, int64_t K, int64_t N, const int8_t *b,
                                  const float *wscale, const int32_t *colsum, const float *rs, int act,
                                  const float *bias, const rowq_out *out) {
  for (int64_t j0 = 0; j0 < N / 16; j0 += 4)
    for (int64_t m0 = 0; m0 < M; m0 += ROWQ_VNNI_ROWS) {
      const uint8_t *am = a + m0 * K;
      const int64_t ld = out->ld[j0 / 4];
      float *om = rowq_out_at(out, j0 / 4, m0);
      // The last row group of a panel prefetches the next panel into L2 (ROWQ_PREFETCH=0 to compare).
      const int8_t *next = ROWQ_PREFETCH && m0 + ROWQ_VNNI_ROWS >= M && j0 + 4 < N / 16 ? b + (size_t)(j0 + 4) * K * 16 : NULL;
      switch (M - m0 >= ROWQ_VNNI_ROWS ? ROWQ_VNNI_ROWS : (int)(M - m0)) {
        ROWQ_WIDE_CASE(6); ROWQ_WIDE_CASE(5); ROWQ_WIDE_CASE(4); ROWQ_WIDE_CASE(3); ROWQ_WIDE_CASE(2);
        default: ROWQ_WIDE_CASE(1);
      }
    }
}

#ifdef __AMX_INT8__
typedef struct { uint8_t palette; uint8_t start_row; uint8_t rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; } rowq_tilecfg;

// Every call: MLAS's own AMX kernels load other tile configurations between our nodes.
static inline void rowq_amx_config(void) {
  rowq_tilecfg cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// M quantized rows a[M][K] -> out[M][N], 16 rows per tile pass (a's rows padded to a multiple of 16
// with the zero code 128 by the caller, so a tile never reads past it).
static inline void rowq_gemm_amx(int64_t M, const uint8_t *a, int64_t K, int64_t N, const int8_t *b,
                                 const float *wscale, const int32_t *colsum, const float *rs, int act,
                                 const float *bias, const rowq_out *out) {
  rowq_amx_config();
  int32_t c[4][256] __attribute__((aligned(64)));
  const size_t jstride = (size_t)(K / 64) * 1024;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int rows = M - m0 < 16 ? (int)(M - m0) : 16;
    const uint8_t *am = a + m0 * K;
    for (int64_t j0 = 0; j0 < N / 16; j0 += 4) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t ks = 0; ks < K / 64; ks++) {
        _tile_loadd(4, am + ks * 64, K);
        const int8_t *bb = b + ((size_t)j0 * (K / 64) + ks) * 1024;
        _tile_loadd(5, bb, 64); _tile_dpbusd(0, 4, 5);
        _tile_loadd(6, bb + jstride, 64); _tile_dpbusd(1, 4, 6);
        _tile_loadd(7, bb + 2 * jstride, 64); _tile_dpbusd(2, 4, 7);
        _tile_loadd(5, bb + 3 * jstride, 64); _tile_dpbusd(3, 4, 5);
      }
      _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
      for (int t = 0; t < 4; t++) {
        const int64_t col = (j0 + t) * 16;
        const __m512 ws = _mm512_loadu_ps(wscale + col);
        const __m512i zs = _mm512_slli_epi32(_mm512_loadu_si512(colsum + col), 7);
        for (int m = 0; m < rows; m++)
          _mm512_storeu_ps(rowq_out_at(out, j0 / 4, m0 + m) + t * 16, rowq_epilogue(_mm512_load_si512(c[t] + m * 16), zs, ws, rs[m0 + m], act, bias + col));
      }
    }
  }
}
#endif  // __AMX_INT8__
#endif  // ROWQ_KERNELS_H
