/* Page checksums of a whole range in one call (vbp.pagesums).
 *
 * A page checksum is xxh3_64 of the 4 KiB page, 0 kept for "hole": a real page whose hash
 * is 0 is stored as 1 (vbp/chunkstore_common.py). The chunk store checks and computes
 * them for every read and write. From Python that is a call per page, and for 1 MiB the
 * 256 calls cost about a third as much again as the hashing itself; here the loop is in
 * C and the hashes go straight to or from the store's checksum table (a uint64 per page).
 *
 * xxh3 comes from Debian's libxxhash, through its dispatching entry point on x86-64 (the
 * widest vector unit the CPU has: AVX-512, AVX2 or SSE2, chosen at run time, as the
 * xxhash Python binding does). The Python binding offers no call for many buffers.
 *
 * The GIL is held: the callers run on the event loop and wait for the result anyway.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <xxhash.h>

#if defined(__x86_64__) && XXH_VERSION_NUMBER >= 800
#include <xxh_x86dispatch.h>
#define PAGE_HASH XXH3_64bits_dispatch
#else
#define PAGE_HASH XXH3_64bits
#endif

#define PAGE_SIZE 4096

/* The buffers of a call: `data` (whole pages) and the table `sums` (uint64 each), with
 * `first` its entry for data's first page. */
struct call {
    Py_buffer data, sums;
    Py_ssize_t pages;
    Py_ssize_t first;
};

static int
take(struct call *c, PyObject *const *args, Py_ssize_t nargs, int writable, const char *name)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s(data, sums, first) takes 3 arguments", name);
        return -1;
    }
    c->first = PyLong_AsSsize_t(args[2]);
    if (c->first == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[0], &c->data, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(args[1], &c->sums, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&c->data);
        return -1;
    }
    c->pages = c->data.len / PAGE_SIZE;
    if (c->data.len % PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes are not whole pages", name, c->data.len);
    } else if (c->sums.len % 8) {
        PyErr_Format(PyExc_ValueError, "%s: a table of %zd bytes is not of uint64s", name,
                     c->sums.len);
    } else if (c->first < 0 || c->first > c->sums.len / 8 - c->pages) {
        PyErr_Format(PyExc_ValueError, "%s: entries %zd..%zd are outside the table of %zd",
                     name, c->first, c->first + c->pages, c->sums.len / 8);
    } else {
        return 0;
    }
    PyBuffer_Release(&c->sums);
    PyBuffer_Release(&c->data);
    return -1;
}

static void
give_back(struct call *c)
{
    PyBuffer_Release(&c->sums);
    PyBuffer_Release(&c->data);
}

PyDoc_STRVAR(fill_doc,
"fill(data, sums, first)\n\n"
"sums[first + i] = the checksum of page i of data, for every page of data.");

static PyObject *
fill(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct call c;
    if (take(&c, args, nargs, 1, "fill") < 0)
        return NULL;
    const unsigned char *page = c.data.buf;
    uint64_t *sums = (uint64_t *)c.sums.buf + c.first;
    for (Py_ssize_t i = 0; i < c.pages; i++, page += PAGE_SIZE) {
        uint64_t h = PAGE_HASH(page, PAGE_SIZE);
        sums[i] = h ? h : 1;
    }
    give_back(&c);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(check_doc,
"check(data, sums, first) -> int\n\n"
"The index in data of its first page whose checksum is not sums[first + i], or -1 when\n"
"all match. A hole there (0) is not checked.");

static PyObject *
check(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct call c;
    Py_ssize_t bad = -1;
    if (take(&c, args, nargs, 0, "check") < 0)
        return NULL;
    const unsigned char *page = c.data.buf;
    const uint64_t *sums = (const uint64_t *)c.sums.buf + c.first;
    for (Py_ssize_t i = 0; i < c.pages; i++, page += PAGE_SIZE) {
        if (!sums[i])
            continue;
        uint64_t h = PAGE_HASH(page, PAGE_SIZE);
        if ((h ? h : 1) != sums[i]) {
            bad = i;
            break;
        }
    }
    give_back(&c);
    return PyLong_FromSsize_t(bad);
}

static PyMethodDef methods[] = {
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL, fill_doc},
    {"check", (PyCFunction)(void (*)(void))check, METH_FASTCALL, check_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vbp._pagesums",
    "Page checksums of a whole range in one call (see vbp.pagesums).", -1, methods,
};

PyMODINIT_FUNC
PyInit__pagesums(void)
{
    return PyModule_Create(&module);
}
