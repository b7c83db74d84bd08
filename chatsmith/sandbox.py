"""Sandboxed Python for the `python` tool and for evaluation (HumanEval runs every program here).

    from chatsmith.sandbox import run_python
    run_python("print(6 * 7)", timeout_s=10, memory_mb=512, max_output_bytes=4096).format()  # -> "42"

`run_python` is what the `python` tool of chatsmith/tools.py runs; that tool is off unless asked for
(`--allow-python` in chat, serve and sft; `run_tool(..., allow_python=True)`), while the calculator is always on.
Model-written code runs only inside bubblewrap (`bwrap`, Debian package `bubblewrap`, what Flatpak uses); where bwrap
is missing or cannot create namespaces, `run_python` raises SandboxUnavailable, one sentence saying how to install
it. There is no weaker fallback. The sandbox:
- New pid, network, IPC, UTS (and cgroup) namespaces: the program is pid 2 under bwrap's pid 1, sees only its own
  processes in its own /proc (never the parent's /proc/<pid>/environ), and has a loopback device with nothing behind
  it. bwrap, its pid 1 and the program get a minimal environment (PATH, C.UTF-8 locale, HOME=TMPDIR=/tmp, one-thread
  BLAS/OpenMP, MALLOC_ARENA_MAX=2): no CHATSMITH_*, no API keys, no tokens. stdin is /dev/null.
- Files: an empty read-only root with read-only views of /usr (system libraries and programs), /etc/ld.so.cache,
  the interpreter's prefix and the venv (so its site-packages import: numpy fits the 512 MB default, torch does not);
  a private /tmp (64 MB tmpfs; the cwd, with the program as /tmp/main.py) and /dev/shm (8 MB); nothing of ours is
  writable, nothing else of ours is visible (no home, no repository, no other /etc).
- Privileges: no_new_privs, no capabilities. As root (a container), the program drops to a uid of its own (random,
  from 2^30 up: no account, no other run) because root is exempt from RLIMIT_NPROC; as another user, bwrap maps
  that user alone and forbids nested user namespaces.
- Limits, set by a few lines of launcher inside the sandbox (RLIMIT_NPROC set outside would count every process of
  our user): RLIMIT_AS (memory; an allocation past it raises MemoryError, reported as `memory_exceeded`),
  RLIMIT_NPROC (processes and threads; a fork bomb fails fast), RLIMIT_CPU (timeout + 1 s, a backstop),
  RLIMIT_FSIZE (64 MB per file), no core dumps; fds above 2 are closed before the program starts.
- Wall-clock timeout: bwrap gets SIGKILL; `--die-with-parent` then kills the sandbox's pid 1, and the kernel every
  process in its pid namespace (also ones that called setsid()). When the program exits, bwrap exits and the rest of
  the sandbox dies the same way, so a forked child cannot hold the output pipes open. We wait with `WNOWAIT`, so
  bwrap stays unreaped until its group is killed and the group id cannot be recycled in between.
- Output: stdout and stderr are each kept to `max_output_bytes` (the head, a marker with the number of bytes cut,
  and the last 1 KB, so a traceback at the end survives); the parent never buffers more than that.
- Exit codes follow subprocess: negative = killed by that signal (bwrap's 128 + N is read back as -N).
What is left: the kernel's system-call surface (no seccomp filter) and, as root, user namespaces the program may
create inside its own (they own nothing of ours). tests/test_sandbox.py holds the escape attempts it must contain.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import UserError

INSTALL_BWRAP = "install it with `apt-get install bubblewrap` (Debian/Ubuntu; the package is bubblewrap elsewhere too)"
SANDBOX_UIDS = (1 << 30, 1 << 31)  # as root, each run takes a uid from here: no account has one, no run shares one
TMP_BYTES = 64 << 20  # size of the private /tmp (a tmpfs: its files are memory that RLIMIT_AS does not count)
SHM_BYTES = 8 << 20  # size of /dev/shm (multiprocessing's semaphores live there)
FILE_BYTES = 64 << 20  # RLIMIT_FSIZE: the largest file the program may write


class SandboxUnavailable(UserError):
    """bubblewrap is missing or cannot create its namespaces here, so no model-written code runs."""


@dataclasses.dataclass(frozen=True)
class PythonResult:
    """What one run of `run_python` did; `format()` is the text of the tool turn."""

    stdout: str
    stderr: str
    exit_code: int  # negative: killed by that signal (subprocess convention)
    timed_out: bool
    memory_exceeded: bool
    truncated: bool
    seconds: float
    timeout_s: float
    memory_mb: int
    max_output_bytes: int

    def format(self) -> str:
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        if self.timed_out:
            parts.append(f"[timed out after {self.timeout_s:g} s; the process was killed]")
        elif self.memory_exceeded:
            parts.append(f"[memory limit of {self.memory_mb} MB exceeded]")
        elif self.exit_code != 0:
            parts.append(f"[exit code {self.exit_code}]")
        if self.truncated:
            parts.append(f"[output truncated to {self.max_output_bytes} bytes per stream]")
        return "\n".join(parts) if parts else "[no output]"


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, max_output_bytes: int = 4096,
               max_processes: int = 32) -> PythonResult:
    """Run `code` as a Python program inside the bubblewrap sandbox, with wall-clock, memory, process and output
    limits (see the module docstring). Raises SandboxUnavailable (a UserError: one sentence saying how to install
    bubblewrap) where the sandbox cannot start; the program's own failures come back in the result."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"the python tool runs code only inside bubblewrap, which is not installed here: "
                                 f"{INSTALL_BWRAP}")
    as_root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(*SANDBOX_UIDS) if as_root else None
    launcher = _launcher(memory_mb, timeout_s, max_processes, uid)
    with tempfile.TemporaryFile() as source:  # unlinked: bwrap copies it to /tmp/main.py inside
        source.write(code.encode("utf-8", errors="replace"))
        source.flush()
        source.seek(0)
        status_read, status_write = os.pipe()
        try:
            start = time.monotonic()
            proc = subprocess.Popen(
                [bwrap, *_bwrap_options(source.fileno(), status_write, as_root), sys.executable, "-I", "-S", "-c",
                 launcher],
                env=_sandbox_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(source.fileno(), status_write), start_new_session=True,
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)
        try:
            out, err = _Capture(proc.stdout, max_output_bytes), _Capture(proc.stderr, max_output_bytes)
            exited = _wait_unreaped(proc.pid, start + timeout_s)
            _kill_group(proc.pid)  # bwrap; --die-with-parent then kills the sandbox's pid 1, and with it every process
            returncode = proc.wait()
            seconds = time.monotonic() - start
            out.join(), err.join()
            status = _read_written(status_read)  # JSON documents; "child-pid" once the sandbox is set up
        finally:
            os.close(status_read)
    if exited and b'"child-pid"' not in status:  # bwrap gave up before starting anything
        message = err.text().strip().splitlines()
        said = message[-1].removeprefix("bwrap: ") if message else f"exit status {returncode}"
        raise SandboxUnavailable(f"bubblewrap could not start the python sandbox ({said[:200]}); it needs bwrap "
                                 f"with user or root namespaces: {INSTALL_BWRAP}, or run where namespaces are allowed")
    exit_code = returncode
    if exited and 128 < returncode < 128 + 65:  # bwrap reports a signal N as 128 + N, as a shell does
        exit_code = 128 - returncode
    timed_out = not exited or exit_code == -signal.SIGXCPU
    stderr = err.text()
    last_line = stderr.rstrip().rsplit("\n", 1)[-1]
    memory_exceeded = not timed_out and (exit_code == -signal.SIGKILL or re.match(r"[\w.]*MemoryError\b", last_line))
    return PythonResult(
        stdout=out.text(), stderr=stderr, exit_code=exit_code, timed_out=timed_out,
        memory_exceeded=bool(memory_exceeded), truncated=out.truncated or err.truncated, seconds=seconds,
        timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
    )


def _read_written(fd: int) -> bytes:
    """What is in the pipe now, without waiting for its other end (bwrap's pid 1 may hold it a moment longer)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def check_sandbox() -> None:
    """Raise SandboxUnavailable (one sentence) unless `run_python` can start its sandbox here (for --allow-python)."""
    run_python("pass", timeout_s=30.0)


def _bwrap_options(code_fd: int, status_fd: int, as_root: bool) -> list[str]:
    """bwrap's options: new namespaces, a private /tmp, read-only views of what Python needs, and nothing else."""
    options = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
               "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if as_root:  # the launcher keeps these two only to drop to its own uid (root is exempt from RLIMIT_NPROC)
        options += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # one uid mapped, so RLIMIT_NPROC counts this sandbox's processes alone
        options += ["--unshare-user", "--disable-userns"]
    options += ["--size", str(TMP_BYTES), "--perms", "1777", "--tmpfs", "/tmp"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged /usr: symlinks; otherwise directories
        path = f"/{name}"
        if os.path.islink(path):
            options += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            options += ["--ro-bind", path, path]
    views = ["/usr", *(p for p in ("/etc/ld.so.cache",) if os.path.exists(p))]  # system libraries, the linker cache
    interpreter = {os.path.abspath(p) for p in (sys.base_prefix, sys.prefix,
                                                os.path.dirname(os.path.realpath(sys.executable)))}
    for path in sorted(interpreter, key=len):  # the interpreter, its stdlib, the venv's site-packages
        if not any(path == v or path.startswith(v.rstrip("/") + "/") for v in views):
            views.append(path)
    made: set[str] = {"/", "/tmp"}
    for path in views:
        for parent in reversed(Path(path).parents):  # world-traversable: bwrap would copy a 0700 mode (/root)
            if str(parent) not in made and not any(str(parent).startswith(v + "/") for v in views):
                options += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        options += ["--ro-bind", path, path]
    options += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_BYTES), "--perms", "1777", "--tmpfs", "/dev/shm",
                "--remount-ro", "/dev", "--file", str(code_fd), "/tmp/main.py", "--remount-ro", "/",
                "--chdir", "/tmp", "--json-status-fd", str(status_fd)]
    return options


def _launcher(memory_mb: int, timeout_s: float, max_processes: int, uid: int | None) -> str:
    """The program bwrap starts inside the sandbox: set the limits, close inherited fds, drop to `uid` (as root),
    then exec the interpreter on /tmp/main.py. RLIMIT_NPROC must be set in here: outside, it would count every
    process of our user."""
    memory, cpu = memory_mb << 20, math.ceil(timeout_s) + 1
    lines = ["import os, resource, sys",
             f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))",
             f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu + 1}))",
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_BYTES}, {FILE_BYTES}))",
             "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))",
             f"resource.setrlimit(resource.RLIMIT_NPROC, ({max_processes}, {max_processes}))",
             "os.closerange(3, 1 << 16)"]
    if uid is not None:
        lines += ["os.setgroups([])", f"os.setgid({uid})", f"os.setuid({uid})"]
    lines.append("os.execv(sys.executable, [sys.executable, '-I', '/tmp/main.py'])")
    return "\n".join(lines)


def _sandbox_env() -> dict[str, str]:
    """The whole environment of bwrap, its pid 1 and the program: nothing comes from ours."""
    one = "1"
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp",
            "TMPDIR": "/tmp", "OMP_NUM_THREADS": one, "OPENBLAS_NUM_THREADS": one, "MKL_NUM_THREADS": one,
            "MALLOC_ARENA_MAX": "2"}


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until `pid` exits or `deadline` passes, leaving it a zombie so its process group id stays ours."""
    pause = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Capture:
    """Drains one pipe in a thread, keeping the first bytes and the last 1 KB within `limit` bytes."""

    def __init__(self, pipe, limit: int):
        self.pipe, self.limit = pipe, limit
        self.tail_limit = min(1024, limit // 4)
        self.head, self.tail, self.total = bytearray(), bytearray(), 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        head_limit = self.limit - self.tail_limit
        while chunk := self.pipe.read1(65536):
            self.total += len(chunk)
            room = head_limit - len(self.head)
            if room > 0:
                self.head += chunk[:room]
                chunk = chunk[room:]
            if chunk and self.tail_limit:
                self.tail += chunk
                del self.tail[:-self.tail_limit]
        self.pipe.close()

    def join(self) -> None:
        self.thread.join(timeout=2.0)  # a descendant that escaped the group may still hold the pipe: give up on it

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        if self.truncated:
            cut = self.total - len(self.head) - len(self.tail)
            data = bytes(self.head) + f"\n[... {cut} bytes cut ...]\n".encode() + bytes(self.tail)
        else:
            data = bytes(self.head + self.tail)
        return data.decode("utf-8", errors="replace")


