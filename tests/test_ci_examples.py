"""The example CI pipelines in examples/ci/ (GitHub Actions, GitLab CI): valid structure, and their
shell steps executed locally, in order, on the quickstart in a temporary directory.

Convention of the examples (stated in each file and in examples/ci/README.md): a shell block (a
GitHub ``run:``, a GitLab script item) whose first line is ``# ci-only`` only prepares the CI
machine (installs, downloads) and is skipped here; GitHub ``uses:`` steps are CI-only by nature.
Every other block is plain bash without ``${{ }}`` expressions, run here with the variables the CI
would set (the pipeline's ``env:``/``variables:``, ``GITHUB_STEP_SUMMARY``/``GITHUB_ENV``/
``GITHUB_OUTPUT`` as files, ``CI_PROJECT_DIR``), ``kdcli`` and ``python3`` from this interpreter's
folder first on ``PATH``, and a short run through the examples' own ``KDCLI_COMPRESS_ARGS``.

One compression serves the GitHub pipeline's two runs (without, then with a baseline); the GitLab
job runs once, with the GitHub run's report as its baseline, its teacher restored as the cache
would, and an extra gate that must fail (exit 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "ci"
GITHUB = EXAMPLES / "github-actions.yml"
GITLAB = EXAMPLES / "gitlab-ci.yml"
CI_ONLY = "# ci-only"
BIN = Path(sys.executable).parent
# The short run the test asks of the examples' documented KDCLI_COMPRESS_ARGS (one torch thread:
# the test machine's cores are shared).
FAST = ("--threads 1 --set teacher.train.epochs=3 --set distill.train.epochs=1 "
        "--set prune.steps=1 --set prune.final_epochs=1")
BASELINE_GATES = ["accuracy < baseline.accuracy - 0.5", "latency_ms@1 > baseline.latency_ms@1 * 1.10"]
ALWAYS = {"always()", "${{ always() }}", "!cancelled()", "${{ !cancelled() }}"}
STEP_TIMEOUT_S = 600


def ci_only(script: str) -> bool:
    return script.lstrip().startswith(CI_ONLY)


def base_env(workspace: Path) -> dict:
    """The environment a CI machine would give: no GitHub/GitLab variables of a CI running this
    test, this interpreter's folder (kdcli, python3) first on PATH, the workspace as HOME's
    stand-in for caches."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "GITLAB_", "CI_", "KDCLI_", "RUNNER_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CI"] = "true"
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "120"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def bash(script: str, cwd: Path, env: dict, shell=("bash", "--noprofile", "--norc", "-eo", "pipefail")):
    path = cwd / ".step.sh"
    path.write_text(script)
    try:
        return subprocess.run([*shell, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT_S)
    finally:
        path.unlink()


def check_no_expressions(script: str, where: str) -> None:
    assert "${{" not in script, f"{where}: a local step must use environment variables, not ${{{{ }}}}"


# ------------------------------------------------------------------------------------ GitHub

def load_github() -> dict:
    wf = yaml.safe_load(GITHUB.read_text())
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean True.
    assert "on" in wf or True in wf
    return wf


def github_job(wf: dict) -> dict:
    (job,) = wf["jobs"].values()
    return job


@dataclass
class GithubRun:
    rcs: dict = field(default_factory=dict)      # step id (or name) -> exit status
    logs: dict = field(default_factory=dict)     # step id -> stdout + stderr
    outputs: dict = field(default_factory=dict)  # step id -> {name: value} from $GITHUB_OUTPUT

    @property
    def log(self) -> str:
        return "\n".join(f"--- {k} (rc {self.rcs[k]})\n{v}" for k, v in self.logs.items())


def run_github(workspace: Path, extra_env: dict, skip_ids=()) -> GithubRun:
    """The workflow's local steps in order, the way a runner does: each `run:` with `bash -eo
    pipefail`; workflow, job and step `env:`; `$GITHUB_ENV` lines carried to later steps; after a
    failed step only steps with `if: always()` / `!cancelled()` run."""
    wf = load_github()
    job = github_job(wf)
    assert job.get("defaults", {}).get("run", {}).get("shell") == "bash"
    env = {**base_env(workspace), **{k: str(v) for k, v in wf.get("env", {}).items()},
           **{k: str(v) for k, v in job.get("env", {}).items()}, **extra_env}
    summary = workspace / "summary.md"
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    env["GITHUB_WORKSPACE"] = str(workspace)
    result, failed = GithubRun(), False
    for i, step in enumerate(job["steps"]):
        sid = step.get("id") or step.get("name") or f"step {i}"
        if "uses" in step or ci_only(step["run"]) or sid in skip_ids:
            continue
        cond = step.get("if")
        assert cond is None or cond in ALWAYS, f"{sid}: a local step may only have if: always()/!cancelled()"
        if failed and cond is None:
            continue
        check_no_expressions(step["run"], sid)
        step_env = {k: str(v) for k, v in step.get("env", {}).items()}
        for v in step_env.values():
            check_no_expressions(v, sid)
        files = {name: workspace / f".{name.lower()}" for name in ("GITHUB_ENV", "GITHUB_OUTPUT")}
        for f in files.values():
            f.write_text("")
        proc = bash(step["run"], workspace, {**env, **step_env, **{k: str(f) for k, f in files.items()}})
        result.rcs[sid], result.logs[sid] = proc.returncode, proc.stdout + proc.stderr
        for line in files["GITHUB_ENV"].read_text().splitlines():
            k, _, v = line.partition("=")
            env[k] = v
        result.outputs[sid] = dict(line.partition("=")[::2] for line in files["GITHUB_OUTPUT"].read_text().splitlines())
        failed = failed or proc.returncode != 0
    return result


# ------------------------------------------------------------------------------------ GitLab

def load_gitlab() -> dict:
    return yaml.safe_load(GITLAB.read_text())


def gitlab_jobs(ci: dict) -> dict:
    reserved = {"stages", "variables", "default", "include", "workflow", "image", "services", "cache",
                "before_script", "after_script"}
    return {k: v for k, v in ci.items() if k not in reserved and not k.startswith(".")}


def run_gitlab(workspace: Path, name: str, extra_env: dict):
    """One job's local items, the way GitLab's bash shell runs them: before_script and script in
    one `bash -eo pipefail` script (items share variables), with the global and job variables."""
    ci = load_gitlab()
    job = gitlab_jobs(ci)[name]
    env = base_env(workspace)
    env["CI_PROJECT_DIR"] = str(workspace)
    env["CI_JOB_NAME"] = name
    for k, v in {**ci.get("variables", {}), **job.get("variables", {})}.items():
        env[k] = os.path.expandvars(str(v)) if "$CI_PROJECT_DIR" in str(v) else str(v)
    env.update(extra_env)
    items = [s for s in job.get("before_script", []) + job["script"] if not ci_only(s)]
    for s in items:
        check_no_expressions(s, name)
    return bash("\n".join(items), workspace, env)


# ------------------------------------------------------------------------------------- checks

def gates_xml(path: Path) -> dict:
    """{gate expression: failure message or None} from a JUnit file, with its counts checked."""
    root = ET.parse(path).getroot()
    cases = root.findall(".//testcase")
    out = {}
    for c in cases:
        assert c.get("classname") == "kdcli.gates"
        f = c.find("failure")
        out[c.get("name")] = None if f is None else f.get("message", "")
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == sum(v is not None for v in out.values())
    return out


def split_gates(value: str) -> list[str]:
    return [g.strip() for g in value.replace("\n", ";").split(";") if g.strip()]


# --------------------------------------------------------------------------------- structure

def test_github_workflow_structure():
    wf = load_github()
    on = wf.get("on", wf.get(True))
    assert {"push", "pull_request"} <= set(on)
    job = github_job(wf)
    steps = job["steps"]
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/cache/restore", "actions/cache/save",
                    "actions/upload-artifact"]
    runs = [s for s in steps if "run" in s]
    assert all(isinstance(s["run"], str) for s in runs)
    ci = [s["name"] for s in runs if ci_only(s["run"])]
    assert ci == ["Install kdcli", "Download the baseline (the default branch's last report)"]
    assert "pip install" in next(s["run"] for s in runs if s["name"] == "Install kdcli")
    ids = [s.get("id") for s in steps]
    assert ids.index("compress") < ids.index("gates")
    # the teacher cache is keyed on the recipe step's output and holds the run's teacher.kdc
    for s in steps:
        if s.get("uses", "").startswith("actions/cache/"):
            assert s["with"]["key"] == "${{ steps.recipe.outputs.teacher-key }}"
            assert s["with"]["path"] == "${{ env.KDCLI_RUN }}/teacher.kdc"
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["name"] == "${{ env.KDCLI_ARTIFACT }}"
    assert "${{ env.KDCLI_RUN }}/export/gates.xml" in upload["with"]["path"]
    assert upload["if"] in ALWAYS
    env = wf["env"]
    assert env["KDCLI_RECIPE"] == "" and env["KDCLI_COMPRESS_ARGS"] == ""
    assert split_gates(env["KDCLI_GATES"]) == ["accuracy_drop > 1"]
    assert split_gates(env["KDCLI_BASELINE_GATES"]) == BASELINE_GATES


def test_gitlab_pipeline_structure():
    ci = load_gitlab()
    jobs = gitlab_jobs(ci)
    assert list(jobs) == ["kdcli"]
    job = jobs["kdcli"]
    assert job["stage"] in ci["stages"]
    assert all(isinstance(s, str) for s in job["before_script"] + job["script"])
    assert [ci_only(s) for s in job["before_script"]] == [True]
    assert "pip install" in job["before_script"][0]
    assert [ci_only(s) for s in job["script"]] == [False, False, True, False]
    assert "CI_JOB_TOKEN" in job["script"][2]
    run = ci["variables"]["KDCLI_RUN"]
    caches = job["cache"]
    assert [f"{run}/teacher.kdc"] in [c["paths"] for c in caches]
    art = job["artifacts"]
    assert art["when"] == "always"
    assert art["reports"]["junit"] == f"{run}/export/gates.xml"
    assert f"{run}/export/gates.xml" in art["paths"] and f"{run}/export/report.*" in art["paths"]
    variables = ci["variables"]
    assert variables["KDCLI_RECIPE"] == "" and variables["KDCLI_COMPRESS_ARGS"] == ""
    assert split_gates(variables["KDCLI_GATES"]) == ["accuracy_drop > 1"]
    assert split_gates(variables["KDCLI_BASELINE_GATES"]) == BASELINE_GATES


# ------------------------------------------------------------------------------- executions

def test_pipelines_run_locally(tmp_path):
    assert (BIN / "kdcli").exists(), f"kdcli is not installed beside {sys.executable}"
    assert shutil.which("bash"), "bash is needed to run the pipelines' steps"

    # GitHub, first run: no baseline; only the gate against a number; the report in the summary.
    gh = tmp_path / "github"
    gh.mkdir()
    first = run_github(gh, {"KDCLI_COMPRESS_ARGS": FAST})
    assert set(first.rcs) == {"recipe", "compress", "gates", "Compare with the baseline"}, first.log
    assert all(rc == 0 for rc in first.rcs.values()), first.log
    assert first.outputs["recipe"]["teacher-key"].startswith("kdcli-teacher-")
    assert (gh / "runs" / "quickstart.yaml").is_file()
    run = gh / "runs" / "ci"
    assert (run / "student.kdc").is_file() and (run / "teacher.kdc").is_file()
    assert (run / "compress_report.json").is_file()
    assert "no baseline report" in first.logs["gates"]
    assert gates_xml(run / "export" / "gates.xml") == {"accuracy_drop > 1": None}
    summary = (gh / "summary.md").read_text()
    assert summary.strip() and "accuracy_drop > 1" in summary
    assert "kdcli report diff" not in summary and not (run / "export" / "diff.md").exists()

    # Second run on the same compression, the first report as the baseline: the baseline gates are
    # added and the diff lands in the summary.
    baseline = gh / "kdcli-baseline" / "report.json"
    baseline.parent.mkdir()
    shutil.copy(run / "export" / "report.json", baseline)
    (gh / "summary.md").unlink()
    second = run_github(gh, {"KDCLI_COMPRESS_ARGS": FAST}, skip_ids={"compress"})
    assert set(second.rcs) == {"recipe", "gates", "Compare with the baseline"}, second.log
    verdicts = gates_xml(run / "export" / "gates.xml")
    assert list(verdicts) == ["accuracy_drop > 1", *BASELINE_GATES], second.log
    assert verdicts["accuracy_drop > 1"] is None and verdicts[BASELINE_GATES[0]] is None, verdicts
    # The same student measured again: the latency gate passes unless this (shared) machine's noise
    # beats the noise band; then it alone fails, with exit 3.
    assert second.rcs["gates"] == (0 if verdicts[BASELINE_GATES[1]] is None else 3), second.log
    assert second.rcs["recipe"] == 0 and second.rcs["Compare with the baseline"] == 0, second.log
    summary = (gh / "summary.md").read_text()
    assert "# kdcli report diff (export-report)" in summary and BASELINE_GATES[0] in summary
    assert (run / "export" / "diff.md").read_text() in summary

    # GitLab: its teacher restored as the cache would, the GitHub report as the baseline, and an
    # extra gate that must fail: the job exits 3, gates.xml records the failure, the diff is written.
    gl = tmp_path / "gitlab"
    (gl / "runs" / "ci").mkdir(parents=True)
    shutil.copy(run / "teacher.kdc", gl / "runs" / "ci" / "teacher.kdc")
    (gl / "kdcli-baseline").mkdir()
    shutil.copy(baseline, gl / "kdcli-baseline" / "report.json")
    must_fail = "accuracy_drop > -100"
    proc = run_gitlab(gl, "kdcli", {"KDCLI_COMPRESS_ARGS": FAST, "KDCLI_GATES": f"accuracy_drop > 1; {must_fail}"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log
    assert "teacher: reusing" in log, log
    verdicts = gates_xml(gl / "runs" / "ci" / "export" / "gates.xml")
    assert list(verdicts) == ["accuracy_drop > 1", must_fail, *BASELINE_GATES], log
    assert verdicts[must_fail] and must_fail in verdicts[must_fail], verdicts
    assert verdicts["accuracy_drop > 1"] is None and verdicts[BASELINE_GATES[0]] is None, verdicts
    diff = (gl / "runs" / "ci" / "export" / "diff.md").read_text()
    assert diff.startswith("# kdcli report diff (export-report)") and diff in log
    # every artifact path of the job matched something (the glob ones too)
    art = gitlab_jobs(load_gitlab())["kdcli"]["artifacts"]["paths"]
    assert all(list(gl.glob(p)) for p in art), art
