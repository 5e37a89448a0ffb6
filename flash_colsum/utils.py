"""Shared helpers: input validation, back-end availability, small math."""

from __future__ import annotations

import functools
import math
import numbers
import os
import importlib.util
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2
BACKENDS = ("auto", "triton", "torch")
MAX_TRITON_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed (checked once, without importing it)."""
    return _TRITON_FOUND


def triton_can_run(device: torch.device) -> bool:
    """Can our Triton kernels run on tensors of ``device``?

    CUDA tensors need Triton; CPU tensors need Triton's interpreter.
    """
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


@dataclass(frozen=True)
class Problem:
    """A validated column-statistics problem (shapes resolved, defaults applied)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    scale: float
    causal: bool
    row_start: int  # first selected query row
    row_end: int  # one past the last selected query row
    backend: str  # "triton" or "torch" after resolving "auto"
    causal_offset: int = 0  # causal: query i sees keys j <= i + causal_offset (Sk - Sq: bottom-right)
    softcap: float = 0.0  # > 0: scores s become softcap * tanh(s / softcap) (Gemma 2's logit soft-capping)
    window: int = 0  # > 0 (causal only): query i sees the `window` keys up to its diagonal, i + causal_offset

    def with_rows(self, row_start: int, row_end: int) -> "Problem":
        # Not dataclasses.replace: that introspects the fields on every call (~5 us of host time).
        return Problem(self.batch, self.heads, self.kv_heads, self.q_len, self.k_len, self.head_dim, self.scale,
                       self.causal, row_start, row_end, self.backend, self.causal_offset, self.softcap, self.window)

    @property
    def raw_softcap(self) -> float:
        """The soft cap in units of the raw products q . k (softcap / scale; 0.0: none): the kernels
        cap those, R * tanh(s / R), so that everything after (the scale, max, exp2) stays as it is."""
        return self.softcap / self.scale if self.softcap else 0.0

    def first_key(self, row: int) -> int:
        """The first key query ``row`` (and any later row) sees: 0 without a sliding window."""
        return min(max(0, row + self.causal_offset - self.window + 1), self.k_len) if self.window else 0

    @property
    def group(self) -> int:
        """Query heads per key head (1 for MHA, H for MQA)."""
        return self.heads // self.kv_heads

    @property
    def n_rows(self) -> int:
        return self.row_end - self.row_start


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensors(query, key, allowed_dtypes=SUPPORTED_DTYPES) -> None:
    """Raise a clear TypeError/ValueError unless query (B, H, Sq, D) and key (B, Hk, Sk, D) fit."""
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, H, Sq, D)" if name == "query" else "(B, Hk, Sk, D)"
            raise ValueError(f"{name} must be 4-D {layout}; got shape {_shape(t)}")
        if t.dtype not in allowed_dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
            raise TypeError(f"{name} must have dtype in ({names}); got {t.dtype}")
    if query.dtype != key.dtype:
        raise TypeError(f"query and key must share a dtype; got query {query.dtype}, key {key.dtype}")
    if query.device != key.device:
        raise ValueError(f"query and key must be on one device; got query on {query.device}, key on {key.device}")
    (b, h, _, d), (bk, hk, _, dk) = query.shape, key.shape
    if b != bk:
        raise ValueError(f"batch sizes differ: query {_shape(query)} has B={b}, key {_shape(key)} has B={bk}")
    if d != dk:
        raise ValueError(f"head dims differ: query {_shape(query)} has D={d}, key {_shape(key)} has D={dk}")
    if d == 0:
        raise ValueError(f"head dim must be at least 1; got query {_shape(query)}")
    if h == 0 or hk == 0:
        raise ValueError(f"head counts must be positive; got query {_shape(query)}, key {_shape(key)}")
    if h % hk != 0:
        raise ValueError(
            f"query heads H={h} must be a multiple of key heads Hk={hk} (GQA/MQA); "
            f"got query {_shape(query)}, key {_shape(key)}"
        )
    if query.shape[2] == 0:
        raise ValueError(f"query has no rows (Sq=0), so the mean over rows is undefined; got query {_shape(query)}")


def _positive_real(name: str, value, default: float) -> float:
    """``value`` as a float, ``default`` for None; else a TypeError/ValueError naming ``name`` unless
    it is a finite positive real number."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and positive (or None); got {value}")
    return value


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` or its default 1/sqrt(D), checked to be a finite positive number."""
    return _positive_real("scale", scale, 1.0 / math.sqrt(head_dim))


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return int(value)


def resolve_backend(backend, device: torch.device, head_dim: int) -> str:
    """Map ``"auto"`` to a concrete back end and refuse a Triton request that cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        use_triton = device.type == "cuda" and triton_available() and head_dim <= MAX_TRITON_HEAD_DIM
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_can_run(device):
            why = "Triton is not installed" if not triton_available() else (
                f"tensors are on {device}; Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"
            )
            raise ValueError(f"backend='triton' cannot run here: {why}")
        if head_dim > MAX_TRITON_HEAD_DIM:
            raise ValueError(
                f"backend='triton' supports head dims up to {MAX_TRITON_HEAD_DIM}; got D={head_dim} "
                "(use backend='torch')"
            )
    return backend


def make_problem(query, key, scale, is_causal, backend, allowed_dtypes=SUPPORTED_DTYPES, softcap=None,
                 window=None) -> Problem:
    """Validate the tensors and the common arguments; all query rows selected."""
    check_tensors(query, key, allowed_dtypes)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
    b, h, sq, d = query.shape
    hk, sk = key.shape[1], key.shape[2]
    window = resolve_window(window, is_causal)
    return Problem(
        batch=b, heads=h, kv_heads=hk, q_len=sq, k_len=sk, head_dim=d,
        scale=resolve_scale(scale, d), causal=is_causal, row_start=0, row_end=sq,
        backend=resolve_backend(backend, query.device, d), causal_offset=sk - sq,
        softcap=resolve_softcap(softcap), window=window,
    )


def resolve_window(window, is_causal: bool) -> int:
    """``window`` as the Problem keeps it: 0 for None, else a positive int with is_causal."""
    if window is None:
        return 0
    window = check_positive_int("window", window)
    if not is_causal:
        raise ValueError("window (a sliding window over the keys before each query) needs is_causal=True")
    return window


def resolve_softcap(softcap) -> float:
    """``softcap`` as the Problem keeps it: 0.0 for None, else checked to be a finite positive number."""
    return _positive_real("softcap", softcap, 0.0)


def problem_from_shapes(query, key, scale: float, causal: bool, row_start: int, row_end: int, backend: str,
                        softcap: float = 0.0, window: int = 0) -> Problem:
    """A Problem for already validated arguments (inside the registered operator)."""
    b, h, sq, d = query.shape
    sk = key.shape[2]
    return Problem(
        batch=b, heads=h, kv_heads=key.shape[1], q_len=sq, k_len=sk, head_dim=d,
        scale=scale, causal=causal, row_start=row_start, row_end=row_end, backend=backend,
        causal_offset=sk - sq, softcap=softcap, window=window,
    )


def _clamp_index(i: int, n: int) -> int:
    """A slice bound in Python's convention (negative counts from the end), clamped to [0, n]."""
    return min(max(i + n if i < 0 else i, 0), n)


def resolve_rows(rows, q_len: int, allow_empty: bool = False):
    """(start, stop) of the contiguous query rows ``rows`` selects (a slice or range, Python's convention).

    None selects all rows. An empty selection raises, or gives None with allow_empty.
    """
    if rows is None:
        return 0, q_len
    if not isinstance(rows, (slice, range)):
        raise TypeError(f"rows must be a slice, a range or None; got {type(rows).__name__}")
    for part in (rows.start, rows.stop, rows.step):
        if part is not None and (isinstance(part, bool) or not isinstance(part, numbers.Integral)):
            raise TypeError(f"rows must have int bounds; got {rows!r}")
    if rows.step not in (None, 1):
        raise ValueError(f"rows must be contiguous (step 1); got {rows!r}")
    # slice.indices by hand: torch.compile (dynamo) cannot trace that builtin in every release.
    start = _clamp_index(0 if rows.start is None else rows.start, q_len)
    stop = _clamp_index(q_len if rows.stop is None else rows.stop, q_len)
    if stop <= start:
        if allow_empty:
            return None
        raise ValueError(f"rows={rows!r} selects no query row of Sq={q_len}")
    return start, stop


def check_tensor_arg(name: str, t, dtype: torch.dtype, device: torch.device) -> None:
    """A tensor argument of a fixed dtype on the inputs' device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}; got {t.device}")


def check_mask(name: str, mask, shape: tuple, device: torch.device):
    """A (B, S) keep-mask (True/nonzero = keep) as a bool tensor, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (True/1 = keep); got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}; got {mask.device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_varlen(query, key, cu_seqlens_q, cu_seqlens_k, conflicts: dict) -> tuple[list, list]:
    """Validate packed (total, H, D) inputs and their cumulative lengths; return both as int lists."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k (packed sequences), or neither")
    for name, value in conflicts.items():
        if value is not None:
            raise ValueError(f"{name} does not apply to packed sequences (cu_seqlens): padding is already gone")
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"with cu_seqlens, {name} must be 3-D (total, heads, D); got shape {_shape(t)}")
    bounds = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, query.shape[0]), ("cu_seqlens_k", cu_seqlens_k, key.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor; got {getattr(cu, 'dtype', type(cu).__name__)}")
        values = cu.tolist()
        if len(values) < 2 or values[0] != 0:
            raise ValueError(f"{name} must start at 0 and hold N + 1 >= 2 offsets; got {values[:8]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must be non-decreasing; got {values[:8]}{'...' if len(values) > 8 else ''}")
        if values[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}; got {values[-1]}")
        bounds.append(values)
    if len(bounds[0]) != len(bounds[1]):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences; got {len(bounds[0]) - 1} and {len(bounds[1]) - 1}")
    return bounds[0], bounds[1]


def drop_rows(lse: torch.Tensor, row_keep, p: Problem) -> torch.Tensor:
    """The selected rows' (B, H, n_rows) LSE with +inf where ``row_keep`` (B, Sq) is False: every
    weight exp(s - lse) a dropped row adds is then exactly 0. No mask: ``lse`` unchanged."""
    if row_keep is None:
        return lse
    return lse.masked_fill(~row_keep[:, None, p.row_start : p.row_end], float("inf"))


def padded_lse2(lse: torch.Tensor, length: int) -> torch.Tensor:
    """The selected rows' (B, H, n_rows) natural-log LSE in base 2, float32 (B, H, length): lse *
    log2(e), then +inf (weight 0) up to ``length``. Pass 2 then loads whole row tiles of it with no
    mask and no multiply per tile."""
    out = torch.full((*lse.shape[:-1], length), float("inf"), dtype=torch.float32, device=lse.device)
    torch.mul(lse, LOG2E, out=out[..., : lse.shape[-1]])
    return out


def key_keep_args(key_keep, dummy: torch.Tensor) -> tuple:
    """A kernel's KEY_KEEP pointer and its (batch, key) strides: the (B, Sk) bool mask viewed as
    bytes, or ``dummy`` (any tensor: the kernel never reads it) and zero strides."""
    if key_keep is None:
        return dummy, 0, 0
    return key_keep.view(torch.uint8), *key_keep.stride()


def new_output(shape, device) -> torch.Tensor:
    """Allocate a float32 result that a kernel fully overwrites (tests swap in a NaN-filled one)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


# Compiled kernels by launch: Triton's `kernel[grid](...)` derives the kernel's specialization from
# every argument at each call (a binder over ~40 arguments, a cache key, a lookup): on the lent
# H100's host that is a third of a small call's host time. A call whose arguments specialize alike
# reuses the compiled kernel that lookup returned. Bounded: cleared when full (a decoding loop with a
# growing key length makes a new entry per step and only pays for the key).
_COMPILED: dict = {}
_COMPILED_MAX = 1024


def _arg_key(a):
    """What a compiled kernel depends on of an argument: a tensor's dtype, device (compiled kernels
    are per device; launchers run on their tensors' device) and whether its data is 16-byte aligned,
    not its address; a TMA descriptor's base as well, with its shapes; any other value exactly, with
    its type (1, True and 1.0 are equal in Python but specialize differently). `launch` keys plain
    ints, most arguments, by value alone: their divisibility and width follow from it."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.device, a.data_ptr() % 16 == 0
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor):  # a TensorDescriptor (a dataclass: not hashable)
        return (base.dtype, base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides), tuple(a.block_shape),
                getattr(a, "padding", None), getattr(a, "layout", None))
    return type(a), a


def launch(kernel, grid: tuple, *args, **meta):
    """``kernel[grid](*args, **meta)`` (constexprs and launch options by keyword), through the
    compiled kernel of an earlier call with the same `_arg_key`s and keywords (each call site passes
    its keywords with fixed types). Under the interpreter, or where Triton returns no compiled
    kernel, every call takes the JIT path."""
    key = (kernel, *[a if type(a) is int else _arg_key(a) for a in args], *meta.items())
    entry = _COMPILED.get(key)
    if entry is not None:
        compiled, constexprs = entry
        compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs)
        return
    # FFMA contraction pinned on: Triton 3.9 warns its default turns off in 3.10, and the kernels'
    # scale-and-subtract before each exp2 is written to fuse into one instruction.
    compiled = kernel[grid](*args, enable_fp_fusion=True, **meta)
    if not hasattr(compiled, "packed_metadata"):  # not a CompiledKernel (Triton 3.x): the interpreter's None
        return
    names = kernel.arg_names[len(args):]  # the compiled launcher takes every parameter in order
    if all(name in meta for name in names):
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        # The keywords are part of the key: their values, in parameter order, serve every later hit.
        _COMPILED[key] = compiled, tuple(meta[name] for name in names)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch arithmetic (triton.cdiv is a JIT function: ~5 us per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)  # on the host path of every small call
def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): a power-of-two main block and a tail block (0: none), each >= 16.

    72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), 112 -> (128, 0): the split is used only when
    it does less work than padding to the next power of two.
    """
    padded = max(16, next_power_of_2(head_dim))
    main = max(16, padded // 2 if padded > head_dim else padded)
    tail = 0 if main >= head_dim else max(16, next_power_of_2(head_dim - main))
    return (main, tail) if main + tail < padded else (padded, 0)


class NoGradient(torch.autograd.Function):
    """``NoGradient.apply(message, results, *inputs)``: the tuple ``results`` (copies), tied to
    ``inputs`` that require grad, so that a backward through them raises NotImplementedError(message)
    instead of silently leaving those inputs' gradient out."""

    @staticmethod
    def forward(ctx, message, results, *inputs):
        ctx.message = message
        return tuple(result.clone() for result in results)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(ctx.message)
