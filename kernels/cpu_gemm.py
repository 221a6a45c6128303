"""The CPU GEMM over GGUF blocks (`cpu_gemm.c`) and the attention over the paged cache (`cpu_attention.c`), built
on first use and called through ctypes.

Triton has no CPU backend in its release wheels, and torch's CPU ops for quantized weights are slow on AVX2
(see `cpu_gemm.c`), so on CPU the quantized projections and the LM head run on this small C kernel: int8 dot
products over blocks of 32, as llama.cpp does. It is compiled with the system C compiler (`cc`, `-O3 -mavx2
-mfma`) into a per-user cache directory the first time a process needs it (about a second), keyed by the sources'
hash; a CPU without AVX2 or a machine without a compiler falls back to torch's int4 GEMM (`available()` says why).

`BlockLinear(w)(x)`: x [..., K] fp32 -> y [..., N] fp32 for a `QuantWeight` w [N, K].

Accuracy: the weights are used exactly as stored (fp32 scales widened from fp16); each row of x is rounded to
int8 per block of 32 (relative error at most 2^-8 of the block's largest magnitude, like llama.cpp's Q8 rows);
products are summed exactly in int32 per block and in fp32 across blocks. The output is fp32.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .quant import BLOCK, QuantWeight

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(n) for n in ("cpu_gemm.c", "cpu_attention.c")]
_HEADER = Path(__file__).with_name("cpu_kernels.h")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-std=c11", "-pthread"]
_state: dict[str, object] = {}
_lock = threading.Lock()


def _cache_dir() -> Path:
    """A directory only this user can write: $XDG_CACHE_HOME or ~/.cache, else a fresh private temp dir (the
    sandbox of a replica has no home: it builds once per replica)."""
    base = os.environ.get("XDG_CACHE_HOME") or (os.path.expanduser("~/.cache") if os.path.expanduser("~") != "~"
                                                else "")
    if base:
        d = Path(base) / "cocoon_faas"
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = d.stat()
            if st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and os.access(d, os.W_OK):
                return d
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="cocoon-cpu-gemm-"))


def _build() -> ctypes.CDLL:
    source = b"".join(p.read_bytes() for p in [*_SOURCES, _HEADER])
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    d = _cache_dir()
    lib = d / f"cpu_gemm-{tag}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc/gcc) on PATH: install gcc (Debian: apt-get install gcc)")
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed to build the CPU kernels: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, lib)  # atomic: a concurrent builder's finished file is as good as ours
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    st = lib.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f"refusing to load {lib}: not owned by this user or writable by others")
    so = ctypes.CDLL(str(lib))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    so.cg_gemm.argtypes = [ctypes.c_int, p, p, p, i64, i64, p, i64, i64, p, i64]
    so.cg_gemm.restype = ctypes.c_int
    so.cg_layer_tail.argtypes = [p, p, p, p, p, ctypes.c_float, p, p, i64, p]
    so.cg_layer_tail.restype = ctypes.c_int
    so.cg_attend_decode.argtypes = [p, i64, p, p, p, i64, p, p, i64, i64, i64, i64, ctypes.c_float, p]
    so.cg_attend_decode.restype = ctypes.c_int
    so.cg_rotary.argtypes = [p, i64, i64, i64, i64, p, p, p]
    so.cg_rotary.restype = None
    so.cg_decode_layer.argtypes = [p, p, p, p, p, p, ctypes.c_float, p, p, p, p, p, p, p, i64, p, p, i64, i64, i64,
                                   i64, ctypes.c_float, p, p, p]
    so.cg_decode_layer.restype = ctypes.c_int
    so.cg_set_threads.argtypes = [ctypes.c_int]
    so.cg_set_threads.restype = ctypes.c_int
    return so


def _lib() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"] = None
            if os.environ.get("COCOON_CPU_GEMM", "1") == "0":
                _state["why"] = "disabled by COCOON_CPU_GEMM=0"
            elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
                _state["why"] = f"this CPU has {torch.backends.cpu.get_cpu_capability()}, the kernel needs AVX2"
            else:
                try:
                    _state["lib"] = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state["why"] = str(e)
                    log.warning("CPU block GEMM unavailable, quantized layers use torch's int4 GEMM: %s", e)
        lib = _state["lib"]
        return lib if isinstance(lib, ctypes.CDLL) else None


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_state.get('why')}")
    return lib


def available() -> tuple[bool, str]:
    """(whether the kernel runs here, why not)."""
    ok = _lib() is not None
    return ok, "" if ok else str(_state.get("why", ""))


def set_threads(n: int) -> int:
    """Threads each GEMM's output columns are split over (the caller's thread included); returns the number set."""
    lib = _lib()
    return lib.cg_set_threads(max(1, int(n))) if lib is not None else 1


class _Weight(ctypes.Structure):
    """`weight` in cpu_gemm.c."""

    _fields_ = [("q4", ctypes.c_int), ("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


def _panels(m: torch.Tensor) -> torch.Tensor:
    """Q4 mins [N, K/32] -> [ceil(N/8), K/32, 8], columns zero-padded to a multiple of 8: the layout `min_terms` in
    cpu_gemm.c reads eight columns at a time from."""
    n, nb = m.shape
    padded = torch.zeros(((n + 7) // 8 * 8, nb), dtype=torch.float32)
    padded[:n] = m
    return padded.view(-1, 8, nb).transpose(1, 2).contiguous()


class BlockLinear:
    """A `QuantWeight` [N, K] held for `cg_gemm`: codes as stored, scales (and Q4 mins, in panels of 8 columns)
    widened to fp32."""

    def __init__(self, w: QuantWeight) -> None:
        self._gemm = _require().cg_gemm
        self.shape = w.shape
        self.fmt = w.fmt
        self.qs = w.qs.contiguous().cpu()
        self.d = w.d.float().contiguous().cpu()
        self.m = _panels(w.m.float().cpu()) if w.m is not None else None
        self._ptrs = (1 if self.m is not None else 0, self.qs.data_ptr(), self.d.data_ptr(),
                      self.m.data_ptr() if self.m is not None else None)
        self.desc = _Weight(*self._ptrs, *self.shape)  # points into the tensors above, which live as long

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"block GEMM: x has {x.shape[-1]} features but the weight is {self.shape}")
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32 or x2.device.type != "cpu" or x2.stride(1) != 1:
            x2 = x2.to(device="cpu", dtype=torch.float32).contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, n), dtype=torch.float32)
        q4, qs, d, m = self._ptrs
        rc = self._gemm(q4, qs, d, m, n, k, x2.data_ptr(), rows, x2.stride(0), y.data_ptr(), n)
        if rc != 0:
            raise RuntimeError(f"block GEMM failed ({rc}) for x {tuple(x2.shape)} and weight {self.shape}")
        return y.view(*x.shape[:-1], n)



def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


class LayerTail:
    """The rest of a Llama layer after attention in one C call (`cg_layer_tail`): output projection and residual,
    RMSNorm, gate|up, SwiGLU, down and residual, and the next RMSNorm. `tail(h, a)` updates h [T, hidden] (fp32,
    contiguous) in place and returns the next layer's normed input [T, hidden]."""

    def __init__(self, o: BlockLinear, gate_up: BlockLinear, down: BlockLinear, ln_ffn: torch.Tensor,
                 ln_next: torch.Tensor, eps: float) -> None:
        hidden, inter = o.shape[0], down.shape[1]
        if gate_up.shape != (2 * inter, hidden) or down.shape[0] != hidden or ln_ffn.numel() != hidden:
            raise ValueError(f"layer shapes do not chain: o {o.shape}, gate_up {gate_up.shape}, down {down.shape}")
        self._call = _require().cg_layer_tail
        self.parts = (o, gate_up, down)
        self.eps = eps
        self._norms = (_f32(ln_ffn), _f32(ln_next))
        self.norm_ptrs = (self._norms[0].data_ptr(), self._norms[1].data_ptr())
        self._args = (ctypes.byref(o.desc), ctypes.byref(gate_up.desc), ctypes.byref(down.desc), *self.norm_ptrs,
                      ctypes.c_float(eps))
        self.hidden, self.a_dim = hidden, o.shape[1]

    def __call__(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if h.dtype != torch.float32 or not h.is_contiguous() or h.device.type != "cpu" or h.shape[-1] != self.hidden:
            raise ValueError(f"layer tail: h must be fp32 contiguous [T, {self.hidden}] on CPU, got "
                             f"{h.dtype} {tuple(h.shape)}")
        rows = h.shape[0]
        a = _f32(a).view(rows, self.a_dim)
        out = torch.empty_like(h)
        rc = self._call(*self._args, h.data_ptr(), a.data_ptr(), rows, out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"layer tail failed ({rc}) for {rows} rows")
        return out


def _scale(dim: int) -> ctypes.c_float:
    return ctypes.c_float(dim ** -0.5)  # one rounding for every path, so their rows agree bit for bit


class Rotary:
    """Rotate-half rotary embedding at one step's `positions` [T], from the [positions, dim / 2] fp32 tables, checked
    once and applied per layer: `rot(x, heads, dim)` rotates, in place, the first `heads` heads of dim `dim` of each
    row of x [T, >= heads * dim] (fp32, unit column stride). The same arithmetic as `cg_decode_layer`'s, so a row
    gets the same bits in either."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
        self._call = _require().cg_rotary
        if cos.dtype != torch.float32 or not cos.is_contiguous() or cos.shape != sin.shape or cos.dim() != 2 \
                or not sin.is_contiguous() or sin.dtype != torch.float32:
            raise ValueError("rotary: cos and sin must be fp32 contiguous [positions, dim / 2]")
        self.cos, self.sin = cos, sin
        self.positions = positions.to(device="cpu", dtype=torch.int64).contiguous()
        if self.positions.dim() != 1 or (self.positions.numel() and (
                int(self.positions.min()) < 0 or int(self.positions.max()) >= cos.shape[0])):
            raise ValueError(f"rotary: positions must be a vector within the tables' {cos.shape[0]} rows")

    def __call__(self, x: torch.Tensor, heads: int, dim: int) -> None:
        if x.dtype != torch.float32 or x.stride(1) != 1 or x.shape[1] < heads * dim or dim != 2 * self.cos.shape[1] \
                or x.shape[0] != self.positions.shape[0]:
            raise ValueError(f"rotary: x must be fp32 [{self.positions.shape[0]}, >= {heads * dim}] with unit column "
                             f"stride and heads of {2 * self.cos.shape[1]}")
        self._call(x.data_ptr(), x.stride(0), x.shape[0], heads, dim, self.cos.data_ptr(), self.sin.data_ptr(),
                   self.positions.data_ptr())


class DecodeAttention:
    """Decode attention over a paged cache for one step's rows, checked once and run per layer.

    `DecodeAttention(slots, lengths, cache_rows)(q, k_cache, v_cache)`: row r's query heads q[r] [heads, D] attend
    over the cache rows `slots[r, :lengths[r]]` of k_cache / v_cache [cache_rows, kv_heads, D] (grouped: head h
    reads KV head h // (heads / kv_heads)), softmax scaled by 1/sqrt(D). Each row over its own positions only, so
    unlike one padded SDPA over the batch a row's result does not depend on the others. Returns [rows, heads * D]
    fp32. `writes` [rows], when given, are the cache rows each row's own K and V go to (`DecodeLayer`), checked
    here with the rest."""

    def __init__(self, slots: torch.Tensor, lengths: torch.Tensor, cache_rows: int,
                 writes: torch.Tensor | None = None) -> None:
        self._call = _require().cg_attend_decode
        self.slots = slots.to(device="cpu", dtype=torch.int64).contiguous()
        self.lengths = lengths.to(device="cpu", dtype=torch.int64).contiguous()
        rows = self.slots.shape[0]
        if self.slots.dim() != 2 or self.lengths.shape != (rows,):
            raise ValueError(f"slots {tuple(self.slots.shape)} / lengths {tuple(self.lengths.shape)} do not match")
        if rows and (int(self.slots.min()) < 0 or int(self.slots.max()) >= cache_rows):
            raise ValueError(f"a slot index is outside the cache of {cache_rows} rows")
        if rows and (int(self.lengths.min()) < 1 or int(self.lengths.max()) > self.slots.shape[1]):
            raise ValueError(f"lengths must be in [1, {self.slots.shape[1]}]")
        self.writes: torch.Tensor | None = None
        if writes is not None:
            self.writes = writes.to(device="cpu", dtype=torch.int64).contiguous()
            if self.writes.shape != (rows,) or (rows and (int(self.writes.min()) < 0
                                                          or int(self.writes.max()) >= cache_rows)):
                raise ValueError(f"the {rows} rows' own cache slots must be within the cache of {cache_rows} rows")
        self.rows, self.cache_rows = rows, cache_rows
        # shared[r]: row r's slot list is row r - 1's (a prefill chunk's rows): the kernel tiles such rows together
        self.shared = torch.zeros(rows, dtype=torch.uint8)
        if rows > 1:
            self.shared[1:] = (self.slots[1:] == self.slots[:-1]).all(1)

    def check_caches(self, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_heads: int, dim: int) -> None:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (self.cache_rows, kv_heads, dim):
                raise ValueError(f"decode attention: the caches must be fp32 contiguous [{self.cache_rows}, "
                                 f"{kv_heads}, {dim}]; {name} is {t.dtype} {tuple(t.shape)}")

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        rows, heads, dim = q.shape
        kv_heads = k_cache.shape[1]
        self.check_caches(k_cache, v_cache, kv_heads, dim)
        if rows != self.rows or q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != dim \
                or heads % kv_heads:
            raise ValueError(f"decode attention: q must be fp32 [{self.rows}, heads, {dim}] with contiguous heads, "
                             f"heads a multiple of the {kv_heads} KV heads; got {q.dtype} {tuple(q.shape)}")
        out = torch.empty((rows, heads * dim), dtype=torch.float32)
        rc = self._call(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), self.slots.data_ptr(),
                        self.slots.shape[1], self.lengths.data_ptr(), self.shared.data_ptr(), rows, heads, kv_heads, dim,
                        _scale(dim), out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"decode attention failed ({rc})")
        return out


class DecodeLayer:
    """A whole Llama layer in one C call (`cg_decode_layer`) for rows that each attend over their own cache slots:
    QKV GEMM, rotary, every row's K/V into the layer's cache at its own slot, each row's attention over its slots
    (`DecodeAttention`'s), then `LayerTail`. The same arithmetic as those pieces called one by one."""

    def __init__(self, qkv: BlockLinear, tail: LayerTail, heads: int, kv_heads: int, dim: int) -> None:
        if qkv.shape != ((heads + 2 * kv_heads) * dim, tail.hidden) or tail.a_dim != heads * dim:
            raise ValueError(f"decode layer: qkv {qkv.shape} does not fit {heads}+2x{kv_heads} heads of {dim}")
        self._call = _require().cg_decode_layer
        self._qkv, self._tail = qkv, tail
        o, gu, dn = tail.parts
        self._args = (ctypes.byref(qkv.desc), ctypes.byref(o.desc), ctypes.byref(gu.desc), ctypes.byref(dn.desc),
                      *tail.norm_ptrs, ctypes.c_float(tail.eps))
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim

    def __call__(self, h: torch.Tensor, x: torch.Tensor, rot: Rotary, plan: DecodeAttention,
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """h [T, hidden] (updated), x its normed form, at the positions of `rot`, writing each row's K and V at
        `plan.writes`; returns the next layer's normed input."""
        rows = h.shape[0]
        plan.check_caches(k_cache, v_cache, self.kv_heads, self.dim)
        for t in (h, x):
            if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (rows, self._tail.hidden):
                raise ValueError(f"decode layer: h and x must be fp32 contiguous [{rows}, {self._tail.hidden}]")
        if plan.writes is None or plan.rows != rows or rot.positions.shape != (rows,) \
                or rot.cos.shape[1] * 2 != self.dim:
            raise ValueError(f"decode layer: needs a plan with the {rows} rows' own slots and rotary at {rows} "
                             f"positions for heads of {self.dim}")
        out = torch.empty_like(h)
        rc = self._call(*self._args, rot.cos.data_ptr(), rot.sin.data_ptr(), rot.positions.data_ptr(),
                        plan.writes.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), plan.slots.data_ptr(),
                        plan.slots.shape[1], plan.lengths.data_ptr(), plan.shared.data_ptr(), rows, self.heads, self.kv_heads, self.dim,
                        _scale(self.dim), h.data_ptr(), x.data_ptr(), out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"decode layer failed ({rc})")
        return out


assert BLOCK == 32  # the C kernel's QB
