/* Shared by the scalar VM's C files: the opcodes, their operand counts, and the scalar
 * functions whose IEEE behaviour follows the op table's numpy kernels.
 *
 * An instruction is five int32s: opcode, result register, operand registers a, b, c
 * (unused operands repeat the result register).
 */
#ifndef ADSVC_SCALARVM_H
#define ADSVC_SCALARVM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

enum {
    OP_COPY = 0, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_NEG, OP_EXP, OP_LOG, OP_SIN, OP_COS,
    OP_TAN, OP_TANH, OP_SQRT, OP_SQUARE, OP_RECIPROCAL, OP_ABS, OP_SIGN, OP_SIGMOID,
    OP_SOFTPLUS, OP_LOG1P, OP_EXPM1, OP_POW, OP_MAXIMUM, OP_MINIMUM, OP_MUL_OR_ZERO,
    OP_WHERE, OP_LT, OP_LE, OP_GT, OP_GE, OP_EQ, OP_NE, OP_STOP, OP_COUNT
};

/* how many operands each opcode reads */
static const unsigned char ARITY[OP_COUNT] = {
    1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3,
    2, 2, 2, 2, 2, 2, 1,
};

/* which operands carry a derivative (bit j: operand j): none for sign, the comparisons
   and stop_gradient; not the condition of where */
static const unsigned char DIFFERENTIABLE[OP_COUNT] = {
    1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 3, 3, 3, 3, 6,
    0, 0, 0, 0, 0, 0, 0,
};

static inline double vm_sign(double x) {
    if (x != x) return x;
    return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0);
}

static inline double vm_softplus(double x) {
    /* numpy's logaddexp(0, x) */
    if (x != x) return x;
    if (x == INFINITY) return x;
    double m = x > 0.0 ? x : 0.0;
    return m + log1p(exp(-fabs(x)));
}

static inline double vm_sigmoid(double x) { return 0.5 * (1.0 + tanh(0.5 * x)); }

static inline double vm_pow(double a, double b) {
    return b == 0.5 ? sqrt(a) : pow(a, b);  /* numpy: x ** 0.5 is sqrt */
}

static inline double vm_maximum(double a, double b) {
    if (a != a) return a;
    if (b != b) return b;
    return a >= b ? a : b;
}

static inline double vm_minimum(double a, double b) {
    if (a != a) return a;
    if (b != b) return b;
    return a <= b ? a : b;
}

/* a * b, but 0 * inf (or nan) is 0: the chain rule's zero (op mul_or_zero) */
static inline double vm_moz(double a, double b) {
    double v = a * b;
    if (v != v && (a == 0.0 || b == 0.0)) v = 0.0;
    return v;
}

/* _vmsweeps.c */
PyObject *vm_activity(PyObject *self, PyObject *args);
PyObject *vm_reverse(PyObject *self, PyObject *args);
PyObject *vm_tangent(PyObject *self, PyObject *args);
PyObject *vm_whole(PyObject *self, PyObject *args);
PyObject *vm_small_call(PyObject *self, PyObject *args);
/* _vmblocks.c */
PyObject *vm_blocks(PyObject *self, PyObject *args);
/* _scalarvm.c */
void vm_execute(const int32_t *p, double *r, Py_ssize_t start, Py_ssize_t stop);
/* _vmflatten.c */
PyObject *vm_flatten(PyObject *self, PyObject *args);

#endif
