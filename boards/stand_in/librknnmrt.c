/*
 * A stand-in for RV1103/RV1106's librknnmrt, for `edgepipe selftest --emulate`: it runs an RV1103/RV1106
 * package's C demo under qemu-user, where there is no NPU. It computes nothing: it REPLAYS the package's
 * golden outputs. $EDGEPIPE_RKNN_STAND_IN names a table (boards/stand_in/__init__.py writes it from
 * golden/):
 *
 *   edgepipe-stand-in 1 samples N classes C height H width W scale S zp Z\n
 *   then N records of H*W*3 input bytes (RGB, NHWC) followed by C int8 outputs
 *
 * rknn_run looks the input tensor the demo wrote up among the records and answers that record's int8
 * outputs (affine: (q - Z) * S, as an int8 model's native output); an input that is none of them is an
 * error. So the demo's build, its zero-copy I/O (the input's row stride, which this stand-in makes wider
 * than a row, as the NPU may), its dequantisation and its golden.txt comparison are checked on the board's
 * instruction set; the NPU's numbers are checked only on the board. Like librknnmrt, it offers only the
 * zero-copy API.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rknn_api.h"

#define STRIDE_PAD_PX 16 /* extra pixels per input row: a demo that ignores w_stride reads the wrong bytes */

typedef struct {
    int n, classes, height, width, zp;
    float scale;
    unsigned char* records; /* n * (height * width * 3 + classes) bytes */
} table;

static table g_table;
static rknn_tensor_mem* g_io[2];
static int g_n_io = 0;

static size_t input_bytes(void)
{
    return (size_t)g_table.height * (size_t)g_table.width * 3;
}

static int load_table(void)
{
    const char* path = getenv("EDGEPIPE_RKNN_STAND_IN");
    if (!path) {
        fprintf(stderr, "stand-in librknnmrt: $EDGEPIPE_RKNN_STAND_IN is not set (edgepipe selftest sets it)\n");
        return -1;
    }
    FILE* fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "stand-in librknnmrt: cannot open %s\n", path);
        return -1;
    }
    table t;
    memset(&t, 0, sizeof(t));
    if (fscanf(fp, "edgepipe-stand-in 1 samples %d classes %d height %d width %d scale %f zp %d", &t.n, &t.classes,
               &t.height, &t.width, &t.scale, &t.zp) != 6 || fgetc(fp) != '\n' || t.n < 1 || t.classes < 1
        || t.height < 1 || t.width < 1) {
        fprintf(stderr, "stand-in librknnmrt: %s is not an edgepipe-stand-in 1 table\n", path);
        fclose(fp);
        return -1;
    }
    g_table = t;
    size_t size = (size_t)t.n * (input_bytes() + (size_t)t.classes);
    g_table.records = (unsigned char*)malloc(size);
    if (!g_table.records || fread(g_table.records, 1, size, fp) != size) {
        fprintf(stderr, "stand-in librknnmrt: %s ends early\n", path);
        free(g_table.records);
        g_table.records = NULL;
        fclose(fp);
        return -1;
    }
    fclose(fp);
    return 0;
}

int rknn_init(rknn_context* context, void* model, uint32_t size, uint32_t flag, rknn_init_extend* extend)
{
    (void)model; (void)flag; (void)extend;
    if (size == 0 || load_table() != 0) return RKNN_ERR_MODEL_INVALID;
    *context = 1;
    return RKNN_SUCC;
}

int rknn_destroy(rknn_context context)
{
    (void)context;
    free(g_table.records);
    memset(&g_table, 0, sizeof(g_table));
    return RKNN_SUCC;
}

int rknn_query(rknn_context context, rknn_query_cmd cmd, void* info, uint32_t size)
{
    (void)context;
    if (cmd == RKNN_QUERY_IN_OUT_NUM) {
        rknn_input_output_num* n = (rknn_input_output_num*)info;
        n->n_input = 1;
        n->n_output = 1;
        return RKNN_SUCC;
    }
    if (size != sizeof(rknn_tensor_attr)) return RKNN_ERR_PARAM_INVALID;
    rknn_tensor_attr* a = (rknn_tensor_attr*)info;
    uint32_t h = (uint32_t)g_table.height, w = (uint32_t)g_table.width, stride = w + STRIDE_PAD_PX;
    if (cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_NATIVE_INPUT_ATTR) {
        a->n_dims = 4;
        a->dims[0] = 1; a->dims[1] = h; a->dims[2] = w; a->dims[3] = 3;
        a->fmt = RKNN_TENSOR_NHWC;
        a->type = RKNN_TENSOR_INT8;
        a->n_elems = h * w * 3;
        a->size = a->n_elems;
        a->w_stride = stride;
        a->size_with_stride = h * stride * 3;
        strcpy(a->name, "input0");
        return RKNN_SUCC;
    }
    if (cmd == RKNN_QUERY_OUTPUT_ATTR || cmd == RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR) {
        a->n_dims = 2;
        a->dims[0] = 1; a->dims[1] = (uint32_t)g_table.classes;
        a->fmt = RKNN_TENSOR_UNDEFINED;
        a->type = RKNN_TENSOR_INT8;
        a->qnt_type = RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC;
        a->zp = g_table.zp;
        a->scale = g_table.scale;
        a->n_elems = (uint32_t)g_table.classes;
        a->size = a->n_elems;
        a->size_with_stride = a->n_elems;
        strcpy(a->name, "output0");
        return RKNN_SUCC;
    }
    return RKNN_ERR_PARAM_INVALID;
}

int rknn_run(rknn_context context, rknn_run_extend* extend)
{
    (void)context; (void)extend;
    if (g_n_io != 2) {
        fprintf(stderr, "stand-in librknnmrt: rknn_run before rknn_set_io_mem of the input and the output\n");
        return RKNN_ERR_INPUT_INVALID;
    }
    size_t row = (size_t)g_table.width * 3, stride = (size_t)(g_table.width + STRIDE_PAD_PX) * 3;
    unsigned char* x = (unsigned char*)malloc(input_bytes());
    if (!x) return RKNN_ERR_MALLOC_FAIL;
    for (int y = 0; y < g_table.height; y++)
        memcpy(x + (size_t)y * row, (const unsigned char*)g_io[0]->virt_addr + (size_t)y * stride, row);
    const unsigned char* record = NULL;
    for (int i = 0; i < g_table.n && !record; i++) {
        const unsigned char* r = g_table.records + (size_t)i * (input_bytes() + (size_t)g_table.classes);
        if (memcmp(r, x, input_bytes()) == 0) record = r;
    }
    free(x);
    if (!record) {
        fprintf(stderr, "stand-in librknnmrt: the input tensor is none of the package's golden inputs\n");
        return RKNN_ERR_INPUT_INVALID;
    }
    memcpy(g_io[1]->virt_addr, record + input_bytes(), (size_t)g_table.classes);
    return RKNN_SUCC;
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[])
{
    (void)context; (void)n_inputs; (void)inputs;
    fprintf(stderr, "stand-in librknnmrt: only the zero-copy API (rknn_create_mem, rknn_set_io_mem), as librknnmrt\n");
    return RKNN_ERR_FAIL;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend* extend)
{
    (void)context; (void)n_outputs; (void)outputs; (void)extend;
    return RKNN_ERR_FAIL;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[])
{
    (void)context; (void)n_outputs; (void)outputs;
    return RKNN_ERR_FAIL;
}

rknn_tensor_mem* rknn_create_mem(rknn_context ctx, uint32_t size)
{
    (void)ctx;
    rknn_tensor_mem* m = (rknn_tensor_mem*)calloc(1, sizeof(rknn_tensor_mem));
    if (!m) return NULL;
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
    if (g_n_io == 0 && (attr->type != RKNN_TENSOR_UINT8 || attr->fmt != RKNN_TENSOR_NHWC)) {
        fprintf(stderr, "stand-in librknnmrt: the input must be uint8 NHWC (the model normalises)\n");
        return RKNN_ERR_INPUT_INVALID;
    }
    if (g_n_io >= 2) return RKNN_ERR_PARAM_INVALID;
    uint32_t need = g_n_io == 0 ? (uint32_t)(g_table.height * (g_table.width + STRIDE_PAD_PX) * 3)
                                : (uint32_t)g_table.classes;
    if (mem->size < need) return RKNN_ERR_PARAM_INVALID;
    g_io[g_n_io++] = mem;
    return RKNN_SUCC;
}
