import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from math import comb
from pathlib import Path

import pytest

from data.humaneval import load_problems
from eval.humaneval import pass_at_k, program_for, run_program, score_completions, trim_completion
from eval.sandbox import sandbox_info


@pytest.fixture(scope="module")
def problems():
    return load_problems(4)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems, sandbox):
    good = [[p["canonical_solution"]] for p in problems]
    bad = [["    return None\n"] for _ in problems]
    r = score_completions(problems, [g + b for g, b in zip(good, bad, strict=True)], ks=[1, 2], progress=False)
    assert r["pass@1"] == pytest.approx(0.5) and r["pass@2"] == pytest.approx(1.0)
    assert all(x["correct"] == 1 for x in r["per_problem"])
    assert r["per_problem"][0]["outcomes"][1]["detail"].startswith("AssertionError")


def test_infinite_loop_is_killed(problems, sandbox):
    t = time.perf_counter()
    r = run_program(program_for(problems[0], "    while True:\n        pass\n"), timeout_s=1.5)
    assert r.status == "timeout" and time.perf_counter() - t < 10


def test_sleeping_program_is_killed_on_wall_clock_time(sandbox):
    # a CPU limit never fires for a sleeping program: the wall-clock limit must
    r = run_program("import time\nwhile True:\n    time.sleep(0.01)\n", timeout_s=1.0)
    assert r.status == "timeout"


def test_memory_bomb_fails_without_hurting_us(problems, sandbox):
    r = run_program(
        program_for(problems[0], "    a = []\n    while True:\n        a.append(' ' * 10**7)\n"),
        timeout_s=10,
        memory_mb=512,
    )
    assert r.status in ("failed", "timeout") and ("MemoryError" in r.detail or r.status == "timeout")


def test_os_system_is_blocked(tmp_path, sandbox):
    marker = tmp_path / "marker"
    r = run_program(f"import os\nos.system('touch {marker}')\n")
    assert r.status == "failed" and "blocked" in r.detail
    r = run_program(f"import subprocess\nsubprocess.run(['touch', '{marker}'])\n")
    assert r.status == "failed" and not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges applies only when started as root")
def test_generated_code_does_not_run_as_root(tmp_path, sandbox):
    target = tmp_path / "project_file.txt"
    target.write_text("keep")
    r = run_program(f"open('{target}', 'w').write('overwritten')\n")
    assert r.status == "failed" and target.read_text() == "keep"


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)


def test_trim_completion_stops_at_the_next_top_level_statement():
    text = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert trim_completion(text) == "    return x + 1\n\n"
    assert trim_completion("    return 1\n") == "    return 1\n"


# ---- scoring: a pass means the tests ran to the end ------------------------------------------------------


@pytest.mark.parametrize(
    "escape", ["import sys\n    sys.exit(0)\n", "raise SystemExit\n", "import os\n    os._exit(0)\n", "exit()\n"]
)
def test_exiting_before_the_tests_run_is_not_a_pass(problems, escape, sandbox):
    r = run_program(program_for(problems[0], "    " + escape))
    assert r.status == "failed", r


def test_printing_a_fake_sentinel_is_not_a_pass(sandbox):
    r = run_program(
        "import sys\nprint('passed')\nsys.stdout.flush()\nimport os\nos.write(1, b'ok\\n')\nraise SystemExit(0)\n"
    )
    assert r.status == "failed"


FORGERIES = {
    # the exact completion that once scored passed: the token was a global of the bootstrap's __main__
    "main-module": "import sys, posix\n    print(sys.modules['__main__'].token, flush=True)\n    posix._exit(0)\n",
    # every frame up the stack, every string the garbage collector knows of that looks like a token
    "frames-and-gc": (
        "import sys, gc, posix, re\n"
        "    seen = set()\n"
        "    f = sys._getframe()\n"
        "    while f:\n"
        "        seen |= {v for v in list(f.f_globals.values()) + list(f.f_locals.values()) if isinstance(v, str)}\n"
        "        f = f.f_back\n"
        "    seen |= {o for o in gc.get_objects() if isinstance(o, str)}\n"
        "    for v in seen:\n"
        "        if re.fullmatch('[0-9a-f]{32}', v): print(v)\n"
        "    sys.stdout.flush()\n"
        "    posix._exit(0)\n"
    ),
    # the child's report channel, one lookup away once: the bootstrap's globals, and the pipe's usual number
    "bootstrap-globals": (
        "import sys\n    m = sys.modules['__main__']\n    m._write(m.done_w, b'returned\\n')\n    m._exit(0)\n"
    ),
    "report-fd": (
        "import posix\n"
        "    for fd in range(3, 64):\n"
        "        try: posix.write(fd, b'returned\\n')\n"
        "        except OSError: pass\n"
        "    posix._exit(0)\n"
    ),
    # the token's way in, read by the program itself
    "stdin": "import sys, posix\n    print(sys.stdin.readline().strip())\n    sys.stdout.flush()\n    posix._exit(0)\n",
    # the supervisor's memory and descriptors, through /proc
    "proc": (
        "import posix, os\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit() and int(pid) != os.getpid():\n"
        "            for what in ('mem', 'fd/0', 'environ', 'cmdline'):\n"
        "                try: print(open(f'/proc/{pid}/{what}', 'rb').read(4096))\n"
        "                except Exception: pass\n"
        "    posix._exit(0)\n"
    ),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_reading_the_pass_token_from_inside_is_not_a_pass(problems, forgery, sandbox):
    r = run_program(program_for(problems[0], "    " + FORGERIES[forgery]))
    assert r.status == "failed", r


def test_a_correct_program_still_passes(problems, sandbox):
    r = run_program(program_for(problems[0], problems[0]["canonical_solution"]))
    assert r.status == "passed", r


# ---- containment: namespaces, filesystem, processes, output ----------------------------------------------


def test_network_namespace_blocks_a_raw_socket_to_loopback(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    seen = []

    def accept():
        try:
            seen.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    # _socket is the C module under socket: the in-process guard does not touch it, only the namespace stops it
    r = run_program(f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n")
    thread.join()
    server.close()
    assert r.status == "failed" and seen == []
    info = sandbox_info()
    assert info["network_namespace"] and info["pid_namespace"], info


def test_background_processes_die_with_the_program(tmp_path, sandbox):
    tag = f"humaneval-orphan-{os.getpid()}-{time.time_ns()}"
    program = (
        "import posix, sys\n"
        f"pid = posix.fork()\n"
        "if pid == 0:\n"
        "    posix.setsid()\n"
        f"    posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{tag}'])\n"
    )
    t = time.perf_counter()
    r = run_program(program, timeout_s=5)
    assert time.perf_counter() - t < 5, "the evaluator waited for a background process"
    assert r.status == "passed"
    time.sleep(0.3)
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and tag in _cmdline(p)]
    assert alive == []


def test_a_timed_out_program_takes_its_children_with_it(sandbox):
    tag = f"humaneval-child-{os.getpid()}-{time.time_ns()}"
    program = (
        "import posix, sys, time\n"
        f"posix.posix_spawn(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{tag}'], {{}})\n"
        "time.sleep(60)\n"
    )
    t = time.perf_counter()
    r = run_program(program, timeout_s=1.0)
    assert r.status == "timeout" and time.perf_counter() - t < 5
    time.sleep(0.3)
    assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and tag in _cmdline(p)] == []


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_the_host_filesystem_is_out_of_reach(tmp_path, sandbox):
    victim = tmp_path / "user_file.txt"
    victim.write_text("keep")
    repo_file = Path(__file__).resolve()
    attacks = [
        f"import posix\nposix.system('rm -f {victim}')\nopen('{victim}')\n",
        f"import importlib, os\nos = importlib.reload(os)\nos.remove('{victim}')\n",
        f"print(open('{repo_file}').read())\n",
        f"open('{victim}', 'w').write('overwritten')\n",
    ]
    for program in attacks:
        r = run_program(program)
        assert r.status == "failed", (program, r)
    assert victim.read_text() == "keep"


def test_the_program_cannot_rewrite_itself_or_fill_the_disk(tmp_path, sandbox):
    before = shutil.disk_usage("/tmp").free
    r = run_program("open('/sandbox/program.py', 'w').write('print(1)')\n")
    assert r.status == "failed" and "Read-only" in r.detail
    r = run_program(
        "i = 0\nwhile True:\n    open(f'/tmp/fill{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1\n", timeout_s=10
    )
    assert r.status == "failed" and ("No space" in r.detail or "File too large" in r.detail), r
    assert shutil.disk_usage("/tmp").free > before - (64 << 20)


def test_huge_output_is_capped(problems, sandbox):
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_program("import sys\nfor _ in range(2000):\n    sys.stderr.write('x' * (1 << 20))\n", timeout_s=10)
    assert r.status in ("failed", "timeout") and len(r.detail) <= 300
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # kB


def test_the_program_cannot_signal_processes_outside(sandbox):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        r = run_program(f"import posix\nposix.kill({victim.pid}, 9)\n")
        assert r.status == "failed" and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_sandbox_promises_are_recorded(problems, sandbox):
    r = score_completions(problems[:1], [[problems[0]["canonical_solution"]]], ks=[1], progress=False)
    assert r["pass@1"] == 1.0
    assert r["sandbox"]["tool"].startswith("bwrap") and r["sandbox"]["network_namespace"] is True
    assert r["sandbox"]["sees_host_files"] is False


def test_humaneval_command_shares_the_quality_pipeline(trained_checkpoint, tmp_path, sandbox):
    import json

    from eval.humaneval import main

    main([str(trained_checkpoint), "--limit", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "he.json")])
    r = json.loads((tmp_path / "he.json").read_text())
    assert r["evaluator"] == "humaneval" and r["pass"]["problems"] == 2 and "pass@1" in r["pass"]
    assert r["prompts_truncated"] >= 1 and r["text_metrics"]["pairs"] == 2  # 32-token context: prompts are cut
    assert r["per_head"] is True and r["pass"]["sandbox"]["pid_namespace"] is True
