"""Runs a batch of programs through the sandbox concurrently and prints their results as JSON.

Started by tests/test_sandbox_escapes.py as root or, through setpriv, as an unprivileged
user with the system interpreter (the checkout's venv may live where that user cannot
read). It loads sandbox.py (and job_signals.py, which it imports) by path because they
need only the standard library.

usage: python sandbox_escape_driver.py JOBS.json   (a list of {name, code, stdin, fn_name,
args, config}); prints [{name, status, reason, stdout, returncode}, ...].
"""

import importlib.util
import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_SANDBOX = Path(__file__).resolve().parents[1] / "megatron_prime" / "rewards" / "sandbox.py"


def _load_sandbox():
    # The one project module sandbox.py imports (job_signals.py, standard library only) is
    # loaded by path as well, under its package name.
    sys.modules["megatron_prime"] = types.ModuleType("megatron_prime")
    spec = importlib.util.spec_from_file_location("megatron_prime.job_signals",
                                                  _SANDBOX.parents[1] / "job_signals.py")
    job_signals = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = job_signals
    spec.loader.exec_module(job_signals)
    spec = importlib.util.spec_from_file_location("megatron_prime_sandbox", _SANDBOX)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    sandbox = _load_sandbox()
    jobs = json.loads(Path(sys.argv[1]).read_text())
    sandbox.check_sandbox_available()

    def run(job):
        config = sandbox.SandboxConfig(**job["config"])
        result = sandbox.run_python(job["code"], job.get("stdin", ""), config, job.get("fn_name"), job.get("args"))
        return {"name": job["name"], "status": result.status.value, "reason": result.reason,
                "stdout": result.stdout[:2000].decode(errors="replace"), "returncode": result.returncode,
                "call_result": repr(result.call_result)[:200], "stderr": result.stderr[-500:]}

    with ThreadPoolExecutor(max_workers=int(sys.argv[2]) if len(sys.argv) > 2 else 8) as pool:
        results = list(pool.map(run, jobs))
    print(json.dumps({"mode": sandbox.sandbox_mode(), "results": results}))


if __name__ == "__main__":
    main()
