/* The block VM: a fused region of elementwise steps (runtime/fusion.py) run block by block.
 *
 * `blocks(program, leaves, out, n_temps)`: the region's instructions (five int32s each,
 * as in _scalarvm.h: opcode, result register, operands a, b, c) over registers that are
 * blocks of BLOCK elements of out's type (float64 or float32: _vmblocks_typed.h, once
 * per type). Registers 0..L-1 are the leaves (C-contiguous arrays of
 * out's size, read in place; arrays of one element, repeated; arrays of out's size
 * with any strides, such as broadcast views, and bool arrays: gathered per block),
 * L..L+n_temps-1 scratch blocks; the last instruction writes into `out` itself. So a chain of k ops
 * streams its leaves and its result through memory once instead of k full temporaries,
 * and each op is a tight loop over a block in the cache.
 *
 * Only the ops whose C form is the numpy kernel's IEEE result are given opcodes here
 * (fusion.py keeps that list): + - * /, negation, square (x*x), reciprocal (1/x), abs,
 * sqrt, comparisons, where and mul_or_zero (0 where a factor is 0 and the product is
 * NaN, per element). Compiled without FMA contraction (setup.py), so every number is the
 * one the unfused plan gives.
 */
#include "_scalarvm.h"
#include <string.h>

#define BLOCK 512

enum { FULL = 0, SINGLE = 2, STRIDED = 4 };  /* + 1 for bool */

typedef struct {
    Py_buffer view;
    int kind;  /* FULL/SINGLE/STRIDED, + 1 when the array is bool */
} Leaf;

static int supported(int32_t op) {
    switch (op) {
    case OP_ADD: case OP_SUB: case OP_MUL: case OP_DIV: case OP_NEG: case OP_SQRT:
    case OP_SQUARE: case OP_RECIPROCAL: case OP_ABS: case OP_MUL_OR_ZERO: case OP_WHERE:
    case OP_LT: case OP_LE: case OP_GT: case OP_GE: case OP_EQ: case OP_NE:
        return 1;
    default:
        return 0;
    }
}

/* the leaves' buffers (types, kinds and sizes checked against out's); -1 with an
   exception set */
static int get_leaves(PyObject *seq, Leaf *leaves, Py_ssize_t L, Py_ssize_t n, int f32) {
    for (Py_ssize_t k = 0; k < L; k++) {
        Leaf *f = &leaves[k];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(seq, k), &f->view,
                               PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
            for (Py_ssize_t q = 0; q < k; q++) PyBuffer_Release(&leaves[q].view);
            return -1;
        }
        const char *fmt = f->view.format ? f->view.format : "B";
        if (*fmt == '@' || *fmt == '=' || (*fmt == '<' && PY_LITTLE_ENDIAN))
            fmt++;  /* native byte order, said explicitly ('<f8' arrays) */
        int is_bool = fmt[0] == '?' && fmt[1] == 0 && f->view.itemsize == 1;
        int is_float = f32 ? fmt[0] == 'f' && fmt[1] == 0 && f->view.itemsize == 4
                           : fmt[0] == 'd' && fmt[1] == 0 && f->view.itemsize == 8;
        Py_ssize_t size = 1;
        for (int d = 0; d < f->view.ndim; d++)
            size *= f->view.shape[d];
        if ((!is_bool && !is_float) || (size != n && size != 1) || f->view.ndim > 64) {
            for (Py_ssize_t q = 0; q <= k; q++) PyBuffer_Release(&leaves[q].view);
            PyErr_Format(PyExc_ValueError, "leaf %zd: not a %s or bool array of %zd "
                         "elements or one", k, f32 ? "float32" : "float64", n);
            return -1;
        }
        int kind = size == 1 && n != 1 ? SINGLE
                   : PyBuffer_IsContiguous(&f->view, 'C') ? FULL : STRIDED;
        f->kind = kind + is_bool;
    }
    return 0;
}

#define T double
#define NAME(f) f##_f64
#define SQRT sqrt
#define FABS fabs
#include "_vmblocks_typed.h"
#undef T
#undef NAME
#undef SQRT
#undef FABS
#define T float
#define NAME(f) f##_f32
#define SQRT sqrtf
#define FABS fabsf
#include "_vmblocks_typed.h"
#undef T
#undef NAME
#undef SQRT
#undef FABS

PyObject *vm_blocks(PyObject *self, PyObject *args) {
    Py_buffer prog, outv;
    PyObject *seq, *out;
    Py_ssize_t n_temps;
    if (!PyArg_ParseTuple(args, "y*O!On", &prog, &PyTuple_Type, &seq, &out, &n_temps))
        return NULL;
    if (PyObject_GetBuffer(out, &outv, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&prog);
        return NULL;
    }
    const char *fmt = outv.format ? outv.format : "B";
    if (*fmt == '@' || *fmt == '=' || (*fmt == '<' && PY_LITTLE_ENDIAN))
        fmt++;
    int f32 = fmt[0] == 'f' && fmt[1] == 0 && outv.itemsize == 4;
    int f64 = fmt[0] == 'd' && fmt[1] == 0 && outv.itemsize == 8;
    PyObject *result = NULL;
    Py_ssize_t L = PyTuple_GET_SIZE(seq), n_regs = L + n_temps;
    Py_ssize_t n_instr = prog.len / (Py_ssize_t)(5 * sizeof(int32_t));
    Py_ssize_t n = outv.len / (outv.itemsize ? outv.itemsize : 1);
    const int32_t *p = (const int32_t *)prog.buf;
    Leaf *leaves = PyMem_Calloc(L ? L : 1, sizeof(Leaf));
    void **R = PyMem_Calloc(n_regs ? n_regs : 1, sizeof(void *));
    double *scratch = PyMem_Malloc((size_t)(n_regs ? n_regs : 1) * BLOCK * sizeof(double));
    if (!leaves || !R || !scratch) {
        PyErr_NoMemory();
        goto done;
    }
    if (n_instr < 1 || n_temps < 0 || (!f32 && !f64)) {
        PyErr_SetString(PyExc_ValueError, "blocks: an empty program or an output array "
                        "that is not float64 or float32");
        goto done;
    }
    for (Py_ssize_t q = 0; q < n_instr; q++) {  /* built by fusion.py; checked anyway */
        const int32_t *i = p + 5 * q;
        if (!supported(i[0]) || i[1] < L || i[1] >= n_regs || i[2] < 0 || i[2] >= n_regs
            || i[3] < 0 || i[3] >= n_regs || i[4] < 0 || i[4] >= n_regs) {
            PyErr_Format(PyExc_ValueError, "blocks: instruction %zd is not valid", q);
            goto done;
        }
    }
    const int32_t *last = p + 5 * (n_instr - 1);  /* writes into out: reads no alias of it */
    if (last[2] == last[1] || last[3] == last[1] || last[4] == last[1]) {
        PyErr_SetString(PyExc_ValueError, "blocks: the last instruction reads its result");
        goto done;
    }
    if (get_leaves(seq, leaves, L, n, f32) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    if (f32) {
        for (Py_ssize_t k = L; k < n_regs; k++)
            R[k] = (float *)scratch + k * BLOCK;
        run_blocks_f32(p, n_instr, leaves, L, (float **)R, (float *)scratch,
                       (float *)outv.buf, n);
    } else {
        for (Py_ssize_t k = L; k < n_regs; k++)
            R[k] = scratch + k * BLOCK;
        run_blocks_f64(p, n_instr, leaves, L, (double **)R, scratch, (double *)outv.buf, n);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < L; k++)
        PyBuffer_Release(&leaves[k].view);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_Free(leaves);
    PyMem_Free(R);
    PyMem_Free(scratch);
    PyBuffer_Release(&prog);
    PyBuffer_Release(&outv);
    return result;
}
