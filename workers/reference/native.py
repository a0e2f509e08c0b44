"""The native decode step (decode.c): built with the system C compiler on first use, loaded with ctypes.

A step whose every row decodes one token (fp32, CPU) runs as one C call instead of ~30 torch operators a
layer; prefill chunks and every other device / dtype keep the torch path in model.py. The dependency runs
one way: :class:`NativeDecode` reads a loaded :class:`~workers.reference.model.DecoderModel`'s weights,
config and RoPE table; the model never refers to it, and ``workers.reference.batch`` picks the path per
step. The library is
compiled with ``-march=native`` into ``${XDG_CACHE_HOME:-~/.cache}/dynamo-rt/native`` (or
``$DYN_NATIVE_CACHE``), keyed by the source, the compiler's version and the CPU, so a container image or
a shared home built elsewhere never loads code for another CPU. No compiler, a failed build or
``DYN_REF_NATIVE=0`` leave the torch path in use (logged once). The step runs on the engine's thread count
(``--threads``; its own worker threads, not torch's). :func:`kernel_info` says which build runs (compiler,
flags, what ``-march=native`` resolved to, the vector width), and every bench prints it
(``bench/_common.machine_info``): the same source is about twice as slow a step where the CPU has AVX2
but no AVX-512.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dynamo_rt.config import parse_bool

if TYPE_CHECKING:
    from workers.reference.model import DecoderModel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-pthread", "-fPIC", "-shared")
PANEL = 16  # output columns per weight panel (NB in decode.c)
LAYER_PTRS = 10  # pointers per layer (LAYER_PTRS in decode.c)
MAX_HEAD_DIM = 256  # MAX_CHUNKS * 16 in decode.c
# The packed panels are a second copy of the weights (beside the torch path's, which prefill keeps using):
# only for models up to this size.
NATIVE_MAX_BYTES = 2 * 2**30

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_failed: str | None = None


class _Model(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32), ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32), ("vocab", ctypes.c_int32),
        ("layers", ctypes.c_int32), ("block_size", ctypes.c_int32), ("eps", ctypes.c_float),
        ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("head", ctypes.c_void_p),
        ("lw", ctypes.POINTER(ctypes.c_void_p)),
    ]


def enabled_by_env() -> bool:
    """``DYN_REF_NATIVE`` read as the worker's ``--native-decode`` flag reads it (unset or empty: on)."""
    raw = os.environ.get("DYN_REF_NATIVE", "")
    return parse_bool(raw) if raw else True


def _cache_dir() -> Path:
    env = os.environ.get("DYN_NATIVE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dynamo-rt" / "native"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _own_folder(folder: Path) -> bool:
    """Create ``folder`` (0700) if needed; True if it is ours and no one else can write into it."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(folder, os.W_OK)


def _build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Path of the compiled library for this source, compiler, flags (``CFLAGS`` + ``extra_flags``) and CPU;
    compiled now if not cached."""
    flags = (*CFLAGS, *extra_flags)
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, or $CC) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(x.encode() for x in (SOURCE.read_text(), version, " ".join(flags), _cpu_id(),
                                        platform.machine()))
    ).hexdigest()[:16]
    name = f"decode-{key}.so"
    # The cache folder, else (a read-only home in a locked-down pod) a private folder under /tmp.
    folders = (_cache_dir(), Path(tempfile.gettempdir()) / f"dynamo-rt-native-{os.getuid()}")
    folder = next((f for f in folders if _own_folder(f)), None)
    if folder is None:
        raise RuntimeError(f"no private writable folder for the native library among {[str(f) for f in folders]}")
    out = folder / name
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    t0 = time.monotonic()
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each leave a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the native decode step in %.1fs: %s %s -> %s", time.monotonic() - t0, cc, " ".join(flags), out)
    return out


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the library's C signatures."""
    fn = lib.drt_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.drt_pool_create.restype = ctypes.c_void_p
    lib.drt_pool_create.argtypes = [ctypes.c_int]
    lib.drt_pool_destroy.restype = None
    lib.drt_pool_destroy.argtypes = [ctypes.c_void_p]
    lib.drt_vector_bits.restype = ctypes.c_int
    lib.drt_prof_ops.restype = ctypes.c_int
    return lib


def load_library() -> ctypes.CDLL | None:
    """The compiled decode step, or None (reason logged once) where it cannot be built."""
    global _lib, _lib_failed
    with _lib_lock:
        if _lib is not None or _lib_failed is not None:
            return _lib
        try:
            _lib = _bind(ctypes.CDLL(str(_build())))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _lib_failed = str(e)
            log.warning("native decode step unavailable, using torch operators: %s", e)
        return _lib


def load_variant(extra_flags: tuple[str, ...]) -> ctypes.CDLL:
    """A separate build with more compiler flags (``-DDRT_PROFILE``: per-op timing; ``-mno-avx512f``: what an
    AVX2-only CPU would run), for bench/reference_engine.py --profile; raises where it cannot be built."""
    return _bind(ctypes.CDLL(str(_build(extra_flags))))


def _resolved_march(cc: str) -> str | None:
    """What ``-march=native`` means to this compiler on this CPU (GCC: ``-Q --help=target``), e.g. znver3."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True,
                             timeout=30).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "-march=":
                return parts[1]
    return None


def kernel_info(lib: ctypes.CDLL | None = None, extra_flags: tuple[str, ...] = ()) -> dict[str, object]:
    """Which native decode kernel runs here: compiler, flags, what -march=native resolved to, and the vector
    width the build compiled for (``lib``: a loaded build, default the engine's own; ``vector_bits`` 0 when
    none could be built)."""
    cc = _compiler()
    if lib is None:
        lib = load_library()
    version = ""
    if cc is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.split("\n", 1)[0]
    return {
        "cc": version or (cc or "none"),
        "flags": " ".join(f for f in (*CFLAGS, *extra_flags) if f not in ("-fPIC", "-shared", "-pthread")),
        "march_native": (_resolved_march(cc) if cc else None) or "unknown",
        "vector_bits": int(lib.drt_vector_bits()) if lib is not None else 0,
    }


PROFILE_OPS = ("embed", "rms_norm", "qkv", "attention", "o_proj", "gate_up", "silu_mul", "down", "lm_head")


def read_profile(lib: ctypes.CDLL) -> tuple[int, dict[str, float]]:
    """(steps, microseconds per step of each op) from a ``-DDRT_PROFILE`` build; zeroes the counters."""
    n = int(lib.drt_prof_ops())
    arr = (ctypes.c_double * n).in_dll(lib, "drt_prof_us")
    steps = int(arr[n - 1])
    out = {op: arr[i] / max(1, steps) for i, op in enumerate(PROFILE_OPS)}
    for i in range(n):
        arr[i] = 0.0
    return steps, out


def _panels(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K, 16]: a panel of 16 output columns, k-major (see decode.c)."""
    n, k = w.shape
    return w.view(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


class NativeDecode:
    """The packed weights and the C model struct of one DecoderModel; :meth:`run` is one decode step.

    ``threads`` > 1: the step's matmuls (split by output panels) and attention (split by rows) run on that
    many threads, the caller's included; the extra ones spin ~0.2 ms after each job, then sleep. The
    arithmetic of every output element is the same whatever the thread count. One caller at a time."""

    def __init__(self, model: DecoderModel, block_size: int, lib: ctypes.CDLL, threads: int = 1) -> None:
        cfg = model.cfg
        self._lib = lib
        self._fn = lib.drt_decode
        self.threads = max(1, threads)
        self._pool: int | None = lib.drt_pool_create(self.threads) if self.threads > 1 else None
        if self.threads > 1 and not self._pool:
            log.warning("native decode step: could not start %d threads, using one", self.threads)
            self.threads = 1
        self.model = model
        self.vocab = cfg.vocab_size
        keep: list[torch.Tensor] = []

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.contiguous()
            keep.append(t)
            return t.data_ptr()

        ptrs: list[int | None] = []
        for L in model.layers:
            ptrs += [ptr(L.ln1), ptr(_panels(L.qkv.w)), ptr(L.qkv.b), ptr(_panels(L.o.w)), ptr(L.o.b),
                     ptr(L.ln2), ptr(_panels(L.gu.w)), ptr(L.gu.b), ptr(_panels(L.down.w)), ptr(L.down.b)]
        self._lw = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self._struct = _Model(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
            cfg.num_layers, block_size, cfg.rms_norm_eps, ptr(model.embed), ptr(model.norm),
            ptr(_panels(model.lm_head.w)), self._lw,
        )
        self._keep = keep  # the struct points into these tensors
        self._ref = ctypes.byref(self._struct)

    @staticmethod
    def supports(model: DecoderModel) -> str | None:
        """None when the native step can run this model, else why not."""
        cfg = model.cfg
        if model.device.type != "cpu" or model.dtype != torch.float32:
            return f"{model.device.type}/{model.dtype} (only cpu/float32)"
        if not model.complex_rope:
            return "RoPE tables are not complex"
        widths = {"q/k/v": (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, "hidden": cfg.hidden_size,
                  "gate/up": 2 * cfg.intermediate_size, "vocab": cfg.vocab_size}
        odd = [k for k, v in widths.items() if v % PANEL]
        if odd:
            return f"widths not multiples of {PANEL}: {', '.join(odd)}"
        if cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % PANEL or cfg.head_dim > MAX_HEAD_DIM:
            return f"head_dim {cfg.head_dim} (multiples of {PANEL} up to {MAX_HEAD_DIM})"
        size = sum(x.w.numel() * 4 for L in model.layers for x in (L.qkv, L.o, L.gu, L.down))
        size += model.lm_head.w.numel() * 4
        if size > NATIVE_MAX_BYTES:
            return f"weights of {size / 2**30:.1f} GiB (packing doubles them; limit {NATIVE_MAX_BYTES / 2**30:.0f} GiB)"
        return None

    def run(self, step: NativeStep, pool: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, vocab]`` fp32; writes each row's K and V into ``pool``."""
        n = step.rows
        logits = torch.empty((n, self.vocab), dtype=torch.float32)
        cis = self.model.rope_table()
        rc = self._fn(self._ref, self._pool, n, step.addr, step.addr + 4 * n, step.addr + 8 * n, step.nb,
                      pool.data_ptr(), cis.data_ptr(), cis.shape[0], logits.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native decode step failed ({'out of memory' if rc == -1 else 'position'})")
        return logits

    def close(self) -> None:
        """Stop the worker threads (idempotent)."""
        pool, self._pool = self._pool, None
        if pool:
            self._lib.drt_pool_destroy(pool)

    def __del__(self) -> None:
        self.close()


class NativeStep:
    """One all-decode step's inputs as one int32 buffer: ids [n], positions [n], block tables [n, nb]."""

    __slots__ = ("addr", "buf", "nb", "rows")

    def __init__(self, ids: list[int], pos: list[int], tables: list[list[int]]) -> None:
        self.rows = n = len(ids)
        self.nb = nb = max(len(t) for t in tables)
        buf = array("i", ids)
        buf.extend(pos)
        for t in tables:
            buf.extend(t)
            if len(t) < nb:
                buf.extend([0] * (nb - len(t)))
        self.buf = buf
        self.addr = buf.buffer_info()[0]
        assert len(buf) == 2 * n + n * nb
