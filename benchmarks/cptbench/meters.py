"""Instruments the workers measure with: peak RSS, other processes' CPU, a quiet gate, a FLOP counter."""

from __future__ import annotations

import os
import resource
import time

import torch

from cptbench.settings import GIB


def peak_rss_gb() -> float:
    """Peak RSS of this process since it started (``ru_maxrss``), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        return float(next(ln.split()[1] for ln in f if ln.startswith(field + ":")))


def rss_mib() -> float:
    """Resident set size of this process now (``VmRSS``), MiB."""
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Restart the peak RSS mark (``VmHWM``) at the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak RSS (``VmHWM``) since the process started or since :func:`reset_peak_rss`, MiB."""
    return _status_kib("VmHWM") / 1024


class ForeignCPU:
    """CPU seconds used by other processes during a window: /proc/stat busy time minus our own."""

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), self._machine_busy(), self._own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        foreign = (self._machine_busy() - self._busy) - (self._own_cpu() - self._own)
        self.cores = max(foreign, 0.0) / max(wall, 1e-9)  # average busy cores of other processes
        return False

    @staticmethod
    def _machine_busy() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def _causal_pairs(lq: int, lk: int) -> int:
    # torch's is_causal mask is top-left aligned: query i sees keys 0..i.
    return sum(min(i + 1, lk) for i in range(lq))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """QK^T and PV of CPU flash attention (FlopCounterMode has no formula for the CPU kernel)."""
    b, h, lq, hd = query_shape
    lk = key_shape[2]
    pairs = _causal_pairs(lq, lk) if is_causal else lq * lk
    return 4 * b * h * pairs * hd


def _sdpa_cpu_backward_flops(grad_shape, query_shape, key_shape, value_shape, out_shape_, lse_shape,
                             dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p, is_causal)  # dQ, dK, dV, dP


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    })


def wait_for_quiet(max_wait: float, threshold: float = 0.5, probe: float = 1.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes keep fewer than ``threshold`` cores busy.

    Returns the seconds waited. A test run starting next to a measurement oversubscribes the two
    cores, and OpenMP then slows both sides several-fold; this gate skips the start of such bursts.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        with ForeignCPU() as foreign:
            time.sleep(probe)
        if foreign.cores < threshold:
            break
    return time.perf_counter() - t0
