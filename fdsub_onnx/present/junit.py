"""JUnit XML of ``check`` and ``diff`` results, for CI systems: one testsuite per model, one testcase per check (per
matched layer for a diff)."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ..data.files import write_file_atomically
from ..errors import FdsubError
from ..evaluate.check import FAIL, SKIP, CheckReport
from ..evaluate.drift import DiffReport


def junit_suite(report: CheckReport | None, name: str, error: str | None = None,
                seconds: float | None = None) -> ET.Element:
    """One ``<testsuite>``: a ``<testcase>`` per check (``<failure>``, ``<skipped>``), or one erroring ``load``.

    ``seconds`` is the suite's time (default: the report's).
    """
    suite = ET.Element("testsuite", name=name)
    classname = "fdsub.check." + re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")  # a path's dots are no packages
    if report is None:
        seconds = seconds or 0.0
        case = ET.SubElement(suite, "testcase", classname=classname, name="load", time=f"{seconds:.3f}")
        ET.SubElement(case, "error", message=error or "could not run", type="FdsubError").text = error
        counts = {"tests": 1, "failures": 0, "errors": 1, "skipped": 0}
    else:
        props = ET.SubElement(suite, "properties")
        for key, value in (("model", report.model), ("coverage", f"{report.coverage:.4f}"),
                           ("layers", report.layers), ("decodable", report.decodable),
                           ("sampled", ",".join(report.sampled))):
            ET.SubElement(props, "property", name=key, value=str(value))
        for c in report.checks:
            case = ET.SubElement(suite, "testcase", classname=classname, name=c.name, time=f"{c.seconds:.3f}")
            text = "\n".join([c.summary, *c.details])
            if c.status == FAIL:
                ET.SubElement(case, "failure", message=c.summary, type="CheckFailed").text = text
            elif c.status == SKIP:
                ET.SubElement(case, "skipped", message=c.summary)
            else:
                ET.SubElement(case, "system-out").text = text
        seconds = report.seconds if seconds is None else seconds
        counts = {"tests": len(report.checks), "failures": sum(c.status == FAIL for c in report.checks),
                  "errors": 0, "skipped": sum(c.status == SKIP for c in report.checks)}
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("time", f"{seconds:.3f}")
    return suite


def diff_suite(report: DiffReport) -> ET.Element:
    """One ``<testsuite>`` for a diff: a ``<testcase>`` per matched layer (``<failure>`` where it crosses a limit),
    and one per unmatched layer (failing only where every layer must be matched)."""
    suite = ET.Element("testsuite", name=f"{report.model_b} against {report.model_a}")
    strict = bool(report.limits.get("require_all_matched"))
    failures = 0
    for d in report.layers:
        case = ET.SubElement(suite, "testcase", classname="fdsub.diff", name=d.layer_a, time="0.000")
        text = (f"{d.layer_b}: filter drift max {d.worst:.3g}, cosine min {min(d.cosine, default=1.0):.4f} over "
                f"{len(d.neurons)} neurons")
        if d.failures:
            failures += 1
            ET.SubElement(case, "failure", message="; ".join(d.failures), type="DriftOverLimit").text = text
        else:
            ET.SubElement(case, "system-out").text = text
    for side, unmatched in (("A", report.unmatched_a), ("B", report.unmatched_b)):
        for u in unmatched:
            case = ET.SubElement(suite, "testcase", classname="fdsub.diff", name=f"{u['layer']} ({side})", time="0.000")
            if strict:
                failures += 1
                ET.SubElement(case, "failure", message=f"unmatched: {u['reason']}", type="Unmatched")
            else:
                ET.SubElement(case, "skipped", message=f"unmatched: {u['reason']}")
    tests = len(report.layers) + len(report.unmatched_a) + len(report.unmatched_b)
    for key, value in (("tests", tests), ("failures", failures), ("errors", 0),
                       ("skipped", 0 if strict else tests - len(report.layers)), ("time", f"{report.seconds:.3f}")):
        suite.set(key, str(value))
    return suite


def junit_document(suites: list[ET.Element], name: str) -> ET.ElementTree:
    """``<testsuites>`` around ``suites``, with their totals."""
    root = ET.Element("testsuites", name=name)
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key, "0")) for s in suites)))
    root.set("time", f"{sum(float(s.get('time', '0')) for s in suites):.3f}")
    root.extend(suites)
    return ET.ElementTree(root)


def check_junit_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, a JUnit report path that names a folder."""
    if Path(path).is_dir():
        raise FdsubError(f"--junit {path} is a folder; give a file name such as {Path(path) / 'fdsub-check.xml'}")


def write_junit(tree: ET.ElementTree, path: str | os.PathLike) -> Path:
    """Write ``tree`` to ``path`` atomically: a temporary file beside it, moved into place once complete."""
    check_junit_path(path)
    ET.indent(tree)
    return write_file_atomically(path, lambda f: tree.write(f, encoding="utf-8", xml_declaration=True))
