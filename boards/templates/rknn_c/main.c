/*
 * edgepipe classification demo on the RKNN runtime C API.
 *
 *   ./rknn_classify model.rknn image.ppm [labels.txt] [top_k]
 *   ./rknn_classify --selftest [model.rknn] [golden/golden.txt]
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
 *
 * --selftest runs the package's golden samples (golden/golden.txt: the exact uint8 input tensors
 * and the outputs rknn-toolkit2's simulator gave for them on the host) through this board's NPU and
 * prints PASS or FAIL with the max abs difference and top-1 agreement. The inputs are the exact
 * tensors, so a FAIL is the runtime or the model file, not preprocessing (`python3 prepare_input.py
 * --selftest` checks the preprocessing of the golden images).
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

/* labels.txt: one name a line, UTF-8, any length. The whole file is read and split in place (a
 * fixed line buffer would cut a long name, say 40 Chinese characters, in two and shift every later
 * label by one). Returns the number of labels; *storage is freed by the caller. */
static int load_labels(const char* path, const char* labels[], int max_labels, unsigned char** storage)
{
    long size = 0;
    FILE* probe = fopen(path, "rb");
    *storage = NULL;
    if (!probe) return 0;
    fclose(probe);
    unsigned char* raw = read_file(path, &size);
    if (!raw) return 0;
    char* text = (char*)realloc(raw, (size_t)size + 1);
    if (!text) {
        free(raw);
        return 0;
    }
    text[size] = '\0';
    *storage = (unsigned char*)text;
    int n = 0;
    char* line = text;
    while (n < max_labels && line < text + size) {
        char* end = strchr(line, '\n');
        if (end) *end = '\0';
        size_t len = strlen(line);
        if (len > 0 && line[len - 1] == '\r') line[len - 1] = '\0';
        labels[n++] = line;
        if (!end) break;
        line = end + 1;
    }
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

static void print_top_k(const float* prob, int n, int k, const char* labels[], int n_labels)
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

/* One loaded model: its attributes and (zero-copy) I/O buffers, set up once for many runs. */
typedef struct {
    rknn_context ctx;
    unsigned char* model;
    rknn_tensor_attr in_attr;
    rknn_tensor_attr out_attr;
    int width;
    int height;
    int n_classes;
    rknn_tensor_mem* in_mem;
    rknn_tensor_mem* out_mem;
} runner;

static void runner_close(runner* r)
{
    if (r->in_mem) rknn_destroy_mem(r->ctx, r->in_mem);
    if (r->out_mem) rknn_destroy_mem(r->ctx, r->out_mem);
    if (r->ctx) rknn_destroy(r->ctx);
    free(r->model);
    memset(r, 0, sizeof(*r));
}

static int runner_open(runner* r, const char* model_path)
{
    memset(r, 0, sizeof(*r));
    long model_size = 0;
    r->model = read_file(model_path, &model_size);
    if (!r->model) return -1;
    int ret = rknn_init(&r->ctx, r->model, (uint32_t)model_size, 0, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_init failed: %d (an operator without an NPU or CPU kernel on this chip?)\n", ret);
        r->ctx = 0;
        runner_close(r);
        return -1;
    }
    rknn_input_output_num io_num;
    memset(&io_num, 0, sizeof(io_num));
    ret = rknn_query(r->ctx, RKNN_QUERY_IN_OUT_NUM, &io_num, sizeof(io_num));
    if (ret != RKNN_SUCC || io_num.n_input != 1 || io_num.n_output < 1) {
        fprintf(stderr, "rknn_query(IN_OUT_NUM) failed: %d (inputs %u)\n", ret, io_num.n_input);
        runner_close(r);
        return -1;
    }
    r->in_attr.index = 0;
#ifdef EDGEPIPE_ZERO_COPY
    ret = rknn_query(r->ctx, RKNN_QUERY_NATIVE_INPUT_ATTR, &r->in_attr, sizeof(r->in_attr));
#else
    ret = rknn_query(r->ctx, RKNN_QUERY_INPUT_ATTR, &r->in_attr, sizeof(r->in_attr));
#endif
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_query(INPUT_ATTR) failed: %d\n", ret);
        runner_close(r);
        return -1;
    }
    dump_attr("input", &r->in_attr);
    r->out_attr.index = 0;
#ifdef EDGEPIPE_ZERO_COPY
    ret = rknn_query(r->ctx, RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR, &r->out_attr, sizeof(r->out_attr));
#else
    ret = rknn_query(r->ctx, RKNN_QUERY_OUTPUT_ATTR, &r->out_attr, sizeof(r->out_attr));
#endif
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_query(OUTPUT_ATTR) failed: %d\n", ret);
        runner_close(r);
        return -1;
    }
    dump_attr("output", &r->out_attr);
    /* input dims: NHWC (native) or NCHW */
    if (r->in_attr.fmt == RKNN_TENSOR_NCHW) {
        r->height = (int)r->in_attr.dims[2];
        r->width = (int)r->in_attr.dims[3];
    } else {
        r->height = (int)r->in_attr.dims[1];
        r->width = (int)r->in_attr.dims[2];
    }
    r->n_classes = (int)r->out_attr.n_elems;
#ifdef EDGEPIPE_ZERO_COPY
    /* uint8 NHWC in: the NPU applies the model's mean/std and quantization itself */
    r->in_attr.type = RKNN_TENSOR_UINT8;
    r->in_attr.fmt = RKNN_TENSOR_NHWC;
    r->in_mem = rknn_create_mem(r->ctx, r->in_attr.size_with_stride);
    r->out_mem = rknn_create_mem(r->ctx, r->out_attr.size_with_stride);
    if (!r->in_mem || !r->out_mem) {
        fprintf(stderr, "rknn_create_mem failed\n");
        runner_close(r);
        return -1;
    }
    ret = rknn_set_io_mem(r->ctx, r->in_mem, &r->in_attr);
    if (ret == RKNN_SUCC) ret = rknn_set_io_mem(r->ctx, r->out_mem, &r->out_attr);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_set_io_mem failed: %d\n", ret);
        runner_close(r);
        return -1;
    }
#endif
    return 0;
}

/* One uint8 H*W*3 image (model channel order) -> n_classes dequantized outputs (before softmax). */
static int runner_infer(runner* r, const unsigned char* rgb, float* logits)
{
    int ret;
#ifdef EDGEPIPE_ZERO_COPY
    int stride = r->in_attr.w_stride ? (int)r->in_attr.w_stride : r->width;
    for (int y = 0; y < r->height; y++)
        memcpy((unsigned char*)r->in_mem->virt_addr + (size_t)y * stride * 3, rgb + (size_t)y * r->width * 3,
               (size_t)r->width * 3);
    ret = rknn_run(r->ctx, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_run failed: %d\n", ret);
        return -1;
    }
    to_float(r->out_mem->virt_addr, &r->out_attr, logits, r->n_classes);
#else
    rknn_input inputs[1];
    memset(inputs, 0, sizeof(inputs));
    inputs[0].index = 0;
    inputs[0].type = RKNN_TENSOR_UINT8;
    inputs[0].fmt = RKNN_TENSOR_NHWC;
    inputs[0].size = (uint32_t)(r->width * r->height * 3);
    inputs[0].buf = (void*)rgb;
    ret = rknn_inputs_set(r->ctx, 1, inputs);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_inputs_set failed: %d\n", ret);
        return -1;
    }
    ret = rknn_run(r->ctx, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_run failed: %d\n", ret);
        return -1;
    }
    rknn_output outputs[1];
    memset(outputs, 0, sizeof(outputs));
    outputs[0].index = 0;
    outputs[0].want_float = 1;
    ret = rknn_outputs_get(r->ctx, 1, outputs, NULL);
    if (ret != RKNN_SUCC) {
        fprintf(stderr, "rknn_outputs_get failed: %d\n", ret);
        return -1;
    }
    rknn_tensor_attr float_attr = r->out_attr;
    float_attr.type = RKNN_TENSOR_FLOAT32;
    to_float(outputs[0].buf, &float_attr, logits, r->n_classes);
    rknn_outputs_release(r->ctx, 1, outputs);
#endif
    return 0;
}

static int argmax(const float* x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* The golden samples of golden.txt (boards/golden.py writes it) through the NPU: PASS or FAIL. */
static int selftest(const char* model_path, const char* golden_path)
{
    FILE* fp = fopen(golden_path, "r");
    if (!fp) {
        printf("selftest: no %s in this package (built without the package stage's `data` input)\n", golden_path);
        return 2;
    }
    int version = 0, n = 0, classes = 0, height = 0, width = 0;
    double tolerance = 0;
    if (fscanf(fp, "edgepipe-golden %d samples %d classes %d height %d width %d tolerance %lf", &version, &n,
               &classes, &height, &width, &tolerance) != 6 || version != 1 || n < 1 || classes < 1) {
        printf("selftest: FAIL -- %s is not an edgepipe-golden 1 file; copy the package again\n", golden_path);
        fclose(fp);
        return 1;
    }
    runner r;
    if (runner_open(&r, model_path) != 0) {
        printf("selftest: FAIL -- the runtime cannot load %s (see the message above)\n", model_path);
        fclose(fp);
        return 1;
    }
    if (r.width != width || r.height != height || r.n_classes != classes) {
        printf("selftest: FAIL -- model: %s takes %dx%d and gives %d outputs, the golden samples are %dx%d with %d; "
               "it is not the packaged model\n", model_path, r.width, r.height, r.n_classes, width, height, classes);
        runner_close(&r);
        fclose(fp);
        return 1;
    }
    char dir[1024];
    const char* slash = strrchr(golden_path, '/');
    size_t dir_len = slash ? (size_t)(slash - golden_path) : 1;
    if (dir_len >= sizeof(dir)) dir_len = sizeof(dir) - 1;
    memcpy(dir, slash ? golden_path : ".", dir_len);
    dir[dir_len] = '\0';
    float* expected = (float*)malloc(sizeof(float) * (size_t)classes);
    float* got = (float*)malloc(sizeof(float) * (size_t)classes);
    double max_diff = 0;
    int agree = 0, done = 0, status = 0;
    for (int s = 0; s < n && status == 0; s++) {
        char name[256], path[1400];
        int top1 = -1;
        if (fscanf(fp, "%255s %d", name, &top1) != 2) status = 1;
        for (int c = 0; c < classes && status == 0; c++)
            if (fscanf(fp, "%f", &expected[c]) != 1) status = 1;
        if (status) {
            printf("selftest: FAIL -- %s ends after %d of %d samples; copy the package again\n", golden_path, s, n);
            break;
        }
        snprintf(path, sizeof(path), "%s/%s", dir, name);
        unsigned char* rgb = load_rgb(path, width, height);
        if (!rgb || runner_infer(&r, rgb, got) != 0) {
            printf("selftest: FAIL -- sample %s could not be run (see the message above)\n", path);
            free(rgb);
            status = 1;
            break;
        }
        free(rgb);
        for (int c = 0; c < classes; c++) {
            double d = fabs((double)got[c] - (double)expected[c]);
            if (d > max_diff) max_diff = d;
        }
        agree += argmax(got, classes) == top1;
        done++;
    }
    if (status == 0) {
        printf("selftest: %d golden samples, expected outputs from rknn-toolkit2's simulator on the host, "
               "tolerance %g\n", n, tolerance);
        printf("selftest: tensor path (golden/input_NN.rgb -> NPU): max abs diff %g, top-1 %d/%d\n", max_diff, agree,
               done);
        if (max_diff <= tolerance) {
            printf("selftest: PASS -- this board computes what was measured here\n");
        } else {
            printf("selftest: FAIL -- runtime numerics or model: the exact golden input tensors give outputs %g away "
                   "from the simulator's (> %g); preprocessing is not involved. Check that the runtime library "
                   "matches the rknn-toolkit2 version that built model.rknn and that model.rknn's sha256 is the "
                   "one in manifest.json\n", max_diff, tolerance);
            status = 1;
        }
    }
    free(expected);
    free(got);
    fclose(fp);
    runner_close(&r);
    return status;
}

int main(int argc, char** argv)
{
    if (argc > 1 && strcmp(argv[1], "--selftest") == 0)
        return selftest(argc > 2 ? argv[2] : "model.rknn", argc > 3 ? argv[3] : "golden/golden.txt");
    if (argc < 3) {
        fprintf(stderr, "usage: %s model.rknn image.ppm [labels.txt] [top_k]\n"
                        "       %s --selftest [model.rknn] [golden/golden.txt]\n", argv[0], argv[0]);
        return 1;
    }
    const char* labels_path = argc > 3 ? argv[3] : "labels.txt";
    int top_k = argc > 4 ? atoi(argv[4]) : EDGEPIPE_TOP_K;

    static const char* labels[MAX_LABELS];
    unsigned char* label_text = NULL;
    int n_labels = load_labels(labels_path, labels, MAX_LABELS, &label_text);

    runner r;
    if (runner_open(&r, argv[1]) != 0) {
        free(label_text);
        return 1;
    }
    unsigned char* rgb = load_rgb(argv[2], r.width, r.height);
    if (!rgb) {
        free(label_text);
        runner_close(&r);
        return 1;
    }
    float* prob = (float*)malloc(sizeof(float) * (size_t)r.n_classes);
    int ret = runner_infer(&r, rgb, prob);
    if (ret == 0) {
        softmax(prob, r.n_classes);
        print_top_k(prob, r.n_classes, top_k, labels, n_labels);
    }
    free(prob);
    free(rgb);
    free(label_text);
    runner_close(&r);
    return ret == 0 ? 0 : 1;
}
