"""What every benchmark shares: the CPU's name and appending a section to bench/RESULTS.md."""
from __future__ import annotations

import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def append_results(title: str, cmd: str, rows: list[str]) -> None:
    """One section: '## title — date — CPU (n CPUs)', the command, then the given markdown lines."""
    path = os.path.join(HERE, "RESULTS.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nRows are appended by the scripts in bench/ (newest last).\n")
        f.write(f"\n## {title} — {time.strftime('%Y-%m-%d %H:%M')} — {cpu_model()} ({os.cpu_count()} CPUs)\n")
        f.write(f"`{cmd}`\n\n")
        f.write("\n".join(rows) + "\n")
