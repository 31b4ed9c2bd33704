# Declarations of the compact registry structures (definitions in _registry.pyx).


cdef class Interner:
    # One shared str object per distinct string: tags, meta keys, zones and versions repeat across
    # thousands of instances, and sharing them is most of the memory a registry saves.
    cdef dict _strings
    cdef readonly Py_ssize_t hits
