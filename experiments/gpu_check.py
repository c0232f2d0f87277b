"""One-shot accelerator check: install what is missing, test the kernels compiled, benchmark, write every table.

    python experiments/gpu_check.py --out DIR [--wheels .whl]   # on an NVIDIA GPU host (< 8 min on an H100)
    python experiments/gpu_check.py --out DIR --dry-run         # the same steps on CPU: interpreted, tiny shapes

Steps, each a subprocess with its own time limit (a step that fails or runs out of time becomes a row of
DIR/summary.md with its error; the later steps still run):
  1. environment: `pip show` of every pin in pyproject.toml (dependencies and the `test` extra) against the
     installed version. Missing or mismatched packages are installed from the prepared wheel folder
     (`--wheels`, made by experiments/gpu_check_wheels.sh) with `pip install --no-index`; jax and jaxlib are never
     installed (the host's jax with its CUDA plugin is the one under test: a mismatch is reported, not fixed).
     The device, the jax plugins and `nvidia-smi` go in DIR/environment.md.
  2. kernel tests: the backend test files of tests/kernels with GESR_KERNEL_TESTS=compiled (the shared test
     base then runs the Pallas kernels compiled for the local GPU, not interpreted; backends that cannot run
     there, e.g. pallas_tpu, are skipped), per-test results in DIR/kernel_tests.md.
  3. kernel benchmarks: experiments/bench_hstu_attention.py (SiLU at the four benchmark shapes, every backend
     of the device) and experiments/bench_ranking_attention.py (softmax + ALiBi beside cuDNN at the same four
     shapes, cached vs full), tables in DIR.
  4. train steps: experiments/gpu_check_train.py (GESR and GenRank at history 1024, 256 candidates, batch 32,
     bf16; xla vs the Pallas backend implementation=None picks; MFU and peak memory).
  5. serving: experiments/bench_serving.py (its grid includes N = 1024, C = 2000).
--dry-run runs all of it on CPU: nothing is installed, the kernel tests run interpreted (a small subset), the
benchmarks with --smoke, the train steps at tiny shapes with the Triton backend interpreted. It is a slow test
(tests/kernels/test_gpu_check.py), so that a first GPU run does not fail on a typo.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEVER_INSTALL = {"jax", "jaxlib", "numpy"}  # the host's jax + CUDA plugin (and its numpy) is what gets tested
OPTIONAL = {"matplotlib", "nbmake", "ipykernel"}  # plots and notebooks: no step of the check imports them
# The backend test classes (the shared test base per backend); the other kernel tests are CPU-only logic.
KERNEL_TEST_FILES = ["tests/kernels/test_hstu_attention_xla.py", "tests/kernels/test_hstu_attention_triton.py",
                     "tests/kernels/test_hstu_attention_mosaic_gpu.py", "tests/kernels/test_hstu_attention_tpu.py"]
# Subset of the kernel tests for --dry-run (interpreted on CPU; the full set takes many minutes there).
DRY_TESTS = "test_integer_inputs_get_no_cotangent or (TestXla and test_float32_forward_and_grads)"
# Per-step time limits in seconds on the accelerator (the whole check must stay under 8 minutes on an H100).
LIMITS = {"environment": 30, "kernel_tests": 180, "bench_hstu_attention": 70, "bench_ranking_attention": 50,
          "train_steps": 80, "serving": 50}
DRY_LIMITS = {"environment": 60, "kernel_tests": 600, "bench_hstu_attention": 900, "bench_ranking_attention": 900,
              "train_steps": 900, "serving": 600}


@dataclasses.dataclass
class Step:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""  # the table this step wrote (a file name in the output folder)
    detail: str = ""


def pins(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """name -> pinned version of every `name==version` in the dependencies and the `test` extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"].get("test", [])]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+).*", requirement)
        if match:
            found[match.group(1)] = match.group(3)
    return found


def installed_version(name: str) -> str | None:
    """The version `pip show` reports, or None when the package is not installed."""
    out = subprocess.run([sys.executable, "-m", "pip", "show", name], capture_output=True, text=True)
    match = re.search(r"^Version:\s*(\S+)", out.stdout, re.M)
    return match.group(1) if match else None


def has_wheel(folder: pathlib.Path, name: str, version: str) -> bool:
    """Whether `folder` holds a wheel of name==version (wheel names normalise '-' and '.' to '_')."""
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
    return folder.is_dir() and any(w.name.lower().startswith(stem) for w in folder.glob("*.whl"))


def environment(out: pathlib.Path, wheels: pathlib.Path | None, dry_run: bool) -> str:
    """Compare pins with the installed versions, install what is missing from `wheels`; write environment.md."""
    rows, to_install = [], []
    for name, want in sorted(pins().items(), key=lambda kv: kv[0].lower()):
        have = installed_version(name)
        if have == want:
            action = "ok"
        elif name.lower() in NEVER_INSTALL:
            action = "kept the installed one (never installed here)" if have else "MISSING (never installed here)"
        elif name.lower() in OPTIONAL:
            action = "not needed by the check"
        elif wheels is not None and has_wheel(wheels, name, want):
            action = "install from wheels"
            to_install.append(f"{name}=={want}")
        else:
            action = f"MISSING: no {name} {want} wheel in {wheels}"
        rows.append(f"| {name} | {want} | {have or '-'} | {action} |")
    installed = "nothing to install"
    if to_install and dry_run:
        installed = f"dry run: would install {' '.join(to_install)}"
    elif to_install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *to_install]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip install from {wheels} failed: {done.stderr.strip().splitlines()[-1:]}")
        installed = f"installed {' '.join(to_install)} from {wheels}"
    plugins = [f"{p} {installed_version(p)}" for p in ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt",
                                                        "jax-cuda12-pjrt", "triton") if installed_version(p)]
    smi = subprocess.run("nvidia-smi 2>/dev/null || true", shell=True, capture_output=True, text=True).stdout
    probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                            "print(f'{d.device_kind} ({d.platform}), {len(jax.devices())} device(s), jax {jax.__version__}')"],
                           capture_output=True, text=True)
    device = probe.stdout.strip() or f"jax failed to start: {probe.stderr.strip().splitlines()[-1:]}"
    text = "\n".join([
        "# Environment", "", f"- device: {device}", f"- python {sys.version.split()[0]}, {sys.executable}",
        f"- jax plugins: {', '.join(plugins) or 'none'}", f"- {installed}", "",
        "| package | pin | installed | action |", "|---|---|---|---|", *rows, "",
        "```", smi.strip() or "(no nvidia-smi)", "```", ""])
    (out / "environment.md").write_text(text)
    missing = [r for r in rows if "MISSING" in r]
    if missing and not dry_run:
        raise RuntimeError(f"{len(missing)} pinned package(s) missing, see environment.md")
    return device


def run_step(step: Step, cmd: list[str], limit: float, env: dict[str, str], log: pathlib.Path) -> str:
    """Run one step's subprocess with a time limit; its stdout+stderr go to `log`; returns that text."""
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        text, code = done.stdout + done.stderr, done.returncode
        step.status = "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        step.status = f"timed out after {limit:.0f} s"
    step.seconds = time.monotonic() - start
    log.write_text(text)
    if step.status != "ok":
        tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
        step.detail = tail[0][:200].replace("|", "/")
    return text


_RESULT = re.compile(r"^(tests/\S+::\S+(?:\[[^\]]*\])?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
_COLLECTION_ERROR = re.compile(r"^ERROR (tests/[^\s:]+\.py)(?:\s|$)")  # a test file that failed to import


def kernel_test_table(text: str, device: str, dry_run: bool) -> str:
    """Per-file pass / fail / skip counts and every failing test, parsed from `pytest -v` output."""
    results = [m.groups() for m in map(_RESULT.match, text.splitlines()) if m]
    results += [(m.group(1), "ERROR") for m in map(_COLLECTION_ERROR.match, text.splitlines()) if m]
    files: dict[str, dict[str, int]] = {}
    for test, outcome in results:
        counts = files.setdefault(test.split("::")[0], {})
        counts[outcome] = counts.get(outcome, 0) + 1
    mode = "interpreted on CPU (dry run, a subset)" if dry_run else "compiled for the device (GESR_KERNEL_TESTS=compiled)"
    lines = [f"# Kernel tests, {mode}", "", f"- device: {device}", "",
             "| file | passed | failed | skipped | errors |", "|---|---|---|---|---|"]
    for name, c in sorted(files.items()):
        lines.append(f"| {name} | {c.get('PASSED', 0)} | {c.get('FAILED', 0)} | {c.get('SKIPPED', 0)} "
                     f"| {c.get('ERROR', 0)} |")
    failed = [t for t, o in results if o in ("FAILED", "ERROR")]
    lines += ["", f"Failing ({len(failed)}):", "", *[f"- {t}" for t in failed]] if failed else ["", "No failures."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for every table")
    parser.add_argument("--wheels", type=pathlib.Path, default=ROOT / ".whl", help="prepared wheel folder")
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreted kernels, tiny shapes, no install")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. kernel_tests)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    limits = DRY_LIMITS if args.dry_run else LIMITS
    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - set(limits)
    if unknown:
        raise SystemExit(f"--skip: unknown step(s) {sorted(unknown)}; steps: {', '.join(limits)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        # The Mosaic GPU interpreter needs >= 2 host devices.
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    else:
        env["GESR_KERNEL_TESTS"] = "compiled"
    smoke = ["--smoke"] if args.dry_run else []
    py = sys.executable
    steps = {name: Step(name, status="skipped (--skip)" if name in skip else "not run") for name in limits}
    device = "unknown"
    begin = time.monotonic()

    if "environment" not in skip:
        step = steps["environment"]
        start = time.monotonic()
        try:
            device = environment(out, args.wheels, args.dry_run)
            step.status, step.output = "ok", "environment.md"
        except Exception as err:  # the later steps still run and say what is missing
            step.status, step.detail = "failed", f"{type(err).__name__}: {err}"[:200]
        step.seconds = time.monotonic() - start
    slug = re.sub(r"[^a-z0-9]+", "_", device.split(" (")[0].lower()).strip("_") or "device"
    commands = {
        # A file that fails to import is an error row; the other files still run.
        "kernel_tests": [py, "-m", "pytest", *KERNEL_TEST_FILES, "-v", "-n", "0", "-p", "no:cacheprovider", "-o",
                         "addopts=", "-m", "not slow", "--continue-on-collection-errors"]
        + (["-k", DRY_TESTS] if args.dry_run else []),
        "bench_hstu_attention": [py, "experiments/bench_hstu_attention.py", *smoke, "--out",
                                 str(out / f"hstu_attention_{slug}.md")]
        + ([] if args.dry_run else ["--budget-minutes", str(LIMITS["bench_hstu_attention"] / 60 - 0.3)]),
        "bench_ranking_attention": [py, "experiments/bench_ranking_attention.py", *smoke, "--out",
                                    str(out / f"ranking_attention_{slug}.md")] + ([] if args.dry_run else
                                                                                   ["--repeats", "20"]),
        "train_steps": [py, "experiments/gpu_check_train.py", *(["--dry-run"] if args.dry_run else []), "--out",
                        str(out / f"train_step_{slug}.md")],
        "serving": [py, "experiments/bench_serving.py", *smoke, "--out", str(out / f"serving_{slug}.md")],
    }
    for name, cmd in commands.items():
        if name in skip:
            continue
        step = steps[name]
        print(f"[gpu_check] {name}: {' '.join(cmd[1:])}", flush=True)
        text = run_step(step, cmd, limits[name], env, out / "logs" / f"{name}.log")
        if name == "kernel_tests":
            (out / "kernel_tests.md").write_text(kernel_test_table(text, device, args.dry_run))
            step.output = "kernel_tests.md"
        else:
            written = pathlib.Path(cmd[cmd.index("--out") + 1])
            step.output = written.name if written.exists() else "-"
        print(f"[gpu_check] {name}: {step.status} in {step.seconds:.0f} s", flush=True)

    lines = [f"# Accelerator check{' (dry run on CPU: interpreted, tiny shapes, not a measurement)' if args.dry_run else ''}",
             "", f"- device: {device}", f"- total {time.monotonic() - begin:.0f} s; logs in logs/", "",
             "| step | status | seconds | table | detail |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.output or '-'} | {s.detail or '-'} |"
              for s in steps.values()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print((out / "summary.md").read_text())
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
