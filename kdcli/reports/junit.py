"""CI gate verdicts as JUnit XML (``kdcli export --junit PATH``) and as a GitHub job summary.

CI systems (GitHub Actions test reporters, GitLab, Jenkins) read JUnit XML to list test results
next to a job: one ``<testcase>`` per gate (``classname="kdcli.gates"``, ``name`` the expression as
given), a ``<failure message=...>`` for a failed gate and the verdict line as ``<system-out>`` for
a passed one, in one ``<testsuite>`` with ``tests``/``failures`` counts, ``timestamp`` (the
report's ``created``) and ``time`` (seconds the export took). Written with the standard library's
ElementTree, atomically, whether the gates pass or fail.

The GitHub summary is the Markdown report with one line per gate, passed ones too; GitHub Actions
shows what a step appends to the file named by ``GITHUB_STEP_SUMMARY`` on the run's page.
"""

from __future__ import annotations

import os
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from kdcli.files import atomic_write_bytes
from kdcli.reports.gates import GateResult

CLASSNAME = "kdcli.gates"
SUITE_NAME = "kdcli export gates"
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def junit_xml(results: Sequence[GateResult], *, timestamp: str, time_s: float = 0.0, suite: str = SUITE_NAME,
              properties: dict[str, str] | None = None) -> bytes:
    """The JUnit XML document (UTF-8 bytes, with an XML declaration) of ``results``."""
    failures = sum(not r.passed for r in results)
    common = {"tests": str(len(results)), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{time_s:.3f}"}
    root = ET.Element("testsuites", {"name": suite, **common})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **common, "timestamp": timestamp,
                                           "hostname": socket.gethostname()})
    if properties:
        props = ET.SubElement(ts, "properties")
        for k, v in properties.items():
            ET.SubElement(props, "property", {"name": k, "value": str(v)})
    for r in results:
        case = ET.SubElement(ts, "testcase", {"classname": CLASSNAME, "name": r.expr, "time": "0"})
        if r.passed:
            ET.SubElement(case, "system-out").text = r.message
        else:
            ET.SubElement(case, "failure", {"message": r.message, "type": "GateFailed"}).text = r.message
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | Path, results: Sequence[GateResult], **kwargs) -> Path:
    """Write :func:`junit_xml` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_bytes(path, junit_xml(results, **kwargs))
    return path


def gates_markdown(results: Sequence[GateResult], baseline: str | None = None) -> str:
    """The gate verdicts as a Markdown section: one line per gate, the noise-band reasoning included."""
    if not results:
        return ""
    failed = sum(not r.passed for r in results)
    head = f"## Gates: {len(results) - failed} of {len(results)} passed"
    lines = [head, ""]
    if baseline:
        lines += [f"Compared with the baseline `{baseline}`.", ""]
    lines += [f"- {'✅' if r.passed else '❌'} {r.message}" for r in results]
    return "\n".join(lines) + "\n"


_REPORT_GATES = re.compile(r"^## Gates\n\n(?:- .*\n)+\n", re.MULTILINE)  # the section render_markdown writes


def step_summary(report_md: str, results: Sequence[GateResult], baseline: str | None = None) -> str:
    """The job summary: the Markdown report with its gates section replaced by every verdict
    (passed ones too, with the noise-band reasoning)."""
    gates = gates_markdown(results, baseline)
    if not gates:
        return report_md
    text, n = _REPORT_GATES.subn(lambda _: gates + "\n", report_md, count=1)
    return text if n else report_md.rstrip("\n") + "\n\n" + gates


def append_step_summary(markdown: str, env: dict[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to the file ``$GITHUB_STEP_SUMMARY`` names (None when unset). OSError
    when it cannot be written: the caller warns and goes on, a summary never fails a job."""
    path = (os.environ if env is None else env).get(SUMMARY_ENV)
    if not path:
        return None
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return Path(path)
