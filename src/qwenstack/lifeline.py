"""Runs a command, and kills its process group once the qwenstack process that started it ends.

`python -I lifeline.py FD CPUS NICE COMMAND...`: processes.py starts engines and the chat UI this
way, each in a session (process group) of its own. FD is the read end of a pipe whose write end
only the qwenstack process holds, and never writes to: when that process ends, however it ends
(Ctrl-C, SIGKILL, the OOM killer), the kernel closes the write end and a read here returns end
of file. This process forks a watcher for that, then becomes the command (exec: same pid, exit
code and signals, as if started directly); the watcher kills the group, which holds every
process the command started too (vLLM's engine core and workers), so none outlives qwenstack.
CPUS (`0,2`, or `-` for all this process may use) confines the group to those CPUs, and NICE
(0: unchanged) is added to its niceness: both set before the fork and the exec, so every process
and thread the command starts inherits them. The session's autogroup gets NICE too: where the
kernel groups each session (Linux's autogroup, on unless a cgroup decides), a thread's niceness
only weighs against threads of its own session, and the group's against the machine's others.

Run as a file, standard library only, so that it starts in milliseconds whatever environment
the command is given.
"""

import os
import signal
import sys

ALL_CPUS = "-"


def main() -> None:
    lifeline, cpus, nice, command = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if cpus != ALL_CPUS:
        # Of those, the ones this process may still use (a container's cpuset can shrink); if
        # none is left, all of them rather than a command that cannot start.
        allowed = {int(cpu) for cpu in cpus.split(",")} & os.sched_getaffinity(0)
        if allowed:
            os.sched_setaffinity(0, allowed)
    if nice:
        os.nice(nice)
        try:
            with open("/proc/self/autogroup", "w") as autogroup:
                autogroup.write(str(nice))
        except OSError:  # no autogroups in this kernel
            pass
    if os.fork() == 0:
        _watch(lifeline)
    os.close(lifeline)
    os.execvp(command[0], command)


def _watch(lifeline: int) -> None:
    # Only the end of the pipe stops the group here: a SIGINT or SIGTERM (the supervisor stops
    # the group with SIGTERM, giving the command time to shut down) just ends this watcher.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while os.read(lifeline, 1):  # nothing is ever written: this returns at end of file
        pass
    os.killpg(0, signal.SIGKILL)  # the command's group, this watcher with it


if __name__ == "__main__":
    main()
