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

Two cases need more than that: TensorFlow's multi-worker strategy installs
its own C++ SIGTERM handler (which only logs), and while it connects to a
peer that accepts but never answers, the main thread holds the GIL. So the
package's commands (`python -m nbn_keras.train` and the others in
`COMMANDS`) run supervised (`supervise`): as the package starts to import,
before TensorFlow loads, the process forks; the child runs the command, the
parent only relays. A signal to the parent is passed to the child, which
ends with its line as above; a child that has not ended a second later is
killed, and the parent prints the line and exits with the same status. Both
block SIGINT and SIGTERM from the fork until their handlers are in place, so
a signal in between waits for them instead of killing the child silently.
"""

import ctypes
import os
import signal
import sys
import threading
import time

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
COMMANDS = ("nbn_keras.train", "nbn_keras.export", "nbn_keras.evaluate", "nbn_keras.import_torch")
STARTING_MESSAGE = "stopped while starting, before writing anything."
# Seconds a supervised command has to end by itself after a signal.
GRACE_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.
# The handler thread, the line it prints, and (in a supervised command) the
# pipe that tells the supervisor that line: a process has one of each.
_handler = {}


def started_as_command(argv=None):
    """Whether this process is `python -m` one of `COMMANDS`.

    Args:
        argv: The interpreter's own command line; default `sys.orig_argv`,
            which is set before any module is imported.
    """
    args = iter((sys.orig_argv if argv is None else argv)[1:])
    for arg in args:
        if arg in ("-X", "-W"):
            next(args, None)  # The option's value.
        elif arg.startswith("-m"):
            return (arg[2:] or next(args, None)) in COMMANDS
        elif not arg.startswith("-") or arg.startswith("-c"):
            return False  # A script or `-c` code: not one of ours.
    return False


def exit_on_signals(message):
    """Makes SIGINT and SIGTERM end this process with one line on stderr.

    Call it from the main thread at the start of a command; a later call
    only changes the line.

    Args:
        message: The line's text after `"Stopped by SIGINT: "` (or
            SIGTERM), e.g. how to resume.

    Example:

    >>> exit_on_signals("run the same command again to resume.")
    """
    _handler["message"] = message
    if "report_fd" in _handler:
        os.write(_handler["report_fd"], message.encode() + b"\n")
    if "thread" in _handler:
        restore_handlers()
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _handler["thread"] = threading.Thread(
        target=_exit_when_signalled, args=(read_fd,), name="exit_on_signals", daemon=True)
    _handler["thread"].start()
    restore_handlers()
    if "report_fd" in _handler:  # Blocked by `supervise`; pending ones arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, EXIT_STATUS)


def start_command(argv, on_signal):
    """What every command's `main(argv)` does first.

    Refuses arguments that are not flags, makes SIGINT and SIGTERM end the
    command with one line (`exit_on_signals(on_signal)`), and, unless
    `--verbosity` is given, keeps absl's and TensorFlow's INFO lines (strategy,
    saving, export) out of what the command prints.

    Args:
        argv: The arguments absl's `app.run` passes to `main`.
        on_signal: The line's text after `"Stopped by SIGTERM: "`.

    Raises:
        absl.app.UsageError: `argv` holds more than the program name.
    """
    from absl import app  # pylint: disable=import-outside-toplevel
    from absl import flags  # pylint: disable=import-outside-toplevel
    from absl import logging  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    exit_on_signals(on_signal)
    if flags.FLAGS["verbosity"].using_default_value:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")


def restore_handlers():
    """Takes SIGINT and SIGTERM back after a library replaced their handlers.

    TensorFlow's multi-worker strategy installs a SIGTERM handler of its own
    that only logs; call this once the strategy exists.
    """
    if "thread" in _handler:
        for signum in EXIT_STATUS:
            signal.signal(signum, lambda *_: None)  # The wake-up byte does the work.


def _exit_when_signalled(read_fd):
    while True:
        signum = os.read(read_fd, 1)[0]
        if signum in EXIT_STATUS:
            os.write(2, _line(signum, _handler["message"]))
            os._exit(EXIT_STATUS[signum])  # pylint: disable=protected-access


def _line(signum, message):
    return f"Stopped by {signal.Signals(signum).name}: {message}\n".encode()


def supervise():
    """Runs the rest of this process as a child and relays signals to it.

    Returns in the child (which goes on with the command); the parent waits
    for the child and exits with its status, never returning. Only on Linux
    (the child dies with its parent through `prctl`); elsewhere, returns at
    once without forking. Call it before any thread starts, and
    `exit_on_signals` next in the child: SIGINT and SIGTERM stay blocked in
    the child until then.
    """
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(os, "fork"):
        return
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    # Until each side's handlers are in place (`exit_on_signals`, `_relay`),
    # a signal waits: passed on the instant after the fork, it would meet the
    # child's default action and end it without its line.
    signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_STATUS)
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # The parent died before prctl.
            os._exit(1)  # pylint: disable=protected-access
        _handler["report_fd"] = write_fd
        return
    os.close(write_fd)
    _relay(child, read_fd)


def _relay(child, read_fd):
    """The supervisor's loop: passes signals on, then ends like the child."""
    received = []
    for signum in EXIT_STATUS:
        signal.signal(signum, lambda signum, _: received.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, EXIT_STATUS)
    os.set_blocking(read_fd, False)
    message, pending, passed_at = STARTING_MESSAGE, b"", None
    while True:
        try:
            pending += os.read(read_fd, 4096)
        except BlockingIOError:
            pass
        *lines, pending = pending.split(b"\n")
        message = lines[-1].decode() if lines else message
        ended, status = os.waitpid(child, os.WNOHANG)
        if ended:
            _exit_like(status)
        if received and passed_at is None:
            os.kill(child, received[0])
            passed_at = time.monotonic()
        elif passed_at is not None and time.monotonic() - passed_at > GRACE_SECONDS:
            # The child could not run its handler: end it as SIGKILL would.
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            os.write(2, _line(received[0], message))
            os._exit(EXIT_STATUS[received[0]])  # pylint: disable=protected-access
        time.sleep(0.02)


def _exit_like(status):
    """Ends this process as the child with wait status `status` ended."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum != signal.SIGKILL:  # SIGKILL's action cannot be set.
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(os.waitstatus_to_exitcode(status))  # pylint: disable=protected-access
