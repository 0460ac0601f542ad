/* _atomics: sequentially consistent 64-bit atomics on a shared buffer, for shmmmu.
 *
 * One type, Words, wraps a buffer of uint64 words (a numpy view of the shared
 * region, an mmap).  Every method is METH_FASTCALL and checks its index, so a
 * bad index raises IndexError instead of touching memory outside the buffer.
 * Batch methods work on a run of words so range operations cost one call per
 * page table, not one per entry.
 */
#include "_atomics.h"
#include <sched.h>

static int
get_u64(PyObject *o, uint64_t *out)
{
    /* Accept any Python int (negative ones wrap modulo 2**64, for deltas) and numpy integers. */
    unsigned long long v;
    if (PyLong_Check(o)) {
        v = PyLong_AsUnsignedLongLongMask(o);
    } else {
        PyObject *i = PyNumber_Index(o);
        if (!i) return -1;
        v = PyLong_AsUnsignedLongLongMask(i);
        Py_DECREF(i);
    }
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

static int
get_index(Words *self, PyObject *o, Py_ssize_t *out)
{
    /* An exact int (every index the MMU computes) skips the __index__ protocol; an index too
       large for Py_ssize_t is out of range either way, so its OverflowError becomes IndexError. */
    Py_ssize_t i;
    if (PyLong_CheckExact(o)) {
        i = PyLong_AsSsize_t(o);
        if (i == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            PyErr_Format(PyExc_IndexError, "word index %R out of range [0, %zd)", o, self->n);
            return -1;
        }
    } else {
        i = PyNumber_AsSsize_t(o, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred()) return -1;
    }
    if (i < 0 || i >= self->n) {
        PyErr_Format(PyExc_IndexError, "word index %zd out of range [0, %zd)", i, self->n);
        return -1;
    }
    *out = i;
    return 0;
}

static int
get_run(Words *self, PyObject *so, PyObject *no, Py_ssize_t *start, Py_ssize_t *count)
{
    Py_ssize_t s = PyNumber_AsSsize_t(so, PyExc_IndexError);
    if (s == -1 && PyErr_Occurred()) return -1;
    Py_ssize_t c = PyNumber_AsSsize_t(no, PyExc_IndexError);
    if (c == -1 && PyErr_Occurred()) return -1;
    if (s < 0 || c < 0 || s > self->n || c > self->n - s) {
        PyErr_Format(PyExc_IndexError, "word run [%zd, %zd+%zd) out of range [0, %zd)", s, s, c, self->n);
        return -1;
    }
    *start = s;
    *count = c;
    return 0;
}

static int
check_args(Py_ssize_t nargs, Py_ssize_t want, const char *name)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

static int
check_writable(Words *self)
{
    if (self->readonly) {
        PyErr_SetString(PyExc_PermissionError, "these words are mapped read-only");
        return -1;
    }
    return 0;
}

/* An output array: a writable, C-contiguous buffer of at least n uint64 words. */
static int
get_out(PyObject *o, Py_ssize_t n, Py_buffer *b)
{
    if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->itemsize != 8 || b->len < n * 8) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "output needs at least %zd 8-byte items", n);
        return -1;
    }
    return 0;
}

static PyObject *
Words_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *buf;
    if (!PyArg_ParseTuple(args, "O:Words", &buf)) return NULL;
    Words *self = (Words *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    int rc = PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS);
    if (rc < 0) {
        PyErr_Clear();
        rc = PyObject_GetBuffer(buf, &self->view, PyBUF_C_CONTIGUOUS);
        self->readonly = 1;
    }
    if (rc < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->w = (uint64_t *)self->view.buf;
    self->n = self->view.len / 8;
    if (((uintptr_t)self->w & 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not 8-byte aligned");
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
Words_dealloc(Words *self)
{
    if (self->view.obj) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Words_len(Words *self, void *closure)
{
    return PyLong_FromSsize_t(self->n);
}

static PyObject *
Words_address(Words *self, void *closure)
{
    return PyLong_FromVoidPtr(self->w);
}

static PyObject *
Words_readonly(Words *self, void *closure)
{
    return PyBool_FromLong(self->readonly);
}

/* ---- single-word operations ---- */

static PyObject *
w_load(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    if (check_args(nargs, 1, "load") || get_index(self, args[0], &i)) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->w[i], SEQ));
}

static PyObject *
w_store(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    uint64_t v;
    if (check_args(nargs, 2, "store") || check_writable(self) || get_index(self, args[0], &i)
        || get_u64(args[1], &v)) return NULL;
    __atomic_store_n(&self->w[i], v, SEQ);
    Py_RETURN_NONE;
}

static PyObject *
w_cas(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    uint64_t old, new;
    if (check_args(nargs, 3, "cas") || check_writable(self) || get_index(self, args[0], &i)
        || get_u64(args[1], &old) || get_u64(args[2], &new)) return NULL;
    __atomic_compare_exchange_n(&self->w[i], &old, new, 0, SEQ, SEQ);
    return PyLong_FromUnsignedLongLong(old);   /* the value seen: == expected iff it succeeded */
}

#define RMW_OP(NAME, BUILTIN)                                                          \
static PyObject *                                                                      \
w_##NAME(Words *self, PyObject *const *args, Py_ssize_t nargs)                         \
{                                                                                      \
    Py_ssize_t i;                                                                      \
    uint64_t v;                                                                        \
    if (check_args(nargs, 2, #NAME) || check_writable(self) || get_index(self, args[0], &i) \
        || get_u64(args[1], &v)) return NULL;                                          \
    return PyLong_FromUnsignedLongLong(BUILTIN(&self->w[i], v, SEQ));                  \
}

RMW_OP(xchg, __atomic_exchange_n)
RMW_OP(fetch_add, __atomic_fetch_add)
RMW_OP(fetch_or, __atomic_fetch_or)
RMW_OP(fetch_and, __atomic_fetch_and)

/* ---- batch operations over a run of words ---- */

static PyObject *
w_load_range(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t s, c;
    Py_buffer out;
    if (check_args(nargs, 3, "load_range") || get_run(self, args[0], args[1], &s, &c)
        || get_out(args[2], c, &out)) return NULL;
    uint64_t *o = (uint64_t *)out.buf;
    for (Py_ssize_t k = 0; k < c; k++) o[k] = __atomic_load_n(&self->w[s + k], SEQ);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyObject *
w_fill_range(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t s, c;
    uint64_t v;
    if (check_args(nargs, 3, "fill_range") || check_writable(self)
        || get_run(self, args[0], args[1], &s, &c) || get_u64(args[2], &v)) return NULL;
    for (Py_ssize_t k = 0; k < c; k++) __atomic_store_n(&self->w[s + k], v, SEQ);
    Py_RETURN_NONE;
}

/* xchg_range(start, n, value, out): exchange n words to value, the old ones into out. */
static PyObject *
w_xchg_range(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t s, c;
    uint64_t v;
    Py_buffer out;
    if (check_args(nargs, 4, "xchg_range") || check_writable(self)
        || get_run(self, args[0], args[1], &s, &c) || get_u64(args[2], &v)
        || get_out(args[3], c, &out)) return NULL;
    uint64_t *o = (uint64_t *)out.buf;
    for (Py_ssize_t k = 0; k < c; k++) o[k] = __atomic_exchange_n(&self->w[s + k], v, SEQ);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* Atomic AND / OR of a mask into n words; returns how many words changed. */
#define RANGE_OP(NAME, BUILTIN, CHANGED)                                               \
static PyObject *                                                                      \
w_##NAME(Words *self, PyObject *const *args, Py_ssize_t nargs)                         \
{                                                                                      \
    Py_ssize_t s, c, changed = 0;                                                      \
    uint64_t m;                                                                        \
    if (check_args(nargs, 3, #NAME) || check_writable(self)                            \
        || get_run(self, args[0], args[1], &s, &c) || get_u64(args[2], &m)) return NULL; \
    for (Py_ssize_t k = 0; k < c; k++) {                                               \
        uint64_t old = BUILTIN(&self->w[s + k], m, SEQ);                               \
        changed += (CHANGED);                                                          \
    }                                                                                  \
    return PyLong_FromSsize_t(changed);                                                \
}

RANGE_OP(and_range, __atomic_fetch_and, (old & ~m) != 0)
RANGE_OP(or_range, __atomic_fetch_or, (~old & m) != 0)

/* clear_where(start, n, test_mask, test_value, clear_mask, out):
 * for each word whose (w & test_mask) == test_value and which has a bit of
 * clear_mask set, clear those bits with a compare-exchange loop (a word that
 * changes under us is re-tested).  Each changed word's old value goes to out[k]
 * (0 where unchanged).  Returns how many words changed.  This is the batch form
 * of "write-protect / clear D on the present leaves of one table". */
static PyObject *
w_clear_where(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t s, c, changed = 0;
    uint64_t tm, tv, cm;
    Py_buffer out;
    if (check_args(nargs, 6, "clear_where") || check_writable(self)
        || get_run(self, args[0], args[1], &s, &c) || get_u64(args[2], &tm)
        || get_u64(args[3], &tv) || get_u64(args[4], &cm) || get_out(args[5], c, &out)) return NULL;
    uint64_t *o = (uint64_t *)out.buf;
    for (Py_ssize_t k = 0; k < c; k++) {
        uint64_t *p = &self->w[s + k];
        uint64_t old = __atomic_load_n(p, SEQ);
        o[k] = 0;
        for (;;) {
            if ((old & tm) != tv || (old & cm) == 0) break;
            if (__atomic_compare_exchange_n(p, &old, old & ~cm, 0, SEQ, SEQ)) {
                o[k] = old;
                changed++;
                break;
            }
        }
    }
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(changed);
}

/* wait_while(i, value, spins): spin (then sched_yield) while w[i] == value, at most
 * `spins` rounds; returns the last value seen.  A bounded wait for a word another
 * process will change soon (a frozen SPTE, a flush acknowledgement). */
static PyObject *
w_wait_while(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    uint64_t v, spins;
    if (check_args(nargs, 3, "wait_while") || get_index(self, args[0], &i)
        || get_u64(args[1], &v) || get_u64(args[2], &spins)) return NULL;
    uint64_t cur = __atomic_load_n(&self->w[i], SEQ);
    for (uint64_t k = 0; cur == v && k < spins; k++) {
        if (k < 64) __builtin_ia32_pause();
        else sched_yield();
        cur = __atomic_load_n(&self->w[i], SEQ);
    }
    return PyLong_FromUnsignedLongLong(cur);
}

/* touch(start, n, write): nothing but the range check.  Code that reads or writes words in bulk through
 * numpy (a freed table poisoned, a host page moved, a checker's snapshot) says so here first, so that the
 * interleaving explorer, whose Words make this one scheduling point, sees the accesses it cannot see. */
static PyObject *
w_touch(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t s, c;
    if (check_args(nargs, 3, "touch") || get_run(self, args[0], args[1], &s, &c)) return NULL;
    if (PyObject_IsTrue(args[2]) && check_writable(self)) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
w_cpu_relax(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    __builtin_ia32_pause();
    Py_RETURN_NONE;
}

static PyObject *w_column(Words *self, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef Words_methods[] = {
    {"load", (PyCFunction)(void (*)(void))w_load, METH_FASTCALL, "load(i) -> value"},
    {"store", (PyCFunction)(void (*)(void))w_store, METH_FASTCALL, "store(i, value)"},
    {"cas", (PyCFunction)(void (*)(void))w_cas, METH_FASTCALL,
     "cas(i, expected, new) -> value seen (== expected iff the exchange happened)"},
    {"xchg", (PyCFunction)(void (*)(void))w_xchg, METH_FASTCALL, "xchg(i, value) -> old"},
    {"fetch_add", (PyCFunction)(void (*)(void))w_fetch_add, METH_FASTCALL, "fetch_add(i, delta) -> old"},
    {"fetch_or", (PyCFunction)(void (*)(void))w_fetch_or, METH_FASTCALL, "fetch_or(i, mask) -> old"},
    {"fetch_and", (PyCFunction)(void (*)(void))w_fetch_and, METH_FASTCALL, "fetch_and(i, mask) -> old"},
    {"load_range", (PyCFunction)(void (*)(void))w_load_range, METH_FASTCALL,
     "load_range(start, n, out): atomic loads of n words into out"},
    {"fill_range", (PyCFunction)(void (*)(void))w_fill_range, METH_FASTCALL,
     "fill_range(start, n, value): atomic stores of value into n words"},
    {"xchg_range", (PyCFunction)(void (*)(void))w_xchg_range, METH_FASTCALL,
     "xchg_range(start, n, value, out): exchange n words to value, old values into out"},
    {"and_range", (PyCFunction)(void (*)(void))w_and_range, METH_FASTCALL,
     "and_range(start, n, mask) -> words changed"},
    {"or_range", (PyCFunction)(void (*)(void))w_or_range, METH_FASTCALL,
     "or_range(start, n, mask) -> words changed"},
    {"clear_where", (PyCFunction)(void (*)(void))w_clear_where, METH_FASTCALL,
     "clear_where(start, n, test_mask, test_value, clear_mask, out) -> words changed"},
    {"wait_while", (PyCFunction)(void (*)(void))w_wait_while, METH_FASTCALL,
     "wait_while(i, value, spins) -> last value seen"},
    {"touch", (PyCFunction)(void (*)(void))w_touch, METH_FASTCALL,
     "touch(start, n, write): declare a bulk access made through numpy (the explorer's point)"},
    {"column", (PyCFunction)(void (*)(void))w_column, METH_FASTCALL,
     "column(width, field) -> Column: that field of every row of `width` words"},
    {NULL}
};

static PyGetSetDef Words_getset[] = {
    {"n", (getter)Words_len, NULL, "number of words", NULL},
    {"address", (getter)Words_address, NULL, "address of word 0", NULL},
    {"readonly", (getter)Words_readonly, NULL, "True if the buffer is read-only", NULL},
    {NULL}
};

static Py_ssize_t
Words_sq_len(Words *self)
{
    return self->n;
}

static PySequenceMethods Words_as_sequence = {
    .sq_length = (lenfunc)Words_sq_len,
};

PyTypeObject WordsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._atomics.Words",
    .tp_basicsize = sizeof(Words),
    .tp_dealloc = (destructor)Words_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Words(buffer): sequentially consistent atomic access to a buffer of uint64 words.",
    .tp_methods = Words_methods,
    .tp_getset = Words_getset,
    .tp_as_sequence = &Words_as_sequence,
    .tp_new = Words_new,
};

/* ---- Column: one field of every row of a section (word = row * width + field) ----
 *
 * Rows are laid out row-major in a section (shmmmu.layout): a Column names one of their words, so code
 * says `tmeta.level.load(table)` instead of computing `table * TMeta.WORDS + TMeta.LEVEL` by hand, and
 * the multiplication happens here, for nothing.  It keeps its Words (and so the buffer) alive. */

typedef struct {
    PyObject_HEAD
    Words *words;
    uint64_t *w;            /* &words->w[field] */
    Py_ssize_t width;
    Py_ssize_t field;
    Py_ssize_t rows;
    int readonly;
} Column;

static PyTypeObject ColumnType;

static int
col_index(Column *self, PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t i;
    if (PyLong_CheckExact(o)) {
        i = PyLong_AsSsize_t(o);
        if (i == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            PyErr_Format(PyExc_IndexError, "row %R out of range [0, %zd)", o, self->rows);
            return -1;
        }
    } else {
        i = PyNumber_AsSsize_t(o, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred()) return -1;
    }
    if (i < 0 || i >= self->rows) {
        PyErr_Format(PyExc_IndexError, "row %zd out of range [0, %zd)", i, self->rows);
        return -1;
    }
    *out = i * self->width;
    return 0;
}

static int
col_writable(Column *self)
{
    if (self->readonly) {
        PyErr_SetString(PyExc_PermissionError, "these words are mapped read-only");
        return -1;
    }
    return 0;
}

/* Words.column(width, field): the field of every row of `width` words */
static PyObject *
w_column(Words *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_args(nargs, 2, "column")) return NULL;
    Py_ssize_t width = PyNumber_AsSsize_t(args[0], PyExc_ValueError);
    if (width == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t field = PyNumber_AsSsize_t(args[1], PyExc_ValueError);
    if (field == -1 && PyErr_Occurred()) return NULL;
    if (width < 1 || field < 0 || field >= width) {
        PyErr_Format(PyExc_ValueError, "column: field %zd of rows of %zd words", field, width);
        return NULL;
    }
    Column *c = PyObject_New(Column, &ColumnType);
    if (!c) return NULL;
    Py_INCREF(self);
    c->words = self;
    c->w = self->w + field;
    c->width = width;
    c->field = field;
    c->rows = self->n / width;
    c->readonly = self->readonly;
    return (PyObject *)c;
}

static void
Column_dealloc(Column *self)
{
    Py_XDECREF(self->words);
    PyObject_Free(self);
}

static PyObject *
c_load(Column *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    if (check_args(nargs, 1, "load") || col_index(self, args[0], &i)) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->w[i], SEQ));
}

static PyObject *
c_store(Column *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    uint64_t v;
    if (check_args(nargs, 2, "store") || col_writable(self) || col_index(self, args[0], &i)
        || get_u64(args[1], &v)) return NULL;
    __atomic_store_n(&self->w[i], v, SEQ);
    Py_RETURN_NONE;
}

static PyObject *
c_cas(Column *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    uint64_t old, new;
    if (check_args(nargs, 3, "cas") || col_writable(self) || col_index(self, args[0], &i)
        || get_u64(args[1], &old) || get_u64(args[2], &new)) return NULL;
    __atomic_compare_exchange_n(&self->w[i], &old, new, 0, SEQ, SEQ);
    return PyLong_FromUnsignedLongLong(old);
}

#define COL_RMW_OP(NAME, BUILTIN)                                                      \
static PyObject *                                                                      \
c_##NAME(Column *self, PyObject *const *args, Py_ssize_t nargs)                        \
{                                                                                      \
    Py_ssize_t i;                                                                      \
    uint64_t v;                                                                        \
    if (check_args(nargs, 2, #NAME) || col_writable(self) || col_index(self, args[0], &i) \
        || get_u64(args[1], &v)) return NULL;                                          \
    return PyLong_FromUnsignedLongLong(BUILTIN(&self->w[i], v, SEQ));                  \
}

COL_RMW_OP(xchg, __atomic_exchange_n)
COL_RMW_OP(fetch_add, __atomic_fetch_add)
COL_RMW_OP(fetch_or, __atomic_fetch_or)
COL_RMW_OP(fetch_and, __atomic_fetch_and)

static PyObject *
c_word(Column *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    if (check_args(nargs, 1, "word") || col_index(self, args[0], &i)) return NULL;
    return PyLong_FromSsize_t(i + self->field);
}

static PyMethodDef Column_methods[] = {
    {"load", (PyCFunction)(void (*)(void))c_load, METH_FASTCALL, "load(row) -> value"},
    {"store", (PyCFunction)(void (*)(void))c_store, METH_FASTCALL, "store(row, value)"},
    {"cas", (PyCFunction)(void (*)(void))c_cas, METH_FASTCALL, "cas(row, expected, new) -> value seen"},
    {"xchg", (PyCFunction)(void (*)(void))c_xchg, METH_FASTCALL, "xchg(row, value) -> old"},
    {"fetch_add", (PyCFunction)(void (*)(void))c_fetch_add, METH_FASTCALL, "fetch_add(row, delta) -> old"},
    {"fetch_or", (PyCFunction)(void (*)(void))c_fetch_or, METH_FASTCALL, "fetch_or(row, mask) -> old"},
    {"fetch_and", (PyCFunction)(void (*)(void))c_fetch_and, METH_FASTCALL, "fetch_and(row, mask) -> old"},
    {"word", (PyCFunction)(void (*)(void))c_word, METH_FASTCALL, "word(row) -> the section's word index"},
    {NULL}
};

static PyObject *
Column_rows(Column *self, void *closure)
{
    return PyLong_FromSsize_t(self->rows);
}

static PyObject *
Column_width(Column *self, void *closure)
{
    return PyLong_FromSsize_t(self->width);
}

static PyObject *
Column_field(Column *self, void *closure)
{
    return PyLong_FromSsize_t(self->field);
}

static PyGetSetDef Column_getset[] = {
    {"rows", (getter)Column_rows, NULL, "number of rows", NULL},
    {"width", (getter)Column_width, NULL, "words per row", NULL},
    {"field", (getter)Column_field, NULL, "the field's offset in its row", NULL},
    {NULL}
};

static PyTypeObject ColumnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._atomics.Column",
    .tp_basicsize = sizeof(Column),
    .tp_dealloc = (destructor)Column_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A field of every row of a section: Words.column(width, field).",
    .tp_methods = Column_methods,
    .tp_getset = Column_getset,
};

static PyMethodDef module_methods[] = {
    {"cpu_relax", (PyCFunction)(void (*)(void))w_cpu_relax, METH_FASTCALL, "one pause instruction"},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_atomics", "Sequentially consistent 64-bit atomics on shared buffers.", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__atomics(void)
{
    if (PyType_Ready(&WordsType) < 0 || PyType_Ready(&ColumnType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&WordsType);
    if (PyModule_AddObject(m, "Words", (PyObject *)&WordsType) < 0) {
        Py_DECREF(&WordsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ColumnType);
    if (PyModule_AddObject(m, "Column", (PyObject *)&ColumnType) < 0) {
        Py_DECREF(&ColumnType);
        Py_DECREF(m);
        return NULL;
    }
    if (shmmmu_add_lock_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
