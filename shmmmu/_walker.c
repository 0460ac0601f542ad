/* _walker: the hardware's EPT page walk, in C, for the vCPU's guest side.
 *
 * On a TLB miss the processor walks the tables without any lock and sets the
 * accessed (and, on a write, dirty) bit of the leaf with a locked
 * compare-exchange that fails if the entry changed.  That is hardware, not KVM
 * code, so it is done here rather than in Python; guest.Vcpu.hw_walk_reference
 * is the same walk in Python, and the tests check the two agree.
 *
 * The bit positions are spte.py's (EPT, KVM 5.13+ layout); spte.py asserts them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define SEQ __ATOMIC_SEQ_CST
#define BIT_W        (1ULL << 1)
#define BIT_X        (1ULL << 2)
#define BIT_LARGE    (1ULL << 7)
#define BIT_A        (1ULL << 8)
#define BIT_D        (1ULL << 9)
#define BIT_RWX      7ULL           /* EPT read, write, execute: what the processor tests for presence */
#define PFN_MASK     (((1ULL << 52) - 1) & ~((1ULL << 12) - 1))

/* walk(tables, root, root_level, bits, gfn, write, exec)
 *   -> (sptep, spte, level) of the leaf after its A/D update, or None for an EPT violation
 * `tables` is a writable C-contiguous buffer of uint64 (the table pool). */
static PyObject *
walk(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "walk(tables, root, root_level, bits, gfn, write, exec)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    uint64_t *w = (uint64_t *)view.buf;
    Py_ssize_t n = view.len / 8;
    long long root = PyLong_AsLongLong(args[1]);
    long level = PyLong_AsLong(args[2]);
    long bits = PyLong_AsLong(args[3]);
    unsigned long long gfn = PyLong_AsUnsignedLongLong(args[4]);
    int write = PyObject_IsTrue(args[5]);
    int exec = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred() || bits < 1 || bits > 9 || level < 1 || level > 5) {
        PyBuffer_Release(&view);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad walk geometry");
        return NULL;
    }
    uint64_t entries = 1ULL << bits, mask = entries - 1, table = (uint64_t)root, spte = 0;
    Py_ssize_t i = 0;
    for (;;) {
        uint64_t idx = (gfn >> (bits * (level - 1))) & mask;
        uint64_t at = table * entries + idx;
        if (table >= (uint64_t)n / entries || at >= (uint64_t)n) {   /* a garbage pointer: not ours to follow */
            PyBuffer_Release(&view);
            Py_RETURN_NONE;
        }
        i = (Py_ssize_t)at;
        spte = __atomic_load_n(&w[i], SEQ);
        if (!(spte & BIT_RWX)) goto violation;      /* EPT presence: any of R/W/X (bit 11 is KVM's) */
        if (level == 1 || (spte & BIT_LARGE)) break;
        table = (spte & PFN_MASK) >> 12;
        level--;
    }
    if ((write && !(spte & BIT_W)) || (exec && !(spte & BIT_X))) goto violation;
    uint64_t want = spte | BIT_A | (write ? BIT_D : 0);
    if (want != spte) {
        uint64_t seen = spte;
        if (!__atomic_compare_exchange_n(&w[i], &seen, want, 0, SEQ, SEQ)) goto violation;
        spte = want;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nKl)", i, (unsigned long long)spte, level);
violation:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(tables, root, root_level, bits, gfn, write, exec) -> (sptep, spte, level) or None"},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_walker", "The hardware's EPT page walk with its A/D update.", -1, methods,
};

PyMODINIT_FUNC
PyInit__walker(void)
{
    return PyModule_Create(&moduledef);
}
