/*
 * edgepipe classification demo on the RKNN runtime C API.
 *
 *   ./rknn_classify model.rknn image.ppm [labels.txt] [top_k]
 *
 * image.ppm: a binary PPM (P6) already resized to the model input size, RGB; `prepare_input.py`
 * (in this package) makes one from any image with the exact preprocessing used in training.
 * A raw file of H*W*3 RGB bytes is accepted too. Normalisation (mean/std) is inside the .rknn
 * model: the input is passed as uint8 NHWC and the NPU normalises and quantizes it.
 *
 * Two input/output paths:
 *   EDGEPIPE_ZERO_COPY (default for RV1103/RV1106, set by CMakeLists.txt): rknn_create_mem +
 *     rknn_set_io_mem, the only path the RV1103/RV1106 runtime (librknnmrt) offers;
 *   otherwise: rknn_inputs_set + rknn_outputs_get (librknnrt on RK356x/RK3588).
 * Both: rknn_init, rknn_query (in/out count, tensor attributes), rknn_run, softmax, top-k,
 * rknn_destroy.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "rknn_api.h"

#ifndef EDGEPIPE_TOP_K
#define EDGEPIPE_TOP_K 5
#endif
#define MAX_LABELS 4096
#define MAX_LABEL_LEN 128

static unsigned char* read_file(const char* path, long* size_out)
{
    FILE* fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "cannot open %s\n", path);
        return NULL;
    }
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char* buf = (unsigned char*)malloc((size_t)size);
    if (!buf || fread(buf, 1, (size_t)size, fp) != (size_t)size) {
        fprintf(stderr, "cannot read %s\n", path);
        free(buf);
        fclose(fp);
        return NULL;
    }
    fclose(fp);
    *size_out = size;
    return buf;
}

/* Skip whitespace and '#' comments in a PPM header. */
static const unsigned char* ppm_skip(const unsigned char* p, const unsigned char* end)
{
    while (p < end) {
        if (*p == '#') {
            while (p < end && *p != '\n') p++;
        } else if (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') {
            p++;
        } else {
            break;
        }
    }
    return p;
}

static const unsigned char* ppm_int(const unsigned char* p, const unsigned char* end, int* value)
{
    p = ppm_skip(p, end);
    *value = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        *value = *value * 10 + (*p - '0');
        p++;
    }
    return p;
}

/* Load `path` as H*W*3 RGB bytes; returns NULL when it is neither a P6 PPM of that size nor raw. */
static unsigned char* load_rgb(const char* path, int width, int height)
{
    long size = 0;
    unsigned char* data = read_file(path, &size);
    if (!data) return NULL;
    long want = (long)width * height * 3;
    if (size >= 2 && data[0] == 'P' && data[1] == '6') {
        const unsigned char* end = data + size;
        int w = 0, h = 0, maxval = 0;
        const unsigned char* p = ppm_int(data + 2, end, &w);
        p = ppm_int(p, end, &h);
        p = ppm_int(p, end, &maxval);
        p++; /* the single whitespace after maxval */
        if (w != width || h != height || maxval != 255 || end - p < want) {
            fprintf(stderr, "%s is %dx%d (maxval %d); the model takes %dx%d RGB: run prepare_input.py\n",
                    path, w, h, maxval, width, height);
            free(data);
            return NULL;
        }
        unsigned char* rgb = (unsigned char*)malloc((size_t)want);
        memcpy(rgb, p, (size_t)want);
        free(data);
        return rgb;
    }
    if (size != want) {
        fprintf(stderr, "%s: %ld bytes, expected a P6 PPM or %ld raw RGB bytes (%dx%d)\n", path, size,
                want, width, height);
        free(data);
        return NULL;
    }
    return data;
}

static int load_labels(const char* path, char labels[][MAX_LABEL_LEN], int max_labels)
{
    FILE* fp = fopen(path, "r");
    if (!fp) return 0;
    int n = 0;
    char line[MAX_LABEL_LEN];
    while (n < max_labels && fgets(line, sizeof(line), fp)) {
        size_t len = strcspn(line, "\r\n");
        line[len] = '\0';
        strncpy(labels[n], line, MAX_LABEL_LEN - 1);
        labels[n][MAX_LABEL_LEN - 1] = '\0';
        n++;
    }
    fclose(fp);
    return n;
}

static void softmax(float* x, int n)
{
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max) max = x[i];
    float sum = 0.f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

static void print_top_k(const float* prob, int n, int k, char labels[][MAX_LABEL_LEN], int n_labels)
{
    int used[MAX_LABELS] = {0};
    if (k > n) k = n;
    for (int r = 0; r < k; r++) {
        int best = -1;
        for (int i = 0; i < n && i < MAX_LABELS; i++)
            if (!used[i] && (best < 0 || prob[i] > prob[best])) best = i;
        if (best < 0) break;
        used[best] = 1;
        printf("%d\t%s\t%.4f\n", best, best < n_labels ? labels[best] : "?", prob[best]);
    }
}

static void dump_attr(const char* what, const rknn_tensor_attr* a)
{
    printf("%s %u name=%s dims=[", what, a->index, a->name);
    for (uint32_t i = 0; i < a->n_dims; i++) printf(i ? ",%u" : "%u", a->dims[i]);
    printf("] n_elems=%u size=%u fmt=%d type=%d qnt=%d zp=%d scale=%f\n", a->n_elems, a->size, a->fmt,
           a->type, a->qnt_type, a->zp, a->scale);
}

/* Dequantize (when needed) one output tensor into floats. */
static void to_float(const void* buf, const rknn_tensor_attr* a, float* out, int n)
{
    for (int i = 0; i < n; i++) {
        switch (a->type) {
        case RKNN_TENSOR_INT8:
            out[i] = ((float)((const int8_t*)buf)[i] - (float)a->zp) * a->scale;
            break;
        case RKNN_TENSOR_UINT8:
            out[i] = ((float)((const uint8_t*)buf)[i] - (float)a->zp) * a->scale;
            break;
        case RKNN_TENSOR_FLOAT32:
            out[i] = ((const float*)buf)[i];
            break;
        default:
            out[i] = 0.f;
        }
    }
}

int main(int argc, char** argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s model.rknn image.ppm [labels.txt] [top_k]\n", argv[0]);
        return 1;
    }
    const char* model_path = argv[1];
    const char* image_path = argv[2];
    const char* labels_path = argc > 3 ? argv[3] : "labels.txt";
    int top_k = argc > 4 ? atoi(argv[4]) : EDGEPIPE_TOP_K;

    static char labels[MAX_LABELS][MAX_LABEL_LEN];
    int n_labels = load_labels(labels_path, labels, MAX_LABELS);

    long model_size = 0;
    unsigned char* model = read_file(model_path, &model_size);
    if (!model) return 1;

    rknn_context ctx = 0;
    int ret = rknn_init(&ctx, model, (uint32_t)model_size, 0, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_init failed: %d (an operator without an NPU or CPU kernel on this chip?)\n", ret);
        free(model);
        return 1;
    }

    rknn_input_output_num io_num;
    memset(&io_num, 0, sizeof(io_num));
    ret = rknn_query(ctx, RKNN_QUERY_IN_OUT_NUM, &io_num, sizeof(io_num));
    if (ret != RKNN_SUCC || io_num.n_input != 1 || io_num.n_output < 1) {
        fprintf(stderr, "rknn_query(IN_OUT_NUM) failed: %d (inputs %u)\n", ret, io_num.n_input);
        rknn_destroy(ctx);
        free(model);
        return 1;
    }

    rknn_tensor_attr in_attr;
    memset(&in_attr, 0, sizeof(in_attr));
    in_attr.index = 0;
#ifdef EDGEPIPE_ZERO_COPY
    ret = rknn_query(ctx, RKNN_QUERY_NATIVE_INPUT_ATTR, &in_attr, sizeof(in_attr));
#else
    ret = rknn_query(ctx, RKNN_QUERY_INPUT_ATTR, &in_attr, sizeof(in_attr));
#endif
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_query(INPUT_ATTR) failed: %d\n", ret);
        rknn_destroy(ctx);
        free(model);
        return 1;
    }
    dump_attr("input", &in_attr);

    rknn_tensor_attr out_attr;
    memset(&out_attr, 0, sizeof(out_attr));
    out_attr.index = 0;
#ifdef EDGEPIPE_ZERO_COPY
    ret = rknn_query(ctx, RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR, &out_attr, sizeof(out_attr));
#else
    ret = rknn_query(ctx, RKNN_QUERY_OUTPUT_ATTR, &out_attr, sizeof(out_attr));
#endif
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_query(OUTPUT_ATTR) failed: %d\n", ret);
        rknn_destroy(ctx);
        free(model);
        return 1;
    }
    dump_attr("output", &out_attr);

    /* input dims: NHWC (native) or NCHW */
    int height, width;
    if (in_attr.fmt == RKNN_TENSOR_NCHW) {
        height = (int)in_attr.dims[2];
        width = (int)in_attr.dims[3];
    } else {
        height = (int)in_attr.dims[1];
        width = (int)in_attr.dims[2];
    }
    unsigned char* rgb = load_rgb(image_path, width, height);
    if (!rgb) {
        rknn_destroy(ctx);
        free(model);
        return 1;
    }

    int n_classes = (int)out_attr.n_elems;
    float* prob = (float*)malloc(sizeof(float) * (size_t)n_classes);

#ifdef EDGEPIPE_ZERO_COPY
    /* uint8 NHWC in: the NPU applies the model's mean/std and quantization itself */
    in_attr.type = RKNN_TENSOR_UINT8;
    in_attr.fmt = RKNN_TENSOR_NHWC;
    rknn_tensor_mem* in_mem = rknn_create_mem(ctx, in_attr.size_with_stride);
    rknn_tensor_mem* out_mem = rknn_create_mem(ctx, out_attr.size_with_stride);
    if (!in_mem || !out_mem) {
        fprintf(stderr, "rknn_create_mem failed\n");
        return 1;
    }
    int stride = in_attr.w_stride ? (int)in_attr.w_stride : width;
    for (int y = 0; y < height; y++)
        memcpy((unsigned char*)in_mem->virt_addr + (size_t)y * stride * 3, rgb + (size_t)y * width * 3,
               (size_t)width * 3);
    ret = rknn_set_io_mem(ctx, in_mem, &in_attr);
    if (ret == RKNN_SUCC) ret = rknn_set_io_mem(ctx, out_mem, &out_attr);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_set_io_mem failed: %d\n", ret);
        return 1;
    }
    ret = rknn_run(ctx, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_run failed: %d\n", ret);
        return 1;
    }
    to_float(out_mem->virt_addr, &out_attr, prob, n_classes);
    rknn_destroy_mem(ctx, in_mem);
    rknn_destroy_mem(ctx, out_mem);
#else
    rknn_input inputs[1];
    memset(inputs, 0, sizeof(inputs));
    inputs[0].index = 0;
    inputs[0].type = RKNN_TENSOR_UINT8;
    inputs[0].fmt = RKNN_TENSOR_NHWC;
    inputs[0].size = (uint32_t)(width * height * 3);
    inputs[0].buf = rgb;
    ret = rknn_inputs_set(ctx, io_num.n_input, inputs);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_inputs_set failed: %d\n", ret);
        return 1;
    }
    ret = rknn_run(ctx, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_run failed: %d\n", ret);
        return 1;
    }
    rknn_output outputs[1];
    memset(outputs, 0, sizeof(outputs));
    outputs[0].index = 0;
    outputs[0].want_float = 1;
    ret = rknn_outputs_get(ctx, 1, outputs, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_outputs_get failed: %d\n", ret);
        return 1;
    }
    rknn_tensor_attr float_attr = out_attr;
    float_attr.type = RKNN_TENSOR_FLOAT32;
    to_float(outputs[0].buf, &float_attr, prob, n_classes);
    rknn_outputs_release(ctx, 1, outputs);
#endif

    softmax(prob, n_classes);
    print_top_k(prob, n_classes, top_k, labels, n_labels);

    free(prob);
    free(rgb);
    rknn_destroy(ctx);
    free(model);
    return 0;
}
