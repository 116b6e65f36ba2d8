"""A bad step skipped on the device (dtrain/zero_step.py) leaves the run exactly where DeepSpeed's own skip on
the host leaves it, and the host never reads the verdict: bench/zero_step_check.py, the check that also runs
on GPUs, here on two CPU ranks."""
import re
import subprocess

from conftest import REPO, cpu_env, launcher


def test_a_bad_step_skipped_on_the_device_leaves_what_deepspeeds_skip_leaves(tmp_path):
    out = tmp_path / "zero_step.md"
    proc = subprocess.run([*launcher(2), "-m", "bench.zero_step_check", "--out", str(out)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    table = out.read_text() if out.exists() else ""
    assert proc.returncode == 0 and table.rstrip().endswith("**PASS**"), (table, proc.stderr[-3000:])
    rows = re.findall(r"^\| (ZeRO-\d: .+?) \| .+ \| (ok|FAIL) \|$", table, re.MULTILINE)
    assert len(rows) == 14 and all(ok == "ok" for _, ok in rows), table
