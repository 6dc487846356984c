"""The untrusted side of grading: run a student's exercise cells, then serve calls.

This file runs as a script in its own process, one per submission::

    python -I -B sandbox.py FD_IN FD_OUT CONFIG_JSON

``-I`` keeps ``PYTHONPATH``, the user site and the current folder off
``sys.path``, so the script imports only the standard library and torch, and
``seqbook`` (as installed) when the chapter blocks some of its functions.  The trusted side (:mod:`seqbook.grading.submission`) starts it in
a fresh temporary folder and talks to it over two pipes; every message is a
length-prefixed ``torch.save`` payload that the trusted side reads back with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
and never runs code from the payload (unlike plain pickle).

Before any student code runs, the script locks itself in, outermost first:

1. resource limits: CPU seconds, data memory, file size, open files, no core dumps;
2. ``PR_SET_NO_NEW_PRIVS``; when root, every capability dropped (the trusted
   side has already switched to ``nobody`` where the interpreter allows it);
3. Landlock (Linux >= 5.13): writes only inside the sandbox folder, reads only
   from the Python installation, the system libraries and a few /proc and /dev
   files; no TCP; no signals to processes outside the sandbox (ABI >= 6);
4. seccomp (x86_64): no exec, no fork (threads are fine), no sockets, no
   ptrace, no signals to other processes, no mounts, namespaces or io_uring;
5. a ``sys.addaudithook`` hook that refuses the same things at the Python level
   with a readable message.  It is not a security boundary by itself (native
   code such as ``torch.save`` opens files without raising audit events); the
   kernel layers above are.

Before that, when the grading tests declare library functions that an exercise
must write itself (``FORBIDDEN``), the whole of ``seqbook`` is imported and those
functions are replaced by stand-ins (:func:`install_forbidden`); the library's
source then stays unreadable (Landlock and the audit hook), so it cannot be
loaded again.

Each layer that the machine cannot provide is skipped and reported in the
hello message, so the gradebook says how well each submission was contained.
"""

from __future__ import annotations

import builtins
import io
import json
import linecache
import os
import resource
import signal
import struct
import sys
import traceback

HEADER = struct.Struct(">Q")
MAX_MESSAGE = 64 << 20  # bytes; a bigger reply is refused by the trusted side
MAX_TEXT = 400  # characters kept of an error message

# ---------------------------------------------------------------- messages


def encode(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def decode(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(fd: int):
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size))
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is over the limit")
    return decode(_read_exact(fd, size))


def send(fd: int, obj) -> None:
    data = encode(obj)
    data = HEADER.pack(len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- limits


def apply_limits(cfg: dict) -> None:
    """Resource limits, set hard so the student cannot raise them again.

    Memory is limited with RLIMIT_DATA (heap and private anonymous mappings)
    rather than RLIMIT_AS: importing torch reserves 0.6-0.8 GB of address space
    on this CPU build, and far more with CUDA builds or many cores, while its
    data segment stays near 200 MB.  RLIMIT_DATA therefore limits what the
    student allocates, not what the libraries map.
    """
    cpu = int(cfg["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))  # SIGXCPU, then SIGKILL
    data = int(cfg["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (data, data))
    fsize = int(cfg["fsize_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    # A write past RLIMIT_FSIZE then fails with OSError(EFBIG) in the student's
    # code instead of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# ---------------------------------------------------------------- kernel layers

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _failed(call: str) -> OSError:
    import ctypes

    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def no_new_privs_and_parent_death(parent_pid: int) -> None:
    """No setuid binaries regain privileges; die with the grader's process."""
    ctypes, libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _failed("prctl(PR_SET_NO_NEW_PRIVS)")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(3)


def drop_capabilities() -> bool:
    """As root, give up every capability (bounding, ambient, effective, permitted)."""
    if os.geteuid() != 0:
        return False
    ctypes, libc = _libc()
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last one: ignored
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two __user_cap_data_struct, all zero
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise _failed("capset")
    return True


# Landlock (include/uapi/linux/landlock.h).  Syscall numbers are the same on every architecture.
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15


def landlock(write_dir: str, read_paths: list[str]) -> int:
    """Confine the file system (and TCP, and signals) with Landlock.

    Returns the Landlock ABI used, 0 when the kernel has none.  Only this
    thread and the threads it starts later are confined, so it runs while the
    sandbox is single-threaded (the caller checks).
    """
    ctypes, libc = _libc()
    abi = libc.syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION
    if abi < 1:
        return 0
    fs = (1 << 13) - 1  # ABI 1: execute ... make_sym
    if abi >= 2:
        fs |= _LL_REFER
    if abi >= 3:
        fs |= _LL_TRUNCATE
    if abi >= 5:
        fs |= _LL_IOCTL_DEV
    net = 0b11 if abi >= 4 else 0  # bind_tcp | connect_tcp, none allowed
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals, kept inside
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise _failed("landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_only = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV

    def allow(path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # missing on this machine: nothing to allow
        try:
            if not os.path.isdir(path):
                access &= file_only
            rule = PathBeneath(access & fs, fd)
            if libc.syscall(_LL_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:  # PATH_BENEATH
                raise _failed(f"landlock_add_rule({path})")
        finally:
            os.close(fd)

    try:
        for path in read_paths:
            allow(path, _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR)
        allow("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)
        allow(write_dir, fs)
        if libc.syscall(_LL_RESTRICT, ruleset, 0) != 0:
            raise _failed("landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# seccomp-bpf, x86_64 only (syscall numbers from asm/unistd_64.h).
_X86_64 = 0xC000003E  # AUDIT_ARCH_X86_64
_NR = dict(
    socket=41, clone=56, fork=57, vfork=58, execve=59, kill=62, ptrace=101, syslog=103, mknod=133,
    personality=135, vhangup=153, pivot_root=155, chroot=161, acct=163, mount=165, umount2=166,
    swapon=167, swapoff=168, reboot=169, iopl=172, ioperm=173, init_module=175, delete_module=176,
    quotactl=179, tkill=200, lookup_dcookie=212, tgkill=234, kexec_load=246, add_key=248,
    request_key=249, keyctl=250, mknodat=259, unshare=272, perf_event_open=298,
    name_to_handle_at=303, open_by_handle_at=304, setns=308, process_vm_readv=310,
    process_vm_writev=311, kcmp=312, finit_module=313, kexec_file_load=320, bpf=321,
    execveat=322, userfaultfd=323, pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426,
    io_uring_register=427, open_tree=428, move_mount=429, fsopen=430, fsmount=432, fspick=433,
    clone3=435, pidfd_getfd=438, process_madvise=440, mount_setattr=442,
)
_SPECIAL = {"clone", "clone3", "kill", "tgkill"}
_CLONE_THREAD = 0x00010000


def seccomp(own_pid: int) -> bool:
    """Install the seccomp filter on every thread; False where unsupported."""
    import platform

    if platform.machine() != "x86_64":
        return False
    ctypes, libc = _libc()
    EPERM, ENOSYS = 1, 38
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..|K, BPF_RET|K
    NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (low 32 bits of args[0])
    prog = [
        (LD, 0, 0, ARCH), (JEQ, 1, 0, _X86_64), (RET, 0, 0, KILL),
        (LD, 0, 0, NR),
        (JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | EPERM),  # x32 calls: refuse them all
    ]
    for name, nr in _NR.items():
        if name not in _SPECIAL:
            prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO | EPERM)]
    # clone3 hides its flags in memory the filter cannot read: ENOSYS makes glibc
    # fall back to clone, whose flags it can read.
    prog += [(JEQ, 0, 1, _NR["clone3"]), (RET, 0, 0, ERRNO | ENOSYS)]
    # clone: new threads yes (torch's pools), new processes no.
    prog += [(JEQ, 0, 4, _NR["clone"]), (LD, 0, 0, ARG0), (JSET, 0, 1, _CLONE_THREAD),
             (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | EPERM)]
    # kill / tgkill: only to this process (raise() and abort() use tgkill on ourselves).
    prog += [(JEQ, 1, 0, _NR["kill"]), (JEQ, 0, 4, _NR["tgkill"]), (LD, 0, 0, ARG0),
             (JEQ, 0, 1, own_pid), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | EPERM)]
    prog += [(RET, 0, 0, ALLOW)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC): all threads at once.
    if libc.syscall(317, 1, 1, ctypes.byref(fprog)) != 0:
        raise _failed("seccomp")
    return True


def read_paths(library_source: bool = True) -> list[str]:
    """What the student's code may read: this Python installation, system libraries, seqbook
    (only its data files when ``library_source`` is False: the library is imported already,
    and its source must not be run again to get back functions an exercise may not call).

    Computed here, in the sandbox, whose ``sys.path`` (``-I``) holds only the
    standard library and site-packages; the grader's own ``sys.path`` would add
    its working folders.  The submissions, the grading tests, the gradebook,
    /etc, /root, /home and /tmp stay unreadable.
    """
    import importlib.util

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {p for p in sys.path if p and os.path.isabs(p)}
    spec = importlib.util.find_spec("seqbook")  # its source is the students' textbook anyway
    if spec is not None and spec.submodule_search_locations:
        roots = set(spec.submodule_search_locations)
        paths |= roots if library_source else {os.path.join(root, "data") for root in roots}
    paths |= {"/usr", "/lib", "/lib64", "/lib32", "/usr/lib64", "/proc/cpuinfo", "/proc/meminfo",
              f"/proc/{os.getpid()}", "/sys/devices/system/cpu", "/dev/urandom", "/dev/zero", "/dev/null"}
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


# ---------------------------------------------------------------- audit hook

_DENIED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "os.startfile", "subprocess.Popen", "pty.spawn", "signal.pthread_kill",
    "resource.setrlimit", "resource.prlimit", "socket.__new__", "socket.bind", "socket.connect",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto", "socket.sendmsg",
    "urllib.Request", "webbrowser.open", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.remote_exec",
}
_DENIED_PREFIXES = ("ctypes.",)
# event -> (indices of path arguments, indices of dir_fd arguments)
_PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
    "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
    "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.mkfifo": ((0,), (2,)),
    "os.mknod": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)), "shutil.copyfile": ((1,), ()),
    "shutil.copymode": ((1,), ()), "shutil.copystat": ((1,), ()), "shutil.copytree": ((1,), ()),
    "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()), "shutil.make_archive": ((0,), ()),
    "shutil.unpack_archive": ((1,), ()),
}


def audit_hook(write_dir: str, read_roots: tuple[str, ...], hidden_roots: tuple[str, ...] = ()):
    """A hook refusing, with a readable message, what the sandbox does not allow.

    ``hidden_roots``: folders whose Python files may not be read (the library's source, when
    some of its functions are blocked; its ``data`` folder stays readable).
    """
    write_root = os.path.realpath(write_dir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def resolve(path) -> str | None:
        if isinstance(path, int):
            return None  # an already-open descriptor
        path = os.fsdecode(os.fspath(path))
        return os.path.realpath(path)

    def within(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    def refuse(event: str, detail: str = ""):
        raise PermissionError(f"the grader's sandbox does not allow {event}{detail}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            real = resolve(path)
            if real is None:
                return
            writing = bool(flags & write_flags) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if within(real, write_root):
                return
            if writing:
                refuse("writing files", f" outside its folder: {os.fsdecode(path)!r}")
            if not any(within(real, root) for root in read_roots):
                refuse("reading files", f" outside the Python installation: {os.fsdecode(path)!r}")
            if any(within(real, root) and not within(real, os.path.join(root, "data")) for root in hidden_roots):
                refuse("reading the library's source", f" ({os.fsdecode(path)!r}): some of its functions are "
                       "blocked for the exercises")
        elif event in _PATH_EVENTS:
            path_args, dir_fd_args = _PATH_EVENTS[event]
            for i in dir_fd_args:
                if i < len(args) and args[i] not in (None, -1):
                    refuse(event, " relative to a directory descriptor")
            for i in path_args:
                if i < len(args) and args[i] is not None:
                    real = resolve(args[i])
                    if real is not None and not within(real, write_root):
                        refuse(event, f" outside its folder: {os.fsdecode(args[i])!r}")
        elif event in _DENIED_EVENTS or event.startswith(_DENIED_PREFIXES):
            refuse(event)

    return hook


# ---------------------------------------------------------------- library functions an exercise must write itself

CELLS = "<cells>"  # the name under which the exercise cells run
NOTHING = {"names": frozenset(), "aten": frozenset(), "exercise": "", "why": ""}
FORBID_EVENT = "seqbook.grading.forbidden"  # a blocked function asks the hook to run its original
CALL_EVENT = "seqbook.grading.call"  # serve() starts (name) and ends (None) a call into the student's code


def load_library() -> list:
    """Import seqbook and every submodule (trusted code, before the lock-in), so nothing of it
    has to be read or imported again once the student's code runs."""
    import importlib
    import pkgutil

    import seqbook

    for info in pkgutil.walk_packages(seqbook.__path__, "seqbook."):
        if info.name.startswith("seqbook.grading") or info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            importlib.import_module(info.name)
        except Exception:  # a module that cannot load here (a missing optional dependency) offers nothing
            pass
    return [m for name, m in sorted(sys.modules.items())
            if (name == "seqbook" or name.startswith("seqbook.")) and not name.startswith("seqbook.grading")
            and m is not None]


def library_functions(modules) -> dict:
    """'seqbook.kalman.predict' -> the function, for every function defined in those modules,
    and 'seqbook.mamba.Mamba.forward' -> the method, for every method of their classes
    (inherited ones too, when a seqbook class defines them: 'seqbook.nn.S4D.forward')."""
    import types

    found = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
            elif isinstance(value, type) and value.__module__ == module.__name__:
                for klass in reversed(value.__mro__):
                    if not (klass.__module__ or "").startswith("seqbook"):
                        continue
                    for attr, member in vars(klass).items():
                        if isinstance(member, (staticmethod, classmethod)):
                            member = member.__func__
                        if isinstance(member, types.FunctionType):
                            found[f"{module.__name__}.{name}.{attr}"] = member
    return found


def resolve_torch(name: str):
    """(module, attribute) for an exact torch name ('torch.nn.functional.scaled_dot_product_attention'), or None."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        holder = module
        for attr in parts[cut:-1]:
            holder = getattr(holder, attr, None)
        if holder is not None and callable(getattr(holder, parts[-1], None)):
            return holder, parts[-1]
        return None
    return None


def match_forbidden(patterns, functions: dict) -> tuple[list[str], list[str], list[str]]:
    """Split patterns into (library names they match, aten operators, patterns matching nothing).

    A pattern is a dotted library name with shell wildcards ('seqbook.kalman.predict',
    'seqbook.kalman.*'), the same with a leading '!' for a helper that stays allowed
    ('!seqbook.kalman.simulate': subtracted from what the other patterns match), or an
    ATen operator ('aten::linalg_inv_ex'), which blocks every way of reaching it
    (torch.linalg.inv, Tensor.inverse, torch.ops.aten...), or an exact torch function
    ('torch.nn.functional.scaled_dot_product_attention'), replaced where it is defined.
    """
    import fnmatch

    names, aten, unmatched, allowed = set(), set(), [], set()
    for pattern in patterns:
        if pattern.startswith("aten::"):
            aten.add(pattern)
            continue
        if pattern.startswith("torch."):  # an exact torch function, replaced where it is defined
            if resolve_torch(pattern):
                names.add(pattern)
            else:
                unmatched.append(pattern)
            continue
        hits = fnmatch.filter(functions, pattern.lstrip("!"))
        (allowed if pattern.startswith("!") else names).update(hits)
        if not hits:
            unmatched.append(pattern)
    return sorted(names - allowed), sorted(aten), unmatched


def _code_objects(code, out: set) -> None:
    out.add(code)
    for const in code.co_consts:
        if isinstance(const, type(code)):
            _code_objects(const, out)


def install_forbidden(forbid: dict, modules, call_code) -> tuple:
    """Replace every library function that some exercise may not call by a stand-in.

    ``forbid``: student function name -> {"names": [...], "aten": [...], "exercise": "Exercise N"
    or None, "why": str}.  Every binding of a forbidden function in the library's modules (and
    classes) is replaced, so ``from seqbook.kalman import predict as p``, ``import seqbook.kalman
    as K``, ``getattr(K, "pre" + "dict")`` and ``importlib.import_module`` all reach the stand-in.
    The stand-in holds no reference to the original: it asks the audit hook returned here
    (which keeps the originals in its closure, out of reach of Python code) to run it.  The hook
    runs it unless a call into the student's code is in progress whose function may not use it,
    and the caller is not the library itself (``seqbook.kalman.kalman_filter`` may call
    ``predict`` for a student who may use the filter).  The hook also refuses reading the code
    of library functions (copying ``__code__``).  Returns (hook, aten dispatch mode factory).
    """
    import types

    # A frozen copy: the student's code can reach serve()'s locals through frames, never this.
    frozen = {name: types.MappingProxyType({"names": frozenset(r.get("names", ())), "aten": frozenset(r.get("aten", ())),
                                            "exercise": str(r.get("exercise") or ""), "why": str(r.get("why") or "")})
              for name, r in forbid.items()}
    # At the top level of an exercise cell, nothing any exercise forbids: no precomputed answers.
    frozen[CELLS] = types.MappingProxyType({"names": frozenset().union(*(r["names"] for r in frozen.values())),
                                           "aten": frozenset(), "exercise": "", "why": ""})
    forbid = types.MappingProxyType(frozen)
    functions = library_functions(modules)
    originals = {}  # qualified name -> original function
    torch_holders = {}  # torch name -> (module, attribute)
    for rules in forbid.values():
        for name in rules["names"]:
            if name.startswith("torch."):
                holder, attr = torch_holders[name] = resolve_torch(name)
                originals[name] = getattr(holder, attr)
            elif name in functions:
                originals[name] = functions[name]
    trusted_code: set = set()
    library_ids = set()
    for function in functions.values():
        library_ids.add(id(function))
        seen = function
        while seen is not None:  # decorated functions: trust the code they wrap too
            _code_objects(seen.__code__, trusted_code)
            seen = getattr(seen, "__wrapped__", None)
            seen = seen if isinstance(seen, types.FunctionType) else None

    def stand_in(key: str, original):
        def blocked(*args, **kwargs):
            box = []
            sys.audit(FORBID_EVENT, key, args, kwargs, box)
            return box[0]

        blocked.__name__, blocked.__qualname__ = original.__name__, original.__qualname__
        blocked.__module__, blocked.__doc__ = original.__module__, original.__doc__
        return blocked

    replacements = {id(original): stand_in(name, original) for name, original in originals.items()}
    blocked_code = next(iter(replacements.values())).__code__ if replacements else None
    for name, (holder, attr) in torch_holders.items():
        setattr(holder, attr, replacements[id(originals[name])])
    for module in modules:
        holders = [module] + [v for v in vars(module).values() if isinstance(v, type) and
                              (v.__module__ or "").startswith("seqbook")]
        for holder in holders:
            for attr, value in list(vars(holder).items()):
                inner = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if id(inner) in replacements:
                    new = replacements[id(inner)]
                    setattr(holder, attr, type(value)(new) if inner is not value else new)

    state = {"call": None}  # while serve() runs a student function (or the cells): (name, rules)

    def refuse(what: str, name: str, rules) -> None:
        if name == CELLS:
            raise PermissionError(f"the top level of an exercise cell may not use {what}: an exercise asks you "
                                  "to write it yourself (call the library inside your functions, where allowed)")
        exercise = f"{rules['exercise']} asks" if rules["exercise"] else "the exercise asks"
        why = rules["why"] or f"{exercise} you to write it yourself"
        raise PermissionError(f"{name} may not use {what}: {why}, so the grader blocks the library's version "
                              f"while it grades {name}")

    torch_dir = os.path.dirname(sys.modules["torch"].__file__) + os.sep

    def library_call(key: str) -> bool:
        """True when the stand-in was called by the library's own code: directly, naming the function
        (``predict(...)`` in ``kalman_filter``; a dunder such as ``__init__`` is called implicitly), or
        through torch's machinery (a layer's ``forward`` through ``nn.Module.__call__``)."""
        if sys._getframe(2).f_code is not blocked_code:  # [0] this hook, [1] sys.audit's caller
            return False
        frame, hops = sys._getframe(3), 0
        while frame is not None and frame.f_code.co_filename.startswith(torch_dir) and hops < 20:
            frame, hops = frame.f_back, hops + 1
        if frame is None or frame.f_code not in trusted_code:
            return False
        short = key.rsplit(".", 1)[-1]
        return hops > 0 or short in frame.f_code.co_names or (short.startswith("__") and short.endswith("__"))

    def hook(event: str, args: tuple) -> None:
        if event == FORBID_EVENT:
            key, call_args, call_kwargs, box = args
            original = originals.get(key)
            if original is None or not isinstance(box, list):
                raise PermissionError(f"{FORBID_EVENT} is the grader's own event")
            current = state["call"]
            if current is not None and key in current[1]["names"] and not library_call(key):
                refuse(key, current[0], current[1])
            box.append(original(*call_args, **call_kwargs))
        elif event == CALL_EVENT:
            (name,) = args
            if sys._getframe(1).f_code is not call_code:
                raise PermissionError(f"{CALL_EVENT} is the grader's own event")
            if name is not None and state["call"] is not None:
                raise PermissionError("a call into the student's code is already in progress")
            state["call"] = None if name is None else (name, forbid.get(name) or NOTHING)
        elif event == "object.__getattr__" and args[1] == "__code__" and id(args[0]) in library_ids:
            raise PermissionError("the grader's sandbox does not allow reading the code of seqbook's functions")

    def aten_mode(name: str):
        """A dispatch mode refusing the ATen operators ``name`` may not use, or None."""
        rules = forbid.get(name)
        if not rules or not rules["aten"]:
            return None
        from torch.utils._python_dispatch import TorchDispatchMode

        blocked_ops = frozenset(rules["aten"])

        class Refuse(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                op = "aten::" + func.overloadpacket.__name__
                if op in blocked_ops:
                    refuse(f"torch's {op.split('::')[1]} ({op})", name, rules)
                return func(*args, **(kwargs or {}))

        return Refuse()

    return hook, aten_mode


# ---------------------------------------------------------------- running the cells


def describe(exc: BaseException) -> str:
    """'TypeError: message (Exercise 2, line 5)': short, pointing into the student's code."""
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except BaseException:  # a hostile __str__
        text = type(exc).__name__
    where = ""
    if isinstance(exc, SyntaxError) and str(exc.filename).startswith("<Exercise"):
        where = f" ({exc.filename[1:-1]}, line {exc.lineno})"
        text = f"{type(exc).__name__}: {exc.msg}"
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<Exercise")]
        if frames:
            last = frames[-1]
            line = (last.line or "").strip()
            # the line itself, unless it only repeats the message (raise NotImplementedError("..."))
            shown = f": {line}" if line and str(exc) not in line else ""
            where = f" ({last.filename[1:-1]}, line {last.lineno}{shown})"
    text = " ".join(text.split())
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 3] + "..."
    return text + where


def plain(value, depth: int = 0):
    """The student's return value as tensors and plain containers, or TypeError."""
    import torch

    if depth > 16:
        raise TypeError("returned a value nested too deeply")
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor)
        if t.layout != torch.strided:
            t = t.to_dense()
        return t.cpu().contiguous().clone()  # clone: never ship a view of a huge storage
    if value is None or type(value) in (bool, int, float, complex, str):
        return value
    if isinstance(value, (tuple, list)):
        items = [plain(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict) and all(type(k) is str for k in value):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"returned a {kind}; return torch tensors (or tuples of them)")


def _call(name: str, function, args, kwargs, aten_mode):
    """Run the student's code under the rules for ``name`` (see install_forbidden); its value as
    plain data, converted before the rules are lifted (a tensor subclass runs code when converted)."""
    sys.audit(CALL_EVENT, name)
    try:
        mode = aten_mode(name) if aten_mode is not None else None
        if mode is None:
            return plain(function(*args, **kwargs))
        with mode:
            return plain(function(*args, **kwargs))
    finally:
        sys.audit(CALL_EVENT, None)


def serve(fd_in: int, fd_out: int, cells: list[str], aten_mode=None) -> None:
    namespace = {"__name__": "__exercises__", "__builtins__": builtins}
    for number, source in enumerate(cells, start=1):
        if source is None:  # skipped by the trusted side (it hung or crashed before)
            continue
        filename = f"<Exercise {number}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            _call(CELLS, exec, (compile(source, filename, "exec"), namespace), {}, None)
            reply = {"kind": "cell", "exercise": number, "ok": True, "error": ""}
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the student's too
            reply = {"kind": "cell", "exercise": number, "ok": False, "error": describe(exc)}
        send(fd_out, reply)
    functions = sorted(
        name for name, value in namespace.items()
        if callable(value) and not name.startswith("_") and not isinstance(value, type(sys))
    )
    send(fd_out, {"kind": "ready", "functions": functions})
    while True:
        try:
            request = recv(fd_in)
        except EOFError:
            return
        if request.get("kind") != "call":
            return
        name = request["name"]
        try:
            value = _call(name, namespace[name], request["args"], request["kwargs"], aten_mode)
            reply = {"kind": "result", "id": request["id"], "ok": True, "value": value}
        except BaseException as exc:
            reply = {"kind": "result", "id": request["id"], "ok": False, "error": describe(exc)}
        try:
            send(fd_out, reply)
        except BrokenPipeError:
            return
        except BaseException as exc:  # e.g. a value torch.save cannot write
            send(fd_out, {"kind": "result", "id": request["id"], "ok": False, "error": describe(exc)})


def main(argv: list[str]) -> None:
    fd_in, fd_out = int(argv[1]), int(argv[2])
    cfg = json.loads(argv[3])
    apply_limits(cfg)

    import torch  # before the lock-in: importing it reads and maps many files

    torch.set_num_threads(1)  # one core per submission; parallelism is across students
    layers = {"uid": os.getuid(), "dropped_to": cfg.get("dropped_to")}
    forbid = cfg.get("forbid") or {}
    forbid_hook = aten_mode = None
    if forbid:  # before the lock-in: the library is imported now, then its source is unreadable
        modules = load_library()
        functions = library_functions(modules)
        for rules in forbid.values():
            rules["names"], rules["aten"], _ = match_forbidden(rules.get("patterns", ()), functions)
        forbid_hook, aten_mode = install_forbidden(forbid, modules, _call.__code__)
        with_aten = [name for name, rules in forbid.items() if rules["aten"]]
        if with_aten:  # the first dispatch mode imports torch._dynamo (seconds): now, not in a timed call
            with aten_mode(with_aten[0]):
                torch.ones(1) + 1
        layers["forbidden"] = len({n for r in forbid.values() for n in (*r["names"], *r["aten"])})
    no_new_privs_and_parent_death(cfg["parent_pid"])
    readable = read_paths(library_source=not forbid)

    def layer(name, enabled, apply, off):
        """Apply one optional layer; a machine without it is reported, not fatal."""
        if not enabled:
            layers[name], layers[name + "_skipped"] = off, "disabled"
            return
        try:
            layers[name] = apply()
        except OSError as exc:  # e.g. a container whose own seccomp profile forbids the call
            layers[name], layers[name + "_skipped"] = off, str(exc.strerror or exc)

    layer("capabilities_dropped", True, drop_capabilities, False)
    threads = len(os.listdir("/proc/self/task"))
    layer("landlock", cfg.get("landlock", True) and threads == 1,
          lambda: landlock(cfg["sandbox_dir"], readable), 0)
    if threads != 1:
        layers["landlock_skipped"] = f"{threads} threads"
    layer("seccomp", cfg.get("seccomp", True), lambda: seccomp(os.getpid()), False)
    hidden = ()
    if forbid:
        import seqbook

        hidden = tuple(os.path.realpath(p) for p in seqbook.__path__)
    sys.addaudithook(audit_hook(cfg["sandbox_dir"], tuple(readable), hidden))
    if forbid_hook is not None:
        sys.addaudithook(forbid_hook)
        del forbid_hook  # only the interpreter keeps it (and the originals in its closure)
    layers["audit_hook"] = True
    os.chdir(cfg["sandbox_dir"])
    send(fd_out, {"kind": "hello", "layers": layers})

    init = recv(fd_in)
    serve(fd_in, fd_out, init["cells"], aten_mode)
    # os._exit: no interpreter shutdown that could run the student's finalizers or atexit hooks.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
