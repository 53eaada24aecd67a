#!/usr/bin/env python3
"""Check every PromQL query of a Grafana dashboard: syntax with `promtool`, data from Prometheus.

    python deploy/check_dashboard.py deploy/grafana/pel-moderation.json \
        --prometheus http://127.0.0.1:9090 [--var model=pel-b4] [--wait 15]

Grafana variables are substituted first: built-ins (`$__rate_interval`, `$__interval`,
`$__range`...) with fixed durations, dashboard variables with their "All" value (or `--var`).
Each query is then written as a recording rule to a temporary file and checked with
`promtool check rules`, and, with `--prometheus`, evaluated as an instant query. A query passes
when it parses, returns at least one series, and its series carry none of Ray's per-process
labels (`VOLATILE_LABELS`: a query that forgets `sum by (...)` leaks them). Exit status 1 when
any query fails. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

# Labels Ray's exporter and Prometheus attach per process/target, never stable across restarts.
VOLATILE_LABELS = frozenset({
    "WorkerId", "SessionName", "NodeAddress", "Component", "Version", "JobId", "ActorId",
    "otel_scope_name", "otel_scope_schema_url", "otel_scope_version", "instance", "job",
})
BUILTIN_VARIABLES = {
    "__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000",
    "__range": "1h", "__range_s": "3600", "__range_ms": "3600000",
}
_VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*$")


class DashboardError(ValueError):
    """The dashboard file or one of its queries cannot be checked (bad JSON, unknown variable,
    promtool missing)."""


class PrometheusUnreachable(DashboardError):
    """No answer from the Prometheus HTTP API."""


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    ref_id: str
    expr: str  # as written in the dashboard
    promql: str  # variables substituted


@dataclass
class QueryResult:
    query: DashboardQuery
    series: int = 0
    labels: frozenset[str] = frozenset()
    error: Optional[str] = None

    @property
    def leaked(self) -> frozenset[str]:
        return self.labels & VOLATILE_LABELS

    @property
    def ok(self) -> bool:
        return self.error is None and self.series > 0 and not self.leaked

    def describe(self) -> str:
        state = "ok" if self.ok else ("error: " + self.error if self.error else
                                      "no data" if not self.series else
                                      f"leaks volatile labels {sorted(self.leaked)}")
        return f"[{self.query.panel} / {self.query.ref_id}] {state} ({self.series} series)"


@dataclass
class Report:
    results: list[QueryResult] = field(default_factory=list)
    variables: dict[str, list[str]] = field(default_factory=dict)  # query var -> values found

    @property
    def failed(self) -> list[QueryResult]:
        return [r for r in self.results if not r.ok]

    @property
    def empty_variables(self) -> list[str]:
        return [name for name, values in self.variables.items() if not values]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.empty_variables


# ---- reading the dashboard ----------------------------------------------------------------------
def load_dashboard(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        try:
            data = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DashboardError(f"cannot read dashboard {source}: {exc}") from None
    data = data.get("dashboard", data)  # also accept the HTTP API's {"dashboard": {...}}
    if not isinstance(data, dict) or not isinstance(data.get("panels"), list):
        raise DashboardError("not a Grafana dashboard: no 'panels' list")
    return data


def iter_panels(panels: Sequence[Any]) -> Iterator[dict[str, Any]]:
    """Every panel, depth first, including those nested in collapsed rows."""
    for p in panels:
        if isinstance(p, dict):
            yield p
            yield from iter_panels(p.get("panels") or [])


def default_variables(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Built-ins plus each templated variable's "All" value (`.*` without an allValue)."""
    values = dict(BUILTIN_VARIABLES)
    for var in (dashboard.get("templating") or {}).get("list", []):
        name = var.get("name")
        if not name or var.get("type") == "datasource":
            continue
        if var.get("includeAll"):
            values[name] = var.get("allValue") or ".*"
        else:
            current = (var.get("current") or {}).get("value")
            values[name] = current[0] if isinstance(current, list) and current else \
                str(current or ".*")
    return values


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); an unknown one is an error."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in variables:
            raise DashboardError(f"query uses variable ${name} with no value: {expr}")
        return variables[name]
    return _VAR.sub(repl, expr)


def extract_queries(dashboard: str | Path | Mapping[str, Any],
                    overrides: Optional[Mapping[str, str]] = None) -> list[DashboardQuery]:
    """Every target `expr` of every panel (rows included), with variables substituted."""
    data = load_dashboard(dashboard)
    variables = {**default_variables(data), **(overrides or {})}
    queries = []
    for p in iter_panels(data["panels"]):
        for t in p.get("targets") or []:
            expr = t.get("expr") if isinstance(t, dict) else None
            if expr is None:
                continue
            if not isinstance(expr, str) or not expr.strip():
                raise DashboardError(f"panel {p.get('title')!r} has an empty expr")
            queries.append(DashboardQuery(str(p.get("title", "")), str(t.get("refId", "")),
                                          expr, substitute(expr, variables)))
    if not queries:
        raise DashboardError("dashboard has no Prometheus queries")
    return queries


def variable_queries(dashboard: str | Path | Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Query variables of the form label_values([selector,] label): name -> (selector, label)."""
    out = {}
    for var in (load_dashboard(dashboard).get("templating") or {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = _LABEL_VALUES.match(q or "")
        if not m:
            raise DashboardError(f"variable {var.get('name')!r}: unsupported query {q!r}")
        out[var["name"]] = (m.group(1) or "", m.group(2))
    return out


# ---- promtool -----------------------------------------------------------------------------------
def _rules_yaml(queries: Sequence[DashboardQuery]) -> str:
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(queries):
        lines += [f"      - record: dashboard_query_{i}", f"        expr: {json.dumps(q.promql)}"]
    return "\n".join(lines) + "\n"


def _promtool_rules(queries: Sequence[DashboardQuery], promtool: str) -> Optional[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard_rules.yml"
        path.write_text(_rules_yaml(queries))
        proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                              text=True, timeout=60)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


def promtool_check(queries: Sequence[DashboardQuery], promtool: str = "promtool"
                   ) -> dict[DashboardQuery, str]:
    """Queries `promtool check rules` rejects, with its message (empty dict: all valid)."""
    if shutil.which(promtool) is None:
        raise DashboardError(f"promtool not found ({promtool!r}): install Prometheus' promtool")
    if _promtool_rules(queries, promtool) is None:
        return {}
    errors = {}
    for q in queries:  # find the culprits one by one
        message = _promtool_rules([q], promtool)
        if message is not None:
            errors[q] = message
    return errors or {queries[0]: "promtool rejected the batch but no single query"}


# ---- Prometheus ---------------------------------------------------------------------------------
def api_get(base_url: str, path: str, params: Sequence[tuple[str, str]] = (),
            timeout: float = 10.0) -> Any:
    """GET a Prometheus HTTP API path; returns its `data`, raises DashboardError otherwise."""
    url = base_url.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # Prometheus reports bad queries as 400 + JSON
        try:
            body = json.loads(exc.read())
        except ValueError:
            raise DashboardError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusUnreachable(f"cannot query Prometheus at {base_url}: {exc}") from None
    if body.get("status") != "success":
        raise DashboardError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    return body["data"]


def query(base_url: str, promql: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Instant query; returns the result list (vector/matrix), or one pseudo-series for a
    scalar/string result."""
    data = api_get(base_url, "/api/v1/query", [("query", promql)], timeout)
    result = data.get("result")
    return result if isinstance(result, list) else [{"metric": {}, "value": result}]


def run_query(base_url: str, q: DashboardQuery, timeout: float = 10.0) -> QueryResult:
    try:
        series = query(base_url, q.promql, timeout)
    except PrometheusUnreachable:
        raise
    except DashboardError as exc:  # Prometheus refused the query
        return QueryResult(q, error=str(exc))
    labels = frozenset(k for s in series for k in s.get("metric", {}) if k != "__name__")
    return QueryResult(q, series=len(series), labels=labels)


def label_values(base_url: str, selector: str, label: str, timeout: float = 10.0) -> list[str]:
    params = [("match[]", selector)] if selector else []
    return list(api_get(base_url, f"/api/v1/label/{label}/values", params, timeout))


def check_dashboard(dashboard: str | Path | Mapping[str, Any], prometheus_url: str,
                    promtool: str = "promtool", overrides: Optional[Mapping[str, str]] = None,
                    wait_s: float = 0.0, poll_s: float = 1.0) -> Report:
    """promtool-check every query, then evaluate each against `prometheus_url`, re-polling the
    failing ones for up to `wait_s` seconds (fresh scrapes take a few seconds to appear).
    Query variables (label_values) are checked to have values too."""
    queries = extract_queries(dashboard, overrides)
    report = Report()
    syntax = promtool_check(queries, promtool)
    deadline = time.monotonic() + wait_s
    results = {q: QueryResult(q, error=syntax[q]) for q in syntax}
    var_queries = variable_queries(dashboard)
    while True:
        for q in queries:
            if q not in syntax and not (q in results and results[q].ok):
                results[q] = run_query(prometheus_url, q)
        report.variables = {name: label_values(prometheus_url, sel, label)
                            for name, (sel, label) in var_queries.items()}
        pending = [r for q, r in results.items() if not r.ok and q not in syntax]
        if (not pending and not report.empty_variables) or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    report.results = [results[q] for q in queries]
    return report


def syntax_report(dashboard: str | Path | Mapping[str, Any], promtool: str = "promtool",
                  overrides: Optional[Mapping[str, str]] = None) -> dict[DashboardQuery, str]:
    """Only the promtool pass: queries that fail to parse, with promtool's message."""
    return promtool_check(extract_queries(dashboard, overrides), promtool)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dashboard", nargs="?", type=Path,
                    default=Path(__file__).resolve().parent / "grafana" / "pel-moderation.json")
    ap.add_argument("--prometheus", help="Prometheus base URL; omit for the promtool check only")
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="value of a dashboard variable (default: its All value)")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="seconds to keep re-polling queries without data")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--var expects NAME=VALUE, got {item!r}")
        overrides[name] = value
    try:
        if args.prometheus is None:
            errors = syntax_report(args.dashboard, args.promtool, overrides)
            for q in extract_queries(args.dashboard, overrides):
                print(f"[{q.panel} / {q.ref_id}] " + (f"error: {errors[q]}" if q in errors
                                                      else "valid"))
            return 1 if errors else 0
        report = check_dashboard(args.dashboard, args.prometheus, args.promtool, overrides,
                                 wait_s=args.wait)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in report.results:
        print(r.describe())
    for name, values in report.variables.items():
        print(f"variable ${name}: {values if values else 'NO VALUES'}")
    print(f"{len(report.results) - len(report.failed)}/{len(report.results)} queries ok")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
