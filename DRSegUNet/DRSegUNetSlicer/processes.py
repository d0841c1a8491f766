"""Starting a process whose output lines are read without blocking the GUI.

The logic takes a :class:`ProcessRunner` as a constructor argument, so tests inject a
fake that prints what ``python -m DRSegUNetLib finetune --json-progress`` prints.
"""
import os
import queue
import signal
import subprocess
import threading
from typing import Dict, List, Optional, Protocol, Sequence, Tuple


class RunningProcess(Protocol):
    def readLines(self) -> List[Tuple[str, str]]: ...  # (stream "out"/"err", line) received so far
    def returnCode(self) -> Optional[int]: ...  # None while running or while output is unread
    def terminate(self) -> None: ...


class ProcessRunner(Protocol):
    def start(self, args: Sequence[str], env: Dict[str, str]) -> RunningProcess: ...


class SubprocessRunner:
    """Default runner: ``subprocess.Popen`` with reader threads, so polling never blocks."""

    def start(self, args: Sequence[str], env: Dict[str, str]) -> "Subprocess":
        return Subprocess(args, env)


class Subprocess:
    """A running ``subprocess.Popen`` whose stdout and stderr lines are queued by two threads."""

    def __init__(self, args: Sequence[str], env: Dict[str, str]):
        # Own process group (POSIX: session), so that terminate() also ends what it starts:
        # PythonSlicer is a launcher whose child is the real interpreter.
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        self._proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, creationflags=flags,
                                      start_new_session=os.name != "nt")
        self._lines: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self._proc.stdout, "out"), (self._proc.stderr, "err"))]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def readLines(self) -> List[Tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def returnCode(self) -> Optional[int]:
        rc = self._proc.poll()
        if rc is None or any(t.is_alive() for t in self._readers):
            return None  # not finished until all its output is read
        return rc

    def terminate(self) -> None:
        """End the process and everything it started (its process group / tree)."""
        if os.name != "nt":
            self._signalGroup(signal.SIGTERM)  # also when the launcher is gone and its child is not
        elif self._proc.poll() is None:
            subprocess.run(["taskkill", "/PID", str(self._proc.pid), "/T", "/F"], capture_output=True,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            if os.name != "nt":
                self._signalGroup(signal.SIGKILL)
            self._proc.kill()

    def _signalGroup(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the group is the process's own (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
