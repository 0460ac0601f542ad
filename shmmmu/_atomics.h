/* _atomics.h: the Words type shared by the atomics (_atomics.c) and the lock fast paths (_locks.c). */
#ifndef SHMMMU_ATOMICS_H
#define SHMMMU_ATOMICS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define SEQ __ATOMIC_SEQ_CST

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    uint64_t *w;
    Py_ssize_t n;
    int readonly;
} Words;

extern PyTypeObject WordsType;

/* _locks.c: add the lock fast-path base types to the module */
int shmmmu_add_lock_types(PyObject *module);

#endif
