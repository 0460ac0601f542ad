/* _walker: the processor's side of guest accesses in C: the EPT walk with its A/D update, the TLB and
 * paging-structure caches, the access loop.
 *
 * On a TLB miss the processor walks the tables without any lock, starting from
 * the deepest paging-structure-cache entry on the address's path (else from the
 * root) and caching every non-leaf entry it reads; it sets the accessed (and,
 * on a write, dirty) bit of the leaf with a locked compare-exchange that fails
 * if the entry changed, and then walks again at once (no exit).  That is
 * hardware, not KVM code, so it is done here rather than in Python; so are the
 * caches (Tlb: per level, gfn >> shift -> host page, writable, executable; and
 * per level, direct-mapped, gfn >> shift -> the table a non-leaf entry points
 * to) and the loop that performs a batch of guest accesses (Processor.run).
 * The loop learns of a flush only from a kick: at each access boundary it
 * looks at its own vcpu->mode, and EXITING (a flusher's IPI) is a VM exit.  It
 * returns to Python only for what is KVM's or the checkers': an EPT violation
 * (the fault), a kick (the requests are taken on the way back in), requests or
 * a reload found at entry, a violation to record, the end of the batch.
 * Around a fault it takes the guest-mode steps of tlb.TlbControl itself, in
 * the same order: the violation drops the address's cached mappings, vcpu->mode
 * OUTSIDE before it returns; afterwards the requests (any: back to Python),
 * IN_GUEST, the requests again, then the roots generation.  The debug checks of
 * a walk (a poisoned entry read, a cached entry whose table was freed since)
 * are recorded through the callable the Processor was given, in place.
 *
 * shmmmu/guest.py has the same steps in Python (Vcpu.hw_walk_reference,
 * tlb.Tlb, Vcpu.run_batch_reference); the explorer runs those, and the tests
 * hold this file to them (tests/test_walker.py, tests/test_processor.py).
 *
 * The bit positions are spte.py's (EPT, KVM 5.13+ layout); guest.py asserts
 * the constants this module exports against spte.py, layout.py, pool.py and tlb.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <stdint.h>

#define SEQ __ATOMIC_SEQ_CST
#define BIT_W        (1ULL << 1)
#define BIT_X        (1ULL << 2)
#define BIT_LARGE    (1ULL << 7)
#define BIT_A        (1ULL << 8)
#define BIT_D        (1ULL << 9)
#define BIT_PRESENT  (1ULL << 11)   /* KVM's own present bit (the debug freshness test uses it, as guest.py does) */
#define BIT_RWX      7ULL           /* EPT read, write, execute: what the processor tests for presence */
#define PFN_MASK     (((1ULL << 52) - 1) & ~((1ULL << 12) - 1))
#define DATA_POISON  0xBADBADBADBADBAD0ULL   /* memslots.DATA_POISON */
#define TOUCHED      1ULL                    /* layout.HostPage.TOUCHED */
#define WRITTEN      2ULL                    /* layout.HostPage.WRITTEN */
#define GFN_MASK     ((1ULL << 32) - 1)      /* workloads.GFN_MASK: the GFN part of a written value */
#define TABLE_POISON 0xDEADBEEFDEADB000ULL   /* pool.POISON: a freed table's entries, in debug mode */
#define TMETA_WORDS  16                      /* layout.TMeta.WORDS */
#define TMETA_GEN    3                       /* layout.TMeta.GEN: bumped at every free */
#define MODE_OUTSIDE  0ULL                   /* layout.TlbMode */
#define MODE_IN_GUEST 1ULL
#define MODE_EXITING  2ULL
#define REQ_TLB_FLUSH 1ULL                   /* layout.Request.TLB_FLUSH */

/* guest.Vcpu._split_still_maps: a huge leaf split in place (6.12's eager split: no flush, the translation
 * is unchanged) left a non-leaf at the cached entry; below it, gfn's leaf maps the same host page */
static inline int
split_still_maps(uint64_t *w, uint64_t n, uint64_t now, uint64_t cached, long level, long bits, uint64_t gfn,
                 int write)
{
    uint64_t entries = 1ULL << bits;
    uint64_t want = ((cached & PFN_MASK) >> 12) + (gfn & ((1ULL << (bits * (level - 1))) - 1));
    uint64_t spte = now;
    while (level > 1 && (spte & BIT_PRESENT) && !(spte & BIT_LARGE)) {
        uint64_t table = (spte & PFN_MASK) >> 12;
        level--;
        uint64_t at = table * entries + ((gfn >> (bits * (level - 1))) & (entries - 1));
        if (table >= n / entries || at >= n) return 0;
        spte = __atomic_load_n(&w[at], SEQ);
    }
    if (!(spte & BIT_PRESENT) || (level > 1 && !(spte & BIT_LARGE)) || now == spte) return 0;
    uint64_t got = ((spte & PFN_MASK) >> 12) + (gfn & ((1ULL << (bits * (level - 1))) - 1));
    return got == want && ((spte & BIT_W) || !write);
}

/* ------------------------------------------------------------------ the TLB */

/* One translation.  `gen` is the flush generation it was made in: a flush makes every entry stale at
 * once by moving the TLB's generation.  `src`/`spte`: the leaf it came from and its value then (for
 * the debug freshness check; 0 when inserted from Python). */
typedef struct {
    uint64_t key, pfn, src, spte, gen;
    uint8_t writable, executable, dead, has_src;
} TlbEntry;

#define TLB_LEVELS 4          /* tlb.Tlb keeps four maps (a leaf above level 3 is cached, never looked up) */

/* A paging-structure-cache entry: the non-leaf entry at its level on the path of the GFNs with prefix `key`
 * points to `table` (whose generation was `tgen` when cached: debug, else 0).  Valid while `tag` is the
 * TLB's psc_gen: a flush moves it. */
typedef struct {
    uint64_t key, table, tgen, tag;
} PscEntry;

#define PSC_LEVELS 4          /* entries at levels 2..5 (tlb.PSC_SLOTS) */
#define PSC_MAX 32
static const int psc_slots[PSC_LEVELS] = {32, 8, 4, 4};   /* tlb.PSC_SLOTS: direct-mapped, a power of 2 each */

typedef struct {
    PyObject_HEAD
    long bits;
    Py_ssize_t capacity, size;
    long long flushes;
    uint64_t gen, mask, psc_gen;
    int hash_shift;
    TlbEntry *lv[TLB_LEVELS];
    PscEntry psc[PSC_LEVELS][PSC_MAX];
} Tlb;

static inline uint64_t
tlb_slot(const Tlb *t, uint64_t key)
{
    return (key * 0x9E3779B97F4A7C15ULL) >> t->hash_shift;
}

/* The slot of `key` (live or invalidated) at `level`, or NULL.  A key has at most one slot per
 * generation (insert reuses it), and slots are never freed within a generation, so the probe stops
 * at the first slot of an older generation. */
static inline TlbEntry *
tlb_find(const Tlb *t, int level, uint64_t key)
{
    TlbEntry *m = t->lv[level - 1];
    uint64_t i = tlb_slot(t, key);
    for (;;) {
        TlbEntry *e = &m[i];
        if (e->gen != t->gen) return NULL;
        if (e->key == key) return e;
        i = (i + 1) & t->mask;
    }
}

/* the translations only: what a full TLB does before an insert (the paging-structure caches stay) */
static inline void
tlb_drop(Tlb *t)
{
    t->gen++;
    t->size = 0;
    t->flushes++;
}

/* a flush of the vCPU's caches: translations and paging-structure entries (tlb.Tlb.flush_local) */
static inline void
tlb_flush(Tlb *t)
{
    tlb_drop(t);
    t->psc_gen++;
}

static inline PscEntry *
psc_slot(Tlb *t, int level, uint64_t key)
{
    return &t->psc[level - 2][key & (uint64_t)(psc_slots[level - 2] - 1)];
}

/* tlb.Tlb.psc_lookup: the deepest cached non-leaf entry on gfn's path and the level of the table it points
 * to, or NULL */
static inline PscEntry *
psc_lookup(Tlb *t, uint64_t gfn, long *table_level)
{
    for (int l = 2; l < 2 + PSC_LEVELS; l++) {
        uint64_t key = gfn >> (t->bits * (l - 1));
        PscEntry *e = psc_slot(t, l, key);
        if (e->tag == t->psc_gen && e->key == key) {
            *table_level = l - 1;
            return e;
        }
    }
    return NULL;
}

/* tlb.Tlb.psc_insert: the non-leaf entry at `level` on gfn's path points to `table` */
static inline void
psc_insert(Tlb *t, int level, uint64_t gfn, uint64_t table, uint64_t tgen)
{
    uint64_t key = gfn >> (t->bits * (level - 1));
    PscEntry *e = psc_slot(t, level, key);
    e->key = key;
    e->table = table;
    e->tgen = tgen;
    e->tag = t->psc_gen;
}

/* tlb.Tlb.lookup: level 1, then 2, then 3; the entry and its level, or NULL */
static inline TlbEntry *
tlb_lookup(const Tlb *t, uint64_t gfn, int *level)
{
    for (int l = 1; l <= 3; l++) {
        TlbEntry *e = tlb_find(t, l, gfn >> (t->bits * (l - 1)));
        if (e != NULL && !e->dead) {
            *level = l;
            return e;
        }
    }
    return NULL;
}

/* tlb.Tlb.insert: a full TLB is flushed first; every insert counts (an overwrite too, as the dict's) */
static inline void
tlb_insert(Tlb *t, uint64_t gfn, int level, uint64_t pfn, int writable, int executable, int has_src,
           uint64_t src, uint64_t spte)
{
    if (t->size >= t->capacity) tlb_drop(t);
    uint64_t key = gfn >> (t->bits * (level - 1));
    TlbEntry *m = t->lv[level - 1];
    uint64_t i = tlb_slot(t, key);
    TlbEntry *e;
    for (;;) {
        e = &m[i];
        if (e->gen != t->gen || e->key == key) break;
        i = (i + 1) & t->mask;
    }
    e->key = key;
    e->pfn = pfn;
    e->gen = t->gen;
    e->writable = (uint8_t)(writable != 0);
    e->executable = (uint8_t)(executable != 0);
    e->dead = 0;
    e->has_src = (uint8_t)has_src;
    e->src = src;
    e->spte = spte;
    t->size++;
}

/* tlb.Tlb.invalidate (what an EPT violation drops): every translation and paging-structure entry of gfn */
static inline void
tlb_invalidate(Tlb *t, uint64_t gfn)
{
    for (int l = 1; l <= 3; l++) {
        TlbEntry *e = tlb_find(t, l, gfn >> (t->bits * (l - 1)));
        if (e != NULL) e->dead = 1;      /* the slot stays taken until the next flush (size is not given back) */
    }
    long unused;
    PscEntry *e;
    while ((e = psc_lookup(t, gfn, &unused)) != NULL) e->tag = 0;
}

static int
Tlb_init(Tlb *self, PyObject *args, PyObject *kw)
{
    long bits;
    Py_ssize_t capacity;
    if (!PyArg_ParseTuple(args, "ln:Tlb", &bits, &capacity)) return -1;
    if (bits < 1 || bits > 9 || capacity < 1 || capacity > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "Tlb(bits 1..9, capacity 1..2**24)");
        return -1;
    }
    /* every level may hold the whole capacity: twice that many slots keeps probes short */
    uint64_t slots = 2;
    int log2 = 1;
    while (slots < 2 * (uint64_t)capacity) {
        slots <<= 1;
        log2++;
    }
    for (int l = 0; l < TLB_LEVELS; l++) {
        PyMem_Free(self->lv[l]);
        self->lv[l] = PyMem_Calloc(slots, sizeof(TlbEntry));
        if (self->lv[l] == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->bits = bits;
    self->capacity = capacity;
    self->size = 0;
    self->flushes = 0;
    self->gen = 1;             /* calloc'd slots are generation 0: empty */
    self->psc_gen = 1;         /* so are the paging-structure entries (tag 0) */
    memset(self->psc, 0, sizeof self->psc);
    self->mask = slots - 1;
    self->hash_shift = 64 - log2;
    return 0;
}

static void
Tlb_dealloc(Tlb *self)
{
    for (int l = 0; l < TLB_LEVELS; l++) PyMem_Free(self->lv[l]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
level_arg(PyObject *o, int *level)
{
    long l = PyLong_AsLong(o);
    if (l == -1 && PyErr_Occurred()) return -1;
    if (l < 1 || l > TLB_LEVELS) {
        PyErr_Format(PyExc_ValueError, "TLB level %ld out of range 1..%d", l, TLB_LEVELS);
        return -1;
    }
    *level = (int)l;
    return 0;
}

static PyObject *
Tlb_lookup(Tlb *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "lookup(gfn)");
        return NULL;
    }
    uint64_t gfn = PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) return NULL;
    int level;
    TlbEntry *e = tlb_lookup(self, gfn, &level);
    if (e == NULL) Py_RETURN_NONE;
    uint64_t off = gfn & ((1ULL << (self->bits * (level - 1))) - 1);
    return Py_BuildValue("(KOiO)", (unsigned long long)(e->pfn + off), e->writable ? Py_True : Py_False, level,
                         e->executable ? Py_True : Py_False);
}

static PyObject *
Tlb_insert(Tlb *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "insert(gfn, level, pfn_base, writable, executable=True)");
        return NULL;
    }
    int level;
    uint64_t gfn = PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred() || level_arg(args[1], &level) < 0) return NULL;
    uint64_t pfn = PyLong_AsUnsignedLongLong(args[2]);
    int w = PyObject_IsTrue(args[3]);
    int x = nargs == 5 ? PyObject_IsTrue(args[4]) : 1;
    if (PyErr_Occurred()) return NULL;
    tlb_insert(self, gfn, level, pfn, w, x, 0, 0, 0);
    Py_RETURN_NONE;
}

static PyObject *
Tlb_invalidate(Tlb *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "invalidate(gfn)");
        return NULL;
    }
    uint64_t gfn = PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) return NULL;
    tlb_invalidate(self, gfn);
    Py_RETURN_NONE;
}

static PyObject *
Tlb_flush_local(Tlb *self, PyObject *unused)
{
    tlb_flush(self);
    Py_RETURN_NONE;
}

static PyObject *
Tlb_snapshot(Tlb *self, PyObject *unused)
{
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (int l = 0; l < TLB_LEVELS; l++) {
        for (uint64_t i = 0; i <= self->mask; i++) {
            TlbEntry *e = &self->lv[l][i];
            if (e->gen != self->gen || e->dead) continue;
            PyObject *k = Py_BuildValue("(iK)", l + 1, (unsigned long long)e->key);
            PyObject *v = Py_BuildValue("(KOO)", (unsigned long long)e->pfn, e->writable ? Py_True : Py_False,
                                        e->executable ? Py_True : Py_False);
            if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0) {
                Py_XDECREF(k);
                Py_XDECREF(v);
                Py_DECREF(d);
                return NULL;
            }
            Py_DECREF(k);
            Py_DECREF(v);
        }
    }
    return d;
}

static PyObject *
Tlb_psc_lookup(Tlb *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "psc_lookup(gfn)");
        return NULL;
    }
    uint64_t gfn = PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) return NULL;
    long level;
    PscEntry *e = psc_lookup(self, gfn, &level);
    if (e == NULL) Py_RETURN_NONE;
    return Py_BuildValue("(KlK)", (unsigned long long)e->table, level, (unsigned long long)e->tgen);
}

static PyObject *
Tlb_psc_insert(Tlb *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "psc_insert(level, gfn, table, gen)");
        return NULL;
    }
    long level = PyLong_AsLong(args[0]);
    uint64_t gfn = PyLong_AsUnsignedLongLong(args[1]);
    uint64_t table = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t gen = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (level < 2 || level >= 2 + PSC_LEVELS) {
        PyErr_Format(PyExc_ValueError, "paging-structure level %ld out of range 2..%d", level, 1 + PSC_LEVELS);
        return NULL;
    }
    psc_insert(self, (int)level, gfn, table, gen);
    Py_RETURN_NONE;
}

static PyObject *
Tlb_psc_snapshot(Tlb *self, PyObject *unused)
{
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (int l = 2; l < 2 + PSC_LEVELS; l++) {
        for (int i = 0; i < psc_slots[l - 2]; i++) {
            PscEntry *e = &self->psc[l - 2][i];
            if (e->tag != self->psc_gen) continue;
            PyObject *k = Py_BuildValue("(iK)", l, (unsigned long long)e->key);
            PyObject *v = Py_BuildValue("(KK)", (unsigned long long)e->table, (unsigned long long)e->tgen);
            if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0) {
                Py_XDECREF(k);
                Py_XDECREF(v);
                Py_DECREF(d);
                return NULL;
            }
            Py_DECREF(k);
            Py_DECREF(v);
        }
    }
    return d;
}

static PyMethodDef Tlb_methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))Tlb_lookup, METH_FASTCALL,
     "lookup(gfn) -> (host pfn of gfn, writable, level, executable) or None"},
    {"insert", (PyCFunction)(void (*)(void))Tlb_insert, METH_FASTCALL,
     "insert(gfn, level, pfn_base, writable, executable=True)"},
    {"invalidate", (PyCFunction)(void (*)(void))Tlb_invalidate, METH_FASTCALL,
     "invalidate(gfn): every translation and paging-structure entry of gfn (an EPT violation's)"},
    {"flush_local", (PyCFunction)Tlb_flush_local, METH_NOARGS, "drop every translation and paging-structure entry"},
    {"psc_lookup", (PyCFunction)(void (*)(void))Tlb_psc_lookup, METH_FASTCALL,
     "psc_lookup(gfn) -> (table, its level, its generation when cached) of the deepest cached entry, or None"},
    {"psc_insert", (PyCFunction)(void (*)(void))Tlb_psc_insert, METH_FASTCALL,
     "psc_insert(level, gfn, table, gen): the non-leaf entry at level on gfn's path points to table"},
    {"psc_snapshot", (PyCFunction)Tlb_psc_snapshot, METH_NOARGS,
     "{(level, gfn >> shift): (table, generation)} of every paging-structure entry"},
    {"snapshot", (PyCFunction)Tlb_snapshot, METH_NOARGS,
     "{(level, gfn >> shift): (pfn_base, writable, executable)} of every translation"},
    {NULL}
};

static PyMemberDef Tlb_members[] = {
    {"bits", T_LONG, offsetof(Tlb, bits), READONLY, "index bits per level"},
    {"capacity", T_PYSSIZET, offsetof(Tlb, capacity), READONLY, "translations before a full flush"},
    {"size", T_PYSSIZET, offsetof(Tlb, size), READONLY, "inserts since the last flush"},
    {"flushes", T_LONGLONG, offsetof(Tlb, flushes), READONLY, "local flushes so far"},
    {NULL}
};

static PyTypeObject TlbType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._walker.Tlb",
    .tp_basicsize = sizeof(Tlb),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tlb(bits, capacity): a vCPU's private translations and paging-structure caches, as tlb.Tlb keeps them",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Tlb_init,
    .tp_dealloc = (destructor)Tlb_dealloc,
    .tp_methods = Tlb_methods,
    .tp_members = Tlb_members,
};

/* ------------------------------------------------------------------ the access loop */

/* what Processor.run returns for (guest.py's _R_* names) */
enum { R_END, R_KICK, R_FAULT, R_STALE, R_POISON, R_CORRUPT, R_ENTER, R_RELOAD };
/* where run resumes the first access (guest.py's _PH_*) */
enum { PH_NEW, PH_LOOKUP, PH_CHECKED, PH_WALK, PH_ENTER };
/* the counters kept here (guest.py folds them into layout.STAT in this order) */
enum { C_ACCESSES, C_READS, C_WRITES, C_HITS, C_MISSES, C_WALKS, C_FETCHES, C_PSC_HITS, C_REWALKS, C_KICKS,
       N_COUNTERS };
enum { K_READ, K_WRITE, K_EXEC };    /* workloads.READ, WRITE, EXEC */

typedef struct {
    PyObject_HEAD
    Tlb *tlb;
    Py_buffer tables, data, touched, ctl, wstate, tmeta, gfns, kinds;
    int have_bufs, have_batch;
    uint64_t *tw, *dw, *hw, *cw, *ww, *mw;
    uint64_t tn, dn, hn, cn, wn, mn;
    const int64_t *g;
    const int8_t *k;
    Py_ssize_t bn;
    long root_level, bits;
    int debug;
    Py_ssize_t unflushed_word, roots_gen_word, mode_word, req_word;
    PyObject *report;          /* debug: report(kind, gfn, a, b) records a violation (Mmu.violation) */
    /* a test seam (tests/test_processor.py; Vcpu.ad_race_every is the reference's): every Nth A/D update
     * another processor's locked update of the same leaf lands between this walk's read and its
     * compare-exchange, which then fails; 0: never (what every VM runs) */
    int ad_race_every, ad_race_count;
    unsigned long long counters[N_COUNTERS];
} Processor;

static void
Processor_release_batch(Processor *self)
{
    if (self->have_batch) {
        PyBuffer_Release(&self->gfns);
        PyBuffer_Release(&self->kinds);
        self->have_batch = 0;
    }
}

static void
Processor_release_all(Processor *self)
{
    Processor_release_batch(self);
    if (self->have_bufs) {
        PyBuffer_Release(&self->tables);
        PyBuffer_Release(&self->data);
        PyBuffer_Release(&self->touched);
        PyBuffer_Release(&self->ctl);
        PyBuffer_Release(&self->wstate);
        PyBuffer_Release(&self->tmeta);
        self->have_bufs = 0;
    }
}

static int
u64_buffer(PyObject *o, Py_buffer *b, const char *what)
{
    if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (b->itemsize != 8 || b->len % 8) {
        PyErr_Format(PyExc_ValueError, "%s must be a buffer of uint64 words", what);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* Processor(tlb, tables, data, touched, ctl, wstate, tmeta, root_level, bits, debug, unflushed_word,
 *           roots_gen_word, mode_word, req_word, report) */
static int
Processor_init(Processor *self, PyObject *args, PyObject *kw)
{
    PyObject *tlb, *tables, *data, *touched, *ctl, *wstate, *tmeta, *report;
    long root_level, bits;
    int debug;
    Py_ssize_t uf, rg, mw, rq;
    if (!PyArg_ParseTuple(args, "O!OOOOOOllpnnnnO:Processor", &TlbType, &tlb, &tables, &data, &touched, &ctl,
                          &wstate, &tmeta, &root_level, &bits, &debug, &uf, &rg, &mw, &rq, &report))
        return -1;
    if (bits < 1 || bits > 9 || root_level < 1 || root_level > 1 + PSC_LEVELS) {
        PyErr_SetString(PyExc_ValueError, "bad walk geometry");
        return -1;
    }
    if (((Tlb *)tlb)->bits != bits) {
        PyErr_SetString(PyExc_ValueError, "the TLB's bits differ from the walk's");
        return -1;
    }
    if (!PyCallable_Check(report)) {
        PyErr_SetString(PyExc_TypeError, "report must be callable: report(kind, gfn, a, b)");
        return -1;
    }
    Processor_release_all(self);
    if (u64_buffer(tables, &self->tables, "tables") < 0) return -1;
    if (u64_buffer(data, &self->data, "data") < 0) goto fail1;
    if (u64_buffer(touched, &self->touched, "touched") < 0) goto fail2;
    if (u64_buffer(ctl, &self->ctl, "ctl") < 0) goto fail3;
    if (u64_buffer(wstate, &self->wstate, "wstate") < 0) goto fail4;
    if (u64_buffer(tmeta, &self->tmeta, "tmeta") < 0) goto fail5;
    self->have_bufs = 1;
    self->tw = self->tables.buf;
    self->tn = (uint64_t)(self->tables.len / 8);
    self->dw = self->data.buf;
    self->dn = (uint64_t)(self->data.len / 8);
    self->hw = self->touched.buf;
    self->hn = (uint64_t)(self->touched.len / 8);
    self->cw = self->ctl.buf;
    self->cn = (uint64_t)(self->ctl.len / 8);
    self->ww = self->wstate.buf;
    self->wn = (uint64_t)(self->wstate.len / 8);
    self->mw = self->tmeta.buf;
    self->mn = (uint64_t)(self->tmeta.len / 8);
    if (uf < 0 || rg < 0 || mw < 0 || rq < 0 || (uint64_t)uf >= self->cn || (uint64_t)rg >= self->cn
        || (uint64_t)mw >= self->wn || (uint64_t)rq >= self->wn) {
        PyErr_SetString(PyExc_IndexError, "control word outside ctl, or mode or request word outside wstate");
        Processor_release_all(self);
        return -1;
    }
    Py_INCREF(tlb);
    Py_XSETREF(self->tlb, (Tlb *)tlb);
    Py_INCREF(report);
    Py_XSETREF(self->report, report);
    self->root_level = root_level;
    self->bits = bits;
    self->debug = debug;
    self->unflushed_word = uf;
    self->roots_gen_word = rg;
    self->mode_word = mw;
    self->req_word = rq;
    memset(self->counters, 0, sizeof self->counters);
    return 0;
fail5:
    PyBuffer_Release(&self->wstate);
fail4:
    PyBuffer_Release(&self->ctl);
fail3:
    PyBuffer_Release(&self->touched);
fail2:
    PyBuffer_Release(&self->data);
fail1:
    PyBuffer_Release(&self->tables);
    return -1;
}

static void
Processor_dealloc(Processor *self)
{
    Processor_release_all(self);
    Py_XDECREF(self->tlb);
    Py_XDECREF(self->report);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* batch(gfns, kinds): the accesses run() indexes into (int64 GFNs, int8 READ/WRITE/EXEC), held until
 * the next batch() or release() */
static PyObject *
Processor_batch(Processor *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "batch(gfns, kinds)");
        return NULL;
    }
    Processor_release_batch(self);
    if (PyObject_GetBuffer(args[0], &self->gfns, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &self->kinds, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&self->gfns);
        return NULL;
    }
    if (self->gfns.itemsize != 8 || self->kinds.itemsize != 1 || self->gfns.len / 8 != self->kinds.len) {
        PyBuffer_Release(&self->gfns);
        PyBuffer_Release(&self->kinds);
        PyErr_SetString(PyExc_ValueError, "batch needs int64 gfns and int8 kinds of the same length");
        return NULL;
    }
    self->have_batch = 1;
    self->g = self->gfns.buf;
    self->k = self->kinds.buf;
    self->bn = self->kinds.len;
    Py_RETURN_NONE;
}

static PyObject *
result(int reason, Py_ssize_t i, unsigned long long a, unsigned long long b, unsigned long long c)
{
    /* built by hand: Py_BuildValue parses its format on every call, and this is once per fault */
    PyObject *t = PyTuple_New(5);
    if (t == NULL) return NULL;
    PyObject *v[5] = {PyLong_FromLong(reason), PyLong_FromSsize_t(i), PyLong_FromUnsignedLongLong(a),
                      PyLong_FromUnsignedLongLong(b), PyLong_FromUnsignedLongLong(c)};
    for (int k = 0; k < 5; k++) {
        if (v[k] == NULL) {
            for (int j = k; j < 5; j++) Py_XDECREF(v[j]);
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, k, v[k]);
    }
    return t;
}

/* debug: a table's generation (bumped at every free), 0 for a number past the pool (guest.Vcpu._table_gen) */
static inline uint64_t
table_gen(const Processor *p, uint64_t table)
{
    return table < p->mn / TMETA_WORDS ? __atomic_load_n(&p->mw[table * TMETA_WORDS + TMETA_GEN], __ATOMIC_RELAXED)
                                       : 0;
}

/* debug: record a violation where it is seen (report(kind, gfn, a, b)); -1 if it raised */
static int
report(Processor *p, const char *kind, uint64_t gfn, uint64_t a, uint64_t b)
{
    PyObject *r = PyObject_CallFunction(p->report, "sKKK", kind, (unsigned long long)gfn, (unsigned long long)a,
                                        (unsigned long long)b);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* guest.Vcpu.hw_walk_reference: a TLB miss's walk from the deepest paging-structure-cache entry on gfn's path
 * (else the root), caching the non-leaf entries it reads, with the A/D update of the leaf; a lost A/D
 * compare-exchange walks again at once (no exit).  1 and the leaf's (index, value after its update, level);
 * 0 for an EPT violation (not present, no W for a write, no X for a fetch, or a pointer outside the pool:
 * garbage from a freed table is not ours to follow); -1 if a debug report raised. */
static int
proc_walk(Processor *p, uint64_t root, uint64_t gfn, int write, int exec, Py_ssize_t *sptep, uint64_t *sptev,
          long *levelp)
{
    Tlb *t = p->tlb;
    uint64_t *w = p->tw, n = p->tn;
    const long bits = p->bits;
    const uint64_t entries = 1ULL << bits, mask = entries - 1;
    p->counters[C_WALKS]++;
    for (;;) {
        uint64_t table, spte, at;
        long level;
        PscEntry *c = psc_lookup(t, gfn, &level);
        if (c == NULL) {
            table = root;
            level = p->root_level;
        } else {
            table = c->table;
            p->counters[C_PSC_HITS]++;
            if (p->debug && table_gen(p, table) != c->tgen && report(p, "use-after-free", gfn, table, c->tgen) < 0)
                return -1;
        }
        for (;;) {
            at = table * entries + ((gfn >> (bits * (level - 1))) & mask);
            if (table >= n / entries || at >= n) return 0;
            spte = __atomic_load_n(&w[at], SEQ);
            if (!(spte & BIT_RWX)) {             /* EPT presence: any of R/W/X (bit 11 is KVM's) */
                if (p->debug && spte == TABLE_POISON && report(p, "poison-read", gfn, at, level) < 0) return -1;
                return 0;
            }
            if (level == 1 || (spte & BIT_LARGE)) break;
            table = (spte & PFN_MASK) >> 12;
            psc_insert(t, (int)level, gfn, table, p->debug ? table_gen(p, table) : 0);
            level--;
        }
        if ((write && !(spte & BIT_W)) || (exec && !(spte & BIT_X))) return 0;
        uint64_t want = spte | BIT_A | (write ? BIT_D : 0);
        if (want != spte) {
            uint64_t seen = spte;
            if (p->ad_race_every && ++p->ad_race_count % p->ad_race_every == 0)
                __atomic_fetch_or(&w[at], BIT_A | ((spte & BIT_W) ? BIT_D : 0), SEQ);
            if (!__atomic_compare_exchange_n(&w[at], &seen, want, 0, SEQ, SEQ)) {
                p->counters[C_REWALKS]++;
                continue;
            }
            spte = want;
        }
        *sptep = (Py_ssize_t)at;
        *sptev = spte;
        *levelp = level;
        return 1;
    }
}

/* walk(gfn, write, exec, root) -> (sptep, spte, level) of the leaf after its A/D update, or None for an EPT
 * violation: one TLB miss's walk with this processor's caches and counters (Vcpu's per-access path) */
static PyObject *
Processor_walk(Processor *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "walk(gfn, write, exec, root)");
        return NULL;
    }
    if (!self->have_bufs) {
        PyErr_SetString(PyExc_RuntimeError, "walk() after release()");
        return NULL;
    }
    uint64_t gfn = PyLong_AsUnsignedLongLong(args[0]);
    int write = PyObject_IsTrue(args[1]);
    int exec = PyObject_IsTrue(args[2]);
    long long root = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (root < 0) {
        PyErr_SetString(PyExc_IndexError, "walk(): a negative root");
        return NULL;
    }
    Py_ssize_t at;
    uint64_t spte;
    long level;
    int ok = proc_walk(self, (uint64_t)root, gfn, write, exec, &at, &spte, &level);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("(nKl)", at, (unsigned long long)spte, level);
}

/* run(start, end, vbase, root, phase, roots_gen) -> (reason, index, a, b, c)
 *
 * Performs accesses [start, end) of the batch in guest mode, as guest.Vcpu.run_batch_reference does,
 * and stops at the first thing that is not the processor's:
 *   R_END      all done (index = end)
 *   R_KICK     before access `index` this vCPU's mode was EXITING (a flusher's kick): the loop took the
 *              VM exit (mode OUTSIDE, the IPI taken) before returning; the caller enters again
 *              (TlbControl.enter_guest: the requests, a reload) and resumes at index with PH_LOOKUP
 *   R_FAULT    an EPT violation at `index`: (gfn, write, exec), with gfn's cached mappings dropped and
 *              vcpu->mode already OUTSIDE (TlbControl.exit_guest); after the fault the caller resumes with
 *              PH_ENTER, which is TlbControl.enter_guest's steps (no request pending, mode IN_GUEST, still
 *              none pending, then the roots generation against `roots_gen`) before the walk again:
 *   R_ENTER    on entry a request was pending (vCPU OUTSIDE): the caller enters (TlbControl.enter_guest,
 *              and a reload if it says so) and resumes with PH_WALK
 *   R_RELOAD   on entry the roots generation moved: the caller reloads the root (Vcpu.reload_root)
 *              and resumes with PH_WALK
 *   R_STALE    debug: a TLB hit whose source leaf no longer grants it with no flush in progress:
 *              (gfn, cached, now); resume with PH_CHECKED
 *   R_POISON   debug: the access met a poisoned host page: (gfn, host page, value); resume at index+1
 *   R_CORRUPT  a read returned a value naming another GFN: (gfn, value, 0); resume at index+1
 * A write stores vbase | (gfn & GFN_MASK) (workloads.make_value).  A walk's own debug findings (a
 * poisoned table entry read, a cached entry whose table was freed since) are reported in place. */
static PyObject *
Processor_run(Processor *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "run(start, end, vbase, root, phase, roots_gen)");
        return NULL;
    }
    if (!self->have_bufs || !self->have_batch) {
        PyErr_SetString(PyExc_RuntimeError, "run() before batch() (or after release())");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[0]);
    Py_ssize_t end = PyLong_AsSsize_t(args[1]);
    uint64_t vbase = PyLong_AsUnsignedLongLongMask(args[2]);
    long long root = PyLong_AsLongLong(args[3]);
    long phase = PyLong_AsLong(args[4]);
    uint64_t roots_gen = PyLong_AsUnsignedLongLongMask(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (i < 0 || end > self->bn || root < 0 || phase < PH_NEW || phase > PH_ENTER) {
        PyErr_SetString(PyExc_IndexError, "run(): accesses outside the batch, or a bad root or phase");
        return NULL;
    }
    Tlb *t = self->tlb;
    uint64_t *cw = self->cw, *tw = self->tw, *dw = self->dw, *hw = self->hw;
    uint64_t *const mode = &self->ww[self->mode_word], *const req = &self->ww[self->req_word];
    unsigned long long *st = self->counters;
    const long bits = self->bits;
    const int debug = self->debug;
    for (; i < end; i++, phase = PH_NEW) {
        uint64_t gfn = (uint64_t)self->g[i];
        int kind = self->k[i];
        int write = kind == K_WRITE, exec = kind == K_EXEC;
        uint64_t hpfn;
        if (phase == PH_ENTER) {
            /* vcpu_enter_guest (tlb.TlbControl.enter_guest): requests pending go back to Python; else
             * publish IN_GUEST_MODE and look again (kvm_vcpu_exit_request), then the roots generation */
            if (__atomic_load_n(req, SEQ)) return result(R_ENTER, i, 0, 0, 0);
            __atomic_store_n(mode, MODE_IN_GUEST, SEQ);
            if (__atomic_load_n(req, SEQ)) {
                __atomic_store_n(mode, MODE_OUTSIDE, SEQ);
                return result(R_ENTER, i, 0, 0, 0);
            }
            if (__atomic_load_n(&cw[self->roots_gen_word], SEQ) != roots_gen) return result(R_RELOAD, i, 0, 0, 0);
            phase = PH_WALK;
        }
        if (phase == PH_NEW && __atomic_load_n(mode, SEQ) == MODE_EXITING) {
            /* a flusher's kick: its IPI arrives at this boundary, a VM exit (Vcpu.take_kick) */
            st[C_KICKS]++;
            __atomic_store_n(mode, MODE_OUTSIDE, SEQ);
            return result(R_KICK, i, 0, 0, 0);
        }
        if (phase != PH_WALK) {
            int level;
            TlbEntry *e = tlb_lookup(t, gfn, &level);
            if (e != NULL && (e->writable || !write) && (e->executable || !exec)) {
                if (phase != PH_CHECKED) {
                    st[C_HITS]++;
                    if (debug && e->has_src) {
                        /* guest.Vcpu._check_fresh: a source leaf that no longer grants the access
                         * needs a flush in progress (changes whose flush has not returned) */
                        uint64_t cached = e->spte;
                        uint64_t now = __atomic_load_n(&tw[e->src], SEQ);
                        if (!(now == cached || ((now & BIT_PRESENT) && (now & PFN_MASK) == (cached & PFN_MASK)
                                                && ((now & BIT_W) || !write))
                              || split_still_maps(tw, self->tn, now, cached, level, bits, gfn, write))
                            && !__atomic_load_n(&cw[self->unflushed_word], SEQ))
                            return result(R_STALE, i, gfn, cached, now);
                    }
                }
                hpfn = e->pfn + (gfn & ((1ULL << (bits * (level - 1))) - 1));
                goto access;
            }
            st[C_MISSES]++;
        }
        {
            Py_ssize_t sptep;
            uint64_t spte;
            long level;
            int ok = proc_walk(self, (uint64_t)root, gfn, write, exec, &sptep, &spte, &level);
            if (ok < 0) return NULL;
            if (!ok) {
                /* an EPT violation: it drops gfn's cached mappings, and the exit leaves guest mode
                 * (Vcpu.ept_violation, tlb.TlbControl.exit_guest) */
                tlb_invalidate(t, gfn);
                __atomic_store_n(mode, MODE_OUTSIDE, SEQ);
                return result(R_FAULT, i, gfn, write, exec);
            }
            /* a translation cached with D clear does not take a write: the write walks again to set D,
             * as the processor does (the D-bit assist) */
            uint64_t base = (spte & PFN_MASK) >> 12;
            tlb_insert(t, gfn, (int)level, base, (spte & BIT_W) && (spte & BIT_D), (spte & BIT_X) != 0, 1,
                       (uint64_t)sptep, spte);
            hpfn = base + (gfn & ((1ULL << (bits * (level - 1))) - 1));
        }
access:
        if (hpfn >= self->dn || (debug && hpfn >= self->hn)) {     /* `touched` is one word without debug */
            PyErr_Format(PyExc_IndexError, "gfn 0x%llx translates to host page 0x%llx outside guest memory",
                         (unsigned long long)gfn, (unsigned long long)hpfn);
            return NULL;
        }
        st[C_ACCESSES]++;
        if (write) {
            uint64_t value = vbase | (gfn & GFN_MASK);
            st[C_WRITES]++;
            if (debug) {
                __atomic_fetch_or(&hw[hpfn], TOUCHED | WRITTEN, SEQ);   /* what the host must hear of */
                uint64_t old = __atomic_exchange_n(&dw[hpfn], value, SEQ);
                if (old == DATA_POISON) return result(R_POISON, i, gfn, hpfn, value);
            } else {
                __atomic_store_n(&dw[hpfn], value, SEQ);
            }
        } else {
            st[exec ? C_FETCHES : C_READS]++;
            if (debug) __atomic_fetch_or(&hw[hpfn], TOUCHED, SEQ);
            uint64_t v = __atomic_load_n(&dw[hpfn], SEQ);
            if (debug && v == DATA_POISON) return result(R_POISON, i, gfn, hpfn, v);
            if (v && (v & GFN_MASK) != (gfn & GFN_MASK) && (v >> 63)) return result(R_CORRUPT, i, gfn, v, 0);
        }
    }
    return result(R_END, end, 0, 0, 0);
}

/* take_counters() -> the counters since the last call (accesses, reads, writes, hits, misses, walks,
 * fetches, paging-structure-cache hits, A/D re-walks, kicks), and zero them */
static PyObject *
Processor_take_counters(Processor *self, PyObject *unused)
{
    unsigned long long *c = self->counters;
    PyObject *r = Py_BuildValue("(KKKKKKKKKK)", c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]);
    if (r != NULL) memset(self->counters, 0, sizeof self->counters);
    return r;
}

static PyObject *
Processor_release(Processor *self, PyObject *unused)
{
    Processor_release_all(self);
    Py_RETURN_NONE;
}

static PyMethodDef Processor_methods[] = {
    {"batch", (PyCFunction)(void (*)(void))Processor_batch, METH_FASTCALL, "batch(gfns, kinds)"},
    {"run", (PyCFunction)(void (*)(void))Processor_run, METH_FASTCALL,
     "run(start, end, vbase, root, phase, roots_gen) -> (reason, index, a, b, c)"},
    {"walk", (PyCFunction)(void (*)(void))Processor_walk, METH_FASTCALL,
     "walk(gfn, write, exec, root) -> (sptep, spte, level) or None: one TLB miss's walk"},
    {"take_counters", (PyCFunction)Processor_take_counters, METH_NOARGS,
     "the counters since the last call, zeroed: (accesses, reads, writes, hits, misses, walks, fetches, "
     "psc_hits, ad_rewalks, kicks)"},
    {"release", (PyCFunction)Processor_release, METH_NOARGS, "let go of every buffer (the region may close)"},
    {NULL}
};

static PyMemberDef Processor_members[] = {
    {"tlb", T_OBJECT, offsetof(Processor, tlb), READONLY, "the TLB the loop uses"},
    {"ad_race_every", T_INT, offsetof(Processor, ad_race_every), 0,
     "test seam: every Nth A/D update loses its compare-exchange to another processor's update (0: never)"},
    {NULL}
};

static PyTypeObject ProcessorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._walker.Processor",
    .tp_basicsize = sizeof(Processor),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Processor(tlb, tables, data, touched, ctl, wstate, tmeta, root_level, bits, debug, unflushed_word, "
              "roots_gen_word, mode_word, req_word, report): a vCPU's guest-access loop",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Processor_init,
    .tp_dealloc = (destructor)Processor_dealloc,
    .tp_methods = Processor_methods,
    .tp_members = Processor_members,
};

/* ------------------------------------------------------------------ the module */

static PyMethodDef methods[] = {
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_walker",
    "The processor's side of guest accesses: the EPT walk with its A/D update, the TLB and paging-structure "
    "caches, the access loop.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__walker(void)
{
    if (PyType_Ready(&TlbType) < 0 || PyType_Ready(&ProcessorType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&TlbType);
    Py_INCREF(&ProcessorType);
    if (PyModule_AddObject(m, "Tlb", (PyObject *)&TlbType) < 0
        || PyModule_AddObject(m, "Processor", (PyObject *)&ProcessorType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* what this file assumes of spte.py, layout.py, memslots.py, pool.py, tlb.py and workloads.py (guest.py checks) */
    PyObject *bits = Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsisisisisKs(iiii)sisisKsKsKsK}",
        "WRITABLE", BIT_W, "EXECUTABLE", BIT_X, "LARGE", BIT_LARGE, "ACCESSED", BIT_A, "DIRTY", BIT_D,
        "MMU_PRESENT", BIT_PRESENT, "RWX", BIT_RWX, "PFN_MASK", PFN_MASK, "DATA_POISON", DATA_POISON,
        "TOUCHED", TOUCHED, "WRITTEN", WRITTEN, "GFN_MASK", GFN_MASK,
        "READ", K_READ, "WRITE", K_WRITE, "EXEC", K_EXEC, "N_COUNTERS", N_COUNTERS, "TABLE_POISON", TABLE_POISON,
        "PSC_SLOTS", psc_slots[0], psc_slots[1], psc_slots[2], psc_slots[3], "TMETA_WORDS", TMETA_WORDS,
        "TMETA_GEN", TMETA_GEN, "OUTSIDE", MODE_OUTSIDE, "IN_GUEST", MODE_IN_GUEST, "EXITING", MODE_EXITING,
        "REQ_TLB_FLUSH", REQ_TLB_FLUSH);
    if (bits == NULL || PyModule_AddObject(m, "ASSUMED", bits) < 0) {
        Py_XDECREF(bits);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
