import os
import socket
import threading
import time
from math import comb

import pytest

from eval.humaneval import load_problems, pass_at_k, program_for, run_program, score_completions, trim_completion


@pytest.fixture(scope="module")
def problems():
    return load_problems(4)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    good = [[p["canonical_solution"]] for p in problems]
    bad = [["    return None\n"] for _ in problems]
    r = score_completions(problems, [g + b for g, b in zip(good, bad, strict=True)], ks=[1, 2], progress=False)
    assert r["pass@1"] == pytest.approx(0.5) and r["pass@2"] == pytest.approx(1.0)
    assert all(x["correct"] == 1 for x in r["per_problem"])
    assert r["per_problem"][0]["outcomes"][1]["detail"].startswith("AssertionError")


def test_infinite_loop_is_killed(problems):
    t = time.perf_counter()
    r = run_program(program_for(problems[0], "    while True:\n        pass\n"), timeout_s=1.5)
    assert r.status == "timeout" and time.perf_counter() - t < 10


def test_sleeping_program_is_killed_on_wall_clock_time():
    # a CPU limit never fires for a sleeping program: the wall-clock limit must
    r = run_program("import time\nwhile True:\n    time.sleep(0.01)\n", timeout_s=1.0)
    assert r.status == "timeout"


def test_memory_bomb_fails_without_hurting_us(problems):
    r = run_program(
        program_for(problems[0], "    a = []\n    while True:\n        a.append(' ' * 10**7)\n"),
        timeout_s=10,
        memory_mb=512,
    )
    assert r.status in ("failed", "timeout") and ("MemoryError" in r.detail or r.status == "timeout")


def test_os_system_is_blocked(tmp_path):
    marker = tmp_path / "marker"
    r = run_program(f"import os\nos.system('touch {marker}')\n")
    assert r.status == "failed" and "blocked" in r.detail
    r = run_program(f"import subprocess\nsubprocess.run(['touch', '{marker}'])\n")
    assert r.status == "failed" and not marker.exists()


def test_no_network_even_to_loopback():
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
    r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    thread.join()
    server.close()
    assert r.status == "failed" and seen == []


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges applies only when started as root")
def test_generated_code_does_not_run_as_root(tmp_path):
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
