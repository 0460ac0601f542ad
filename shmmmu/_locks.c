/* _locks: the uncontended fast paths of the qrwlock and of the RCU read side, in C.
 *
 * kernel/locking/qrwlock.c and kernel/rcu are not KVM's code, and each fast path
 * is one or two atomics on words of the region: as Python methods their call
 * overhead was a tenth of a page fault.  Two base types carry them:
 *
 *   QrwlockFast  read_lock, read_unlock, write_lock, write_unlock, _add_reader_bias; members mode,
 *                read_acquired, write_acquired.  Contention goes back to Python:
 *                _read_contended(), _write_slowpath(), _wake(readers, writer),
 *                _unlock_unheld(mode).
 *   RcuReadFast  read_lock, read_unlock; member nesting.  An unbalanced unlock
 *                calls _unbalanced().
 *
 * shmmmu.rwlock.RWLock and shmmmu.rcu.Rcu derive from them and bind the words
 * with _bind_fast().  Their Python references (RWLockReference, RcuReference:
 * the explorer, whose every word operation is a scheduling point, and the
 * busted torture lock) override these methods step for step, and
 * tests/test_rwlock.py and tests/test_rcu.py hold the two equal.
 */
#include "_atomics.h"
#include <structmember.h>

#define QW_LOCKED 0xFFULL
#define QW_WAITING 0x100ULL
#define QW_WMASK 0x1FFULL
#define QR_BIAS 0x200ULL
#define HELD_NONE 0
#define HELD_READ 1
#define HELD_WRITE 2

static PyObject *s_read_contended, *s_write_slowpath, *s_wake, *s_unlock_unheld, *s_unbalanced;

static int
bind_index(Words *w, PyObject *o, Py_ssize_t *out, const char *what)
{
    Py_ssize_t i = PyNumber_AsSsize_t(o, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return -1;
    if (i < 0 || i >= w->n) {
        PyErr_Format(PyExc_IndexError, "%s word %zd out of range [0, %zd)", what, i, w->n);
        return -1;
    }
    *out = i;
    return 0;
}

static int
bind_words(PyObject *o, Words **out, const char *what)
{
    if (!Py_IS_TYPE(o, &WordsType)) {
        PyErr_Format(PyExc_TypeError, "%s must be shmmmu._atomics.Words, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    if (((Words *)o)->readonly) {
        PyErr_Format(PyExc_PermissionError, "%s are mapped read-only", what);
        return -1;
    }
    Py_INCREF(o);
    Py_XSETREF(*out, (Words *)o);
    return 0;
}

static PyObject *
not_bound(void)
{
    PyErr_SetString(PyExc_RuntimeError, "the fast path has no words bound (_bind_fast was not called)");
    return NULL;
}

/* ---------------------------------------------------------------- QrwlockFast */

typedef struct {
    PyObject_HEAD
    Words *locks;
    Words *ws;
    Py_ssize_t cnts, writer, rsleep, wsleep, held;
    uint64_t worker1;                 /* worker + 1: the WRITER record */
    int mode;
    long long read_acquired;
    long long write_acquired;
} Qrwlock;

static void
Qrwlock_dealloc(Qrwlock *self)
{
    Py_CLEAR(self->locks);
    Py_CLEAR(self->ws);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _bind_fast(locks, ws, base, held_word, worker, cnts, writer, rsleep, wsleep): the lock block's words */
static PyObject *
Qrwlock_bind(Qrwlock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "_bind_fast(locks, ws, held_word, worker, cnts, writer, rsleep, wsleep)");
        return NULL;
    }
    if (bind_words(args[0], &self->locks, "the lock words") < 0 || bind_words(args[1], &self->ws, "the worker rows") < 0)
        return NULL;
    Py_ssize_t worker = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (worker == -1 && PyErr_Occurred()) return NULL;
    if (bind_index(self->ws, args[2], &self->held, "held record") < 0
        || bind_index(self->locks, args[4], &self->cnts, "cnts") < 0
        || bind_index(self->locks, args[5], &self->writer, "writer") < 0
        || bind_index(self->locks, args[6], &self->rsleep, "rsleep") < 0
        || bind_index(self->locks, args[7], &self->wsleep, "wsleep") < 0)
        return NULL;
    self->worker1 = (uint64_t)worker + 1;
    Py_RETURN_NONE;
}

/* The lock and RCU calls are METH_FASTCALL with no arguments, not METH_NOARGS: Python 3.11 specializes the call
   of a bound FASTCALL builtin (the fault path binds them once), not that of a bound NOARGS one. */
static PyObject *
takes_no_arguments(const char *name)
{
    PyErr_Format(PyExc_TypeError, "%s() takes no arguments", name);
    return NULL;
}

/* queued_read_lock(): one fetch_add; a writer present or waiting: back out at once (the slow path's first
 * step, here so that no process dies with its bias in and unrecorded while Python runs), then
 * _read_contended(the count after the back-out) queues */
static PyObject *
Qrwlock_read_lock(Qrwlock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("read_lock");
    if (!self->locks) return not_bound();
    uint64_t old = __atomic_fetch_add(&self->locks->w[self->cnts], QR_BIAS, SEQ);
    if (old & QW_WMASK) {
        uint64_t out = __atomic_fetch_sub(&self->locks->w[self->cnts], QR_BIAS, SEQ) - QR_BIAS;
        PyObject *arg = PyLong_FromUnsignedLongLong(out);
        if (!arg) return NULL;
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_read_contended, arg);
        Py_DECREF(arg);
        return r;
    }
    self->mode = HELD_READ;
    __atomic_store_n(&self->ws->w[self->held], (uint64_t)HELD_READ, SEQ);
    self->read_acquired++;
    Py_RETURN_NONE;
}

/* _add_reader_bias(): the slow path's reader bias and its hold record, in one call, so that a process killed
 * between the two is no likelier than one killed inside the fast path's (queued_read_lock_slowpath's
 * atomic_add_return_acquire(_QR_BIAS)) */
static PyObject *
Qrwlock_add_reader_bias(Qrwlock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("_add_reader_bias");
    if (!self->locks) return not_bound();
    __atomic_fetch_add(&self->locks->w[self->cnts], QR_BIAS, SEQ);
    __atomic_store_n(&self->ws->w[self->held], (uint64_t)HELD_READ, SEQ);
    Py_RETURN_NONE;
}

static PyObject *
unlock_unheld(Qrwlock *self, int mode)
{
    PyObject *m = PyLong_FromLong(mode);
    if (!m) return NULL;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_unlock_unheld, m);
    Py_DECREF(m);
    return r;
}

static PyObject *
wake(Qrwlock *self, int readers, int writer)
{
    return PyObject_CallMethodObjArgs((PyObject *)self, s_wake, readers ? Py_True : Py_False,
                                      writer ? Py_True : Py_False, NULL);
}

/* queued_read_unlock(): the last reader out wakes a writer asleep waiting for readers to drain */
static PyObject *
Qrwlock_read_unlock(Qrwlock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("read_unlock");
    if (!self->locks) return not_bound();
    if (self->mode != HELD_READ) return unlock_unheld(self, HELD_READ);
    self->mode = HELD_NONE;
    __atomic_store_n(&self->ws->w[self->held], (uint64_t)HELD_NONE, SEQ);
    uint64_t *w = self->locks->w;
    uint64_t old = __atomic_fetch_sub(&w[self->cnts], QR_BIAS, SEQ);
    if (old - QR_BIAS == QW_WAITING && __atomic_load_n(&w[self->wsleep], SEQ))
        return wake(self, 0, 1);
    Py_RETURN_NONE;
}

/* queued_write_lock(): one cmpxchg 0 -> LOCKED; otherwise _write_slowpath() */
static PyObject *
Qrwlock_write_lock(Qrwlock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("write_lock");
    if (!self->locks) return not_bound();
    uint64_t *w = self->locks->w;
    uint64_t expect = 0;
    if (!__atomic_compare_exchange_n(&w[self->cnts], &expect, QW_LOCKED, 0, SEQ, SEQ)) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_write_slowpath);
        if (!r) return NULL;
        Py_DECREF(r);
    }
    self->mode = HELD_WRITE;
    __atomic_store_n(&w[self->writer], self->worker1, SEQ);
    __atomic_store_n(&self->ws->w[self->held], (uint64_t)HELD_WRITE, SEQ);
    self->write_acquired++;
    Py_RETURN_NONE;
}

/* queued_write_unlock(): clear the writer byte, then wake sleeping readers and a queued writer */
static PyObject *
Qrwlock_write_unlock(Qrwlock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("write_unlock");
    if (!self->locks) return not_bound();
    if (self->mode != HELD_WRITE) return unlock_unheld(self, HELD_WRITE);
    self->mode = HELD_NONE;
    uint64_t *w = self->locks->w;
    __atomic_store_n(&self->ws->w[self->held], (uint64_t)HELD_NONE, SEQ);
    __atomic_store_n(&w[self->writer], (uint64_t)0, SEQ);
    uint64_t old = __atomic_fetch_sub(&w[self->cnts], QW_LOCKED, SEQ);
    int readers = __atomic_load_n(&w[self->rsleep], SEQ) != 0;
    int writer = (old & QW_WAITING) && __atomic_load_n(&w[self->wsleep], SEQ);
    if (readers || writer) return wake(self, readers, writer);
    Py_RETURN_NONE;
}

static PyMethodDef Qrwlock_methods[] = {
    {"_bind_fast", (PyCFunction)(void (*)(void))Qrwlock_bind, METH_FASTCALL,
     "_bind_fast(locks, ws, held_word, worker, cnts, writer, rsleep, wsleep)"},
    {"read_lock", (PyCFunction)(void (*)(void))Qrwlock_read_lock, METH_FASTCALL, "read_lock(mmu_lock)"},
    {"read_unlock", (PyCFunction)(void (*)(void))Qrwlock_read_unlock, METH_FASTCALL, "read_unlock(mmu_lock)"},
    {"_add_reader_bias", (PyCFunction)(void (*)(void))Qrwlock_add_reader_bias, METH_FASTCALL,
     "the slow path's reader bias and hold record"},
    {"write_lock", (PyCFunction)(void (*)(void))Qrwlock_write_lock, METH_FASTCALL, "write_lock(mmu_lock)"},
    {"write_unlock", (PyCFunction)(void (*)(void))Qrwlock_write_unlock, METH_FASTCALL, "write_unlock(mmu_lock)"},
    {NULL}
};

static PyMemberDef Qrwlock_members[] = {
    {"mode", T_INT, offsetof(Qrwlock, mode), 0, "what this process holds: Held.NONE, READ or WRITE"},
    {"read_acquired", T_LONGLONG, offsetof(Qrwlock, read_acquired), 0, "read acquisitions by this process"},
    {"write_acquired", T_LONGLONG, offsetof(Qrwlock, write_acquired), 0, "write acquisitions by this process"},
    {NULL}
};

static PyTypeObject QrwlockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._atomics.QrwlockFast",
    .tp_basicsize = sizeof(Qrwlock),
    .tp_dealloc = (destructor)Qrwlock_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The qrwlock's uncontended fast paths (the base of shmmmu.rwlock.RWLock).",
    .tp_methods = Qrwlock_methods,
    .tp_members = Qrwlock_members,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- RcuReadFast */

typedef struct {
    PyObject_HEAD
    Words *ctl;
    Words *ws;
    Py_ssize_t epoch, slot;
    int nesting;
} RcuRead;

static void
RcuRead_dealloc(RcuRead *self)
{
    Py_CLEAR(self->ctl);
    Py_CLEAR(self->ws);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _bind_fast(ctl, epoch, ws, slot) */
static PyObject *
RcuRead_bind(RcuRead *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "_bind_fast(ctl, epoch, ws, slot)");
        return NULL;
    }
    if (bind_words(args[0], &self->ctl, "the control words") < 0 || bind_words(args[2], &self->ws, "the worker rows") < 0)
        return NULL;
    if (bind_index(self->ctl, args[1], &self->epoch, "epoch") < 0 || bind_index(self->ws, args[3], &self->slot, "RCU slot") < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* rcu_read_lock(): the outermost level publishes the epoch it entered in */
static PyObject *
RcuRead_read_lock(RcuRead *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("read_lock");
    if (!self->ctl) return not_bound();
    if (!self->nesting)
        __atomic_store_n(&self->ws->w[self->slot], __atomic_load_n(&self->ctl->w[self->epoch], SEQ), SEQ);
    self->nesting++;
    Py_RETURN_NONE;
}

/* rcu_read_unlock(): the outermost level publishes quiescence */
static PyObject *
RcuRead_read_unlock(RcuRead *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) return takes_no_arguments("read_unlock");
    if (!self->ctl) return not_bound();
    int n = --self->nesting;
    if (!n)
        __atomic_store_n(&self->ws->w[self->slot], (uint64_t)0, SEQ);
    else if (n < 0)
        return PyObject_CallMethodNoArgs((PyObject *)self, s_unbalanced);
    Py_RETURN_NONE;
}

static PyMethodDef RcuRead_methods[] = {
    {"_bind_fast", (PyCFunction)(void (*)(void))RcuRead_bind, METH_FASTCALL, "_bind_fast(ctl, epoch, ws, slot)"},
    {"read_lock", (PyCFunction)(void (*)(void))RcuRead_read_lock, METH_FASTCALL, "rcu_read_lock()"},
    {"read_unlock", (PyCFunction)(void (*)(void))RcuRead_read_unlock, METH_FASTCALL, "rcu_read_unlock()"},
    {NULL}
};

static PyMemberDef RcuRead_members[] = {
    {"nesting", T_INT, offsetof(RcuRead, nesting), 0, "read-side nesting depth of this process"},
    {NULL}
};

static PyTypeObject RcuReadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._atomics.RcuReadFast",
    .tp_basicsize = sizeof(RcuRead),
    .tp_dealloc = (destructor)RcuRead_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The RCU read side's fast path (the base of shmmmu.rcu.Rcu).",
    .tp_methods = RcuRead_methods,
    .tp_members = RcuRead_members,
    .tp_new = PyType_GenericNew,
};

int
shmmmu_add_lock_types(PyObject *m)
{
    if (!(s_read_contended = PyUnicode_InternFromString("_read_contended"))
        || !(s_write_slowpath = PyUnicode_InternFromString("_write_slowpath"))
        || !(s_wake = PyUnicode_InternFromString("_wake"))
        || !(s_unlock_unheld = PyUnicode_InternFromString("_unlock_unheld"))
        || !(s_unbalanced = PyUnicode_InternFromString("_unbalanced")))
        return -1;
    if (PyType_Ready(&QrwlockType) < 0 || PyType_Ready(&RcuReadType) < 0) return -1;
    Py_INCREF(&QrwlockType);
    if (PyModule_AddObject(m, "QrwlockFast", (PyObject *)&QrwlockType) < 0) {
        Py_DECREF(&QrwlockType);
        return -1;
    }
    Py_INCREF(&RcuReadType);
    if (PyModule_AddObject(m, "RcuReadFast", (PyObject *)&RcuReadType) < 0) {
        Py_DECREF(&RcuReadType);
        return -1;
    }
    return 0;
}
