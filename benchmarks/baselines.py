"""The published column-sum packages as benchmark baselines, loaded from their wheel files.

flash-colsum 0.1.0's top-level package is also called ``flash_colsum``, so it cannot be installed
beside this repository's. Each wheel is unpacked into a temporary folder and its package imported
under another module name (`ALIASES`); its relative imports resolve inside that name. Triton's JIT
reads kernel source from the files, hence unpacking rather than importing from the zip.

Both packages launch Triton kernels on CUDA tensors only; their import works anywhere Triton does.
Each adapter takes (q, k, causal) and returns the mean weight per key, (B, Sk), like `flash_colsum`,
and raises NotImplementedError where a package would silently compute something else.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

DEFAULT_WHEEL_DIR = Path(__file__).resolve().parent.parent / ".whl"
ALIASES = {"flash_colsum": "flash_colsum_v010", "flash_colreduce": "flash_colreduce_v022"}
_unpacked = None  # the TemporaryDirectory holding the unpacked wheels, removed at exit


def import_wheel(wheel: Path, package: str, alias: str):
    """Import `package` from the wheel file `wheel` as the module `alias` (once per process)."""
    global _unpacked
    if alias in sys.modules:
        return sys.modules[alias]
    if _unpacked is None:
        _unpacked = tempfile.TemporaryDirectory(prefix="flash_colsum_baselines_")
    root = Path(_unpacked.name) / wheel.stem
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root)
    spec = importlib.util.spec_from_file_location(
        alias, root / package / "__init__.py", submodule_search_locations=[str(root / package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module  # before executing: its relative imports look the parent up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


def _colsum_010(mod) -> Callable:
    """flash_colsum(query, key, scale=None, is_causal=False, cls_len=None) -> (B, Sk) float16.

    It checks for itself: CUDA only; non-causal needs q and k of one shape (Sq == Sk, no GQA);
    causal needs B == 1 and H == Hk. Not checked there: its kernels load a fixed 64-wide head-dim
    block (D > 64 silently drops dims), and its causal offset is max(0, Sk - Sq) (Sq > Sk is not
    bottom-right aligned).
    """

    def run(q, k, causal):
        if q.shape[-1] > 64:
            raise NotImplementedError("0.1.0 reads only the first 64 head dims")
        if causal and q.shape[2] > k.shape[2]:
            raise NotImplementedError("0.1.0's causal mask is bottom-right aligned only for Sq <= Sk")
        return mod.flash_colsum(q, k, is_causal=causal)

    return run


def _colreduce_022(mod) -> Callable:
    """flash_colreduce(query, key, reduction, is_causal=False, scale=None) -> (B, H, Sk) in q's dtype.

    reduction is "sum", "mean" or "max" per head; its causal "mean" divides by the rows that see
    each key, so the adapter asks for "sum" and takes the mean over heads and all rows itself. It
    checks: CUDA only, q and k with equal B, H and D (no GQA). Head dims that are not a power of two
    are zero-padded (F.pad copies of q and k). Causal offset max(0, Sk - Sq): Sq > Sk is not
    bottom-right aligned.
    """

    def run(q, k, causal):
        if causal and q.shape[2] > k.shape[2]:
            raise NotImplementedError("flash-colreduce's causal mask is bottom-right aligned only for Sq <= Sk")
        per_head = mod.flash_colreduce(q, k, "sum", is_causal=causal)
        return per_head.float().sum(dim=1).div_(q.shape[1] * q.shape[2])

    return run


# method name -> (wheel file name prefix, package inside the wheel, adapter)
BASELINES = {
    "flash_colsum_0.1.0": ("flash_colsum-0.1.0-", "flash_colsum", _colsum_010),
    "flash_colreduce_0.2.2": ("flash_colreduce-0.2.2-", "flash_colreduce", _colreduce_022),
}


def load_baselines(wheel_dir: Path | str = DEFAULT_WHEEL_DIR) -> dict[str, Callable]:
    """{method name: callable(q, k, causal) -> (B, Sk)} for every baseline whose wheel imports.

    A missing wheel or a failed import leaves that baseline out, with the reason printed; get the
    wheels with
    ``python -m pip download --no-deps --only-binary=:all: -d .whl flash-colsum==0.1.0 flash-colreduce==0.2.2``.
    """
    wheel_dir = Path(wheel_dir)
    found = {}
    for name, (prefix, package, adapter) in BASELINES.items():
        wheels = sorted(wheel_dir.glob(f"{prefix}*.whl"))
        if not wheels:
            print(f"baseline {name} left out: no {prefix}*.whl in {wheel_dir}")
            continue
        try:
            found[name] = adapter(import_wheel(wheels[0], package, ALIASES[package]))
        except Exception as e:  # noqa: BLE001  (a baseline that does not import is left out, not fatal)
            print(f"baseline {name} left out: importing {wheels[0].name} failed: {type(e).__name__}: {e}")
    return found
