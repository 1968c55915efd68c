"""SIGINT and SIGTERM end a command at once, with one line, whatever it is doing.

Python runs a signal handler only between two bytecodes of the main thread:
a main thread blocked in TensorFlow's C++ (a collective waiting for peers)
never runs it, and a `KeyboardInterrupt` raised inside a library can be
caught there and lost. Here the handlers do nothing; the signal's byte on
Python's wake-up file descriptor (written by the C-level handler as the
signal arrives) wakes a daemon thread that prints one line and ends the
process with the shell's status for the signal (130 for SIGINT, 143 for
SIGTERM). Ending there is as safe as SIGKILL, which a run already survives:
every file of a run is written atomically, and the same command resumes it.
"""

import os
import signal
import threading

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def exit_on_signals(message):
    """Makes SIGINT and SIGTERM end this process with one line on stderr.

    Call it once, from the main thread, at the start of a command.

    Args:
        message: The line's text after `"Stopped by SIGINT: "` (or
            SIGTERM), e.g. how to resume.

    Example:

    >>> exit_on_signals("run the same command again to resume.")
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in EXIT_STATUS:
        signal.signal(signum, lambda *_: None)
    threading.Thread(target=_exit_when_signalled, args=(read_fd, message),
                     name="exit_on_signals", daemon=True).start()


def _exit_when_signalled(read_fd, message):
    while True:
        signum = os.read(read_fd, 1)[0]
        if signum in EXIT_STATUS:
            os.write(2, f"Stopped by {signal.Signals(signum).name}: {message}\n".encode())
            os._exit(EXIT_STATUS[signum])  # pylint: disable=protected-access
