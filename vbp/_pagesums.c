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
 * fill and check hold the GIL: the callers run on the event loop and wait for the result
 * anyway. put (a large write: its pwrites, then its checksums) lets it go around its
 * system calls, as os.pwrite does around each. It writes in pieces only where the page
 * cache has a page of the range to make (vbp/chunkstore_files.py, WRITE_PIECE, says why).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>
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

/* sums[first + i] = the checksum of page i of data, for every page of the call's data */
static void
hash_pages(struct call *c)
{
    const unsigned char *page = c->data.buf;
    uint64_t *sums = (uint64_t *)c->sums.buf + c->first;
    for (Py_ssize_t i = 0; i < c->pages; i++, page += PAGE_SIZE) {
        uint64_t h = PAGE_HASH(page, PAGE_SIZE);
        sums[i] = h ? h : 1;
    }
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
    hash_pages(&c);
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

/* cachestat(2), Linux 6.5: how many pages of a range of a file are in the page cache.
 * Debian 12's kernel headers predate it; its number is 451 in the common system call
 * table (x86-64, arm64 and most others; alpha and mips have their own numbers, and there
 * the extension never asks). */
#if defined(__linux__) && !defined(__NR_cachestat) && (defined(__x86_64__) || defined(__aarch64__))
#define __NR_cachestat 451
#endif

struct range_of_file { uint64_t off, len; };
struct cache_stats { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

static int no_cachestat;  /* the kernel has none (ENOSYS), or a filter refuses it (EPERM):
                           * not asked again */

/* 1 when every page of len bytes at pos of fd is in the page cache; 0 when one is not,
 * or the kernel cannot say */
static int
all_cached(int fd, long long pos, Py_ssize_t len)
{
#ifdef __NR_cachestat
    struct range_of_file r = {(uint64_t)pos, (uint64_t)len};
    struct cache_stats st;
    if (no_cachestat || len <= 0 || pos < 0)
        return 0;
    if (syscall(__NR_cachestat, fd, &r, &st, 0) < 0) {
        if (errno == ENOSYS || errno == EPERM)
            no_cachestat = 1;
        return 0;
    }
    /* the pages the range touches, from the one pos is in to the one its last byte is in
     * (as the kernel counts them); a kernel of larger pages counts fewer, never passes */
    uint64_t pages = (((uint64_t)pos + (uint64_t)len - 1) / PAGE_SIZE) - ((uint64_t)pos / PAGE_SIZE) + 1;
    return st.nr_cache >= pages;
#else
    return 0;
#endif
}

PyDoc_STRVAR(put_doc,
"put(fd, data, pos, piece, sums, first) -> int\n\n"
"pwrite all of data (whole pages) at pos of fd, in pieces of at most piece bytes, then\n"
"fill(data, sums, first). When every page of the range is in the page cache already,\n"
"in one piece: the pieces only set the size of the cache's new folios. Returns the\n"
"piece it took. A failed pwrite raises OSError and fills nothing; an interrupted one\n"
"is taken up again (after the signal handlers, as os.pwrite does).");

static PyObject *
put(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct call c;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "put(fd, data, pos, piece, sums, first) takes 6 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    long long pos = PyLong_AsLongLong(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t piece = PyLong_AsSsize_t(args[3]);
    if (piece == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX || pos < 0 || piece <= 0) {
        PyErr_Format(PyExc_ValueError, "put: fd %ld, pos %lld and piece %zd", fd, pos, piece);
        return NULL;
    }
    PyObject *rest[3] = {args[1], args[4], args[5]};
    if (take(&c, rest, 3, 1, "put") < 0)
        return NULL;
    const char *buf = c.data.buf;
    Py_ssize_t len = c.data.len, done = 0;
    int err = 0;
    if (len > piece && all_cached((int)fd, pos, len))
        piece = len;
    while (done < len) {
        Py_ssize_t want = len - done < piece ? len - done : piece;
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = pwrite((int)fd, buf + done, (size_t)want, (off_t)(pos + done));
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    give_back(&c);
                    return NULL;
                }
                continue;
            }
            err = errno;
            break;
        }
        if (n == 0) {  /* (nothing written and no error: a file that takes no more) */
            err = EIO;
            break;
        }
        done += n;
    }
    if (err) {
        give_back(&c);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    hash_pages(&c);
    give_back(&c);
    return PyLong_FromSsize_t(piece);
}

static PyMethodDef methods[] = {
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL, fill_doc},
    {"check", (PyCFunction)(void (*)(void))check, METH_FASTCALL, check_doc},
    {"put", (PyCFunction)(void (*)(void))put, METH_FASTCALL, put_doc},
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
