"""tests/board_tests/rknn_api/rknn_api.h -- the RKNN runtime declarations the generated C demo is compiled against
in the tests -- checked declaration by declaration against Rockchip's published header.

Reference: rknpu2 `rknn_api.h` of NPU SDK V2.3.2, `rknpu2/runtime/Linux/librknn_api/include/rknn_api.h`
in github.com/airockchip/rknn-toolkit2 (commit 42aa1d4, "Update ... NPU SDK to V2.3.2"; the same file
serves RV1103/RV1106 and RK35xx). The expected values below were transcribed from it by hand; the
header itself is not in this repository. Our header may declare a subset (only what the demo uses),
but every enum it declares lists all of Rockchip's enumerators with their values (so `*_MAX` agree),
every struct it defines has Rockchip's fields in Rockchip's order with Rockchip's types, and every
#define and function prototype it has matches."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HEADER = Path(__file__).resolve().parent / "rknn_api" / "rknn_api.h"
SDK_VERSION = "2.3.2"

# -- Rockchip rknn_api.h V2.3.2 ----------------------------------------------------------------------------
DEFINES = {
    "RKNN_SUCC": 0, "RKNN_ERR_FAIL": -1, "RKNN_ERR_TIMEOUT": -2, "RKNN_ERR_DEVICE_UNAVAILABLE": -3,
    "RKNN_ERR_MALLOC_FAIL": -4, "RKNN_ERR_PARAM_INVALID": -5, "RKNN_ERR_MODEL_INVALID": -6,
    "RKNN_ERR_CTX_INVALID": -7, "RKNN_ERR_INPUT_INVALID": -8, "RKNN_ERR_OUTPUT_INVALID": -9,
    "RKNN_ERR_DEVICE_UNMATCH": -10, "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL": -11,
    "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION": -12, "RKNN_ERR_TARGET_PLATFORM_UNMATCH": -13,
    "RKNN_MAX_DIMS": 16, "RKNN_MAX_NUM_CHANNEL": 15, "RKNN_MAX_NAME_LEN": 256, "RKNN_MAX_DYNAMIC_SHAPE_NUM": 512,
    "RKNN_FLAG_PRIOR_HIGH": 0x0, "RKNN_FLAG_PRIOR_MEDIUM": 0x1, "RKNN_FLAG_PRIOR_LOW": 0x2,
    "RKNN_FLAG_ASYNC_MASK": 0x4, "RKNN_FLAG_COLLECT_PERF_MASK": 0x8, "RKNN_FLAG_MEM_ALLOC_OUTSIDE": 0x10,
}

ENUMS = {
    "rknn_query_cmd": [
        ("RKNN_QUERY_IN_OUT_NUM", 0), ("RKNN_QUERY_INPUT_ATTR", 1), ("RKNN_QUERY_OUTPUT_ATTR", 2),
        ("RKNN_QUERY_PERF_DETAIL", 3), ("RKNN_QUERY_PERF_RUN", 4), ("RKNN_QUERY_SDK_VERSION", 5),
        ("RKNN_QUERY_MEM_SIZE", 6), ("RKNN_QUERY_CUSTOM_STRING", 7), ("RKNN_QUERY_NATIVE_INPUT_ATTR", 8),
        ("RKNN_QUERY_NATIVE_OUTPUT_ATTR", 9), ("RKNN_QUERY_NATIVE_NC1HWC2_INPUT_ATTR", 8),
        ("RKNN_QUERY_NATIVE_NC1HWC2_OUTPUT_ATTR", 9), ("RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR", 10),
        ("RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR", 11), ("RKNN_QUERY_DEVICE_MEM_INFO", 12),
        ("RKNN_QUERY_INPUT_DYNAMIC_RANGE", 13), ("RKNN_QUERY_CURRENT_INPUT_ATTR", 14),
        ("RKNN_QUERY_CURRENT_OUTPUT_ATTR", 15), ("RKNN_QUERY_CURRENT_NATIVE_INPUT_ATTR", 16),
        ("RKNN_QUERY_CURRENT_NATIVE_OUTPUT_ATTR", 17), ("RKNN_QUERY_CMD_MAX", 18),
    ],
    "rknn_tensor_type": [
        ("RKNN_TENSOR_FLOAT32", 0), ("RKNN_TENSOR_FLOAT16", 1), ("RKNN_TENSOR_INT8", 2), ("RKNN_TENSOR_UINT8", 3),
        ("RKNN_TENSOR_INT16", 4), ("RKNN_TENSOR_UINT16", 5), ("RKNN_TENSOR_INT32", 6), ("RKNN_TENSOR_UINT32", 7),
        ("RKNN_TENSOR_INT64", 8), ("RKNN_TENSOR_BOOL", 9), ("RKNN_TENSOR_INT4", 10), ("RKNN_TENSOR_BFLOAT16", 11),
        ("RKNN_TENSOR_TYPE_MAX", 12),
    ],
    "rknn_tensor_qnt_type": [
        ("RKNN_TENSOR_QNT_NONE", 0), ("RKNN_TENSOR_QNT_DFP", 1), ("RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC", 2),
        ("RKNN_TENSOR_QNT_MAX", 3),
    ],
    "rknn_tensor_format": [
        ("RKNN_TENSOR_NCHW", 0), ("RKNN_TENSOR_NHWC", 1), ("RKNN_TENSOR_NC1HWC2", 2), ("RKNN_TENSOR_UNDEFINED", 3),
        ("RKNN_TENSOR_FORMAT_MAX", 4),
    ],
    "rknn_core_mask": [
        ("RKNN_NPU_CORE_AUTO", 0), ("RKNN_NPU_CORE_0", 1), ("RKNN_NPU_CORE_1", 2), ("RKNN_NPU_CORE_2", 4),
        ("RKNN_NPU_CORE_0_1", 3), ("RKNN_NPU_CORE_0_1_2", 7), ("RKNN_NPU_CORE_ALL", 0xFFFF),
        ("RKNN_NPU_CORE_UNDEFINED", 0x10000),
    ],
}

STRUCTS = {
    "rknn_input_output_num": [("uint32_t", "n_input"), ("uint32_t", "n_output")],
    "rknn_tensor_attr": [
        ("uint32_t", "index"), ("uint32_t", "n_dims"), ("uint32_t", "dims[RKNN_MAX_DIMS]"),
        ("char", "name[RKNN_MAX_NAME_LEN]"), ("uint32_t", "n_elems"), ("uint32_t", "size"),
        ("rknn_tensor_format", "fmt"), ("rknn_tensor_type", "type"), ("rknn_tensor_qnt_type", "qnt_type"),
        ("int8_t", "fl"), ("int32_t", "zp"), ("float", "scale"), ("uint32_t", "w_stride"),
        ("uint32_t", "size_with_stride"), ("uint8_t", "pass_through"), ("uint32_t", "h_stride"),
    ],
    "rknn_sdk_version": [("char", "api_version[256]"), ("char", "drv_version[256]")],
    "rknn_tensor_mem": [
        ("void*", "virt_addr"), ("uint64_t", "phys_addr"), ("int32_t", "fd"), ("int32_t", "offset"),
        ("uint32_t", "size"), ("uint32_t", "flags"), ("void*", "priv_data"),
    ],
    "rknn_input": [
        ("uint32_t", "index"), ("void*", "buf"), ("uint32_t", "size"), ("uint8_t", "pass_through"),
        ("rknn_tensor_type", "type"), ("rknn_tensor_format", "fmt"),
    ],
    "rknn_output": [
        ("uint8_t", "want_float"), ("uint8_t", "is_prealloc"), ("uint32_t", "index"), ("void*", "buf"),
        ("uint32_t", "size"),
    ],
    "rknn_init_extend": [
        ("rknn_context", "ctx"), ("int32_t", "real_model_offset"), ("uint32_t", "real_model_size"),
        ("int32_t", "model_buffer_fd"), ("uint32_t", "model_buffer_flags"), ("uint8_t", "reserved[112]"),
    ],
    "rknn_run_extend": [
        ("uint64_t", "frame_id"), ("int32_t", "non_block"), ("int32_t", "timeout_ms"), ("int32_t", "fence_fd"),
    ],
    "rknn_output_extend": [("uint64_t", "frame_id")],
}

# name -> (return type, parameter types)
FUNCTIONS = {
    "rknn_init": ("int", ["rknn_context*", "void*", "uint32_t", "uint32_t", "rknn_init_extend*"]),
    "rknn_destroy": ("int", ["rknn_context"]),
    "rknn_query": ("int", ["rknn_context", "rknn_query_cmd", "void*", "uint32_t"]),
    "rknn_inputs_set": ("int", ["rknn_context", "uint32_t", "rknn_input[]"]),
    "rknn_run": ("int", ["rknn_context", "rknn_run_extend*"]),
    "rknn_outputs_get": ("int", ["rknn_context", "uint32_t", "rknn_output[]", "rknn_output_extend*"]),
    "rknn_outputs_release": ("int", ["rknn_context", "uint32_t", "rknn_output[]"]),
    "rknn_create_mem": ("rknn_tensor_mem*", ["rknn_context", "uint32_t"]),
    "rknn_destroy_mem": ("int", ["rknn_context", "rknn_tensor_mem*"]),
    "rknn_set_io_mem": ("int", ["rknn_context", "rknn_tensor_mem*", "rknn_tensor_attr*"]),
    "rknn_set_core_mask": ("int", ["rknn_context", "rknn_core_mask"]),
}
# rknn_context: uint32_t on 32-bit ARM (RV1103/RV1106), uint64_t elsewhere
CONTEXT_TYPEDEF = {"__arm__": "uint32_t", "else": "uint64_t"}


# -- a parser for the plain C of these headers -----------------------------------------------------------------
def _code(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _norm_type(t: str) -> str:
    return re.sub(r"\s*\*", "*", " ".join(t.split()))


def _eval(expr: str, known: dict[str, int]) -> int:
    """An enumerator's value: integer literals, earlier enumerators, | and << only."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return known[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.LShift)):
            a, b = ev(node.left), ev(node.right)
            return a | b if isinstance(node.op, ast.BitOr) else a << b
        raise ValueError(f"unsupported enumerator expression {expr!r}")
    return ev(ast.parse(expr.strip(), mode="eval").body)


def parse_enums(code: str) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for body, name in re.findall(r"typedef\s+enum\s+\w+\s*\{(.*?)\}\s*(\w+)\s*;", code, re.S):
        values, known, nxt = [], {}, 0
        for item in filter(None, (i.strip() for i in body.split(","))):
            enumerator, _, expr = (s.strip() for s in item.partition("="))
            value = _eval(expr, known) if expr else nxt
            known[enumerator], nxt = value, value + 1
            values.append((enumerator, value))
        out[name] = values
    return out


def parse_structs(code: str) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for body, name in re.findall(r"typedef\s+struct\s+\w+\s*\{(.*?)\}\s*(\w+)\s*;", code, re.S):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.fullmatch(r"(.+?[\s\*])(\w+\s*(?:\[[^\]]*\])*)", " ".join(decl.split()))
            fields.append((_norm_type(m.group(1)), m.group(2).replace(" ", "")))
        out[name] = fields
    return out


def parse_defines(code: str) -> dict[str, int]:
    return {k: int(v, 0)
            for k, v in re.findall(r"^\s*#define\s+(RKNN_\w+)\s+(-?(?:0x[0-9a-fA-F]+|\d+))\s*$", code, re.M)}


def parse_functions(code: str) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for ret, name, params in re.findall(r"^\s*([A-Za-z_][\w\s\*]*?)\s*\b(rknn_\w+)\s*\(([^)]*)\)\s*;", code, re.M):
        types = []
        for p in (p.strip() for p in params.split(",")):
            m = re.fullmatch(r"(.+?[\s\*])\w+\s*(\[\])?", " ".join(p.split()))
            types.append(_norm_type(m.group(1)) + (m.group(2) or ""))
        out[name] = (_norm_type(ret), types)
    return out


# -- the checks ------------------------------------------------------------------------------------------------
CODE = _code(HEADER.read_text())


def test_header_names_the_sdk_version_it_matches():
    assert f"V{SDK_VERSION}" in HEADER.read_text()


def test_enums_have_every_enumerator_with_rockchips_values():
    ours = parse_enums(CODE)
    assert {"rknn_query_cmd", "rknn_tensor_type", "rknn_tensor_qnt_type", "rknn_tensor_format"} <= set(ours)
    for name, values in ours.items():
        assert name in ENUMS, f"{name} is not in rknn_api.h V{SDK_VERSION}"
        assert values == ENUMS[name], name


def test_structs_have_rockchips_fields_in_order():
    ours = parse_structs(CODE)
    assert {"rknn_input_output_num", "rknn_tensor_attr", "rknn_tensor_mem", "rknn_input", "rknn_output"} <= set(ours)
    for name, fields in ours.items():
        assert name in STRUCTS, f"{name} is not in rknn_api.h V{SDK_VERSION}"
        assert fields == STRUCTS[name], name


def test_defines_have_rockchips_values():
    ours = parse_defines(CODE)
    assert {"RKNN_SUCC", "RKNN_MAX_DIMS", "RKNN_MAX_NAME_LEN"} <= set(ours)
    assert {k: v for k, v in ours.items()} == {k: DEFINES[k] for k in ours if k in DEFINES}, \
        sorted(set(ours) - set(DEFINES))


def test_function_prototypes_match():
    ours = parse_functions(CODE)
    used = {"rknn_init", "rknn_destroy", "rknn_query", "rknn_inputs_set", "rknn_run", "rknn_outputs_get",
            "rknn_outputs_release", "rknn_create_mem", "rknn_destroy_mem", "rknn_set_io_mem"}
    assert used <= set(ours)
    for name, signature in ours.items():
        assert signature == FUNCTIONS.get(name), name


def test_context_is_32_bit_on_arm_and_64_bit_elsewhere():
    m = re.search(r"#ifdef __arm__\s*typedef (\w+) rknn_context;\s*#else\s*typedef (\w+) rknn_context;\s*#endif", CODE)
    assert m and {"__arm__": m.group(1), "else": m.group(2)} == CONTEXT_TYPEDEF


def test_the_parser_reads_what_it_checks():
    """The checks above are only as good as the parser: it must see each declaration kind in a sample
    written like Rockchip's (comments after members, `void *` spacing, expressions in enums)."""
    sample = _code("""
        #define RKNN_ERR_FAIL                           -1      /* execute failed. */
        typedef enum _rknn_core_mask {
            RKNN_NPU_CORE_AUTO = 0,                                       /* default. */
            RKNN_NPU_CORE_0 = 1, RKNN_NPU_CORE_1 = 2, RKNN_NPU_CORE_2 = 4,
            RKNN_NPU_CORE_0_1 = RKNN_NPU_CORE_0 | RKNN_NPU_CORE_1,
            RKNN_NPU_CORE_0_1_2 = RKNN_NPU_CORE_0_1 | RKNN_NPU_CORE_2,
            RKNN_NPU_CORE_ALL = 0xffff,
            RKNN_NPU_CORE_UNDEFINED,
        } rknn_core_mask;
        typedef struct _rknn_tensor_memory {
            void*            virt_addr;                         /* the virtual address of tensor buffer. */
            uint64_t         phys_addr;
            int32_t          fd;
            int32_t          offset;
            uint32_t         size;
            uint32_t         flags;
            void *           priv_data;
        } rknn_tensor_mem;
        int rknn_outputs_release(rknn_context context, uint32_t n_ouputs, rknn_output outputs[]);
        rknn_tensor_mem* rknn_create_mem(rknn_context ctx, uint32_t size);
    """)
    assert parse_defines(sample) == {"RKNN_ERR_FAIL": -1}
    assert parse_enums(sample) == {"rknn_core_mask": ENUMS["rknn_core_mask"]}
    assert parse_structs(sample) == {"rknn_tensor_mem": STRUCTS["rknn_tensor_mem"]}
    assert parse_functions(sample) == {k: FUNCTIONS[k] for k in ("rknn_outputs_release", "rknn_create_mem")}
