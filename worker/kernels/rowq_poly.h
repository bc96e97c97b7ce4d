// The polynomial coefficients of the epilogue's erf and exp, in one place
// for both the AVX-512 code (rowq_kernels.h) and the AVX2 code (rowq_avx2.c), which must round alike.
#ifndef ROWQ_POLY_H
#define ROWQ_POLY_H

// erf(a) for |a| <= 0.927734375: a + a * P(a^2), P's coefficients highest degree first (njuffa's
// faithfully rounded erff, as ONNX Runtime's MLAS).
static const float rowq_erf_small[6] = {-5.96761703e-4f, 4.99119423e-3f, -2.67681349e-2f,
                                        1.12819925e-1f, -3.76125336e-1f, 1.28379166e-1f};
// erf(a) above it: 1 - exp(Q(|a|)), Q = ((c0 t + c1) t^2 + (c2 t + c3)) then Horner over c4..c6, - t.
static const float rowq_erf_big[7] = {-1.72853470e-5f, 3.83197126e-4f, -3.88396438e-3f, 2.42546219e-2f,
                                      -1.06777877e-1f, -6.34846687e-1f, -1.28717512e-1f};
// e^r for |r| <= ln2 / 2: Taylor to degree 7, highest first.
static const float rowq_exp_taylor[8] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
#define ROWQ_LOG2E 1.44269504088896341f
#define ROWQ_LN2_HI 0.693145751953125f
#define ROWQ_LN2_LO 1.428606765330187e-06f

#endif  // ROWQ_POLY_H
