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
#include "_scalarvm.h"

void vm_execute(const int32_t *p, double *r, Py_ssize_t start, Py_ssize_t stop) {
    for (Py_ssize_t k = start; k < stop; k++) {
        const int32_t *i = p + 5 * k;
        double a = r[i[2]], b = r[i[3]], v;
        switch (i[0]) {
        case OP_COPY: case OP_STOP: v = a; break;
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
        case OP_SIGN: v = vm_sign(a); break;
        case OP_SIGMOID: v = vm_sigmoid(a); break;
        case OP_SOFTPLUS: v = vm_softplus(a); break;
        case OP_LOG1P: v = log1p(a); break;
        case OP_EXPM1: v = expm1(a); break;
        case OP_POW: v = vm_pow(a, b); break;
        case OP_MAXIMUM: v = vm_maximum(a, b); break;
        case OP_MINIMUM: v = vm_minimum(a, b); break;
        case OP_MUL_OR_ZERO: v = vm_moz(a, b); break;
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
    vm_execute(p, r, start, stop);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&prog);
    PyBuffer_Release(&regs);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS,
     "run(program, registers, start, stop, max_reg): instructions start..stop-1 in place"},
    {"flatten", vm_flatten, METH_VARARGS,
     "flatten(inputs, roots, opcodes, float64, bool): the program of a scalar graph or None"},
    {"activity", vm_activity, METH_VARARGS,
     "activity(program, n_regs, wrt, targets): (operand flags per instruction, reached)"},
    {"reverse", vm_reverse, METH_VARARGS,
     "reverse(program, registers, adjoints, flags, start, stop): the adjoint sweep"},
    {"whole", vm_whole, METH_VARARGS,
     "whole(program, flags, template, inputs, value_regs, targets, seeds, wrt, reverse)"},
    {"small_call", vm_small_call, METH_VARARGS,
     "small_call(tape, request, in_offsets, response, out_offsets, out_sources, data): "
     "a small tape from request bytes to response bytes, or None"},
    {"tangent", vm_tangent, METH_VARARGS,
     "tangent(program, registers, tangents, flags, start, stop): the tangent sweep"},
    {"blocks", vm_blocks, METH_VARARGS,
     "blocks(program, leaves, out, n_temps): a fused elementwise region, block by block"},
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
