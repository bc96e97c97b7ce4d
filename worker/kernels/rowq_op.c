// ONNX Runtime custom ops of domain "deposium.rowq", the GEMMs of the `int8-fused` recipe
// (convert/fuse.py writes them; worker/kernels/__init__.py finds this library; the Embedder registers it).
//
// Why: the `int8-rot` graph spends seven ONNX Runtime nodes per quantized activation (Abs, ReduceMax,
// Max, Div, QuantizeLinear, MatMulIntegerToFloat, the row-scale Mul), each reading and writing the
// whole activation. One op here does it in one pass: per-row absmax quantization to u8 (zero point
// 128), the u8 x s8 GEMM, the zero-point correction and the row x column scales; optionally after the
// block-32 Hadamard rotation ("Rot" ops) and with the bias Add and the erf GELU that follow folded into
// the epilogue ("Bias", "BiasGelu" ops). Every row is computed on its own: batch invariant.
//
// Inputs: x fp32 [..., K]; b int8 [K * N] packed (convert/fuse.py: pack_weights); w_scale fp32 [N];
// colsum int32 [N]; bias fp32 [N] ("Bias" ops only) or widths int64 [parts] ("Split" ops). Output fp32
// [..., N], or one fp32 [..., width_i] per part ("Split": the merged q/k/v or gate/up GEMM hands each
// part its own tensor, no Split node copies them). K, N and every width: multiples of 64.
//
// Plain C against ONNX Runtime's C API only (include/onnxruntime_c_api.h, API 21, vendored), compiled
// for baseline x86-64: the kernels live in rowq_avx512.c and rowq_avx2.c, reached only after the CPU
// check below. DEPOSIUM_KERNEL_ISA (auto | amx | vnni | avx2; worker/config.py documents it) forces a
// path; every path gives the same bits, so a fleet of mixed CPUs stores the same vectors.
#include "onnxruntime_c_api.h"
#include "rowq.h"
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { ISA_AMX, ISA_VNNI, ISA_AVX2, ISA_COUNT };
static const char *const isa_names[ISA_COUNT] = {"amx", "vnni", "avx2"};
#define OP_COUNT 8

typedef struct {
  OrtCustomOp base;  // first: ONNX Runtime hands back this pointer
  const char *name;
  int rotate, act, split, isa;  // split: a fifth input, int64 [parts], the widths of the outputs
} RowqOp;

static const OrtApi *ort;
static int last_isa = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

#define TRY(call)                           \
  do {                                      \
    OrtStatus *failed_ = (call);            \
    if (failed_ != NULL) return failed_;    \
  } while (0)

static OrtStatus *fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static OrtStatus *fail(const char *fmt, ...) {
  char message[512];
  va_list args;
  va_start(args, fmt);
  vsnprintf(message, sizeof message, fmt, args);
  va_end(args);
  return ort->CreateStatus(ORT_FAIL, message);
}

void *rowq_scratch(int slot, uint64_t bytes) {
  static __thread void *buffers[5];
  static __thread uint64_t sizes[5];
  if (bytes > sizes[slot]) {
    void *grown = realloc(buffers[slot], bytes);
    if (grown == NULL) return NULL;
    buffers[slot] = grown;
    sizes[slot] = bytes;
  }
  return buffers[slot];
}

static OrtStatus *shape_of(const OrtValue *value, int64_t *dims, size_t max_dims, size_t *rank, int64_t *count) {
  OrtTensorTypeAndShapeInfo *info;
  TRY(ort->GetTensorTypeAndShape(value, &info));
  OrtStatus *status = ort->GetDimensionsCount(info, rank);
  if (status == NULL && *rank > max_dims) status = fail("deposium.rowq: input rank %zu exceeds %zu", *rank, max_dims);
  if (status == NULL && dims != NULL) status = ort->GetDimensions(info, dims, *rank);
  size_t elements = 0;
  if (status == NULL) status = ort->GetTensorShapeElementCount(info, &elements);
  *count = (int64_t)elements;
  ort->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *context) {
  const RowqOp *op = kernel;
  const size_t inputs = op->act || op->split ? 5 : 4;
  const OrtValue *in[5];
  void *data[5];
  int64_t count[5], x_dims[16];
  size_t rank = 0;
  for (size_t i = 0; i < inputs; i++) {
    size_t r;
    TRY(ort->KernelContext_GetInput(context, i, &in[i]));
    TRY(shape_of(in[i], i == 0 ? x_dims : NULL, 16, &r, &count[i]));
    if (i == 0 && (rank = r) == 0) return fail("%s: x must have at least one dimension", op->name);
    TRY(ort->GetTensorMutableData((OrtValue *)in[i], &data[i]));
  }
  const int64_t K = x_dims[rank - 1], N = count[2], M = K ? count[0] / K : 0;
  if (K % 64 || N % 64 || K == 0 || N == 0)
    return fail("%s: K = %lld and N = %lld must be positive multiples of 64", op->name, (long long)K, (long long)N);
  if (count[1] != K * N || count[3] != N || (op->act && count[4] != N))
    return fail("%s: weights hold %lld values, scales %lld, column sums %lld for K = %lld, N = %lld", op->name,
                (long long)count[1], (long long)count[2], (long long)count[3], (long long)K, (long long)N);
  // Outputs: one [..., N], or one [..., width_i] per part (the Split ops).
  size_t parts = 1;
  TRY(ort->KernelContext_GetOutputCount(context, &parts));
  const int64_t one_width[1] = {N};
  const int64_t *widths = op->split ? data[4] : one_width;
  if (op->split) {
    int64_t total = 0;
    for (size_t i = 0; i < parts && i < (size_t)count[4]; i++) {
      if (widths[i] <= 0 || widths[i] % 64) return fail("%s: part %zu is %lld wide, not a multiple of 64", op->name, i, (long long)widths[i]);
      total += widths[i];
    }
    if ((size_t)count[4] != parts || total != N)
      return fail("%s: %zu outputs, %lld widths summing to %lld, for N = %lld", op->name, parts, (long long)count[4],
                  (long long)total, (long long)N);
  } else if (parts != 1) {
    return fail("%s: one output expected, the graph has %zu", op->name, parts);
  }
  float **panel = rowq_scratch(3, (uint64_t)(N / 64) * sizeof(float *));
  int64_t *ld = rowq_scratch(4, (uint64_t)(N / 64) * sizeof(int64_t));
  if (panel == NULL || ld == NULL) return fail("%s: out of memory", op->name);
  for (size_t i = 0, p = 0; i < parts; i++) {
    x_dims[rank - 1] = widths[i];
    OrtValue *y;
    void *out;
    TRY(ort->KernelContext_GetOutput(context, i, x_dims, rank, &y));
    TRY(ort->GetTensorMutableData(y, &out));
    for (int64_t c = 0; c < widths[i]; c += 64, p++) panel[p] = (float *)out + c, ld[p] = widths[i];
  }
  if (M == 0) return NULL;
  const rowq_out out = {panel, ld};
  const float *bias = op->act ? data[4] : NULL;
  const int failed = op->isa == ISA_AVX2
      ? rowq_avx2_run(M, data[0], K, N, data[1], data[2], bias, op->act, op->rotate, &out)
      : rowq_avx512_run(op->isa == ISA_AMX, M, data[0], K, N, data[1], data[2], data[3], bias, op->act, op->rotate, &out);
  return failed ? fail("%s: out of memory for %lld rows x %lld", op->name, (long long)M, (long long)K) : NULL;
}

static OrtStatus *ORT_API_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                             void **kernel) {
  (void)api, (void)info;
  *kernel = (void *)op;  // the op's constants are all a kernel needs
  return NULL;
}
static void ORT_API_CALL destroy_kernel(void *kernel) { (void)kernel; }
static const char *ORT_API_CALL get_name(const OrtCustomOp *op) { return ((const RowqOp *)op)->name; }
static const char *ORT_API_CALL get_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t i) {
  if (i == 4 && ((const RowqOp *)op)->split) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                                                             : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) {
  const RowqOp *rowq = (const RowqOp *)op;
  return rowq->act || rowq->split ? 5 : 4;
}
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t i) {
  (void)op, (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t i) {
  (void)op, (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
// A Split op's outputs: one or more float tensors (variadic, homogeneous).
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp *op, size_t i) {
  (void)i;
  return ((const RowqOp *)op)->split ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL memory_type(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return OrtMemTypeDefault; }
static int ORT_API_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL newest(const OrtCustomOp *op) { (void)op; return INT_MAX; }
static size_t ORT_API_CALL no_pairs(int **input_index, int **output_index) {
  *input_index = *output_index = NULL;
  return 0;
}
static void ORT_API_CALL release_pairs(int *input_index, int *output_index) { (void)input_index, (void)output_index; }

static void init_op(RowqOp *op, const char *name, int rotate, int act, int split, int isa) {
  memset(op, 0, sizeof *op);
  op->name = name, op->rotate = rotate, op->act = act, op->split = split, op->isa = isa;
  OrtCustomOp *b = &op->base;
  b->version = ORT_API_VERSION;
  b->GetName = get_name;
  b->GetExecutionProviderType = get_provider;
  b->GetInputType = input_type;
  b->GetInputTypeCount = input_count;
  b->GetOutputType = output_type;
  b->GetOutputTypeCount = output_count;
  b->KernelDestroy = destroy_kernel;
  b->GetInputCharacteristic = required;
  b->GetOutputCharacteristic = output_kind;
  b->GetInputMemoryType = memory_type;
  b->GetVariadicInputMinArity = one;
  b->GetVariadicInputHomogeneity = one;
  b->GetVariadicOutputMinArity = one;
  b->GetVariadicOutputHomogeneity = one;
  b->CreateKernelV2 = create_kernel;
  b->KernelComputeV2 = compute;
  b->GetStartVersion = one;
  b->GetEndVersion = newest;
  b->GetMayInplace = no_pairs;
  b->ReleaseMayInplace = release_pairs;
  b->GetAliasMap = no_pairs;
  b->ReleaseAliasMap = release_pairs;
}

// Which path this process can run, or the one DEPOSIUM_KERNEL_ISA forces (refused if the CPU lacks it).
static OrtStatus *pick_isa(int *isa) {
  const char *forced = getenv("DEPOSIUM_KERNEL_ISA");
  if (forced != NULL && *forced == '\0') forced = NULL;
  if (forced != NULL && strcmp(forced, "auto") == 0) forced = NULL;
  __builtin_cpu_init();
  const int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512vnni");
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  int wanted = -1;
  for (int i = 0; forced != NULL && i < ISA_COUNT; i++)
    if (strcmp(forced, isa_names[i]) == 0) wanted = i;
  if (forced != NULL && wanted < 0)
    return fail("DEPOSIUM_KERNEL_ISA=%s: choose one of auto, amx, vnni, avx2", forced);
  // AMX needs the kernel's permission for the tile state (Linux 5.16+: ARCH_REQ_XCOMP_PERM, XTILEDATA).
  const int amx = vnni && __builtin_cpu_supports("amx-int8") && (wanted < 0 || wanted == ISA_AMX) &&
                  syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  const int has[ISA_COUNT] = {amx, vnni, avx2};
  if (wanted >= 0) {
    if (!has[wanted]) return fail("DEPOSIUM_KERNEL_ISA=%s: this CPU (or kernel) does not offer it", forced);
    *isa = wanted;
    return NULL;
  }
  *isa = amx ? ISA_AMX : vnni ? ISA_VNNI : ISA_AVX2;
  if (!avx2 && !vnni)
    return fail("the deposium.rowq kernels need AVX2 and FMA at least, which this CPU lacks; "
                "convert the model with --recipe int8-rot for it");
  return NULL;
}

// The path the last registration chose ("amx", "vnni", "avx2"; "" before any): logs and tests read it.
const char *deposium_rowq_isa(void) { return last_isa < 0 ? "" : isa_names[last_isa]; }

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
  ort = api_base->GetApi(ORT_API_VERSION);
  if (ort == NULL) {  // an onnxruntime older than 1.21: report it through the API every version has
    const OrtApi *oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "the deposium.rowq kernels need onnxruntime 1.21 or later (C API 21)");
  }
  int isa;
  TRY(pick_isa(&isa));
  // One domain per path, made once and kept for the process's life: sessions hold on to it.
  static OrtCustomOpDomain *domains[ISA_COUNT];
  static RowqOp ops[ISA_COUNT][OP_COUNT];
  pthread_mutex_lock(&lock);
  OrtStatus *status = NULL;
  if (domains[isa] == NULL) {
    static const struct { const char *name; int rotate, act, split; } kinds[OP_COUNT] = {
        {"FusedRowQGemm", 0, 0, 0},          {"FusedRotRowQGemm", 1, 0, 0},
        {"FusedRowQGemmBias", 0, 1, 0},      {"FusedRotRowQGemmBias", 1, 1, 0},
        {"FusedRowQGemmBiasGelu", 0, 2, 0},  {"FusedRotRowQGemmBiasGelu", 1, 2, 0},
        {"FusedRowQGemmSplit", 0, 0, 1},     {"FusedRotRowQGemmSplit", 1, 0, 1},
    };
    OrtCustomOpDomain *domain = NULL;
    status = ort->CreateCustomOpDomain("deposium.rowq", &domain);
    for (int i = 0; status == NULL && i < OP_COUNT; i++) {
      init_op(&ops[isa][i], kinds[i].name, kinds[i].rotate, kinds[i].act, kinds[i].split, isa);
      status = ort->CustomOpDomain_Add(domain, &ops[isa][i].base);
    }
    if (status == NULL) domains[isa] = domain;
  }
  if (status == NULL) status = ort->AddCustomOpDomain(options, domains[isa]);
  if (status == NULL) last_isa = isa;
  pthread_mutex_unlock(&lock);
  return status;
}
