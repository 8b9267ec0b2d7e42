/*
 * A stand-in for the RKNN runtime, for running the generated C demo on the test machine: the
 * "model" scores each class c by the mean of input channel c (3 classes), so a picture whose green
 * channel is brightest is class 1. Zero-copy outputs are int8 (scale 0.5, zero point -10, rounded to
 * nearest), like an int8 model's native output; rknn_outputs_get returns floats. The tests check its
 * outputs against ONNX Runtime running the same model (test_selftest.py, stand_in_golden). FAKE_RKNN_SIZE sets H = W (default 8),
 * FAKE_RKNN_STRIDE the input row stride in pixels (default: the width), FAKE_RKNN_PERTURB a value
 * added to class 0's output (a runtime that computes wrong numbers, for the demo's --selftest).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rknn_api.h"

static int size_hw(void)
{
    const char* s = getenv("FAKE_RKNN_SIZE");
    return s ? atoi(s) : 8;
}

static int stride_px(void)
{
    const char* s = getenv("FAKE_RKNN_STRIDE");
    return s ? atoi(s) : size_hw();
}

static rknn_tensor_mem* g_io[2];
static int g_n_io = 0;
static const uint8_t* g_input = NULL;
static float g_logits[3];

int rknn_init(rknn_context* context, void* model, uint32_t size, uint32_t flag, rknn_init_extend* extend)
{
    (void)model; (void)flag; (void)extend;
    if (size == 0) return RKNN_ERR_MODEL_INVALID;
    *context = 1;
    return RKNN_SUCC;
}

int rknn_destroy(rknn_context context)
{
    (void)context;
    return RKNN_SUCC;
}

int rknn_query(rknn_context context, rknn_query_cmd cmd, void* info, uint32_t size)
{
    (void)context;
    int hw = size_hw();
    if (cmd == RKNN_QUERY_IN_OUT_NUM) {
        rknn_input_output_num* n = (rknn_input_output_num*)info;
        n->n_input = 1;
        n->n_output = 1;
        return RKNN_SUCC;
    }
    if (size != sizeof(rknn_tensor_attr)) return RKNN_ERR_PARAM_INVALID;
    rknn_tensor_attr* a = (rknn_tensor_attr*)info;
    if (cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_NATIVE_INPUT_ATTR) {
        a->n_dims = 4;
        a->dims[0] = 1; a->dims[1] = (uint32_t)hw; a->dims[2] = (uint32_t)hw; a->dims[3] = 3;
        a->fmt = RKNN_TENSOR_NHWC;
        a->type = RKNN_TENSOR_INT8;
        a->n_elems = (uint32_t)(hw * hw * 3);
        a->size = a->n_elems;
        a->w_stride = (uint32_t)stride_px();
        a->size_with_stride = (uint32_t)(hw * stride_px() * 3);
        strcpy(a->name, "input0");
        return RKNN_SUCC;
    }
    if (cmd == RKNN_QUERY_OUTPUT_ATTR || cmd == RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR) {
        a->n_dims = 2;
        a->dims[0] = 1; a->dims[1] = 3;
        a->fmt = RKNN_TENSOR_UNDEFINED;
        a->type = RKNN_TENSOR_INT8;
        a->qnt_type = RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC;
        a->zp = -10;
        a->scale = 0.5f;
        a->n_elems = 3;
        a->size = 3;
        a->size_with_stride = 3;
        strcpy(a->name, "output0");
        return RKNN_SUCC;
    }
    return RKNN_ERR_PARAM_INVALID;
}

static void compute(const uint8_t* px, int row_stride_px)
{
    int hw = size_hw();
    double sum[3] = {0, 0, 0};
    for (int y = 0; y < hw; y++)
        for (int x = 0; x < hw; x++)
            for (int c = 0; c < 3; c++) sum[c] += px[(y * row_stride_px + x) * 3 + c];
    for (int c = 0; c < 3; c++) g_logits[c] = (float)(sum[c] / (hw * hw) / 25.0);
    const char* perturb = getenv("FAKE_RKNN_PERTURB");
    if (perturb) g_logits[0] += (float)atof(perturb);
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[])
{
    (void)context;
    if (n_inputs != 1 || inputs[0].type != RKNN_TENSOR_UINT8 || inputs[0].fmt != RKNN_TENSOR_NHWC)
        return RKNN_ERR_INPUT_INVALID;
    g_input = (const uint8_t*)inputs[0].buf;
    return RKNN_SUCC;
}

int rknn_run(rknn_context context, rknn_run_extend* extend)
{
    (void)context; (void)extend;
    if (g_n_io == 2) {
        compute((const uint8_t*)g_io[0]->virt_addr, stride_px());
        int8_t* q = (int8_t*)g_io[1]->virt_addr;
        for (int c = 0; c < 3; c++) { /* an int8 requantisation: round to nearest (even), saturate */
            long v = lrintf(g_logits[c] / 0.5f) + -10;
            q[c] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        }
    } else if (g_input) {
        compute(g_input, size_hw());
    } else {
        return RKNN_ERR_INPUT_INVALID;
    }
    return RKNN_SUCC;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend* extend)
{
    (void)context; (void)extend;
    if (n_outputs != 1 || !outputs[0].want_float) return RKNN_ERR_OUTPUT_INVALID;
    float* buf = (float*)malloc(sizeof(g_logits));
    memcpy(buf, g_logits, sizeof(g_logits));
    outputs[0].buf = buf;
    outputs[0].size = sizeof(g_logits);
    return RKNN_SUCC;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[])
{
    (void)context;
    for (uint32_t i = 0; i < n_outputs; i++) free(outputs[i].buf);
    return RKNN_SUCC;
}

rknn_tensor_mem* rknn_create_mem(rknn_context ctx, uint32_t size)
{
    (void)ctx;
    rknn_tensor_mem* m = (rknn_tensor_mem*)calloc(1, sizeof(rknn_tensor_mem));
    m->virt_addr = calloc(1, size);
    m->size = size;
    return m;
}

int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem* mem)
{
    (void)ctx;
    free(mem->virt_addr);
    free(mem);
    return RKNN_SUCC;
}

int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem* mem, rknn_tensor_attr* attr)
{
    (void)ctx;
    if (g_n_io == 0 && (attr->type != RKNN_TENSOR_UINT8 || attr->fmt != RKNN_TENSOR_NHWC))
        return RKNN_ERR_INPUT_INVALID; /* the demo must hand uint8 NHWC to the NPU */
    if (g_n_io >= 2) return RKNN_ERR_PARAM_INVALID;
    g_io[g_n_io++] = mem;
    return RKNN_SUCC;
}
