/* Derivative sweeps over a scalar program (adsvc/runtime/tape.py): the gradient or JVP
 * of a scalar graph without building its derivative graph.
 *
 * activity: which operands of which instructions carry derivatives, the activity
 *     analysis of adsvc/passes/activity.py on the program: a register is active when it
 *     depends on a wrt register through differentiable operands and a target depends on
 *     it. flags[k] bit j: operand j of instruction k is active (0: the instruction is
 *     not differentiated at all).
 * reverse: the adjoint sweep, instructions in reverse order; adjoints start at -0.0, so
 *     the first contribution is stored exactly (-0.0 + x == x), as in the derivative
 *     graph, where the first contribution is the cotangent and later ones are added.
 * tangent: the tangent sweep, after the values are computed; each active instruction's
 *     tangent is the sum of its active operands' terms, again from -0.0.
 *
 * Both follow the op table's JVP/VJP rules term by term (adsvc/ops/elementwise.py):
 * the same local derivatives, computed from the same values, and every chain-rule
 * product a mul_or_zero (0 where the cotangent or tangent is 0, even against inf).
 * Only the order in which several contributions to one adjoint are added may differ
 * from the derivative graph's (rounding).
 */
#include "_scalarvm.h"

PyObject *vm_activity(PyObject *self, PyObject *args) {
    Py_buffer prog, wrt, targets;
    Py_ssize_t n_regs;
    if (!PyArg_ParseTuple(args, "y*ny*y*", &prog, &n_regs, &wrt, &targets)) return NULL;
    Py_ssize_t n = prog.len / (Py_ssize_t)(5 * sizeof(int32_t));
    Py_ssize_t n_wrt = wrt.len / (Py_ssize_t)sizeof(int32_t);
    Py_ssize_t n_targets = targets.len / (Py_ssize_t)sizeof(int32_t);
    const int32_t *p = (const int32_t *)prog.buf, *w = (const int32_t *)wrt.buf;
    const int32_t *t = (const int32_t *)targets.buf;
    PyObject *flags = PyBytes_FromStringAndSize(NULL, n > 0 ? n : 1);
    PyObject *reached = PyBytes_FromStringAndSize(NULL, n_wrt > 0 ? n_wrt : 1);
    unsigned char *dep = calloc(n_regs > 0 ? n_regs : 1, 2);
    const char *bad = NULL;
    if (flags == NULL || reached == NULL || dep == NULL) goto fail;
    unsigned char *use = dep + n_regs, *f = (unsigned char *)PyBytes_AS_STRING(flags);
    for (Py_ssize_t k = 0; k < n_wrt && !bad; k++) {
        if (w[k] < 0 || w[k] >= n_regs) bad = "a wrt register is out of range";
        else dep[w[k]] = 1;
    }
    for (Py_ssize_t k = 0; k < n && !bad; k++) {  /* depends on wrt */
        const int32_t *i = p + 5 * k;
        if (i[0] < 0 || i[0] >= OP_COUNT) { bad = "an opcode is out of range"; break; }
        for (int j = 1; j < 5; j++)
            if (i[j] < 0 || i[j] >= n_regs) bad = "a register is out of range";
        if (bad) break;
        unsigned char d = 0, diff = DIFFERENTIABLE[i[0]];
        for (int j = 0; j < ARITY[i[0]]; j++)
            if (diff & (1 << j)) d |= dep[i[2 + j]];
        dep[i[1]] = d;
    }
    for (Py_ssize_t k = 0; k < n_targets && !bad; k++) {
        if (t[k] < 0 || t[k] >= n_regs) bad = "a target register is out of range";
        else if (dep[t[k]]) use[t[k]] = 1;
    }
    for (Py_ssize_t k = n - 1; k >= 0 && !bad; k--) {  /* and reaches a target */
        const int32_t *i = p + 5 * k;
        unsigned char bits = 0, diff = DIFFERENTIABLE[i[0]];
        if (use[i[1]]) {
            for (int j = 0; j < ARITY[i[0]]; j++) {
                int32_t o = i[2 + j];
                if ((diff & (1 << j)) && dep[o]) { bits |= 1 << j; use[o] = 1; }
            }
        }
        f[k] = bits;
    }
    if (bad) { PyErr_SetString(PyExc_ValueError, bad); goto fail; }
    for (Py_ssize_t k = 0; k < n_wrt; k++) PyBytes_AS_STRING(reached)[k] = use[w[k]];
    free(dep);
    PyBuffer_Release(&prog); PyBuffer_Release(&wrt); PyBuffer_Release(&targets);
    return Py_BuildValue("(NN)", flags, reached);
fail:
    free(dep);
    Py_XDECREF(flags); Py_XDECREF(reached);
    PyBuffer_Release(&prog); PyBuffer_Release(&wrt); PyBuffer_Release(&targets);
    return dep == NULL && !PyErr_Occurred() ? PyErr_NoMemory() : NULL;
}

/* The local derivatives of the nonlinear ops, d/da and d/db at operands x, y and result
   v, as the op table's rules compute them (so both sweeps give the derivative graph's
   numbers): one table, expanded into each sweep's switch (one dispatch per instruction;
   a shared function called from both cost 15-25% per sweep). */
static inline double tie_weight(int op, double x, double y) {  /* ties split 1/2 - 1/2 */
    return (op == OP_MAXIMUM ? x > y : x < y) ? 1.0 : (x == y ? 0.5 : 0.0);
}

#define BINARY(X)                                                                 \
    X(OP_MUL, y, x) X(OP_MUL_OR_ZERO, y, x) X(OP_DIV, 1.0 / y, -(v / y))             \
    X(OP_POW, vm_moz(y, vm_pow(x, y - 1.0)), x == 0.0 ? 0.0 : vm_moz(v, log(x)))     \
    X(OP_MAXIMUM, tie_weight(OP_MAXIMUM, x, y), 1.0 - tie_weight(OP_MAXIMUM, x, y))  \
    X(OP_MINIMUM, tie_weight(OP_MINIMUM, x, y), 1.0 - tie_weight(OP_MINIMUM, x, y))
#define UNARY(X)                                                                  \
    X(OP_EXP, v) X(OP_LOG, 1.0 / x) X(OP_SIN, cos(x)) X(OP_COS, -sin(x))             \
    X(OP_TAN, v * v + 1.0) X(OP_TANH, 1.0 - v * v) X(OP_SQRT, 0.5 / v)               \
    X(OP_SQUARE, x * 2.0) X(OP_RECIPROCAL, -(v * v)) X(OP_ABS, vm_sign(x))           \
    X(OP_SIGMOID, v * (1.0 - v)) X(OP_SOFTPLUS, vm_sigmoid(x))                       \
    X(OP_LOG1P, 1.0 / (x + 1.0)) X(OP_EXPM1, v + 1.0)

/* a chain-rule product per active operand: the adjoint sweep ... (a unary instruction
   that is differentiated at all has its one operand active) */
#define ADJOINT2(op, da, db)                                 \
    case op:                                                 \
        if (f & 1) adj[a] += vm_moz(g, (da));                \
        if (f & 2) adj[b] += vm_moz(g, (db));                \
        break;
#define ADJOINT1(op, da) case op: adj[a] += vm_moz(g, (da)); break;
/* ... and the tangent sweep (the sum of the active operands' terms, from -0.0) */
#define TANGENT2(op, da, db)                                 \
    case op:                                                 \
        if (f & 1) t += vm_moz(ta, (da));                    \
        if (f & 2) t += vm_moz(tb, (db));                    \
        break;
#define TANGENT1(op, da) case op: t = vm_moz(ta, (da)); break;

static void reverse(const int32_t *p, const double *r, double *adj, const unsigned char *fl,
                    Py_ssize_t start, Py_ssize_t stop) {
    for (Py_ssize_t k = stop - 1; k >= start; k--) {
        unsigned char f = fl[k];
        if (!f) continue;
        const int32_t *i = p + 5 * k;
        int32_t a = i[2], b = i[3], c = i[4];
        double g = adj[i[1]], x = r[a], y = r[b], v = r[i[1]];
        switch (i[0]) {  /* linear ops pass the cotangent on as the graph does */
        case OP_COPY: adj[a] += g; break;
        case OP_ADD: if (f & 1) adj[a] += g; if (f & 2) adj[b] += g; break;
        case OP_SUB: if (f & 1) adj[a] += g; if (f & 2) adj[b] += -g; break;
        case OP_NEG: adj[a] += -g; break;
        case OP_WHERE:
            if (f & 2) adj[b] += x != 0.0 ? g : 0.0;
            if (f & 4) adj[c] += x != 0.0 ? 0.0 : g;
            break;
        BINARY(ADJOINT2)
        UNARY(ADJOINT1)
        default: break;  /* no derivative (flags are 0 there) */
        }
    }
}

static void tangent(const int32_t *p, const double *r, double *dot, const unsigned char *fl,
                    Py_ssize_t start, Py_ssize_t stop) {
    for (Py_ssize_t k = start; k < stop; k++) {
        unsigned char f = fl[k];
        if (!f) continue;
        const int32_t *i = p + 5 * k;
        double ta = dot[i[2]], tb = dot[i[3]], x = r[i[2]], y = r[i[3]], v = r[i[1]];
        double t = -0.0;
        switch (i[0]) {
        case OP_COPY: t = ta; break;
        case OP_ADD: if (f & 1) t += ta; if (f & 2) t += tb; break;
        case OP_SUB: if (f & 1) t += ta; if (f & 2) t += -tb; break;
        case OP_NEG: t = -ta; break;
        case OP_WHERE:  /* where(c, ta, tb), an inactive side's tangent 0 */
            t = x != 0.0 ? ((f & 2) ? tb : 0.0) : ((f & 4) ? dot[i[4]] : 0.0);
            break;
        BINARY(TANGENT2)
        UNARY(TANGENT1)
        default: break;
        }
        dot[i[1]] = t;
    }
}

/* (program, registers, derivative registers, flags, start, stop): the checks shared by
   both sweeps; the program itself was checked by `activity` when its flags were made */
static int sweep_args(PyObject *args, Py_buffer *bufs, Py_ssize_t *start, Py_ssize_t *stop) {
    if (!PyArg_ParseTuple(args, "y*y*w*y*nn", &bufs[0], &bufs[1], &bufs[2], &bufs[3],
                          start, stop))
        return 0;
    Py_ssize_t n = bufs[0].len / (Py_ssize_t)(5 * sizeof(int32_t));
    if (*start < 0 || *stop > n || *start > *stop || bufs[3].len != (n > 0 ? n : 1) ||
        bufs[1].len != bufs[2].len) {
        for (int j = 0; j < 4; j++) PyBuffer_Release(&bufs[j]);
        PyErr_SetString(PyExc_ValueError, "the buffers or the range do not fit the program");
        return 0;
    }
    return 1;
}

static PyObject *run_sweep(PyObject *args, int backward) {
    Py_buffer b[4];
    Py_ssize_t start, stop;
    if (!sweep_args(args, b, &start, &stop)) return NULL;
    const int32_t *p = (const int32_t *)b[0].buf;
    Py_BEGIN_ALLOW_THREADS
    if (backward)
        reverse(p, (const double *)b[1].buf, (double *)b[2].buf, b[3].buf, start, stop);
    else
        tangent(p, (const double *)b[1].buf, (double *)b[2].buf, b[3].buf, start, stop);
    Py_END_ALLOW_THREADS
    for (int j = 0; j < 4; j++) PyBuffer_Release(&b[j]);
    Py_RETURN_NONE;
}

PyObject *vm_reverse(PyObject *self, PyObject *args) { return run_sweep(args, 1); }

PyObject *vm_tangent(PyObject *self, PyObject *args) { return run_sweep(args, 0); }

/* whole(program, flags, template, inputs, value_regs, targets, seeds, wrt, reached,
         reverse):
   a small tape's whole run in one call — values, then the adjoint (or tangent) sweep —
   with no deadline checks in between (tape.py calls it for programs of at most one
   chunk). `inputs`: the primal inputs' values (registers 0..); `seeds`: a cotangent per
   target (reverse) or a tangent per wrt register (forward); `reached`: per wrt register,
   whether any derivative reaches it (else its gradient is +0.0, as the derivative
   graph's zeros). Returns (values at value_regs, derivatives: per wrt register (reverse)
   or per target (forward)). The
   registers were checked by `activity`; here only that the buffers fit. */
static int as_doubles(PyObject *seq, double *out, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++) {
        out[k] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, k));
        if (out[k] == -1.0 && PyErr_Occurred()) return 0;
    }
    return 1;
}

static PyObject *float_list(const double *r, const int32_t *regs, Py_ssize_t n,
                            const unsigned char *keep) {
    PyObject *out = PyList_New(n);
    for (Py_ssize_t k = 0; out != NULL && k < n; k++) {
        PyObject *v = PyFloat_FromDouble(keep == NULL || keep[k] ? r[regs[k]] : 0.0);
        if (v == NULL) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, k, v);
    }
    return out;
}

/* The values (r: registers, the inputs already in place), then d: the adjoints seeded
   at the targets (backward) or the tangents seeded at the wrt registers. */
static void sweep_whole(const int32_t *p, Py_ssize_t n, const unsigned char *flags,
                        double *r, double *d, Py_ssize_t n_regs, const double *seed,
                        const int32_t *tr, Py_ssize_t n_t, const int32_t *wr,
                        Py_ssize_t n_w, int backward) {
    vm_execute(p, r, 0, n);
    for (Py_ssize_t k = 0; k < n_regs; k++) d[k] = backward ? -0.0 : 0.0;
    if (backward) {
        for (Py_ssize_t k = 0; k < n_t; k++) d[tr[k]] += seed[k];
        reverse(p, r, d, flags, 0, n);
    } else {
        for (Py_ssize_t k = 0; k < n_w; k++) d[wr[k]] = seed[k];
        tangent(p, r, d, flags, 0, n);
    }
}

PyObject *vm_whole(PyObject *self, PyObject *args) {
    Py_buffer b[7];  /* program, flags, template, value_regs, targets, wrt, reached */
    PyObject *inputs, *seeds, *ret = NULL;
    int backward;
    if (!PyArg_ParseTuple(args, "y*y*y*Oy*y*Oy*y*p", &b[0], &b[1], &b[2], &inputs, &b[3],
                          &b[4], &seeds, &b[5], &b[6], &backward))
        return NULL;
    Py_ssize_t n = b[0].len / (Py_ssize_t)(5 * sizeof(int32_t));
    Py_ssize_t n_regs = b[2].len / (Py_ssize_t)sizeof(double);
    Py_ssize_t n_val = b[3].len / 4, n_t = b[4].len / 4, n_w = b[5].len / 4;
    PyObject *in = PySequence_Fast(inputs, "inputs must be a sequence");
    PyObject *sd = PySequence_Fast(seeds, "seeds must be a sequence");
    double *r = malloc(2 * (n_regs > 0 ? n_regs : 1) * sizeof(double));
    if (in == NULL || sd == NULL || r == NULL) goto done;
    Py_ssize_t n_in = PySequence_Fast_GET_SIZE(in), n_seed = PySequence_Fast_GET_SIZE(sd);
    const int32_t *p = b[0].buf, *vr = b[3].buf, *tr = b[4].buf, *wr = b[5].buf;
    if (b[1].len != (n > 0 ? n : 1) || n_in > n_regs || n_seed != (backward ? n_t : n_w) ||
        b[6].len < n_w) {
        PyErr_SetString(PyExc_ValueError, "the buffers do not fit the program");
        goto done;
    }
    double *d = r + n_regs, *seed = malloc((n_seed > 0 ? n_seed : 1) * sizeof(double));
    if (seed == NULL) { PyErr_NoMemory(); goto done; }
    memcpy(r, b[2].buf, n_regs * sizeof(double));
    if (!as_doubles(in, r, n_in) || !as_doubles(sd, seed, n_seed)) { free(seed); goto done; }
    sweep_whole(p, n, b[1].buf, r, d, n_regs, seed, tr, n_t, wr, n_w, backward);
    free(seed);
    PyObject *vals = float_list(r, vr, n_val, NULL);
    PyObject *ders = backward ? float_list(d, wr, n_w, b[6].buf) : float_list(d, tr, n_t, NULL);
    if (vals != NULL && ders != NULL) ret = PyTuple_Pack(2, vals, ders);
    Py_XDECREF(vals);
    Py_XDECREF(ders);
done:
    if (r == NULL && !PyErr_Occurred()) PyErr_NoMemory();
    free(r);
    Py_XDECREF(in);
    Py_XDECREF(sd);
    for (int j = 0; j < 7; j++) PyBuffer_Release(&b[j]);
    return ret;
}

/* small_call(tape, request, in_offsets, response, out_offsets, out_sources, data):
   the server's small-call path (server/scalar_path.py) in one call. `tape` =
   (program, flags, template, value_regs, targets, wrt, reached, backward, seeded,
   n_primal), all bytes but the last three. `request` is a request's bytes with zeros
   in each input's 8 bytes, at `in_offsets` (int32, ascending); `data` must be as long
   and equal to it everywhere else, or the answer is None (not this layout). Its
   doubles (little-endian) are the inputs: the first n_primal the primal ones, the
   rest the seeds (none when `seeded`: a plain gradient, seeds 1). The answer is
   `response` with, at each of `out_offsets`, the double of `out_sources` (int32: k <
   number of values: value k; else derivative k - that number, as `whole` orders
   them). Offsets and sources are checked; the registers were (by `activity`). */
static double load_le(const unsigned char *s) {
    uint64_t u = 0;
    for (int k = 7; k >= 0; k--) u = (u << 8) | s[k];
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static void store_le(unsigned char *s, double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    for (int k = 0; k < 8; k++, u >>= 8) s[k] = (unsigned char)(u & 0xFF);
}

static int offsets_fit(const int32_t *off, Py_ssize_t n, Py_ssize_t len) {
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (off[k] < at || (Py_ssize_t)off[k] > len - 8) return 0;
        at = off[k] + 8;
    }
    return 1;
}

static int same_outside(const unsigned char *a, const unsigned char *b, Py_ssize_t len,
                        const int32_t *off, Py_ssize_t n) {
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (memcmp(a + at, b + at, off[k] - at) != 0) return 0;
        at = off[k] + 8;
    }
    return memcmp(a + at, b + at, len - at) == 0;
}

static PyObject *small_run(Py_buffer *b, int backward, int seeded, Py_ssize_t n_primal,
                           Py_buffer *rq, Py_buffer *io, Py_buffer *rs, Py_buffer *oo,
                           Py_buffer *os, Py_buffer *data) {
    Py_ssize_t n = b[0].len / (Py_ssize_t)(5 * sizeof(int32_t));
    Py_ssize_t n_regs = b[2].len / (Py_ssize_t)sizeof(double);
    Py_ssize_t n_val = b[3].len / 4, n_t = b[4].len / 4, n_w = b[5].len / 4;
    Py_ssize_t n_in = io->len / 4, n_out = oo->len / 4;
    Py_ssize_t n_seed = seeded ? n_t : n_in - n_primal, n_der = backward ? n_w : n_t;
    const int32_t *in_off = io->buf, *out_off = oo->buf, *src = os->buf;
    if (b[1].len != (n > 0 ? n : 1) || b[6].len < n_w || n_primal > n_regs ||
        n_primal > n_in || (seeded && (!backward || n_in != n_primal)) ||
        n_seed != (backward ? n_t : n_w) || os->len != oo->len ||
        !offsets_fit(in_off, n_in, rq->len) || !offsets_fit(out_off, n_out, rs->len)) {
        PyErr_SetString(PyExc_ValueError, "the layouts do not fit the program");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n_out; k++)
        if (src[k] < 0 || src[k] >= n_val + n_der) {
            PyErr_SetString(PyExc_ValueError, "an output source is out of range");
            return NULL;
        }
    if (data->len != rq->len || !same_outside(data->buf, rq->buf, rq->len, in_off, n_in))
        Py_RETURN_NONE;
    double *r = malloc((2 * (n_regs > 0 ? n_regs : 1) + (n_seed > 0 ? n_seed : 1))
                       * sizeof(double));
    if (r == NULL) return PyErr_NoMemory();
    double *d = r + (n_regs > 0 ? n_regs : 1), *seed = d + (n_regs > 0 ? n_regs : 1);
    const unsigned char *in = data->buf;
    memcpy(r, b[2].buf, n_regs * sizeof(double));
    for (Py_ssize_t k = 0; k < n_primal; k++) r[k] = load_le(in + in_off[k]);
    for (Py_ssize_t k = 0; k < n_seed; k++)
        seed[k] = seeded ? 1.0 : load_le(in + in_off[n_primal + k]);
    const int32_t *vr = b[3].buf, *tr = b[4].buf, *wr = b[5].buf;
    const unsigned char *reached = b[6].buf;
    sweep_whole(b[0].buf, n, b[1].buf, r, d, n_regs, seed, tr, n_t, wr, n_w, backward);
    PyObject *out = PyBytes_FromStringAndSize(rs->buf, rs->len);
    if (out != NULL) {
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
        for (Py_ssize_t k = 0; k < n_out; k++) {
            Py_ssize_t j = src[k] - n_val;
            double v = j < 0 ? r[vr[src[k]]]
                     : backward ? (reached[j] ? d[wr[j]] : 0.0) : d[tr[j]];
            store_le(o + out_off[k], v);
        }
    }
    free(r);
    return out;
}

PyObject *vm_small_call(PyObject *self, PyObject *args) {
    PyObject *tape;
    Py_buffer rq, io, rs, oo, os, data, b[7];
    int backward, seeded;
    Py_ssize_t n_primal;
    if (!PyArg_ParseTuple(args, "O!y*y*y*y*y*y*", &PyTuple_Type, &tape, &rq, &io, &rs, &oo,
                          &os, &data))
        return NULL;
    PyObject *ret = NULL;
    if (PyArg_ParseTuple(tape, "y*y*y*y*y*y*y*ppn", &b[0], &b[1], &b[2], &b[3], &b[4],
                         &b[5], &b[6], &backward, &seeded, &n_primal)) {
        ret = small_run(b, backward, seeded, n_primal, &rq, &io, &rs, &oo, &os, &data);
        for (int j = 0; j < 7; j++) PyBuffer_Release(&b[j]);
    }
    PyBuffer_Release(&rq);
    PyBuffer_Release(&io);
    PyBuffer_Release(&rs);
    PyBuffer_Release(&oo);
    PyBuffer_Release(&os);
    PyBuffer_Release(&data);
    return ret;
}
