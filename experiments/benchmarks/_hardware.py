"""Shared pieces of the bench_* scripts: the hardware header printed beside the numbers, device and thread
setup, the command line, number formatting, Markdown tables and the report writer."""

from __future__ import annotations

import math
import os
import platform
import shlex
import sys

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_lines(device: torch.device, libraries: str = "") -> list[str]:
    """Markdown bullet lines: CPU, torch (+ ``libraries``, e.g. "torchsde 0.2.6"), GPU."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    extra = f", {libraries}" if libraries else ""
    lines = [
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, {affinity} usable), {platform.platform()}",
        f"- torch {torch.__version__} (intra-op threads {torch.get_num_threads()}){extra}, Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"- GPU: {names} (CUDA {torch.version.cuda}); benchmark device: `{device}`")
    else:
        lines.append(f"- GPU: none visible to torch; benchmark device: `{device}`")
    return lines


def load_line() -> str:
    try:
        la = os.getloadavg()
    except (AttributeError, OSError):
        return "load average: n/a"
    return f"load average (1/5/15 min): {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_report(lines: list[str], path: str | None) -> str:
    """Join the report's lines and, when ``path`` is given, write them there (folders created)."""
    report = "\n".join(lines) + "\n"
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(report)
    return report


def setup_device(threads: int | None, device_name: str) -> torch.device:
    """Set torch's intra-op threads (when given), resolve the device, and let cuDNN autotune on CUDA."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run: ``python <script relative to cwd> <arguments>``."""
    argv_used = sys.argv[1:] if argv is None else list(argv)
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script)] + argv_used)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (timings are otherwise only launch times); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(x: float, digits: int = 3, non_finite: str | None = None) -> str:
    """``x`` with about ``digits`` significant digits; ``str(x)`` for 0, and for nan/inf unless ``non_finite`` is given."""
    if not math.isfinite(x):
        return str(x) if non_finite is None else non_finite
    if x == 0:
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
