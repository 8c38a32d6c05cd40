/* The block VM's loops for one element type (included by _vmblocks.c once per type):
 * T is the type, NAME(f) the suffixed function name, SQRT/FABS its libm functions.
 * Every register of a region holds T (bools: 0 and 1). */

static void NAME(block_op)(const int32_t *i, T **R, Py_ssize_t m) {
    T *d = R[i[1]];
    const T *x = R[i[2]], *y = R[i[3]], *z = R[i[4]];
    Py_ssize_t j;
    switch (i[0]) {
    case OP_ADD: for (j = 0; j < m; j++) d[j] = x[j] + y[j]; break;
    case OP_SUB: for (j = 0; j < m; j++) d[j] = x[j] - y[j]; break;
    case OP_MUL: for (j = 0; j < m; j++) d[j] = x[j] * y[j]; break;
    case OP_DIV: for (j = 0; j < m; j++) d[j] = x[j] / y[j]; break;
    case OP_NEG: for (j = 0; j < m; j++) d[j] = -x[j]; break;
    case OP_SQRT: for (j = 0; j < m; j++) d[j] = SQRT(x[j]); break;
    case OP_SQUARE: for (j = 0; j < m; j++) d[j] = x[j] * x[j]; break;
    case OP_RECIPROCAL: for (j = 0; j < m; j++) d[j] = (T)1 / x[j]; break;
    case OP_ABS: for (j = 0; j < m; j++) d[j] = FABS(x[j]); break;
    case OP_MUL_OR_ZERO:  /* vm_moz without branches (vectorized) */
        for (j = 0; j < m; j++) {
            T v = x[j] * y[j];
            d[j] = ((v != v) & ((x[j] == 0) | (y[j] == 0))) ? (T)0 : v;
        }
        break;
    case OP_WHERE:  /* both read first: a select, vectorized */
        for (j = 0; j < m; j++) {
            T t = y[j], f = z[j];
            d[j] = x[j] != 0 ? t : f;
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

static inline T NAME(leaf_at)(const char *p, int is_bool) {
    if (is_bool)
        return *(const unsigned char *)p != 0;
    T v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* elements [start, start + m) of a strided leaf (any strides: broadcast, sliced,
   reversed), in C order of its shape, into dst: row by row along the last axis */
static void NAME(gather)(const Py_buffer *v, int is_bool, Py_ssize_t start, Py_ssize_t m,
                         T *dst) {
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
            T x = NAME(leaf_at)(base + off, is_bool);
            for (Py_ssize_t q = 0; q < run; q++) dst[j + q] = x;
        } else if (step == (Py_ssize_t)sizeof(T) && !is_bool) {
            memcpy(dst + j, base + off, (size_t)run * sizeof(T));
        } else {
            for (Py_ssize_t q = 0; q < run; q++)
                dst[j + q] = NAME(leaf_at)(base + off + q * step, is_bool);
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

/* run the program over elements [0, n): every register a block (see _vmblocks.c) */
static void NAME(run_blocks)(const int32_t *p, Py_ssize_t n_instr, Leaf *leaves,
                             Py_ssize_t L, T **R, T *scratch, T *out, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < L; k++) {  /* single values: a block of copies, once */
        if (leaves[k].kind == SINGLE || leaves[k].kind == SINGLE + 1) {
            T v = NAME(leaf_at)(leaves[k].view.buf, leaves[k].kind == SINGLE + 1);
            R[k] = scratch + k * BLOCK;
            for (Py_ssize_t j = 0; j < BLOCK; j++) R[k][j] = v;
        }
    }
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;
        for (Py_ssize_t k = 0; k < L; k++) {
            int kind = leaves[k].kind;
            if (kind == FULL) {
                R[k] = (T *)leaves[k].view.buf + start;
            } else if (kind == FULL + 1) {
                const unsigned char *b = (const unsigned char *)leaves[k].view.buf + start;
                R[k] = scratch + k * BLOCK;
                for (Py_ssize_t j = 0; j < m; j++) R[k][j] = b[j] != 0;
            } else if (kind >= STRIDED) {
                R[k] = scratch + k * BLOCK;
                NAME(gather)(&leaves[k].view, kind == STRIDED + 1, start, m, R[k]);
            }
        }
        for (Py_ssize_t q = 0; q < n_instr; q++) {
            const int32_t *i = p + 5 * q;
            T *keep = R[i[1]];
            if (q == n_instr - 1) R[i[1]] = out + start;  /* the result, in place */
            NAME(block_op)(i, R, m);
            R[i[1]] = keep;
        }
    }
}
