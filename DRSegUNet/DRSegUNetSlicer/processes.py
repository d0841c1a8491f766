"""Starting a process whose output lines are read without blocking the GUI.

The logic takes a :class:`ProcessRunner` as a constructor argument, so tests inject a
fake that prints what ``python -m DRSegUNetLib finetune --json-progress`` prints.
"""
import queue
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
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        self._proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, creationflags=flags)
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
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
