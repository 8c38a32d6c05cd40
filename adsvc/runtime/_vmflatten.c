/* flatten(inputs, roots, opcodes, float64, bool): a scalar graph's IR nodes straight to a
 * register program, in C, so compiling a 100k-node gradient does not walk the graph in
 * Python (adsvc/runtime/tape.py).
 *
 * One register per node: the inputs first (registers 0..), then every node the roots
 * reach, operands before users (an iterative depth-first walk: graphs may be a million
 * nodes deep). Returns (program bytes, template bytes: float64 registers with the
 * constants, register count, root registers), or None when the graph is not for the VM:
 * a value that is not a float64/bool scalar, a node with several results, an op without
 * an opcode, a bool that is not a comparison's, or an input node not in `inputs` (the
 * caller then takes the general path, which reports what is wrong, if anything is).
 */
#include "_scalarvm.h"

typedef struct {  /* open addressing: node pointer -> register */
    PyObject **keys;
    int32_t *vals;
    size_t mask;
    size_t used;
} Map;

static size_t hash_ptr(PyObject *p) {
    size_t h = (size_t)p >> 4;
    return h * (size_t)0x9E3779B97F4A7C15ULL;
}

static int map_init(Map *m, size_t want) {
    size_t cap = 64;
    while (cap < 2 * want) cap <<= 1;
    m->keys = calloc(cap, sizeof(PyObject *));
    m->vals = malloc(cap * sizeof(int32_t));
    m->mask = cap - 1;
    m->used = 0;
    return m->keys != NULL && m->vals != NULL;
}

static void map_free(Map *m) { free(m->keys); free(m->vals); }

static int32_t map_get(const Map *m, PyObject *key) {
    for (size_t h = hash_ptr(key) & m->mask;; h = (h + 1) & m->mask) {
        if (m->keys[h] == key) return m->vals[h];
        if (m->keys[h] == NULL) return -1;
    }
}

static int map_put(Map *m, PyObject *key, int32_t val) {
    if (2 * (m->used + 1) > m->mask + 1) {  /* grow: keep the load under 1/2 */
        Map bigger;
        if (!map_init(&bigger, m->mask + 1)) return 0;
        for (size_t h = 0; h <= m->mask; h++)
            if (m->keys[h] != NULL) map_put(&bigger, m->keys[h], m->vals[h]);
        map_free(m);
        *m = bigger;
    }
    size_t h = hash_ptr(key) & m->mask;
    while (m->keys[h] != NULL) h = (h + 1) & m->mask;
    m->keys[h] = key;
    m->vals[h] = val;
    m->used++;
    return 1;
}

typedef struct {  /* growable arrays of what the walk builds */
    int32_t *code;
    double *regs;
    size_t n_code, n_regs, cap_code, cap_regs;
} Out;

static int out_reg(Out *o, double value) {
    if (o->n_regs == o->cap_regs) {
        size_t cap = o->cap_regs ? 2 * o->cap_regs : 1024;
        double *r = realloc(o->regs, cap * sizeof(double));
        if (r == NULL) return 0;
        o->regs = r;
        o->cap_regs = cap;
    }
    o->regs[o->n_regs++] = value;
    return 1;
}

static int out_code(Out *o, const int32_t ins[5]) {
    if (o->n_code == o->cap_code) {
        size_t cap = o->cap_code ? 2 * o->cap_code : 1024;
        int32_t *c = realloc(o->code, cap * 5 * sizeof(int32_t));
        if (c == NULL) return 0;
        o->code = c;
        o->cap_code = cap;
    }
    memcpy(o->code + 5 * o->n_code++, ins, 5 * sizeof(int32_t));
    return 1;
}

typedef struct {
    PyObject *opcodes, *f64, *boolean;
    PyObject *s_op, *s_inputs, *s_dtype, *s_shape, *s_types, *s_value, *s_input, *s_const;
} Names;

/* a borrowed attribute (the node keeps it alive) or NULL with an exception */
static PyObject *attr(PyObject *node, PyObject *name) {
    PyObject *v = PyObject_GetAttr(node, name);
    if (v != NULL) Py_DECREF(v);
    return v;
}

/* 1: a float64 or bool scalar with one result (*is_bool set); 0: not; -1: error */
static int scalar_type(PyObject *node, const Names *nm, int *is_bool) {
    PyObject *shape = attr(node, nm->s_shape), *types, *dtype;
    if (shape == NULL) return -1;
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != 0) return 0;
    if ((types = attr(node, nm->s_types)) == NULL) return -1;
    if (types != Py_None) return 0;
    if ((dtype = attr(node, nm->s_dtype)) == NULL) return -1;
    int f = PyObject_RichCompareBool(dtype, nm->f64, Py_EQ);
    if (f < 0) return -1;
    int b = f ? 0 : PyObject_RichCompareBool(dtype, nm->boolean, Py_EQ);
    if (b < 0) return -1;
    *is_bool = b;
    return f || b;
}

/* emit `node` (its operands have registers): 1 done, 0 not for the VM, -1 error */
static int emit(PyObject *node, PyObject *ins, const Names *nm, Map *m, Out *o) {
    int is_bool, ok = scalar_type(node, nm, &is_bool);
    if (ok <= 0) return ok;
    PyObject *op = attr(node, nm->s_op);
    if (op == NULL) return -1;
    int32_t reg = (int32_t)o->n_regs;
    if (PyObject_RichCompareBool(op, nm->s_const, Py_EQ) == 1) {
        PyObject *value = attr(node, nm->s_value), *f;
        if (value == NULL || (f = PyNumber_Float(value)) == NULL) return -1;
        double d = PyFloat_AS_DOUBLE(f);
        Py_DECREF(f);
        return out_reg(o, d) && map_put(m, node, reg) ? 1 : -1;
    }
    PyObject *code = PyDict_GetItemWithError(nm->opcodes, op);
    if (code == NULL) return PyErr_Occurred() ? -1 : 0;  /* an input not declared, a loop */
    long opcode = PyLong_AsLong(code);
    Py_ssize_t n_in = PyTuple_GET_SIZE(ins);
    if (opcode < 0 || opcode >= OP_COUNT || n_in != ARITY[opcode]) return 0;
    if (is_bool != (opcode >= OP_LT && opcode <= OP_NE)) return 0;  /* bools: comparisons */
    int32_t instr[5] = {(int32_t)opcode, reg, reg, reg, reg};
    for (Py_ssize_t j = 0; j < n_in; j++) instr[2 + j] = map_get(m, PyTuple_GET_ITEM(ins, j));
    return out_reg(o, 0.0) && out_code(o, instr) && map_put(m, node, reg) ? 1 : -1;
}

typedef struct { PyObject *node, *ins; Py_ssize_t next; } Frame;

/* the post-order walk from one root; 1, 0 or -1 as `emit` */
static int walk(PyObject *root, const Names *nm, Map *m, Out *o) {
    size_t cap = 256, top = 0;
    Frame *st = malloc(cap * sizeof(Frame));
    int status = 1;
    if (st == NULL) { PyErr_NoMemory(); return -1; }
    PyObject *ins = attr(root, nm->s_inputs);
    if (ins == NULL || !PyTuple_Check(ins)) { free(st); return ins == NULL ? -1 : 0; }
    st[top++] = (Frame){root, ins, 0};
    while (top > 0 && status == 1) {
        Frame *fr = &st[top - 1];
        if (fr->next < PyTuple_GET_SIZE(fr->ins)) {
            PyObject *child = PyTuple_GET_ITEM(fr->ins, fr->next++);
            if (map_get(m, child) >= 0) continue;
            PyObject *cins = attr(child, nm->s_inputs);
            if (cins == NULL || !PyTuple_Check(cins)) { status = cins == NULL ? -1 : 0; break; }
            if (top == cap) {
                Frame *bigger = realloc(st, 2 * cap * sizeof(Frame));
                if (bigger == NULL) { PyErr_NoMemory(); status = -1; break; }
                st = bigger;
                cap *= 2;
            }
            st[top++] = (Frame){child, cins, 0};
        } else {
            top--;
            if (map_get(m, fr->node) < 0) status = emit(fr->node, fr->ins, nm, m, o);
        }
    }
    free(st);
    return status;
}

static PyObject *result(Out *o, Map *m, PyObject *roots) {
    PyObject *regs = PyList_New(PyTuple_GET_SIZE(roots));
    if (regs == NULL) return NULL;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(roots); k++)
        PyList_SET_ITEM(regs, k, PyLong_FromLong(map_get(m, PyTuple_GET_ITEM(roots, k))));
    static const char empty[1] = {0};
    return Py_BuildValue("(y#y#nN)", o->code ? (const char *)o->code : empty,
                         (Py_ssize_t)(o->n_code * 5 * sizeof(int32_t)),
                         o->regs ? (const char *)o->regs : empty,
                         (Py_ssize_t)(o->n_regs * sizeof(double)), (Py_ssize_t)o->n_regs,
                         regs);
}

PyObject *vm_flatten(PyObject *self, PyObject *args) {
    PyObject *inputs, *roots;
    Names nm = {0};
    if (!PyArg_ParseTuple(args, "O!O!O!UU", &PyTuple_Type, &inputs, &PyTuple_Type, &roots,
                          &PyDict_Type, &nm.opcodes, &nm.f64, &nm.boolean))
        return NULL;
    nm.s_op = PyUnicode_InternFromString("op");
    nm.s_inputs = PyUnicode_InternFromString("inputs");
    nm.s_dtype = PyUnicode_InternFromString("dtype");
    nm.s_shape = PyUnicode_InternFromString("shape");
    nm.s_types = PyUnicode_InternFromString("types");
    nm.s_value = PyUnicode_InternFromString("value");
    nm.s_input = PyUnicode_InternFromString("input");
    nm.s_const = PyUnicode_InternFromString("constant");
    Map m = {0};
    Out o = {0};
    PyObject *ret = NULL;
    int status = map_init(&m, 1024) ? 1 : -1;
    if (status < 0) PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(inputs) && status == 1; k++) {
        PyObject *n = PyTuple_GET_ITEM(inputs, k);
        int is_bool;
        status = scalar_type(n, &nm, &is_bool);
        if (status == 1 && map_get(&m, n) >= 0) status = 0;  /* an input listed twice */
        if (status == 1 && !(out_reg(&o, 0.0) && map_put(&m, n, (int32_t)k))) status = -1;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(roots) && status == 1; k++) {
        PyObject *root = PyTuple_GET_ITEM(roots, k);
        if (map_get(&m, root) < 0) status = walk(root, &nm, &m, &o);
        if (o.n_regs >= (size_t)INT32_MAX) status = 0;
    }
    if (status == 1) ret = result(&o, &m, roots);
    else if (status == 0) ret = Py_NewRef(Py_None);
    else if (!PyErr_Occurred()) PyErr_NoMemory();
    map_free(&m);
    free(o.code);
    free(o.regs);
    Py_XDECREF(nm.s_op); Py_XDECREF(nm.s_inputs); Py_XDECREF(nm.s_dtype);
    Py_XDECREF(nm.s_shape); Py_XDECREF(nm.s_types); Py_XDECREF(nm.s_value);
    Py_XDECREF(nm.s_input); Py_XDECREF(nm.s_const);
    return ret;
}
