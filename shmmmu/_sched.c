/* _sched: the explorer's bookkeeping at a scheduling point that decides nothing, in C.
 *
 * Every operation an explorer execution makes on a shared word is a scheduling
 * point (shmmmu/explore/sched.py).  Most decide nothing: the word is no
 * decision's (no two actors met on it, at least one writing, in any execution
 * seen so far), so the point only counts the step, checks the step bound and
 * the violation record, and notes the word as the actor's (for the words that
 * turn out to conflict, and for the spinners' wake-up).  As Python that was most
 * of an execution's cost.  Two base types carry it:
 *
 *   ActorCore  members state, dirty, reads, rset, wset: runnable or waiting (how), whether another actor wrote a
 *              word this one touched since it last spun, the words (keys) it
 *              touched since then (kept only while not dirty: a dirty actor's
 *              next spin forgets them unread), and every word it read, wrote.
 *   SchedCore  members steps, step_bound, current, actors, _choices, _vio_owner,
 *              _vio_addr; methods
 *              _note(key, write): True when the point must be taken in full
 *                (Scheduler._point: a decision's word, or every point decides,
 *                the step bound passed, a violation recorded), changing nothing;
 *                else the step counted and the word noted, False;
 *              _wrote(key): a word changed: every other actor not yet dirty
 *                that touched it since it last spun is dirty;
 *              enabled(): the actors that may run, a spinner whose word
 *                changed runnable again.
 *
 * shmmmu.explore.sched.Actor and Scheduler derive from them; Scheduler._point
 * does what _note does, in Python, for the points it hands back, and
 * tests/model/test_explore_handles.py holds the searches equal either way.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

/* Actor.state: what shmmmu/explore/sched.py calls RUN and SPIN */
#define STATE_RUN 0
#define STATE_SPIN 1

typedef struct {
    PyObject_HEAD
    int state;
    char dirty;
    PyObject *reads;
    PyObject *rset;
    PyObject *wset;
} ActorCore;

static int
Actor_traverse(ActorCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->reads);
    Py_VISIT(self->rset);
    Py_VISIT(self->wset);
    return 0;
}

static int
Actor_clear(ActorCore *self)
{
    Py_CLEAR(self->reads);
    Py_CLEAR(self->rset);
    Py_CLEAR(self->wset);
    return 0;
}

static void
Actor_dealloc(ActorCore *self)
{
    PyObject_GC_UnTrack(self);
    Actor_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Actor_members[] = {
    {"state", T_INT, offsetof(ActorCore, state), 0, "runnable, spinning, asleep or done (sched.py's RUN ... DONE)"},
    {"dirty", T_BOOL, offsetof(ActorCore, dirty), 0, "another actor wrote a word this one touched since it last spun"},
    {"reads", T_OBJECT_EX, offsetof(ActorCore, reads), 0, "the words (keys) it touched since it last spun"},
    {"rset", T_OBJECT_EX, offsetof(ActorCore, rset), 0, "every word (key) it read in this execution"},
    {"wset", T_OBJECT_EX, offsetof(ActorCore, wset), 0, "every word (key) it wrote in this execution"},
    {NULL},
};

static PyTypeObject ActorCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._sched.ActorCore",
    .tp_basicsize = sizeof(ActorCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An explorer actor's scheduling state that every point touches (shmmmu.explore.sched.Actor).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Actor_dealloc,
    .tp_traverse = (traverseproc)Actor_traverse,
    .tp_clear = (inquiry)Actor_clear,
    .tp_members = Actor_members,
};

typedef struct {
    PyObject_HEAD
    long long steps;
    long long step_bound;
    PyObject *current;      /* the running actor (an ActorCore), or None */
    PyObject *actors;       /* list of ActorCore */
    PyObject *choices;      /* the decisions' keys (a set), or None: every point decides */
    PyObject *vio_owner;    /* what keeps the violation word's memory mapped */
    unsigned long long vio_addr;    /* the first violation's kind: nonzero once one is recorded (0: none) */
} SchedCore;

static int
Sched_traverse(SchedCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->current);
    Py_VISIT(self->actors);
    Py_VISIT(self->choices);
    Py_VISIT(self->vio_owner);
    return 0;
}

static int
Sched_clear(SchedCore *self)
{
    Py_CLEAR(self->current);
    Py_CLEAR(self->actors);
    Py_CLEAR(self->choices);
    Py_CLEAR(self->vio_owner);
    return 0;
}

static void
Sched_dealloc(SchedCore *self)
{
    PyObject_GC_UnTrack(self);
    Sched_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Sched_note(SchedCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_note(key, write) takes 2 arguments");
        return NULL;
    }
    PyObject *key = args[0];
    int write = PyObject_IsTrue(args[1]);
    if (write < 0) return NULL;
    long long steps = self->steps + 1;
    if (steps > self->step_bound) Py_RETURN_TRUE;
    if (self->vio_addr && __atomic_load_n((const uint64_t *)(uintptr_t)self->vio_addr, __ATOMIC_SEQ_CST))
        Py_RETURN_TRUE;
    PyObject *choices = self->choices;
    if (choices == NULL || !PyAnySet_Check(choices)) Py_RETURN_TRUE;
    int c = PySet_Contains(choices, key);
    if (c < 0) return NULL;
    if (c) Py_RETURN_TRUE;
    PyObject *cur = self->current;
    if (cur == NULL || !PyObject_TypeCheck(cur, &ActorCoreType)) Py_RETURN_TRUE;
    ActorCore *a = (ActorCore *)cur;
    PyObject *mine = write ? a->wset : a->rset;
    if (mine == NULL || a->reads == NULL) Py_RETURN_TRUE;
    if (PySet_Add(mine, key) < 0) return NULL;
    if (!a->dirty && PySet_Add(a->reads, key) < 0) return NULL;
    self->steps = steps;
    Py_RETURN_FALSE;
}

static PyObject *
Sched_wrote(SchedCore *self, PyObject *key)
{
    PyObject *actors = self->actors;
    if (actors == NULL || !PyList_Check(actors)) {
        PyErr_SetString(PyExc_TypeError, "_wrote: the actors must be a list");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(actors); k++) {
        PyObject *o = PyList_GET_ITEM(actors, k);
        if (o == self->current || !PyObject_TypeCheck(o, &ActorCoreType)) continue;
        ActorCore *a = (ActorCore *)o;
        if (a->dirty || a->reads == NULL) continue;
        int c = PySet_Contains(a->reads, key);
        if (c < 0) return NULL;
        if (c) a->dirty = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *
Sched_enabled(SchedCore *self, PyObject *unused)
{
    PyObject *actors = self->actors;
    if (actors == NULL || !PyList_Check(actors)) {
        PyErr_SetString(PyExc_TypeError, "enabled: the actors must be a list");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(actors); k++) {
        PyObject *o = PyList_GET_ITEM(actors, k);
        if (!PyObject_TypeCheck(o, &ActorCoreType)) continue;
        ActorCore *a = (ActorCore *)o;
        if (a->state == STATE_SPIN && a->dirty) a->state = STATE_RUN;     /* a word it spins on changed */
        if (a->state == STATE_RUN && PyList_Append(out, o) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyMethodDef Sched_methods[] = {
    {"enabled", (PyCFunction)Sched_enabled, METH_NOARGS,
     "enabled(): the actors that may run now, in id order (a spinner whose word changed runs again)"},
    {"_note", (PyCFunction)(void (*)(void))Sched_note, METH_FASTCALL,
     "_note(key, write): True if the point must be taken in full, else the step counted and the word noted"},
    {"_wrote", (PyCFunction)Sched_wrote, METH_O, "_wrote(key): the word changed: wake the actors that touched it"},
    {NULL},
};

static PyMemberDef Sched_members[] = {
    {"steps", T_LONGLONG, offsetof(SchedCore, steps), 0, "operations so far in this execution"},
    {"step_bound", T_LONGLONG, offsetof(SchedCore, step_bound), 0, "an execution longer than this is a livelock"},
    {"current", T_OBJECT, offsetof(SchedCore, current), 0, "the running actor"},
    {"actors", T_OBJECT, offsetof(SchedCore, actors), 0, "the actors, by id"},
    {"_choices", T_OBJECT, offsetof(SchedCore, choices), 0, "the decisions' keys, or None: every point"},
    {"_vio_owner", T_OBJECT, offsetof(SchedCore, vio_owner), 0, "keeps the violation word mapped"},
    {"_vio_addr", T_ULONGLONG, offsetof(SchedCore, vio_addr), 0, "the violation word's address (0: none)"},
    {NULL},
};

static PyTypeObject SchedCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmmmu._sched.SchedCore",
    .tp_basicsize = sizeof(SchedCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The explorer scheduler's per-point state and its fast path (shmmmu.explore.sched.Scheduler).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Sched_dealloc,
    .tp_traverse = (traverseproc)Sched_traverse,
    .tp_clear = (inquiry)Sched_clear,
    .tp_members = Sched_members,
    .tp_methods = Sched_methods,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_sched",
    "The explorer's bookkeeping at a scheduling point that decides nothing (shmmmu/_sched.c).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__sched(void)
{
    if (PyType_Ready(&ActorCoreType) < 0 || PyType_Ready(&SchedCoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&ActorCoreType);
    if (PyModule_AddObject(m, "ActorCore", (PyObject *)&ActorCoreType) < 0) {
        Py_DECREF(&ActorCoreType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&SchedCoreType);
    if (PyModule_AddObject(m, "SchedCore", (PyObject *)&SchedCoreType) < 0) {
        Py_DECREF(&SchedCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
