"""The machine a run or a study ran on, in one line."""

import os
import platform


def cpu_model():
    """The CPU model name (and family) from /proc/cpuinfo, if readable."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    return (
        f"{fields.get('model name', 'unknown CPU')} (family "
        f"{fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    )


def machine_line(threads):
    """One line describing the machine, for the top of a table."""
    return (
        f"machine: {cpu_model()}, nproc={os.cpu_count()}, threads={threads}, "
        f"Python {platform.python_version()}"
    )
