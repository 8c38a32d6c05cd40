/* The scalar virtual machine: runs a plan's scalar float64 steps as a register program.
 *
 * A program is an int32 array of instructions, five entries each:
 *     opcode, result register, operand registers a, b, c
 * over one float64 register per node (bools are 0.0 / 1.0). `run(program, registers,
 * start, stop, max_reg)` executes instructions start..stop-1 in place. It is compiled once, at
 * install time, for every graph (never per graph); adsvc/runtime/scalar_vm.py builds the
 * programs and keeps the opcodes below in step with the op table's kernels (the same
 * IEEE results, NaN rules included). Built as an optional extension: without it, plans
 * run on the numpy interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

enum {
    OP_COPY = 0, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_NEG, OP_EXP, OP_LOG, OP_SIN, OP_COS,
    OP_TAN, OP_TANH, OP_SQRT, OP_SQUARE, OP_RECIPROCAL, OP_ABS, OP_SIGN, OP_SIGMOID,
    OP_SOFTPLUS, OP_LOG1P, OP_EXPM1, OP_POW, OP_MAXIMUM, OP_MINIMUM, OP_MUL_OR_ZERO,
    OP_WHERE, OP_LT, OP_LE, OP_GT, OP_GE, OP_EQ, OP_NE, OP_COUNT
};

static inline double softplus(double x) {
    /* numpy's logaddexp(0, x) */
    if (x != x) return x;
    if (x == INFINITY) return x;
    double m = x > 0.0 ? x : 0.0;
    return m + log1p(exp(-fabs(x)));
}

static inline double maximum(double a, double b) {
    if (a != a) return a;
    if (b != b) return b;
    return a >= b ? a : b;
}

static inline double minimum(double a, double b) {
    if (a != a) return a;
    if (b != b) return b;
    return a <= b ? a : b;
}

static inline double sign(double x) {
    if (x != x) return x;
    return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0);
}

static void execute(const int32_t *p, double *r, Py_ssize_t start, Py_ssize_t stop) {
    for (Py_ssize_t k = start; k < stop; k++) {
        const int32_t *i = p + 5 * k;
        double a = r[i[2]], b = r[i[3]], v;
        switch (i[0]) {
        case OP_COPY: v = a; break;
        case OP_ADD: v = a + b; break;
        case OP_SUB: v = a - b; break;
        case OP_MUL: v = a * b; break;
        case OP_DIV: v = a / b; break;
        case OP_NEG: v = -a; break;
        case OP_EXP: v = exp(a); break;
        case OP_LOG: v = log(a); break;
        case OP_SIN: v = sin(a); break;
        case OP_COS: v = cos(a); break;
        case OP_TAN: v = tan(a); break;
        case OP_TANH: v = tanh(a); break;
        case OP_SQRT: v = sqrt(a); break;
        case OP_SQUARE: v = a * a; break;
        case OP_RECIPROCAL: v = 1.0 / a; break;
        case OP_ABS: v = fabs(a); break;
        case OP_SIGN: v = sign(a); break;
        case OP_SIGMOID: v = 0.5 * (1.0 + tanh(0.5 * a)); break;
        case OP_SOFTPLUS: v = softplus(a); break;
        case OP_LOG1P: v = log1p(a); break;
        case OP_EXPM1: v = expm1(a); break;
        case OP_POW: v = b == 0.5 ? sqrt(a) : pow(a, b); break;  /* numpy: x ** 0.5 is sqrt */
        case OP_MAXIMUM: v = maximum(a, b); break;
        case OP_MINIMUM: v = minimum(a, b); break;
        case OP_MUL_OR_ZERO:  /* a * b, but 0 * inf (or nan) is 0: the chain rule's zero */
            v = a * b;
            if (v != v && (a == 0.0 || b == 0.0)) v = 0.0;
            break;
        case OP_WHERE: v = a != 0.0 ? b : r[i[4]]; break;
        case OP_LT: v = a < b; break;
        case OP_LE: v = a <= b; break;
        case OP_GT: v = a > b; break;
        case OP_GE: v = a >= b; break;
        case OP_EQ: v = a == b; break;
        case OP_NE: v = a != b; break;
        default: v = NAN; break;
        }
        r[i[1]] = v;
    }
}

static PyObject *run(PyObject *self, PyObject *args) {
    Py_buffer prog, regs;
    Py_ssize_t start, stop, max_reg;
    if (!PyArg_ParseTuple(args, "y*w*nnn", &prog, &regs, &start, &stop, &max_reg))
        return NULL;
    Py_ssize_t n_instr = prog.len / (Py_ssize_t)(5 * sizeof(int32_t));
    Py_ssize_t n_regs = regs.len / (Py_ssize_t)sizeof(double);
    /* the program was checked when it was built (scalar_vm.Program: opcodes in range,
       registers < max_reg + 1); here only that these buffers fit it */
    if (start < 0 || stop > n_instr || start > stop || max_reg >= n_regs) {
        PyBuffer_Release(&prog);
        PyBuffer_Release(&regs);
        PyErr_SetString(PyExc_ValueError, "the registers or the range do not fit the program");
        return NULL;
    }
    const int32_t *p = (const int32_t *)prog.buf;
    double *r = (double *)regs.buf;
    Py_BEGIN_ALLOW_THREADS
    execute(p, r, start, stop);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&prog);
    PyBuffer_Release(&regs);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS,
     "run(program, registers, start, stop, max_reg): instructions start..stop-1 in place"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scalarvm", "The scalar register VM (see _scalarvm.c).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__scalarvm(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "OP_COUNT", OP_COUNT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
