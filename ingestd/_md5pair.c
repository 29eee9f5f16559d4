/* Two MD5s over the same bytes in one pass: the whole file's and the current block's.
 *
 * ingestd stores the whole file's MD5 on every blob (Content-MD5) and sends each
 * block with its own MD5; both are MD5s of the same bytes, from different starting
 * points. One MD5 is a chain of dependent steps, so a core runs it far below its
 * width; running the two chains interleaved in one loop fills the idle slots and
 * costs about what one OpenSSL MD5 pass costs. Figures: bench/RESULTS.md.
 * The MD5 steps are RFC 1321's, written as in its reference
 * implementation; tests/test_perf_units.py checks every digest against hashlib.
 *
 * Optional: ingestd/md5pair.py falls back to two hashlib objects when this module
 * is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define H(x, y, z) ((x) ^ (y) ^ (z))
#define I(x, y, z) ((y) ^ ((x) | ~(z)))
#define ROTL(x, s) (((x) << (s)) | ((x) >> (32 - (s))))
/* One MD5 step on both chains (lower case: chain 1, upper case: chain 2). */
#define STEP2(f, a, b, c, d, A, B, C, D, x, t, s) \
    a += f(b, c, d) + (x) + (t);                  \
    A += f(B, C, D) + (x) + (t);                  \
    a = ROTL(a, s);                               \
    A = ROTL(A, s);                               \
    a += b;                                       \
    A += B;

static const uint32_t MD5_INIT[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};

static inline uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* Run both states over ``nblocks`` 64-byte blocks at ``p``. */
static void md5x2_blocks(uint32_t *s1, uint32_t *s2, const unsigned char *p, size_t nblocks) {
    uint32_t a = s1[0], b = s1[1], c = s1[2], d = s1[3];
    uint32_t A = s2[0], B = s2[1], C = s2[2], D = s2[3];
    while (nblocks--) {
        uint32_t X[16];
        for (int i = 0; i < 16; i++) X[i] = le32(p + 4 * i);
        uint32_t sa = a, sb = b, sc = c, sd = d, SA = A, SB = B, SC = C, SD = D;
        STEP2(F, a, b, c, d, A, B, C, D, X[0], 0xd76aa478, 7)
        STEP2(F, d, a, b, c, D, A, B, C, X[1], 0xe8c7b756, 12)
        STEP2(F, c, d, a, b, C, D, A, B, X[2], 0x242070db, 17)
        STEP2(F, b, c, d, a, B, C, D, A, X[3], 0xc1bdceee, 22)
        STEP2(F, a, b, c, d, A, B, C, D, X[4], 0xf57c0faf, 7)
        STEP2(F, d, a, b, c, D, A, B, C, X[5], 0x4787c62a, 12)
        STEP2(F, c, d, a, b, C, D, A, B, X[6], 0xa8304613, 17)
        STEP2(F, b, c, d, a, B, C, D, A, X[7], 0xfd469501, 22)
        STEP2(F, a, b, c, d, A, B, C, D, X[8], 0x698098d8, 7)
        STEP2(F, d, a, b, c, D, A, B, C, X[9], 0x8b44f7af, 12)
        STEP2(F, c, d, a, b, C, D, A, B, X[10], 0xffff5bb1, 17)
        STEP2(F, b, c, d, a, B, C, D, A, X[11], 0x895cd7be, 22)
        STEP2(F, a, b, c, d, A, B, C, D, X[12], 0x6b901122, 7)
        STEP2(F, d, a, b, c, D, A, B, C, X[13], 0xfd987193, 12)
        STEP2(F, c, d, a, b, C, D, A, B, X[14], 0xa679438e, 17)
        STEP2(F, b, c, d, a, B, C, D, A, X[15], 0x49b40821, 22)
        STEP2(G, a, b, c, d, A, B, C, D, X[1], 0xf61e2562, 5)
        STEP2(G, d, a, b, c, D, A, B, C, X[6], 0xc040b340, 9)
        STEP2(G, c, d, a, b, C, D, A, B, X[11], 0x265e5a51, 14)
        STEP2(G, b, c, d, a, B, C, D, A, X[0], 0xe9b6c7aa, 20)
        STEP2(G, a, b, c, d, A, B, C, D, X[5], 0xd62f105d, 5)
        STEP2(G, d, a, b, c, D, A, B, C, X[10], 0x02441453, 9)
        STEP2(G, c, d, a, b, C, D, A, B, X[15], 0xd8a1e681, 14)
        STEP2(G, b, c, d, a, B, C, D, A, X[4], 0xe7d3fbc8, 20)
        STEP2(G, a, b, c, d, A, B, C, D, X[9], 0x21e1cde6, 5)
        STEP2(G, d, a, b, c, D, A, B, C, X[14], 0xc33707d6, 9)
        STEP2(G, c, d, a, b, C, D, A, B, X[3], 0xf4d50d87, 14)
        STEP2(G, b, c, d, a, B, C, D, A, X[8], 0x455a14ed, 20)
        STEP2(G, a, b, c, d, A, B, C, D, X[13], 0xa9e3e905, 5)
        STEP2(G, d, a, b, c, D, A, B, C, X[2], 0xfcefa3f8, 9)
        STEP2(G, c, d, a, b, C, D, A, B, X[7], 0x676f02d9, 14)
        STEP2(G, b, c, d, a, B, C, D, A, X[12], 0x8d2a4c8a, 20)
        STEP2(H, a, b, c, d, A, B, C, D, X[5], 0xfffa3942, 4)
        STEP2(H, d, a, b, c, D, A, B, C, X[8], 0x8771f681, 11)
        STEP2(H, c, d, a, b, C, D, A, B, X[11], 0x6d9d6122, 16)
        STEP2(H, b, c, d, a, B, C, D, A, X[14], 0xfde5380c, 23)
        STEP2(H, a, b, c, d, A, B, C, D, X[1], 0xa4beea44, 4)
        STEP2(H, d, a, b, c, D, A, B, C, X[4], 0x4bdecfa9, 11)
        STEP2(H, c, d, a, b, C, D, A, B, X[7], 0xf6bb4b60, 16)
        STEP2(H, b, c, d, a, B, C, D, A, X[10], 0xbebfbc70, 23)
        STEP2(H, a, b, c, d, A, B, C, D, X[13], 0x289b7ec6, 4)
        STEP2(H, d, a, b, c, D, A, B, C, X[0], 0xeaa127fa, 11)
        STEP2(H, c, d, a, b, C, D, A, B, X[3], 0xd4ef3085, 16)
        STEP2(H, b, c, d, a, B, C, D, A, X[6], 0x04881d05, 23)
        STEP2(H, a, b, c, d, A, B, C, D, X[9], 0xd9d4d039, 4)
        STEP2(H, d, a, b, c, D, A, B, C, X[12], 0xe6db99e5, 11)
        STEP2(H, c, d, a, b, C, D, A, B, X[15], 0x1fa27cf8, 16)
        STEP2(H, b, c, d, a, B, C, D, A, X[2], 0xc4ac5665, 23)
        STEP2(I, a, b, c, d, A, B, C, D, X[0], 0xf4292244, 6)
        STEP2(I, d, a, b, c, D, A, B, C, X[7], 0x432aff97, 10)
        STEP2(I, c, d, a, b, C, D, A, B, X[14], 0xab9423a7, 15)
        STEP2(I, b, c, d, a, B, C, D, A, X[5], 0xfc93a039, 21)
        STEP2(I, a, b, c, d, A, B, C, D, X[12], 0x655b59c3, 6)
        STEP2(I, d, a, b, c, D, A, B, C, X[3], 0x8f0ccc92, 10)
        STEP2(I, c, d, a, b, C, D, A, B, X[10], 0xffeff47d, 15)
        STEP2(I, b, c, d, a, B, C, D, A, X[1], 0x85845dd1, 21)
        STEP2(I, a, b, c, d, A, B, C, D, X[8], 0x6fa87e4f, 6)
        STEP2(I, d, a, b, c, D, A, B, C, X[15], 0xfe2ce6e0, 10)
        STEP2(I, c, d, a, b, C, D, A, B, X[6], 0xa3014314, 15)
        STEP2(I, b, c, d, a, B, C, D, A, X[13], 0x4e0811a1, 21)
        STEP2(I, a, b, c, d, A, B, C, D, X[4], 0xf7537e82, 6)
        STEP2(I, d, a, b, c, D, A, B, C, X[11], 0xbd3af235, 10)
        STEP2(I, c, d, a, b, C, D, A, B, X[2], 0x2ad7d2bb, 15)
        STEP2(I, b, c, d, a, B, C, D, A, X[9], 0xeb86d391, 21)
        a += sa; b += sb; c += sc; d += sd;
        A += SA; B += SB; C += SC; D += SD;
        p += 64;
    }
    s1[0] = a; s1[1] = b; s1[2] = c; s1[3] = d;
    s2[0] = A; s2[1] = B; s2[2] = C; s2[3] = D;
}

/* The digest of a chain at ``state`` after ``length`` bytes, ``tail`` (length % 64
 * bytes) not yet processed. ``state`` is not changed. */
static void md5_final(const uint32_t *state, uint64_t length, const unsigned char *tail,
                      unsigned char *out) {
    unsigned char pad[128];
    size_t used = (size_t)(length % 64);
    size_t total = used < 56 ? 64 : 128;
    uint32_t s[4], scratch[4];
    memcpy(s, state, sizeof s);
    memcpy(scratch, state, sizeof scratch);
    memset(pad, 0, sizeof pad);
    memcpy(pad, tail, used);
    pad[used] = 0x80;
    uint64_t bits = length * 8;
    for (int i = 0; i < 8; i++) pad[total - 8 + i] = (unsigned char)(bits >> (8 * i));
    md5x2_blocks(s, scratch, pad, total / 64);
    for (int i = 0; i < 4; i++) {
        out[4 * i] = (unsigned char)s[i];
        out[4 * i + 1] = (unsigned char)(s[i] >> 8);
        out[4 * i + 2] = (unsigned char)(s[i] >> 16);
        out[4 * i + 3] = (unsigned char)(s[i] >> 24);
    }
}

typedef struct {
    PyObject_HEAD
    uint32_t whole[4];
    uint32_t block[4];
    uint64_t whole_len;
    uint64_t block_len;
    unsigned char tail[64]; /* bytes not yet processed; the same for both chains */
    int closed;             /* a block ended off a 64-byte boundary: no more input */
    int busy;               /* update() is running with the GIL released */
} Pair;

static int Pair_init(Pair *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist)) return -1;
    memcpy(self->whole, MD5_INIT, sizeof self->whole);
    memcpy(self->block, MD5_INIT, sizeof self->block);
    self->whole_len = self->block_len = 0;
    self->closed = self->busy = 0;
    return 0;
}

#define RELEASE_GIL_FROM 4096

static PyObject *Pair_update(Pair *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (self->busy) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "Pair.update called from two threads at once");
        return NULL;
    }
    if (self->closed && view.len > 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError,
                        "a block ended off a 64-byte boundary: only digest() may follow");
        return NULL;
    }
    const unsigned char *p = view.buf;
    size_t n = (size_t)view.len;
    size_t used = (size_t)(self->whole_len % 64);
    self->whole_len += n;
    self->block_len += n;
    if (used) {
        size_t take = 64 - used < n ? 64 - used : n;
        memcpy(self->tail + used, p, take);
        p += take;
        n -= take;
        if (used + take == 64) md5x2_blocks(self->whole, self->block, self->tail, 1);
    }
    size_t blocks = n / 64;
    if (blocks) {
        if (n >= RELEASE_GIL_FROM) {
            self->busy = 1;
            Py_BEGIN_ALLOW_THREADS
            md5x2_blocks(self->whole, self->block, p, blocks);
            Py_END_ALLOW_THREADS
            self->busy = 0;
        } else {
            md5x2_blocks(self->whole, self->block, p, blocks);
        }
        p += blocks * 64;
        n -= blocks * 64;
    }
    if (n) memcpy(self->tail, p, n);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *Pair_split(Pair *self, PyObject *Py_UNUSED(ignored)) {
    unsigned char out[16];
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Pair.split called during update");
        return NULL;
    }
    md5_final(self->block, self->block_len, self->tail, out);
    if (self->block_len % 64) self->closed = 1; /* the chains no longer share a tail */
    memcpy(self->block, MD5_INIT, sizeof self->block);
    self->block_len = 0;
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *Pair_digest(Pair *self, PyObject *Py_UNUSED(ignored)) {
    unsigned char out[16];
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Pair.digest called during update");
        return NULL;
    }
    md5_final(self->whole, self->whole_len, self->tail, out);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyMethodDef Pair_methods[] = {
    {"update", (PyCFunction)Pair_update, METH_O,
     "Feed bytes to both MD5s (the whole file's and the current block's)."},
    {"split", (PyCFunction)Pair_split, METH_NOARGS,
     "The current block's MD5; the next bytes start a new block."},
    {"digest", (PyCFunction)Pair_digest, METH_NOARGS, "The MD5 of every byte fed so far."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PairType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ingestd._md5pair.Pair",
    .tp_doc = "The whole file's MD5 and its current block's, computed in one pass.",
    .tp_basicsize = sizeof(Pair),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pair_init,
    .tp_methods = Pair_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_md5pair",
    "Two MD5s over the same bytes in one interleaved pass (see ingestd/md5pair.py).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__md5pair(void) {
    if (PyType_Ready(&PairType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&PairType);
    if (PyModule_AddObject(m, "Pair", (PyObject *)&PairType) < 0) {
        Py_DECREF(&PairType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
