/* The block VM: a fused region of elementwise steps (runtime/fusion.py) run block by block.
 *
 * `blocks(program, leaves, out, n_temps)`: the region's instructions (five int32s each,
 * as in _scalarvm.h: opcode, result register, operands a, b, c) over registers that are
 * blocks of BLOCK float64s. Registers 0..L-1 are the leaves (C-contiguous arrays of
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

static void block_op(const int32_t *i, double **R, Py_ssize_t m) {
    double *d = R[i[1]];
    const double *x = R[i[2]], *y = R[i[3]], *z = R[i[4]];
    Py_ssize_t j;
    switch (i[0]) {
    case OP_ADD: for (j = 0; j < m; j++) d[j] = x[j] + y[j]; break;
    case OP_SUB: for (j = 0; j < m; j++) d[j] = x[j] - y[j]; break;
    case OP_MUL: for (j = 0; j < m; j++) d[j] = x[j] * y[j]; break;
    case OP_DIV: for (j = 0; j < m; j++) d[j] = x[j] / y[j]; break;
    case OP_NEG: for (j = 0; j < m; j++) d[j] = -x[j]; break;
    case OP_SQRT: for (j = 0; j < m; j++) d[j] = sqrt(x[j]); break;
    case OP_SQUARE: for (j = 0; j < m; j++) d[j] = x[j] * x[j]; break;
    case OP_RECIPROCAL: for (j = 0; j < m; j++) d[j] = 1.0 / x[j]; break;
    case OP_ABS: for (j = 0; j < m; j++) d[j] = fabs(x[j]); break;
    case OP_MUL_OR_ZERO:  /* vm_moz without branches (vectorized) */
        for (j = 0; j < m; j++) {
            double v = x[j] * y[j];
            d[j] = ((v != v) & ((x[j] == 0.0) | (y[j] == 0.0))) ? 0.0 : v;
        }
        break;
    case OP_WHERE:  /* both read first: a select, vectorized */
        for (j = 0; j < m; j++) {
            double t = y[j], f = z[j];
            d[j] = x[j] != 0.0 ? t : f;
        }
        break;
    case OP_LT: for (j = 0; j < m; j++) d[j] = x[j] < y[j]; break;
    case OP_LE: for (j = 0; j < m; j++) d[j] = x[j] <= y[j]; break;
    case OP_GT: for (j = 0; j < m; j++) d[j] = x[j] > y[j]; break;
    case OP_GE: for (j = 0; j < m; j++) d[j] = x[j] >= y[j]; break;
    case OP_EQ: for (j = 0; j < m; j++) d[j] = x[j] == y[j]; break;
    case OP_NE: for (j = 0; j < m; j++) d[j] = x[j] != y[j]; break;
    default: for (j = 0; j < m; j++) d[j] = x[j]; break;  /* copy (not emitted) */
    }
}

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

/* the leaves' buffers (kinds and sizes checked against n); -1 with an exception set */
static int get_leaves(PyObject *seq, Leaf *leaves, Py_ssize_t L, Py_ssize_t n) {
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
        int is_f64 = fmt[0] == 'd' && fmt[1] == 0 && f->view.itemsize == 8;
        Py_ssize_t size = 1;
        for (int d = 0; d < f->view.ndim; d++)
            size *= f->view.shape[d];
        if ((!is_bool && !is_f64) || (size != n && size != 1) || f->view.ndim > 64) {
            for (Py_ssize_t q = 0; q <= k; q++) PyBuffer_Release(&leaves[q].view);
            PyErr_Format(PyExc_ValueError, "leaf %zd: not a float64/bool array of %zd "
                         "elements or one", k, n);
            return -1;
        }
        int kind = size == 1 && n != 1 ? SINGLE
                   : PyBuffer_IsContiguous(&f->view, 'C') ? FULL : STRIDED;
        f->kind = kind + is_bool;
    }
    return 0;
}

static inline double leaf_at(const char *p, int is_bool) {
    if (is_bool)
        return *(const unsigned char *)p != 0;
    double v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* elements [start, start + m) of a strided leaf (any strides: broadcast, sliced,
   reversed), in C order of its shape, into dst: row by row along the last axis */
static void gather(const Py_buffer *v, int is_bool, Py_ssize_t start, Py_ssize_t m,
                   double *dst) {
    Py_ssize_t idx[64], off = 0, rest = start;
    int nd = v->ndim;
    for (int d = nd - 1; d >= 0; d--) {
        idx[d] = rest % v->shape[d];
        rest /= v->shape[d];
        off += idx[d] * v->strides[d];
    }
    const char *base = (const char *)v->buf;
    Py_ssize_t last = v->shape[nd - 1], step = v->strides[nd - 1], j = 0;
    while (j < m) {
        Py_ssize_t run = last - idx[nd - 1];
        if (run > m - j) run = m - j;
        if (step == 0) {
            double x = leaf_at(base + off, is_bool);
            for (Py_ssize_t q = 0; q < run; q++) dst[j + q] = x;
        } else if (step == 8 && !is_bool) {
            memcpy(dst + j, base + off, (size_t)run * sizeof(double));
        } else {
            for (Py_ssize_t q = 0; q < run; q++)
                dst[j + q] = leaf_at(base + off + q * step, is_bool);
        }
        j += run;
        idx[nd - 1] += run;
        off += run * step;
        for (int d = nd - 1; d > 0 && idx[d] == v->shape[d]; d--) {  /* carry */
            off -= idx[d] * v->strides[d];
            idx[d] = 0;
            idx[d - 1]++;
            off += v->strides[d - 1];
        }
    }
}

/* run the program over elements [0, n): every register a block (see the top) */
static void run_blocks(const int32_t *p, Py_ssize_t n_instr, Leaf *leaves, Py_ssize_t L,
                       double **R, double *scratch, double *out, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < L; k++) {  /* single values: a block of copies, once */
        if (leaves[k].kind == SINGLE || leaves[k].kind == SINGLE + 1) {
            double v = leaf_at(leaves[k].view.buf, leaves[k].kind == SINGLE + 1);
            R[k] = scratch + k * BLOCK;
            for (Py_ssize_t j = 0; j < BLOCK; j++) R[k][j] = v;
        }
    }
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;
        for (Py_ssize_t k = 0; k < L; k++) {
            int kind = leaves[k].kind;
            if (kind == FULL) {
                R[k] = (double *)leaves[k].view.buf + start;
            } else if (kind == FULL + 1) {
                const unsigned char *b = (const unsigned char *)leaves[k].view.buf + start;
                R[k] = scratch + k * BLOCK;
                for (Py_ssize_t j = 0; j < m; j++) R[k][j] = b[j] != 0;
            } else if (kind >= STRIDED) {
                R[k] = scratch + k * BLOCK;
                gather(&leaves[k].view, kind == STRIDED + 1, start, m, R[k]);
            }
        }
        for (Py_ssize_t q = 0; q < n_instr; q++) {
            const int32_t *i = p + 5 * q;
            double *keep = R[i[1]];
            if (q == n_instr - 1) R[i[1]] = out + start;  /* the result, in place */
            block_op(i, R, m);
            R[i[1]] = keep;
        }
    }
}

PyObject *vm_blocks(PyObject *self, PyObject *args) {
    Py_buffer prog, outv;
    PyObject *seq;
    Py_ssize_t n_temps;
    if (!PyArg_ParseTuple(args, "y*O!w*n", &prog, &PyTuple_Type, &seq, &outv, &n_temps))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t L = PyTuple_GET_SIZE(seq), n_regs = L + n_temps;
    Py_ssize_t n_instr = prog.len / (Py_ssize_t)(5 * sizeof(int32_t));
    Py_ssize_t n = outv.len / (Py_ssize_t)sizeof(double);
    const int32_t *p = (const int32_t *)prog.buf;
    Leaf *leaves = PyMem_Calloc(L ? L : 1, sizeof(Leaf));
    double **R = PyMem_Calloc(n_regs ? n_regs : 1, sizeof(double *));
    double *scratch = PyMem_Malloc((size_t)(n_regs ? n_regs : 1) * BLOCK * sizeof(double));
    if (!leaves || !R || !scratch) {
        PyErr_NoMemory();
        goto done;
    }
    if (n_instr < 1 || n_temps < 0 || outv.itemsize != 8 || !PyBuffer_IsContiguous(&outv, 'C')) {
        PyErr_SetString(PyExc_ValueError, "blocks: an empty program or a bad output array");
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
    if (get_leaves(seq, leaves, L, n) < 0)
        goto done;
    for (Py_ssize_t k = L; k < n_regs; k++)
        R[k] = scratch + k * BLOCK;
    Py_BEGIN_ALLOW_THREADS
    run_blocks(p, n_instr, leaves, L, R, scratch, (double *)outv.buf, n);
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
