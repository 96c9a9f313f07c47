"""The Gram matrix ``X^T X`` of a layer's inputs, accumulated: the proxy Hessian of GPTQ and SparseGPT
(E. Frantar, D. Alistarh, "Optimal Brain Compression", arXiv:2208.11580; GPTQ, arXiv:2210.17323).

Only its upper triangle is computed. On the CPU at one thread that is BLAS's ``ssyrk`` from the
OpenBLAS that numpy's wheels bundle (torch has no symmetric rank-k update). Against the torch path,
addmm over strips of columns right of the diagonal, for 4,096 tokens of 576-2,048 columns on an AMD EPYC
with AVX-512: 1.39-1.46x (``bench/gram_speed.py``, docs/results/gram-speed.json), 1.25-1.47x counting
the float32 copy of the bf16 input that both take. ``addmm`` on a bf16 copy is 2x faster but rounds its
output to bf16, and MKL's bf16-in, float32-out GEMM runs at float32 speed there.

With more threads, the torch path. Alone, ``ssyrk`` on two threads was no slower than it, but
OpenBLAS's threads and torch's then take turns on the same cores: a whole smollm2-135m GPTQ at two
threads took 74-77 s against 52 s. ``ssyrk`` on one thread each over two halves of the rows, summed, was
1.16x the strips at 2,048 columns and slower at 640, and the same whole GPTQ took 59-61 s against 58-60.
Elsewhere (a GPU, a numpy built without OpenBLAS), the torch path too.

bf16 inputs at one thread on a CPU with AVX512-BF16 take ``unweight.dpbf16`` instead: the products summed
in float32 by ``vdpbf16ps`` at twice float32's rate: 1.51-1.71x ``ssyrk`` with its float32 copy, and a
third of its error.
"""

import ctypes
import functools

import torch

from unweight import dpbf16


@functools.cache
def _openblas():
    """numpy's bundled OpenBLAS ``ssyrk``, set to one thread (found through numpy's own extension,
    whose dependencies ``dlsym`` searches), or None."""
    try:
        from numpy._core import _multiarray_umath
        lib = ctypes.CDLL(_multiarray_umath.__file__)
        syrk, set_threads = lib.scipy_cblas_ssyrk64_, lib.scipy_openblas_set_num_threads64_
    except (ImportError, OSError, AttributeError):
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    syrk.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, f32, ptr, i64, f32, ptr, i64]
    syrk.restype = None
    set_threads.argtypes = [ctypes.c_int]
    set_threads.restype = None
    set_threads(1)  # in the calling thread, no pool spinning beside torch's (numpy's BLAS too, as torch)
    return syrk


_COL_MAJOR, _LOWER, _NO_TRANS = 102, 122, 111  # CBLAS enums


def add_gram_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper triangle of ``x^T x`` (``x``: ``[n, d]``, any float dtype) to ``acc`` (``[d, d]``,
    float32), summed in float32. The strictly lower triangle of ``acc`` is left holding partial sums or
    nothing, and must be ignored."""
    d = x.shape[1]
    one_cpu_thread = (torch.get_num_threads() == 1 and acc.device.type == "cpu" and acc.is_contiguous() and d > 0
                      and acc.dtype == torch.float32)
    if one_cpu_thread and x.dtype == torch.bfloat16 and dpbf16.rows_for(d) and dpbf16.available():
        dpbf16.add_gram_upper_bf16(acc, x)
        return
    x = x.to(torch.float32)
    syrk = _openblas() if one_cpu_thread else None
    if syrk is None:
        add_gram_upper_reference(acc, x)
        return
    x = x.contiguous()
    # row-major x is the column-major d x n matrix A = x^T; A A^T's lower triangle, column-major, is
    # the upper triangle of acc, row-major
    syrk(_COL_MAJOR, _LOWER, _NO_TRANS, d, x.shape[0], 1.0, x.data_ptr(), d, 1.0, acc.data_ptr(), d)


def add_gram_upper_reference(acc: torch.Tensor, x: torch.Tensor) -> None:
    """:func:`add_gram_upper` in torch: blocks on and right of the diagonal, in strips of columns (about
    0.55 of the full product's time on the CPU, which is not symmetric-aware)."""
    d = x.shape[1]
    strip = 128 if d < 1024 else 256
    for i in range(0, d, strip):
        acc[i:i + strip, i:].addmm_(x[:, i:i + strip].T, x[:, i:])
