# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled glue between engine/wasm.py and wasmtime's unchecked C API.

The same operations as the ctypes code in wasm.py (which stays as the fallback), without
ctypes' per-call costs: guest calls straight into ``wasmtime_func_call_unchecked``, one C
trampoline for every host function (arguments unpacked from the raw value array into
Python ints, the Python function called directly), and linear memory read and written
through the data pointer, re-read on every access (two plain C calls).

No wasmtime headers or link-time dependency: ``setup()`` receives the addresses of the C
functions from the library wasmtime-py has loaded, so both use one copy of wasmtime.

Guest calls of a serving VM keep the GIL (ctypes releases and re-takes it around every
call, a futex hand-off whenever another thread waits for it); until then (``keep_gil``
false: a VM being started in a worker thread) they release it, so the event loop goes on
meanwhile. Host calls inside a serving VM's guest call know that their thread holds the
GIL (a thread-local flag), so they skip the PyGILState round trip. The epoch that
interrupts a runaway guest is advanced by ``run_epoch_ticker``, which runs without the
GIL for good.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport usleep


cdef extern from "Python.h":
    unsigned long long PyLong_AsUnsignedLongLongMask(object) except? <unsigned long long>-1
    ctypedef object (*getter)(object, void *)  # a new reference, or NULL with an exception set
    ctypedef struct PyGetSetDef:
        getter get
        void *closure
    ctypedef struct PyGetSetDescrObject:
        PyGetSetDef *d_getset


cdef extern from *:
    """
    /* wasmtime_val_raw_t: one 16-byte slot per argument or result. */
    typedef union {
        int32_t i32;
        int64_t i64;
        float f32;
        double f64;
        uint8_t v128[16];
        uint32_t anyref;
        uint32_t externref;
        void *funcref;
    } wg_val_raw_t;

    /* Whether this thread holds the GIL through its current guest call (a keep_gil
       Core's): host calls then skip the PyGILState round trip. Per thread: another
       thread's VM may be starting meanwhile with the GIL released. */
    static __thread int wg_gil_held __attribute__((tls_model("initial-exec")));
    """
    ctypedef union wg_val_raw_t:
        int32_t i32
        int64_t i64
    int wg_gil_held


ctypedef void *(*call_unchecked_t)(void *, const void *, wg_val_raw_t *, size_t, void **) noexcept nogil
ctypedef uint8_t *(*mem_data_t)(const void *, const void *) noexcept nogil
ctypedef size_t (*mem_size_t)(const void *, const void *) noexcept nogil
ctypedef void (*set_deadline_t)(void *, uint64_t) noexcept nogil
ctypedef void *(*trap_new_t)(const char *, size_t) noexcept nogil
ctypedef void (*increment_epoch_t)(void *) noexcept nogil

cdef call_unchecked_t _call_unchecked = NULL
cdef mem_data_t _mem_data = NULL
cdef mem_size_t _mem_size = NULL
cdef set_deadline_t _set_deadline = NULL
cdef trap_new_t _trap_new = NULL
cdef increment_epoch_t _increment_epoch = NULL

cdef enum:
    MAX_SLOTS = 16  # arguments/results of one call, as wasm.py's ctypes buffers

cdef object _HostError = None
cdef object _GetSetDescriptor = type(type.__dict__["__name__"])  # types.GetSetDescriptorType


def setup(size_t call_unchecked, size_t mem_data, size_t mem_size, size_t set_deadline, size_t trap_new,
          size_t increment_epoch, host_error):
    """Addresses of the wasmtime C functions, and the exception class whose message is the trap's."""
    global _call_unchecked, _mem_data, _mem_size, _set_deadline, _trap_new, _increment_epoch, _HostError
    _call_unchecked = <call_unchecked_t>call_unchecked
    _mem_data = <mem_data_t>mem_data
    _mem_size = <mem_size_t>mem_size
    _set_deadline = <set_deadline_t>set_deadline
    _trap_new = <trap_new_t>trap_new
    _increment_epoch = <increment_epoch_t>increment_epoch
    _HostError = host_error


def run_epoch_ticker(engine, size_t engine_ptr, unsigned int period_us):
    """Advance the engine's epoch every ``period_us`` forever, never holding the GIL.

    ``engine`` (the wasmtime-py object) stays referenced by this frame, so the engine is
    never freed under the ticker, also not at interpreter exit.
    """
    cdef void *e = <void *>engine_ptr
    with nogil:
        while True:
            usleep(period_us)
            _increment_epoch(e)


cdef inline uint64_t _u32(long long v) noexcept nogil:
    return <uint32_t>v  # the low 32 bits, as Python's v & 0xFFFFFFFF


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)  # time.perf_counter's clock, without a float object
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class CallStats:
    """A plugin's guest-call figures; ``Core.call_args`` counts calls and time in C."""

    cdef public long long calls  # guest callbacks
    cdef public long long errors  # callbacks that trapped
    cdef public double seconds  # time spent in guest callbacks
    cdef public long long failed_streams  # streams the fail strategy handled


cdef class Core:
    """The hot operations of one ``Instance``: its store context and linear memory."""

    cdef void *ctx
    cdef void *mem
    cdef object owner  # the Instance: its _trap_from
    cdef object keep  # the ctypes objects behind ctx and mem
    cdef public uint64_t deadline
    cdef public bint keep_gil

    def __cinit__(self, owner, size_t ctx, size_t mem, keep, uint64_t deadline):
        self.owner = owner
        self.ctx = <void *>ctx
        self.mem = <void *>mem
        self.keep = keep
        self.deadline = deadline
        self.keep_gil = False

    cdef int _invoke(self, tuple raw, tuple args, wg_val_raw_t *buf) except -1:
        # raw: (function address, params, results, slots, name) from GuestFunc.raw
        global wg_gil_held
        cdef void *trap = NULL
        cdef void *err
        cdef Py_ssize_t i
        cdef Py_ssize_t nparams = <Py_ssize_t>raw[1]
        cdef const void *func = <const void *><size_t>raw[0]
        cdef size_t slots = <size_t>raw[3]
        if len(args) < nparams:
            raise TypeError(f"{raw[4]}: expected {nparams} arguments, got {len(args)}")
        for i in range(nparams):  # extra args are dropped: ABI 0.1.0 callbacks take fewer
            buf[i].i64 = <int64_t>PyLong_AsUnsignedLongLongMask(args[i])
        cdef int held = wg_gil_held  # restored after: host calls may nest guest calls
        if self.keep_gil:
            wg_gil_held = 1
            err = _call_unchecked(self.ctx, func, buf, slots, &trap)
        else:
            wg_gil_held = 0
            with nogil:
                err = _call_unchecked(self.ctx, func, buf, slots, &trap)
        wg_gil_held = held
        if err != NULL or trap != NULL:
            raise self.owner._trap_from(<size_t>err or None, <size_t>trap or None, raw[4])
        return 0

    cdef inline int _call_top(self, fn, tuple args) except? -1:
        cdef wg_val_raw_t buf[MAX_SLOTS]
        cdef tuple raw = fn.raw
        _set_deadline(self.ctx, self.deadline)
        self._invoke(raw, args, buf)
        return buf[0].i32 if raw[2] else 0

    def call(self, fn, *args):
        """A top-level guest call (the CPU deadline restarts); its i32 result, or 0."""
        return self._call_top(fn, args)

    def call_args(self, fn, tuple args, CallStats stats):
        """``call`` with the arguments as one tuple (no repacking per call), counted in
        ``stats``."""
        cdef double t0 = _now()
        stats.calls += 1
        try:
            return self._call_top(fn, args)
        finally:
            stats.seconds += _now() - t0

    def call_reentrant(self, fn, *args):
        """A guest call from inside a host function; its result as u32, or 0."""
        cdef wg_val_raw_t buf[MAX_SLOTS]
        cdef tuple raw = fn.raw
        self._invoke(raw, args, buf)
        return <uint32_t>buf[0].i32 if raw[2] else 0

    cdef inline uint8_t *_span(self, uint64_t ptr, uint64_t size) noexcept:
        """The host address of guest [ptr, ptr+size), or NULL when outside memory."""
        if ptr + size > _mem_size(self.ctx, self.mem):
            return NULL
        return _mem_data(self.ctx, self.mem) + ptr

    def memory_size(self):
        return _mem_size(self.ctx, self.mem)

    def read(self, long long ptr, long long size):
        """Guest bytes, or None when [ptr, ptr+size) is outside linear memory."""
        cdef uint64_t n = <uint64_t>size if size >= 0 else _u32(size)
        cdef uint8_t *p = self._span(_u32(ptr), n)
        if p == NULL:
            return None
        return PyBytes_FromStringAndSize(<char *>p, <Py_ssize_t>n)

    cdef bint _write(self, uint64_t ptr, data) except -1:
        cdef Py_buffer view
        cdef uint8_t *p
        if type(data) is bytes:
            p = self._span(ptr, <uint64_t>PyBytes_GET_SIZE(data))
            if p == NULL:
                return False
            memcpy(p, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            return True
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = self._span(ptr, <uint64_t>view.len)
            if p == NULL:
                return False
            memcpy(p, view.buf, view.len)
            return True
        finally:
            PyBuffer_Release(&view)

    cdef bint _write_u32(self, uint64_t ptr, uint32_t v) noexcept:
        cdef uint8_t *p = self._span(ptr, 4)
        if p == NULL:
            return False
        p[0] = v & 0xFF
        p[1] = (v >> 8) & 0xFF
        p[2] = (v >> 16) & 0xFF
        p[3] = (v >> 24) & 0xFF
        return True

    def write(self, long long ptr, data):
        return self._write(_u32(ptr), data)

    def write_u32(self, long long ptr, value):
        return self._write_u32(_u32(ptr), <uint32_t>PyLong_AsUnsignedLongLongMask(value))

    def write_u64(self, long long ptr, value):
        cdef uint64_t v = <uint64_t>PyLong_AsUnsignedLongLongMask(value)
        cdef uint8_t *p = self._span(_u32(ptr), 8)
        cdef int i
        if p == NULL:
            return False
        for i in range(8):
            p[i] = (v >> (8 * i)) & 0xFF
        return True

    def copy_out(self, alloc, data, long long ptr_ptr, long long size_ptr):
        """Allocate ``len(data)`` bytes in the guest with ``alloc``, copy ``data`` there and
        write its pointer and size to ``ptr_ptr``/``size_ptr``; False on a bad address."""
        cdef wg_val_raw_t buf[MAX_SLOTS]
        cdef Py_ssize_t n = len(data)
        cdef uint64_t ptr = 0
        if n:
            self._invoke(alloc.raw, (n,), buf)
            ptr = <uint32_t>buf[0].i32
            if ptr == 0 or not self._write(ptr, data):
                return False
        return self._write_u32(_u32(ptr_ptr), <uint32_t>ptr) and self._write_u32(_u32(size_ptr), <uint32_t>n)


cdef class HostBinding:
    """One host import: how to call ``impl`` with the guest's arguments."""

    cdef object impl
    cdef object bound  # passed first when not None (the PluginVM)...
    cdef object bound_attr  # ... or this attribute of it, read at each call (SharedVM.current)
    cdef getter attr_get  # that attribute's C getter, when it has one (a compiled class's field)
    cdef void *attr_closure
    cdef char kinds[MAX_SLOTS]  # 'i' or 'I' per parameter
    cdef Py_ssize_t nparams
    cdef char result  # 0, 'i' or 'I'
    cdef object owner  # the Instance: host_error
    cdef str label

    def __cinit__(self, impl, bound, str bound_attr, str params, str results, owner, str label):
        cdef Py_ssize_t i
        if len(params) > MAX_SLOTS:
            raise ValueError(f"{label}: more than {MAX_SLOTS} parameters")
        self.impl = impl
        self.bound = bound
        self.bound_attr = bound_attr or None
        self.attr_get = NULL
        if self.bound_attr is not None and bound is not None:
            for cls in type(bound).__mro__:  # the descriptor getattr() would find first
                d = cls.__dict__.get(bound_attr)
                if d is not None:
                    if type(d) is _GetSetDescriptor:  # called directly: no lookup by name per call
                        self.attr_get = (<PyGetSetDescrObject *>d).d_getset.get
                        self.attr_closure = (<PyGetSetDescrObject *>d).d_getset.closure
                    break
        self.nparams = len(params)
        for i in range(self.nparams):
            self.kinds[i] = ord(params[i])
        self.result = ord(results) if results else 0
        self.owner = owner
        self.label = label

    cdef inline object _arg(self, wg_val_raw_t *args, Py_ssize_t i):
        if self.kinds[i] == b'i':
            return args[i].i32
        return args[i].i64

    cdef object _dispatch(self, wg_val_raw_t *args):
        cdef object f = self.impl
        cdef object b = self.bound
        cdef Py_ssize_t n = self.nparams
        if self.attr_get != NULL:
            b = self.attr_get(b, self.attr_closure)
        elif self.bound_attr is not None:
            b = getattr(b, self.bound_attr)
        cdef list rest
        if b is not None:
            if n == 0:
                return f(b)
            if n == 1:
                return f(b, self._arg(args, 0))
            if n == 2:
                return f(b, self._arg(args, 0), self._arg(args, 1))
            if n == 3:
                return f(b, self._arg(args, 0), self._arg(args, 1), self._arg(args, 2))
            if n == 4:
                return f(b, self._arg(args, 0), self._arg(args, 1), self._arg(args, 2), self._arg(args, 3))
            if n == 5:
                return f(b, self._arg(args, 0), self._arg(args, 1), self._arg(args, 2), self._arg(args, 3),
                         self._arg(args, 4))
            if n == 8:  # proxy_send_local_response, once per local reply
                return f(b, self._arg(args, 0), self._arg(args, 1), self._arg(args, 2), self._arg(args, 3),
                         self._arg(args, 4), self._arg(args, 5), self._arg(args, 6), self._arg(args, 7))
            rest = [b]
        else:
            rest = []
        for i in range(n):
            rest.append(self._arg(args, i))
        return f(*rest)

    cdef void *_fail(self, BaseException e) noexcept:
        cdef bytes raw
        try:
            self.owner.host_error = e
            if isinstance(e, _HostError):
                msg = str(e)
            else:
                msg = f"host function {self.label} failed: {e}"
            raw = msg.encode("utf-8", "replace")
        except BaseException:
            raw = b"host function failed"
        return _trap_new(PyBytes_AS_STRING(raw), <size_t>PyBytes_GET_SIZE(raw))


ctypedef void *(*_host_call_t)(void *, wg_val_raw_t *) noexcept nogil


cdef void *host_trampoline(void *env, void *caller, wg_val_raw_t *args, size_t nargs) noexcept nogil:
    if wg_gil_held:  # this thread holds the GIL (see wg_gil_held): call in directly
        return (<_host_call_t>_host_call)(env, args)
    with gil:
        return _host_call(env, args)


cdef void *_host_call(void *env, wg_val_raw_t *args) noexcept:
    cdef HostBinding b = <HostBinding>env
    cdef object r
    try:
        r = b._dispatch(args)
        if b.result == b'i':
            args[0].i32 = <int32_t>PyLong_AsUnsignedLongLongMask(r) if r else 0
        elif b.result == b'I':
            args[0].i64 = <int64_t>PyLong_AsUnsignedLongLongMask(r) if r else 0
        return NULL
    except BaseException as e:
        return b._fail(e)


def trampoline_address():
    """The C callback to register (with a HostBinding as its env) for every host import."""
    return <size_t>&host_trampoline
