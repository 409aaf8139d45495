/* es_mpi._noise_sum: the noise sum of es.weighted_noise_sum as one fused, cache-blocked C loop.

   out[i] = sum_j w[j] * (double)table[off[j] + lo + i], each coordinate i summed in the order
   j = 0..n-1 with every product rounded to double before its add: the bits of NumPy's
   multiply-into-a-temporary-then-add loop. That needs no fused multiply-add (built with
   -ffp-contract=off) and no reassociation (never -ffast-math); es.py checks the bits against
   NumPy at import and falls back to NumPy if they differ. The loop is vectorised across
   coordinates only, which are independent, so every SIMD width gives the same bits.

   Why it is fast: GROUP eps pass over a block of coordinates together, so the float64
   accumulator is loaded and stored once per GROUP eps instead of once per eps (NumPy's ufuncs
   also write and re-read a float64 temporary), and each eps slice is prefetched AHEAD floats
   ahead, across page boundaries where the hardware prefetcher stops. What remains is reading
   each slice once from memory. No NumPy headers: arrays come in through the buffer protocol. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "es_mpi._noise_sum must be built without -ffast-math: the sum keeps IEEE rounding"
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#ifndef GROUP
#define GROUP 8 /* eps summed per pass over a block (measured: 8 beats 4 and 16) */
#endif
#ifndef AHEAD
#define AHEAD 512 /* floats prefetched ahead in each slice (2 KiB; measured 256..2048) */
#endif
#define LINE 16 /* floats per 64-byte cache line: the unit of the inner loop and of prefetch */

#if defined(__GNUC__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define PREFETCH(p) __builtin_prefetch((p), 0, 0)
#else
#define ALWAYS_INLINE static inline
#define PREFETCH(p) ((void)0)
#endif

/* acc[i] += w[0] x[0][i]; ...; acc[i] += w[g-1] x[g-1][i] for i < len, in that order. */
ALWAYS_INLINE void pass(double *restrict acc, const float *const *x, const double *w, int g,
                        ptrdiff_t len)
{
    ptrdiff_t i = 0;
    for (; i + LINE <= len; i += LINE) {
        if (i + AHEAD < len)
            for (int k = 0; k < g; k++) PREFETCH(x[k] + i + AHEAD);
        for (int l = 0; l < LINE; l++) {
            double a = acc[i + l];
            for (int k = 0; k < g; k++) a += w[k] * (double)x[k][i + l];
            acc[i + l] = a;
        }
    }
    for (; i < len; i++) {
        double a = acc[i];
        for (int k = 0; k < g; k++) a += w[k] * (double)x[k][i];
        acc[i] = a;
    }
}

/* out[0:m] = sum_j w[j] table[off[j] + lo : off[j] + lo + m], block coordinates at a time. */
ALWAYS_INLINE void sum_blocks(double *out, const float *table, const int64_t *off,
                              const double *w, ptrdiff_t n, ptrdiff_t lo, ptrdiff_t m,
                              ptrdiff_t block)
{
    memset(out, 0, (size_t)m * sizeof(double));
    for (ptrdiff_t b = 0; b < m; b += block) {
        ptrdiff_t len = m - b < block ? m - b : block;
        for (ptrdiff_t j = 0; j < n; j += GROUP) {
            int g = n - j < GROUP ? (int)(n - j) : GROUP;
            const float *x[GROUP];
            for (int k = 0; k < g; k++) x[k] = table + off[j + k] + lo + b;
            if (g == GROUP)
                pass(out + b, x, w + j, GROUP, len); /* constant g: unrolled, vectorised */
            else
                pass(out + b, x, w + j, g, len);
        }
    }
}

typedef void (*sum_fn)(double *, const float *, const int64_t *, const double *, ptrdiff_t,
                       ptrdiff_t, ptrdiff_t, ptrdiff_t);
typedef uint32_t (*read_fn)(const uint32_t *, ptrdiff_t);

/* OR of all words: reads memory as fast as a core can, for the bound in bench/update.py. */
ALWAYS_INLINE uint32_t or_words(const uint32_t *x, ptrdiff_t n)
{
    uint32_t s[4 * LINE] = {0}, r = 0;
    ptrdiff_t i = 0;
    for (; i + 4 * LINE <= n; i += 4 * LINE)
        for (int l = 0; l < 4 * LINE; l++) s[l] |= x[i + l];
    for (; i < n; i++) r |= x[i];
    for (int l = 0; l < 4 * LINE; l++) r |= s[l];
    return r;
}

static uint32_t read_baseline(const uint32_t *x, ptrdiff_t n) { return or_words(x, n); }

static void sum_baseline(double *out, const float *table, const int64_t *off, const double *w,
                         ptrdiff_t n, ptrdiff_t lo, ptrdiff_t m, ptrdiff_t block)
{
    sum_blocks(out, table, off, w, n, lo, m, block);
}

/* x86-64 baseline is SSE2 (2 doubles a vector, compute-bound here); AVX2 where the CPU has it.
   FMA stays off: target("avx2") does not enable it, and -ffp-contract=off forbids it anyway. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static void sum_avx2(double *out, const float *table,
                                                     const int64_t *off, const double *w,
                                                     ptrdiff_t n, ptrdiff_t lo, ptrdiff_t m,
                                                     ptrdiff_t block)
{
    sum_blocks(out, table, off, w, n, lo, m, block);
}

__attribute__((target("avx2"))) static uint32_t read_avx2(const uint32_t *x, ptrdiff_t n)
{
    return or_words(x, n);
}
#endif

static sum_fn widest = sum_baseline;
static read_fn widest_read = read_baseline;
static const char *widest_name = "baseline";

/* Get a C-contiguous 1-D buffer whose items have one of the struct formats in `fmts`. */
static int get_vector(PyObject *obj, Py_buffer *view, const char *fmts, Py_ssize_t itemsize,
                      int writable, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == (PY_LITTLE_ENDIAN ? '<' : '>')) f++; /* native order */
    if (view->ndim != 1 || view->itemsize != itemsize || strlen(f) != 1 || !strchr(fmts, *f)) {
        PyErr_Format(PyExc_TypeError, "%s must be a 1-D contiguous array of %s", name,
                     itemsize == 4 ? "float32" : (fmts[0] == 'd' ? "float64" : "int64"));
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Every slice table[off + lo : off + lo + m] must lie inside the table. */
static int check_offsets(const int64_t *off, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t m,
                         Py_ssize_t size)
{
    for (Py_ssize_t j = 0; j < n; j++)
        if (off[j] < 0 || off[j] > size - lo - m) {
            PyErr_Format(PyExc_ValueError,
                         "offset %lld of eps %zd: coordinates [%zd, %zd) run outside the "
                         "noise table of %zd values", (long long)off[j], j, lo, lo + m, size);
            return -1;
        }
    return 0;
}

static PyObject *weighted_sum(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"out", "table", "offsets", "weights", "lo", "block", "simd", NULL};
    PyObject *o_out, *o_table, *o_off, *o_w;
    Py_ssize_t lo, block;
    int simd = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOnn|p", names, &o_out, &o_table, &o_off,
                                     &o_w, &lo, &block, &simd))
        return NULL;
    if (lo < 0 || block < 1) {
        PyErr_Format(PyExc_ValueError, "need lo >= 0 and block >= 1, got %zd and %zd", lo, block);
        return NULL;
    }
    Py_buffer out, table, off, w;
    if (get_vector(o_out, &out, "d", 8, 1, "out") < 0) return NULL;
    if (get_vector(o_table, &table, "f", 4, 0, "table") < 0) goto fail_table;
    if (get_vector(o_off, &off, "lq", 8, 0, "offsets") < 0) goto fail_off;
    if (get_vector(o_w, &w, "d", 8, 0, "weights") < 0) goto fail_w;
    Py_ssize_t n = w.shape[0], m = out.shape[0];
    if (off.shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "%zd offsets but %zd weights", off.shape[0], n);
        goto fail;
    }
    if (check_offsets(off.buf, n, lo, m, table.shape[0]) < 0) goto fail;
    sum_fn fn = simd ? widest : sum_baseline;
    Py_BEGIN_ALLOW_THREADS
    fn(out.buf, table.buf, off.buf, w.buf, n, lo, m, block);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w);
    PyBuffer_Release(&off);
    PyBuffer_Release(&table);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&w);
fail_w:
    PyBuffer_Release(&off);
fail_off:
    PyBuffer_Release(&table);
fail_table:
    PyBuffer_Release(&out);
    return NULL;
}

static PyObject *stream_read(PyObject *self, PyObject *arg)
{
    Py_buffer x;
    if (get_vector(arg, &x, "f", 4, 0, "table") < 0) return NULL;
    uint32_t r;
    Py_BEGIN_ALLOW_THREADS
    r = widest_read(x.buf, x.shape[0]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    return PyLong_FromUnsignedLong(r);
}

PyDoc_STRVAR(weighted_sum_doc,
"weighted_sum(out, table, offsets, weights, lo, block, simd=True)\n--\n\n"
"out[i] = sum_j weights[j] * table[offsets[j] + lo + i] in float64, each i summed in order of\n"
"j, every product rounded before its add. out: float64 (written whole), table: float32,\n"
"offsets: int64, weights: float64, all 1-D and contiguous. block: coordinates per cache block.\n"
"simd=False runs the baseline instruction set instead of the widest (the same bits).");

static PyMethodDef methods[] = {
    {"weighted_sum", (PyCFunction)(void (*)(void))weighted_sum, METH_VARARGS | METH_KEYWORDS,
     weighted_sum_doc},
    {"stream_read", stream_read, METH_O,
     "stream_read(table) -> int: the OR of a float32 array's bits, read once at the speed of\n"
     "memory: the read bandwidth that bounds the noise sum (bench/update.py)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_noise_sum",
                                    "The fused noise-sum kernel behind es.weighted_noise_sum.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__noise_sum(void)
{
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        widest = sum_avx2;
        widest_read = read_avx2;
        widest_name = "avx2";
    }
#endif
    PyObject *mod = PyModule_Create(&module);
    if (mod && (PyModule_AddStringConstant(mod, "SIMD", widest_name) < 0 ||
                PyModule_AddIntConstant(mod, "GROUP", GROUP) < 0 ||
                PyModule_AddIntConstant(mod, "AHEAD", AHEAD) < 0)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
